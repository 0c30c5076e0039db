//! ListObjects paging: prefix, delimiter (common prefixes), start-after /
//! continuation token and max-keys over a sorted key list.

/// One page of a listing.
#[derive(Debug, Default, PartialEq)]
pub struct Page {
    /// Indexes into the key list of the objects on this page.
    pub objects: Vec<usize>,
    pub common_prefixes: Vec<String>,
    /// The last key or prefix returned, when more follow.
    pub next: Option<String>,
}

/// `keys` must be sorted. Keys at or before `after` are skipped; a common
/// prefix counts as one entry and is skipped when it is at or before
/// `after`.
pub fn page(
    keys: &[String],
    prefix: &str,
    delimiter: Option<&str>,
    after: Option<&str>,
    max_keys: usize,
) -> Page {
    let mut out = Page::default();
    if max_keys == 0 {
        // An empty page that is not truncated (as S3 answers max-keys=0).
        return out;
    }
    let mut count = 0;
    let start = keys.partition_point(|k| k.as_str() < prefix);
    for (i, key) in keys.iter().enumerate().skip(start) {
        if !key.starts_with(prefix) {
            break;
        }
        let entry: (String, bool) = match delimiter.filter(|d| !d.is_empty()) {
            Some(d) => match key[prefix.len()..].find(d) {
                Some(pos) => (key[..prefix.len() + pos + d.len()].to_string(), true),
                None => (key.clone(), false),
            },
            None => (key.clone(), false),
        };
        if after.is_some_and(|a| entry.0.as_str() <= a) {
            continue;
        }
        if entry.1 && out.common_prefixes.last() == Some(&entry.0) {
            continue;
        }
        if count == max_keys {
            out.next = Some(last_of(&out, keys));
            return out;
        }
        count += 1;
        if entry.1 {
            out.common_prefixes.push(entry.0);
        } else {
            out.objects.push(i);
        }
    }
    out
}

fn last_of(p: &Page, keys: &[String]) -> String {
    let o = p.objects.last().map(|&i| keys[i].clone());
    let c = p.common_prefixes.last().cloned();
    match (o, c) {
        (Some(a), Some(b)) => a.max(b),
        (a, b) => a.or(b).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<String> {
        ["a/1", "a/2", "a/b/3", "b", "c/4", "c/5"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn prefixes_delimiters_and_paging() {
        let k = keys();
        let p = page(&k, "", Some("/"), None, 1000);
        assert_eq!(p.objects, [3]);
        assert_eq!(p.common_prefixes, ["a/", "c/"]);
        assert_eq!(p.next, None);
        // max-keys=0: nothing, and not truncated.
        assert_eq!(page(&k, "", Some("/"), None, 0), Page::default());
        assert_eq!(page(&k, "", None, None, 0).next, None);
        let p = page(&k, "a/", Some("/"), None, 1000);
        assert_eq!(p.objects, [0, 1]);
        assert_eq!(p.common_prefixes, ["a/b/"]);
        let p = page(&k, "", None, None, 2);
        assert_eq!(p.objects, [0, 1]);
        assert_eq!(p.next.as_deref(), Some("a/2"));
        let p = page(&k, "", None, Some("a/2"), 2);
        assert_eq!(p.objects, [2, 3]);
        let p = page(&k, "", Some("/"), Some("a/"), 1);
        assert_eq!(p.objects, [3]);
        assert_eq!(p.next.as_deref(), Some("b"));
        let p = page(&k, "zzz", None, None, 10);
        assert_eq!(p, Page::default());
    }
}
