//! The data server: one task per connection, requests handled in order.
//! Reads stream pages as `Data` frames straight from the page store or, on a
//! miss, from the UFS (parallel ranged GETs, cached on the way through).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, stream};
use strata_common::geometry::PageSpan;
use strata_common::ids::PageKey;
use strata_common::{CacheId, Geometry};
use strata_proto::data::{
    ErrorCode, FrameError, Message, ReadSpec, Source, WriteMode, WriteSpec, read_message,
    write_data, write_message,
};
use strata_ufs::{Ufs, UfsError, UfsErrorKind};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Shared;
use crate::page_store::{PutOpts, StoreError};

/// A page ready to send: bytes in memory (just fetched from the UFS) or an
/// open cache file sent with `sendfile`, so cached bytes are never copied
/// through user space.
enum PageData {
    Mem(Bytes),
    File(std::fs::File),
    /// Load requests only need to know the page is cached.
    Present,
}

/// Largest byte range one read request may ask for; clients split larger reads.
pub const MAX_READ: u64 = 1 << 30;
/// Pages a hit-only read keeps in flight (file reads overlap socket writes).
const HIT_PIPELINE: usize = 4;
/// Spans up to this size are copied into the reply instead of `sendfile`d.
const SMALL_COPY: u64 = 64 << 10;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            acc = listener.accept() => match acc {
                Ok((sock, peer)) => {
                    let _ = sock.set_nodelay(true);
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let (rd, wr) = sock.into_split();
                        // Frames larger than the buffer are read past it.
                        let mut rd = BufReader::with_capacity(32 << 10, rd);
                        let mut wr = BufWriter::with_capacity(64 << 10, wr);
                        if let Err(e) = handle_conn(&shared, &mut rd, &mut wr).await {
                            tracing::debug!(%peer, error = %e, "data connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            },
            _ = crate::stopped(&mut stop) => return,
        }
    }
}

/// A failure reported to the client as an `Error` frame.
#[derive(Clone, Debug)]
pub struct Failure {
    code: ErrorCode,
    message: String,
}

impl Failure {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
    fn to_msg(&self) -> Message {
        Message::Error {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

impl From<UfsError> for Failure {
    fn from(e: UfsError) -> Self {
        let code = match e.kind {
            UfsErrorKind::NotFound => ErrorCode::NotFound,
            UfsErrorKind::Stale => ErrorCode::Stale,
            UfsErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
            UfsErrorKind::Unreachable => ErrorCode::UfsUnavailable,
            UfsErrorKind::InvalidUri => ErrorCode::BadRequest,
            _ => ErrorCode::Internal,
        };
        Failure::new(code, e.to_string())
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        let code = match e {
            StoreError::Full { .. } => ErrorCode::CacheFull,
            StoreError::Io { .. } | StoreError::Config(_) => ErrorCode::Internal,
        };
        Failure::new(code, e.to_string())
    }
}

enum ConnError {
    Frame(FrameError),
    Io(std::io::Error),
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnError::Frame(e) => write!(f, "{e}"),
            ConnError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<std::io::Error> for ConnError {
    fn from(e: std::io::Error) -> Self {
        ConnError::Io(e)
    }
}

async fn handle_conn<R, W>(shared: &Shared, rd: &mut R, wr: &mut W) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + AsSocket,
{
    loop {
        let msg = match read_message(rd).await {
            Ok(m) => m,
            Err(FrameError::Closed) => return Ok(()),
            Err(e) => {
                // Tell the peer why, then drop the connection: after a bad
                // frame the stream position can no longer be trusted.
                let f = Failure::new(ErrorCode::BadRequest, format!("bad frame: {e}"));
                let _ = write_message(wr, &f.to_msg()).await;
                let _ = wr.flush().await;
                return Err(ConnError::Frame(e));
            }
        };
        match msg {
            Message::Read(spec) => {
                let reply = match read_range(shared, &spec, Some(wr)).await {
                    Ok(end) => end,
                    Err(f) => f.to_msg(),
                };
                write_message(wr, &reply).await?;
            }
            Message::Load(spec) => {
                let reply = match read_range::<W>(shared, &spec, None).await {
                    Ok(end) => end,
                    Err(f) => f.to_msg(),
                };
                write_message(wr, &reply).await?;
            }
            Message::Free { cache_id } => {
                let n = shared.store.free(CacheId(cache_id)).await;
                write_message(wr, &pages_changed(n)).await?;
            }
            Message::Persisted { cache_id } => {
                let n = shared.store.release_sole(CacheId(cache_id)).await;
                write_message(wr, &pages_changed(n)).await?;
            }
            Message::Locate(spec) => {
                let reply = match locate(shared, &spec) {
                    Ok(m) => m,
                    Err(f) => f.to_msg(),
                };
                write_message(wr, &reply).await?;
            }
            Message::Pin { cache_id, pinned } => {
                let reply = match shared.store.pin(CacheId(cache_id), pinned).await {
                    Ok(n) => pages_changed(n),
                    Err(e) => Failure::from(e).to_msg(),
                };
                write_message(wr, &reply).await?;
            }
            Message::WriteBegin(ws) => {
                let reply = match handle_write(shared, &ws, rd).await {
                    Ok(m) => m,
                    Err(WriteFailure::Client(f)) => f.to_msg(),
                    Err(WriteFailure::Conn(e)) => return Err(e),
                };
                write_message(wr, &reply).await?;
            }
            other => {
                let f = Failure::new(
                    ErrorCode::BadRequest,
                    format!("unexpected frame {:?} outside a request", kind_name(&other)),
                );
                write_message(wr, &f.to_msg()).await?;
            }
        }
        wr.flush().await?;
    }
}

fn kind_name(m: &Message) -> &'static str {
    match m {
        Message::Read(_) => "Read",
        Message::Load(_) => "Load",
        Message::Free { .. } => "Free",
        Message::Persisted { .. } => "Persisted",
        Message::Pin { .. } => "Pin",
        Message::Locate(_) => "Locate",
        Message::Located { .. } => "Located",
        Message::WriteBegin(_) => "WriteBegin",
        Message::WriteEnd => "WriteEnd",
        Message::Data(_) => "Data",
        Message::End { .. } => "End",
        Message::WriteDone { .. } => "WriteDone",
        Message::Error { .. } => "Error",
    }
}

fn geometry(block_size: u64, page_size: u64) -> Result<Geometry, Failure> {
    Geometry::new(block_size, page_size)
        .map_err(|e| Failure::new(ErrorCode::BadRequest, e.to_string()))
}

/// Lists the files of the cached, checksum-verified pages of a range, for a
/// client on this host to read directly (short-circuit). Pages not listed
/// (missing, moving between tiers, not yet verified) are read over TCP.
fn locate(shared: &Shared, spec: &ReadSpec) -> Result<Message, Failure> {
    let g = geometry(spec.block_size, spec.page_size)?;
    if spec.offset > spec.file_len || spec.len > MAX_READ {
        return Err(Failure::new(
            ErrorCode::BadRequest,
            format!(
                "locate of {}+{} in {} is out of range",
                spec.offset, spec.len, spec.ufs_path
            ),
        ));
    }
    let pages = g
        .spans(spec.file_len, spec.offset, spec.len)
        .into_iter()
        .take(strata_proto::data::MAX_LOCATED)
        .filter_map(|s| {
            let key = PageKey {
                cache_id: CacheId(spec.cache_id),
                block: s.block,
                page: s.page,
            };
            let path = shared.store.local_path(&key)?;
            Some(strata_proto::data::LocatedPage {
                block: s.block,
                page: s.page,
                path: path.to_string_lossy().into_owned(),
            })
        })
        .collect();
    Ok(Message::Located { pages })
}

/// Serves (or, with `out == None`, only caches) a byte range.
async fn read_range<W: AsyncWrite + Unpin + AsSocket>(
    shared: &Shared,
    spec: &ReadSpec,
    mut out: Option<&mut W>,
) -> Result<Message, Failure> {
    let g = geometry(spec.block_size, spec.page_size)?;
    let _busy = shared.store.io_guard();
    if spec.offset > spec.file_len {
        return Err(Failure::new(
            ErrorCode::BadRequest,
            format!(
                "offset {} is beyond the end of {} ({} bytes)",
                spec.offset, spec.ufs_path, spec.file_len
            ),
        ));
    }
    if spec.len > MAX_READ {
        return Err(Failure::new(
            ErrorCode::BadRequest,
            format!(
                "read of {} bytes exceeds the {MAX_READ}-byte request limit",
                spec.len
            ),
        ));
    }
    let ufs = match spec.source {
        Source::Ufs => Some(shared.mounts.get(spec.mount_id).await?),
        Source::CacheOnly | Source::Local => None,
    };
    let spans = g.spans(spec.file_len, spec.offset, spec.len);
    let concurrency = shared.config.worker.ufs_read_concurrency.max(HIT_PIPELINE);
    let ufs_ref = ufs.as_ref();
    let want_bytes = out.is_some();
    let mut pages = stream::iter(spans)
        .map(|s| fetch_page(shared, spec, ufs_ref, s, want_bytes))
        .buffered(concurrency);
    let (mut bytes, mut cached, mut fetched) = (0u64, 0u64, 0u64);
    while let Some(r) = pages.next().await {
        let (span, data, hit) = r?;
        if hit {
            cached += 1;
        } else {
            fetched += 1;
        }
        if let Some(w) = out.as_deref_mut() {
            let sent = match data {
                PageData::Mem(b) => {
                    write_data(w, &b[span.skip as usize..(span.skip + span.take) as usize]).await
                }
                // Small reads: one copy into the buffered frame, so the data
                // and the `End` that follows leave in one packet.
                PageData::File(f) if span.take <= SMALL_COPY => {
                    let mut buf = vec![0u8; span.take as usize];
                    match std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, span.skip) {
                        Ok(()) => write_data(w, &buf).await,
                        Err(e) => Err(e),
                    }
                }
                PageData::File(f) => send_file_frame(w, &f, span.skip, span.take).await,
                PageData::Present => Err(std::io::Error::other("page data missing")),
            };
            sent.map_err(|e| Failure::new(ErrorCode::Internal, format!("client went away: {e}")))?;
            shared
                .counters
                .bytes_served
                .fetch_add(span.take, Ordering::Relaxed);
        }
        bytes += span.take;
    }
    let replicas = if want_bytes {
        shared
            .hot
            .read(spec.cache_id, spec.offset / g.block_size.max(1))
    } else {
        1
    };
    Ok(Message::End {
        bytes,
        cached_pages: cached,
        ufs_pages: fetched,
        replicas,
    })
}

async fn fetch_page(
    shared: &Shared,
    spec: &ReadSpec,
    ufs: Option<&Ufs>,
    span: PageSpan,
    want_bytes: bool,
) -> Result<(PageSpan, PageData, bool), Failure> {
    let key = PageKey {
        cache_id: CacheId(spec.cache_id),
        block: span.block,
        page: span.page,
    };
    if !want_bytes && shared.store.contains(&key) {
        return Ok((span, PageData::Present, true));
    }
    if want_bytes && let Some((f, len)) = shared.store.open_page(&key).await {
        if len == span.page_len {
            shared.extra.touch(&key);
            return Ok((span, PageData::File(f), true));
        }
        // A page of the wrong length is a torn write: drop and refetch.
        shared.store.free_page(&key).await;
    }
    if spec.source == Source::Local {
        return Err(page_lost(spec, &span));
    }
    let (data, from_peer) = fetch_coalesced(shared, spec, ufs, key, &span).await?;
    // A copy made to serve reads of a persisted block this worker does not
    // own: an extra replica, dropped when it goes idle.
    if from_peer && want_bytes && ufs.is_some() && !shared.peers.owns(spec.cache_id, span.block) {
        shared.extra.note(key);
    }
    Ok((span, PageData::Mem(data), false))
}

/// The answer to a request that changes a cache id's pages (free, pin,
/// persisted): how many it changed.
fn pages_changed(n: u64) -> Message {
    Message::End {
        bytes: 0,
        cached_pages: n,
        ufs_pages: 0,
        replicas: 1,
    }
}

fn page_lost(spec: &ReadSpec, span: &PageSpan) -> Failure {
    Failure::new(
        ErrorCode::DataLost,
        format!(
            "page {}/{} of cache-only file {} is not on this worker nor on \
             the workers ranked next for it; data written with MUST_CACHE \
             exists only in the cache",
            span.block, span.page, spec.ufs_path
        ),
    )
}

/// Fetches a page from the UFS and caches it, once however many readers
/// miss it at the same time: the first reader fetches, the others wait for
/// its result (request coalescing). A reader that arrives just after the
/// fetch finds the page in the store.
async fn fetch_coalesced(
    shared: &Shared,
    spec: &ReadSpec,
    ufs: Option<&Ufs>,
    key: PageKey,
    span: &PageSpan,
) -> Result<(Bytes, bool), Failure> {
    let cell = shared.fetches.join(key);
    let res = cell
        .get_or_init(|| async {
            if shared.store.contains(&key)
                && let Some(b) = shared.store.get(&key).await
                && b.len() as u64 == span.page_len
            {
                return Ok((b, false));
            }
            // However many clients miss at once, only so many pages are
            // being fetched (and held in memory) on this worker.
            let _permit = shared
                .fetch_permits
                .acquire()
                .await
                .map_err(|_| Failure::new(ErrorCode::Internal, "worker is shutting down"))?;
            // A peer may hold it (the previous owner, or a replica).
            let (data, opts, from_peer) = if let Some(b) = shared.peers.fetch(spec, span).await {
                shared
                    .counters
                    .peer_bytes_read
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
                // Cache-only bytes stay pinned here too: no UFS has them.
                let sole = ufs.is_none();
                (
                    b,
                    PutOpts {
                        sole,
                        ..PutOpts::default()
                    },
                    true,
                )
            } else if let Some(ufs) = ufs {
                let range = span.page_start..span.page_start + span.page_len;
                let data = ufs
                    .read(&spec.ufs_path, range, Some(&spec.fingerprint))
                    .await
                    .map_err(Failure::from)?;
                shared
                    .counters
                    .ufs_bytes_read
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                (data, PutOpts::default(), false)
            } else {
                return Err(page_lost(spec, span));
            };
            if let Err(e) = shared.store.put(key, data.clone(), opts).await {
                // The read still succeeds; the page is just not cached.
                tracing::warn!(error = %e, "page not cached");
            }
            Ok((data, from_peer))
        })
        .await
        .clone();
    shared.fetches.leave(key, &cell);
    res
}

/// Page fetches in flight, for coalescing.
#[derive(Default)]
pub(crate) struct Fetches {
    map: std::sync::Mutex<std::collections::HashMap<PageKey, FetchCell>>,
}

/// The page, and whether it came from a peer.
type FetchCell = Arc<tokio::sync::OnceCell<Result<(Bytes, bool), Failure>>>;

impl Fetches {
    fn join(&self, key: PageKey) -> FetchCell {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(key).or_default().clone()
    }

    /// Forgets the fetch once it is done (the first finisher removes it).
    fn leave(&self, key: PageKey, cell: &FetchCell) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&key).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            m.remove(&key);
        }
    }
}

/// Sends one `Data` frame whose payload is `take` bytes of `file` at `skip`,
/// with `sendfile(2)`: the kernel copies page cache to the socket.
async fn send_file_frame<W: AsyncWrite + Unpin + AsSocket>(
    w: &mut W,
    file: &std::fs::File,
    skip: u64,
    take: u64,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut head = [0u8; strata_proto::data::HEADER_LEN];
    strata_proto::data::data_header(&mut head, take);
    w.write_all(&head).await?;
    w.flush().await?;
    let sock = w.socket();
    let mut off = skip as libc::off_t;
    let end = (skip + take) as libc::off_t;
    while off < end {
        sock.writable().await?;
        let res = sock.try_io(tokio::io::Interest::WRITABLE, || {
            // SAFETY: both descriptors are open for the duration of the call;
            // `off` is a valid pointer the kernel advances.
            let n = unsafe {
                libc::sendfile(
                    sock.as_raw_fd(),
                    file.as_raw_fd(),
                    &mut off,
                    (end - off) as usize,
                )
            };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match res {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "cache file shorter than its index entry",
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Gives access to the TCP socket under a buffered writer (for `sendfile`).
pub trait AsSocket {
    fn socket(&self) -> &tokio::net::TcpStream;
}

impl AsSocket for BufWriter<tokio::net::tcp::OwnedWriteHalf> {
    fn socket(&self) -> &tokio::net::TcpStream {
        self.get_ref().as_ref()
    }
}

enum WriteFailure {
    Client(Failure),
    Conn(ConnError),
}

impl From<UfsError> for WriteFailure {
    fn from(e: UfsError) -> Self {
        WriteFailure::Client(e.into())
    }
}

impl From<Failure> for WriteFailure {
    fn from(f: Failure) -> Self {
        WriteFailure::Client(f)
    }
}

/// Receives a write stream (Data frames up to WriteEnd).
async fn handle_write<R: AsyncRead + Unpin>(
    shared: &Shared,
    ws: &WriteSpec,
    rd: &mut R,
) -> Result<Message, WriteFailure> {
    let (pin, mut page_id) = match ws.mode {
        WriteMode::MustCache => (true, Some(CacheId(ws.cache_id))),
        // Staged under a temporary id until the UFS returns the fingerprint.
        WriteMode::CacheThrough => (false, Some(CacheId(rand::random::<u128>()))),
        WriteMode::Through => (false, None),
    };
    let opts = PutOpts {
        sole: pin,
        priority: Some(ws.priority),
    };
    let setup = async {
        let g = geometry(ws.block_size, ws.page_size)?;
        if !ws.offset.is_multiple_of(g.page_size) {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                "write offset is not page aligned",
            ));
        }
        let ufs = match ws.mode {
            WriteMode::MustCache => None,
            _ => Some(shared.mounts.get(ws.mount_id).await?),
        };
        let writer = match &ufs {
            Some(u) => Some(u.writer(&ws.ufs_path).await?),
            None => None,
        };
        Ok((g, ufs, writer))
    };
    // On a failed setup the client's Data frames are still drained up to
    // WriteEnd, so the connection stays in step.
    let mut failure: Option<Failure> = None;
    let (g, ufs, mut writer) = match setup.await {
        Ok(v) => v,
        Err(f) => {
            failure = Some(f);
            page_id = None;
            (Geometry::default(), None, None)
        }
    };
    let mut pending = BytesMut::new();
    let mut pos = ws.offset;
    let mut total = 0u64;
    let cleanup = |id: Option<CacheId>| async move {
        if let Some(id) = id {
            shared.store.free(id).await;
        }
    };
    loop {
        let msg = match read_message(rd).await {
            Ok(m) => m,
            Err(e) => {
                // Connection lost mid-write: nothing becomes visible.
                if let Some(w) = writer.take() {
                    let _ = w.abort().await;
                }
                cleanup(page_id).await;
                return Err(WriteFailure::Conn(ConnError::Frame(e)));
            }
        };
        match msg {
            Message::Data(b) => {
                if failure.is_some() {
                    continue;
                }
                total += b.len() as u64;
                if let Some(w) = writer.as_mut()
                    && let Err(e) = w.write(b.clone()).await
                {
                    failure = Some(e.into());
                    continue;
                }
                if let Some(id) = page_id {
                    pending.extend_from_slice(&b);
                    while pending.len() as u64 >= g.page_size {
                        let page = pending.split_to(g.page_size as usize).freeze();
                        if let Err(e) = put_page(shared, &g, id, pos, page, opts).await {
                            failure = Some(e);
                            break;
                        }
                        pos += g.page_size;
                    }
                }
            }
            Message::WriteEnd => break,
            other => {
                failure.get_or_insert(Failure::new(
                    ErrorCode::BadRequest,
                    format!("unexpected {} frame inside a write", kind_name(&other)),
                ));
                break;
            }
        }
    }
    if failure.is_none()
        && !pending.is_empty()
        && let Some(id) = page_id
        && let Err(e) = put_page(shared, &g, id, pos, pending.freeze(), opts).await
    {
        failure = Some(e);
    }
    if let Some(f) = failure {
        if let Some(w) = writer.take() {
            let _ = w.abort().await;
        }
        cleanup(page_id).await;
        return Err(f.into());
    }
    match (writer, ufs) {
        (Some(w), Some(u)) => {
            let st = match w.close().await {
                Ok(st) => st,
                Err(e) => {
                    cleanup(page_id).await;
                    return Err(Failure::from(e).into());
                }
            };
            let final_id =
                CacheId::for_ufs_object(&u.object_identity(&ws.ufs_path), &st.fingerprint);
            if let Some(tmp) = page_id {
                shared.store.rekey(tmp, final_id).await;
            }
            Ok(Message::WriteDone {
                bytes: total,
                fingerprint: st.fingerprint,
                mtime_ms: st.mtime_ms,
                cache_id: final_id.0,
            })
        }
        _ => Ok(Message::WriteDone {
            bytes: total,
            fingerprint: String::new(),
            mtime_ms: 0,
            cache_id: ws.cache_id,
        }),
    }
}

async fn put_page(
    shared: &Shared,
    g: &Geometry,
    id: CacheId,
    pos: u64,
    data: Bytes,
    opts: PutOpts,
) -> Result<(), Failure> {
    let block = pos / g.block_size;
    let page = ((pos % g.block_size) / g.page_size) as u32;
    let key = PageKey {
        cache_id: id,
        block,
        page,
    };
    match shared.store.put(key, data, opts).await {
        Ok(()) => Ok(()),
        // Through-the-UFS writes do not need the cache copy.
        Err(e) if !opts.sole => {
            tracing::debug!(error = %e, "write-through page not cached");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
