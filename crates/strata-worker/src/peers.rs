//! Peer-to-peer fetch: before a worker reads a missing page from the UFS
//! (or gives up on a cache-only one), it asks the workers ranked next to it
//! for that block, which hold the page after a membership change (the
//! previous owner) or as a replica. A preload or a re-balance then reads
//! each byte from the UFS once. Peers are asked with `Source::Local`, so a
//! peer answers from its own pages only and never asks further.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use strata_common::CacheId;
use strata_common::geometry::PageSpan;
use strata_common::ids::block_placement_key;
use strata_common::placement::{Candidate, owners};
use strata_proto::data::{Message, ReadSpec, Source, read_message, write_message};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Ranks (besides this worker) asked for a page.
const PEERS_ASKED: usize = 2;
/// How long one peer may take to answer for one page.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept per peer.
const IDLE_PER_PEER: usize = 8;

type Conn = (BufReader<OwnedReadHalf>, BufWriter<OwnedWriteHalf>);

#[derive(Default)]
struct View {
    me: u64,
    cands: Vec<Candidate>,
    addrs: HashMap<u64, String>,
}

#[derive(Default)]
pub struct Peers {
    view: Mutex<Arc<View>>,
    idle: Mutex<HashMap<String, Vec<Conn>>>,
}

impl Peers {
    /// Replaces the live worker list (from the masters).
    pub fn set(&self, me: u64, workers: &[strata_proto::pb::WorkerInfo]) {
        let live: Vec<_> = workers.iter().filter(|w| w.live).collect();
        let v = View {
            me,
            cands: live
                .iter()
                .map(|w| Candidate {
                    id: w.worker_id,
                    weight: w.stats.as_ref().map(|s| s.capacity_bytes).unwrap_or(1),
                })
                .collect(),
            addrs: live
                .iter()
                .map(|w| (w.worker_id, w.data_addr.clone()))
                .collect(),
        };
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(v);
    }

    /// The other workers ranked first for this block, best first.
    fn candidates(&self, cache_id: u128, block: u64) -> Vec<String> {
        let v = self.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if v.cands.len() < 2 {
            return Vec::new();
        }
        let key = block_placement_key(CacheId(cache_id), block);
        owners(key, &v.cands, PEERS_ASKED + 1)
            .into_iter()
            .filter(|id| *id != v.me)
            .take(PEERS_ASKED)
            .filter_map(|id| v.addrs.get(&id).cloned())
            .collect()
    }

    /// True when this worker is first in the block's ranking (or knows of
    /// no other worker).
    pub fn owns(&self, cache_id: u128, block: u64) -> bool {
        let v = self.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if v.cands.len() < 2 {
            return true;
        }
        let key = block_placement_key(CacheId(cache_id), block);
        owners(key, &v.cands, 1).first() == Some(&v.me)
    }

    /// The page from a peer that has it, if any does.
    pub async fn fetch(&self, spec: &ReadSpec, span: &PageSpan) -> Option<Bytes> {
        for addr in self.candidates(spec.cache_id, span.block) {
            let req = ReadSpec {
                source: Source::Local,
                offset: span.page_start,
                len: span.page_len,
                ..spec.clone()
            };
            match tokio::time::timeout(PEER_TIMEOUT, self.ask(&addr, &req)).await {
                Ok(Ok(Some(b))) if b.len() as u64 == span.page_len => return Some(b),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!(peer = %addr, error = %e, "peer fetch failed"),
                Err(_) => tracing::debug!(peer = %addr, "peer fetch timed out"),
            }
        }
        None
    }

    async fn conn(&self, addr: &str) -> std::io::Result<Conn> {
        if let Some(c) = self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(addr)
            .and_then(|v| v.pop())
        {
            return Ok(c);
        }
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok((BufReader::new(r), BufWriter::new(w)))
    }

    /// Asks one peer; `None` when it does not hold every byte of the page.
    async fn ask(&self, addr: &str, req: &ReadSpec) -> std::io::Result<Option<Bytes>> {
        let mut c = self.conn(addr).await?;
        let io = |e: strata_proto::data::FrameError| std::io::Error::other(e.to_string());
        write_message(&mut c.1, &Message::Read(req.clone())).await?;
        c.1.flush().await?;
        let mut buf = BytesMut::with_capacity(req.len as usize);
        let got = loop {
            match read_message(&mut c.0).await.map_err(io)? {
                Message::Data(b) => buf.extend_from_slice(&b),
                Message::End { .. } => break Some(buf.freeze()),
                Message::Error { .. } => break None,
                other => {
                    return Err(std::io::Error::other(format!("unexpected reply {other:?}")));
                }
            }
        };
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let v = idle.entry(addr.to_string()).or_default();
        if v.len() < IDLE_PER_PEER {
            v.push(c);
        }
        Ok(got)
    }
}
