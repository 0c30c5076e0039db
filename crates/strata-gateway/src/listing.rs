//! ListObjects paging: prefix, delimiter (common prefixes), start-after /
//! continuation token and max-keys over a sorted key list.
//!
//! A page costs O(max-keys × log N), not O(N): the first entry is found by
//! binary search, and each common prefix is stepped over by a binary search
//! for its end. A full listing of a bucket of N keys in pages of 1000 is
//! then O(N log N), where scanning from the start of the prefix on every
//! page made it O(N² / 1000).

/// One page of a listing.
#[derive(Debug, Default, PartialEq)]
pub struct Page {
    /// Indexes into the key list of the objects on this page.
    pub objects: Vec<usize>,
    pub common_prefixes: Vec<String>,
    /// The last key or prefix returned, when more follow.
    pub next: Option<String>,
}

/// Where a listing starts.
#[derive(Clone, Copy, Debug)]
pub enum After<'a> {
    Start,
    /// ListObjectsV2 `start-after`: keys after this one. A common prefix
    /// is listed when any key under it is after it (as S3 does: a
    /// start-after inside `a/` still lists `a/`).
    Key(&'a str),
    /// A continuation token (or a v1 `marker`, which clients set to the
    /// last `NextMarker`): the last key or prefix listed. A common prefix
    /// at or before it was listed already and is skipped.
    Entry(&'a str),
}

impl<'a> After<'a> {
    /// The key or entry to list after, and whether common prefixes at or
    /// before it are skipped.
    fn parts(self) -> (Option<&'a str>, bool) {
        match self {
            After::Start => (None, false),
            After::Key(k) => (Some(k), false),
            After::Entry(e) => (Some(e), true),
        }
    }
}

/// `items` must be sorted by `key`. A common prefix counts as one entry.
pub fn page<T>(
    items: &[T],
    key: impl Fn(&T) -> &str,
    prefix: &str,
    delimiter: Option<&str>,
    after: After<'_>,
    max_keys: usize,
) -> Page {
    let (after, skip_prefixes) = after.parts();
    let mut out = Page::default();
    if max_keys == 0 {
        // An empty page that is not truncated (as S3 answers max-keys=0).
        return out;
    }
    let delimiter = delimiter.filter(|d| !d.is_empty());
    let mut i = items.partition_point(|t| key(t) < prefix);
    if let Some(a) = after {
        // A key at or before `after` rolls up (if at all) into a prefix
        // that is at or before it too, so both are skipped here.
        i = i.max(items.partition_point(|t| key(t) <= a));
    }
    let mut count = 0;
    while let Some(item) = items.get(i) {
        let k = key(item);
        if !k.starts_with(prefix) {
            break;
        }
        let group = delimiter
            .and_then(|d| {
                k[prefix.len()..]
                    .find(d)
                    .map(|pos| prefix.len() + pos + d.len())
            })
            .map(|end| &k[..end]);
        let Some(cp) = group else {
            if count == max_keys {
                out.next = Some(last_of(&out, items, &key));
                return out;
            }
            count += 1;
            out.objects.push(i);
            i += 1;
            continue;
        };
        // The keys under one common prefix are contiguous: step over them.
        let end = i + items[i..].partition_point(|t| key(t).starts_with(cp));
        if skip_prefixes && after.is_some_and(|a| cp <= a) {
            i = end;
            continue;
        }
        if count == max_keys {
            out.next = Some(last_of(&out, items, &key));
            return out;
        }
        count += 1;
        out.common_prefixes.push(cp.to_string());
        i = end;
    }
    out
}

fn last_of<T>(p: &Page, items: &[T], key: &impl Fn(&T) -> &str) -> String {
    let o = p.objects.last().map(|&i| key(&items[i]).to_string());
    let c = p.common_prefixes.last().cloned();
    match (o, c) {
        (Some(a), Some(b)) => a.max(b),
        (a, b) => a.or(b).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_str(s: &String) -> &str {
        s
    }

    /// The listing as a straight scan of every key (what `page` must equal).
    fn reference(
        keys: &[String],
        prefix: &str,
        delimiter: Option<&str>,
        after: After<'_>,
        max_keys: usize,
    ) -> Page {
        let (after, entry) = after.parts();
        let mut out = Page::default();
        if max_keys == 0 {
            return out;
        }
        let mut count = 0;
        for (i, key) in keys.iter().enumerate() {
            if !key.starts_with(prefix) {
                continue;
            }
            let e: (String, bool) = match delimiter.filter(|d| !d.is_empty()) {
                Some(d) => match key[prefix.len()..].find(d) {
                    Some(pos) => (key[..prefix.len() + pos + d.len()].to_string(), true),
                    None => (key.clone(), false),
                },
                None => (key.clone(), false),
            };
            if after.is_some_and(|a| key.as_str() <= a)
                || (entry && after.is_some_and(|a| e.0.as_str() <= a))
                || (e.1 && out.common_prefixes.last() == Some(&e.0))
            {
                continue;
            }
            if count == max_keys {
                out.next = Some(last_of(&out, keys, &as_str));
                return out;
            }
            count += 1;
            if e.1 {
                out.common_prefixes.push(e.0);
            } else {
                out.objects.push(i);
            }
        }
        out
    }

    #[test]
    fn pages_equal_a_scan_of_every_key() {
        // Deterministic pseudo-random key sets over a small alphabet, so
        // prefixes, delimiters and markers collide often.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let alphabet = ["a", "b", "/", "-", "ab", "b/"];
        let word = |rnd: &mut dyn FnMut(u64) -> u64| {
            let len = 1 + rnd(5);
            (0..len)
                .map(|_| alphabet[rnd(alphabet.len() as u64) as usize])
                .collect::<String>()
        };
        for _ in 0..400 {
            let mut keys: Vec<String> = (0..rnd(40)).map(|_| word(&mut rnd)).collect();
            keys.sort();
            keys.dedup();
            let prefix = if rnd(3) == 0 {
                String::new()
            } else {
                word(&mut rnd)[..1].to_string()
            };
            let delimiter = ["/", "-", "", "ab"][rnd(4) as usize];
            let delimiter = (rnd(4) != 0).then_some(delimiter);
            let word_after = word(&mut rnd);
            let after = match rnd(3) {
                0 => After::Start,
                1 => After::Key(&word_after),
                _ => After::Entry(&word_after),
            };
            let max_keys = rnd(6) as usize;
            let got = page(&keys, as_str, &prefix, delimiter, after, max_keys);
            let want = reference(&keys, &prefix, delimiter, after, max_keys);
            assert_eq!(
                got, want,
                "{keys:?} {prefix:?} {delimiter:?} {after:?} {max_keys}"
            );
            // Following `next` lists every entry exactly once.
            let full = reference(&keys, &prefix, delimiter, after, usize::MAX);
            let (mut objs, mut cps) = (Vec::new(), Vec::new());
            let mut p = page(&keys, as_str, &prefix, delimiter, after, 2);
            for _ in 0..=keys.len() {
                objs.extend(p.objects);
                cps.extend(p.common_prefixes);
                let Some(next) = p.next else { break };
                p = page(&keys, as_str, &prefix, delimiter, After::Entry(&next), 2);
            }
            assert_eq!((objs, cps), (full.objects, full.common_prefixes));
        }
    }

    fn keys() -> Vec<String> {
        ["a/1", "a/2", "a/b/3", "b", "c/4", "c/5"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn prefixes_delimiters_and_paging() {
        let k = keys();
        let p = page(&k, as_str, "", Some("/"), After::Start, 1000);
        assert_eq!(p.objects, [3]);
        assert_eq!(p.common_prefixes, ["a/", "c/"]);
        assert_eq!(p.next, None);
        // max-keys=0: nothing, and not truncated.
        assert_eq!(
            page(&k, as_str, "", Some("/"), After::Start, 0),
            Page::default()
        );
        assert_eq!(page(&k, as_str, "", None, After::Start, 0).next, None);
        let p = page(&k, as_str, "a/", Some("/"), After::Start, 1000);
        assert_eq!(p.objects, [0, 1]);
        assert_eq!(p.common_prefixes, ["a/b/"]);
        let p = page(&k, as_str, "", None, After::Start, 2);
        assert_eq!(p.objects, [0, 1]);
        assert_eq!(p.next.as_deref(), Some("a/2"));
        let p = page(&k, as_str, "", None, After::Entry("a/2"), 2);
        assert_eq!(p.objects, [2, 3]);
        let p = page(&k, as_str, "", Some("/"), After::Entry("a/"), 1);
        assert_eq!(p.objects, [3]);
        assert_eq!(p.next.as_deref(), Some("b"));
        // A start-after inside a common prefix lists the prefix (keys
        // under it follow), a continuation from it does not.
        let p = page(&k, as_str, "", Some("/"), After::Key("a/1"), 10);
        assert_eq!(
            (p.objects, p.common_prefixes),
            (vec![3], vec!["a/".to_string(), "c/".to_string()])
        );
        let p = page(&k, as_str, "", Some("/"), After::Key("a/b/3"), 10);
        assert_eq!(p.common_prefixes, ["c/"]);
        let p = page(&k, as_str, "", Some("/"), After::Entry("a/1"), 10);
        assert_eq!(p.common_prefixes, ["c/"]);
        let p = page(&k, as_str, "zzz", None, After::Start, 10);
        assert_eq!(p, Page::default());
    }
}
