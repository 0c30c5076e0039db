//! The data protocol between clients and workers.
//!
//! Every frame is a fixed 16-byte header, a small typed *meta* section and a
//! raw *payload* that is never wrapped in protobuf:
//!
//! ```text
//! 0      2        3      4          8              16
//! | "ST" | version | kind | meta_len | payload_len  | meta ... | payload ... |
//! ```
//!
//! All integers are little endian. Strings in the meta section are a `u16`
//! length followed by UTF-8 bytes. Limits on `meta_len` and `payload_len`
//! are checked before anything is allocated, so a hostile or corrupt peer
//! gets an error, never an allocation of its choosing.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const MAGIC: [u8; 2] = *b"ST";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 16;
/// Largest meta section a peer may send.
pub const MAX_META: u32 = 16 * 1024;
/// Largest payload in one frame.
pub const MAX_PAYLOAD: u64 = 16 << 20;

/// Error codes carried by [`Message::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The request itself is malformed.
    BadRequest = 1,
    /// The object is missing in the UFS.
    NotFound = 2,
    /// The UFS object no longer has the fingerprint the client asked for.
    Stale = 3,
    /// The UFS could not be reached or refused the request.
    UfsUnavailable = 4,
    /// The cache has no room and nothing can be evicted.
    CacheFull = 5,
    /// Bytes that existed only in the cache are gone.
    DataLost = 6,
    /// Credentials were refused.
    PermissionDenied = 7,
    /// Anything else on the worker.
    Internal = 8,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            1 => ErrorCode::BadRequest,
            2 => ErrorCode::NotFound,
            3 => ErrorCode::Stale,
            4 => ErrorCode::UfsUnavailable,
            5 => ErrorCode::CacheFull,
            6 => ErrorCode::DataLost,
            7 => ErrorCode::PermissionDenied,
            _ => ErrorCode::Internal,
        }
    }
}

/// Where the bytes of a read come from when they are not cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Source {
    /// Only the cache holds the bytes (written with MUST_CACHE).
    CacheOnly = 0,
    /// The UFS object at `ufs_path` of mount `mount_id`.
    Ufs = 1,
    /// Only the pages this worker holds now: no peer, no UFS (what one
    /// worker asks another for before it goes to the UFS).
    Local = 2,
}

/// What to read (or load): one version of one file and a byte range of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadSpec {
    pub cache_id: u128,
    pub source: Source,
    pub mount_id: u64,
    pub ufs_path: String,
    pub fingerprint: String,
    pub file_len: u64,
    pub block_size: u64,
    pub page_size: u64,
    pub offset: u64,
    pub len: u64,
}

/// Write modes a worker understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum WriteMode {
    /// Pages are cached and pinned; no UFS copy.
    MustCache = 1,
    /// The UFS object is written before the close returns; pages are cached.
    CacheThrough = 2,
    /// The UFS object is written; nothing is cached.
    Through = 3,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteSpec {
    pub mode: WriteMode,
    /// For MUST_CACHE: the identity the pages are stored under.
    pub cache_id: u128,
    pub mount_id: u64,
    pub ufs_path: String,
    pub block_size: u64,
    pub page_size: u64,
    /// File offset of the first byte this stream carries (page aligned).
    pub offset: u64,
    /// 0..=8: how much of the file may stay in the memory tier
    /// (`worker.priority_mem_base + priority × worker.priority_mem_step`).
    pub priority: u8,
}

/// Most pages one `Located` answer lists.
pub const MAX_LOCATED: usize = 64;

/// A cached page's file, for short-circuit reads on the worker's host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocatedPage {
    pub block: u64,
    pub page: u32,
    pub path: String,
}

/// Highest write priority.
pub const MAX_PRIORITY: u8 = 8;

/// Every frame of the protocol, typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// client → worker: stream `spec.len` bytes back as `Data` frames then `End`.
    Read(ReadSpec),
    /// client → worker: make the range cached; answer `End` without data.
    Load(ReadSpec),
    /// client → worker: drop every cached page of a cache id.
    Free {
        cache_id: u128,
    },
    /// client → worker (same host): where are the cached, verified pages of
    /// this range? Answered with `Located`.
    Locate(ReadSpec),
    /// worker → client: files holding cached pages (at most
    /// [`MAX_LOCATED`]); pages not listed must be read over the network.
    Located {
        pages: Vec<LocatedPage>,
    },
    /// client → worker: pin (never evict) or unpin every page of a cache id,
    /// including pages cached later; answers `End` with the pages changed.
    Pin {
        cache_id: u128,
        pinned: bool,
    },
    /// client → worker: the cache id's bytes are in the UFS now, so its
    /// pages are no longer the only copy and may be evicted (user pins
    /// stay); answers `End` with the pages changed.
    Persisted {
        cache_id: u128,
    },
    /// client → worker: a write stream follows as `Data` frames, then `WriteEnd`.
    WriteBegin(WriteSpec),
    WriteEnd,
    /// Raw bytes, either direction.
    Data(Bytes),
    /// worker → client: the request finished.
    End {
        bytes: u64,
        cached_pages: u64,
        ufs_pages: u64,
        /// For reads: how many workers of the block's ranking should serve
        /// it (the owner sees it read hot and asks for extra replicas);
        /// 1 (or 0) for the owner alone.
        replicas: u8,
    },
    /// worker → client: a write finished; the UFS fingerprint when persisted.
    WriteDone {
        bytes: u64,
        fingerprint: String,
        mtime_ms: i64,
        cache_id: u128,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

mod kind {
    pub const READ: u8 = 1;
    pub const LOAD: u8 = 2;
    pub const FREE: u8 = 3;
    pub const WRITE_BEGIN: u8 = 4;
    pub const WRITE_END: u8 = 5;
    pub const PIN: u8 = 6;
    pub const LOCATE: u8 = 7;
    pub const LOCATED: u8 = 14;
    pub const PERSISTED: u8 = 15;
    pub const DATA: u8 = 10;
    pub const END: u8 = 11;
    pub const WRITE_DONE: u8 = 12;
    pub const ERROR: u8 = 13;
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed by peer")]
    Closed,
    #[error("I/O error on the data connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad magic {0:02x?}: the peer does not speak the Strata data protocol")]
    BadMagic([u8; 2]),
    #[error("unsupported data protocol version {0} (this build speaks {VERSION})")]
    BadVersion(u8),
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    #[error("frame meta section of {0} bytes exceeds the {MAX_META}-byte limit")]
    MetaTooLarge(u32),
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLarge(u64),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

struct Header {
    kind: u8,
    meta_len: u32,
    payload_len: u64,
}

fn parse_header(h: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    if h[0..2] != MAGIC {
        return Err(FrameError::BadMagic([h[0], h[1]]));
    }
    if h[2] != VERSION {
        return Err(FrameError::BadVersion(h[2]));
    }
    let mut b = &h[3..];
    let kind = b.get_u8();
    let meta_len = b.get_u32_le();
    let payload_len = b.get_u64_le();
    if meta_len > MAX_META {
        return Err(FrameError::MetaTooLarge(meta_len));
    }
    if payload_len > MAX_PAYLOAD {
        return Err(FrameError::PayloadTooLarge(payload_len));
    }
    Ok(Header {
        kind,
        meta_len,
        payload_len,
    })
}

fn put_str(m: &mut BytesMut, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(u16::MAX as usize);
    m.put_u16_le(n as u16);
    m.put_slice(&b[..n]);
}

struct Meta<'a>(&'a [u8]);

impl Meta<'_> {
    fn need(&self, n: usize) -> Result<(), FrameError> {
        if self.0.len() < n {
            Err(FrameError::Malformed("meta section is truncated"))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        self.need(2)?;
        Ok(self.0.get_u16_le())
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        self.need(4)?;
        Ok(self.0.get_u32_le())
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        self.need(8)?;
        Ok(self.0.get_u64_le())
    }
    fn i64(&mut self) -> Result<i64, FrameError> {
        self.need(8)?;
        Ok(self.0.get_i64_le())
    }
    fn u128(&mut self) -> Result<u128, FrameError> {
        self.need(16)?;
        Ok(self.0.get_u128_le())
    }
    fn string(&mut self) -> Result<String, FrameError> {
        let n = self.u16()? as usize;
        self.need(n)?;
        let s = std::str::from_utf8(&self.0[..n])
            .map_err(|_| FrameError::Malformed("string is not UTF-8"))?
            .to_string();
        self.0.advance(n);
        Ok(s)
    }
    fn finish(&self) -> Result<(), FrameError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Malformed("trailing bytes in meta section"))
        }
    }
}

fn put_read_spec(m: &mut BytesMut, s: &ReadSpec) {
    m.put_u128_le(s.cache_id);
    m.put_u8(s.source as u8);
    m.put_u64_le(s.mount_id);
    put_str(m, &s.ufs_path);
    put_str(m, &s.fingerprint);
    m.put_u64_le(s.file_len);
    m.put_u64_le(s.block_size);
    m.put_u64_le(s.page_size);
    m.put_u64_le(s.offset);
    m.put_u64_le(s.len);
}

fn get_read_spec(m: &mut Meta) -> Result<ReadSpec, FrameError> {
    let cache_id = m.u128()?;
    let source = match m.u8()? {
        0 => Source::CacheOnly,
        1 => Source::Ufs,
        2 => Source::Local,
        _ => return Err(FrameError::Malformed("unknown read source")),
    };
    Ok(ReadSpec {
        cache_id,
        source,
        mount_id: m.u64()?,
        ufs_path: m.string()?,
        fingerprint: m.string()?,
        file_len: m.u64()?,
        block_size: m.u64()?,
        page_size: m.u64()?,
        offset: m.u64()?,
        len: m.u64()?,
    })
}

impl Message {
    /// Encodes the header and meta section; the payload (for `Data`) is
    /// returned separately so it can be written without a copy.
    pub fn encode_head(&self) -> (BytesMut, Option<&Bytes>) {
        let mut meta = BytesMut::new();
        let (k, payload) = match self {
            Message::Read(s) => {
                put_read_spec(&mut meta, s);
                (kind::READ, None)
            }
            Message::Load(s) => {
                put_read_spec(&mut meta, s);
                (kind::LOAD, None)
            }
            Message::Free { cache_id } => {
                meta.put_u128_le(*cache_id);
                (kind::FREE, None)
            }
            Message::Persisted { cache_id } => {
                meta.put_u128_le(*cache_id);
                (kind::PERSISTED, None)
            }
            Message::Locate(s) => {
                put_read_spec(&mut meta, s);
                (kind::LOCATE, None)
            }
            Message::Located { pages } => {
                let n = pages.len().min(MAX_LOCATED);
                meta.put_u16_le(n as u16);
                for p in &pages[..n] {
                    meta.put_u64_le(p.block);
                    meta.put_u32_le(p.page);
                    put_str(&mut meta, &p.path);
                }
                (kind::LOCATED, None)
            }
            Message::Pin { cache_id, pinned } => {
                meta.put_u128_le(*cache_id);
                meta.put_u8(u8::from(*pinned));
                (kind::PIN, None)
            }
            Message::WriteBegin(w) => {
                meta.put_u8(w.mode as u8);
                meta.put_u128_le(w.cache_id);
                meta.put_u64_le(w.mount_id);
                put_str(&mut meta, &w.ufs_path);
                meta.put_u64_le(w.block_size);
                meta.put_u64_le(w.page_size);
                meta.put_u64_le(w.offset);
                meta.put_u8(w.priority);
                (kind::WRITE_BEGIN, None)
            }
            Message::WriteEnd => (kind::WRITE_END, None),
            Message::Data(b) => (kind::DATA, Some(b)),
            Message::End {
                bytes,
                cached_pages,
                ufs_pages,
                replicas,
            } => {
                meta.put_u64_le(*bytes);
                meta.put_u64_le(*cached_pages);
                meta.put_u64_le(*ufs_pages);
                meta.put_u8(*replicas);
                (kind::END, None)
            }
            Message::WriteDone {
                bytes,
                fingerprint,
                mtime_ms,
                cache_id,
            } => {
                meta.put_u64_le(*bytes);
                put_str(&mut meta, fingerprint);
                meta.put_i64_le(*mtime_ms);
                meta.put_u128_le(*cache_id);
                (kind::WRITE_DONE, None)
            }
            Message::Error { code, message } => {
                meta.put_u16_le(*code as u16);
                put_str(&mut meta, message);
                (kind::ERROR, None)
            }
        };
        let mut out = BytesMut::with_capacity(HEADER_LEN + meta.len());
        out.put_slice(&MAGIC);
        out.put_u8(VERSION);
        out.put_u8(k);
        out.put_u32_le(meta.len() as u32);
        out.put_u64_le(payload.map(|p| p.len() as u64).unwrap_or(0));
        out.put_slice(&meta);
        (out, payload)
    }

    /// Encodes the whole frame into one buffer (tests, small frames).
    pub fn encode(&self) -> BytesMut {
        let (mut head, payload) = self.encode_head();
        if let Some(p) = payload {
            head.put_slice(p);
        }
        head
    }

    fn decode_body(k: u8, meta: &[u8], payload: Bytes) -> Result<Message, FrameError> {
        let mut m = Meta(meta);
        let msg = match k {
            kind::READ => Message::Read(get_read_spec(&mut m)?),
            kind::LOAD => Message::Load(get_read_spec(&mut m)?),
            kind::FREE => Message::Free {
                cache_id: m.u128()?,
            },
            kind::PERSISTED => Message::Persisted {
                cache_id: m.u128()?,
            },
            kind::LOCATE => Message::Locate(get_read_spec(&mut m)?),
            kind::LOCATED => {
                let n = m.u16()? as usize;
                if n > MAX_LOCATED {
                    return Err(FrameError::Malformed("too many located pages"));
                }
                let mut pages = Vec::with_capacity(n);
                for _ in 0..n {
                    pages.push(LocatedPage {
                        block: m.u64()?,
                        page: m.u32()?,
                        path: m.string()?,
                    });
                }
                Message::Located { pages }
            }
            kind::PIN => Message::Pin {
                cache_id: m.u128()?,
                pinned: match m.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(FrameError::Malformed("pin flag is not 0 or 1")),
                },
            },
            kind::WRITE_BEGIN => {
                let mode = match m.u8()? {
                    1 => WriteMode::MustCache,
                    2 => WriteMode::CacheThrough,
                    3 => WriteMode::Through,
                    _ => return Err(FrameError::Malformed("unknown write mode")),
                };
                Message::WriteBegin(WriteSpec {
                    mode,
                    cache_id: m.u128()?,
                    mount_id: m.u64()?,
                    ufs_path: m.string()?,
                    block_size: m.u64()?,
                    page_size: m.u64()?,
                    offset: m.u64()?,
                    priority: match m.u8()? {
                        p if p <= MAX_PRIORITY => p,
                        _ => return Err(FrameError::Malformed("write priority above 8")),
                    },
                })
            }
            kind::WRITE_END => Message::WriteEnd,
            kind::DATA => Message::Data(payload.clone()),
            kind::END => Message::End {
                bytes: m.u64()?,
                cached_pages: m.u64()?,
                ufs_pages: m.u64()?,
                replicas: m.u8()?,
            },
            kind::WRITE_DONE => Message::WriteDone {
                bytes: m.u64()?,
                fingerprint: m.string()?,
                mtime_ms: m.i64()?,
                cache_id: m.u128()?,
            },
            kind::ERROR => Message::Error {
                code: ErrorCode::from_u16(m.u16()?),
                message: m.string()?,
            },
            other => return Err(FrameError::BadKind(other)),
        };
        m.finish()?;
        if k != kind::DATA && !payload.is_empty() {
            return Err(FrameError::Malformed(
                "payload on a frame kind that has none",
            ));
        }
        Ok(msg)
    }

    /// Decodes one frame from the front of `buf`. Returns the message and the
    /// bytes consumed, or `Ok(None)` when `buf` holds only part of a frame.
    pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&buf[..HEADER_LEN]);
        let hd = parse_header(&h)?;
        let total = HEADER_LEN + hd.meta_len as usize + hd.payload_len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        let meta = &buf[HEADER_LEN..HEADER_LEN + hd.meta_len as usize];
        let payload = Bytes::copy_from_slice(&buf[HEADER_LEN + hd.meta_len as usize..total]);
        Ok(Some((Self::decode_body(hd.kind, meta, payload)?, total)))
    }
}

/// Reads one frame. A clean EOF before the first header byte is
/// [`FrameError::Closed`]; an EOF inside a frame is an error.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, FrameError> {
    read_message_buf(r, &mut BytesMut::new()).await
}

/// A connection's receive buffer grows in steps of this size (a few pages'
/// frames); with many connections per client it bounds the memory each holds.
const RECV_CHUNK: usize = 2 << 20;

/// Like [`read_message`], reading payloads into `scratch`. Frames are split
/// off the front of `scratch`, so once the caller drops them the same memory
/// is reused: no allocation (and no page faults) per frame.
pub async fn read_message_buf<R: AsyncRead + Unpin>(
    r: &mut R,
    scratch: &mut BytesMut,
) -> Result<Message, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut h[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Err(FrameError::Closed);
            }
            return Err(FrameError::Malformed(
                "connection closed inside a frame header",
            ));
        }
        got += n;
    }
    let hd = parse_header(&h)?;
    let mut meta = [0u8; MAX_META as usize];
    let meta = &mut meta[..hd.meta_len as usize];
    r.read_exact(meta).await.map_err(truncated)?;
    let payload = if hd.payload_len > 0 {
        let n = hd.payload_len as usize;
        scratch.clear();
        if scratch.capacity() < n {
            scratch.reserve(n.max(RECV_CHUNK));
        }
        // read_buf fills spare capacity directly: no memset of the buffer.
        while scratch.len() < n {
            let want = n - scratch.len();
            let mut lim = (&mut *scratch).limit(want);
            if r.read_buf(&mut lim).await? == 0 {
                return Err(FrameError::Malformed("connection closed inside a frame"));
            }
        }
        scratch.split_to(n).freeze()
    } else {
        Bytes::new()
    };
    Message::decode_body(hd.kind, meta, payload)
}

fn truncated(e: std::io::Error) -> FrameError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Malformed("connection closed inside a frame")
    } else {
        FrameError::Io(e)
    }
}

/// Writes one frame; a `Data` payload goes to the socket without a copy.
pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> std::io::Result<()> {
    let (head, payload) = msg.encode_head();
    w.write_all(&head).await?;
    if let Some(p) = payload {
        w.write_all(p).await?;
    }
    Ok(())
}

/// Fills `h` with the header of a `Data` frame of `len` payload bytes.
pub fn data_header(h: &mut [u8; HEADER_LEN], len: u64) {
    h[0..2].copy_from_slice(&MAGIC);
    h[2] = VERSION;
    h[3] = kind::DATA;
    h[4..8].copy_from_slice(&0u32.to_le_bytes());
    h[8..16].copy_from_slice(&len.to_le_bytes());
}

/// Writes a `Data` frame straight from a slice.
pub async fn write_data<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> std::io::Result<()> {
    let mut h = [0u8; HEADER_LEN];
    data_header(&mut h, data.len() as u64);
    w.write_all(&h).await?;
    w.write_all(data).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        let spec = ReadSpec {
            cache_id: 7 << 100 | 3,
            source: Source::Ufs,
            mount_id: 4,
            ufs_path: "dir/obj ü".into(),
            fingerprint: "\"etag\"".into(),
            file_len: 1 << 33,
            block_size: 64 << 20,
            page_size: 1 << 20,
            offset: 12,
            len: 99,
        };
        vec![
            Message::Read(spec.clone()),
            Message::Load(spec),
            Message::Free { cache_id: 42 },
            Message::Persisted { cache_id: 43 },
            Message::WriteBegin(WriteSpec {
                mode: WriteMode::CacheThrough,
                cache_id: 1,
                mount_id: 2,
                ufs_path: "a/b".into(),
                block_size: 1 << 20,
                page_size: 4096,
                offset: 0,
                priority: 8,
            }),
            Message::Pin {
                cache_id: 7,
                pinned: true,
            },
            Message::Located {
                pages: vec![LocatedPage {
                    block: 1,
                    page: 2,
                    path: "/c/pages/ab/x".into(),
                }],
            },
            Message::WriteEnd,
            Message::Data(Bytes::from_static(b"hello")),
            Message::End {
                bytes: 5,
                cached_pages: 1,
                ufs_pages: 0,
                replicas: 3,
            },
            Message::WriteDone {
                bytes: 5,
                fingerprint: "x".into(),
                mtime_ms: -3,
                cache_id: 9,
            },
            Message::Error {
                code: ErrorCode::Stale,
                message: "changed".into(),
            },
        ]
    }

    #[test]
    fn roundtrip_every_kind() {
        for m in samples() {
            let enc = m.encode();
            let (back, used) = Message::decode(&enc).unwrap().unwrap();
            assert_eq!(back, m);
            assert_eq!(used, enc.len());
            // Every strict prefix is "incomplete", never an error or panic.
            for cut in 0..enc.len() {
                assert!(Message::decode(&enc[..cut]).unwrap().is_none());
            }
        }
    }

    #[test]
    fn rejects_bad_headers_before_allocating() {
        let mut f = Message::WriteEnd.encode();
        f[0] = b'X';
        assert!(matches!(Message::decode(&f), Err(FrameError::BadMagic(_))));
        let mut f = Message::WriteEnd.encode();
        f[2] = 99;
        assert!(matches!(
            Message::decode(&f),
            Err(FrameError::BadVersion(99))
        ));
        let mut f = Message::WriteEnd.encode();
        f[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Message::decode(&f),
            Err(FrameError::PayloadTooLarge(_))
        ));
        let mut f = Message::WriteEnd.encode();
        f[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Message::decode(&f),
            Err(FrameError::MetaTooLarge(_))
        ));
        let mut f = Message::WriteEnd.encode();
        f[3] = 200;
        assert!(matches!(Message::decode(&f), Err(FrameError::BadKind(200))));
    }

    #[tokio::test]
    async fn truncated_stream_is_an_error_not_a_hang() {
        let enc = samples()[0].encode();
        let mut r = &enc[..enc.len() - 3];
        let e = read_message(&mut r).await.unwrap_err();
        assert!(e.to_string().contains("closed inside a frame"), "{e}");
        let mut empty: &[u8] = &[];
        assert!(matches!(
            read_message(&mut empty).await,
            Err(FrameError::Closed)
        ));
    }

    proptest! {
        // Decoder robustness on arbitrary input; the libFuzzer target in
        // fuzz/ runs the same entry point coverage-guided.
        #[test]
        fn decode_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Message::decode(&data);
        }

        #[test]
        fn decode_mutated_frames_never_panics(idx in 0usize..11, pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut enc = samples()[idx].encode().to_vec();
            let i = pos.index(enc.len());
            enc[i] = byte;
            let _ = Message::decode(&enc);
        }
    }
}
