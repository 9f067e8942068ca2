//! The in-memory index behind `.meta` and `listBySession`: which sessions, messages and parts
//! exist, which session each message and part belongs to, their order keys, and rendered
//! files, so that looking at one session costs what that session holds, not what the host
//! holds.
//!
//! **Freshness.** The index is built at first use, then kept up to date by the store's own
//! writes and by noticing what other processes (the agent SDK writing the same directory)
//! change:
//! - With inotify (the normal case): the records dir and the session, message and part
//!   directories are watched for entries created, closed after writing, moved in or out and
//!   deleted. Every look at the index first drains the events without blocking (one `read`)
//!   and re-reads exactly the records named; a lost event queue (overflow), or a collection
//!   directory moved, deleted or replaced, makes that collection be scanned again. So every
//!   change made on this host, including a record rewritten in place, shows at the next
//!   `stat` or `open` after the writer closed the file.
//! - Without inotify (no instance or watch could be had: `fs.inotify.max_user_instances` or
//!   `max_user_watches` reached, no `/proc`): each look stats the three collection
//!   directories, and one whose identity, mtime or ctime changed (or changed less than a second
//!   before it was last scanned, finer than timestamps tell apart) is scanned again, re-reading
//!   the records whose own attributes changed. A record rewritten in place, without a rename,
//!   is then seen only after its directory next changes.
//! - Neither notices changes made on another host (a records dir on NFS).
//!
//! A scan keeps each record's attributes (inode, size, mtime, ctime) and re-reads only those
//! that differ, or that changed less than a second before they were read.
//!
//! The index lock is held while changed records are read (small local files); writes through
//! the store take it only to apply what they wrote.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use serde_json::Value;

use super::dir::{CollectionDir, RecordsDir, Stamp};
use super::{ChildCollection, Collection, history, render, session_id_of, str_field};

/// The indexed collections; `Index::cols` is in this order.
const INDEXED: [Collection; 3] = [Collection::Session, Collection::Message, Collection::Part];
const SESSION: usize = 0;
const MESSAGE: usize = 1;
const PART: usize = 2;

/// Changes closer than this to when they were seen may hide a later one with equal timestamps.
const RACY: Duration = Duration::from_secs(1);

fn slot(collection: Collection) -> Option<usize> {
    INDEXED.iter().position(|&c| c == collection)
}

fn child_slot(collection: ChildCollection) -> usize {
    match collection {
        ChildCollection::Message => MESSAGE,
        ChildCollection::Part => PART,
    }
}

/// The id a file name in a collection directory stands for, if it is a record's name.
pub fn record_id(name: &str) -> Option<&str> {
    name.strip_suffix(".json")
        .filter(|id| super::check_id(id).is_ok())
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Whether attributes seen at `now` can be trusted to change with the next write: not if the
/// last change was so recent that another in the same timestamp tick would look the same.
fn trusted(stamp: &Stamp, now: SystemTime) -> bool {
    let ctime = UNIX_EPOCH + Duration::new(stamp.ctime.0.max(0) as u64, stamp.ctime.1 as u32);
    ctime + RACY < now
}

/// How a record sorts among its session's.
#[derive(Clone, Debug, PartialEq)]
enum Order {
    None,
    Message {
        created_at: Option<f64>,
    },
    Part {
        message_id: Option<String>,
        index: Option<u64>,
    },
}

struct Entry {
    /// Hash of the file's bytes, to tell a re-read that changed nothing.
    hash: u64,
    /// Attributes when read, and whether they can be trusted to change with the next write;
    /// `None` for a record written through the store (re-read at the next scan).
    stamp: Option<(Stamp, bool)>,
    session: Option<String>,
    order: Order,
    /// The record as `.meta` shows it; kept once a session's view has asked for it.
    rendered: Option<Arc<[u8]>>,
}

/// What was read or written for a record.
pub struct Loaded {
    pub hash: u64,
    pub stamp: Option<(Stamp, bool)>,
    pub value: Value,
    /// The rendered record, when the caller has it already.
    pub rendered: Option<Arc<[u8]>>,
}

impl Loaded {
    /// A record just written through the store as `bytes` (its rendering).
    pub fn written(bytes: Vec<u8>, value: Value) -> Loaded {
        Loaded {
            hash: hash(&bytes),
            stamp: None,
            value,
            rendered: Some(bytes.into()),
        }
    }
}

#[derive(Default)]
struct Children {
    messages: BTreeSet<String>,
    parts: BTreeSet<String>,
}

impl Children {
    fn of(&mut self, slot: usize) -> &mut BTreeSet<String> {
        if slot == MESSAGE {
            &mut self.messages
        } else {
            &mut self.parts
        }
    }
}

struct Col {
    collection: Collection,
    dir: Option<CollectionDir>,
    wd: Option<WatchDescriptor>,
    /// The directory's attributes before its last scan, and whether they can be trusted.
    seen: Option<(Stamp, bool)>,
    entries: HashMap<String, Entry>,
    /// Ids named by events since the last look.
    dirty: HashSet<String>,
    rescan: bool,
    /// Whether a scan has completed: the first one changes no version.
    scanned: bool,
}

impl Col {
    fn new(collection: Collection) -> Col {
        Col {
            collection,
            dir: None,
            wd: None,
            seen: None,
            entries: HashMap::new(),
            dirty: HashSet::new(),
            rescan: true,
            scanned: false,
        }
    }
}

const ROOT_EVENTS: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);
/// A record changed in place shows as `IN_CLOSE_WRITE`; replaced, as `IN_MOVED_TO`; a new
/// name for an existing file (a hard link), as `IN_CREATE`.
const COLLECTION_EVENTS: AddWatchFlags = ROOT_EVENTS.union(AddWatchFlags::IN_CLOSE_WRITE);
const GONE: AddWatchFlags = AddWatchFlags::IN_DELETE_SELF
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_IGNORED);

/// Last version handed out, and the version of each session touched by a change.
#[derive(Default)]
struct Versions {
    last: u64,
    by_session: HashMap<String, u64>,
}

pub struct Index {
    built: bool,
    /// Whether to try inotify at all (tests turn it off to check the fallback).
    want_watch: bool,
    inotify: Option<Inotify>,
    root_wd: Option<WatchDescriptor>,
    cols: [Col; 3],
    children: HashMap<String, Children>,
    versions: Versions,
    /// Rendered history per session, with the session's version it was rendered at.
    history: HashMap<String, (u64, Arc<[u8]>)>,
    /// Record files read so far (tests check that a look at an unchanged view reads none).
    reads: u64,
}

impl Index {
    pub fn new(want_watch: bool) -> Index {
        Index {
            built: false,
            want_watch,
            inotify: None,
            root_wd: None,
            cols: INDEXED.map(Col::new),
            children: HashMap::new(),
            versions: Versions::default(),
            history: HashMap::new(),
            reads: 0,
        }
    }

    /// Record files read so far.
    #[cfg(test)]
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Whether changes by other processes are noticed through inotify (else through directory
    /// attributes, see the module docs).
    pub fn watching(&self) -> bool {
        self.inotify.is_some()
    }

    pub fn version(&self, session_id: &str) -> u64 {
        self.versions
            .by_session
            .get(session_id)
            .copied()
            .unwrap_or(0)
    }

    pub fn bump(&mut self, sessions: &[&str]) {
        self.versions.last += 1;
        let version = self.versions.last;
        for session in sessions {
            self.versions
                .by_session
                .insert((*session).to_owned(), version);
        }
    }

    /// Brings the index up to date with the disk (building it at the first call).
    pub fn refresh(&mut self, dir: &RecordsDir) -> io::Result<()> {
        if !self.built {
            self.start_watching(dir);
            self.built = true;
        } else {
            self.collect_changes(dir)?;
        }
        for slot in 0..INDEXED.len() {
            if self.cols[slot].rescan {
                self.rescan(dir, slot)?;
            }
            let dirty: Vec<String> = self.cols[slot].dirty.drain().collect();
            for (i, id) in dirty.iter().enumerate() {
                if let Err(err) = self.reload(slot, id, false) {
                    // Left for the next look.
                    self.cols[slot].dirty.extend(dirty[i..].iter().cloned());
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    fn start_watching(&mut self, dir: &RecordsDir) {
        if !self.want_watch {
            return;
        }
        let watch = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).and_then(|i| {
            let wd = i.add_watch(&fd_path(dir.fd().as_raw_fd()), ROOT_EVENTS)?;
            Ok((i, wd))
        });
        match watch {
            Ok((inotify, wd)) => {
                self.inotify = Some(inotify);
                self.root_wd = Some(wd);
            }
            Err(err) => self.stop_watching(dir, err),
        }
    }

    fn stop_watching(&mut self, dir: &RecordsDir, err: Errno) {
        log::warn!(
            "cannot watch the records dir {} for changes ({err}); changes by other processes \
             are noticed by directory attributes only, so a record rewritten in place shows \
             only after its directory changes",
            dir.path().display()
        );
        self.inotify = None;
        self.root_wd = None;
        for col in &mut self.cols {
            col.wd = None;
        }
    }

    /// Marks what changed since the last look: from inotify events, or from the collection
    /// directories' attributes.
    fn collect_changes(&mut self, dir: &RecordsDir) -> io::Result<()> {
        if self.inotify.is_none() {
            for col in &mut self.cols {
                let now = dir
                    .stat_entry(col.collection.name())?
                    .map(|(stamp, _)| stamp);
                let unchanged =
                    matches!((col.seen, now), (Some((seen, true)), Some(now)) if seen == now);
                if !unchanged {
                    col.rescan = true;
                }
            }
            return Ok(());
        }
        loop {
            let read = self.inotify.as_ref().map(Inotify::read_events);
            let events = match read {
                Some(Ok(events)) => events,
                Some(Err(Errno::EAGAIN)) | None => return Ok(()),
                Some(Err(err)) => {
                    self.stop_watching(dir, err);
                    for col in &mut self.cols {
                        col.rescan = true;
                    }
                    return Ok(());
                }
            };
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    log::info!("records dir: inotify queue overflowed; scanning again");
                    for col in &mut self.cols {
                        col.rescan = true;
                    }
                    continue;
                }
                let name = event.name.as_ref().and_then(|n| n.to_str());
                if Some(event.wd) == self.root_wd {
                    for col in &mut self.cols {
                        if event.mask.intersects(GONE) || name == Some(col.collection.name()) {
                            col.rescan = true;
                        }
                    }
                    continue;
                }
                let Some(col) = self.cols.iter_mut().find(|c| c.wd == Some(event.wd)) else {
                    continue; // a watch given up since
                };
                if event.mask.intersects(GONE) {
                    col.rescan = true;
                } else if let Some(id) = name.and_then(record_id) {
                    col.dirty.insert(id.to_owned());
                }
            }
        }
    }

    /// Opens a collection directory again and compares every record in it with the index.
    fn rescan(&mut self, dir: &RecordsDir, slot: usize) -> io::Result<()> {
        let name = self.cols[slot].collection.name();
        let cdir = dir.collection(name)?;
        let stamp = cdir.stamp()?;
        if let Some(inotify) = &self.inotify {
            if let Some(old) = self.cols[slot].wd.take() {
                let _ = inotify.rm_watch(old);
            }
            // Watched before listing, so nothing changed meanwhile is missed.
            match inotify.add_watch(&fd_path(cdir.raw_fd()), COLLECTION_EVENTS) {
                Ok(wd) => self.cols[slot].wd = Some(wd),
                Err(err) => {
                    self.stop_watching(dir, err);
                }
            }
        }
        let listed = cdir.list()?;
        let now = SystemTime::now();
        self.cols[slot].dir = Some(cdir);
        let mut present = HashSet::new();
        for entry in listed {
            let Some(id) = record_id(&entry.name) else {
                continue;
            };
            if entry.regular == Some(false) {
                log::warn!(
                    "skipping {}: not a regular file, so not a record",
                    dir.path().join(name).join(&entry.name).display()
                );
                continue;
            }
            present.insert(id.to_owned());
            let col = &self.cols[slot];
            if let Some(Entry {
                stamp: Some((known, true)),
                ..
            }) = col.entries.get(id)
            {
                let cdir = col.dir.as_ref().expect("opened above");
                if cdir.stat_entry(&entry.name)?.map(|(s, _)| s) == Some(*known) {
                    continue;
                }
            }
            self.reload(slot, id, false)?;
        }
        let gone: Vec<String> = self.cols[slot]
            .entries
            .keys()
            .filter(|id| !present.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.apply(slot, &id, None, false);
        }
        log::debug!(
            "records: scanned {}, {} files read so far",
            dir.path().join(name).display(),
            self.reads
        );
        let col = &mut self.cols[slot];
        col.dirty.clear();
        col.seen = Some((stamp, trusted(&stamp, now)));
        col.rescan = false;
        col.scanned = true;
        Ok(())
    }

    /// Reads record `id` of collection `slot` again and applies it; returns its rendering if
    /// `render` (or if it was rendered before). A file that is not a readable record is left
    /// out with a warning.
    fn reload(&mut self, slot: usize, id: &str, render_it: bool) -> io::Result<Option<Arc<[u8]>>> {
        let Some(cdir) = self.cols[slot].dir.as_ref() else {
            return Ok(None);
        };
        let file = format!("{id}.json");
        self.reads += 1;
        let loaded = match cdir.read(&file) {
            Ok(Some((bytes, stamp))) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(value) => Some(Loaded {
                    hash: hash(&bytes),
                    stamp: Some((stamp, trusted(&stamp, SystemTime::now()))),
                    value,
                    rendered: None,
                }),
                Err(err) => {
                    log::warn!(
                        "skipping unreadable record {}: {err}",
                        cdir.path().join(&file).display()
                    );
                    None
                }
            },
            Ok(None) => None,
            Err(err) if err.kind() == io::ErrorKind::InvalidData => {
                log::warn!("skipping {err}");
                None
            }
            Err(err) => return Err(err),
        };
        self.apply(slot, id, loaded, render_it);
        Ok(self.cols[slot]
            .entries
            .get(id)
            .and_then(|e| e.rendered.clone()))
    }

    /// Puts what was read or written for record `id` into the index (`None`: there is no such
    /// record), keeping the rendering if `keep_rendered` or if there was one. A change bumps
    /// the versions of the sessions it touches, unless the collection's first scan is still
    /// under way.
    fn apply(&mut self, slot: usize, id: &str, new: Option<Loaded>, keep_rendered: bool) {
        let bump = self.cols[slot].scanned;
        self.put(slot, id, new, keep_rendered, bump);
    }

    fn put(&mut self, slot: usize, id: &str, new: Option<Loaded>, keep_rendered: bool, bump: bool) {
        let old = self.cols[slot].entries.remove(id);
        let (old, new) = match (old, new) {
            (Some(mut same), Some(new)) if same.hash == new.hash => {
                same.stamp = new.stamp;
                if same.rendered.is_none() && keep_rendered {
                    same.rendered = Some(new.rendered.unwrap_or_else(|| render(&new.value).into()));
                }
                self.cols[slot].entries.insert(id.to_owned(), same);
                return;
            }
            pair => pair,
        };
        let mut touched: Vec<String> = Vec::new();
        if slot == SESSION {
            touched.push(id.to_owned());
            if new.is_none() {
                self.history.remove(id);
            }
        }
        if let Some(session) = old.as_ref().and_then(|e| e.session.clone()) {
            if let Some(children) = self.children.get_mut(&session) {
                children.of(slot).remove(id);
            }
            touched.push(session);
        }
        if let Some(new) = new {
            let session = if slot == SESSION {
                None
            } else {
                session_id_of(&new.value).map(str::to_owned)
            };
            let order = match slot {
                MESSAGE => Order::Message {
                    created_at: new.value.get("createdAt").and_then(Value::as_f64),
                },
                PART => Order::Part {
                    message_id: str_field(&new.value, "messageId").map(str::to_owned),
                    index: new.value.get("index").and_then(Value::as_u64),
                },
                _ => Order::None,
            };
            if let Some(session) = &session {
                self.children
                    .entry(session.clone())
                    .or_default()
                    .of(slot)
                    .insert(id.to_owned());
                touched.push(session.clone());
            }
            let rendered = if keep_rendered || old.as_ref().is_some_and(|o| o.rendered.is_some()) {
                Some(new.rendered.unwrap_or_else(|| render(&new.value).into()))
            } else {
                None
            };
            let entry = Entry {
                hash: new.hash,
                stamp: new.stamp,
                session,
                order,
                rendered,
            };
            self.cols[slot].entries.insert(id.to_owned(), entry);
        }
        if bump {
            let touched: Vec<&str> = touched.iter().map(String::as_str).collect();
            self.bump(&touched);
        }
    }

    /// A record written (`Some`) or removed (`None`) through the store; the caller bumps the
    /// versions. Nothing to do before the index is built: building reads it.
    pub fn written(&mut self, collection: Collection, id: &str, new: Option<Loaded>) {
        if let Some(slot) = slot(collection).filter(|_| self.built) {
            self.put(slot, id, new, false, false);
        }
    }

    pub fn session_exists(&self, session_id: &str) -> bool {
        self.cols[SESSION].entries.contains_key(session_id)
    }

    /// Record `id` of `collection` as `.meta` shows it; `None` if there is none.
    pub fn rendered(&mut self, collection: Collection, id: &str) -> io::Result<Option<Arc<[u8]>>> {
        let slot = slot(collection).expect("an indexed collection");
        match self.cols[slot].entries.get(id) {
            None => Ok(None),
            Some(Entry {
                rendered: Some(r), ..
            }) => Ok(Some(r.clone())),
            Some(_) => self.reload(slot, id, true),
        }
    }

    /// The session that record `id` of `collection` belongs to.
    pub fn session_of(&self, collection: ChildCollection, id: &str) -> Option<&str> {
        self.cols[child_slot(collection)]
            .entries
            .get(id)
            .and_then(|e| e.session.as_deref())
    }

    /// Ids of the session's messages or parts, sorted.
    pub fn child_ids(&self, collection: ChildCollection, session_id: &str) -> Vec<String> {
        self.children
            .get(session_id)
            .map(|c| match collection {
                ChildCollection::Message => c.messages.iter().cloned().collect(),
                ChildCollection::Part => c.parts.iter().cloned().collect(),
            })
            .unwrap_or_default()
    }

    /// The session's message ids in message order (see the module docs of `records`).
    fn ordered_messages(&self, session_id: &str) -> Vec<String> {
        let entries = &self.cols[MESSAGE].entries;
        let created_at = |id: &str| match entries.get(id).map(|e| &e.order) {
            Some(Order::Message { created_at }) => *created_at,
            _ => None,
        };
        let mut ids = self.child_ids(ChildCollection::Message, session_id);
        ids.sort_by(|a, b| {
            let order = match (created_at(a), created_at(b)) {
                (Some(x), Some(y)) => x.total_cmp(&y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            };
            order.then_with(|| a.cmp(b))
        });
        ids
    }

    /// The session's part ids in part order; `messages` in message order.
    fn ordered_parts(&self, session_id: &str, messages: &[String]) -> Vec<String> {
        let position: HashMap<&str, usize> = messages
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), i))
            .collect();
        let entries = &self.cols[PART].entries;
        let mut ids = self.child_ids(ChildCollection::Part, session_id);
        ids.sort_by_cached_key(|id| {
            let (message_id, index) = match entries.get(id).map(|e| &e.order) {
                Some(Order::Part { message_id, index }) => {
                    (message_id.clone().unwrap_or_default(), *index)
                }
                _ => (String::new(), None),
            };
            (
                position
                    .get(message_id.as_str())
                    .copied()
                    .unwrap_or(usize::MAX),
                message_id,
                index.unwrap_or(u64::MAX),
                id.clone(),
            )
        });
        ids
    }

    fn value(&mut self, collection: Collection, id: &str) -> io::Result<Option<Value>> {
        Ok(match self.rendered(collection, id)? {
            Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(io::Error::other)?),
            None => None,
        })
    }

    /// The session's messages and parts, as (id, record), in message and part order.
    #[allow(clippy::type_complexity)]
    pub fn children_in_order(
        &mut self,
        session_id: &str,
    ) -> io::Result<(Vec<(String, Value)>, Vec<(String, Value)>)> {
        let message_ids = self.ordered_messages(session_id);
        let part_ids = self.ordered_parts(session_id, &message_ids);
        let mut load = |collection, ids: Vec<String>| -> io::Result<Vec<(String, Value)>> {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(value) = self.value(collection, &id)? {
                    out.push((id, value));
                }
            }
            Ok(out)
        };
        let messages = load(Collection::Message, message_ids)?;
        let parts = load(Collection::Part, part_ids)?;
        Ok((messages, parts))
    }

    /// The session's history document, rendered; cached until the session's version changes.
    pub fn history(&mut self, session_id: &str) -> io::Result<Option<Arc<[u8]>>> {
        let version = self.version(session_id);
        if let Some((at, bytes)) = self.history.get(session_id)
            && *at == version
        {
            return Ok(Some(bytes.clone()));
        }
        // Reading may find records changed since the index saw them; render again then.
        for _ in 0..3 {
            let version = self.version(session_id);
            let Some(session) = self.value(Collection::Session, session_id)? else {
                return Ok(None);
            };
            let (messages, parts) = self.children_in_order(session_id)?;
            let bytes: Arc<[u8]> = render(&history(&session, &messages, &parts)).into();
            if self.version(session_id) == version {
                self.history
                    .insert(session_id.to_owned(), (version, bytes.clone()));
                return Ok(Some(bytes));
            }
        }
        Err(io::Error::other(format!(
            "the records of session {session_id:?} keep changing while its history is rendered"
        )))
    }
}

/// The path inotify takes for a directory held open: the descriptor's own `/proc` entry, so
/// the watch is on exactly that directory, whatever its name leads to now.
fn fd_path(fd: i32) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/self/fd/{fd}"))
}
