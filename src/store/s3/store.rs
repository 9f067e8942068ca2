//! One space in an S3 bucket, as a [`Store`]; and the spaces of one bucket ([`S3Spaces`]).
//!
//! - **Entries**: a file, symlink, FIFO or socket is an object; a directory is a key prefix,
//!   with a marker object (`<dir>/`) when made by `mkdir`, so that it exists while empty.
//!   Attributes: see `attrs`. A name that is both an object and a prefix (made by another tool)
//!   is shown as the file.
//! - **What the store remembers**: entries it stat'ed or listed, for `metadata_ttl` (1 s), and
//!   each directory's index with its ETag. Its own changes update what it remembers at once.
//! - **Names**: `O_EXCL` creates, `mkdir`, `symlink` and `RENAME_NOREPLACE` are PUTs and copies
//!   with `If-None-Match: *`, so of two hosts exactly one succeeds (the other gets `EEXIST`).
//!   A file rename is a server-side copy and a delete; a directory rename copies and deletes
//!   every object below it; both are journaled so that a crash is finished at the next start
//!   (not atomic: see doc/S3.md). One that fails part-way is finished as soon as the store
//!   answers, and before anything else is done to its names: every operation first settles
//!   the unfinished renames at its path (`settled`, `Shared::settle`), so none works in a
//!   half-moved tree. `RENAME_EXCHANGE` and hard links are refused (`EINVAL`, `EPERM`).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use super::Shared;
use super::attrs::{Attrs, Defaults, Index, IndexEntry, to_second};
use super::client::{Body, Condition, Failure, ListedObject, Metadata};
use super::content::S3Content;
use super::keys::{INDEX, SpaceKeys, listed_name};
use super::spool::SpoolCopy;
use super::state::{Leftover, Record};
use crate::events::bucket::{BucketFeeds, remove_feed};
use crate::events::{ChangeFeed, Retention};
use crate::space::{SpaceId, Spaces};
use crate::store::{
    Capabilities, CommitRequest, Committed, Content, DirEntry, Kind, Meta, Owner, RenameMode,
    SetAttr, Store, StoreError, StoreResult, StoreStatfs, TimeSpec, Usage, Version, WorkingCopy,
    XattrMode,
};

fn err(errno: i32) -> StoreError {
    StoreError::errno(errno)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tries of a read-modify-write of an index before giving up.
const INDEX_TRIES: u32 = 16;
/// The largest index read (a bigger one is hostile).
const INDEX_MAX: usize = 64 << 20;

struct CachedIndex {
    /// Its ETag (`None`: there is none).
    etag: Option<String>,
    index: Arc<Index>,
    at: Instant,
}

/// Entries of the directory indexes every S3 store of the process keeps, at most (past it, a
/// store keeping one more index first drops its others; a listing's attributes then cost a
/// GET of the index again). Indexes are objects anyone writing the bucket can make, of up to
/// `INDEX_MAX` bytes and a million entries each: without a bound over all of them, a few
/// thousand directories with large indexes would take the daemon's memory. Two million
/// entries are some hundreds of MB; an agent's directories hold far fewer.
const INDEX_ENTRIES_KEPT: usize = 2 << 20;

/// Entries of the indexes kept now, over every store.
static INDEX_ENTRIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The indexes one store keeps, counting their entries in `total` (of every store:
/// [`INDEX_ENTRIES`]), at most `limit` there.
struct IndexCache {
    map: HashMap<PathBuf, CachedIndex>,
    entries: usize,
    total: &'static std::sync::atomic::AtomicUsize,
    limit: usize,
}

impl Default for IndexCache {
    fn default() -> IndexCache {
        IndexCache::counted_in(&INDEX_ENTRIES, INDEX_ENTRIES_KEPT)
    }
}

impl IndexCache {
    fn counted_in(total: &'static std::sync::atomic::AtomicUsize, limit: usize) -> IndexCache {
        IndexCache {
            map: HashMap::new(),
            entries: 0,
            total,
            limit,
        }
    }

    fn get(&self, dir: &Path) -> Option<&CachedIndex> {
        self.map.get(dir)
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    /// Keeps `cached` as the index of `dir`; first drops this store's others if the entries
    /// kept would be more than the limit.
    fn insert(&mut self, dir: PathBuf, cached: CachedIndex) {
        use std::sync::atomic::Ordering;
        let n = cached.index.entries.len();
        self.remove(&dir);
        if self.total.load(Ordering::Relaxed) + n > self.limit {
            self.map.clear();
            self.dropped(self.entries);
        }
        self.map.insert(dir, cached);
        self.entries += n;
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    fn remove(&mut self, dir: &Path) {
        if let Some(old) = self.map.remove(dir) {
            self.dropped(old.index.entries.len());
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&Path, &CachedIndex) -> bool) {
        let mut gone = 0;
        self.map.retain(|dir, c| {
            let kept = keep(dir, c);
            if !kept {
                gone += c.index.entries.len();
            }
            kept
        });
        self.dropped(gone);
    }

    fn dropped(&mut self, n: usize) {
        self.entries -= n;
        self.total
            .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for IndexCache {
    fn drop(&mut self) {
        self.total
            .fetch_sub(self.entries, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
#[test]
fn the_indexes_kept_are_bounded_in_entries_over_every_store() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static TOTAL: AtomicUsize = AtomicUsize::new(0);
    let cached = |n: usize| CachedIndex {
        etag: None,
        index: Arc::new(Index {
            v: 1,
            entries: (0..n)
                .map(|i| (i.to_string(), IndexEntry::default()))
                .collect(),
        }),
        at: Instant::now(),
    };
    let mut a = IndexCache::counted_in(&TOTAL, 100);
    let mut b = IndexCache::counted_in(&TOTAL, 100);
    a.insert("d1".into(), cached(30));
    a.insert("d2".into(), cached(30));
    a.insert("d2".into(), cached(20)); // replaced: counted once
    b.insert("e1".into(), cached(40));
    assert_eq!(TOTAL.load(Ordering::Relaxed), 90);
    // One more past the limit: the store keeping it drops its others.
    b.insert("e2".into(), cached(20));
    assert_eq!((b.len(), TOTAL.load(Ordering::Relaxed)), (1, 70));
    a.insert("d3".into(), cached(50));
    assert_eq!((a.len(), TOTAL.load(Ordering::Relaxed)), (1, 70));
    a.retain(|_, _| false);
    a.insert("d4".into(), cached(5));
    a.remove(Path::new("d4"));
    assert_eq!(TOTAL.load(Ordering::Relaxed), 20);
    drop(b);
    assert_eq!(TOTAL.load(Ordering::Relaxed), 0);
}

/// One space in the bucket (see the module docs).
pub struct S3Store {
    shared: Arc<Shared>,
    keys: SpaceKeys,
    defaults: Defaults,
    metas: Mutex<HashMap<PathBuf, (Instant, Option<Meta>)>>,
    indexes: Mutex<IndexCache>,
    /// Directories wholly known from a listing: when it started, and the names in it (kept
    /// up to date with this store's own changes).
    listings: Mutex<HashMap<PathBuf, (Instant, std::collections::HashSet<String>)>>,
    /// Directories whose listing took more than one page, and when that was seen: a name
    /// looked up in vain there is asked about alone (see `lookup`).
    large_dirs: Mutex<HashMap<PathBuf, Instant>>,
    /// Directories whose names lookups asked the store about one by one lately: since when,
    /// and how many (see `crowded`).
    asked: Mutex<HashMap<PathBuf, (Instant, u32)>>,
    /// Large directories whose names lookups asked about in the order of their keys lately:
    /// when the last was asked, which it was, and how many in a row (see `walking`).
    walks: Mutex<HashMap<PathBuf, (Instant, String, u32)>>,
    /// Attributes this store set on a file (chmod, chown, times, set-IDs dropped at a write):
    /// the ETag of the version they were set on, and the entry after. A commit whose base is
    /// that version carries them, not the base's as it was opened (see `commit`).
    attrs_set: Mutex<HashMap<PathBuf, (String, Meta)>>,
    /// Files made by `create_held` that the open holding them has not committed yet
    /// (`Capabilities::created_at_commit`): no object yet; this process shows them.
    pending: Mutex<HashMap<PathBuf, Meta>>,
    /// Pending files whose name another host told of a file at since (see `pending`).
    contested: Mutex<std::collections::HashSet<PathBuf>>,
    /// When this store made the versions it wrote (the ETag, and this host's clock then): the
    /// time it showed for them at once, kept once what it remembered of the entry expires, so
    /// that a file's times on this host do not move when the store is asked again (its
    /// `Last-Modified` is stamped by the store's clock, in the middle of the request). Other
    /// hosts see the `Last-Modified`.
    stamped: Mutex<HashMap<PathBuf, Stamp>>,
    /// When this store last changed what it knows of each path (its own change, or a
    /// `forget`), and of each tree (a directory renamed or removed, `forget_below`): the
    /// store's answer to a request made before that is older than what this store knows, and
    /// is not remembered over it (see `answered`). Kept for `CHANGED_FOR`.
    changed: Mutex<Changed>,
}

#[derive(Default)]
struct Changed {
    paths: HashMap<PathBuf, Instant>,
    trees: HashMap<PathBuf, Instant>,
}

/// How long a change is kept in `S3Store::changed`: longer than a request takes (a request
/// answered later than this after a change may be remembered over it).
const CHANGED_FOR: Duration = Duration::from_secs(600);

impl Changed {
    fn note(map: &mut HashMap<PathBuf, Instant>, path: &Path) {
        if map.len() >= 10_000 {
            map.retain(|_, at| at.elapsed() < CHANGED_FOR);
        }
        map.insert(path.to_path_buf(), Instant::now());
    }

    /// Whether `path`, or a tree holding it, changed after `asked`.
    fn since(&self, path: &Path, asked: Instant) -> bool {
        self.paths.get(path).is_some_and(|at| *at > asked)
            || path
                .ancestors()
                .any(|p| self.trees.get(p).is_some_and(|at| *at > asked))
    }
}

/// A version this store made (see `S3Store::stamped`): its ETag, this host's clock when it
/// made it, and the `Last-Modified` the store first reported for it. Another host writing
/// the same bytes makes an object with the same ETag (a single PUT's is the MD5 of its
/// bytes) and a later `Last-Modified`: the stamp is then no longer the object's.
#[derive(Clone, Debug)]
struct Stamp {
    etag: String,
    at: SystemTime,
    seen: Option<SystemTime>,
}

impl Stamp {
    /// Whether it is the stamp of the object reported with `etag` and `last_modified`.
    fn fits(&self, etag: &str, last_modified: SystemTime) -> bool {
        self.etag == etag.trim_matches('"')
            && self
                .seen
                .is_none_or(|seen| to_second(seen) == to_second(last_modified))
    }
}

/// How long ago a file must have been modified for a rename to keep its mtime. The copy a
/// rename makes is a new object whose `Last-Modified` is the rename's time; keeping the old
/// mtime costs an index entry (a conditional GET and PUT of the directory's index, and an
/// entry that stays). A file renamed right after it was written, as atomic saves do (write a
/// temporary file, rename it over the target: editors, git, most tools' safe writes), takes
/// the rename's time instead: later than its own by about this much at most (the times are
/// whole seconds), never earlier on this host.
const KEEP_MTIME_AFTER: Duration = Duration::from_secs(2);

/// How long a directory seen to take more than one page of a listing is taken for one (see
/// `lookup`); a listing of it meanwhile says again.
const LARGE_DIR_FOR: Duration = Duration::from_secs(60);

/// The lookups of names of one directory within a metadata TTL after which the next one lists
/// the directory instead of asking about its name alone (see `crowded`).
pub(super) const LIST_AFTER: u32 = 4;

/// How many directories' listings, and indexes, a store remembers before it drops those past
/// the TTL: a daemon that walks a large room keeps what it may still use, not every directory
/// it ever listed.
pub(super) const REMEMBERED_DIRS: usize = 4096;

/// Whether a file modified at `mtime` keeps it through a rename (see `KEEP_MTIME_AFTER`).
fn keeps_mtime(mtime: SystemTime) -> bool {
    SystemTime::now()
        .duration_since(mtime)
        .is_ok_and(|age| age >= KEEP_MTIME_AFTER)
}

/// The version tag of a file made by `create_held` and not committed yet: never an ETag.
const NEW_TAG: &str = "roomfs-new-";

/// Whether `tag` is that of a file not committed yet.
pub(super) fn is_new_tag(tag: &str) -> bool {
    tag.starts_with(NEW_TAG)
}

/// The directory holding `path` and its name there (the root is `.` of itself).
fn split(path: &Path) -> (PathBuf, String) {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => (parent.to_path_buf(), name.to_string_lossy().into_owned()),
        _ => (PathBuf::new(), ".".to_string()),
    }
}

fn is_root(path: &Path) -> bool {
    path.as_os_str().is_empty()
}

impl S3Store {
    pub(super) fn new(shared: Arc<Shared>, keys: SpaceKeys, defaults: Defaults) -> S3Store {
        S3Store {
            shared,
            keys,
            defaults,
            metas: Mutex::new(HashMap::new()),
            indexes: Mutex::default(),
            listings: Mutex::new(HashMap::new()),
            changed: Mutex::new(Changed::default()),
            large_dirs: Mutex::new(HashMap::new()),
            asked: Mutex::new(HashMap::new()),
            walks: Mutex::new(HashMap::new()),
            attrs_set: Mutex::new(HashMap::new()),
            stamped: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            contested: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// The file made by `create_held` at `path`, not committed yet.
    ///
    /// When another host told of a file at the name since (`Store::forget`), the store is
    /// asked once: an object there now is what the name shows (this host's writer still
    /// commits over it at its close: the last close wins); none means that what it told of
    /// was made before this host's create and removed since (the feed is heard a moment
    /// late): the name is still this host's file.
    fn pending(&self, path: &Path) -> Option<Meta> {
        let meta = lock(&self.pending).get(path).cloned()?;
        if !lock(&self.contested).remove(path) {
            return Some(meta);
        }
        let tag = meta.version.tag().unwrap_or_default().to_string();
        let there = match self.keys.key(path) {
            Ok(key) => match self.shared.client.head(&key) {
                Ok(_) => Ok(true),
                Err(e) if e.is(Failure::NotFound) => Ok(false),
                Err(e) => Err(StoreError::from(e)),
            },
            Err(e) => Err(e),
        };
        match there {
            Ok(false) => Some(meta),
            Ok(true) => {
                self.take_pending(path, &tag);
                None
            }
            Err(e) => {
                log::debug!(
                    "{}: cannot tell whether another host made it: {e}",
                    path.display()
                );
                // Asked again at the next look.
                lock(&self.contested).insert(path.to_path_buf());
                Some(meta)
            }
        }
    }

    /// Drops the pending file made by `create_held` with version `tag` at `path`; whether it
    /// was still pending.
    fn take_pending(&self, path: &Path, tag: &str) -> bool {
        let mut pending = lock(&self.pending);
        let held = pending
            .get(path)
            .is_some_and(|m| m.version.tag() == Some(tag));
        if held {
            pending.remove(path);
        }
        held
    }

    /// The commit of version `tag` made the file at `path`: it is no longer pending.
    pub(super) fn created(&self, path: &Path, tag: &str) {
        self.take_pending(path, tag);
    }

    /// The store failed the first commit of the file made by `create_held` with version `tag`
    /// at `path`: this host no longer answers for it from memory; the store says whether it is
    /// there (a timed-out request may have made it after all).
    pub(super) fn unmade(&self, path: &Path, tag: &str) {
        if self.take_pending(path, tag) {
            S3Store::forget(self, path);
        }
    }

    /// Whether the file made by `create_held` with version `tag` is still to be made at
    /// `path` (not made meanwhile by another open's commit, a rename or a change of its
    /// attributes, nor removed).
    pub(super) fn still_pending(&self, path: &Path, tag: &str) -> bool {
        lock(&self.pending)
            .get(path)
            .is_some_and(|m| m.version.tag() == Some(tag))
    }

    /// Makes the object of a pending file at `path` now (empty, as created), before an
    /// operation that needs it there (a rename, a change of attributes). If another host made
    /// the name meanwhile, theirs stays.
    fn materialize(&self, path: &Path) -> StoreResult<()> {
        let Some(meta) = lock(&self.pending).remove(path) else {
            return Ok(());
        };
        let key = self.keys.key(path)?;
        let attrs = self.meta_attrs(&meta);
        let condition = if self.shared.conditional {
            Condition::Absent
        } else {
            Condition::None
        };
        let mut metadata = attrs.to_metadata();
        metadata.insert(super::LINEAGE.into(), self.shared.new_lineage());
        match self
            .shared
            .client
            .put(&key, Body::empty(), &metadata, &condition)
        {
            Ok(etag) => {
                self.shared.learn_lineage(&key, &etag, &metadata);
                let meta = self.made_meta(path, 0, &etag, &attrs);
                self.remember(path, Some(meta));
                Ok(())
            }
            Err(e) if e.is(Failure::Precondition) || e.is(Failure::Conflict) => {
                self.forget(path);
                Ok(())
            }
            Err(e) => {
                lock(&self.pending).insert(path.to_path_buf(), meta);
                Err(e.into())
            }
        }
    }

    /// Makes the objects of the pending files at and below `path`.
    fn materialize_tree(&self, path: &Path) -> StoreResult<()> {
        let below: Vec<PathBuf> = lock(&self.pending)
            .keys()
            .filter(|p| p.starts_with(path))
            .cloned()
            .collect();
        for p in below {
            self.materialize(&p)?;
        }
        Ok(())
    }

    /// The entry to take the mode, owner and times of a new version of `path` from: `base`,
    /// or what this store set on that very version since it was opened.
    pub(super) fn attrs_base(&self, path: &Path, base: &Meta) -> Meta {
        let mut set = lock(&self.attrs_set);
        match (set.remove(path), base.version.tag()) {
            // (An ETag is quoted or not depending on who reported it.)
            (Some((etag, meta)), Some(tag)) if etag.trim_matches('"') == tag.trim_matches('"') => {
                meta
            }
            _ => base.clone(),
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn keys(&self) -> &SpaceKeys {
        &self.keys
    }

    pub fn defaults(&self) -> &Defaults {
        &self.defaults
    }

    fn fresh(&self, at: Instant) -> bool {
        at.elapsed() < self.shared.metadata_ttl
    }

    /// What the store remembers of `path`, if still fresh: `Some(None)` is "not there".
    pub(super) fn remembered(&self, path: &Path) -> Option<Option<Meta>> {
        if let Some(meta) = self.pending(path) {
            return Some(Some(meta));
        }
        {
            let metas = lock(&self.metas);
            if let Some((at, meta)) = metas.get(path)
                && self.fresh(*at)
            {
                return Some(meta.clone());
            }
        }
        // Not listed in its directory, wholly known: not there.
        let (dir, name) = split(path);
        let listings = lock(&self.listings);
        let (at, names) = listings.get(&dir)?;
        (self.fresh(*at) && !is_root(path) && !names.contains(&name)).then_some(None)
    }

    /// Remembers what this store's own change made of `path` (see `answered` for what the
    /// store says).
    pub(super) fn remember(&self, path: &Path, meta: Option<Meta>) {
        Changed::note(&mut lock(&self.changed).paths, path);
        self.keep(path, meta);
    }

    /// What the store said of `path`, asked at `asked`: remembered, unless this store changed
    /// or forgot `path` since (a HEAD or LIST under way while this host renamed a file over
    /// it would otherwise bring back the old version's size and ETag, for the new inode).
    /// Returns what is known now: the store's answer, or this store's newer knowledge.
    fn answered(&self, path: &Path, meta: Option<Meta>, asked: Instant) -> Option<Meta> {
        if lock(&self.changed).since(path, asked) {
            return match self.remembered(path) {
                Some(newer) => newer,
                None => meta,
            };
        }
        self.keep(path, meta.clone());
        meta
    }

    fn keep(&self, path: &Path, meta: Option<Meta>) {
        {
            let mut metas = lock(&self.metas);
            if metas.len() > 100_000 {
                let ttl = self.shared.metadata_ttl;
                metas.retain(|_, (at, _)| at.elapsed() < ttl);
            }
            metas.insert(path.to_path_buf(), (Instant::now(), meta.clone()));
        }
        if is_root(path) {
            return;
        }
        if let Some(m) = meta.as_ref().filter(|m| m.kind == Kind::File)
            && let Ok(key) = self.keys.key(path)
        {
            self.shared.told_size(&key, m.size);
        }
        let (dir, name) = split(path);
        if let Some((_, names)) = lock(&self.listings).get_mut(&dir) {
            match meta {
                Some(_) => names.insert(name),
                None => names.remove(&name),
            };
        }
    }

    /// Forgets what is known of `path` (and so that its directory is wholly known).
    fn forget(&self, path: &Path) {
        Changed::note(&mut lock(&self.changed).paths, path);
        lock(&self.metas).remove(path);
        lock(&self.listings).remove(&split(path).0);
    }

    /// Another host changed the file at `path`: if this host holds a version it wrote whole in
    /// its cache, and a reader has it open (whom the kernel may serve from that file itself,
    /// passthrough), the bytes another host appended to that version are fetched onto the
    /// file (`Cache::grow_with`), so that reader reads on into them as into this host's own
    /// appends. In the background (a HEAD, then a ranged GET of the new bytes, if the version
    /// now stored is of the same lineage and longer); a change of any other kind, or a failed
    /// request, leaves the file as it is.
    fn follow_appends_elsewhere(&self, path: &Path) {
        let Ok(key) = self.keys().key(path) else {
            return;
        };
        let shared = self.shared().clone();
        let Some(entry) = shared.cache.current(&key) else {
            return;
        };
        // Held by the map and by `entry` here, and read if held by anyone else.
        if !entry.written_here || !entry.is_whole() || !entry.is_read(2) {
            return;
        }
        let Some(lineage) = shared.lineage_of(&key, &entry.etag) else {
            return;
        };
        drop(entry);
        self.catch_up(key, lineage);
    }

    /// A commit of this host appended to a version of `key` of `lineage` that the cache did not
    /// hold whole, while it holds another version of that lineage which this host wrote: an
    /// older one (another of this host's appends to it is being committed at the same moment,
    /// or was heard of from elsewhere), whose file is grown to the current version from the
    /// store (`catch_up`), or one at least `size` bytes long, newer. True in both cases: the
    /// commit leaves that entry in the cache (rather than putting its own there, which would
    /// leave the older entry's readers, which the kernel may serve from its file, behind).
    pub(super) fn keeps_growing(&self, key: &str, lineage: &str, size: u64) -> bool {
        let shared = self.shared();
        let Some(entry) = shared.cache.current(key) else {
            return false;
        };
        if !entry.written_here
            || !entry.is_whole()
            || shared.lineage_of(key, &entry.etag).as_deref() != Some(lineage)
        {
            return false;
        }
        if entry.size < size {
            self.catch_up(key.to_string(), lineage.to_string());
        }
        true
    }

    /// In the background: grows the cache's whole entry of `key` (of `lineage`) to the version
    /// the store holds now, when that is of the same lineage and longer, by fetching the bytes
    /// past the entry's end (`Cache::grow_with`). A failed request leaves the entry as it is;
    /// an entry being grown by a commit of this host is tried again a few times.
    fn catch_up(&self, key: String, lineage: String) {
        let shared = self.shared().clone();
        let runner = shared.clone();
        runner.readers.run(move || {
            let info = match shared.client.head(&key) {
                Ok(info) => info,
                Err(e) => {
                    log::debug!("{key}: not following appends made elsewhere: {e}");
                    return;
                }
            };
            shared.learn_lineage(&key, &info.etag, &info.metadata);
            if info.metadata.get(super::LINEAGE) != Some(&lineage) {
                return;
            }
            let (client, etag) = (&shared.client, info.etag.as_str());
            for attempt in 0..3 {
                let Some(entry) = shared.cache.current(&key) else {
                    return;
                };
                if entry.etag == info.etag || entry.size >= info.size {
                    return;
                }
                let (base, base_size) = (entry.etag.clone(), entry.size);
                drop(entry);
                let grown = shared.cache.grow_with(
                    &key,
                    &base,
                    base_size,
                    etag,
                    info.size,
                    false,
                    &|start, end, write| {
                        client
                            .get(&key, Some((start, end)), Some(etag), write)
                            .map(|_| ())
                            .map_err(io::Error::other)
                    },
                );
                if grown.is_some() {
                    log::trace!("{key}: {} appended bytes fetched", info.size - base_size);
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20 << attempt));
            }
        });
    }

    /// Forgets everything remembered at and below `path`, but not its directory's listing.
    fn forget_below(&self, path: &Path) {
        Changed::note(&mut lock(&self.changed).trees, path);
        lock(&self.metas).retain(|p, _| !p.starts_with(path));
        lock(&self.indexes).retain(|p, _| !p.starts_with(path));
        lock(&self.listings).retain(|p, _| !p.starts_with(path));
        lock(&self.large_dirs).retain(|p, _| !p.starts_with(path));
    }

    /// Forgets everything remembered at and below `path` (a directory renamed or removed).
    fn forget_tree(&self, path: &Path) {
        self.forget_below(path);
        lock(&self.listings).remove(&split(path).0);
    }

    /// The attributes of the version `etag` of `path` this store has just written (`size`
    /// bytes): made now, as far as this host is concerned (see `stamped`).
    pub(super) fn made_meta(&self, path: &Path, size: u64, etag: &str, a: &Attrs) -> Meta {
        let now = SystemTime::now();
        self.stamp(path, etag, now);
        self.object_meta(size, etag, now, a)
    }

    /// Remembers that this store made the version `etag` of `path` at `at` (see `stamped`).
    fn stamp(&self, path: &Path, etag: &str, at: SystemTime) {
        let mut stamped = lock(&self.stamped);
        if stamped.len() > 10_000 {
            stamped.clear();
        }
        let stamp = Stamp {
            etag: etag.trim_matches('"').to_string(),
            at,
            seen: None,
        };
        stamped.insert(path.to_path_buf(), stamp);
    }

    /// When the version `etag` of `path`, reported modified at `last_modified`, was modified:
    /// when this store made it, by this host's clock, to the nanosecond (see `stamped`), else
    /// `last_modified`, to the second (as S3 keeps it).
    fn modified(&self, path: &Path, etag: &str, last_modified: SystemTime) -> SystemTime {
        match lock(&self.stamped).get_mut(path) {
            Some(stamp) if stamp.fits(etag, last_modified) => {
                stamp.seen.get_or_insert(last_modified);
                stamp.at
            }
            _ => to_second(last_modified),
        }
    }

    /// The attributes of an object modified at `modified` (see `modified`): its ctime, and its
    /// mtime unless one was set explicitly.
    pub(super) fn object_meta(
        &self,
        size: u64,
        etag: &str,
        modified: SystemTime,
        a: &Attrs,
    ) -> Meta {
        let ctime = modified;
        let mtime = a.mtime.unwrap_or(ctime);
        Meta {
            kind: a.kind,
            size,
            blocks: size.div_ceil(512),
            perm: a.perm,
            nlink: 1,
            uid: a.uid,
            gid: a.gid,
            atime: mtime,
            mtime,
            ctime,
            rdev: 0,
            version: Version::from_tag(etag),
            file_id: None,
            volatile: false,
        }
    }

    fn dir_meta(&self, a: &Attrs) -> Meta {
        let mtime = a.mtime.unwrap_or(self.defaults.dir_mtime);
        Meta {
            kind: Kind::Dir,
            size: 0,
            blocks: 0,
            perm: a.perm,
            nlink: 2,
            uid: a.uid,
            gid: a.gid,
            atime: mtime,
            mtime,
            ctime: mtime,
            rdev: 0,
            version: Version::from_tag("dir"),
            file_id: None,
            volatile: false,
        }
    }

    /// The attributes an object's metadata gives it.
    pub(super) fn attrs_of(&self, metadata: &Metadata) -> Attrs {
        Attrs::from_metadata(metadata, &self.defaults)
    }

    /// The index of directory `dir`. `listed`: its ETag as a listing just showed it (`Some(None)`:
    /// it has none), so the remembered one is used only if it is that version.
    fn index(&self, dir: &Path, listed: Option<Option<&str>>) -> StoreResult<Arc<Index>> {
        {
            let indexes = lock(&self.indexes);
            if let Some(c) = indexes.get(dir) {
                let usable = match listed {
                    Some(etag) => c.etag.as_deref() == etag,
                    None => self.fresh(c.at),
                };
                if usable {
                    return Ok(c.index.clone());
                }
            }
        }
        if listed == Some(None) {
            let index = Arc::new(Index::default());
            self.keep_index(dir, None, index.clone());
            return Ok(index);
        }
        let (etag, index) = self.fetch_index(dir)?;
        let index = Arc::new(index);
        self.keep_index(dir, etag, index.clone());
        Ok(index)
    }

    fn keep_index(&self, dir: &Path, etag: Option<String>, index: Arc<Index>) {
        let mut indexes = lock(&self.indexes);
        if indexes.len() >= REMEMBERED_DIRS {
            // Past the TTL an index is used only if a listing shows its ETag: dropping it
            // costs one GET at most.
            indexes.retain(|_, c| self.fresh(c.at));
        }
        indexes.insert(
            dir.to_path_buf(),
            CachedIndex {
                etag,
                index,
                at: Instant::now(),
            },
        );
    }

    /// Reads the index of `dir` from the store: its ETag (`None` if there is none) and entries.
    fn fetch_index(&self, dir: &Path) -> StoreResult<(Option<String>, Index)> {
        let key = self.keys.index_key(dir)?;
        let mut bytes = Vec::new();
        let got = self.shared.client.get(&key, None, None, &mut |b| {
            if bytes.len() + b.len() > INDEX_MAX {
                return Err(io::Error::other("an index larger than 64 MiB"));
            }
            bytes.extend_from_slice(b);
            Ok(())
        });
        match got {
            Ok(info) => match Index::parse(&bytes) {
                Ok(index) => Ok((Some(info.etag), index)),
                Err(e) => {
                    log::warn!("{key}: not an index ({e}); its entries are ignored");
                    Ok((Some(info.etag), Index::default()))
                }
            },
            Err(e) if e.is(Failure::NotFound) => Ok((None, Index::default())),
            Err(e) => Err(e.into()),
        }
    }

    /// Changes the index of `dir` with `change` (which says whether it changed anything),
    /// read-modified-written with conditional PUTs until it goes in without racing another
    /// writer (see `attrs`).
    fn update_index(&self, dir: &Path, change: &dyn Fn(&mut Index) -> bool) -> StoreResult<()> {
        let key = self.keys.index_key(dir)?;
        let mut known = {
            let indexes = lock(&self.indexes);
            indexes
                .get(dir)
                .filter(|c| self.fresh(c.at))
                .map(|c| (c.etag.clone(), c.index.as_ref().clone()))
        };
        for attempt in 0..INDEX_TRIES {
            let (etag, mut index) = match known.take() {
                Some(k) => k,
                None => self.fetch_index(dir)?,
            };
            if !change(&mut index) {
                self.keep_index(dir, etag, Arc::new(index));
                return Ok(());
            }
            let condition = match (&etag, self.shared.conditional) {
                (_, false) => Condition::None,
                (Some(e), true) => Condition::Matches(e.clone()),
                (None, true) => Condition::Absent,
            };
            let body = Body::Bytes(Arc::new(index.to_bytes()));
            match self
                .shared
                .client
                .put(&key, body, &Metadata::new(), &condition)
            {
                Ok(new) => {
                    self.keep_index(dir, Some(new), Arc::new(index));
                    return Ok(());
                }
                Err(e)
                    if e.is(Failure::Precondition)
                        || e.is(Failure::Conflict)
                        || (e.is(Failure::NotFound) && etag.is_some()) =>
                {
                    // Another host changed it: read it again and redo the change.
                    lock(&self.indexes).remove(dir);
                    backoff(attempt);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::failed(
            libc::EIO,
            format!("updating {key}"),
            io::Error::other("other hosts kept changing it"),
        ))
    }

    /// Records `attrs` for the entry `path` in its directory's index: an entry when they are
    /// not the defaults (with `etag`, the version an explicit mtime is of), none otherwise.
    /// `had_entry`: whether it may have one now (else nothing is written for default attributes).
    pub(super) fn index_attrs(
        &self,
        path: &Path,
        attrs: &Attrs,
        etag: Option<&str>,
        had_entry: bool,
    ) -> StoreResult<()> {
        let default = attrs.are_default(&self.defaults);
        let (dir, name) = split(path);
        // (An entry this host wrote, for a change that then failed, narrower than the object.)
        let had_entry = had_entry
            || (default
                && lock(&self.indexes)
                    .get(&dir)
                    .is_some_and(|c| c.index.entries.contains_key(&name)));
        if default && !had_entry {
            return Ok(());
        }
        if had_entry {
            // The entry is there: a remembered index without it is older than that (another
            // host wrote it), and would make its removal look needless.
            let mut indexes = lock(&self.indexes);
            if indexes
                .get(&dir)
                .is_some_and(|c| !c.index.entries.contains_key(&name))
            {
                indexes.remove(&dir);
            }
        }
        let entry = (!default).then(|| IndexEntry::of(attrs, etag));
        self.update_index(&dir, &|index| match &entry {
            Some(e) => index.entries.insert(name.clone(), e.clone()).as_ref() != Some(e),
            None => index.entries.remove(&name).is_some(),
        })
    }

    /// Before the object at `path` gets `attrs`, which let fewer users at it than its
    /// directory's index shows now (see `Attrs::narrow`), the index gets them
    /// (keeping the entry's mtime, of the version it names): a listing on another host never
    /// shows the object with wider permissions than it has, not even if this host dies
    /// between the two writes (the index then errs on the narrow side until the file's next
    /// change of attributes). A widening change goes to the object first, then the index,
    /// for the same reason. Call it only where the index is written after the object anyway
    /// (it reads the index, if not remembered).
    pub(super) fn narrow_index_first(&self, path: &Path, attrs: &Attrs) -> StoreResult<()> {
        let (dir, name) = split(path);
        let defaults = &self.defaults;
        self.update_index(&dir, &|index| {
            let shown = match index.entries.get(&name) {
                Some(e) => e.attrs(Kind::File, None, defaults),
                None => Some(Attrs::default_object(defaults)),
            };
            // (An entry that says directory is stale: the object's writer corrects it.)
            if !shown.is_some_and(|shown| attrs.narrow(&shown)) {
                return false;
            }
            index
                .entries
                .entry(name.clone())
                .or_default()
                .set_access(attrs);
            true
        })
    }

    /// Whether the index of `path`'s directory, as this host remembers it, gives the object
    /// at `path` another mode or owner than `attrs`.
    fn indexed_otherwise(&self, path: &Path, attrs: &Attrs) -> bool {
        let (dir, name) = split(path);
        let indexes = lock(&self.indexes);
        let Some(entry) = indexes
            .get(&dir)
            .and_then(|c| c.index.entries.get(&name).cloned())
        else {
            return false;
        };
        entry
            .attrs(Kind::File, None, &self.defaults)
            .is_some_and(|e| (e.perm, e.uid, e.gid) != (attrs.perm, attrs.uid, attrs.gid))
    }

    /// Removes the index entry of `path`, if its attributes said it had one.
    fn unindex(&self, path: &Path, meta: &Meta) -> StoreResult<()> {
        if self.meta_attrs(meta).are_default(&self.defaults) {
            return Ok(());
        }
        let (dir, name) = split(path);
        self.update_index(&dir, &|index| index.entries.remove(&name).is_some())
    }

    /// The attributes the store keeps of what `meta` describes: an object's mtime is
    /// explicit when it is not its ctime (the object's `Last-Modified`, see `object_meta`), a
    /// directory's when it is not the default.
    pub(super) fn meta_attrs(&self, meta: &Meta) -> Attrs {
        let explicit = if meta.kind == Kind::Dir {
            meta.mtime != self.defaults.dir_mtime
        } else {
            meta.mtime != meta.ctime
        };
        Attrs {
            kind: meta.kind,
            perm: meta.perm,
            uid: meta.uid,
            gid: meta.gid,
            mtime: explicit.then_some(meta.mtime),
        }
    }

    /// Attributes of the root directory.
    fn root_meta(&self) -> StoreResult<Meta> {
        let index = self.index(Path::new(""), None)?;
        let attrs = index
            .entries
            .get(".")
            .and_then(|e| e.attrs(Kind::Dir, None, &self.defaults))
            .unwrap_or_else(|| Attrs::default_dir(&self.defaults));
        Ok(self.dir_meta(&attrs))
    }

    /// Attributes of the directory `path`, which exists.
    fn dir_attrs(&self, path: &Path) -> StoreResult<Attrs> {
        let (dir, name) = split(path);
        let index = self.index(&dir, None)?;
        Ok(index
            .entries
            .get(&name)
            .and_then(|e| e.attrs(Kind::Dir, None, &self.defaults))
            .unwrap_or_else(|| Attrs::default_dir(&self.defaults)))
    }

    /// Asks the store what `path` is now (HEAD, then a LIST for a directory), bypassing what
    /// the store remembers.
    pub(super) fn lookup(&self, path: &Path) -> StoreResult<Meta> {
        if is_root(path) {
            return self.root_meta();
        }
        if let Some(meta) = self.pending(path) {
            return Ok(meta);
        }
        let asked = Instant::now();
        let known = |meta: Option<Meta>| meta.ok_or_else(|| err(libc::ENOENT));
        let key = match self.keys.key(path) {
            Ok(key) => key,
            // A name no object can have is not there (making one is refused with EINVAL).
            Err(e) if e.raw_os_error() == libc::EINVAL => return Err(err(libc::ENOENT)),
            Err(e) => return Err(e),
        };
        // A program going through the files of a directory by name (`git status`, `make`,
        // `ls` of names) gets them from one listing, remembered for the TTL, rather than a
        // HEAD each (within one page: larger directories are asked about name by name).
        // A larger directory walked through in name order (`rm -rf`, `git status`, a loop
        // over sorted names) gets them from one page of its listing at a time.
        let (dir, name) = split(path);
        if self.is_large_dir(&dir) {
            if self.walking(&dir, &name)
                && let Some(meta) = self.listed_from(path, &dir, &name)?
            {
                return Ok(meta);
            }
        } else if self.crowded(&dir)
            && let Some(meta) = self.listed(path, &dir, &name)?
        {
            return Ok(meta);
        }
        match self.shared.client.head(&key) {
            Ok(info) => {
                self.shared.learn_lineage(&key, &info.etag, &info.metadata);
                let attrs = self.attrs_of(&info.metadata);
                let modified = self.modified(path, &info.etag, info.last_modified);
                let meta = self.object_meta(info.size, &info.etag, modified, &attrs);
                return known(self.answered(path, Some(meta), asked));
            }
            Err(e) if e.is(Failure::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        // Not an object: its directory's listing tells whether it is a directory, and, when
        // that fits in one page, answers for every other name there for a while (a program
        // making files one after the other looks each name up first). A directory known to
        // need more pages is not listed again for every name: a LIST of the name's own
        // prefix says (a page of the directory for each name made `: > f` in a directory of
        // 4,000 files take 20 ms instead of 3).
        if !self.is_large_dir(&dir)
            && let Some(meta) = self.listed(path, &dir, &name)?
        {
            return Ok(meta);
        }
        let prefix = self.keys.dir_prefix(path)?;
        let page = self.shared.client.list(&prefix, true, None, Some(1))?;
        if page.objects.is_empty() && page.prefixes.is_empty() {
            return known(self.answered(path, None, asked));
        }
        let meta = self.dir_meta(&self.dir_attrs(path)?);
        known(self.answered(path, Some(meta), asked))
    }

    /// The entries of the directory `path` (one LIST, paginated, and its index when it
    /// changed), remembered for `metadata_ttl`, with the directory as *wholly known*: for that
    /// time, a name not listed is not there (see `remembered`). With `max_pages`, `None` when
    /// the directory has more pages than that (nothing is remembered then).
    fn list_dir(
        &self,
        path: &Path,
        max_pages: Option<usize>,
    ) -> StoreResult<Option<Vec<DirEntry>>> {
        let started = Instant::now();
        let prefix = self.keys.dir_prefix(path)?;
        let index_key = prefix.clone() + INDEX;
        let mut objects = Vec::new();
        let mut dirs = Vec::new();
        let mut index_etag = None;
        let mut anything = false;
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            if max_pages.is_some_and(|m| pages >= m) {
                self.mark_large_dir(path, true);
                return Ok(None);
            }
            pages += 1;
            let page = self
                .shared
                .client
                .list(&prefix, true, token.as_deref(), None)?;
            anything |= !page.objects.is_empty() || !page.prefixes.is_empty();
            for o in page.objects {
                if o.key == index_key {
                    index_etag = Some(o.etag.clone());
                } else if let Some(name) = listed_name(&prefix, &o.key, false) {
                    objects.push((name.to_string(), o));
                }
            }
            for p in &page.prefixes {
                if let Some(name) = listed_name(&prefix, p, true) {
                    dirs.push(name.to_string());
                }
            }
            match page.next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        if !anything && !is_root(path) {
            self.answered(path, None, started);
            return Err(err(libc::ENOENT));
        }
        self.mark_large_dir(path, pages > 1);
        let index = self.index(path, Some(index_etag.as_deref()))?;
        let mut out = Vec::with_capacity(objects.len() + dirs.len());
        let files: std::collections::HashSet<&str> =
            objects.iter().map(|(n, _)| n.as_str()).collect();
        for (name, o) in &objects {
            let meta = self.listed_object(path, name, o, &index, started);
            out.push(DirEntry {
                name: OsString::from(name),
                kind: meta.kind,
                meta: Some(meta),
            });
        }
        for name in &dirs {
            if files.contains(name.as_str()) {
                log::debug!("{prefix}{name}: both an object and a prefix; shown as the file");
                continue;
            }
            let meta = self.listed_dir(path, name, &index, started);
            out.push(DirEntry {
                name: OsString::from(name),
                kind: Kind::Dir,
                meta: Some(meta),
            });
        }
        let mut names: std::collections::HashSet<String> = out
            .iter()
            .map(|e| e.name.to_string_lossy().into_owned())
            .collect();
        for (p, meta) in lock(&self.pending).iter() {
            if p.parent() == Some(path)
                && let Some(name) = p.file_name()
                && names.insert(name.to_string_lossy().into_owned())
            {
                out.push(DirEntry {
                    name: name.to_os_string(),
                    kind: Kind::File,
                    meta: Some(meta.clone()),
                });
            }
        }
        self.keep_listing(path, started, names);
        Ok(Some(out))
    }

    /// The attributes of the object `o` listed as `name` in the directory `dir` (with its
    /// index) by a listing asked for at `asked`, remembered (see `answered`).
    fn listed_object(
        &self,
        dir: &Path,
        name: &str,
        o: &ListedObject,
        index: &Index,
        asked: Instant,
    ) -> Meta {
        let attrs = index
            .entries
            .get(name)
            .and_then(|e| e.attrs(Kind::File, Some(&o.etag), &self.defaults))
            .unwrap_or_else(|| Attrs::default_object(&self.defaults));
        let entry = dir.join(name);
        let modified = self.modified(&entry, &o.etag, o.last_modified);
        let meta = self.object_meta(o.size, &o.etag, modified, &attrs);
        self.answered(&entry, Some(meta.clone()), asked)
            .unwrap_or(meta)
    }

    /// The attributes of the directory listed as `name` in the directory `dir` (with its
    /// index) by a listing asked for at `asked`, remembered (see `answered`).
    fn listed_dir(&self, dir: &Path, name: &str, index: &Index, asked: Instant) -> Meta {
        let attrs = index
            .entries
            .get(name)
            .and_then(|e| e.attrs(Kind::Dir, None, &self.defaults))
            .unwrap_or_else(|| Attrs::default_dir(&self.defaults));
        let meta = self.dir_meta(&attrs);
        self.answered(&dir.join(name), Some(meta.clone()), asked)
            .unwrap_or(meta)
    }

    /// What one page of the listing of the large directory `dir`, from its entry `name`
    /// (`path`) on, says of that entry: every entry of the page is remembered for the TTL, so
    /// that the page answers for the names a walk through the directory asks about next.
    /// `Err(ENOENT)` if the page went past where `name` would be; `None` if it ended before.
    fn listed_from(&self, path: &Path, dir: &Path, name: &str) -> StoreResult<Option<Meta>> {
        let asked = Instant::now();
        let prefix = self.keys.dir_prefix(dir)?;
        // After a key just before the name's (its name less the last character).
        let mut before = name.to_string();
        before.pop();
        let page = self
            .shared
            .client
            .list_after(&prefix, &format!("{prefix}{before}"))?;
        let index_key = prefix.clone() + INDEX;
        let index_etag = page
            .objects
            .iter()
            .find(|o| o.key == index_key)
            .map(|o| o.etag.as_str());
        // The page shows the index's version only when it holds its key: else as remembered
        // within the TTL, or fetched.
        let index = self.index(dir, index_etag.map(Some))?;
        let mut found = None;
        let mut files = std::collections::HashSet::new();
        for o in &page.objects {
            if let Some(n) = listed_name(&prefix, &o.key, false) {
                let meta = self.listed_object(dir, n, o, &index, asked);
                files.insert(n);
                if n == name {
                    found = Some(meta);
                }
            }
        }
        for p in &page.prefixes {
            if let Some(n) = listed_name(&prefix, p, true)
                && !files.contains(n)
            {
                let meta = self.listed_dir(dir, n, &index, asked);
                if n == name && found.is_none() {
                    found = Some(meta);
                }
            }
        }
        if found.is_some() {
            return Ok(found);
        }
        // Past the name both as an object and as a directory's prefix?
        let last = page
            .objects
            .last()
            .map(|o| o.key.as_str())
            .max(page.prefixes.last().map(String::as_str));
        let past =
            page.next.is_none() || last.is_some_and(|k| k > format!("{prefix}{name}/").as_str());
        if past {
            return match self.answered(path, None, asked) {
                Some(meta) => Ok(Some(meta)),
                None => Err(err(libc::ENOENT)),
            };
        }
        Ok(None)
    }

    /// Counts a lookup that asks the store about `name` in the large directory `dir`: whether
    /// it continues a walk through the directory in the order of its names, asked one after
    /// the other within the TTL, for long enough that a page of the listing from this name on
    /// should answer it and the names that follow. (A program that looks names up in another
    /// order asks about each alone: a page costs tens of HEADs.)
    fn walking(&self, dir: &Path, name: &str) -> bool {
        if self.shared.metadata_ttl.is_zero() {
            return false;
        }
        let mut walks = lock(&self.walks);
        if walks.len() >= 10_000 {
            walks.retain(|_, (at, _, _)| self.fresh(*at));
        }
        let (at, last, n) = walks
            .entry(dir.to_path_buf())
            .or_insert_with(|| (Instant::now(), String::new(), 0));
        *n = if self.fresh(*at) && name > last.as_str() {
            *n + 1
        } else {
            1
        };
        (*at, *last) = (Instant::now(), name.to_string());
        if *n < LIST_AFTER {
            return false;
        }
        *n = 0;
        true
    }

    /// What a listing of `dir`, made now, says of its entry `name` (`path`): `Err(ENOENT)` if
    /// it is not there, `None` if the directory takes more than a page to list (it is not
    /// listed further). The listing is remembered (see `list_dir`).
    fn listed(&self, path: &Path, dir: &Path, name: &str) -> StoreResult<Option<Meta>> {
        let asked = Instant::now();
        let absent = || match self.answered(path, None, asked) {
            Some(meta) => Ok(Some(meta)),
            None => Err(err(libc::ENOENT)),
        };
        match self.list_dir(dir, Some(1)) {
            Ok(Some(entries)) => match entries.into_iter().find(|e| e.name == name) {
                Some(e) => Ok(Some(e.meta.expect("listed with attributes"))),
                None => absent(),
            },
            Ok(None) => Ok(None),
            Err(e) if e.raw_os_error() == libc::ENOENT => absent(),
            Err(e) => Err(e),
        }
    }

    /// Counts a lookup that asks the store about a name in `dir`: whether, with the others of
    /// the last TTL, there are enough that listing the directory should answer this one and
    /// those that follow (never when nothing is remembered, with a TTL of zero).
    fn crowded(&self, dir: &Path) -> bool {
        if self.shared.metadata_ttl.is_zero() {
            return false;
        }
        let mut asked = lock(&self.asked);
        if asked.len() >= 10_000 {
            asked.retain(|_, (at, _)| self.fresh(*at));
        }
        let (since, n) = asked
            .entry(dir.to_path_buf())
            .or_insert((Instant::now(), 0));
        if !self.fresh(*since) {
            (*since, *n) = (Instant::now(), 0);
        }
        *n += 1;
        if *n < LIST_AFTER {
            return false;
        }
        asked.remove(dir);
        true
    }

    /// Remembers the names of the directory `path` as listed at `at` (see `listings`).
    fn keep_listing(&self, path: &Path, at: Instant, names: std::collections::HashSet<String>) {
        let mut listings = lock(&self.listings);
        if listings.len() >= REMEMBERED_DIRS {
            // A listing past the TTL answers nothing.
            listings.retain(|_, (at, _)| self.fresh(*at));
        }
        listings.insert(path.to_path_buf(), (at, names));
    }

    /// How many directories' listings and indexes this store remembers.
    #[cfg(test)]
    pub(super) fn remembered_dirs(&self) -> (usize, usize) {
        (lock(&self.listings).len(), lock(&self.indexes).len())
    }

    /// Whether the directory `path` was seen lately to take more than a page to list.
    fn is_large_dir(&self, path: &Path) -> bool {
        lock(&self.large_dirs)
            .get(path)
            .is_some_and(|at| at.elapsed() < LARGE_DIR_FOR)
    }

    /// Records whether the directory `path` took more than a page to list.
    fn mark_large_dir(&self, path: &Path, large: bool) {
        let mut dirs = lock(&self.large_dirs);
        if !large {
            dirs.remove(path);
            return;
        }
        if dirs.len() >= 10_000 {
            dirs.retain(|_, at| at.elapsed() < LARGE_DIR_FOR);
        }
        dirs.insert(path.to_path_buf(), Instant::now());
    }

    /// Whether something (an object or a directory) is at `path`, asking the store.
    fn exists(&self, path: &Path) -> StoreResult<Option<Meta>> {
        match self.lookup(path) {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.raw_os_error() == libc::ENOENT => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// What is committed at `path`, which must be a file (`EISDIR`, `EINVAL` otherwise).
    fn file_meta(&self, path: &Path) -> StoreResult<Meta> {
        self.settled(path)?;
        let meta = self.stat(path)?;
        match meta.kind {
            Kind::File => Ok(meta),
            Kind::Dir => Err(err(libc::EISDIR)),
            _ => Err(err(libc::EINVAL)),
        }
    }

    /// The content of `key` at the version `meta` describes.
    pub(super) fn content(
        &self,
        key: String,
        meta: Meta,
        whole: Option<Arc<super::cache::Entry>>,
    ) -> Arc<dyn Content> {
        let etag = meta.version.tag().unwrap_or_default().to_string();
        Arc::new(S3Content::new(self.shared.clone(), key, etag, meta, whole))
    }

    /// The owner given to new entries.
    fn owner_of(&self, owner: Owner) -> (u32, u32) {
        owner.unwrap_or((self.defaults.uid, self.defaults.gid))
    }

    /// The attributes of a new entry (its mtime is its object's `Last-Modified`).
    fn new_attrs(&self, kind: Kind, perm: u16, owner: Owner) -> Attrs {
        let (uid, gid) = self.owner_of(owner);
        Attrs {
            kind,
            perm,
            uid,
            gid,
            mtime: None,
        }
    }

    /// Makes a new object at `path` (a file, symlink, FIFO or socket): a PUT with
    /// `If-None-Match: *` (`EEXIST` if something is there), its index entry if its attributes
    /// are not the defaults (a failed index write removes the object again).
    fn make_object(&self, path: &Path, attrs: &Attrs, body: Body) -> StoreResult<Meta> {
        let key = self.keys.key(path)?;
        self.check_free(path, false)?;
        let size = body.len();
        let condition = if self.shared.conditional {
            Condition::Absent
        } else {
            Condition::None
        };
        let mut metadata = attrs.to_metadata();
        if attrs.kind == Kind::File {
            // Appends to a new file extend it: readers of it read on into them.
            metadata.insert(super::LINEAGE.into(), self.shared.new_lineage());
        }
        let etag = match self.shared.client.put(&key, body, &metadata, &condition) {
            Ok(etag) => etag,
            Err(e) if e.is(Failure::Precondition) || e.is(Failure::Conflict) => {
                self.forget(path);
                return Err(err(libc::EEXIST));
            }
            Err(e) => return Err(e.into()),
        };
        self.shared.learn_lineage(&key, &etag, &metadata);
        if let Err(e) = self.index_attrs(path, attrs, Some(&etag), false) {
            let _ = self.shared.client.delete(&key);
            self.forget(path);
            return Err(e);
        }
        let meta = self.made_meta(path, size, &etag, attrs);
        self.remember(path, Some(meta.clone()));
        Ok(meta)
    }

    /// Fails with `EEXIST` if something is at `path`: known from a fresh lookup (the kernel
    /// looks a name up before creating it), else asked. An object is asked for only when
    /// writes are not conditional, or with `ask_object` (where no conditional write of the
    /// name follows: a directory's marker does not see a file of the name, and a file made
    /// at its commit is written later).
    fn check_free(&self, path: &Path, ask_object: bool) -> StoreResult<()> {
        match self.remembered(path) {
            Some(Some(_)) => Err(err(libc::EEXIST)),
            Some(None) => Ok(()),
            None => {
                let there = if !self.shared.conditional || ask_object {
                    self.exists(path)?.is_some()
                } else {
                    let prefix = self.keys.dir_prefix(path)?;
                    let page = self.shared.client.list(&prefix, true, None, Some(1))?;
                    !(page.objects.is_empty() && page.prefixes.is_empty())
                };
                if there {
                    Err(err(libc::EEXIST))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Finishes first the renames of this process that failed part-way at `path` (or above
    /// it): see [`Shared::settle`]. `EIO` while the store does not answer.
    fn settled(&self, path: &Path) -> StoreResult<()> {
        if !self.shared.has_unfinished() {
            return Ok(());
        }
        let Ok(key) = self.keys.key(path) else {
            return Ok(());
        };
        let below = format!("{key}/");
        let finished = self.shared.settle(&|record| match record {
            Record::Rename { from, to, .. } => {
                below.starts_with(from.as_str()) || below.starts_with(to.as_str())
            }
            Record::FileRename { from, to, .. } => key == *from || key == *to,
            Record::Upload { .. } => false,
        })?;
        // What this store remembers of the names is from before.
        for record in finished {
            let (Record::Rename { from, to, .. } | Record::FileRename { from, to, .. }) = record
            else {
                continue;
            };
            for key in [from, to] {
                if let Some(path) = self.keys.path_of(key.trim_end_matches('/')) {
                    self.forget_tree(&path);
                }
            }
        }
        Ok(())
    }

    /// Renames the directory `from` to `to` (see the module docs and `move_tree`).
    fn rename_dir(&self, from: &Path, to: &Path, target: Option<&Meta>) -> StoreResult<()> {
        let from_prefix = self.keys.dir_prefix(from)?;
        let to_prefix = self.keys.dir_prefix(to)?;
        if let Some(t) = target {
            if t.kind != Kind::Dir {
                return Err(err(libc::ENOTDIR));
            }
            // An empty directory is replaced: its marker and index go first.
            if !self.dir_is_empty(to)? {
                return Err(err(libc::ENOTEMPTY));
            }
            self.shared
                .client
                .delete_many(&[to_prefix.clone(), to_prefix.clone() + INDEX])?;
        }
        let from_attrs = self.dir_attrs(from)?;
        let record = Record::Rename {
            root: self.keys.root().to_string(),
            from: from_prefix.clone(),
            to: to_prefix.clone(),
        };
        let journal = self
            .shared
            .journal_rename(record)
            .map_err(|e| StoreError::failed(libc::EIO, "journal of a directory rename", e))?;
        self.forget_tree(from);
        self.forget_tree(to);
        self.move_tree(&from_prefix, &to_prefix)?;
        // The directory's own entry: its attributes move with its name.
        let (from_dir, from_name) = split(from);
        let (to_dir, to_name) = split(to);
        let entry = IndexEntry::of(&from_attrs, None);
        let default = from_attrs.are_default(&self.defaults);
        self.update_index(&to_dir, &|index| {
            if default {
                index.entries.remove(&to_name).is_some()
            } else {
                index
                    .entries
                    .insert(to_name.clone(), entry.clone())
                    .as_ref()
                    != Some(&entry)
            }
        })?;
        self.update_index(&from_dir, &|index| {
            index.entries.remove(&from_name).is_some()
        })?;
        journal.done();
        self.forget_tree(from);
        self.forget_tree(to);
        Ok(())
    }

    /// Whether the directory `path` has no entries (its marker and index aside).
    fn dir_is_empty(&self, path: &Path) -> StoreResult<bool> {
        if lock(&self.pending)
            .keys()
            .any(|p| p.starts_with(path) && p != path)
        {
            return Ok(false);
        }
        let prefix = self.keys.dir_prefix(path)?;
        let page = self.shared.client.list(&prefix, true, None, Some(3))?;
        let index = prefix.clone() + INDEX;
        Ok(page.prefixes.is_empty()
            && page
                .objects
                .iter()
                .all(|o| o.key == prefix || o.key == index))
    }

    /// Renames the file `from` (`source`, as last looked up, `fresh`ly or remembered, as is
    /// `target`) to `to`; `Ok(false)` if it needs both looked up afresh (nothing done): the
    /// source is no longer that version, or the copy will replace its metadata, or the target
    /// remembered absent is there.
    fn rename_file(
        &self,
        from: &Path,
        to: &Path,
        (source, fresh): (&Meta, bool),
        (target, absent_assumed): (Option<&Meta>, bool),
        mode: RenameMode,
    ) -> StoreResult<bool> {
        if let Some(t) = target
            && t.kind == Kind::Dir
        {
            return Err(err(libc::EISDIR));
        }
        let from_key = self.keys.key(from)?;
        let to_key = self.keys.key(to)?;
        // Made only if absent where that is asked, or assumed (the caller then looks again).
        let condition =
            if (mode == RenameMode::NoReplace || absent_assumed) && self.shared.conditional {
                Condition::Absent
            } else {
                Condition::None
            };
        let etag = source.version.tag().map(str::to_string);
        // The copy keeps the source's mtime (POSIX: a rename changes the ctime only), as
        // explicit metadata, unless the source was modified just now (see `KEEP_MTIME_AFTER`).
        let mut attrs = self.meta_attrs(source);
        let keep_mtime = attrs.mtime.is_none() && keeps_mtime(source.mtime);
        if keep_mtime && !fresh {
            // The copy's metadata is written whole: from the object as it is now, not as
            // remembered (a change of mode or owner leaves the ETag as it was).
            return Ok(false);
        }
        if keep_mtime {
            attrs.mtime = Some(source.mtime);
        }
        let metadata = keep_mtime.then(|| attrs.to_metadata());
        // Journaled: a crash between the copy and the delete would leave the file at both
        // names; the next start finishes what it finds half done (see `finish_file_rename`).
        let journal = match &etag {
            Some(source) => {
                let record = Record::FileRename {
                    root: self.keys.root().to_string(),
                    from: from_key.clone(),
                    to: to_key.clone(),
                    source: source.clone(),
                    target: target.and_then(|t| t.version.tag()).map(str::to_string),
                };
                let journaled = self
                    .shared
                    .journal_rename(record)
                    .map_err(|e| StoreError::failed(libc::EIO, "journal of a file rename", e))?;
                Some(journaled)
            }
            None => None,
        };
        let new_etag = match self.shared.client.copy(
            &from_key,
            &to_key,
            metadata.as_ref(),
            etag.as_deref(),
            &condition,
        ) {
            Ok(e) => e,
            Err(e) if e.is(Failure::Precondition) => {
                // The target appeared (refused for `RENAME_NOREPLACE`, looked at afresh if it
                // was assumed absent), or the source changed: nothing was copied.
                if let Some(j) = journal {
                    j.done();
                }
                if mode == RenameMode::NoReplace && self.exists(to)?.is_some() {
                    return Err(err(libc::EEXIST));
                }
                self.forget(from);
                self.forget(to);
                return Ok(false);
            }
            Err(e) if e.is(Failure::NotFound) => {
                // The source is gone (another host moved or removed it): nothing was copied,
                // nothing is left half done.
                if let Some(j) = journal {
                    j.done();
                }
                self.forget(from);
                return Err(err(libc::ENOENT));
            }
            Err(e) => return Err(e.into()),
        };
        // The copy as this store made it: as new as this host's clock says (see `stamped`).
        // What the store remembers of both names, and of their directories' listings, stays
        // true (a program saving files by renames keeps the listing that answers its lookups
        // of new names).
        self.remember(to, Some(self.made_meta(to, source.size, &new_etag, &attrs)));
        let target_attrs = target.map(|t| self.meta_attrs(t));
        let had = target_attrs.is_some_and(|a| !a.are_default(&self.defaults));
        self.index_attrs(to, &attrs, Some(&new_etag), had)?;
        if let Err(e) = self.shared.client.delete(&from_key) {
            // (The record stays: the next start deletes the source if it is still this one.)
            self.forget(from);
            return Err(e.into());
        }
        self.remember(from, None);
        self.shared.cache.forget(&from_key);
        self.unindex(from, source)?;
        if let Some(j) = journal {
            j.done();
        }
        Ok(true)
    }
}

/// How many times a rename looks its source up and copies it before it gives up on a source
/// that changes under every copy.
const RENAME_ATTEMPTS: u32 = 5;

/// Waits a little before try `attempt + 1` of a conflicting write (jittered, growing).
fn backoff(attempt: u32) {
    let base = 5u64 << attempt.min(6);
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()) % base.max(1));
    std::thread::sleep(Duration::from_millis(base + jitter));
}

/// What the copy of one object of a renamed directory did, for its new directory's index.
struct Moved {
    name: String,
    /// The copy's ETag.
    etag: String,
    /// The mtime the copy carries in its metadata, if any (kept or set explicitly).
    mtime: Option<SystemTime>,
}

/// The directory prefix and name of `key` (a key below some prefix: it has a `/`).
fn split_key(key: &str) -> (&str, &str) {
    match key.rfind('/') {
        Some(i) => (&key[..=i], &key[i + 1..]),
        None => ("", key),
    }
}

/// Copies the object `from` to `to` for a directory rename, keeping its mtime: one set
/// explicitly is in its metadata already; otherwise, unless it was modified in the last
/// `KEEP_MTIME_AFTER`, its `Last-Modified` (or `stamp`, the time this host showed for the
/// version with that ETag) is written into the copy's metadata, the rest of which is kept.
/// `None` if the object is gone.
fn copy_keeping_mtime(
    shared: &Shared,
    from: &str,
    to: &str,
    stamp: Option<(String, SystemTime)>,
) -> Result<Option<(String, Option<SystemTime>)>, super::client::ClientError> {
    let info = match shared.client.head(from) {
        Ok(info) => info,
        Err(e) if e.is(Failure::NotFound) => return Ok(None),
        Err(e) => return Err(e),
    };
    let explicit = info
        .metadata
        .get("mtime")
        .and_then(|t| super::attrs::parse_time(t));
    let modified = match stamp {
        Some((etag, at)) if etag == info.etag.trim_matches('"') => at,
        _ => to_second(info.last_modified),
    };
    let kept = explicit.is_none() && keeps_mtime(modified);
    let metadata = kept.then(|| {
        let mut m = info.metadata.clone();
        m.insert("mtime".into(), super::attrs::format_time(modified));
        m
    });
    match shared.client.copy(
        from,
        to,
        metadata.as_ref(),
        Some(&info.etag),
        &Condition::None,
    ) {
        Ok(etag) => Ok(Some((etag, if kept { Some(modified) } else { explicit }))),
        Err(e) if e.is(Failure::NotFound) => Ok(None),
        // Written again since the HEAD: the new version moves as it is, with its own time.
        Err(e) if e.is(Failure::Precondition) => {
            match shared.client.copy(from, to, None, None, &Condition::None) {
                Ok(etag) => Ok(Some((etag, None))),
                Err(e) if e.is(Failure::NotFound) => Ok(None),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

impl S3Store {
    /// Moves every object under `from` to the same name under `to`, a page of keys at a
    /// time, until none is left: what a directory rename does, and what the next start does
    /// to finish one a crash interrupted (copying again what was copied is harmless).
    ///
    /// Files keep their mtimes, as a rename must (see `copy_keeping_mtime`), in their metadata
    /// and in their new directory's index; the copies of a page run in parallel. The indexes
    /// are not copied but merged into the new directories' (read once per directory, before
    /// its keys are deleted), and every index is brought up to date before the page's keys
    /// are deleted: a crash leaves each moved file with its index entry, and what is left
    /// under `from` with the index it had.
    pub(super) fn move_tree(&self, from: &str, to: &str) -> StoreResult<()> {
        let shared = &self.shared;
        // The directories below `from`, to delete once empty (SeaweedFS keeps an emptied
        // directory listed until its own key is deleted).
        let mut dirs = std::collections::BTreeSet::new();
        // The old indexes read, by new directory: merged at the next flush.
        let mut seen = std::collections::HashSet::new();
        let mut pending: std::collections::BTreeMap<String, (Index, Vec<Moved>)> =
            std::collections::BTreeMap::new();
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        loop {
            let page = shared.client.list(from, false, None, None)?;
            if page.objects.is_empty() {
                break;
            }
            // `None`: not tried, as a copy failed before it (each copy to a store that does
            // not answer takes its timeouts: a large directory's would add up to minutes).
            type CopyJob = Box<
                dyn FnOnce() -> Option<
                        Result<Option<(String, Option<SystemTime>)>, super::client::ClientError>,
                    > + Send,
            >;
            let mut jobs: Vec<CopyJob> = Vec::new();
            let mut copied = Vec::new();
            for o in &page.objects {
                let rest = &o.key[from.len()..];
                let mut at = 0;
                while let Some(i) = rest[at..].find('/') {
                    dirs.insert(rest[..at + i + 1].to_string());
                    at += i + 1;
                }
                let dest = format!("{to}{rest}");
                let (src_dir, name) = split_key(&o.key);
                let dest_dir = split_key(&dest).0.to_string();
                if seen.insert(src_dir.to_string()) {
                    // The old index, read before its key can be deleted.
                    // (Every directory here lies below the one renamed, never the root.)
                    let index = match self.keys.path_of(src_dir.trim_end_matches('/')) {
                        Some(p) => self.fetch_index(&p)?.1,
                        None => Index::default(),
                    };
                    pending.entry(dest_dir.clone()).or_default().0 = index;
                }
                if name.is_empty() {
                    // A directory marker: made again (SeaweedFS copies no directories).
                    shared
                        .client
                        .put(&dest, Body::empty(), &Metadata::new(), &Condition::None)?;
                } else if name != INDEX {
                    let stamp = self
                        .keys
                        .path_of(&o.key)
                        .and_then(|p| lock(&self.stamped).get(&p).cloned())
                        .filter(|s| s.fits(&o.etag, o.last_modified))
                        .map(|s| (s.etag, s.at));
                    copied.push((dest_dir, name.to_string(), self.keys.path_of(&dest)));
                    let (shared, from_key, to_key) = (shared.clone(), o.key.clone(), dest);
                    let failed = failed.clone();
                    jobs.push(Box::new(move || {
                        if failed.load(std::sync::atomic::Ordering::Relaxed) {
                            return None;
                        }
                        let copied = copy_keeping_mtime(&shared, &from_key, &to_key, stamp);
                        if copied.is_err() {
                            failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        Some(copied)
                    }));
                }
            }
            let mut results = shared.pool.run_all(jobs);
            if let Some(i) = results.iter().position(|r| matches!(r, Some(Err(_))))
                && let Some(Err(e)) = results.swap_remove(i)
            {
                return Err(e.into());
            }
            for ((dir, name, path), r) in copied.into_iter().zip(results) {
                let r = r.expect("every copy was tried when none failed");
                if let Some((etag, mtime)) = r? {
                    if let (None, Some(path)) = (mtime, path) {
                        // On this host the copy is as new as this host's clock says.
                        self.stamp(&path, &etag, SystemTime::now());
                    }
                    let moved = Moved { name, etag, mtime };
                    pending.entry(dir).or_default().1.push(moved);
                }
            }
            for (dir, (index, moved)) in std::mem::take(&mut pending) {
                self.merge_moved(&dir, index, moved)?;
            }
            let done: Vec<String> = page.objects.iter().map(|o| o.key.clone()).collect();
            for key in &done {
                shared.cache.forget(key);
            }
            for batch in done.chunks(super::client::DELETE_BATCH) {
                shared.client.delete_many(batch)?;
            }
        }
        // The directory itself: a marker at its new name, and none left at the old.
        shared
            .client
            .put(to, Body::empty(), &Metadata::new(), &Condition::None)?;
        let mut dirs: Vec<String> = dirs.into_iter().collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
        for d in dirs {
            shared.client.delete(&format!("{from}{d}"))?;
        }
        shared.client.delete(from)?;
        Ok(())
    }

    /// Brings the index of the directory with key prefix `dir` up to date with a directory
    /// rename: the entries of its old index (`old`), and the versions and mtimes of the files
    /// copied into it (`moved`).
    fn merge_moved(&self, dir: &str, old: Index, moved: Vec<Moved>) -> StoreResult<()> {
        if old.entries.is_empty() && moved.iter().all(|m| m.mtime.is_none()) {
            return Ok(());
        }
        let Some(path) = self.keys.path_of(dir.trim_end_matches('/')) else {
            return Ok(()); // not a directory the store would make
        };
        self.update_index(&path, &|index| {
            let before = index.entries.clone();
            for (name, entry) in &old.entries {
                index.entries.insert(name.clone(), entry.clone());
            }
            for m in &moved {
                match m.mtime {
                    Some(t) => {
                        let e = index.entries.entry(m.name.clone()).or_default();
                        e.mtime = Some(super::attrs::format_time(t));
                        e.etag = Some(m.etag.clone());
                    }
                    // The copy's time is its mtime: an old entry's no longer applies.
                    None => {
                        if let Some(e) = index.entries.get_mut(&m.name) {
                            e.mtime = None;
                            e.etag = None;
                        }
                    }
                }
            }
            index.entries != before
        })
    }
}

impl Store for S3Store {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            hard_links: false,
            special_files: true,
            in_place_append: false,
            ranged_commits_from: Some(2 * self.shared.part_size),
            local_files: true,
            conditional_writes: self.shared.conditional,
            xattrs: false,
            stream_commits_up_to: Some(self.shared.part_size),
            created_at_commit: true,
            attrs_at_commit: true,
        }
    }

    fn stat(&self, path: &Path) -> StoreResult<Meta> {
        self.settled(path)?;
        match self.remembered(path) {
            Some(Some(meta)) => Ok(meta),
            Some(None) => Err(err(libc::ENOENT)),
            None => self.lookup(path),
        }
    }

    fn list(&self, path: &Path) -> StoreResult<Vec<DirEntry>> {
        self.settled(path)?;
        Ok(self
            .list_dir(path, None)?
            .expect("a listing without a page limit is whole"))
    }

    fn open(&self, path: &Path) -> StoreResult<Arc<dyn Content>> {
        let meta = self.file_meta(path)?;
        Ok(self.content(self.keys.key(path)?, meta, None))
    }

    fn open_to_read(&self, path: &Path) -> StoreResult<Arc<dyn Content>> {
        let meta = self.file_meta(path)?;
        let key = self.keys.key(path)?;
        if self.pending(path).is_some() {
            // Made on this host and not committed yet: nothing to fetch.
            return Ok(self.content(key, meta, None));
        }
        let etag = meta.version.tag().unwrap_or_default().to_string();
        let mut content = Arc::new(S3Content::new(
            self.shared.clone(),
            key.clone(),
            etag,
            meta,
            None,
        ));
        let mut appended = 0;
        loop {
            match content.fetch_whole() {
                // Read from the cache entry, which the kernel may read directly.
                Ok(true) => return Ok(self.content(key, content.meta().clone(), None)),
                Ok(false) => return Ok(content),
                Err(e) if super::content::version_gone(&e) => {
                    // Replaced by appends (a log another host writes to, maybe faster than
                    // this open and the kernel's one retry take): the newer version begins
                    // with the bytes of the one the kernel knows, which the reader reads
                    // there, and reads on (the kernel learns the longer size at its next
                    // `stat`, as for an open reader).
                    if appended < 8
                        && let Some(next) = content.follower(true)?
                    {
                        log::debug!(
                            "{key}: the version this host knew was appended to; \
                             the reader opens the newer one ({} bytes)",
                            next.meta().size
                        );
                        (content, appended) = (next, appended + 1);
                        continue;
                    }
                    log::debug!(
                        "{key}: the version this host knew was replaced or removed; \
                         the kernel is to look the name up again ({e})"
                    );
                    self.lookup(path)?;
                    return Err(err(libc::ESTALE));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn create(&self, path: &Path, perm: u16, owner: Owner, exclusive: bool) -> StoreResult<Meta> {
        self.settled(path)?;
        let attrs = self.new_attrs(Kind::File, perm, owner);
        match self.make_object(path, &attrs, Body::empty()) {
            Err(e) if e.raw_os_error() == libc::EEXIST && !exclusive => {
                let meta = self.lookup(path)?;
                if meta.kind == Kind::Dir {
                    return Err(err(libc::EISDIR));
                }
                Ok(meta)
            }
            other => other,
        }
    }

    fn create_held(&self, path: &Path, perm: u16, owner: Owner) -> StoreResult<Meta> {
        self.settled(path)?;
        let attrs = self.new_attrs(Kind::File, perm, owner);
        // Attributes that need an index entry are recorded with the object, made now.
        if attrs != Attrs::default_object(&self.defaults) {
            return self.create(path, perm, owner, true);
        }
        let key = self.keys.key(path)?;
        // The kernel looked the name up just before: mostly known, else asked.
        self.check_free(path, true)?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{NEW_TAG}{n}");
        // Its commit extends it: a reader that opened it reads on into what is written.
        let mut lineage = Metadata::new();
        lineage.insert(super::LINEAGE.into(), self.shared.new_lineage());
        self.shared.learn_lineage(&key, &tag, &lineage);
        let meta = self.object_meta(0, &tag, SystemTime::now(), &attrs);
        lock(&self.contested).remove(path);
        lock(&self.pending).insert(path.to_path_buf(), meta.clone());
        self.remember(path, Some(meta.clone()));
        Ok(meta)
    }

    fn working_copy(&self, path: &Path) -> StoreResult<Arc<dyn WorkingCopy>> {
        // Meant for `path`: it uploads its full parts early, with the metadata of what is
        // there now (as remembered; the commit corrects it if it changed meanwhile).
        let key = self.keys.key(path).ok().and_then(|key| {
            let meta = self.remembered(path).flatten()?;
            (meta.kind == Kind::File).then(|| (key, self.meta_attrs(&meta).to_metadata()))
        });
        let copy = SpoolCopy::new(self.shared.clone(), key)
            .map_err(|e| StoreError::failed(libc::EIO, "making a working copy in the spool", e))?;
        Ok(copy)
    }

    fn commit(&self, req: CommitRequest<'_>) -> StoreResult<Committed> {
        self.settled(req.path)?;
        super::commit::commit(self, req)
    }

    fn mknod(&self, path: &Path, kind: Kind, perm: u16, owner: Owner) -> StoreResult<Meta> {
        self.settled(path)?;
        if !matches!(kind, Kind::Fifo | Kind::Socket) {
            return Err(err(libc::EPERM));
        }
        let attrs = self.new_attrs(kind, perm, owner);
        self.make_object(path, &attrs, Body::empty())
    }

    fn mkdir(&self, path: &Path, perm: u16, owner: Owner) -> StoreResult<Meta> {
        self.settled(path)?;
        if is_root(path) {
            return Err(err(libc::EEXIST));
        }
        let marker = self.keys.dir_prefix(path)?;
        self.check_free(path, true)?;
        let condition = if self.shared.conditional {
            Condition::Absent
        } else {
            Condition::None
        };
        match self
            .shared
            .client
            .put(&marker, Body::empty(), &Metadata::new(), &condition)
        {
            Ok(_) => {}
            Err(e) if e.is(Failure::Precondition) || e.is(Failure::Conflict) => {
                // Made by another host since this one looked (it may remember the name
                // absent): asked again at the next lookup, which then finds it.
                self.forget(path);
                return Err(err(libc::EEXIST));
            }
            Err(e) => return Err(e.into()),
        }
        let attrs = self.new_attrs(Kind::Dir, perm, owner);
        if let Err(e) = self.index_attrs(path, &attrs, None, false) {
            let _ = self.shared.client.delete(&marker);
            return Err(e);
        }
        let meta = self.dir_meta(&attrs);
        self.remember(path, Some(meta.clone()));
        // Its name was free (no key had its prefix): it is as wholly known as a listing made
        // now, so the names a program makes in it next are known to be free without asking.
        self.keep_listing(path, Instant::now(), Default::default());
        Ok(meta)
    }

    fn rmdir(&self, path: &Path) -> StoreResult<()> {
        self.settled(path)?;
        if is_root(path) {
            return Err(err(libc::EBUSY));
        }
        // As the store last saw it (the kernel has just looked it up); whether it is empty is
        // asked below, always.
        let meta = self.stat(path)?;
        if meta.kind != Kind::Dir {
            return Err(err(libc::ENOTDIR));
        }
        if !self.dir_is_empty(path)? {
            return Err(err(libc::ENOTEMPTY));
        }
        let prefix = self.keys.dir_prefix(path)?;
        self.shared
            .client
            .delete_many(&[prefix.clone() + INDEX, prefix.clone()])?;
        // SeaweedFS keeps an emptied directory until its own key is deleted.
        self.shared.client.delete(&prefix)?;
        // What was below it goes; its directory's listing stays known, without its name
        // (`git gc` removes directory after directory and looks up the next one).
        self.forget_below(path);
        self.remember(path, None);
        self.unindex(path, &meta)?;
        Ok(())
    }

    fn unlink(&self, path: &Path) -> StoreResult<()> {
        self.settled(path)?;
        // What the kernel's lookup just learnt (or a listing did) is trusted for the TTL, as
        // a stat is: `rm` of a listed directory costs one DELETE a file, not a HEAD more.
        let meta = match self.remembered(path) {
            Some(Some(meta)) => meta,
            _ => self.lookup(path)?,
        };
        if meta.kind == Kind::Dir {
            return Err(err(libc::EISDIR));
        }
        let key = self.keys.key(path)?;
        // A pending file has no object; one another host made at its name meanwhile goes.
        let pending = lock(&self.pending).remove(path);
        if let Err(e) = self.shared.client.delete(&key) {
            if let Some(p) = pending {
                lock(&self.pending).insert(path.to_path_buf(), p);
            }
            return Err(e.into());
        }
        self.shared.cache.forget(&key);
        self.remember(path, None);
        self.unindex(path, &meta)?;
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path, mode: RenameMode) -> StoreResult<()> {
        self.settled(from)?;
        self.settled(to)?;
        if mode == RenameMode::Exchange {
            // Two objects cannot be swapped atomically on S3.
            return Err(err(libc::EINVAL));
        }
        if is_root(from) || is_root(to) {
            return Err(err(libc::EBUSY));
        }
        if to.starts_with(from) && to != from {
            return Err(err(libc::EINVAL));
        }
        // Pending files are made first: a rename copies objects.
        self.materialize_tree(from)?;
        self.materialize(to)?;
        // Both names as the store last saw them, within the metadata TTL (the kernel has just
        // looked them up): a file saved by a rename costs its copy and delete alone. A source
        // that changed meanwhile fails the copy's condition, and is looked up again, as is one
        // whose metadata the copy writes (see `rename_file`); a source another host keeps
        // rewriting is tried again a few times, with a growing pause, before `EIO`.
        for attempt in 0..RENAME_ATTEMPTS {
            let again = attempt > 0;
            if attempt > 1 {
                backoff(attempt - 2);
            }
            let (source, fresh) = match self.remembered(from) {
                Some(Some(meta)) if !again => (meta, false),
                Some(None) if !again => return Err(err(libc::ENOENT)),
                _ => (self.lookup(from)?, true),
            };
            if from == to {
                return match mode {
                    RenameMode::NoReplace => Err(err(libc::EEXIST)),
                    _ => Ok(()),
                };
            }
            if from.starts_with(to) {
                return Err(err(libc::ENOTEMPTY));
            }
            // A target remembered absent is assumed so, and the copy made only if it still is
            // (see `rename_file`); one that is there is looked at afresh: its attributes
            // decide what the directory's index must say of the name.
            let (target, assumed) = match self.remembered(to) {
                Some(None) if !again && self.shared.conditional => (None, true),
                _ => (self.exists(to)?, false),
            };
            if mode == RenameMode::NoReplace && target.is_some() {
                return Err(err(libc::EEXIST));
            }
            if source.kind == Kind::Dir {
                return self.rename_dir(from, to, target.as_ref());
            }
            if self.rename_file(from, to, (&source, fresh), (target.as_ref(), assumed), mode)? {
                return Ok(());
            }
        }
        Err(StoreError::failed(
            libc::EIO,
            "rename",
            io::Error::other("the source changed while it was being renamed"),
        )
        .transient())
    }

    fn link(&self, _from: &Path, _to: &Path) -> StoreResult<Meta> {
        Err(err(libc::EPERM))
    }

    fn symlink(&self, target: &Path, path: &Path, owner: Owner) -> StoreResult<Meta> {
        self.settled(path)?;
        use std::os::unix::ffi::OsStrExt;
        let attrs = self.new_attrs(Kind::Symlink, 0o777, owner);
        let body = Body::Bytes(Arc::new(target.as_os_str().as_bytes().to_vec()));
        self.make_object(path, &attrs, body)
    }

    fn readlink(&self, path: &Path) -> StoreResult<PathBuf> {
        self.settled(path)?;
        use std::os::unix::ffi::OsStringExt;
        let meta = self.stat(path)?;
        if meta.kind != Kind::Symlink {
            return Err(err(libc::EINVAL));
        }
        let key = self.keys.key(path)?;
        let mut bytes = Vec::new();
        self.shared.client.get(&key, None, None, &mut |b| {
            if bytes.len() + b.len() > 4096 {
                return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
            }
            bytes.extend_from_slice(b);
            Ok(())
        })?;
        Ok(PathBuf::from(OsString::from_vec(bytes)))
    }

    fn set_attr(&self, path: &Path, attr: &SetAttr) -> StoreResult<Meta> {
        self.settled(path)?;
        self.materialize(path)?;
        let meta = self.lookup(path)?;
        let old = self.meta_attrs(&meta);
        let now = SystemTime::now();
        let mut new = old;
        if let Some(p) = attr.perm {
            new.perm = p;
        }
        if let Some(u) = attr.uid {
            new.uid = u;
        }
        if let Some(g) = attr.gid {
            new.gid = g;
        }
        // `UTIME_NOW` (`touch`) of an object: the copy's own time, its `Last-Modified`, as
        // for a commit; no explicit time to keep in metadata and index. A directory has no
        // time of its own: it keeps the time given.
        let touched = matches!(attr.mtime, Some(TimeSpec::Now)) && meta.kind != Kind::Dir;
        if let Some(t) = attr.mtime {
            new.mtime = match t {
                TimeSpec::Now if touched => None,
                TimeSpec::Now => Some(now),
                TimeSpec::At(t) => Some(t),
            };
        }
        if new == old && !touched {
            // Atime alone: not kept. An index entry this host left narrower than the object
            // (a narrowing whose object write then failed) is set right.
            if meta.kind != Kind::Dir && self.indexed_otherwise(path, &new) {
                self.index_attrs(path, &new, meta.version.tag(), true)?;
            }
            return Ok(meta);
        }
        if meta.kind == Kind::Dir {
            if is_root(path) {
                let entry = IndexEntry::of(&new, None);
                self.update_index(Path::new(""), &|index| {
                    index.entries.insert(".".into(), entry.clone()).as_ref() != Some(&entry)
                })?;
            } else {
                self.index_attrs(path, &new, None, true)?;
            }
            let meta = self.dir_meta(&new);
            self.remember(path, Some(meta.clone()));
            return Ok(meta);
        }
        // An object: its metadata replaced by a copy onto itself.
        let key = self.keys.key(path)?;
        if !new.are_default(&self.defaults) || !old.are_default(&self.defaults) {
            self.narrow_index_first(path, &new)?;
        }
        let etag = meta.version.tag().map(str::to_string);
        let mut metadata = new.to_metadata();
        if let Some(l) = etag
            .as_deref()
            .and_then(|e| self.shared.lineage_of(&key, e))
        {
            metadata.insert(super::LINEAGE.into(), l);
        }
        let new_etag = match self.shared.client.copy(
            &key,
            &key,
            Some(&metadata),
            etag.as_deref(),
            &Condition::None,
        ) {
            Ok(e) => e,
            Err(e) if e.is(Failure::Precondition) => {
                // Replaced meanwhile: on the new version.
                self.forget(path);
                return Err(StoreError::from(e).context("setattr").transient());
            }
            Err(e) => return Err(e.into()),
        };
        self.shared.learn_lineage(&key, &new_etag, &metadata);
        self.index_attrs(
            path,
            &new,
            Some(&new_etag),
            !old.are_default(&self.defaults),
        )?;
        // The cached bytes are the same version's.
        let set = self.made_meta(path, meta.size, &new_etag, &new);
        self.remember(path, Some(set.clone()));
        if let Some(tag) = meta.version.tag() {
            let mut attrs_set = lock(&self.attrs_set);
            if attrs_set.len() > 10_000 {
                attrs_set.clear();
            }
            attrs_set.insert(path.to_path_buf(), (tag.to_string(), set.clone()));
        }
        Ok(set)
    }

    fn sync(&self, _path: &Path) -> StoreResult<()> {
        // What the store acknowledged is durable there.
        Ok(())
    }

    fn statfs(&self) -> StoreResult<StoreStatfs> {
        Ok(StoreStatfs {
            blocks: 1 << 40,
            bfree: 1 << 40,
            bavail: 1 << 40,
            files: 1 << 40,
            ffree: 1 << 40,
            bsize: 4096,
            namelen: 255,
        })
    }

    fn usage(&self) -> StoreResult<Usage> {
        space_usage(&self.shared, self.keys.root())
    }

    fn get_xattr(&self, _path: &Path, _name: &OsStr) -> StoreResult<Vec<u8>> {
        Err(err(libc::EOPNOTSUPP))
    }

    fn set_xattr(
        &self,
        _path: &Path,
        _name: &OsStr,
        _value: &[u8],
        _mode: XattrMode,
    ) -> StoreResult<()> {
        Err(err(libc::EOPNOTSUPP))
    }

    fn list_xattr(&self, _path: &Path) -> StoreResult<Vec<OsString>> {
        Err(err(libc::EOPNOTSUPP))
    }

    fn remove_xattr(&self, _path: &Path, _name: &OsStr) -> StoreResult<()> {
        Err(err(libc::EOPNOTSUPP))
    }

    fn forget(&self, path: &Path, tree: bool) {
        // What another host made at a name this host created and has not committed yet is
        // what the name shows now, if it is still there (see `pending`).
        if tree {
            lock(&self.pending).retain(|p, _| !p.starts_with(path));
            lock(&self.contested).retain(|p| !p.starts_with(path));
        } else if lock(&self.pending).contains_key(path) {
            lock(&self.contested).insert(path.to_path_buf());
        }
        // The entry (or the tree), its directory's listing, and the index holding its
        // attributes (`S3Store::forget` here is the inherent one, of one entry).
        // The time this host gave its own version too: another host may have written the
        // same bytes (the same ETag) since.
        if tree {
            self.forget_tree(path);
            lock(&self.stamped).retain(|p, _| !p.starts_with(path));
        } else {
            S3Store::forget(self, path);
            lock(&self.stamped).remove(path);
            self.follow_appends_elsewhere(path);
        }
        lock(&self.indexes).remove(&split(path).0);
    }

    fn forget_removed(&self, path: &Path) {
        // A file this host is still creating has no object: the removal heard is of an older
        // one, and the name still shows this host's file (`remembered` answers from `pending`).
        if lock(&self.pending).contains_key(path) {
            // Whatever was told of at the name before is gone now.
            lock(&self.contested).remove(path);
            return;
        }
        Store::forget(self, path, false);
    }
}

/// The first object under `prefix` written after `since`, if any.
fn written_since(shared: &Shared, prefix: &str, since: SystemTime) -> StoreResult<Option<String>> {
    let mut token: Option<String> = None;
    loop {
        let page = shared.client.list(prefix, false, token.as_deref(), None)?;
        if let Some(o) = page.objects.iter().find(|o| o.last_modified > since) {
            return Ok(Some(o.key.clone()));
        }
        match page.next {
            Some(next) => token = Some(next),
            None => return Ok(None),
        }
    }
}

/// What the space under `root` holds: its files, links and names, its directories (every
/// prefix below the root), and the bytes of its files.
fn space_usage(shared: &Shared, root: &str) -> StoreResult<Usage> {
    let mut usage = Usage::default();
    let mut dirs = std::collections::HashSet::new();
    let mut token: Option<String> = None;
    loop {
        let page = shared.client.list(root, false, token.as_deref(), None)?;
        for o in &page.objects {
            let Some(rest) = o.key.strip_prefix(root) else {
                continue;
            };
            // Every directory above the entry.
            let mut at = 0;
            while let Some(i) = rest[at..].find('/') {
                dirs.insert(rest[..at + i].to_string());
                at += i + 1;
            }
            let name = &rest[at..];
            if name.is_empty() || name == INDEX {
                continue;
            }
            usage.files += 1;
            usage.bytes += o.size;
        }
        match page.next {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    usage.files += dirs.len() as u64;
    Ok(usage)
}

/// The spaces of one S3 store.
pub struct S3Spaces {
    shared: Arc<Shared>,
    /// The spaces' change feeds in the bucket, started when the first is wanted (an error,
    /// logged: the thread could not start).
    feeds: std::sync::OnceLock<Result<BucketFeeds, String>>,
}

impl S3Spaces {
    pub(super) fn new(shared: Arc<Shared>) -> S3Spaces {
        S3Spaces {
            shared,
            feeds: std::sync::OnceLock::new(),
        }
    }

    /// The feeds, started with `retention` if not yet.
    fn feeds(&self, retention: Retention) -> Result<&BucketFeeds, &String> {
        self.feeds
            .get_or_init(|| {
                BucketFeeds::start(
                    self.shared.client.clone(),
                    &self.shared.prefix,
                    self.shared.conditional,
                    retention,
                    Duration::from_secs_f64(self.shared.config.events_poll_secs),
                )
                .map_err(|e| format!("cannot start the change feed thread: {e}"))
            })
            .as_ref()
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn keys(&self, space: &SpaceId) -> SpaceKeys {
        SpaceKeys::new(&self.shared.prefix, space.kind.dir(), &space.id)
    }

    /// Replays what crashed processes of this host left (see `state`).
    pub(super) fn recover(&self, leftovers: Vec<Leftover>) {
        let renames = leftovers
            .iter()
            .flat_map(|l| l.records.iter())
            .filter(|(_, r)| matches!(r, Record::Rename { .. }))
            .count();
        if renames > 0 {
            // Every object of each is copied before the mount is up: say why it waits.
            log::info!(
                "{}: finishing {renames} directory renames left by an earlier crash before \
                 mounting (every object of each is copied: this takes a while for large trees)",
                self.shared.location
            );
        }
        let (mut aborted, mut renamed, mut files_renamed) = (0, 0, 0);
        for left in leftovers {
            for (path, record) in &left.records {
                // When the operation began (the record was written then).
                let began = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                let done = replay(&self.shared, record, began).map(|did| match record {
                    Record::Upload { .. } => aborted += 1,
                    Record::Rename { .. } => renamed += 1,
                    Record::FileRename { .. } => files_renamed += usize::from(did),
                });
                match done {
                    Ok(()) => left.forget(path),
                    Err(e) => log::warn!(
                        "cannot finish what a crashed process left ({record:?}): {e}; the next \
                         start tries again"
                    ),
                }
            }
            left.finish();
        }
        if aborted + renamed + files_renamed > 0 {
            log::info!(
                "{}: aborted {aborted} multipart uploads and finished {renamed} directory \
                 renames and {files_renamed} file renames left by an earlier crash",
                self.shared.location
            );
        }
    }
}

/// Finishes `record`, an operation of this host cut short (by a crash, or by an error
/// part-way), begun at `began` by this host's clock: an upload is aborted, a rename finished
/// (see [`finish_rename`] and [`finish_file_rename`]). `Ok(false)`: a file rename found not to
/// need finishing.
pub(super) fn replay(
    shared: &Arc<Shared>,
    record: &Record,
    began: Option<SystemTime>,
) -> StoreResult<bool> {
    match record {
        Record::Upload { key, upload_id } => shared
            .client
            .abort_upload(key, upload_id)
            .map(|()| true)
            .map_err(StoreError::from),
        Record::Rename { root, from, to } => {
            finish_rename(shared, root, from, to, began).map(|()| true)
        }
        Record::FileRename {
            root,
            from,
            to,
            source,
            target,
        } => finish_file_rename(shared, root, (from, source), (to, target.as_deref()), began),
    }
}

/// How much later than a rename's start an object under its old name must be to count as
/// written after it: the store's clock (`Last-Modified`, whole seconds) and the host's differ.
const RENAME_CLOCK_SLACK: Duration = Duration::from_secs(2);

/// Finishes a directory rename a crash interrupted (begun at `began`, by this host's clock):
/// the objects left under `from` move, and the directory's index entry with them — unless an
/// object under `from` was written after the rename began: other hosts have worked in the tree
/// since (made it again, written into it), and finishing would carry their work off to `to`,
/// over what is there. Then it is left as it is, both names holding part of the tree, and
/// logged for someone to sort out (the record is done with).
fn finish_rename(
    shared: &Arc<Shared>,
    root: &str,
    from: &str,
    to: &str,
    began: Option<SystemTime>,
) -> StoreResult<()> {
    if let Some(began) = began
        && let Some(newer) = written_since(shared, from, began + RENAME_CLOCK_SLACK)?
    {
        log::error!(
            "not finishing the rename of {from} to {to} that a crash interrupted: {newer} was \
             written since it began (by another host), so both names hold part of the tree; \
             move what belongs where by hand"
        );
        return Ok(());
    }
    // Through a store of the space (its owner does not matter here).
    let keys = SpaceKeys::new_root(root);
    let store = S3Store::new(
        shared.clone(),
        keys.clone(),
        Defaults {
            uid: 0,
            gid: 0,
            dir_mtime: SystemTime::UNIX_EPOCH,
        },
    );
    store.move_tree(from, to)?;
    let (Some(from_path), Some(to_path)) = (
        keys.path_of(from.trim_end_matches('/')),
        keys.path_of(to.trim_end_matches('/')),
    ) else {
        return Ok(());
    };
    move_index_entry(&store, &from_path, &to_path)
}

/// Finishes a file rename a crash interrupted (begun at `began`, by this host's clock) from
/// the key `from` (then at version `source`) to `to` (then at version `target`, or absent);
/// `Ok(true)` if it deleted the source. The copy is taken as made when `to` holds a version
/// other than `target` that is the source's (a copy keeps the ETag of an object uploaded
/// whole) or was written since the rename began; the source goes only if it is still the
/// version renamed, so another host's rewrite of it since, and a rename whose copy never
/// landed, leave both names as they are (the rename then did not happen, and `rename(2)`
/// was never answered: either outcome is one it may have).
fn finish_file_rename(
    shared: &Arc<Shared>,
    root: &str,
    (from, source): (&str, &str),
    (to, target): (&str, Option<&str>),
    began: Option<SystemTime>,
) -> StoreResult<bool> {
    let head = |key: &str| match shared.client.head(key) {
        Ok(info) => Ok(Some(info)),
        Err(e) if e.is(Failure::NotFound) => Ok(None),
        Err(e) => Err(StoreError::from(e)),
    };
    let Some(now_from) = head(from)? else {
        return Ok(false); // The delete was made (or the file removed since).
    };
    if now_from.etag != source {
        return Ok(false); // Written since: no longer the file renamed.
    }
    let Some(now_to) = head(to)? else {
        return Ok(false); // The copy was never made.
    };
    let copied = Some(now_to.etag.as_str()) != target
        && (now_to.etag == source
            || began.is_some_and(|b| now_to.last_modified + RENAME_CLOCK_SLACK >= b));
    if !copied {
        return Ok(false);
    }
    shared.client.delete(from)?;
    shared.cache.forget(from);
    // Its attributes' entry in the listing moves with it (the copy carried them in its
    // metadata), as the rename would have moved it.
    let keys = SpaceKeys::new_root(root);
    if let (Some(from_path), Some(to_path)) = (keys.path_of(from), keys.path_of(to)) {
        let store = S3Store::new(
            shared.clone(),
            keys,
            Defaults {
                uid: 0,
                gid: 0,
                dir_mtime: SystemTime::UNIX_EPOCH,
            },
        );
        move_index_entry(&store, &from_path, &to_path)?;
    }
    Ok(true)
}

/// Moves the entry of `from` in its directory's index to `to` in its own (what finishing a
/// rename after a crash does; nothing if `from` has none).
fn move_index_entry(store: &S3Store, from: &Path, to: &Path) -> StoreResult<()> {
    let (from_dir, from_name) = split(from);
    let (to_dir, to_name) = split(to);
    let moved = store
        .fetch_index(&from_dir)?
        .1
        .entries
        .get(&from_name)
        .cloned();
    if let Some(entry) = moved {
        store.update_index(&to_dir, &|index| {
            index
                .entries
                .insert(to_name.clone(), entry.clone())
                .as_ref()
                != Some(&entry)
        })?;
        store.update_index(&from_dir, &|index| {
            index.entries.remove(&from_name).is_some()
        })?;
    }
    Ok(())
}

fn io_err(e: StoreError) -> io::Error {
    let errno = e.raw_os_error();
    io::Error::new(io::Error::from_raw_os_error(errno).kind(), format!("{e}"))
}

/// Presigned GETs of one space's objects (`roomfs url --direct`).
struct Presigner {
    shared: Arc<Shared>,
    keys: SpaceKeys,
}

impl crate::urls::Presign for Presigner {
    fn presign_get(
        &self,
        path: &Path,
        ttl: Duration,
        disposition: crate::urls::Disposition,
        _file_name: &str,
    ) -> io::Result<String> {
        let key = self.keys.key(path).map_err(io_err)?;
        let header = crate::urls::http::content_disposition(disposition, path);
        self.shared
            .client
            .presign_get(&key, ttl, &header)
            .map_err(|e| io_err(e.into()))
    }
}

impl Spaces for S3Spaces {
    fn presigner(&self, space: &SpaceId) -> Option<Arc<dyn crate::urls::Presign>> {
        Some(Arc::new(Presigner {
            shared: self.shared.clone(),
            keys: self.keys(space),
        }))
    }

    fn space_exists(&self, space: &SpaceId) -> io::Result<bool> {
        let keys = self.keys(space);
        let page = self
            .shared
            .client
            .list(keys.root(), false, None, Some(1))
            .map_err(|e| io_err(e.into()))?;
        Ok(!page.objects.is_empty())
    }

    fn open_space(&self, space: &SpaceId, create: Option<Owner>) -> io::Result<Arc<dyn Store>> {
        let keys = self.keys(space);
        let root = keys.root().to_string();
        let page = self
            .shared
            .client
            .list(&root, false, None, Some(1))
            .map_err(|e| io_err(e.into()))?;
        if page.objects.is_empty() {
            let Some(owner) = create else {
                return Err(io::Error::from_raw_os_error(libc::ENOENT));
            };
            let (uid, gid) = owner.unwrap_or_else(|| {
                (
                    nix::unistd::geteuid().as_raw(),
                    nix::unistd::getegid().as_raw(),
                )
            });
            let attrs = Attrs {
                kind: Kind::Dir,
                perm: super::attrs::DIR_PERM,
                uid,
                gid,
                mtime: Some(to_second(SystemTime::now())),
            };
            let index = Index {
                v: 1,
                entries: [(".".to_string(), IndexEntry::of(&attrs, None))].into(),
            };
            let index_key = root.clone() + INDEX;
            // Racing hosts: the first index made wins (the space's owner and birth).
            match self.shared.client.put(
                &index_key,
                Body::Bytes(Arc::new(index.to_bytes())),
                &Metadata::new(),
                &Condition::Absent,
            ) {
                Ok(_) => {}
                Err(e) if e.is(Failure::Precondition) || e.is(Failure::Conflict) => {}
                Err(e) => return Err(io_err(e.into())),
            }
            self.shared
                .client
                .put(&root, Body::empty(), &Metadata::new(), &Condition::None)
                .map_err(|e| io_err(e.into()))?;
        }
        let store = S3Store::new(
            self.shared.clone(),
            keys,
            Defaults {
                uid: 0,
                gid: 0,
                dir_mtime: SystemTime::UNIX_EPOCH,
            },
        );
        // The space's owner and birth, from its root's index entry.
        let index = store.index(Path::new(""), None).map_err(io_err)?;
        let defaults = match index.entries.get(".") {
            Some(e) => Defaults {
                uid: e.uid.unwrap_or(0),
                gid: e.gid.unwrap_or(0),
                dir_mtime: e
                    .mtime
                    .as_deref()
                    .and_then(super::attrs::parse_time)
                    .unwrap_or(SystemTime::UNIX_EPOCH),
            },
            None => *store.defaults(),
        };
        Ok(Arc::new(S3Store::new(
            self.shared.clone(),
            store.keys().clone(),
            defaults,
        )))
    }

    fn space_usage(&self, space: &SpaceId) -> io::Result<Option<Usage>> {
        let keys = self.keys(space);
        let usage = space_usage(&self.shared, keys.root()).map_err(io_err)?;
        let page = self
            .shared
            .client
            .list(keys.root(), false, None, Some(1))
            .map_err(|e| io_err(e.into()))?;
        if page.objects.is_empty() {
            return Ok(None);
        }
        Ok(Some(usage))
    }

    fn delete_space(&self, space: &SpaceId) -> io::Result<Usage> {
        let keys = self.keys(space);
        let root = keys.root().to_string();
        let usage = space_usage(&self.shared, &root).map_err(io_err)?;
        let mut dirs = std::collections::BTreeSet::new();
        loop {
            let page = self
                .shared
                .client
                .list(&root, false, None, None)
                .map_err(|e| io_err(e.into()))?;
            if page.objects.is_empty() {
                break;
            }
            let keys: Vec<String> = page.objects.into_iter().map(|o| o.key).collect();
            for k in &keys {
                self.shared.cache.forget(k);
                let rest = &k[root.len()..];
                let mut at = 0;
                while let Some(i) = rest[at..].find('/') {
                    dirs.insert(format!("{root}{}", &rest[..at + i + 1]));
                    at += i + 1;
                }
            }
            for batch in keys.chunks(super::client::DELETE_BATCH) {
                self.shared
                    .client
                    .delete_many(batch)
                    .map_err(|e| io_err(e.into()))?;
            }
        }
        // Emptied directories, deepest first (SeaweedFS lists them until they are deleted).
        let mut dirs: Vec<String> = dirs.into_iter().collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
        for d in dirs {
            let _ = self.shared.client.delete(&d);
        }
        let _ = self.shared.client.delete(&root);
        // Its change feed too: a space made again under the same id starts from `seq` 1.
        if let Some(Ok(feeds)) = self.feeds.get() {
            feeds.forget(space);
        }
        remove_feed(self.shared.client.as_ref(), &self.shared.prefix, space)?;
        Ok(usage)
    }

    fn describe(&self, space: &SpaceId) -> String {
        format!("{}/{}", self.shared.location, self.keys(space).root())
    }

    fn change_feed(
        &self,
        space: &SpaceId,
        retention: Retention,
    ) -> Option<io::Result<Arc<dyn ChangeFeed>>> {
        Some(match self.feeds(retention) {
            Ok(feeds) => feeds
                .feed(space)
                .map(|f| f as Arc<dyn ChangeFeed>)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.describe(space)))),
            Err(e) => Err(io::Error::other(e.clone())),
        })
    }
}
