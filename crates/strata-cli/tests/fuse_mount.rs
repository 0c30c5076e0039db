//! The FUSE mount, end to end: a real `strata mount` process over a real
//! cluster with an S3 server on loopback, used through ordinary file system
//! calls (std::fs, git). Every mount is unmounted by a guard, even when a
//! test fails.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use strata_testkit::{Cluster, ClusterOptions};

fn fuse_available() -> bool {
    let ok = Path::new("/dev/fuse").exists()
        && Command::new("fusermount3")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: /dev/fuse or fusermount3 missing (apt-get install fuse3)");
    }
    ok
}

fn is_mounted(mp: &Path) -> bool {
    let want = std::fs::canonicalize(mp).unwrap_or_else(|_| mp.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.to_str().unwrap_or("")))
}

/// A `strata mount --foreground` process; unmounted and stopped on drop.
struct Mount {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Mount {
    fn start(cluster: &Cluster, extra: &[&str]) -> Mount {
        Self::start_at(&cluster.master_addr, extra)
    }

    /// Mounts with `--master masters` (one address or a list).
    fn start_at(masters: &str, extra: &[&str]) -> Mount {
        Self::start_with_env(masters, extra, &[])
    }

    fn start_with_env(masters: &str, extra: &[&str], env: &[(&str, &str)]) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let mp = dir.path().join("mnt");
        std::fs::create_dir(&mp).unwrap();
        let child = Command::new(strata_bin())
            .args(["--master", masters, "mount"])
            .arg(&mp)
            .arg("--foreground")
            .args(extra)
            .env("STRATA_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .expect("strata mount");
        let mut m = Mount {
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&m.path()) {
            if let Some(c) = m.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("strata mount exited: {st}");
            }
            assert!(Instant::now() < deadline, "not mounted within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let mp = self.path();
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our child's pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&mp) {
            let _ = Command::new("fusermount3").args(["-uz"]).arg(&mp).status();
        }
    }
}

/// Waits until the kernel's read-ahead for the mount at `mp` is `kib` KiB
/// (the daemon sets it once the mount answers); only root may set it.
fn assert_read_ahead(mp: &Path, kib: u64) {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let dev = std::fs::metadata(mp).unwrap().dev();
    let bdi = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = std::fs::read_to_string(&bdi).unwrap();
        if now.trim() == kib.to_string() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{bdi}: {} KiB, not {kib}",
            now.trim()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn files_and_directories_through_the_mount() {
    if !fuse_available() {
        return;
    }
    let local = tempfile::tempdir().unwrap();
    let env = start(ClusterOptions {
        mounts: vec![format!("/local=file://{}", local.path().display())],
        ..Default::default()
    });
    let s3 = s3_client(&env.s3);
    let big = pattern(9 << 20, 7);
    s3_put(&s3, "data/big.bin", &big).await;
    let m = Mount::start(&env.cluster, &[]);
    let root = m.path();
    // The default --read-ahead.
    assert_read_ahead(&root, 4096);

    // Reads: whole file, and positional reads across page boundaries.
    assert_eq!(std::fs::read(root.join("s3/data/big.bin")).unwrap(), big);
    let mut f = std::fs::File::open(root.join("s3/data/big.bin")).unwrap();
    let mut buf = vec![0u8; 5000];
    f.seek(SeekFrom::Start((1 << 20) - 100)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf[..], &big[(1 << 20) - 100..(1 << 20) + 4900]);
    // Random 4 KiB reads with the kernel's copy dropped reach the daemon,
    // which serves those inside one open page file on its request thread.
    // SAFETY: an advisory call on an open descriptor.
    unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        );
    }
    // The first read of a page locates its file; a second read of that
    // page, not next to the last read, is served from it.
    for off in [
        7 << 20,
        3 << 20,
        (7 << 20) + 65536,
        (3 << 20) + 12288,
        (5 << 20) + 12288,
        (2 << 20) - 4096,
        (5 << 20) + 500_000,
        (2 << 20) - 40960,
    ] {
        let mut b = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, off as u64).unwrap();
        assert!(b == big[off..off + 4096], "4 KiB at {off}");
    }
    drop(f);
    // Sequential 1 MiB reads arriving out of order, as the kernel's
    // concurrent read-ahead requests do (FADV_RANDOM: each read is one
    // request, none added): a request behind the windows, a first read
    // that is not at 0, jumps a little ahead; all bytes right.
    drop_file_cache(&root.join("s3/data/big.bin"));
    let f = std::fs::File::open(root.join("s3/data/big.bin")).unwrap();
    // SAFETY: an advisory call on an open descriptor.
    unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_RANDOM,
        )
    };
    for mib in [1usize, 0, 2, 4, 3, 5, 7, 6, 8, 2, 0] {
        let at = mib << 20;
        let n = (1usize << 20).min(big.len() - at);
        let mut b = vec![0u8; n];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at as u64).unwrap();
        assert!(b == big[at..at + n], "1 MiB at {mib} MiB");
    }
    drop(f);
    let mut names: Vec<String> = std::fs::read_dir(root.join("s3"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["data"]);
    let meta = std::fs::metadata(root.join("s3/data/big.bin")).unwrap();
    assert_eq!(meta.len(), 9 << 20);
    // Programs size a buffer per open file by st_blksize (Python's open()
    // does): a 1 MiB one cost more than reading a small cached file.
    assert_eq!(std::os::unix::fs::MetadataExt::blksize(&meta), 128 << 10);

    // Writes land in S3 and are visible through the SDK.
    let written = pattern(3 << 20, 8);
    std::fs::write(root.join("s3/data/new.bin"), &written).unwrap();
    let c = client(&env.cluster);
    assert_eq!(
        &c.read_file("/s3/data/new.bin").await.unwrap()[..],
        &written[..]
    );
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(root.join("s3/data/new.bin"))
        .unwrap();
    f.write_all(b"tail").unwrap();
    drop(f);
    let mut expect = written.clone();
    expect.extend_from_slice(b"tail");
    assert_eq!(std::fs::read(root.join("s3/data/new.bin")).unwrap(), expect);

    // Directories, rename, delete.
    std::fs::create_dir(root.join("s3/dir")).unwrap();
    std::fs::rename(root.join("s3/data/new.bin"), root.join("s3/dir/moved.bin")).unwrap();
    assert!(!root.join("s3/data/new.bin").exists());
    assert_eq!(
        std::fs::read(root.join("s3/dir/moved.bin")).unwrap(),
        expect
    );
    let e = std::fs::remove_dir(root.join("s3/dir")).unwrap_err();
    assert_eq!(errno(&e), libc::ENOTEMPTY, "{e}");
    std::fs::remove_file(root.join("s3/dir/moved.bin")).unwrap();
    std::fs::remove_dir(root.join("s3/dir")).unwrap();
    assert!(c.stat("/s3/dir").await.unwrap_err().is_not_found());

    // A directory renamed under a local-directory UFS moves there too.
    std::fs::create_dir(root.join("local/d1")).unwrap();
    std::fs::write(root.join("local/d1/f.txt"), b"in d1").unwrap();
    std::fs::rename(root.join("local/d1"), root.join("local/d2")).unwrap();
    assert_eq!(
        std::fs::read(root.join("local/d2/f.txt")).unwrap(),
        b"in d1"
    );
    assert_eq!(
        std::fs::read(local.path().join("d2/f.txt")).unwrap(),
        b"in d1"
    );
    assert!(!local.path().join("d1").exists());

    // A directory renamed while a file in it is open for writing: what was
    // written is committed first, and later writes and the close go to the
    // file's new path.
    std::fs::create_dir(root.join("local/w1")).unwrap();
    let mut w = std::fs::File::create(root.join("local/w1/open.txt")).unwrap();
    w.write_all(b"before the rename, ").unwrap();
    std::fs::rename(root.join("local/w1"), root.join("local/w2")).unwrap();
    w.write_all(b"after it").unwrap();
    close(w).unwrap();
    let want = b"before the rename, after it";
    assert_eq!(std::fs::read(root.join("local/w2/open.txt")).unwrap(), want);
    assert_eq!(
        std::fs::read(local.path().join("w2/open.txt")).unwrap(),
        want
    );
    assert!(!local.path().join("w1").exists());
    assert!(
        c.stat("/local/w1/open.txt")
            .await
            .unwrap_err()
            .is_not_found()
    );

    // Precise errnos for what is not supported.
    let e = std::fs::rename(root.join("s3/data/big.bin"), root.join("local/big.bin")).unwrap_err();
    assert_eq!(errno(&e), libc::EXDEV, "rename across mounts: {e}");
    let e = std::os::unix::fs::symlink("big.bin", root.join("s3/data/link")).unwrap_err();
    assert_eq!(errno(&e), libc::EPERM, "{e}");
    // A write in the middle of an existing file rewrites it (through a
    // staged copy).
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join("s3/data/big.bin"))
        .unwrap();
    f.seek(SeekFrom::Start(10)).unwrap();
    f.write_all(b"x").unwrap();
    drop(f);
    let mut changed = big.clone();
    changed[10] = b'x';
    assert_eq!(
        std::fs::read(root.join("s3/data/big.bin")).unwrap(),
        changed
    );
    assert_eq!(
        &c.read_file("/s3/data/big.bin").await.unwrap()[..],
        &changed[..]
    );
    let e = std::fs::read(root.join("s3/missing")).unwrap_err();
    assert_eq!(errno(&e), libc::ENOENT);
    // Truncation empties a file.
    std::fs::write(root.join("s3/t.txt"), b"0123456789").unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(root.join("s3/t.txt"))
        .unwrap();
    assert_eq!(std::fs::metadata(root.join("s3/t.txt")).unwrap().len(), 0);
}

fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

fn setx(p: &Path, name: &str, v: &[u8], flags: i32) -> Result<(), i32> {
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of v.len() bytes.
    let r = unsafe {
        libc::setxattr(
            cpath(p).as_ptr(),
            n.as_ptr(),
            v.as_ptr().cast(),
            v.len(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn getx(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 1 << 17];
    // SAFETY: valid strings; the buffer is as long as we say.
    let r = unsafe {
        libc::getxattr(
            cpath(p).as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn listx(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 1 << 16];
    // SAFETY: as above.
    let r = unsafe { libc::listxattr(cpath(p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "listxattr: {}", std::io::Error::last_os_error());
    buf.truncate(r as usize);
    buf.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn removex(p: &Path, name: &str) -> Result<(), i32> {
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: as above.
    let r = unsafe { libc::removexattr(cpath(p).as_ptr(), n.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn extended_attributes_through_the_mount() {
    if !fuse_available() {
        return;
    }
    let env = start(ClusterOptions::default());
    let m = Mount::start(&env.cluster, &[]);
    let f = m.path().join("s3/x.txt");
    std::fs::write(&f, b"data").unwrap();
    setx(&f, "user.color", b"blue", 0).unwrap();
    assert_eq!(getx(&f, "user.color").unwrap(), b"blue");
    assert_eq!(
        setx(&f, "user.color", b"red", libc::XATTR_CREATE),
        Err(libc::EEXIST)
    );
    assert_eq!(
        setx(&f, "user.none", b"x", libc::XATTR_REPLACE),
        Err(libc::ENODATA)
    );
    setx(&f, "user.color", b"red", libc::XATTR_REPLACE).unwrap();
    setx(&f, "user.empty", b"", 0).unwrap();
    assert_eq!(listx(&f), ["user.color", "user.empty"]);
    assert_eq!(getx(&f, "user.color").unwrap(), b"red");
    assert_eq!(getx(&f, "user.empty").unwrap(), b"");
    assert_eq!(getx(&f, "user.missing"), Err(libc::ENODATA));
    assert_eq!(getx(&f, "security.capability"), Err(libc::ENODATA));
    assert_eq!(setx(&f, "trusted.x", b"1", 0), Err(libc::EOPNOTSUPP));
    assert_eq!(
        setx(&f, "user.big", &vec![7u8; 70_000], 0).unwrap_err(),
        libc::E2BIG
    );
    // A directory takes them too.
    setx(&m.path().join("s3"), "user.dir", b"d", 0).unwrap();
    assert_eq!(getx(&m.path().join("s3"), "user.dir").unwrap(), b"d");
    removex(&f, "user.empty").unwrap();
    assert_eq!(removex(&f, "user.empty"), Err(libc::ENODATA));
    // They are the namespace's: the SDK sees them, and a change made by
    // another client shows in the mount once the attribute TTL passes.
    let c = client(&env.cluster);
    let info = c.stat("/s3/x.txt").await.unwrap();
    assert_eq!(info.xattrs.get("user.color").unwrap(), b"red");
    assert_eq!(info.xattrs.len(), 1);
    c.set_xattrs(
        "/s3/x.txt",
        [("user.other".to_string(), b"sdk".to_vec())],
        vec![],
        strata_client::XattrFlag::XattrAny,
    )
    .await
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(getx(&f, "user.other").unwrap(), b"sdk");
    // Writing the file again keeps them; the data is unchanged by all this.
    std::fs::write(&f, b"data2").unwrap();
    assert_eq!(getx(&f, "user.color").unwrap(), b"red");
    assert_eq!(std::fs::read(&f).unwrap(), b"data2");
}

/// Sizes and types of every entry of `dir` as `ls -l` sees them: the
/// listing, then a `stat` of each listed name (from the dentry the listing
/// left, or a lookup).
fn listed_sizes(dir: &Path) -> Vec<(String, bool, u64)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (e.file_name().into_string().unwrap(), m.is_dir(), m.len())
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn listings_carry_the_attributes_of_their_entries() {
    if !fuse_available() {
        return;
    }
    let local = tempfile::tempdir().unwrap();
    let ufs = local.path().join("ds");
    std::fs::create_dir_all(ufs.join("sub")).unwrap();
    // Enough entries for several READDIRPLUS replies (up to 128 KiB, about
    // 700 of these names, each); the first reply comes before the rewrites
    // below, the later ones after.
    let mut want = vec![("sub".to_string(), true, 0u64)];
    for i in 0..2000u64 {
        let name = format!("file-with-a-longish-name-{i:04}");
        std::fs::write(ufs.join(&name), vec![7u8; (i * 7) as usize]).unwrap();
        want.push((name, false, i * 7));
    }
    want.sort();
    let env = start(ClusterOptions {
        mounts: vec![format!("/local=file://{}", local.path().display())],
        ..Default::default()
    });
    let m = Mount::start(&env.cluster, &[]);
    let dir = m.path().join("local/ds");
    let sizes = |got: &[(String, bool, u64)]| {
        got.iter()
            .filter(|e| !e.1)
            .map(|e| (e.0.clone(), e.2))
            .collect::<Vec<_>>()
    };
    let got = listed_sizes(&dir);
    assert_eq!(
        got.iter().map(|e| (&e.0, e.1)).collect::<Vec<_>>(),
        want.iter().map(|e| (&e.0, e.1)).collect::<Vec<_>>()
    );
    assert_eq!(sizes(&got), sizes(&want));
    // Files read through the mount after the listing read right.
    assert_eq!(
        std::fs::read(dir.join("file-with-a-longish-name-0123")).unwrap(),
        vec![7u8; 123 * 7]
    );
    // Changed and removed behind Strata: after a sync and the attribute
    // timeout (1 s), the next listing shows the new size and no old name.
    std::fs::write(ufs.join("file-with-a-longish-name-0005"), vec![1u8; 99_999]).unwrap();
    std::fs::remove_file(ufs.join("file-with-a-longish-name-0006")).unwrap();
    client(&env.cluster).sync("/local/ds").await.unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let got = listed_sizes(&dir);
    let mut want2 = want.clone();
    want2.retain(|e| e.0 != "file-with-a-longish-name-0006");
    for e in &mut want2 {
        if e.0 == "file-with-a-longish-name-0005" {
            e.2 = 99_999;
        }
    }
    assert_eq!(sizes(&got), sizes(&want2));
    assert_eq!(
        std::fs::read(dir.join("file-with-a-longish-name-0005")).unwrap(),
        vec![1u8; 99_999]
    );
    let e = std::fs::metadata(dir.join("file-with-a-longish-name-0006")).unwrap_err();
    assert_eq!(errno(&e), libc::ENOENT);
    // Files rewritten through the mount while a listing of their directory
    // is being read: the entries that follow carry the new sizes, not the
    // ones the listing had when the directory was opened.
    let mut it = std::fs::read_dir(&dir).unwrap();
    let mut seen: Vec<(String, u64)> = Vec::new();
    for _ in 0..5 {
        let e = it.next().unwrap().unwrap();
        seen.push((
            e.file_name().into_string().unwrap(),
            e.metadata().unwrap().len(),
        ));
    }
    let rewritten: Vec<String> = (1..20)
        .map(|i| format!("file-with-a-longish-name-{:04}", i * 100))
        .collect();
    for name in &rewritten {
        assert!(seen.iter().all(|e| &e.0 != name), "{seen:?}");
        std::fs::write(dir.join(name), vec![3u8; 12_345]).unwrap();
    }
    for e in it {
        let e = e.unwrap();
        seen.push((
            e.file_name().into_string().unwrap(),
            e.metadata().unwrap().len(),
        ));
    }
    seen.sort();
    for e in &mut want2 {
        if rewritten.contains(&e.0) {
            e.2 = 12_345;
        }
    }
    let seen_files: Vec<_> = seen.into_iter().filter(|e| e.0 != "sub").collect();
    assert_eq!(seen_files, sizes(&want2));
    // Names the kernel learned from listings and then forgot (dropped
    // dentries) are looked up again correctly.
    // ("2" frees dentries and inodes; root only, else a no-op here.)
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "2");
    assert_eq!(sizes(&listed_sizes(&dir)), sizes(&want2));
    assert_eq!(
        std::fs::metadata(dir.join("file-with-a-longish-name-1999"))
            .unwrap()
            .len(),
        1999 * 7
    );
    // Every name stat'ed one by one after the attribute timeout, as `ls -l`
    // and `find` do once they have read a large listing: after a few
    // misses the mount lists the directory again and answers the rest from
    // that listing; a name removed behind Strata stays gone.
    std::thread::sleep(Duration::from_millis(1100));
    for (name, is_dir, size) in &want2 {
        let m = std::fs::metadata(dir.join(name)).unwrap();
        assert_eq!(m.is_dir(), *is_dir, "{name}");
        if !is_dir {
            assert_eq!(m.len(), *size, "{name}");
        }
    }
    let e = std::fs::metadata(dir.join("file-with-a-longish-name-0006")).unwrap_err();
    assert_eq!(errno(&e), libc::ENOENT);
}

#[tokio::test(flavor = "multi_thread")]
async fn deleted_in_the_ufs_while_open_and_unmount_with_open_files() {
    if !fuse_available() {
        return;
    }
    let env = start(ClusterOptions::default());
    let s3 = s3_client(&env.s3);
    let data = pattern(2 << 20, 9);
    s3_put(&s3, "gone.bin", &data).await;
    let m = Mount::start(&env.cluster, &[]);
    let path = m.path().join("s3/gone.bin");
    let mut f = std::fs::File::open(&path).unwrap();
    s3.delete("gone.bin", false).await.unwrap();
    // Never cached: the read must fail cleanly (not hang, not return junk).
    let mut buf = Vec::new();
    let e = f.read_to_end(&mut buf).unwrap_err();
    assert!(
        [libc::ENOENT, libc::ESTALE].contains(&errno(&e)),
        "read of a deleted object: {e}"
    );
    // Unmount is refused while a file is open, and works after it closes.
    let out = env
        .cluster
        .cli(&["umount", m.path().to_str().unwrap()])
        .unwrap();
    let err = fails(out);
    assert!(err.contains("files still open"), "{err}");
    drop(f);
    ok(env
        .cluster
        .cli(&["umount", m.path().to_str().unwrap()])
        .unwrap());
    assert!(!is_mounted(&m.path()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_mount_reads_and_refuses_every_change() {
    if !fuse_available() {
        return;
    }
    let env = start(ClusterOptions::default());
    let s3 = s3_client(&env.s3);
    let data = pattern(300 << 10, 4);
    s3_put(&s3, "ro/a.bin", &data).await;
    let m = Mount::start(&env.cluster, &["--read-only", "--read-ahead", "2MiB"]);
    assert_read_ahead(&m.path(), 2048);
    let dir = m.path().join("s3/ro");
    let file = dir.join("a.bin");
    assert_eq!(std::fs::read(&file).unwrap(), data);
    assert_eq!(std::fs::read(&file).unwrap(), data, "read again");
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(errno(&e), libc::EROFS, "{what}: {e}");
    };
    erofs(std::fs::write(dir.join("new.bin"), b"x"), "create");
    erofs(
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .map(drop),
        "open for writing",
    );
    erofs(std::fs::create_dir(dir.join("d")), "mkdir");
    erofs(std::fs::remove_file(&file), "unlink");
    erofs(std::fs::rename(&file, dir.join("b.bin")), "rename");
    erofs(
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)),
        "chmod",
    );
    // Nothing changed in the store.
    let listed: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(listed, ["a.bin"]);
    assert_eq!(std::fs::read(&file).unwrap(), data);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_no_open_mount_reads_files_and_sees_new_versions() {
    if !fuse_available() {
        return;
    }
    let env = start(ClusterOptions::default());
    let s3 = s3_client(&env.s3);
    let big = pattern(5 << 20, 6);
    s3_put(&s3, "no/big.bin", &big).await;
    let small: Vec<Vec<u8>> = (0..40u64)
        .map(|i| pattern(10_000 + i as usize * 997, i))
        .collect();
    for (i, d) in small.iter().enumerate() {
        s3_put(&s3, &format!("no/s{i}"), d).await;
    }
    let err = fails(
        env.cluster
            .cli(&["mount", "/nonexistent-mp", "--no-open"])
            .unwrap(),
    );
    assert!(err.contains("--read-only"), "{err}");
    let m = Mount::start(
        &env.cluster,
        &["--read-only", "--no-open", "--attr-timeout", "0.5"],
    );
    let dir = m.path().join("s3/no");
    // Many descriptors of one file at once, from several threads, and
    // many files one after another.
    std::thread::scope(|sc| {
        for t in 0..4 {
            let (dir, big, small) = (&dir, &big, &small);
            sc.spawn(move || {
                for round in 0..3 {
                    assert_eq!(
                        &std::fs::read(dir.join("big.bin")).unwrap(),
                        big,
                        "{t}/{round}"
                    );
                    for (i, want) in small.iter().enumerate() {
                        assert_eq!(&std::fs::read(dir.join(format!("s{i}"))).unwrap(), want);
                    }
                }
            });
        }
    });
    // A ranged read in the middle.
    let f = std::fs::File::open(dir.join("big.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 3_000_001).unwrap();
    assert_eq!(buf, big[3_000_001..3_000_001 + 4096]);
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("s0"))
        .expect_err("open for writing");
    assert_eq!(errno(&e), libc::EROFS, "{e}");
    // A new version written elsewhere (another mount) is read once the
    // attribute timeout is over: the old pages are dropped.
    let rw = Mount::start(&env.cluster, &[]);
    let newer = pattern(7000, 99);
    std::fs::write(rw.path().join("s3/no/s3"), &newer).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = std::fs::read(dir.join("s3")).unwrap();
        if got == newer {
            break;
        }
        assert_eq!(got, small[3], "neither the old nor the new version");
        assert!(
            Instant::now() < deadline,
            "the new version was not seen within 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // close(2) succeeds (the kernel's FLUSH is answered, not refused).
    let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
    // SAFETY: `fd` was just taken out of the File, so it is closed once.
    let closed = unsafe { libc::close(fd) };
    assert_eq!(closed, 0, "close: {}", std::io::Error::last_os_error());
    assert_eq!(std::fs::read(dir.join("s4")).unwrap(), small[4]);
}

#[tokio::test(flavor = "multi_thread")]
async fn mount_point_must_exist_and_be_empty_and_daemon_mode_works() {
    if !fuse_available() {
        return;
    }
    let env = start(ClusterOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = fails(
        env.cluster
            .cli(&["mount", missing.to_str().unwrap()])
            .unwrap(),
    );
    assert!(
        err.contains("does not exist") && err.contains("nope"),
        "{err}"
    );
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), b"x").unwrap();
    let err = fails(env.cluster.cli(&["mount", full.to_str().unwrap()]).unwrap());
    assert!(err.contains("not empty"), "{err}");
    // A bad --read-ahead is refused before anything is mounted, in every
    // mode.
    let empty_mp = dir.path().join("ra");
    std::fs::create_dir(&empty_mp).unwrap();
    for extra in [&[][..], &["--foreground", "--restartable"][..]] {
        let mut args = vec!["mount", empty_mp.to_str().unwrap(), "--read-ahead", "3X"];
        args.extend_from_slice(extra);
        let err = fails(env.cluster.cli(&args).unwrap());
        assert!(err.contains("--read-ahead 3X"), "{err}");
        assert!(!is_mounted(&empty_mp));
    }
    let err = fails(
        env.cluster
            .cli(&[
                "mount",
                dir.path().join("empty").to_str().unwrap(),
                "--path",
                "/s3/nothing",
            ])
            .unwrap(),
    );
    assert!(
        err.contains("does not exist") || err.contains("nothing"),
        "{err}"
    );

    // Daemon mode: returns once mounted; `strata umount` stops it.
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let out = ok(env
        .cluster
        .cli(&[
            "mount",
            mp.to_str().unwrap(),
            "--log",
            dir.path().join("mount.log").to_str().unwrap(),
        ])
        .unwrap());
    assert!(out.contains("daemon pid"), "{out}");
    let guard = Unmount(mp.clone());
    assert!(is_mounted(&mp));
    assert!(mp.join("s3").is_dir());
    ok(env.cluster.cli(&["umount", mp.to_str().unwrap()]).unwrap());
    assert!(!is_mounted(&mp));

    // Mounted again at once at the same path: the old daemon, which
    // notices its unmount only later (here: held stopped until the new
    // mount is up), must leave the new mount alone.
    let log = dir.path().join("mount.log");
    let mount_daemon_at = |mp: &Path| {
        let out = ok(env
            .cluster
            .cli(&[
                "mount",
                mp.to_str().unwrap(),
                "--log",
                log.to_str().unwrap(),
            ])
            .unwrap());
        let pid = out
            .split("daemon pid ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse::<u32>().ok());
        pid.unwrap_or_else(|| panic!("no daemon pid in {out:?}"))
    };
    let mount_daemon = || mount_daemon_at(&mp);
    let old = mount_daemon();
    signal(old, libc::SIGSTOP);
    ok(env.cluster.cli(&["umount", mp.to_str().unwrap()]).unwrap());
    let new = mount_daemon();
    signal(old, libc::SIGCONT);
    let gone = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gone(old) {
        assert!(
            Instant::now() < deadline,
            "the old daemon {old} did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        is_mounted(&mp),
        "the new mount was unmounted by the old daemon"
    );
    assert!(mp.join("s3").is_dir());
    assert!(!gone(new));
    ok(env.cluster.cli(&["umount", mp.to_str().unwrap()]).unwrap());
    assert!(!is_mounted(&mp));
    drop(guard);

    // The same for a restartable mount, its supervisor held stopped: once
    // it runs again it finds its own connection gone and ends, leaving the
    // new mount alone (it must not start daemons on the dead connection,
    // nor unmount the path).
    let mut r = Mount::start(&env.cluster, &["--restartable"]);
    let rp = r.path();
    assert!(rp.join("s3").is_dir());
    let supervisor = r.child.as_ref().unwrap().id();
    signal(supervisor, libc::SIGSTOP);
    ok(env.cluster.cli(&["umount", rp.to_str().unwrap()]).unwrap());
    let new = mount_daemon_at(&rp);
    let guard = Unmount(rp.clone());
    signal(supervisor, libc::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = r.child.as_mut().unwrap().try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the supervisor did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "supervisor: {status}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        is_mounted(&rp),
        "the new mount was unmounted by the old supervisor"
    );
    assert!(rp.join("s3").is_dir());
    assert!(!gone(new));
    ok(env.cluster.cli(&["umount", rp.to_str().unwrap()]).unwrap());
    drop(guard);
}

/// Unmounts a daemon-mode mount if a test fails before it does.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("fusermount3").arg("-uz").arg(&self.0).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn git_clone_and_status_in_the_mount() {
    if !fuse_available() {
        return;
    }
    if Command::new("git").arg("--version").output().is_err() {
        eprintln!("SKIPPED: git is not installed");
        return;
    }
    let env = start(ClusterOptions::default());
    let m = Mount::start(&env.cluster, &[]);
    let repo = tempfile::tempdir().unwrap();
    let git = |dir: &Path, args: &[&str]| {
        let out = Command::new("git")
            .args(["-c", "user.email=t@example.com", "-c", "user.name=t"])
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    git(repo.path(), &["init", "-q"]);
    for i in 0..20 {
        std::fs::create_dir_all(repo.path().join(format!("d{}", i % 4))).unwrap();
        std::fs::write(
            repo.path().join(format!("d{}/f{i}.txt", i % 4)),
            pattern(1000 + i * 997, i as u64),
        )
        .unwrap();
    }
    git(repo.path(), &["add", "."]);
    git(repo.path(), &["commit", "-qm", "init"]);
    let into = m.path().join("s3/clone");
    git(
        m.path().join("s3").as_path(),
        &[
            "clone",
            "-q",
            "--no-local",
            repo.path().to_str().unwrap(),
            "clone",
        ],
    );
    assert_eq!(git(&into, &["status", "--porcelain"]), "");
    for i in 0..20 {
        let rel = format!("d{}/f{i}.txt", i % 4);
        assert_eq!(
            std::fs::read(into.join(&rel)).unwrap(),
            std::fs::read(repo.path().join(&rel)).unwrap()
        );
    }
    // A change shows up in git status.
    std::fs::write(into.join("d0/f0.txt"), b"changed").unwrap();
    assert!(git(&into, &["status", "--porcelain"]).contains("d0/f0.txt"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_through_the_mount_ride_out_a_master_failover() {
    if !fuse_available() {
        return;
    }
    let mut c =
        strata_testkit::HaCluster::start(&strata_bin(), 3, 1, Vec::new()).expect("HA cluster");
    let client = strata_client::Client::new(&c.master_list(), Default::default()).unwrap();
    let opts = strata_client::WriteOptions {
        write_type: strata_client::WriteType::MustCache,
        recursive: true,
        ..Default::default()
    };
    let mut files = Vec::new();
    for i in 0..40 {
        let data = format!("file {i} ").repeat(1000 + i).into_bytes();
        client
            .write_file(&format!("/ds/f{i}"), &data, opts)
            .await
            .unwrap();
        files.push(data);
    }
    // Short kernel caches, so the reads keep asking the daemon (and it the
    // masters) during the failover.
    let m = Mount::start_at(&c.master_list(), &["--attr-timeout", "0"]);
    let root = m.path().join("ds");
    let r = Readers::start(root, files, true, false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leader = tokio::task::block_in_place(|| c.wait_leader(Duration::from_secs(30))).unwrap();
    tokio::task::block_in_place(|| c.kill_master(leader)).unwrap();
    let (ok, errors) = r.finish_after_passes(2).await;
    assert!(
        errors.is_empty(),
        "reads failed during the failover: {errors:?}"
    );
    assert!(ok >= 80, "only {ok} reads");
    let now = client.list_masters().await.unwrap().leader_id;
    assert_ne!(now, leader);
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_through_the_mount_ride_out_a_worker_restart() {
    if !fuse_available() {
        return;
    }
    let mut c = strata_testkit::HaCluster::start(&strata_bin(), 1, 1, Vec::new()).expect("cluster");
    let client = strata_client::Client::new(&c.master_list(), Default::default()).unwrap();
    let opts = strata_client::WriteOptions {
        write_type: strata_client::WriteType::MustCache,
        recursive: true,
        ..Default::default()
    };
    let mut files = Vec::new();
    for i in 0..20 {
        let data = format!("block {i} ").repeat(3000 + i).into_bytes();
        client
            .write_file(&format!("/ds/f{i}"), &data, opts)
            .await
            .unwrap();
        files.push(data);
    }
    // Every read goes to the worker over TCP: no short-circuit, no kernel
    // attribute cache, and the page cache dropped before each pass.
    let m = Mount::start_with_env(
        &c.master_list(),
        &["--attr-timeout", "0"],
        &[("STRATA_CLIENT_SHORT_CIRCUIT", "false")],
    );
    let root = m.path().join("ds");
    let r = Readers::start(root, files, false, true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| c.kill_worker(0)).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| c.restart_worker(0)).unwrap();
    let (ok, errors) = r.finish_after_passes(2).await;
    assert!(
        errors.is_empty(),
        "reads failed across the worker restart: {errors:?}"
    );
    assert!(ok >= 40, "only {ok} reads");
}

/// A thread reading every file of a directory through a mount, pass after
/// pass, recording every failure, until told to stop.
struct Readers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    files: usize,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Readers {
    /// `list`: also list the directory each pass; `drop_cache`: drop the
    /// page cache before each pass, so reads reach the daemon.
    fn start(root: PathBuf, files: Vec<Vec<u8>>, list: bool, drop_cache: bool) -> Readers {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ok = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let n = files.len();
        let thread = {
            let (stop, ok) = (stop.clone(), ok.clone());
            std::thread::spawn(move || {
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) && ok.load(Ordering::Relaxed) < 1_000_000 {
                    if drop_cache {
                        let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
                    }
                    if list {
                        match std::fs::read_dir(&root).map(|d| d.count()) {
                            Ok(n) if n == files.len() => {}
                            Ok(n) => errors.push(format!("listing: {n} entries")),
                            Err(e) => errors.push(format!("listing: {e}")),
                        }
                    }
                    for (i, want) in files.iter().enumerate() {
                        match std::fs::read(root.join(format!("f{i}"))) {
                            Ok(b) if b == *want => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(_) => errors.push(format!("f{i}: wrong bytes")),
                            Err(e) => errors.push(format!("f{i}: {e}")),
                        }
                    }
                }
                errors
            })
        };
        Readers {
            stop,
            ok,
            files: n,
            thread,
        }
    }

    /// Lets the readers make `passes` more passes (at most a minute), then
    /// stops them; returns the successful reads and the failures.
    async fn finish_after_passes(self, passes: u64) -> (u64, Vec<String>) {
        use std::sync::atomic::Ordering;
        let target = self.ok.load(Ordering::Relaxed) + passes * self.files as u64;
        let t = Instant::now();
        while self.ok.load(Ordering::Relaxed) < target && t.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.stop.store(true, Ordering::Relaxed);
        let errors = tokio::task::block_in_place(|| self.thread.join()).unwrap();
        (self.ok.load(Ordering::Relaxed), errors)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn random_writes_truncation_mappings_and_renames_of_open_files() {
    if !fuse_available() {
        return;
    }
    let env = start(ClusterOptions::default());
    let m = Mount::start(&env.cluster, &[]);
    let c = client(&env.cluster);
    let d = m.path().join("s3");
    use std::os::unix::fs::FileExt;
    // Out-of-order writes and size changes of a new file.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(d.join("r.bin"))
        .unwrap();
    f.write_all_at(b"BBBB", 100).unwrap();
    f.write_all_at(b"AAAA", 0).unwrap();
    // Read back through the same descriptor before it is closed.
    let mut head = [0u8; 4];
    f.read_exact_at(&mut head, 100).unwrap();
    assert_eq!(&head, b"BBBB");
    f.set_len(300).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 300);
    drop(f);
    let mut want = vec![0u8; 300];
    want[..4].copy_from_slice(b"AAAA");
    want[100..104].copy_from_slice(b"BBBB");
    assert_eq!(std::fs::read(d.join("r.bin")).unwrap(), want);
    assert_eq!(&c.read_file("/s3/r.bin").await.unwrap()[..], &want[..]);
    // truncate(2) of a file nobody has open: shrink, then grow.
    let cp = cpath(&d.join("r.bin"));
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::truncate(cp.as_ptr(), 50) }, 0);
    assert_eq!(std::fs::read(d.join("r.bin")).unwrap(), &want[..50]);
    assert_eq!(unsafe { libc::truncate(cp.as_ptr(), 60) }, 0);
    let mut grown = want[..50].to_vec();
    grown.resize(60, 0);
    assert_eq!(&c.read_file("/s3/r.bin").await.unwrap()[..], &grown[..]);

    // A linker's pattern: a temporary name, ftruncate, writes through a
    // shared mapping, close, munmap, then rename to the final name.
    let data = pattern(3 << 20, 9);
    let tmp = d.join(".out-tmp");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .unwrap();
    f.set_len(data.len() as u64).unwrap();
    // SAFETY: a fresh shared mapping of a file of that size, written
    // within bounds and unmapped once.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            data.len(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        std::ptr::copy_nonoverlapping(data.as_ptr(), p.cast::<u8>(), data.len());
        drop(f);
        assert_eq!(libc::munmap(p, data.len()), 0);
    }
    std::fs::rename(&tmp, d.join("out.bin")).unwrap();
    assert!(!tmp.exists());
    assert_eq!(std::fs::read(d.join("out.bin")).unwrap(), data);
    assert_eq!(&c.read_file("/s3/out.bin").await.unwrap()[..], &data[..]);
    assert!(c.stat("/s3/.out-tmp").await.unwrap_err().is_not_found());

    // Renamed while still open for writing: later writes follow it.
    let mut f = std::fs::File::create(d.join("moving.txt")).unwrap();
    f.write_all(b"first ").unwrap();
    std::fs::rename(d.join("moving.txt"), d.join("moved.txt")).unwrap();
    f.write_all(b"second").unwrap();
    drop(f);
    assert_eq!(std::fs::read(d.join("moved.txt")).unwrap(), b"first second");
    assert!(c.stat("/s3/moving.txt").await.unwrap_err().is_not_found());

    // Unlinked while open for writing: closing it does not bring it back.
    let mut f = std::fs::File::create(d.join("gone.txt")).unwrap();
    f.write_all(b"short-lived").unwrap();
    std::fs::remove_file(d.join("gone.txt")).unwrap();
    f.write_all(b" more").unwrap();
    drop(f);
    assert!(!d.join("gone.txt").exists());
    assert!(c.stat("/s3/gone.txt").await.unwrap_err().is_not_found());
}

/// Drops the kernel's cached pages of one file.
fn drop_file_cache(p: &Path) {
    let f = std::fs::File::open(p).unwrap();
    // SAFETY: a valid descriptor; advice only.
    unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn heavy_client_cache_serves_reads_with_every_worker_down() {
    if !fuse_available() {
        return;
    }
    let mut c = strata_testkit::HaCluster::start(&strata_bin(), 1, 1, Vec::new()).expect("cluster");
    let client = strata_client::Client::new(&c.master_list(), Default::default()).unwrap();
    let opts = strata_client::WriteOptions {
        write_type: strata_client::WriteType::MustCache,
        recursive: true,
        ..Default::default()
    };
    let mut files = Vec::new();
    for i in 0..8u64 {
        // Some files span several pages and blocks, some are one short page.
        let data = pattern(
            if i % 2 == 0 {
                (5 << 20) + 123 * i as usize
            } else {
                7000
            },
            i,
        );
        client
            .write_file(&format!("/ds/f{i}"), &data, opts)
            .await
            .unwrap();
        files.push(data);
    }
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().display().to_string();
    let m = Mount::start_with_env(
        &c.master_list(),
        &[],
        &[
            ("STRATA_CLIENT_SHORT_CIRCUIT", "false"),
            ("STRATA_CLIENT_LOCAL_CACHE_DIR", &cache_dir),
            ("STRATA_CLIENT_LOCAL_CACHE_CAPACITY", "1GiB"),
            ("STRATA_CLIENT_FAILOVER_TIMEOUT_SECS", "2"),
        ],
    );
    let root = m.path().join("ds");
    for (i, d) in files.iter().enumerate() {
        assert_eq!(&std::fs::read(root.join(format!("f{i}"))).unwrap(), d);
    }
    // Every byte read is now in pages of the local directory.
    let want: u64 = files
        .iter()
        .map(|d| d.len().next_multiple_of(4096) as u64)
        .sum();
    let deadline = Instant::now() + Duration::from_secs(10);
    while allocated(cache.path()) < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        allocated(cache.path()) >= want,
        "the local cache holds every page read"
    );
    // One process at a time uses a local cache directory: another client
    // (here one whose one-page capacity would evict the mount's pages) is
    // refused, naming the directory and the mount's pid...
    let daemon = m.child.as_ref().unwrap().id();
    match strata_client::Client::new(
        &c.master_list(),
        strata_common::config::ClientConfig {
            local_cache_dir: cache.path().to_path_buf(),
            local_cache_capacity: strata_common::config::ByteSize(4096),
            ..Default::default()
        },
    ) {
        Err(e @ strata_client::ClientError::LocalCacheInUse { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&cache_dir), "{msg}");
            assert!(
                msg.contains(&format!("in use by process {daemon}")),
                "{msg}"
            );
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a second process may not use the directory"),
    }
    // ...a second mount fails with that message, and a CLI command runs
    // without the directory, with a warning.
    let mp2 = tempfile::tempdir().unwrap();
    let out = Command::new(strata_bin())
        .args(["--master", &c.master_list(), "mount"])
        .arg(mp2.path())
        .args(["--foreground", "--local-cache-dir", &cache_dir])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second mount: {err}");
    assert!(
        err.contains(&format!("in use by process {daemon}")),
        "{err}"
    );
    assert!(!is_mounted(mp2.path()));
    let out = Command::new(strata_bin())
        .args(["--master", &c.master_list(), "fs", "cat", "/ds/f1"])
        .env("STRATA_CLIENT_LOCAL_CACHE_DIR", &cache_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(out.stdout, files[1]);
    assert!(err.contains("running without it"), "{err}");
    assert!(
        allocated(cache.path()) >= want,
        "nothing of the mount's was evicted"
    );
    // With the only worker dead, a client without the local cache cannot
    // read; the mount reads everything from its own directory (the
    // kernel's page cache dropped first, so the reads reach the daemon).
    tokio::task::block_in_place(|| c.kill_worker(0)).unwrap();
    let bare = strata_client::Client::new(
        &c.master_list(),
        strata_common::config::ClientConfig {
            failover_timeout_secs: 1,
            short_circuit: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        bare.read_file("/ds/f0").await.is_err(),
        "the worker is down"
    );
    for (i, d) in files.iter().enumerate() {
        let p = root.join(format!("f{i}"));
        drop_file_cache(&p);
        assert_eq!(&std::fs::read(&p).unwrap(), d, "f{i} from the local cache");
        // A positional read in the middle too.
        let mut f = std::fs::File::open(&p).unwrap();
        let at = d.len() / 3;
        let mut buf = vec![0u8; 4096.min(d.len() - at)];
        f.seek(SeekFrom::Start(at as u64)).unwrap();
        f.read_exact(&mut buf).unwrap();
        assert_eq!(&buf[..], &d[at..at + buf.len()]);
    }
}

/// Bytes allocated to the files under `dir` (the local cache keeps sparse
/// files as long as each object, filled page by page).
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    walk(dir)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2) on our child's pid.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn complete_local_copies_are_read_by_the_kernel_with_the_daemon_stopped() {
    if !fuse_available() {
        return;
    }
    let c = strata_testkit::HaCluster::start(&strata_bin(), 1, 1, Vec::new()).expect("cluster");
    let opts = strata_client::WriteOptions {
        write_type: strata_client::WriteType::MustCache,
        recursive: true,
        ..Default::default()
    };
    let cache = tempfile::tempdir().unwrap();
    let client_cfg = strata_common::config::ClientConfig {
        local_cache_dir: cache.path().to_path_buf(),
        local_cache_capacity: strata_common::config::ByteSize(1 << 30),
        ..Default::default()
    };
    let big = pattern((6 << 20) + 4321, 1);
    let small = pattern(100 * 1024, 2);
    {
        // Another client with the same local directory fills it; the mount
        // finds the complete copies when it starts, so its FUSE inodes never
        // hold a page of their own.
        let client = strata_client::Client::new(&c.master_list(), client_cfg.clone()).unwrap();
        client.write_file("/pt/big", &big, opts).await.unwrap();
        client.write_file("/pt/small", &small, opts).await.unwrap();
        client.write_file("/pt/other", &small, opts).await.unwrap();
        assert_eq!(client.read_file("/pt/big").await.unwrap(), big);
        assert_eq!(client.read_file("/pt/small").await.unwrap(), small);
        let want = (big.len() + small.len()).next_multiple_of(4096) as u64;
        let deadline = Instant::now() + Duration::from_secs(10);
        while allocated(cache.path()) < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(allocated(cache.path()) >= want, "pages written locally");
    }
    let cache_dir = cache.path().display().to_string();
    // No UFS under this cluster: files written through the mount stay in
    // the cache.
    let m = Mount::start_with_env(
        &c.master_list(),
        &["--write-type", "must-cache"],
        &[
            ("STRATA_CLIENT_LOCAL_CACHE_DIR", &cache_dir),
            ("STRATA_CLIENT_LOCAL_CACHE_CAPACITY", "1GiB"),
        ],
    );
    let daemon = m.child.as_ref().unwrap().id();
    let root = m.path().join("pt");
    let fb = std::fs::File::open(root.join("big")).unwrap();
    let fs = std::fs::File::open(root.join("small")).unwrap();
    // A second descriptor of the same file shares its backing file.
    let fs2 = std::fs::File::open(root.join("small")).unwrap();
    // With the daemon stopped, only the kernel can answer these reads.
    signal(daemon, libc::SIGSTOP);
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::os::unix::fs::FileExt;
        // Plain read(2) loops: `read_to_end` would ask for the size first
        // (fstat, answered by the daemon).
        let read_all = |mut f: &std::fs::File| {
            let (mut all, mut buf) = (Vec::new(), vec![0u8; 1 << 20]);
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break all;
                }
                all.extend_from_slice(&buf[..n]);
            }
        };
        let all = read_all(&fb);
        let mut mid = vec![0u8; 10_000];
        fb.read_exact_at(&mut mid, 3 << 20).unwrap();
        let s = read_all(&fs);
        let mut s2 = vec![0u8; 100];
        fs2.read_exact_at(&mut s2, 5000).unwrap();
        let _ = tx.send((all, mid, s, s2));
    });
    let got = rx.recv_timeout(Duration::from_secs(20));
    signal(daemon, libc::SIGCONT);
    let (all, mid, s, s2) = got.expect("reads of complete local copies wait for the daemon");
    reader.join().unwrap();
    assert_eq!(all, big);
    assert_eq!(&mid[..], &big[3 << 20..(3 << 20) + 10_000]);
    assert_eq!(s, small);
    assert_eq!(&s2[..], &small[5000..5100]);

    // While a descriptor reads the local copy, the kernel accepts no other
    // kind of open of that file: rewriting it fails with ETXTBSY (after a
    // short wait for the descriptor to close) and changes nothing.
    let keep = std::fs::File::open(root.join("small")).unwrap();
    let newer = pattern(50_000, 3);
    let e = std::fs::write(root.join("small"), &newer).unwrap_err();
    assert_eq!(errno(&e), libc::ETXTBSY, "{e}");
    {
        use std::os::unix::fs::FileExt;
        let mut old = vec![0u8; 100];
        keep.read_exact_at(&mut old, 1000).unwrap();
        assert_eq!(&old[..], &small[1000..1100]);
    }
    assert_eq!(std::fs::read(root.join("small")).unwrap(), small);
    drop(keep);
    // Closed: the rewrite goes through (the release reaches the daemon
    // within the wait).
    std::fs::write(root.join("small"), &newer).unwrap();
    assert_eq!(std::fs::read(root.join("small")).unwrap(), newer);
    // A file not cached locally is read through the daemon (cached mode);
    // complete locally after that read, it is opened again while the first
    // descriptor is still open (the kernel would refuse passthrough: EIO).
    let first = std::fs::File::open(root.join("other")).unwrap();
    let mut v = Vec::new();
    (&first).read_to_end(&mut v).unwrap();
    assert_eq!(v, small);
    for _ in 0..3 {
        assert_eq!(std::fs::read(root.join("other")).unwrap(), small);
    }
    drop(first);
    assert_eq!(std::fs::read(root.join("small")).unwrap(), newer);
    assert_eq!(std::fs::read(root.join("big")).unwrap(), big);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The daemons of a restartable mount: the supervisor's children.
fn daemons_of(supervisor: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &supervisor.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kills the serving daemon with SIGKILL and waits for its successor.
fn kill_daemon(supervisor: u32) -> u32 {
    let old = daemons_of(supervisor);
    assert_eq!(old.len(), 1, "one daemon serves: {old:?}");
    // SAFETY: kill(2) of the mount's daemon process.
    unsafe { libc::kill(old[0] as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = daemons_of(supervisor);
        if now.len() == 1 && now != old {
            return now[0];
        }
        assert!(Instant::now() < deadline, "no new daemon within 20 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_daemon_is_replaced_without_a_remount() {
    use std::os::unix::fs::FileExt;
    if !fuse_available() {
        return;
    }
    let mut c = strata_testkit::HaCluster::start(&strata_bin(), 1, 1, Vec::new()).expect("cluster");
    let client = strata_client::Client::new(&c.master_list(), Default::default()).unwrap();
    let opts = strata_client::WriteOptions {
        write_type: strata_client::WriteType::MustCache,
        recursive: true,
        ..Default::default()
    };
    let mut files = Vec::new();
    for i in 0..20 {
        let data = format!("file {i} ").repeat(2000 + 10 * i).into_bytes();
        client
            .write_file(&format!("/ds/f{i}"), &data, opts)
            .await
            .unwrap();
        files.push(data);
    }
    let big = pattern(12 << 20, 7);
    client.write_file("/big", &big, opts).await.unwrap();
    // Every read reaches the daemon: no kernel attribute cache, no
    // short-circuit, the page cache dropped before each pass.
    let m = Mount::start_with_env(
        &c.master_list(),
        &[
            "--restartable",
            "--attr-timeout",
            "0",
            "--write-type",
            "must-cache",
        ],
        &[("STRATA_CLIENT_SHORT_CIRCUIT", "false")],
    );
    let supervisor = m.child.as_ref().unwrap().id();
    let root = m.path();
    let first_daemon = {
        // The first daemon answers INIT, so the mount works once it is up.
        std::fs::metadata(root.join("ds/f0")).unwrap();
        daemons_of(supervisor)
    };
    assert_eq!(first_daemon.len(), 1);
    // Descriptors opened before the kills: a read one, a write one.
    let reader = std::fs::File::open(root.join("big")).unwrap();
    let mut head = vec![0u8; 1 << 20];
    reader.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, big[..1 << 20]);
    let mut writer = std::fs::File::create(root.join("unfinished")).unwrap();
    writer.write_all(b"written before the daemon died").unwrap();

    // A read the dead daemon had taken but not answered: the worker is
    // stopped, so the daemon holds the request when it is killed; the
    // next daemon gets it again from the kernel and answers it.
    drop_file_cache(&root.join("big"));
    tokio::task::block_in_place(|| c.pause_worker(0, true)).unwrap();
    let pending = {
        let p = root.join("big");
        std::thread::spawn(move || {
            let f = std::fs::File::open(p)?;
            let mut b = vec![0u8; 1 << 20];
            f.read_exact_at(&mut b, 8 << 20)?;
            Ok::<_, std::io::Error>(b)
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !pending.is_finished(),
        "the read waits for the stopped worker"
    );
    let second = tokio::task::block_in_place(|| kill_daemon(supervisor));
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| c.pause_worker(0, false)).unwrap();
    let got = tokio::task::block_in_place(|| pending.join())
        .unwrap()
        .expect("the in-flight read is answered by the next daemon");
    assert_eq!(got, big[8 << 20..9 << 20]);
    assert_ne!(second, first_daemon[0]);

    // Readers through two more kills: no read fails or returns wrong bytes.
    let r = Readers::start(root.join("ds"), files.clone(), true, true);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        tokio::task::block_in_place(|| kill_daemon(supervisor));
    }
    let (ok, errors) = r.finish_after_passes(2).await;
    assert!(
        errors.is_empty(),
        "reads failed across restarts: {errors:?}"
    );
    assert!(ok >= 40, "only {ok} reads");
    assert!(is_mounted(&root), "still the same mount");

    // The read descriptor opened before the kills still reads.
    let mut tail = vec![0u8; 1 << 20];
    reader.read_exact_at(&mut tail, 11 << 20).unwrap();
    assert_eq!(tail, big[11 << 20..]);
    // The write descriptor's data died with its daemon: the writer is told.
    let e = writer.write_all(b"more").and_then(|_| writer.sync_all());
    assert_eq!(
        e.map_err(|e| e.raw_os_error()),
        Err(Some(libc::EIO)),
        "a write through a dead daemon's handle"
    );
    drop(writer);
    // Everything else works: names looked up before, new files, listings.
    assert_eq!(std::fs::read(root.join("ds/f3")).unwrap(), files[3]);
    std::fs::write(root.join("ds/new"), b"after the restarts").unwrap();
    assert_eq!(
        std::fs::read(root.join("ds/new")).unwrap(),
        b"after the restarts"
    );
    assert_eq!(std::fs::read_dir(root.join("ds")).unwrap().count(), 21);
    // The same supervisor; `strata umount` ends it.
    assert_eq!(m.child.as_ref().unwrap().id(), supervisor);
    drop(reader);
    let out = Command::new(strata_bin())
        .arg("umount")
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut m = m;
    let sup = m.child.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(sup.try_wait(), Ok(None)) {
        assert!(
            Instant::now() < deadline,
            "the supervisor exits after umount"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(daemons_of(supervisor).is_empty());
}

/// Closes a descriptor and returns close(2)'s error, which dropping a
/// `File` would ignore (a FUSE file reports a failed commit there).
fn close(f: std::fs::File) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    // SAFETY: closing a descriptor we own, exactly once.
    match unsafe { libc::close(f.into_raw_fd()) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn files_rewritten_appended_or_replaced_while_open_for_writing() {
    if !fuse_available() {
        return;
    }
    let env = start(ClusterOptions::default());
    let m = Mount::start(&env.cluster, &[]);
    let c = client(&env.cluster);
    let d = m.path().join("s3");
    let open = |name: &str, append: bool| {
        std::fs::OpenOptions::new()
            .write(true)
            .append(append)
            .truncate(!append)
            .open(d.join(name))
            .unwrap()
    };
    let read_sdk = |path: &'static str| {
        let c = c.clone();
        async move {
            let r = c.open(path).await.map_err(|e| e.to_string())?;
            let b = r.read_at(0, r.len()).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(String::from_utf8_lossy(&b).into_owned())
        }
    };

    // A file being rewritten: other clients read a complete version, never
    // an error: the empty file the O_TRUNC open left (as on a local disk),
    // or, if the descriptor that wrote the first version is released only
    // now (releases are asynchronous; its handle is shared by the new
    // descriptor and commits at its release), what was written so far;
    // after the writer's close, the new version.
    std::fs::write(d.join("v.txt"), b"version one").unwrap();
    let mut w = open("v.txt", false);
    w.write_all(b"version two, longer").unwrap();
    let during = read_sdk("/s3/v.txt").await.unwrap();
    assert!(
        during.is_empty() || during == "version two, longer",
        "{during:?}"
    );
    close(w).unwrap();
    assert_eq!(read_sdk("/s3/v.txt").await.unwrap(), "version two, longer");

    // A file renamed over one still open for writing: the renamed file
    // stays, and the writer's close succeeds (it wrote to an unlinked file).
    std::fs::write(d.join("dst.txt"), b"old dst").unwrap();
    std::fs::write(d.join("src.txt"), b"from src").unwrap();
    let mut w = open("dst.txt", false);
    w.write_all(b"written to the replaced file").unwrap();
    std::fs::rename(d.join("src.txt"), d.join("dst.txt")).unwrap();
    close(w).unwrap();
    assert_eq!(std::fs::read(d.join("dst.txt")).unwrap(), b"from src");
    assert_eq!(read_sdk("/s3/dst.txt").await.unwrap(), "from src");
    assert!(!d.join("src.txt").exists());

    // Two appenders at once on one mount: both closes succeed and both
    // appends are kept, in order (they write through one handle).
    std::fs::write(d.join("log"), b"original line\n").unwrap();
    let mut a = open("log", true);
    a.write_all(b"from A\n").unwrap();
    let mut b = open("log", true);
    b.write_all(b"from B\n").unwrap();
    close(a).unwrap();
    close(b).unwrap();
    let got = String::from_utf8(std::fs::read(d.join("log")).unwrap()).unwrap();
    assert_eq!(got, "original line\nfrom A\nfrom B\n");
    assert_eq!(read_sdk("/s3/log").await.unwrap(), got);

    // A read-only descriptor opened while the file was written outlives
    // the writer: a truncate after the writer closed changes the file.
    std::fs::write(d.join("t.txt"), b"0123456789").unwrap();
    let mut w = open("t.txt", false);
    w.write_all(b"abcdefghij").unwrap();
    let r = std::fs::File::open(d.join("t.txt")).unwrap();
    close(w).unwrap();
    let cpath = std::ffi::CString::new(d.join("t.txt").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::truncate(cpath.as_ptr(), 4) }, 0);
    drop(r);
    assert_eq!(read_sdk("/s3/t.txt").await.unwrap(), "abcd");

    // Unlinking a file that is being rewritten removes it for good: the
    // writer's close does not bring either version back.
    std::fs::write(d.join("gone.txt"), b"old").unwrap();
    let mut w = open("gone.txt", false);
    w.write_all(b"new").unwrap();
    std::fs::remove_file(d.join("gone.txt")).unwrap();
    close(w).unwrap();
    assert!(!d.join("gone.txt").exists());
    assert!(c.stat("/s3/gone.txt").await.unwrap_err().is_not_found());
}
