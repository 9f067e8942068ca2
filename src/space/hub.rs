//! The spaces open in this process. Each open space has one [`Space`]: its store, its limits
//! and usage, and the mounts showing it. Every mount of a space in the process shares that
//! object, so a change made through one mount, or by the daemon itself (a session exported into
//! a room), is counted once against the space's limits and reaches the other mounts' kernel
//! caches at once ([`Space::changed`]). Each space also has its change feed
//! ([`crate::events`]): every change gets its place in the space's sequence of events there,
//! and changes other processes (or hosts) made come back from it to this process's mounts.
//!
//! Invariant: while any mount or operation holds a space, `Hub::open` hands out that same
//! object; a space nobody holds is dropped (its store closed) and opened afresh next time.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use super::claims::{Claim, Claims, Span};
use super::locks::Locks;
use super::quota::{Limits, Quota};
use super::{SpaceId, SpaceKind};
use crate::events::log::Logs;
use crate::events::{ChangeFeed, Changed, ForeignChanges, MemFeed, Record, Retention};
use crate::records::RecordStore;
use crate::store::Owner;
use crate::store::Store;
use crate::store::Usage;
use crate::store::ending::Ending;
use crate::store::local::LocalBackend;
use crate::store::local::at::Tally;
use crate::store::meta::MetaOverlay;

/// Where the spaces of one kind are stored: the local data dir, or an S3 bucket. Makes, opens,
/// counts and deletes spaces; nothing outside it touches a space's storage directly.
pub trait Spaces: Send + Sync {
    /// Opens the store of `space`. With `create`, a missing space is made first, owned by
    /// the given owner (or the daemon's own user); without, a missing one is `ENOENT`.
    fn open_space(&self, space: &SpaceId, create: Option<Owner>) -> io::Result<Arc<dyn Store>>;
    /// Whether `space` exists (cheaply: without counting what it holds).
    fn space_exists(&self, space: &SpaceId) -> io::Result<bool>;
    /// What `space` holds (entries of every kind, bytes of files); `None` if it does not exist.
    fn space_usage(&self, space: &SpaceId) -> io::Result<Option<Usage>>;
    /// Removes `space` and everything in it; returns what was removed.
    fn delete_space(&self, space: &SpaceId) -> io::Result<Usage>;
    /// Where `space` lives, for messages.
    fn describe(&self, space: &SpaceId) -> String;
    /// The change feed the store keeps for `space` itself, shared by every host using it (an
    /// S3 store's, in its bucket), keeping `retention`; `None`: the store keeps none, and the
    /// data dir's change log serves.
    fn change_feed(
        &self,
        space: &SpaceId,
        retention: Retention,
    ) -> Option<io::Result<Arc<dyn ChangeFeed>>>;
    /// The store's own download URLs for `space` (presigned GETs), where it has them.
    fn presigner(&self, space: &SpaceId) -> Option<Arc<dyn crate::urls::Presign>>;
}

impl Spaces for LocalBackend {
    fn open_space(&self, space: &SpaceId, create: Option<Owner>) -> io::Result<Arc<dyn Store>> {
        Ok(Arc::new(LocalBackend::open_space(self, space, create)?))
    }

    fn space_exists(&self, space: &SpaceId) -> io::Result<bool> {
        LocalBackend::space_exists(self, space)
    }

    fn space_usage(&self, space: &SpaceId) -> io::Result<Option<Usage>> {
        Ok(LocalBackend::space_usage(self, space)?.map(usage_of))
    }

    fn delete_space(&self, space: &SpaceId) -> io::Result<Usage> {
        Ok(usage_of(LocalBackend::delete_space(self, space)?))
    }

    fn describe(&self, space: &SpaceId) -> String {
        LocalBackend::describe(self, space).display().to_string()
    }

    fn change_feed(
        &self,
        _space: &SpaceId,
        _retention: Retention,
    ) -> Option<io::Result<Arc<dyn ChangeFeed>>> {
        None
    }

    fn presigner(&self, _space: &SpaceId) -> Option<Arc<dyn crate::urls::Presign>> {
        // The local disk has no URLs of its own: the daemon serves downloads.
        None
    }
}

/// Something that shows a space and must hear of changes made to it by others (a mount: its
/// kernel caches).
pub trait SpaceWatcher: Send + Sync {
    /// The space was changed by someone other than this watcher: another mount, the process
    /// itself, or another process (or host) sharing the space.
    fn changed_elsewhere(&self, change: &Changed, made: Made);
}

/// Where a change a watcher hears of was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Made {
    /// In this process (another mount, the daemon): its mounts are told before anything else
    /// in the process changes the names involved (see `Space::settle`).
    InProcess,
    /// By another process or host, heard through the change feed: possibly after this
    /// process made further changes at those names.
    Elsewhere,
}

/// Identifies a watcher of a space (see [`Space::watch`]).
pub type WatcherId = u64;

/// One open space, shared by everything in the process that uses it.
pub struct Space {
    id: SpaceId,
    /// The space's store, behind the layer that ends it when the space is deleted.
    store: Arc<dyn Store>,
    ending: Arc<Ending>,
    quota: Option<Arc<Quota>>,
    watchers: RwLock<Vec<(WatcherId, Weak<dyn SpaceWatcher>)>>,
    next_watcher: AtomicU64,
    /// The names operations are changing right now (see `claims`).
    claims: Claims,
    /// Changes made here that other mounts have not been told of yet (told once the thread
    /// that made them holds no claim: see `tell_watchers`, `settle`).
    telling: Arc<AtomicUsize>,
    /// The POSIX record locks on its files (see `locks`).
    locks: Locks,
    /// Where its changes are sequenced and others' come from.
    feed: Arc<dyn ChangeFeed>,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Space {
    /// A space over `store`, with `quota` (none: unlimited); outside a hub (tests, tools):
    /// its events stay in this process.
    pub fn new(id: SpaceId, store: Arc<dyn Store>, quota: Option<Arc<Quota>>) -> Space {
        let feed = Arc::new(MemFeed::new(Retention::default()));
        Space::with_feed(id, store, quota, feed)
    }

    /// A space whose changes go through `feed` (see [`Space::listen`]).
    pub fn with_feed(
        id: SpaceId,
        store: Arc<dyn Store>,
        quota: Option<Arc<Quota>>,
        feed: Arc<dyn ChangeFeed>,
    ) -> Space {
        let ending = Arc::new(Ending::new(store));
        Space {
            id,
            store: ending.clone(),
            ending,
            quota,
            watchers: RwLock::new(Vec::new()),
            next_watcher: AtomicU64::new(1),
            claims: Claims::default(),
            telling: Arc::new(AtomicUsize::new(0)),
            locks: Locks::default(),
            feed,
        }
    }

    /// Ends the space, which is being deleted: from now on its store answers every request
    /// with `ENOENT` (see `store::ending`), so a mount still serving it (detached while busy)
    /// neither adds entries while it is deleted nor shows what a later space of the same id
    /// holds. Returns once the requests under way are done (at most 10 s: whether they were).
    pub fn end(&self) -> bool {
        self.ending.end()
    }

    /// Has this space hear, from its feed, of changes other processes made (its mounts then
    /// hear of them as of any change made elsewhere).
    pub fn listen(self: &Arc<Self>) {
        let me: std::sync::Weak<dyn ForeignChanges> = Arc::downgrade(self) as _;
        self.feed.listen(me);
    }

    /// The space's change feed.
    pub fn feed(&self) -> &Arc<dyn ChangeFeed> {
        &self.feed
    }

    /// Claims `names` for a change (see `claims`): waits while another operation of this
    /// process changes any of them; held until the returned claim is dropped.
    pub fn claim(&self, names: &[(&Path, Span)]) -> Claim<'_> {
        self.claims.claim(names)
    }

    /// Whether the other mounts have been told of every change made here so far.
    pub fn all_told(&self) -> bool {
        self.telling.load(Ordering::Acquire) == 0
    }

    /// Waits (at most `bound`) until the other mounts have been told of every change made
    /// here so far. A change is told once the thread that made it drops its last claim, so a
    /// claim it held can be taken before its mounts heard of it: a commit that then claims a
    /// file's path would go to the name a rename in another mount just took away (`ENOENT`,
    /// or on S3 the old name made again). Whether all were told in time (the teller may wait
    /// for the caller's own handle: then it is not, and the caller goes on as before).
    pub fn settle(&self, bound: std::time::Duration) -> bool {
        if self.telling.load(Ordering::Acquire) == 0 {
            return true;
        }
        if super::claims::held_here() {
            // What this thread made is told only once it lets its claims go.
            return false;
        }
        let start = std::time::Instant::now();
        while self.telling.load(Ordering::Acquire) > 0 {
            if start.elapsed() >= bound {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        true
    }

    /// Waits while a rename moving `path` runs (see `Claims::wait_moves`); whether it waited.
    pub fn wait_moves(&self, path: &Path) -> bool {
        self.claims.wait_moves(path)
    }

    pub fn id(&self) -> &SpaceId {
        &self.id
    }

    /// The POSIX record locks on the space's files, shared by all its mounts in the process.
    pub fn locks(&self) -> &Locks {
        &self.locks
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The space's limits and what it uses of them; `None` when it is unlimited.
    pub fn quota(&self) -> Option<&Arc<Quota>> {
        self.quota.as_ref()
    }

    /// Registers `watcher` to hear of changes made by others; returns its id.
    pub fn watch(&self, watcher: Weak<dyn SpaceWatcher>) -> WatcherId {
        let id = self.next_watcher.fetch_add(1, Ordering::Relaxed);
        let mut watchers = write(&self.watchers);
        watchers.retain(|(_, w)| w.strong_count() > 0);
        watchers.push((id, watcher));
        id
    }

    /// Forgets the watcher `id`.
    pub fn unwatch(&self, id: WatcherId) {
        write(&self.watchers).retain(|(other, _)| *other != id);
    }

    /// The space changed, through the watcher `by` (a mount) or, with `None`, by the process
    /// itself, on behalf of `participant`: every other watcher hears of it at once, and the
    /// feed records it for everybody else. Watchers only queue what they hear (see
    /// [`SpaceWatcher`]) and the feed writes from a thread of its own, so this never waits for
    /// a kernel or a disk.
    pub fn changed(&self, changes: &[Changed], participant: &Arc<str>, by: Option<WatcherId>) {
        self.tell_watchers(changes, by, Made::InProcess);
        self.feed.publish(participant, changes);
    }

    /// Tells the other mounts of the space (not `by`) of `changes` — once this thread holds
    /// no claim (see `claims::after_claims`): they lock their open handles, and a handle's
    /// commit may be waiting for a claim of the operation that made the changes.
    fn tell_watchers(&self, changes: &[Changed], by: Option<WatcherId>, made: Made) {
        let watchers: Vec<_> = {
            let watchers = read(&self.watchers);
            if watchers.len() <= 1 && by.is_some() {
                return; // only the one that made the change
            }
            watchers
                .iter()
                .filter(|(id, _)| Some(*id) != by)
                .filter_map(|(_, w)| w.upgrade())
                .collect()
        };
        if watchers.is_empty() {
            return;
        }
        let changes = changes.to_vec();
        /// Counts a telling done when dropped (also if a watcher panics).
        struct Told(Arc<AtomicUsize>);
        impl Drop for Told {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.telling.fetch_add(1, Ordering::AcqRel);
        let told = Told(self.telling.clone());
        super::claims::after_claims(move || {
            let _told = told;
            for watcher in watchers {
                for change in &changes {
                    watcher.changed_elsewhere(change, made);
                }
            }
        });
    }
}

impl ForeignChanges for Space {
    fn heard(&self, record: &Record) {
        // What the store remembers goes first, so that the kernel, looking again once told,
        // gets the new state from the backend.
        let forget = |path: &Path, tree: bool| self.store.forget(path, tree);
        match &record.change {
            Changed::File { path, .. }
            | Changed::FolderCreated { path }
            | Changed::Attributes { path } => forget(path, false),
            Changed::FileDeleted { path } => self.store.forget_removed(path),
            Changed::FolderDeleted { path } => forget(path, true),
            Changed::FileMoved { from, to, .. } => {
                self.store.forget_removed(from);
                forget(to, false);
            }
            Changed::FolderMoved { from, to } | Changed::Exchanged { a: from, b: to } => {
                forget(from, true);
                forget(to, true);
            }
        }
        self.tell_watchers(std::slice::from_ref(&record.change), None, Made::Elsewhere);
    }
}

/// The spaces of this process (see the module docs).
pub struct Hub {
    local: Arc<LocalBackend>,
    /// Where rooms and sessions are stored.
    rooms: Arc<dyn Spaces>,
    sessions: Arc<dyn Spaces>,
    records: Option<Arc<RecordStore>>,
    open: Mutex<HashMap<SpaceId, Weak<Space>>>,
    /// The change logs of the data dir (`None` if they could not be opened: then events stay
    /// in this process).
    logs: Option<Logs>,
    retention: Retention,
    /// Bytes held by the directory listings of every mount of the process (their budget is
    /// the process's, see `fs::dirs`).
    listings_held: Arc<std::sync::atomic::AtomicUsize>,
}

impl Hub {
    /// Spaces stored by `local`; sessions show the agent records of `records` under `.meta`.
    /// Events are retained as by default.
    /// Events are retained as the data dir's daemon keeps them (see `events::log`).
    pub fn new(local: LocalBackend, records: Option<Arc<RecordStore>>) -> Hub {
        Hub::build(local, records, None)
    }

    /// [`Hub::new`], keeping `retention` of each space's events (the daemon's configuration,
    /// recorded for the other processes on the data dir).
    pub fn with_retention(
        local: LocalBackend,
        records: Option<Arc<RecordStore>>,
        retention: Retention,
    ) -> Hub {
        Hub::build(local, records, Some(retention))
    }

    fn build(
        local: LocalBackend,
        records: Option<Arc<RecordStore>>,
        configured: Option<Retention>,
    ) -> Hub {
        let retention = configured.unwrap_or_default();
        let logs = match Logs::open(local.data_dir(), configured) {
            Ok(logs) => Some(logs),
            Err(e) => {
                log::error!(
                    "cannot open the change logs in the data dir ({e}): other processes will \
                     not hear of this one's changes, nor it of theirs, before their cache TTL"
                );
                None
            }
        };
        let local = Arc::new(local);
        Hub {
            rooms: local.clone(),
            sessions: local.clone(),
            local,
            records,
            open: Mutex::new(HashMap::new()),
            logs,
            retention,
            listings_held: Arc::default(),
        }
    }

    /// The count of bytes held by directory listings that the mounts of this process share
    /// (`FsOptions::listings_held`).
    pub fn listings_held(&self) -> Arc<std::sync::atomic::AtomicUsize> {
        self.listings_held.clone()
    }

    /// Like [`Hub::with_retention`], with rooms and sessions stored elsewhere where given (the
    /// local backend still holds the daemon's state and the change logs).
    pub fn with_stores(
        local: LocalBackend,
        records: Option<Arc<RecordStore>>,
        retention: Retention,
        rooms: Option<Arc<dyn Spaces>>,
        sessions: Option<Arc<dyn Spaces>>,
    ) -> Hub {
        let mut hub = Hub::with_retention(local, records, retention);
        if let Some(r) = rooms {
            hub.rooms = r;
        }
        if let Some(s) = sessions {
            hub.sessions = s;
        }
        hub
    }

    /// Where spaces of `kind` are stored.
    pub fn spaces(&self, kind: SpaceKind) -> &Arc<dyn Spaces> {
        match kind {
            SpaceKind::Room => &self.rooms,
            SpaceKind::Session => &self.sessions,
        }
    }

    /// Where `id` lives, for messages.
    pub fn describe(&self, id: &SpaceId) -> String {
        self.spaces(id.kind).describe(id)
    }

    /// Makes the space `id` if missing (owned by the daemon's user).
    pub fn make(&self, id: &SpaceId) -> io::Result<()> {
        self.spaces(id.kind).open_space(id, Some(None)).map(drop)
    }

    /// The change feed of `id` (which must exist): the open space's, or its log opened now.
    pub fn feed(&self, id: &SpaceId) -> io::Result<Arc<dyn ChangeFeed>> {
        if let Some(space) = self.get(id) {
            return Ok(space.feed().clone());
        }
        if !self.spaces(id.kind).space_exists(id)? {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        self.new_feed(id)
    }

    fn new_feed(&self, id: &SpaceId) -> io::Result<Arc<dyn ChangeFeed>> {
        if let Some(feed) = self.spaces(id.kind).change_feed(id, self.retention) {
            return feed;
        }
        Ok(match &self.logs {
            Some(logs) => logs.feed(id)?,
            None => Arc::new(MemFeed::new(self.retention)),
        })
    }

    /// The store of `id` to serve downloads from: its committed files, without the `.meta`
    /// view, opened without holding the space open (`ENOENT` if it does not exist).
    pub fn download_store(&self, id: &SpaceId) -> io::Result<Arc<dyn Store>> {
        self.spaces(id.kind).open_space(id, None)
    }

    /// The store of `id`'s own URLs (`roomfs url --direct`), where its backend has them: an
    /// S3 store's presigned GETs. The local disk has none.
    pub fn presigner(&self, id: &SpaceId) -> Option<Arc<dyn crate::urls::Presign>> {
        self.spaces(id.kind).presigner(id)
    }

    /// Whether changes made by other processes are noticed through inotify (else by polling,
    /// or not at all without change logs).
    pub fn follows_with_inotify(&self) -> bool {
        self.logs.as_ref().is_some_and(Logs::uses_inotify)
    }

    /// The local backend (its data dir also holds the daemon's state).
    pub fn local(&self) -> &LocalBackend {
        &self.local
    }

    /// The space `id` if something in this process holds it open.
    pub fn get(&self, id: &SpaceId) -> Option<Arc<Space>> {
        lock(&self.open).get(id).and_then(Weak::upgrade)
    }

    /// The space `id`: the one already open, or opened now with `limits` (its usage counted
    /// when it has any). With `create`, a missing space is made first, owned by the given
    /// owner; without, a missing one is `ENOENT`.
    pub fn open(
        &self,
        id: &SpaceId,
        limits: Limits,
        create: Option<Owner>,
    ) -> io::Result<Arc<Space>> {
        if let Some(space) = self.get(id) {
            return Ok(space);
        }
        // Opened without the table's lock (a usage count reads the whole space); a racing
        // open of the same space keeps whichever went in first.
        let store = self.spaces(id.kind).open_space(id, create)?;
        let quota = if limits.is_unlimited() {
            None
        } else {
            let usage = store.usage().map_err(std::io::Error::other)?;
            Some(Arc::new(Quota::new(limits, usage)))
        };
        let store: Arc<dyn Store> = match (&self.records, id.kind) {
            (Some(records), SpaceKind::Session) => {
                Arc::new(MetaOverlay::new(store, records.clone(), id.id.clone()))
            }
            _ => store,
        };
        let feed = self.new_feed(id).unwrap_or_else(|e| {
            log::error!(
                "cannot open the change feed of {id} ({e}): other processes and hosts will not \
                 hear of its changes before their cache TTL"
            );
            Arc::new(MemFeed::new(self.retention))
        });
        let space = Arc::new(Space::with_feed(id.clone(), store, quota, feed));
        space.listen();
        let mut open = lock(&self.open);
        if let Some(existing) = open.get(id).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        open.retain(|_, w| w.strong_count() > 0);
        open.insert(id.clone(), Arc::downgrade(&space));
        Ok(space)
    }

    /// What `id` uses now: counted by its open space when it has limits, else by reading the
    /// space; `None` if it does not exist.
    pub fn usage(&self, id: &SpaceId) -> io::Result<Option<Usage>> {
        if let Some(q) = self.get(id).and_then(|s| s.quota().cloned()) {
            return Ok(Some(q.usage()));
        }
        self.spaces(id.kind).space_usage(id)
    }

    /// Deletes the space `id` and all it holds; returns what went. Whoever still holds it open
    /// (a mount the daemon could only detach) keeps an ended object ([`Space::end`]): every
    /// request to it is `ENOENT`, and a space opened again under the id is a new one.
    pub fn delete(&self, id: &SpaceId) -> io::Result<Usage> {
        if let Some(space) = self.get(id)
            && !space.end()
        {
            log::warn!("deleting {id}: requests to it still under way after 10 s");
        }
        lock(&self.open).remove(id);
        let tally = self.spaces(id.kind).delete_space(id)?;
        if let Some(logs) = &self.logs
            && let Err(e) = logs.remove(id)
        {
            log::warn!("removing the change log of {id}: {e}");
        }
        Ok(tally)
    }
}

fn usage_of(t: Tally) -> Usage {
    Usage {
        files: t.entries,
        bytes: t.bytes,
    }
}
