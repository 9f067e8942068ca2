//! The spaces open in this process. Each open space has one [`Space`]: its store, its limits
//! and usage, and the mounts showing it. Every mount of a space in the process shares that
//! object, so a change made through one mount, or by the daemon itself (a session exported into
//! a room), is counted once against the space's limits and reaches the other mounts' kernel
//! caches at once ([`Space::changed`]).
//!
//! Invariant: while any mount or operation holds a space, `Hub::open` hands out that same
//! object; a space nobody holds is dropped (its store closed) and opened afresh next time.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use super::claims::{Claim, Claims, Span};
use super::{SpaceId, SpaceKind};
use crate::fs::{Limits, Quota};
use crate::records::RecordStore;
use crate::store::Owner;
use crate::store::Store;
use crate::store::Usage;
use crate::store::local::LocalBackend;
use crate::store::local::at::Tally;
use crate::store::meta::MetaOverlay;

/// Where the spaces of one kind are stored: the local data dir, or an S3 bucket. Makes, opens,
/// counts and deletes spaces; nothing outside it touches a space's storage directly.
pub trait Spaces: Send + Sync {
    /// Opens the store of `space`. With `create`, a missing space is made first, owned by
    /// the given owner (or the daemon's own user); without, a missing one is `ENOENT`.
    fn open_space(&self, space: &SpaceId, create: Option<Owner>) -> io::Result<Arc<dyn Store>>;
    /// What `space` holds (entries of every kind, bytes of files); `None` if it does not exist.
    fn space_usage(&self, space: &SpaceId) -> io::Result<Option<Usage>>;
    /// Removes `space` and everything in it; returns what was removed.
    fn delete_space(&self, space: &SpaceId) -> io::Result<Usage>;
    /// Where `space` lives, for messages.
    fn describe(&self, space: &SpaceId) -> String;
}

impl Spaces for LocalBackend {
    fn open_space(&self, space: &SpaceId, create: Option<Owner>) -> io::Result<Arc<dyn Store>> {
        Ok(Arc::new(LocalBackend::open_space(self, space, create)?))
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
}

/// Something that shows a space and must hear of changes made to it by others (a mount: its
/// kernel caches).
pub trait SpaceWatcher: Send + Sync {
    /// The entry at `path` (its existence, attributes or content) was changed by someone
    /// other than this watcher.
    fn changed_elsewhere(&self, path: &Path);
}

/// Identifies a watcher of a space (see [`Space::watch`]).
pub type WatcherId = u64;

/// One open space, shared by everything in the process that uses it.
pub struct Space {
    id: SpaceId,
    store: Arc<dyn Store>,
    quota: Option<Arc<Quota>>,
    watchers: RwLock<Vec<(WatcherId, Weak<dyn SpaceWatcher>)>>,
    next_watcher: AtomicU64,
    /// The names operations are changing right now (see `claims`).
    claims: Claims,
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
    /// A space over `store`, with `quota` (none: unlimited); outside a hub (tests, tools).
    pub fn new(id: SpaceId, store: Arc<dyn Store>, quota: Option<Arc<Quota>>) -> Space {
        Space {
            id,
            store,
            quota,
            watchers: RwLock::new(Vec::new()),
            next_watcher: AtomicU64::new(1),
            claims: Claims::default(),
        }
    }

    /// Claims `names` for a change (see `claims`): waits while another operation of this
    /// process changes any of them; held until the returned claim is dropped.
    pub fn claim(&self, names: &[(&Path, Span)]) -> Claim<'_> {
        self.claims.claim(names)
    }

    pub fn id(&self) -> &SpaceId {
        &self.id
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

    /// The entry at `path` changed, through the watcher `by` (a mount) or, with `None`, by
    /// the process itself: every other watcher hears of it. Watchers only queue what they
    /// hear (see [`SpaceWatcher`]), so this never waits for a kernel.
    pub fn changed(&self, path: &Path, by: Option<WatcherId>) {
        let watchers = read(&self.watchers);
        if watchers.len() <= 1 && by.is_some() {
            return; // only the one that made the change
        }
        for (id, watcher) in watchers.iter() {
            if Some(*id) == by {
                continue;
            }
            if let Some(watcher) = watcher.upgrade() {
                watcher.changed_elsewhere(path);
            }
        }
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
}

impl Hub {
    /// Spaces stored by `local`; sessions show the agent records of `records` under `.meta`.
    pub fn new(local: LocalBackend, records: Option<Arc<RecordStore>>) -> Hub {
        let local = Arc::new(local);
        Hub {
            rooms: local.clone(),
            sessions: local.clone(),
            local,
            records,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Like [`Hub::new`], with rooms and sessions stored elsewhere where given (the local
    /// backend still holds the daemon's state).
    pub fn with_stores(
        local: LocalBackend,
        records: Option<Arc<RecordStore>>,
        rooms: Option<Arc<dyn Spaces>>,
        sessions: Option<Arc<dyn Spaces>>,
    ) -> Hub {
        let mut hub = Hub::new(local, records);
        if let Some(r) = rooms {
            hub.rooms = r;
        }
        if let Some(s) = sessions {
            hub.sessions = s;
        }
        hub
    }

    /// The local backend (its data dir also holds the daemon's state).
    pub fn local(&self) -> &LocalBackend {
        &self.local
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
        let space = Arc::new(Space::new(id.clone(), store, quota));
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
    /// keeps an object whose files are gone (the daemon unmounts first).
    pub fn delete(&self, id: &SpaceId) -> io::Result<Usage> {
        lock(&self.open).remove(id);
        self.spaces(id.kind).delete_space(id)
    }
}

fn usage_of(t: Tally) -> Usage {
    Usage {
        files: t.entries,
        bytes: t.bytes,
    }
}
