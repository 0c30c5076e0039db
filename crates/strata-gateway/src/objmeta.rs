//! Object metadata kept as extended attributes of the namespace file:
//! user metadata (`x-amz-meta-*`) as `user.s3.meta.<key>`, the standard
//! content headers as `user.s3.<header>`, and the tag set as
//! `user.s3.tagging` (URL-encoded, as the `x-amz-tagging` header). The same
//! names are visible through a FUSE mount (`getfattr -d`).

use std::collections::HashMap;

use s3s::dto::{Metadata, Tag, TagSet};
use s3s::{S3Error, S3ErrorCode, S3Result};

pub const META_PREFIX: &str = "user.s3.meta.";
pub const TAGGING: &str = "user.s3.tagging";
const CONTENT_TYPE: &str = "user.s3.content-type";
const CONTENT_ENCODING: &str = "user.s3.content-encoding";
const CONTENT_DISPOSITION: &str = "user.s3.content-disposition";
const CONTENT_LANGUAGE: &str = "user.s3.content-language";
const CACHE_CONTROL: &str = "user.s3.cache-control";

/// S3's limit on the user metadata of one object (keys and values, bytes).
pub const MAX_USER_METADATA: usize = 2048;
/// S3's limits on object tags.
pub const MAX_TAGS: usize = 10;
const MAX_TAG_KEY: usize = 128;
const MAX_TAG_VALUE: usize = 256;

/// What a PUT, copy or multipart upload says about the object besides its
/// bytes.
#[derive(Default, Clone, Debug)]
pub struct ObjectMeta {
    pub metadata: Option<Metadata>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub content_disposition: Option<String>,
    pub content_language: Option<String>,
    pub cache_control: Option<String>,
    /// The `x-amz-tagging` header (URL-encoded `k=v&k2=v2`).
    pub tagging: Option<String>,
}

fn invalid(code: S3ErrorCode, msg: String) -> S3Error {
    S3Error::with_message(code, msg)
}

impl ObjectMeta {
    /// Tags in `tagging`, for `x-amz-tagging-count` (none: not sent).
    pub fn tag_count(&self) -> Option<i32> {
        let n = self
            .tagging
            .as_deref()
            .map_or(0, |t| parse_tagging(t).map_or(0, |v| v.len()));
        (n > 0).then_some(n as i32)
    }

    /// The attributes the object is created with; checks S3's limits.
    pub fn to_xattrs(&self) -> S3Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        if let Some(m) = &self.metadata {
            let size: usize = m.iter().map(|(k, v)| k.len() + v.len()).sum();
            if size > MAX_USER_METADATA {
                return Err(invalid(
                    S3ErrorCode::MetadataTooLarge,
                    format!(
                        "user metadata of {size} bytes is above the {MAX_USER_METADATA} bytes allowed"
                    ),
                ));
            }
            for (k, v) in m {
                out.push((
                    format!("{META_PREFIX}{}", k.to_ascii_lowercase()),
                    v.as_bytes().to_vec(),
                ));
            }
        }
        for (name, v) in [
            (CONTENT_TYPE, &self.content_type),
            (CONTENT_ENCODING, &self.content_encoding),
            (CONTENT_DISPOSITION, &self.content_disposition),
            (CONTENT_LANGUAGE, &self.content_language),
            (CACHE_CONTROL, &self.cache_control),
        ] {
            if let Some(v) = v {
                out.push((name.to_string(), v.as_bytes().to_vec()));
            }
        }
        if let Some(t) = &self.tagging {
            let tags = parse_tagging(t)?;
            if !tags.is_empty() {
                out.push((TAGGING.to_string(), encode_tags(&tags).into_bytes()));
            }
        }
        Ok(out)
    }
}

fn text(x: &HashMap<String, Vec<u8>>, name: &str) -> Option<String> {
    x.get(name).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Reads an object's metadata back from its attributes (the content type
/// defaults as in S3; `tagging` is the stored tag set).
pub fn stored(x: &HashMap<String, Vec<u8>>) -> ObjectMeta {
    let mut m = Metadata::default();
    for (k, v) in x {
        if let Some(key) = k.strip_prefix(META_PREFIX) {
            m.insert(key.to_string(), String::from_utf8_lossy(v).into_owned());
        }
    }
    ObjectMeta {
        metadata: (!m.is_empty()).then_some(m),
        // S3 answers this for objects stored without a content type.
        content_type: text(x, CONTENT_TYPE).or_else(|| Some("binary/octet-stream".into())),
        content_encoding: text(x, CONTENT_ENCODING),
        content_disposition: text(x, CONTENT_DISPOSITION),
        content_language: text(x, CONTENT_LANGUAGE),
        cache_control: text(x, CACHE_CONTROL),
        tagging: text(x, TAGGING),
    }
}

/// Checks a tag set against S3's rules (at most 10 tags, keys of 1..=128
/// and values of 0..=256 characters, keys unique).
pub fn check_tags(tags: &[(String, String)]) -> S3Result<()> {
    if tags.len() > MAX_TAGS {
        return Err(invalid(
            S3ErrorCode::InvalidTag,
            format!(
                "{} tags given; an object may have at most {MAX_TAGS}",
                tags.len()
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > MAX_TAG_KEY {
            return Err(invalid(
                S3ErrorCode::InvalidTag,
                format!("tag key {k:?} must be 1..={MAX_TAG_KEY} characters"),
            ));
        }
        if v.chars().count() > MAX_TAG_VALUE {
            return Err(invalid(
                S3ErrorCode::InvalidTag,
                format!("the value of tag {k:?} is longer than {MAX_TAG_VALUE} characters"),
            ));
        }
        if !seen.insert(k) {
            return Err(invalid(
                S3ErrorCode::InvalidTag,
                format!("tag key {k:?} is given more than once"),
            ));
        }
    }
    Ok(())
}

/// Parses the `x-amz-tagging` form (`k=v&k2=v2`, URL-encoded).
pub fn parse_tagging(s: &str) -> S3Result<Vec<(String, String)>> {
    let tags: Vec<(String, String)> = form_urlencoded::parse(s.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    check_tags(&tags)?;
    Ok(tags)
}

pub fn encode_tags(tags: &[(String, String)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in tags {
        s.append_pair(k, v);
    }
    s.finish()
}

/// A tag set from a PutObjectTagging body.
pub fn tags_of(set: &TagSet) -> S3Result<Vec<(String, String)>> {
    let tags: Vec<(String, String)> = set
        .iter()
        .map(|t| {
            (
                t.key.clone().unwrap_or_default(),
                t.value.clone().unwrap_or_default(),
            )
        })
        .collect();
    check_tags(&tags)?;
    Ok(tags)
}

/// The tag set stored on an object, for GetObjectTagging.
pub fn tag_set(x: &HashMap<String, Vec<u8>>) -> TagSet {
    x.get(TAGGING)
        .map(|t| {
            form_urlencoded::parse(t)
                .map(|(k, v)| Tag {
                    key: Some(k.into_owned()),
                    value: Some(v.into_owned()),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Encodes attributes for a file (multipart uploads keep them beside
/// their parts): one `name<TAB>hex(value)` line each.
pub fn encode_lines(x: &[(String, Vec<u8>)]) -> String {
    x.iter()
        .map(|(k, v)| format!("{k}\t{}\n", hex::encode(v)))
        .collect()
}

pub fn decode_lines(s: &str) -> Vec<(String, Vec<u8>)> {
    s.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('\t')?;
            Some((k.to_string(), hex::decode(v).ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_limits_hold() {
        let t = parse_tagging("a=1&b%20c=x%26y&empty=").unwrap();
        assert_eq!(t[1], ("b c".into(), "x&y".into()));
        assert_eq!(parse_tagging(&encode_tags(&t)).unwrap(), t);
        let many: String = (0..11).map(|i| format!("k{i}=v&")).collect();
        assert!(parse_tagging(&many).is_err());
        assert!(parse_tagging("a=1&a=2").is_err());
        assert!(parse_tagging(&format!("{}=v", "k".repeat(129))).is_err());
        assert!(parse_tagging("=v").is_err());
    }

    #[test]
    fn metadata_round_trips_through_attributes() {
        let mut m = Metadata::default();
        m.insert("Color".into(), "blue".into());
        let om = ObjectMeta {
            metadata: Some(m),
            content_type: Some("text/plain".into()),
            tagging: Some("project=x".into()),
            ..Default::default()
        };
        let x: HashMap<String, Vec<u8>> = om.to_xattrs().unwrap().into_iter().collect();
        let s = stored(&x);
        assert_eq!(s.metadata.as_ref().unwrap().get("color").unwrap(), "blue");
        assert_eq!(s.content_type.as_deref(), Some("text/plain"));
        assert_eq!(s.tag_count(), Some(1));
        let lines = encode_lines(&om.to_xattrs().unwrap());
        assert_eq!(decode_lines(&lines).len(), 3);
        let mut big = Metadata::default();
        big.insert("k".into(), "v".repeat(MAX_USER_METADATA));
        let om = ObjectMeta {
            metadata: Some(big),
            ..Default::default()
        };
        assert!(om.to_xattrs().is_err());
    }
}
