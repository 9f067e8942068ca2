//! The S3 store: spaces kept as objects in an S3-compatible bucket, shared by every host that
//! mounts them. Keys mirror paths (`<prefix>/rooms/<id>/<path>`, see `keys`), so any S3 tool
//! reads the same files. What programs see, and how it differs from the local store, is in
//! doc/S3.md; the invariants of each part are in its module:
//!
//! - `client`: the S3 operations used, as a trait; `sdk` implements it over aws-sdk-s3, `mock`
//!   in memory with AWS's rules and injected faults (the store's unit tests use it);
//! - `keys`: paths to keys, and what is refused either way;
//! - `attrs`: mode, owner and times in object metadata, and the per-directory index that lets
//!   one LIST show them;
//! - `spool`: working copies on local disk, within a bound, uploading their full parts while a
//!   sequential writer writes;
//! - `commit`: how a close becomes an object (one PUT, a multipart upload, parts copied
//!   server-side for a patch, conditional appends);
//! - `cache` and `content`: reads, through a bounded on-disk cache validated by ETag, with
//!   read-ahead;
//! - `state`: the local spool, cache and journal of each process, and what a crashed process
//!   left (its dangling uploads are aborted, its renames finished at the next start; a rename
//!   that failed part-way is finished while the process runs, see [`Shared::settle`]);
//! - `store`: the [`crate::store::Store`] of one space; `S3Spaces` makes, opens and deletes
//!   spaces.
//!
//! Requests are made from the thread that needs them (blocking), or from the store's part
//! threads (`pool`); no lock is held across a request.

pub mod attrs;
pub mod cache;
pub mod client;
mod commit;
pub mod content;
pub mod keys;
pub mod mock;
pub mod pool;
pub mod sdk;
pub mod spool;
pub mod state;
pub mod store;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use self::cache::Cache;
use self::client::{Body, ClientError, ClientResult, Condition, Failure, Metadata, ObjectClient};
use self::pool::Pool;
use self::spool::Spool;
use self::state::{Journaled, LocalState, Record};

pub use self::store::S3Store;

/// Parts of a multipart upload, at most (S3's limit).
pub const MAX_PARTS: usize = 10_000;
/// The smallest part S3 takes (but the last).
pub const MIN_PART: u64 = 5 << 20;

fn default_part_size() -> u64 {
    8 << 20
}
fn default_cache_bytes() -> u64 {
    1 << 30
}
fn default_spool_bytes() -> u64 {
    16 << 30
}
fn default_parts_in_flight() -> usize {
    4
}
fn default_metadata_ttl() -> f64 {
    1.0
}
fn default_timeout() -> f64 {
    30.0
}
fn default_connect_timeout() -> f64 {
    5.0
}
fn default_attempts() -> u32 {
    4
}
fn default_events_poll() -> f64 {
    0.25
}

/// A size in the configuration: a number of bytes, or a string like `"8Mi"`.
fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        N(u64),
        S(String),
    }
    match Size::deserialize(d)? {
        Size::N(n) => Ok(n),
        Size::S(s) => crate::cli::parse_size(&s).map_err(serde::de::Error::custom),
    }
}

/// An S3 store's configuration: the daemon config's `{"s3": {...}}`, or the query of a
/// `--store s3://bucket/prefix?part_size=16Mi` URL.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// Keys start with `<prefix>/` (none: at the bucket's root).
    #[serde(default)]
    pub prefix: String,
    /// The endpoint URL; default from `AWS_ENDPOINT_URL`, profiles, or AWS's own.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Default from `AWS_REGION`, profiles, else `us-east-1`.
    #[serde(default)]
    pub region: Option<String>,
    /// A PEM file of CA certificates to trust for an `https` endpoint besides the system's (a
    /// private CA's); default from `AWS_CA_BUNDLE`.
    #[serde(default)]
    pub ca_bundle: Option<PathBuf>,
    /// Bytes of each part of a multipart upload (5 MiB to 5 GiB); files smaller than this are
    /// one PUT.
    #[serde(default = "default_part_size", deserialize_with = "de_size")]
    pub part_size: u64,
    /// Where the spool, cache and journal live (default `<data dir>/s3/<store>`).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Bytes the read cache holds, at most.
    #[serde(default = "default_cache_bytes", deserialize_with = "de_size")]
    pub cache_bytes: u64,
    /// Bytes of working copies the spool holds, at most (past it, writes fail with ENOSPC).
    #[serde(default = "default_spool_bytes", deserialize_with = "de_size")]
    pub spool_bytes: u64,
    /// Part uploads (and other background requests) in flight at once.
    #[serde(default = "default_parts_in_flight")]
    pub parts_in_flight: usize,
    /// Seconds the store trusts what it learnt of an entry (stat, listing) before asking again.
    #[serde(default = "default_metadata_ttl")]
    pub metadata_ttl_secs: f64,
    /// Seconds one attempt of a request may take.
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
    /// Seconds to connect, at most.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: f64,
    /// Attempts of each request (the first one and its retries).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Seconds between two looks at the change feed of each open space in the bucket, for
    /// other hosts' changes (each look is one GET; see `events::bucket`).
    #[serde(default = "default_events_poll")]
    pub events_poll_secs: f64,
}

impl S3Config {
    /// A configuration with the defaults, for `bucket` and `prefix`.
    pub fn new(bucket: &str, prefix: &str) -> S3Config {
        S3Config {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: None,
            region: None,
            ca_bundle: None,
            part_size: default_part_size(),
            cache_dir: None,
            cache_bytes: default_cache_bytes(),
            spool_bytes: default_spool_bytes(),
            parts_in_flight: default_parts_in_flight(),
            metadata_ttl_secs: default_metadata_ttl(),
            timeout_secs: default_timeout(),
            connect_timeout_secs: default_connect_timeout(),
            attempts: default_attempts(),
            events_poll_secs: default_events_poll(),
        }
    }

    /// Parses `s3://bucket/prefix?name=value&...` (names as in the JSON configuration).
    pub fn from_url(url: &str) -> Result<S3Config, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("store {url:?}: expected local or s3://BUCKET/PREFIX"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty() {
            return Err(format!("store {url:?}: no bucket (s3://BUCKET/PREFIX)"));
        }
        let mut map = serde_json::Map::new();
        map.insert("bucket".into(), bucket.into());
        map.insert("prefix".into(), prefix.into());
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("store {url:?}: {pair:?} is not NAME=VALUE"))?;
            let value = match name {
                "endpoint" | "region" | "ca_bundle" | "cache_dir" | "part_size" | "cache_bytes"
                | "spool_bytes" => serde_json::Value::from(value),
                _ => serde_json::from_str(value).unwrap_or_else(|_| value.into()),
            };
            map.insert(name.to_string(), value);
        }
        let config: S3Config = serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| format!("store {url:?}: {e}"))?;
        config.check().map_err(|e| format!("store {url:?}: {e}"))?;
        Ok(config)
    }

    /// Checks what serde cannot.
    pub fn check(&self) -> Result<(), String> {
        let valid_bucket = (3..=63).contains(&self.bucket.len())
            && self
                .bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_bucket {
            return Err(format!(
                "bucket {:?}: 3-63 characters of a-z 0-9 . -",
                self.bucket
            ));
        }
        keys::normalize_prefix(&self.prefix)?;
        if !(MIN_PART..=5 << 30).contains(&self.part_size) {
            return Err(format!(
                "part_size must be between 5 MiB and 5 GiB, not {}",
                self.part_size
            ));
        }
        if !(1..=64).contains(&self.parts_in_flight) {
            return Err(format!(
                "parts_in_flight must be between 1 and 64, not {}",
                self.parts_in_flight
            ));
        }
        for (name, v) in [
            ("metadata_ttl_secs", self.metadata_ttl_secs),
            ("timeout_secs", self.timeout_secs),
            ("connect_timeout_secs", self.connect_timeout_secs),
        ] {
            if !(v.is_finite() && (0.0..=3600.0).contains(&v)) {
                return Err(format!("{name} must be between 0 and 3600, not {v}"));
            }
        }
        if !(self.events_poll_secs.is_finite() && (0.01..=60.0).contains(&self.events_poll_secs)) {
            return Err(format!(
                "events_poll_secs must be between 0.01 and 60, not {}",
                self.events_poll_secs
            ));
        }
        if self.timeout_secs == 0.0 || self.connect_timeout_secs == 0.0 {
            return Err("timeouts must be more than 0".into());
        }
        if !(1..=20).contains(&self.attempts) {
            return Err(format!(
                "attempts must be between 1 and 20, not {}",
                self.attempts
            ));
        }
        if let Some(e) = &self.endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(format!(
                "endpoint {e:?}: expected http://HOST:PORT or https://..."
            ));
        }
        Ok(())
    }

    /// `s3://bucket/prefix`: what names this store.
    pub fn url(&self) -> String {
        let prefix = keys::normalize_prefix(&self.prefix).unwrap_or_default();
        if prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{prefix}", self.bucket)
        }
    }

    fn connection(&self) -> sdk::Connection {
        sdk::Connection {
            bucket: self.bucket.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            connect_timeout: Duration::from_secs_f64(self.connect_timeout_secs),
            attempt_timeout: Duration::from_secs_f64(self.timeout_secs),
            attempts: self.attempts,
            credentials: None,
            ca_bundle: self.ca_bundle.clone().or_else(|| {
                std::env::var_os("AWS_CA_BUNDLE")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            }),
        }
    }
}

/// What every space of one S3 store shares in a process: the client, the spool, the cache,
/// the part threads and the journal.
pub struct Shared {
    pub client: Arc<dyn ObjectClient>,
    pub config: S3Config,
    /// The key prefix, normalized (no leading or trailing `/`).
    pub prefix: String,
    pub part_size: u64,
    pub spool: Spool,
    pub cache: Cache,
    pub pool: Pool,
    /// Threads that fetch the next window of sequential readers (see `content`): apart from
    /// `pool`, whose jobs may wait on such a fetch, and long-lived, as each thread has its
    /// own S3 client and connections (see `sdk`).
    pub readers: Pool,
    pub state: LocalState,
    /// The store honours `If-None-Match`/`If-Match` (probed at start).
    pub conditional: bool,
    /// How long what the store learnt of an entry is trusted.
    pub metadata_ttl: Duration,
    /// Where the store is, for messages.
    pub location: String,
    /// The lineage of object versions this process learnt ((key, ETag) → lineage, see
    /// `content`).
    pub lineages: std::sync::Mutex<std::collections::HashMap<(String, String), String>>,
    /// The size of each file as this process last told it (key → bytes): what the kernel
    /// believes, which a reader at its version's end may already read up to (see `content`).
    pub sizes_told: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Commits made by this process so far, counted by key in `COMMIT_COUNTERS` slots (a
    /// reader asks for a newer version again at once after a commit to its key: see
    /// [`Shared::commits_to`]).
    commits: [std::sync::atomic::AtomicU64; COMMIT_COUNTERS],
    /// Uploads whose abort failed, for the janitor.
    aborts: std::sync::Mutex<Vec<(String, String, Journaled)>>,
    /// Renames of this process that failed part-way, to finish (see [`Shared::settle`]).
    unfinished: std::sync::Mutex<Vec<Unfinished>>,
    /// Whether `unfinished` holds any (read by every operation, locked by none then).
    any_unfinished: std::sync::atomic::AtomicBool,
    /// Signalled when a finisher of an unfinished rename is done with it.
    unfinished_tried: std::sync::Condvar,
}

/// A rename of this process that failed part-way: the store stopped answering between its
/// copies and deletes, so both names hold part of what was renamed. Its journal record stays
/// (a restart finishes it, as after a crash), and while the process runs it is finished as
/// soon as the store answers: by the janitor, or first by the next operation on a name it
/// touches, which waits for that (see [`Shared::settle`]) — nothing works in a half-renamed
/// tree meanwhile, and a program trying again (coreutils `mv` moves into a target directory
/// it finds) does not nest one half in the other.
struct Unfinished {
    id: u64,
    record: Record,
    /// When the rename began, by this host's clock (see `store::finish_rename`).
    began: std::time::SystemTime,
    journal: Journaled,
    /// A finisher is at work on it.
    busy: bool,
    /// No new try before then: each try against a store that does not answer takes its
    /// timeouts.
    next_try: std::time::Instant,
}

/// How long after a failed try an unfinished rename is tried again.
const UNFINISHED_RETRY: Duration = Duration::from_secs(1);

/// A journaled rename in flight (see [`Shared::journal_rename`]).
pub struct RenameInFlight<'a> {
    shared: &'a Shared,
    record: Record,
    began: std::time::SystemTime,
    journal: Option<Journaled>,
}

impl RenameInFlight<'_> {
    /// The rename is done: forget it.
    pub fn done(mut self) {
        if let Some(journal) = self.journal.take() {
            journal.done();
        }
    }
}

impl Drop for RenameInFlight<'_> {
    /// Dropped without [`RenameInFlight::done`]: an error part-way; kept to be finished.
    fn drop(&mut self) {
        if let Some(journal) = self.journal.take() {
            self.shared
                .keep_unfinished(self.record.clone(), self.began, journal);
        }
    }
}

/// The user metadata naming an object's lineage: the versions made from one whole commit by
/// appends only (see `content`).
pub const LINEAGE: &str = "roomfs-lineage";

/// Slots the commits of a process are counted in, by key (keys sharing a slot only make
/// readers ask a little more often).
const COMMIT_COUNTERS: usize = 256;

impl Shared {
    fn commit_slot(&self, key: &str) -> &std::sync::atomic::AtomicU64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        &self.commits[h.finish() as usize % COMMIT_COUNTERS]
    }

    /// How many commits to `key` (or to keys sharing its slot) this process has made.
    pub fn commits_to(&self, key: &str) -> u64 {
        self.commit_slot(key)
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts a commit to `key`.
    pub fn committed_to(&self, key: &str) {
        self.commit_slot(key)
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A new lineage name (random enough never to meet another host's).
    pub fn new_lineage(&self) -> String {
        use sha2::Digest;
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut h = sha2::Sha256::new();
        h.update(std::process::id().to_le_bytes());
        h.update(
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .to_le_bytes(),
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        h.update(now.to_le_bytes());
        h.update(self.location.as_bytes());
        h.update(format!("{:p}", self).as_bytes());
        h.finalize()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Remembers the lineage of version `etag` of `key` (from its metadata). By key and
    /// ETag: a single PUT's ETag is the MD5 of its bytes, so files with the same bytes share
    /// it, each with a lineage of its own.
    pub fn learn_lineage(&self, key: &str, etag: &str, metadata: &Metadata) {
        if let Some(l) = metadata.get(LINEAGE) {
            let mut map = self.lineages.lock().unwrap_or_else(|e| e.into_inner());
            if map.len() > 100_000 {
                map.clear();
            }
            map.insert((key.to_string(), etag.to_string()), l.clone());
        }
    }

    /// Notes that `key` was last said to have `size` bytes.
    pub fn told_size(&self, key: &str, size: u64) {
        let mut sizes = self.sizes_told.lock().unwrap_or_else(|e| e.into_inner());
        if sizes.len() > 100_000 {
            sizes.clear();
        }
        sizes.insert(key.to_string(), size);
    }

    /// The size `key` was last said to have, if remembered.
    pub fn size_told(&self, key: &str) -> Option<u64> {
        let sizes = self.sizes_told.lock().unwrap_or_else(|e| e.into_inner());
        sizes.get(key).copied()
    }

    /// The lineage of version `etag` of `key`, if known.
    pub fn lineage_of(&self, key: &str, etag: &str) -> Option<String> {
        self.lineages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(key.to_string(), etag.to_string()))
            .cloned()
    }

    /// Starts a multipart upload of `key`, recorded in the journal before anything is
    /// uploaded to it.
    pub fn create_upload(
        &self,
        key: &str,
        metadata: &Metadata,
    ) -> ClientResult<(String, Journaled)> {
        let id = self.client.create_upload(key, metadata)?;
        let record = Record::Upload {
            key: key.to_string(),
            upload_id: id.clone(),
        };
        match self.state.journal(&record) {
            Ok(j) => Ok((id, j)),
            Err(e) => {
                let _ = self.client.abort_upload(key, &id);
                Err(ClientError::with_source(
                    Failure::Other,
                    format!("journal of the upload of {key}"),
                    e,
                ))
            }
        }
    }

    /// Aborts an upload now; its journal record goes once it is aborted.
    pub fn abort_upload(&self, key: &str, upload_id: &str, journal: Journaled) {
        match self.client.abort_upload(key, upload_id) {
            Ok(()) => journal.done(),
            Err(e) => {
                log::warn!("aborting the upload of {key} failed ({e}); trying again later");
                self.retry_abort(key.to_string(), upload_id.to_string(), journal);
            }
        }
    }

    /// Aborts an upload on a part thread.
    pub fn abort_upload_later(
        self: &Arc<Self>,
        key: String,
        upload_id: String,
        journal: Journaled,
    ) {
        let me = Arc::downgrade(self);
        self.pool.run(move || {
            if let Some(me) = me.upgrade() {
                me.abort_upload(&key, &upload_id, journal);
            }
        });
    }

    /// Journals `record`, a rename about to begin: what it returns must be marked done when
    /// the rename is; dropped without, it is finished later (see [`Unfinished`]).
    pub fn journal_rename(&self, record: Record) -> std::io::Result<RenameInFlight<'_>> {
        let journal = self.state.journal(&record)?;
        Ok(RenameInFlight {
            shared: self,
            record,
            began: std::time::SystemTime::now(),
            journal: Some(journal),
        })
    }

    fn keep_unfinished(&self, record: Record, began: std::time::SystemTime, journal: Journaled) {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        log::warn!(
            "{record:?} failed part-way; it is finished when the store answers again, before \
             anything else is done to its names"
        );
        let mut list = self.unfinished.lock().unwrap_or_else(|e| e.into_inner());
        list.push(Unfinished {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            record,
            began,
            journal,
            busy: false,
            next_try: std::time::Instant::now(),
        });
        self.any_unfinished.store(true, Ordering::Release);
    }

    /// Whether renames of this process failed part-way and are not finished yet.
    pub fn has_unfinished(&self) -> bool {
        self.any_unfinished
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Finishes every unfinished rename `touches` picks (one whose names are those an
    /// operation is about to work on), and returns them: `Ok` once none is left to pick. A
    /// rename another thread is finishing is waited for; one that failed to finish less than
    /// [`UNFINISHED_RETRY`] ago fails the call with `EIO` at once: its names are half renamed,
    /// and the store did not answer a moment ago.
    pub fn settle(
        self: &Arc<Self>,
        touches: &dyn Fn(&Record) -> bool,
    ) -> Result<Vec<Record>, crate::store::StoreError> {
        use std::sync::atomic::Ordering;
        let mut finished = Vec::new();
        loop {
            let (id, record, began) = {
                let mut list = self.unfinished.lock().unwrap_or_else(|e| e.into_inner());
                while list.iter().any(|u| u.busy && touches(&u.record)) {
                    list = self
                        .unfinished_tried
                        .wait(list)
                        .unwrap_or_else(|e| e.into_inner());
                }
                let Some(u) = list.iter_mut().find(|u| touches(&u.record)) else {
                    return Ok(finished);
                };
                if std::time::Instant::now() < u.next_try {
                    return Err(crate::store::StoreError::failed(
                        libc::EIO,
                        "a rename that failed part-way",
                        std::io::Error::other(
                            "it is not finished yet: the store has not answered since",
                        ),
                    ));
                }
                u.busy = true;
                (u.id, u.record.clone(), u.began)
            };
            let result = store::replay(self, &record, Some(began));
            let mut list = self.unfinished.lock().unwrap_or_else(|e| e.into_inner());
            self.unfinished_tried.notify_all();
            let Some(i) = list.iter().position(|u| u.id == id) else {
                continue;
            };
            match result {
                Ok(_) => {
                    let u = list.remove(i);
                    self.any_unfinished
                        .store(!list.is_empty(), Ordering::Release);
                    drop(list);
                    u.journal.done();
                    log::info!("finished {record:?}, which had failed part-way");
                    finished.push(record);
                }
                Err(e) => {
                    list[i].busy = false;
                    list[i].next_try = std::time::Instant::now() + UNFINISHED_RETRY;
                    return Err(e);
                }
            }
        }
    }

    /// Keeps an upload whose abort failed (the store was unreachable) for the janitor, which
    /// tries again every few seconds while the process runs; the journal keeps it across a
    /// restart.
    fn retry_abort(&self, key: String, upload_id: String, journal: Journaled) {
        self.aborts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((key, upload_id, journal));
    }
}

/// How often the janitor tries again to abort uploads whose abort failed.
const JANITOR_EVERY: Duration = Duration::from_secs(2);

/// Starts the thread that aborts again, while the store lives, the uploads whose abort failed,
/// and finishes the renames that failed part-way.
fn start_janitor(shared: &Arc<Shared>) {
    let weak = Arc::downgrade(shared);
    let spawned = std::thread::Builder::new()
        .name("roomfs-s3-janitor".into())
        .spawn(move || {
            loop {
                std::thread::sleep(JANITOR_EVERY);
                let Some(shared) = weak.upgrade() else { return };
                let pending =
                    std::mem::take(&mut *shared.aborts.lock().unwrap_or_else(|e| e.into_inner()));
                for (key, id, journal) in pending {
                    match shared.client.abort_upload(&key, &id) {
                        Ok(()) => {
                            log::info!("aborted the upload of {key} left by a failed commit");
                            journal.done();
                        }
                        Err(_) => shared.retry_abort(key, id, journal),
                    }
                }
                if shared.has_unfinished()
                    && let Err(e) = shared.settle(&|_| true)
                {
                    log::debug!("renames that failed part-way are not finished yet: {e}");
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("no janitor thread ({e}): failed aborts wait for the next start");
    }
}

/// Where an S3 store keeps its local state by default: `<data dir>/s3/<bucket>-<hash>`, one
/// directory per store (endpoint, bucket and prefix).
fn default_state_dir(data_dir: &Path, config: &S3Config, endpoint: &str) -> PathBuf {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(endpoint.as_bytes());
    h.update([0]);
    h.update(config.url().as_bytes());
    let hash: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    data_dir
        .join("s3")
        .join(format!("{}-{hash}", config.bucket))
}

/// Checks whether the store honours conditional writes (see doc/S3.md for what is lost when
/// it does not): a PUT with `If-None-Match: *` on a key that exists and one with `If-Match`
/// on a wrong ETag must both be refused.
fn probe_conditions(client: &dyn ObjectClient, prefix: &str) -> ClientResult<bool> {
    let key = format!(
        "{}.roomfs-probe/{}-{}",
        if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        },
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let body = || Body::Bytes(Arc::new(b"probe".to_vec()));
    client.put(&key, body(), &Metadata::new(), &Condition::Absent)?;
    let absent = client.put(&key, body(), &Metadata::new(), &Condition::Absent);
    let matches = client.put(
        &key,
        body(),
        &Metadata::new(),
        &Condition::Matches("\"00000000000000000000000000000000\"".into()),
    );
    let _ = client.delete(&key);
    let refused = |r: &ClientResult<String>| matches!(r, Err(e) if e.is(Failure::Precondition) || e.is(Failure::Conflict));
    match (&absent, &matches) {
        (Err(e), _) | (_, Err(e)) if !e.is(Failure::Precondition) && !e.is(Failure::Conflict) => {
            Err(ClientError::new(e.failure, e.what.clone()))
        }
        _ => Ok(refused(&absent) && refused(&matches)),
    }
}

/// The spaces of one S3 store (see `S3Spaces` in `store`).
pub use self::store::S3Spaces;

/// Opens the S3 store `config` for a process whose data dir is `data_dir`: connects, checks
/// the bucket, probes conditional writes, and replays what a crashed process left. The error
/// is one sentence for the user.
pub fn open(config: &S3Config, data_dir: &Path) -> Result<S3Spaces, String> {
    config.check()?;
    let client = sdk::SdkClient::connect(&config.connection())?;
    let endpoint = client.endpoint().to_string();
    if let Err(e) = client.check_bucket() {
        return Err(match e.failure {
            Failure::NoBucket => format!("bucket {:?} does not exist at {endpoint}", config.bucket),
            Failure::Denied => format!(
                "access to bucket {:?} at {endpoint} was refused (check the credentials): {e}",
                config.bucket
            ),
            Failure::Unavailable if e.to_string().contains("certificate") => format!(
                "cannot reach the S3 endpoint {endpoint}: its TLS certificate is not trusted \
                 (from a private CA? give the CA's certificate in AWS_CA_BUNDLE or the store's \
                 ca_bundle): {e}"
            ),
            Failure::Unavailable => format!("cannot reach the S3 endpoint {endpoint}: {e}"),
            _ => format!("bucket {:?} at {endpoint}: {e}", config.bucket),
        });
    }
    let state_dir = config
        .cache_dir
        .clone()
        .unwrap_or_else(|| default_state_dir(data_dir, config, &endpoint));
    let location = format!("{} at {endpoint}", config.url());
    open_with(Arc::new(client), config, &state_dir, location)
}

/// [`open`] over any client (the tests use the in-memory one).
pub fn open_with(
    client: Arc<dyn ObjectClient>,
    config: &S3Config,
    state_dir: &Path,
    location: String,
) -> Result<S3Spaces, String> {
    config.check()?;
    let prefix = keys::normalize_prefix(&config.prefix)?;
    let (state, leftovers) = LocalState::open(state_dir).map_err(|e| {
        format!(
            "cannot prepare the S3 store's local state in {}: {e}",
            state_dir.display()
        )
    })?;
    let conditional = probe_conditions(client.as_ref(), &prefix)
        .map_err(|e| format!("{location}: writing a probe object failed: {e}"))?;
    if !conditional {
        log::warn!(
            "{location} ignores conditional writes (If-None-Match, If-Match): O_EXCL and \
             RENAME_NOREPLACE are checked before writing, which races with other hosts, and \
             appends from two hosts can lose one host's bytes (see doc/S3.md)"
        );
    }
    let spool = Spool::new(state.spool_dir(), config.spool_bytes);
    let cache = Cache::new(state.cache_dir(), config.cache_bytes)
        .map_err(|e| format!("cannot make the cache in {}: {e}", state_dir.display()))?;
    let pool = Pool::new(config.parts_in_flight, "roomfs-s3-part")
        .map_err(|e| format!("cannot start the part threads: {e}"))?;
    let readers = Pool::new(config.parts_in_flight, "roomfs-s3-read")
        .map_err(|e| format!("cannot start the read-ahead threads: {e}"))?;
    let shared = Arc::new(Shared {
        client,
        config: config.clone(),
        prefix,
        part_size: config.part_size,
        spool,
        cache,
        pool,
        readers,
        state,
        conditional,
        metadata_ttl: Duration::from_secs_f64(config.metadata_ttl_secs),
        location,
        lineages: Default::default(),
        sizes_told: Default::default(),
        commits: std::array::from_fn(|_| Default::default()),
        aborts: Default::default(),
        unfinished: Default::default(),
        any_unfinished: Default::default(),
        unfinished_tried: Default::default(),
    });
    start_janitor(&shared);
    let spaces = S3Spaces::new(shared);
    spaces.recover(leftovers);
    Ok(spaces)
}

/// A room of an S3 store over an in-memory bucket, for tests: 5 MiB parts, local state in
/// `dir`; returns the bucket too.
#[cfg(test)]
pub fn test_store(dir: &Path) -> (Arc<mock::MemClient>, Arc<dyn crate::store::Store>) {
    let client = Arc::new(mock::MemClient::new());
    (client.clone(), test_store_on(client, dir, "r"))
}

/// Another host's view of room `room` in the same in-memory bucket (its own state in `dir`).
#[cfg(test)]
pub fn test_store_on(
    client: Arc<mock::MemClient>,
    dir: &Path,
    room: &str,
) -> Arc<dyn crate::store::Store> {
    use crate::space::Spaces;
    let mut config = S3Config::new("test-bucket", "p");
    config.part_size = MIN_PART;
    config.cache_bytes = 256 << 20;
    let spaces = open_with(client, &config, dir, "memory".into()).unwrap();
    let id = crate::space::SpaceId::new(crate::space::SpaceKind::Room, room).unwrap();
    spaces.open_space(&id, Some(None)).unwrap()
}
