//! Namespace paths. Every path that enters Strata is normalised here, once,
//! so no other component has to reason about `..`, `//` or NUL bytes.

use std::fmt;

use crate::CommonError;

/// Longest single name, as on common local file systems.
pub const MAX_NAME_LEN: usize = 255;
/// Longest full path.
pub const MAX_PATH_LEN: usize = 4096;

/// An absolute, normalised namespace path: starts with `/`, no trailing `/`
/// (except the root), no empty, `.` or `..` segments, no NUL bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NsPath(String);

impl NsPath {
    pub fn root() -> Self {
        NsPath("/".to_string())
    }

    /// Parses a user-supplied path. A single trailing `/` is accepted and
    /// dropped ("/data/" is "/data"); everything else that is ambiguous is an
    /// error rather than a silent rewrite, because a rewritten `..` is how
    /// path-traversal bugs start.
    pub fn parse(input: &str) -> Result<Self, CommonError> {
        let bad = |reason| CommonError::InvalidPath {
            path: input.to_string(),
            reason,
        };
        if input.is_empty() {
            return Err(bad("the path is empty; namespace paths start with '/'"));
        }
        if !input.starts_with('/') {
            return Err(bad("namespace paths are absolute: start it with '/'"));
        }
        if input.len() > MAX_PATH_LEN {
            return Err(bad("the path is longer than 4096 bytes"));
        }
        if input.contains('\0') {
            return Err(bad("the path contains a NUL byte"));
        }
        if input == "/" {
            return Ok(Self::root());
        }
        let trimmed = input.strip_suffix('/').unwrap_or(input);
        for seg in trimmed[1..].split('/') {
            match seg {
                "" => return Err(bad("the path has an empty segment ('//')")),
                "." => return Err(bad("the path has a '.' segment")),
                ".." => return Err(bad("the path has a '..' segment; use the resolved path")),
                s if s.len() > MAX_NAME_LEN => {
                    return Err(bad("a path segment is longer than 255 bytes"));
                }
                _ => {}
            }
        }
        Ok(NsPath(trimmed.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }

    /// The segments after the root, in order.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|s| !s.is_empty())
    }

    /// The last segment; `None` for the root.
    pub fn name(&self) -> Option<&str> {
        if self.is_root() {
            None
        } else {
            self.0.rsplit('/').next()
        }
    }

    /// The parent path; `None` for the root.
    pub fn parent(&self) -> Option<NsPath> {
        if self.is_root() {
            return None;
        }
        match self.0.rfind('/') {
            Some(0) => Some(Self::root()),
            Some(i) => Some(NsPath(self.0[..i].to_string())),
            None => None,
        }
    }

    /// Appends one validated name.
    pub fn join(&self, name: &str) -> Result<NsPath, CommonError> {
        if self.is_root() {
            NsPath::parse(&format!("/{name}"))
        } else {
            NsPath::parse(&format!("{}/{name}", self.0))
        }
        .and_then(|p| {
            if p.parent().as_ref() == Some(self) {
                Ok(p)
            } else {
                Err(CommonError::InvalidPath {
                    path: name.to_string(),
                    reason: "a name may not contain '/'",
                })
            }
        })
    }

    /// True when `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &NsPath) -> bool {
        other.is_root()
            || self.0 == other.0
            || (self.0.starts_with(&other.0) && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }

    /// The part of `self` below `prefix`, without a leading '/', or `None`.
    pub fn strip_prefix(&self, prefix: &NsPath) -> Option<&str> {
        if !self.starts_with(prefix) {
            return None;
        }
        if prefix.is_root() {
            return Some(&self.0[1..]);
        }
        Some(self.0[prefix.0.len()..].trim_start_matches('/'))
    }
}

impl fmt::Display for NsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_and_normalises() {
        assert_eq!(NsPath::parse("/").unwrap().as_str(), "/");
        assert_eq!(NsPath::parse("/a/b/").unwrap().as_str(), "/a/b");
        assert_eq!(NsPath::parse("/a/b").unwrap().name(), Some("b"));
        assert_eq!(
            NsPath::parse("/a/b").unwrap().parent().unwrap().as_str(),
            "/a"
        );
        assert_eq!(NsPath::parse("/a").unwrap().parent().unwrap().as_str(), "/");
    }

    #[test]
    fn rejects_ambiguous_paths_with_a_reason() {
        for (p, want) in [
            ("", "empty"),
            ("a/b", "absolute"),
            ("/a//b", "empty segment"),
            ("/a/../b", "'..'"),
            ("/a/./b", "'.'"),
            ("/a\0b", "NUL"),
        ] {
            let err = NsPath::parse(p).unwrap_err().to_string();
            assert!(err.contains(want), "{p:?}: {err}");
            assert!(
                err.contains(&format!("{p:?}")),
                "error names the path: {err}"
            );
        }
        assert!(NsPath::parse(&format!("/{}", "x".repeat(256))).is_err());
    }

    #[test]
    fn prefix_logic() {
        let a = NsPath::parse("/data").unwrap();
        let b = NsPath::parse("/data/x/y").unwrap();
        let c = NsPath::parse("/database").unwrap();
        assert!(b.starts_with(&a));
        assert!(!c.starts_with(&a));
        assert_eq!(b.strip_prefix(&a), Some("x/y"));
        assert_eq!(a.strip_prefix(&a), Some(""));
        assert_eq!(b.strip_prefix(&NsPath::root()), Some("data/x/y"));
        assert!(a.join("x/y").is_err());
        assert_eq!(a.join("x").unwrap().as_str(), "/data/x");
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_output_is_canonical(s in "[/a-z.\\x00]{0,24}") {
            if let Ok(p) = NsPath::parse(&s) {
                let again = NsPath::parse(p.as_str()).unwrap();
                prop_assert_eq!(&again, &p);
                prop_assert!(!p.as_str().contains("//"));
                prop_assert!(!p.segments().any(|s| s == ".." || s == "."));
                // Rebuilding from segments gives back the same path.
                let mut rebuilt = NsPath::root();
                for seg in p.segments() { rebuilt = rebuilt.join(seg).unwrap(); }
                prop_assert_eq!(rebuilt, p);
            }
        }
    }
}
