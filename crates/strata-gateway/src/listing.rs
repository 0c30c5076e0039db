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

/// The directory part of a prefix or key: up to and including its last
/// `/` (`"a/b/c"` -> `"a/b/"`, `"a"` -> `""`).
pub fn dir_of(prefix: &str) -> &str {
    &prefix[..prefix.rfind('/').map_or(0, |i| i + 1)]
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

/// One directory's entries as a [`walk`] sees them: name, whether it is
/// a directory, and what is kept for a file.
pub type DirEntry<T> = (String, bool, T);

/// A directory's key: its name and '/'.
fn entry_key<T>((n, d, _): &DirEntry<T>) -> String {
    let mut k = n.clone();
    if *d {
        k.push('/');
    }
    k
}

/// A directory a walk is in: its entries fetched and not yet taken (in
/// key order, last first, so `pop` takes the next), and the key of the
/// last one fetched while the directory may hold more.
struct Dir<T> {
    /// Its key from the top of the bucket ("" or ending in '/').
    key: String,
    entries: Vec<DirEntry<T>>,
    more: Option<String>,
}

impl<T> Dir<T> {
    /// Directory `key` from its first entry after `start` (a key inside
    /// it), or `None` if it is missing.
    async fn open<E, F, Fut>(
        list: &F,
        key: &str,
        start: &str,
        chunk: usize,
    ) -> Result<Option<Self>, E>
    where
        F: Fn(String, String, usize) -> Fut,
        Fut: std::future::Future<Output = Result<Option<Vec<DirEntry<T>>>, E>>,
    {
        let mut d = Dir {
            key: key.to_string(),
            entries: Vec::new(),
            more: Some(start.to_string()),
        };
        Ok(d.fill(list, chunk).await?.then_some(d))
    }

    /// Fetches the next entries; false if the directory is missing.
    async fn fill<E, F, Fut>(&mut self, list: &F, chunk: usize) -> Result<bool, E>
    where
        F: Fn(String, String, usize) -> Fut,
        Fut: std::future::Future<Output = Result<Option<Vec<DirEntry<T>>>, E>>,
    {
        let Some(after) = self.more.take() else {
            return Ok(true);
        };
        let path = self.key.trim_end_matches('/').to_string();
        let Some(mut e) = list(path, after, chunk).await? else {
            return Ok(false);
        };
        e.sort_by_cached_key(|x| std::cmp::Reverse(entry_key(x)));
        if e.len() >= chunk {
            self.more = e.first().map(entry_key);
        }
        self.entries = e;
        Ok(true)
    }

    /// The next entry in key order, fetching more as needed.
    async fn next<E, F, Fut>(&mut self, list: &F, chunk: usize) -> Result<Option<DirEntry<T>>, E>
    where
        F: Fn(String, String, usize) -> Fut,
        Fut: std::future::Future<Output = Result<Option<Vec<DirEntry<T>>>, E>>,
    {
        if self.entries.is_empty() {
            // A directory removed meanwhile ends here.
            self.fill(list, chunk).await?;
        }
        Ok(self.entries.pop())
    }
}

/// Where a walk starts inside directory `dk`: the name of its entry that
/// holds `after`, or "" if `after` is not inside it. Entries at or before
/// that name are before `after` (a directory of that name, whose key
/// ends in '/', sorts after it and is kept).
fn start_in<'a>(dk: &str, after: Option<&'a str>) -> &'a str {
    after
        .and_then(|a| a.strip_prefix(dk))
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("")
}

/// The keys (with what is kept for each) one [`page`] needs, found by
/// walking the tree in key order from `after` on, listing only the
/// directories on the way, `chunk` entries at a time: a page costs the
/// entries it passes, not the whole subtree (what a continuation page
/// costs when no cached listing is at hand). `list(dir, start, n)` gives
/// up to `n` entries of directory `dir` (relative to the bucket, `""` for
/// its top) whose keys (a directory's is its name and '/') come after
/// `start`, the first ones in key order (`None` if `dir` is missing);
/// fewer than `n` means no more. With a delimiter (only `/` is walked
/// this way; the caller lists in full for others) a directory at the
/// level of the common prefixes contributes one key under it, the first
/// after `after`. The result is sorted; [`page`] over it gives the page a
/// full listing would.
pub async fn walk<T, E, F, Fut>(
    list: F,
    prefix: &str,
    delimiter_slash: bool,
    after: After<'_>,
    max_keys: usize,
    chunk: usize,
) -> Result<Vec<(String, T)>, E>
where
    F: Fn(String, String, usize) -> Fut,
    Fut: std::future::Future<Output = Result<Option<Vec<DirEntry<T>>>, E>>,
{
    let chunk = chunk.max(1);
    let (after, skip_prefixes) = after.parts();
    let mut out = Vec::new();
    // Page entries found (objects, and one per common prefix); one more
    // than max-keys tells the page it is truncated.
    let mut found = 0;
    let mut stack: Vec<Dir<T>> = Vec::new();
    let top = dir_of(prefix);
    if max_keys == 0 || top.starts_with('/') || top.contains("//") {
        // No key has an empty path segment.
        return Ok(out);
    }
    if let Some(d) = Dir::open(&list, top, start_in(top, after), chunk).await? {
        stack.push(d);
    }
    // A key after which nothing can match the prefix ends the walk.
    let past = |k: &str| k > prefix && !k.starts_with(prefix);
    let below_after = |k: &str| after.is_some_and(|a| k <= a);
    // The whole subtree of directory key `dk` (ending in '/') is at or
    // before `after`.
    let subtree_before = |dk: &str| after.is_some_and(|a| a >= dk && !a.starts_with(dk));
    while found <= max_keys {
        let Some(dir) = stack.last_mut() else {
            break;
        };
        let Some((name, is_dir, item)) = dir.next(&list, chunk).await? else {
            stack.pop();
            continue;
        };
        let key = format!("{}{name}", dir.key);
        if !is_dir {
            if past(&key) {
                break;
            }
            if key.starts_with(prefix) && !below_after(&key) {
                out.push((key, item));
                found += 1;
            }
            continue;
        }
        let dk = format!("{key}/");
        if past(&dk) {
            break;
        }
        let matches = dk.starts_with(prefix);
        if !(matches || prefix.starts_with(dk.as_str())) || subtree_before(&dk) {
            continue;
        }
        if delimiter_slash && matches && dk.len() > prefix.len() {
            // A common prefix: one key after `after` under it, if any.
            if skip_prefixes && below_after(&dk) {
                continue;
            }
            if let Some(first) =
                first_file(&list, &dk, after, chunk, &below_after, &subtree_before).await?
            {
                out.push(first);
                found += 1;
            }
            continue;
        }
        if let Some(d) = Dir::open(&list, &dk, start_in(&dk, after), chunk).await? {
            stack.push(d);
        }
    }
    Ok(out)
}

/// The first file in key order under directory key `dk` that is not at
/// or before `after`, fetching a few entries at a time (it is usually
/// among a directory's first).
async fn first_file<T, E, F, Fut>(
    list: &F,
    dk: &str,
    after: Option<&str>,
    chunk: usize,
    below_after: &impl Fn(&str) -> bool,
    subtree_before: &impl Fn(&str) -> bool,
) -> Result<Option<(String, T)>, E>
where
    F: Fn(String, String, usize) -> Fut,
    Fut: std::future::Future<Output = Result<Option<Vec<DirEntry<T>>>, E>>,
{
    let chunk = chunk.min(16);
    let mut stack: Vec<Dir<T>> = Vec::new();
    if let Some(d) = Dir::open(list, dk, start_in(dk, after), chunk).await? {
        stack.push(d);
    }
    while let Some(dir) = stack.last_mut() {
        let Some((name, is_dir, item)) = dir.next(list, chunk).await? else {
            stack.pop();
            continue;
        };
        let key = format!("{}{name}", dir.key);
        if !is_dir {
            if !below_after(&key) {
                return Ok(Some((key, item)));
            }
            continue;
        }
        let sub = format!("{key}/");
        if subtree_before(&sub) {
            continue;
        }
        if let Some(d) = Dir::open(list, &sub, start_in(&sub, after), chunk).await? {
            stack.push(d);
        }
    }
    Ok(None)
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

    /// Deterministic pseudo-random numbers below `n`.
    fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        }
    }

    /// A tree of files (and some empty directories) as `walk` lists it.
    struct Tree {
        files: Vec<String>,
        empty_dirs: Vec<String>,
    }

    impl Tree {
        fn list(&self, dir: &str) -> Option<Vec<DirEntry<()>>> {
            let pre = if dir.is_empty() {
                String::new()
            } else {
                format!("{dir}/")
            };
            let mut names = std::collections::BTreeMap::new();
            let mut exists = dir.is_empty();
            for p in self.files.iter().chain(&self.empty_dirs) {
                if let Some(rest) = p.strip_prefix(&pre) {
                    exists = true;
                    let is_file = self.files.contains(p);
                    match rest.split_once('/') {
                        Some((n, _)) => names.insert(n.to_string(), true),
                        None if !rest.is_empty() => names.insert(rest.to_string(), !is_file),
                        None => None,
                    };
                }
            }
            exists.then(|| names.into_iter().map(|(n, d)| (n, d, ())).collect())
        }
    }

    #[tokio::test]
    async fn walks_cut_the_pages_a_full_listing_cuts() {
        let mut rnd = xorshift(0x2545_f491_4f6c_dd1d);
        let seg = ["a", "b", "ab", "a-", "b.c"];
        let path = |rnd: &mut dyn FnMut(u64) -> u64| {
            (0..1 + rnd(3))
                .map(|_| seg[rnd(seg.len() as u64) as usize])
                .collect::<Vec<_>>()
                .join("/")
        };
        let mut lists = 0usize;
        for _ in 0..300 {
            // Files, none of them also a directory of another.
            let mut files: Vec<String> = Vec::new();
            for _ in 0..rnd(30) {
                let p = path(&mut rnd);
                let clash = files
                    .iter()
                    .any(|f| f.starts_with(&format!("{p}/")) || p.starts_with(&format!("{f}/")));
                if !clash && !files.contains(&p) {
                    files.push(p);
                }
            }
            let mut empty_dirs = Vec::new();
            for _ in 0..rnd(3) {
                let d = format!("{}/e", path(&mut rnd));
                if !files
                    .iter()
                    .any(|f| d.starts_with(&format!("{f}/")) || *f == d)
                {
                    empty_dirs.push(d);
                }
            }
            files.sort();
            let tree = Tree { files, empty_dirs };
            let prefix = match rnd(6) {
                0 => String::new(),
                1 => format!("{}/", path(&mut rnd)),
                2 => "/".to_string(),
                3 => format!("{}//", path(&mut rnd)),
                _ => path(&mut rnd)[..1].to_string(),
            };
            let slash = rnd(2) == 0;
            let delimiter = slash.then_some("/");
            let word = path(&mut rnd);
            let after = match rnd(3) {
                0 => After::Start,
                1 => After::Key(&word),
                _ => After::Entry(&word),
            };
            let max_keys = 1 + rnd(5) as usize;
            let counted = std::cell::Cell::new(0usize);
            // Directories listed a few entries at a time, as the master
            // pages them.
            let chunk = 1 + rnd(4) as usize;
            let list = |dir: String, start: String, n: usize| {
                counted.set(counted.get() + 1);
                let r = tree.list(&dir).map(|mut e| {
                    e.retain(|x| entry_key(x) > start);
                    e.sort_by_cached_key(entry_key);
                    e.truncate(n);
                    e
                });
                async move { Ok::<_, ()>(r) }
            };
            let want = page(&tree.files, as_str, &prefix, delimiter, after, max_keys);
            let got = walk(list, &prefix, slash, after, max_keys, chunk)
                .await
                .unwrap();
            let keys: Vec<String> = got.iter().map(|(k, _)| k.clone()).collect();
            assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
            let p = page(&keys, as_str, &prefix, delimiter, after, max_keys);
            let names = |p: &Page, k: &[String]| {
                (
                    p.objects.iter().map(|&i| k[i].clone()).collect::<Vec<_>>(),
                    p.common_prefixes.clone(),
                    p.next.clone(),
                )
            };
            assert_eq!(
                names(&p, &keys),
                names(&want, &tree.files),
                "{:?} {:?} prefix {prefix:?} {delimiter:?} {after:?} {max_keys}",
                tree.files,
                tree.empty_dirs
            );
            lists += counted.get();
        }
        assert!(lists > 300, "the walks listed directories ({lists})");
    }

    #[test]
    fn pages_equal_a_scan_of_every_key() {
        // Deterministic pseudo-random key sets over a small alphabet, so
        // prefixes, delimiters and markers collide often.
        let mut rnd = xorshift(0x9e37_79b9_7f4a_7c15);
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
