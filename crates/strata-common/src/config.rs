//! The one configuration file (TOML) and its environment overrides.
//!
//! Every key has a default (see `docs/configuration.md`). Any key can be
//! overridden with `STRATA_<SECTION>_<KEY>` (upper case), for example
//! `STRATA_WORKER_CACHE_CAPACITY=20GiB`; `STRATA_MASTER` is the master
//! address clients and workers dial (`cluster.master`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::CommonError;
use crate::size::parse_size;

pub const DEFAULT_MASTER_ADDR: &str = "127.0.0.1:19998";
pub const DEFAULT_WORKER_DATA_ADDR: &str = "127.0.0.1:29999";

/// A byte count written as a number or a string with a unit ("64MiB").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => parse_size(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub cluster: ClusterConfig,
    pub master: MasterConfig,
    pub worker: WorkerConfig,
    pub client: ClientConfig,
    pub gateway: GatewayConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address the S3 gateway listens on.
    pub listen: String,
    /// The access key S3 clients sign requests with (SigV4). Required:
    /// anonymous access is off. This key may read and write every bucket.
    pub access_key: String,
    /// The secret key that goes with `access_key`.
    pub secret_key: String,
    /// More access keys, each limited to the buckets it lists.
    pub keys: Vec<GatewayKey>,
    /// Base domain for virtual-host-style requests (`BUCKET.DOMAIN`);
    /// empty: path-style only.
    pub domain: String,
    /// Where parts of multipart uploads are kept until completed or aborted.
    pub upload_dir: PathBuf,
    /// Bytes per second the gateway sends to all clients together; 0: no limit.
    pub max_bandwidth: ByteSize,
    /// Bytes per second each client connection receives at most; 0: no limit.
    pub conn_bandwidth: ByteSize,
    /// Requests per second each access key may make; 0: no limit.
    pub requests_per_sec: u32,
    /// Seconds HEAD/LIST metadata stays cached in the gateway at most (it
    /// is also dropped whenever the namespace changes); 0: no cache.
    pub metadata_ttl_secs: u64,
    /// UFS URI under which CreateBucket gives each new bucket a directory
    /// of its own, mounted at `/BUCKET` (`file:///srv/buckets` or
    /// `s3://bucket/prefix?...`); empty: CreateBucket creates no buckets
    /// (buckets are the mounts an administrator made).
    pub bucket_ufs: String,
}

/// An access key of the S3 gateway and the buckets it may use ("*": all).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayKey {
    pub access_key: String,
    pub secret_key: String,
    /// Buckets this key may read (list, head, get).
    pub read: Vec<String>,
    /// Buckets this key may write (put, copy into, delete, multipart); a
    /// writable bucket is also readable.
    pub write: Vec<String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:29998".into(),
            access_key: String::new(),
            secret_key: String::new(),
            keys: Vec::new(),
            domain: String::new(),
            upload_dir: PathBuf::from("./strata-data/gateway-uploads"),
            max_bandwidth: ByteSize(0),
            conn_bandwidth: ByteSize(0),
            requests_per_sec: 0,
            metadata_ttl_secs: 60,
            bucket_ufs: String::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Master gRPC address(es) that workers and clients dial, comma
    /// separated. With several masters any of them will do: the current
    /// member list is learned from the masters themselves.
    pub master: String,
}

impl ClusterConfig {
    /// The configured master addresses.
    pub fn masters(&self) -> Vec<String> {
        split_list(&self.master)
    }
}

/// Splits a comma-separated list, dropping blanks.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect()
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            master: DEFAULT_MASTER_ADDR.into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MasterConfig {
    /// Address the master's gRPC service listens on.
    pub rpc_addr: String,
    /// Directory of the metadata store (namespace, mount table).
    pub data_dir: PathBuf,
    /// Default seconds before a directory's UFS listing is re-validated:
    /// -1 never, 0 on every access.
    pub sync_interval: i64,
    /// A worker missing heartbeats for this long is no longer given blocks.
    pub worker_timeout_ms: u64,
    /// Default block size (placement unit) for new mounts.
    pub block_size: ByteSize,
    /// Default page size (cache and UFS I/O unit) for new mounts.
    pub page_size: ByteSize,
    /// Seconds a mount's UFS may take to answer the reachability check.
    pub mount_check_timeout_secs: u64,
    /// This master's Raft member id (unique in the cluster, never reused).
    pub node_id: u64,
    /// Address other masters, workers and clients use to reach this master
    /// (default: the address `rpc_addr` is bound to).
    pub advertise_addr: Option<String>,
    /// The first members of a new cluster, `ID=HOST:PORT` comma separated,
    /// the same on each of them. Empty: a single master that forms its own
    /// cluster, unless `join` is set.
    pub initial_members: String,
    /// Start empty and wait to be added to an existing cluster with
    /// `strata admin masters add`.
    pub join: bool,
    /// Milliseconds between leader heartbeats to the other masters.
    pub raft_heartbeat_ms: u64,
    /// Milliseconds without a heartbeat before a follower stands for
    /// election (randomised up to twice this).
    pub raft_election_timeout_ms: u64,
    /// Log entries between state snapshots (which also bound the log).
    pub raft_snapshot_every: u64,
    /// Microseconds a follower gathers linearizable reads before it asks
    /// the leader for one read index on behalf of all of them (and so the
    /// shortest time between two such requests). Longer costs each read
    /// more latency and the leader and follower less CPU per read.
    pub read_index_gather_us: u64,
    /// Block loads a job keeps in flight on one worker.
    pub job_per_worker: usize,
    /// Block loads a job keeps in flight against one UFS (mount).
    pub job_per_ufs: usize,
    /// Jobs the leader runs at once (the rest wait, queued).
    pub job_max_running: usize,
    /// Seconds between checks of TTLs.
    pub ttl_check_interval_secs: u64,
    /// Seconds after which a file's new version that was never completed
    /// nor listed (a rewrite whose writer died) is removed, with its
    /// cache-only pages; checked with the TTLs. 0: never.
    pub unfinished_ttl_secs: u64,
    /// Milliseconds an ASYNC_THROUGH file waits after it is closed before
    /// it is written to the UFS (a file deleted meanwhile is never written).
    pub persist_delay_ms: u64,
}

impl MasterConfig {
    /// `initial_members` parsed into (id, address) pairs.
    pub fn initial_members(&self) -> Result<Vec<(u64, String)>, String> {
        split_list(&self.initial_members)
            .into_iter()
            .map(|m| {
                let (id, addr) = m
                    .split_once('=')
                    .ok_or_else(|| format!("master.initial_members: {m:?} is not ID=HOST:PORT"))?;
                let id = id.trim().parse::<u64>().map_err(|_| {
                    format!("master.initial_members: {id:?} in {m:?} is not a number")
                })?;
                Ok((id, addr.trim().to_string()))
            })
            .collect()
    }
}

impl Default for MasterConfig {
    fn default() -> Self {
        MasterConfig {
            rpc_addr: DEFAULT_MASTER_ADDR.into(),
            data_dir: PathBuf::from("./strata-data/master"),
            sync_interval: 60,
            worker_timeout_ms: 10_000,
            block_size: ByteSize(crate::geometry::DEFAULT_BLOCK_SIZE),
            page_size: ByteSize(crate::geometry::DEFAULT_PAGE_SIZE),
            mount_check_timeout_secs: 10,
            node_id: 1,
            advertise_addr: None,
            initial_members: String::new(),
            join: false,
            raft_heartbeat_ms: 100,
            raft_election_timeout_ms: 600,
            raft_snapshot_every: 50_000,
            read_index_gather_us: 1000,
            job_per_worker: 8,
            job_per_ufs: 32,
            job_max_running: 4,
            ttl_check_interval_secs: 60,
            unfinished_ttl_secs: 86_400,
            persist_delay_ms: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Address the data server listens on (the dedicated TCP data protocol).
    pub data_addr: String,
    /// Address clients are told to dial, if different from `data_addr`
    /// (e.g. when listening on 0.0.0.0).
    pub advertise_addr: Option<String>,
    /// Directory that holds cached pages.
    pub cache_dir: PathBuf,
    /// Byte quota of the cache directory.
    pub cache_capacity: ByteSize,
    /// Milliseconds between heartbeats to the master.
    pub heartbeat_interval_ms: u64,
    /// Parallel ranged GETs one cold read may issue to the UFS.
    pub ufs_read_concurrency: usize,
    /// Page fetches from the UFS in flight on this worker at once, over all
    /// clients: bounds the memory cold reads use (about this many pages).
    pub max_ufs_fetches: usize,
    /// Reads per second of one block that one worker serves before it asks
    /// readers to spread over one more worker of the block's ranking
    /// (adaptive replication); 0 turns it off.
    pub hot_block_reads_per_sec: u32,
    /// Most workers a hot block is spread over.
    pub hot_block_max_replicas: u8,
    /// Seconds an extra replica of a hot block (pages copied from a peer to
    /// serve reads) may go unread before it is dropped; 0: left to eviction.
    pub idle_replica_secs: u64,
    /// Cache tiers, fastest first. Empty: one SSD tier at `cache_dir` holding
    /// `cache_capacity`. In the file, an array of tables or the compact form
    /// `"MEM:/dev/shm/strata:4GiB:lru; SSD:/ssd1|/ssd2:100GiB:arc"`
    /// (medium : directories separated by `|` : quota per directory : policy);
    /// the compact form also works as `STRATA_WORKER_TIERS`.
    #[serde(deserialize_with = "de_tiers")]
    pub tiers: Vec<TierConfig>,
    /// When the memory available to the worker (host `MemAvailable`, or its
    /// cgroup's limit minus what it cannot reclaim, whichever is smaller)
    /// falls under this floor, MEM pages spill to the next tier and new pages
    /// skip MEM. 0 turns the watch off.
    pub memory_floor: ByteSize,
    /// Milliseconds between two looks at the memory available.
    pub memory_check_interval_ms: u64,
    /// Reads of a page in a lower tier before it is promoted one tier up.
    /// 0 turns promotion off.
    pub promote_after_hits: u32,
    /// Seconds a cached page lives after it was cached (pinned pages and
    /// MUST_CACHE data excepted). 0: no expiry.
    pub page_ttl_secs: u64,
    /// MEM bytes any file written at priority 0 may keep in MEM; the rest of
    /// the file goes to the disk tiers.
    pub priority_mem_base: ByteSize,
    /// Extra MEM bytes per priority level (a file written at priority `p`
    /// keeps up to `priority_mem_base + p × priority_mem_step` in MEM).
    pub priority_mem_step: ByteSize,
}

/// The storage medium of a cache tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Medium {
    /// A tmpfs directory (e.g. /dev/shm): memory, accounted to the worker's
    /// cgroup, kept across a worker restart (not a host reboot).
    Mem,
    Ssd,
    Hdd,
}

impl Medium {
    pub fn name(self) -> &'static str {
        match self {
            Medium::Mem => "MEM",
            Medium::Ssd => "SSD",
            Medium::Hdd => "HDD",
        }
    }
}

impl std::str::FromStr for Medium {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_uppercase().as_str() {
            "MEM" => Ok(Medium::Mem),
            "SSD" => Ok(Medium::Ssd),
            "HDD" => Ok(Medium::Hdd),
            _ => Err(format!("unknown medium {s:?} (use MEM, SSD or HDD)")),
        }
    }
}

/// The eviction policies a tier can be configured with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Least recently used.
    #[default]
    Lru,
    /// Least recently/frequently used: a decaying reference count that
    /// spans LFU (lambda → 0) and LRU (lambda → 1).
    Lrfu,
    /// Adaptive replacement cache: balances recency and frequency and
    /// resists scans.
    Arc,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 3] = [PolicyKind::Lru, PolicyKind::Lrfu, PolicyKind::Arc];

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::Lrfu => "lrfu",
            PolicyKind::Arc => "arc",
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "lru" => Ok(PolicyKind::Lru),
            "lrfu" => Ok(PolicyKind::Lrfu),
            "arc" => Ok(PolicyKind::Arc),
            _ => Err(format!(
                "unknown eviction policy {s:?} (use lru, lrfu or arc)"
            )),
        }
    }
}

/// One cache tier: directories of one medium, each with a byte quota.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    pub medium: Medium,
    pub dirs: Vec<PathBuf>,
    /// Byte quota of each directory.
    pub quota: ByteSize,
    #[serde(default)]
    pub policy: PolicyKind,
}

/// Parses the compact tier list (see [`WorkerConfig::tiers`]).
pub fn parse_tiers(spec: &str) -> Result<Vec<TierConfig>, String> {
    let mut out = Vec::new();
    for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let fields: Vec<&str> = part.split(':').collect();
        if !(3..=4).contains(&fields.len()) {
            return Err(format!(
                "tier {part:?}: expected MEDIUM:DIR[|DIR…]:QUOTA[:POLICY], \
                 e.g. \"SSD:/mnt/ssd:100GiB:arc\""
            ));
        }
        let medium = fields[0]
            .parse()
            .map_err(|e| format!("tier {part:?}: {e}"))?;
        let dirs: Vec<PathBuf> = fields[1]
            .split('|')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .collect();
        let quota = parse_size(fields[2].trim()).map_err(|e| format!("tier {part:?}: {e}"))?;
        let policy = match fields.get(3) {
            Some(p) => p.parse().map_err(|e| format!("tier {part:?}: {e}"))?,
            None => PolicyKind::default(),
        };
        out.push(TierConfig {
            medium,
            dirs,
            quota: ByteSize(quota),
            policy,
        });
    }
    Ok(out)
}

fn de_tiers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<TierConfig>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        S(String),
        L(Vec<TierConfig>),
    }
    match Raw::deserialize(d)? {
        Raw::S(s) => parse_tiers(&s).map_err(serde::de::Error::custom),
        Raw::L(l) => Ok(l),
    }
}

impl WorkerConfig {
    /// The tiers in effect: the configured ones, or the single default SSD
    /// tier at `cache_dir`.
    pub fn effective_tiers(&self) -> Vec<TierConfig> {
        if self.tiers.is_empty() {
            vec![TierConfig {
                medium: Medium::Ssd,
                dirs: vec![self.cache_dir.clone()],
                quota: self.cache_capacity,
                policy: PolicyKind::Lru,
            }]
        } else {
            self.tiers.clone()
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            data_addr: DEFAULT_WORKER_DATA_ADDR.into(),
            advertise_addr: None,
            cache_dir: PathBuf::from("./strata-data/worker"),
            cache_capacity: ByteSize(10 << 30),
            heartbeat_interval_ms: 1000,
            ufs_read_concurrency: 8,
            max_ufs_fetches: 32,
            hot_block_reads_per_sec: 64,
            hot_block_max_replicas: 3,
            idle_replica_secs: 300,
            tiers: Vec::new(),
            memory_floor: ByteSize(256 << 20),
            memory_check_interval_ms: 250,
            promote_after_hits: 3,
            page_ttl_secs: 0,
            priority_mem_base: ByteSize(64 << 20),
            priority_mem_step: ByteSize(32 << 20),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Blocks a streaming read fetches ahead of the reader, in parallel.
    pub read_ahead_blocks: usize,
    /// Bytes per data-protocol read request (a slice of one block).
    pub read_chunk: ByteSize,
    /// Seconds a data-protocol request may stall before it fails.
    pub io_timeout_secs: u64,
    /// Read cached pages straight from the files of a worker on this host
    /// (one on a loopback address) instead of over TCP. Off in heavy-client
    /// mode, where the host reads and keeps its own copy.
    pub short_circuit: bool,
    /// Blocks beyond a sequential reader's position that are loaded on
    /// their owner workers ahead of it (real-time prewarm); 0 turns it off.
    pub prewarm_blocks: u64,
    /// Idle data connections kept open per worker for reuse.
    pub pool_idle_per_worker: usize,
    /// Seconds a metadata call keeps retrying through a master failover
    /// before it fails.
    pub failover_timeout_secs: u64,
    /// Which masters answer reads: `any` (in turn; each confirms with the
    /// leader that it is current, so reads stay linearizable), `leader`, or
    /// `any-stale` (any master from its own state, possibly behind).
    pub read_from: String,
    /// Workers an ASYNC_THROUGH write is cached on before `close` returns
    /// (every live worker when fewer).
    pub async_replicas: usize,
    /// Heavy-client mode: pages this client reads are also kept in this
    /// local directory (an NVMe disk of a GPU host, say) and read from it
    /// afterwards; empty: off.
    pub local_cache_dir: PathBuf,
    /// Most bytes the local cache directory holds (least recently used
    /// pages are dropped beyond it).
    pub local_cache_capacity: ByteSize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            read_ahead_blocks: 8,
            read_chunk: ByteSize(16 << 20),
            io_timeout_secs: 60,
            short_circuit: true,
            prewarm_blocks: 4,
            pool_idle_per_worker: 64,
            failover_timeout_secs: 30,
            read_from: "any".into(),
            async_replicas: 2,
            local_cache_dir: PathBuf::new(),
            local_cache_capacity: ByteSize(10 << 30),
        }
    }
}

const SECTIONS: [&str; 5] = ["cluster", "master", "worker", "client", "gateway"];

impl Config {
    /// Loads `path` if given, else `$STRATA_CONFIG`, else `./strata.toml`
    /// when it exists, else the defaults; then applies environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Config, CommonError> {
        let chosen: Option<PathBuf> = match path {
            Some(p) => Some(p.to_path_buf()),
            None => match std::env::var_os("STRATA_CONFIG") {
                Some(p) => Some(PathBuf::from(p)),
                None => {
                    let local = PathBuf::from("strata.toml");
                    local.exists().then_some(local)
                }
            },
        };
        let (text, origin) = match &chosen {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|e| CommonError::Config {
                    origin: p.display().to_string(),
                    msg: format!("cannot read the file: {e}"),
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "defaults".to_string()),
        };
        Self::from_toml_with_env(&text, &origin, std::env::vars())
    }

    /// Parses TOML text and applies `STRATA_*` overrides from `env`.
    pub fn from_toml_with_env(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, CommonError> {
        let err = |msg: String| CommonError::Config {
            origin: origin.to_string(),
            msg,
        };
        let mut table: toml::Table = text.parse().map_err(|e| err(format!("{e}")))?;
        for (k, v) in env {
            let Some(rest) = k.strip_prefix("STRATA_") else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            let (section, key) = if rest == "master" {
                ("cluster".to_string(), "master".to_string())
            } else if rest == "config" {
                continue;
            } else {
                match SECTIONS.iter().find(|s| rest.starts_with(&format!("{s}_"))) {
                    Some(s) => (s.to_string(), rest[s.len() + 1..].to_string()),
                    None => continue,
                }
            };
            let value = if let Ok(i) = v.parse::<i64>() {
                toml::Value::Integer(i)
            } else if let Ok(b) = v.parse::<bool>() {
                toml::Value::Boolean(b)
            } else {
                toml::Value::String(v.clone())
            };
            let sect = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(Default::default()));
            match sect {
                toml::Value::Table(t) => {
                    t.insert(key, value);
                }
                _ => return Err(err(format!("[{section}] must be a table"))),
            }
        }
        let cfg: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| err(format!("{e}")))?;
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        crate::Geometry {
            block_size: self.master.block_size.0,
            page_size: self.master.page_size.0,
        }
        .validate()
        .map_err(|e| format!("master.block_size/master.page_size: {e}"))?;
        if self.worker.cache_capacity.0 < self.master.page_size.0 {
            return Err("worker.cache_capacity must hold at least one page".into());
        }
        let mut prev: Option<Medium> = None;
        for t in &self.worker.tiers {
            if t.dirs.is_empty() {
                return Err(format!(
                    "worker.tiers: the {} tier has no directory",
                    t.medium.name()
                ));
            }
            if t.quota.0 < self.master.page_size.0 {
                return Err(format!(
                    "worker.tiers: the {} tier's quota must hold at least one page",
                    t.medium.name()
                ));
            }
            if prev.is_some_and(|p| p > t.medium) {
                return Err("worker.tiers: list the tiers fastest first (MEM, SSD, HDD)".into());
            }
            prev = Some(t.medium);
        }
        self.master.initial_members()?;
        if self.master.node_id == 0 {
            return Err("master.node_id must be at least 1".into());
        }
        if self.master.raft_heartbeat_ms == 0
            || self.master.raft_election_timeout_ms < 3 * self.master.raft_heartbeat_ms
        {
            return Err(
                "master.raft_election_timeout_ms must be at least 3 × master.raft_heartbeat_ms \
                 (and the heartbeat above 0)"
                    .into(),
            );
        }
        if self.master.sync_interval < -1 {
            return Err("master.sync_interval is -1 (never), 0 (always) or seconds".into());
        }
        let b = &self.gateway.bucket_ufs;
        if !b.is_empty() && !b.starts_with("file:///") && !b.starts_with("s3://") {
            return Err(format!(
                "gateway.bucket_ufs = {b:?}: expected file:///ABSOLUTE/DIR or \
                 s3://BUCKET[/PREFIX][?endpoint=...]"
            ));
        }
        Ok(())
    }

    /// The configuration as TOML, every key with its value.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_env_and_errors() {
        let c = Config::from_toml_with_env("", "t", Vec::new()).unwrap();
        assert_eq!(c.cluster.master, DEFAULT_MASTER_ADDR);
        let c = Config::from_toml_with_env(
            "[worker]\ncache_capacity = \"2GiB\"\n",
            "t",
            vec![
                ("STRATA_MASTER".into(), "10.0.0.1:1".into()),
                ("STRATA_MASTER_SYNC_INTERVAL".into(), "0".into()),
                ("STRATA_WORKER_DATA_ADDR".into(), "127.0.0.1:5".into()),
            ],
        )
        .unwrap();
        assert_eq!(c.worker.cache_capacity.0, 2 << 30);
        assert_eq!(c.cluster.master, "10.0.0.1:1");
        assert_eq!(c.master.sync_interval, 0);
        assert_eq!(c.worker.data_addr, "127.0.0.1:5");
        let e = Config::from_toml_with_env("[worker]\ncache_capasity = 1\n", "f.toml", Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.toml") && e.contains("cache_capasity"), "{e}");
        let e = Config::from_toml_with_env(
            "",
            "t",
            vec![("STRATA_GATEWAY_BUCKET_UFS".into(), "buckets".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("gateway.bucket_ufs") && e.contains("file:///"),
            "{e}"
        );
        // Tiers: compact form from the environment, table form from the file.
        let c = Config::from_toml_with_env(
            "",
            "t",
            vec![(
                "STRATA_WORKER_TIERS".into(),
                "MEM:/dev/shm/s:64MiB:arc; SSD:/a|/b:1GiB".into(),
            )],
        )
        .unwrap();
        assert_eq!(c.worker.tiers.len(), 2);
        assert_eq!(c.worker.tiers[0].medium, Medium::Mem);
        assert_eq!(c.worker.tiers[0].policy, PolicyKind::Arc);
        assert_eq!(c.worker.tiers[1].dirs.len(), 2);
        assert_eq!(c.worker.tiers[1].quota.0, 1 << 30);
        let c = Config::from_toml_with_env(
            "[[worker.tiers]]\nmedium = \"HDD\"\ndirs = [\"/h\"]\nquota = \"2GiB\"\npolicy = \"lrfu\"\n",
            "t",
            Vec::new(),
        )
        .unwrap();
        assert_eq!(c.worker.effective_tiers()[0].policy, PolicyKind::Lrfu);
        let e = Config::from_toml_with_env("[worker]\ntiers = \"SSD:/a\"\n", "t", Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("MEDIUM:DIR"), "{e}");
        let e = Config::from_toml_with_env(
            "[worker]\ntiers = \"SSD:/a:1GiB; MEM:/m:1GiB\"\n",
            "t",
            Vec::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("fastest first"), "{e}");
        // The printed defaults parse back.
        let d = Config::default().to_toml();
        Config::from_toml_with_env(&d, "t", Vec::new()).unwrap();
    }
}
