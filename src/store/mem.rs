//! An in-memory store: a whole space in a map, for testing the filesystem core without a
//! disk (as mountpoint-s3 tests its core against a mock client). It keeps every promise of the
//! seam the core relies on:
//! - commits are atomic; a whole commit makes a new object, so readers that opened the old
//!   version keep reading it;
//! - appends go onto the file as it is at commit time, in place (readers of that object read
//!   on into them with `read_appended_at`), and say when they followed others' appends;
//! - a ranged commit writes the writer's ranges into the object in place only when it still is
//!   the writer's version and nobody else holds it open (no reader's `Content` refers to it);
//!   otherwise it completes the copy and commits it whole;
//! - `O_EXCL` creates, `RENAME_NOREPLACE`, `RENAME_EXCHANGE` and the errnos of a POSIX
//!   directory tree (`ENOENT`, `ENOTDIR`, `EISDIR`, `EEXIST`, `ENOTEMPTY`, `EINVAL` for a
//!   directory moved into itself).
//!
//! Hard links are refused with `EPERM`, as by the local store.

use std::any::Any;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use super::XattrMode;
use super::{
    Capabilities, Change, CommitRequest, Committed, Content, CopyStat, DirEntry, Kind, LocalFile,
    Meta, Owner, RenameMode, SetAttr, Store, StoreError, StoreResult, StoreStatfs, TimeSpec, Usage,
    Version, WorkingCopy,
};

/// Commits of only the changed ranges are taken from this size on.
pub const RANGED_FROM: u64 = 4 << 20;

/// The bytes of one file object, shared by the tree and by every reader of it.
struct Object {
    id: u64,
    data: RwLock<Vec<u8>>,
    /// Bumped by every change in place.
    generation: AtomicU64,
}

impl Object {
    fn len(&self) -> u64 {
        self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }
}

#[derive(Clone)]
struct Node {
    kind: Kind,
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    /// A file's object.
    object: Option<Arc<Object>>,
    /// A symlink's target.
    target: Option<PathBuf>,
    /// Extended attributes (they belong to the entry, not to one version of its content).
    xattrs: BTreeMap<OsString, Vec<u8>>,
}

/// A space held in memory (see the module docs).
pub struct MemStore {
    id: u64,
    nodes: Mutex<BTreeMap<PathBuf, Node>>,
    next_object: AtomicU64,
    /// [`Capabilities::attrs_at_commit`], as an object store has it (off by default).
    attrs_at_commit: std::sync::atomic::AtomicBool,
}

static NEXT_STORE: AtomicU64 = AtomicU64::new(1);

fn err(errno: i32) -> StoreError {
    StoreError::errno(errno)
}

fn now() -> SystemTime {
    SystemTime::now()
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::new()
    }
}

impl MemStore {
    /// An empty space (just its root directory, mode 0755).
    pub fn new() -> MemStore {
        let mut nodes = BTreeMap::new();
        nodes.insert(PathBuf::new(), Node::dir(0o755, (0, 0)));
        MemStore {
            id: NEXT_STORE.fetch_add(1, Ordering::Relaxed),
            nodes: Mutex::new(nodes),
            next_object: AtomicU64::new(1),
            attrs_at_commit: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Takes attribute changes with commits, as an object store does
    /// ([`Capabilities::attrs_at_commit`]).
    pub fn with_attrs_at_commit(self) -> MemStore {
        self.attrs_at_commit.store(true, Ordering::Relaxed);
        self
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Node>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_object(&self, data: Vec<u8>) -> Arc<Object> {
        Arc::new(Object {
            id: self.next_object.fetch_add(1, Ordering::Relaxed),
            data: RwLock::new(data),
            generation: AtomicU64::new(0),
        })
    }

    /// The content of the file object as it is now.
    fn content_of(&self, node: &Node) -> Arc<dyn Content> {
        let object = node.object.clone().expect("a file has an object");
        let meta = node.meta(self.id);
        Arc::new(MemContent { object, meta })
    }

    /// What `path` names; checks that every directory above it exists.
    fn lookup<'a>(nodes: &'a BTreeMap<PathBuf, Node>, path: &Path) -> StoreResult<&'a Node> {
        Self::check_parent(nodes, path)?;
        nodes.get(path).ok_or_else(|| err(libc::ENOENT))
    }

    /// The directory that would hold `path` exists (`ENOENT`) and is one (`ENOTDIR`).
    fn check_parent(nodes: &BTreeMap<PathBuf, Node>, path: &Path) -> StoreResult<()> {
        let Some(parent) = path.parent() else {
            return Ok(()); // the root
        };
        let mut above = PathBuf::new();
        for part in parent.iter() {
            above.push(part);
            match nodes.get(&above) {
                None => return Err(err(libc::ENOENT)),
                Some(n) if n.kind != Kind::Dir => return Err(err(libc::ENOTDIR)),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Inserts a new entry at `path` (`EEXIST` when one is there).
    fn insert_new(&self, path: &Path, node: Node) -> StoreResult<Meta> {
        let mut nodes = self.nodes();
        Self::check_parent(&nodes, path)?;
        if path.as_os_str().is_empty() || nodes.contains_key(path) {
            return Err(err(libc::EEXIST));
        }
        let meta = node.meta(self.id);
        nodes.insert(path.to_path_buf(), node);
        touch_parent(&mut nodes, path);
        Ok(meta)
    }

    fn children<'a>(
        nodes: &'a BTreeMap<PathBuf, Node>,
        dir: &'a Path,
    ) -> impl Iterator<Item = (&'a PathBuf, &'a Node)> + 'a {
        nodes
            .range(dir.to_path_buf()..)
            .skip_while(move |(p, _)| p.as_path() == dir)
            .take_while(move |(p, _)| p.starts_with(dir))
            .filter(move |(p, _)| p.parent() == Some(dir))
    }

    /// Commits `copy` whole at `path`.
    /// The change of a commit, without its attributes.
    fn commit_change(&self, req: &CommitRequest<'_>) -> StoreResult<Committed> {
        match &req.change {
            Change::Whole(copy) => self.commit_whole(req.path, self.own(copy)?, false),
            Change::Ranges {
                copy,
                written,
                complete,
            } => {
                let own = self.own(copy)?;
                if let Some(done) = self.commit_ranges(req, own, written)? {
                    return Ok(done);
                }
                complete()?;
                self.commit_whole(req.path, own, false)
            }
            Change::Append { tail, follow } => {
                self.commit_append(req.path, req.base, tail, *follow)
            }
        }
    }

    fn commit_whole(&self, path: &Path, copy: &MemCopy, followed: bool) -> StoreResult<Committed> {
        let data = copy.data.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let object = self.new_object(data);
        let mut nodes = self.nodes();
        let node = nodes.get_mut(path).ok_or_else(|| err(libc::ENOENT))?;
        if node.kind != Kind::File {
            return Err(err(libc::EISDIR));
        }
        let replaced_size = node.object.as_ref().map_or(0, |o| o.len());
        node.object = Some(object);
        node.mtime = *copy.mtime.lock().unwrap_or_else(|e| e.into_inner());
        node.ctime = now();
        let content = self.content_of(node);
        Ok(Committed {
            content,
            replaced_size,
            followed,
        })
    }
}

fn touch_parent(nodes: &mut BTreeMap<PathBuf, Node>, path: &Path) {
    if let Some(parent) = path.parent()
        && let Some(p) = nodes.get_mut(parent)
    {
        let t = now();
        p.mtime = t;
        p.ctime = t;
    }
}

impl Node {
    fn new(kind: Kind, perm: u16, (uid, gid): (u32, u32)) -> Node {
        let t = now();
        Node {
            kind,
            perm,
            uid,
            gid,
            atime: t,
            mtime: t,
            ctime: t,
            object: None,
            target: None,
            xattrs: BTreeMap::new(),
        }
    }

    fn dir(perm: u16, owner: (u32, u32)) -> Node {
        Node::new(Kind::Dir, perm, owner)
    }

    fn meta(&self, store: u64) -> Meta {
        let (size, version) = match &self.object {
            Some(o) => {
                let len = o.len();
                let generation = o.generation.load(Ordering::Relaxed);
                (len, Version::from_words([store, o.id, generation, len]))
            }
            None => {
                let size = self
                    .target
                    .as_ref()
                    .map_or(0, |t| t.as_os_str().len() as u64);
                let stamp = self
                    .ctime
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                (size, Version::from_words([store, 0, stamp, size]))
            }
        };
        Meta {
            kind: self.kind,
            size,
            blocks: size.div_ceil(512),
            perm: self.perm,
            nlink: if self.kind == Kind::Dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            rdev: 0,
            version,
            file_id: None,
            volatile: false,
        }
    }
}

fn owner_of(owner: Owner) -> (u32, u32) {
    owner.unwrap_or((0, 0))
}

/// One version of a file object, as opened.
struct MemContent {
    object: Arc<Object>,
    meta: Meta,
}

impl MemContent {
    fn read_below(&self, buf: &mut [u8], offset: u64, end: u64) -> usize {
        let data = self.object.data.read().unwrap_or_else(|e| e.into_inner());
        let end = end.min(data.len() as u64);
        if offset >= end {
            return 0;
        }
        let n = buf.len().min((end - offset) as usize);
        buf[..n].copy_from_slice(&data[offset as usize..offset as usize + n]);
        n
    }
}

impl Content for MemContent {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        Ok(self.read_below(buf, offset, self.meta.size))
    }

    fn read_appended_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        Ok(self.read_below(buf, offset, u64::MAX))
    }

    fn meta(&self) -> &Meta {
        &self.meta
    }

    fn local(&self) -> Option<LocalFile<'_>> {
        None
    }
}

/// A working copy in memory.
pub struct MemCopy {
    store: u64,
    data: Mutex<Vec<u8>>,
    mtime: Mutex<SystemTime>,
}

impl MemCopy {
    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        *self.mtime.lock().unwrap_or_else(|e| e.into_inner()) = now();
    }
}

fn usize_of(n: u64) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

impl WorkingCopy for MemCopy {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let data = self.bytes();
        if offset >= data.len() as u64 {
            return Ok(0);
        }
        let n = buf.len().min(data.len() - offset as usize);
        buf[..n].copy_from_slice(&data[offset as usize..offset as usize + n]);
        Ok(n)
    }

    fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.bytes();
        let end = usize_of(offset + bytes.len() as u64)?;
        if data.len() < end {
            data.resize(end, 0);
        }
        data[offset as usize..end].copy_from_slice(bytes);
        drop(data);
        self.changed();
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.bytes().resize(usize_of(len)?, 0);
        self.changed();
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut data = self.bytes();
        let end = (offset + len).min(data.len() as u64) as usize;
        if (offset as usize) < end {
            data[offset as usize..end].fill(0);
        }
        drop(data);
        self.changed();
        Ok(())
    }

    fn reserve(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(()) // memory is not reserved ahead
    }

    fn stat(&self) -> io::Result<CopyStat> {
        let size = self.bytes().len() as u64;
        let mtime = *self.mtime.lock().unwrap_or_else(|e| e.into_inner());
        Ok(CopyStat {
            size,
            blocks: size.div_ceil(512),
            mtime,
            ctime: mtime,
        })
    }

    fn local_file(&self) -> Option<&File> {
        None
    }
}

impl MemStore {
    fn own<'a>(&self, copy: &'a Arc<dyn WorkingCopy>) -> StoreResult<&'a MemCopy> {
        (copy.as_ref() as &dyn Any)
            .downcast_ref::<MemCopy>()
            .filter(|c| c.store == self.id)
            .ok_or_else(|| {
                StoreError::failed(
                    libc::EXDEV,
                    "commit",
                    io::Error::other("the working copy was made by another store"),
                )
            })
    }

    fn commit_ranges(
        &self,
        req: &CommitRequest<'_>,
        copy: &MemCopy,
        written: &[(u64, u64)],
    ) -> StoreResult<Option<Committed>> {
        let base = req.base.meta();
        let mut nodes = self.nodes();
        let node = nodes.get_mut(req.path).ok_or_else(|| err(libc::ENOENT))?;
        let Some(object) = node.object.clone() else {
            return Err(err(libc::EISDIR));
        };
        // In place only on the writer's own version, held by nobody else: the tree, the
        // writer's base, and the clone just taken.
        if node.meta(self.id).version != base.version || Arc::strong_count(&object) > 3 {
            return Ok(None);
        }
        let new = copy.bytes();
        if (new.len() as u64) < base.size {
            return Ok(None); // cut: not a ranged change
        }
        let mut data = object.data.write().unwrap_or_else(|e| e.into_inner());
        let old_len = data.len();
        for &(offset, len) in written {
            let (from, to) = (offset as usize, ((offset + len) as usize).min(old_len));
            if from < to {
                data[from..to].copy_from_slice(&new[from..to]);
            }
        }
        data.extend_from_slice(&new[old_len..]);
        drop(data);
        object.generation.fetch_add(1, Ordering::Relaxed);
        node.mtime = *copy.mtime.lock().unwrap_or_else(|e| e.into_inner());
        node.ctime = now();
        let content = self.content_of(node);
        Ok(Some(Committed {
            content,
            replaced_size: base.size,
            followed: false,
        }))
    }

    fn commit_append(
        &self,
        path: &Path,
        base: &Arc<dyn Content>,
        tail: &[u8],
        follow: bool,
    ) -> StoreResult<Committed> {
        let mut nodes = self.nodes();
        let node = nodes.get_mut(path).ok_or_else(|| err(libc::ENOENT))?;
        let Some(object) = node.object.clone() else {
            return Err(err(libc::EISDIR));
        };
        let followed = node.meta(self.id).version != base.meta().version;
        if followed && !follow {
            // Not onto another version: the base and these bytes replace the file whole.
            let mut data = vec![0u8; base.meta().size as usize];
            let n = base.read_at(&mut data, 0)?;
            data.truncate(n);
            data.extend_from_slice(tail);
            let replaced_size = object.len();
            node.object = Some(self.new_object(data));
            let t = now();
            node.mtime = t;
            node.ctime = t;
            let content = self.content_of(node);
            return Ok(Committed {
                content,
                replaced_size,
                followed: false,
            });
        }
        let replaced_size = {
            let mut data = object.data.write().unwrap_or_else(|e| e.into_inner());
            let size = data.len() as u64;
            data.extend_from_slice(tail);
            size
        };
        object.generation.fetch_add(1, Ordering::Relaxed);
        let t = now();
        node.mtime = t;
        node.ctime = t;
        let content = self.content_of(node);
        Ok(Committed {
            content,
            replaced_size,
            followed,
        })
    }
}

impl Store for MemStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            hard_links: false,
            special_files: true,
            in_place_append: true,
            ranged_commits_from: Some(RANGED_FROM),
            local_files: false,
            conditional_writes: true,
            xattrs: true,
            stream_commits_up_to: None,
            created_at_commit: false,
            attrs_at_commit: self.attrs_at_commit.load(Ordering::Relaxed),
        }
    }

    fn stat(&self, path: &Path) -> StoreResult<Meta> {
        let nodes = self.nodes();
        Ok(Self::lookup(&nodes, path)?.meta(self.id))
    }

    fn list(&self, path: &Path) -> StoreResult<Vec<DirEntry>> {
        let nodes = self.nodes();
        let dir = Self::lookup(&nodes, path)?;
        if dir.kind != Kind::Dir {
            return Err(err(libc::ENOTDIR));
        }
        Ok(Self::children(&nodes, path)
            .map(|(p, n)| DirEntry {
                name: p.file_name().map(OsString::from).unwrap_or_default(),
                kind: n.kind,
                meta: Some(n.meta(self.id)),
            })
            .collect())
    }

    fn open(&self, path: &Path) -> StoreResult<Arc<dyn Content>> {
        let nodes = self.nodes();
        let node = Self::lookup(&nodes, path)?;
        if node.kind != Kind::File {
            return Err(err(libc::EISDIR));
        }
        Ok(self.content_of(node))
    }

    fn open_to_read(&self, path: &Path) -> StoreResult<Arc<dyn Content>> {
        // A content holds its version's bytes: commits make new ones.
        self.open(path)
    }

    fn create(&self, path: &Path, perm: u16, owner: Owner, exclusive: bool) -> StoreResult<Meta> {
        let mut node = Node::new(Kind::File, perm, owner_of(owner));
        node.object = Some(self.new_object(Vec::new()));
        match self.insert_new(path, node) {
            Err(e) if e.raw_os_error() == libc::EEXIST && !exclusive => {
                let meta = self.stat(path)?;
                if meta.kind == Kind::Dir {
                    return Err(err(libc::EISDIR));
                }
                Ok(meta)
            }
            other => other,
        }
    }

    fn create_held(&self, path: &Path, perm: u16, owner: Owner) -> StoreResult<Meta> {
        self.create(path, perm, owner, true)
    }

    fn working_copy(&self, _path: &Path) -> StoreResult<Arc<dyn WorkingCopy>> {
        Ok(Arc::new(MemCopy {
            store: self.id,
            data: Mutex::new(Vec::new()),
            mtime: Mutex::new(now()),
        }))
    }

    fn commit(&self, req: CommitRequest<'_>) -> StoreResult<Committed> {
        let done = self.commit_change(&req)?;
        let Some(attrs) = &req.attrs else {
            return Ok(done);
        };
        self.set_attr(req.path, attrs)?;
        // The new version as its attributes left it.
        Ok(Committed {
            content: self.open(req.path)?,
            ..done
        })
    }

    fn mknod(&self, path: &Path, kind: Kind, perm: u16, owner: Owner) -> StoreResult<Meta> {
        if !matches!(kind, Kind::Fifo | Kind::Socket) {
            return Err(err(libc::EPERM));
        }
        self.insert_new(path, Node::new(kind, perm, owner_of(owner)))
    }

    fn mkdir(&self, path: &Path, perm: u16, owner: Owner) -> StoreResult<Meta> {
        self.insert_new(path, Node::dir(perm, owner_of(owner)))
    }

    fn rmdir(&self, path: &Path) -> StoreResult<()> {
        let mut nodes = self.nodes();
        let node = Self::lookup(&nodes, path)?;
        if node.kind != Kind::Dir {
            return Err(err(libc::ENOTDIR));
        }
        if path.as_os_str().is_empty() {
            return Err(err(libc::EBUSY));
        }
        if Self::children(&nodes, path).next().is_some() {
            return Err(err(libc::ENOTEMPTY));
        }
        nodes.remove(path);
        touch_parent(&mut nodes, path);
        Ok(())
    }

    fn unlink(&self, path: &Path) -> StoreResult<()> {
        let mut nodes = self.nodes();
        if Self::lookup(&nodes, path)?.kind == Kind::Dir {
            return Err(err(libc::EISDIR));
        }
        nodes.remove(path);
        touch_parent(&mut nodes, path);
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path, mode: RenameMode) -> StoreResult<()> {
        let mut nodes = self.nodes();
        let source = Self::lookup(&nodes, from)?.clone();
        Self::check_parent(&nodes, to)?;
        if to.starts_with(from) && to != from {
            return Err(err(libc::EINVAL)); // into itself
        }
        if from.starts_with(to) && to != from {
            return Err(err(libc::ENOTEMPTY)); // onto its own ancestor
        }
        let target = nodes.get(to).cloned();
        if from == to {
            return match mode {
                RenameMode::NoReplace => Err(err(libc::EEXIST)),
                _ => Ok(()),
            };
        }
        match (mode, &target) {
            (RenameMode::NoReplace, Some(_)) => return Err(err(libc::EEXIST)),
            (RenameMode::Exchange, None) => return Err(err(libc::ENOENT)),
            (RenameMode::Replace, Some(t)) => match (source.kind == Kind::Dir, t.kind == Kind::Dir)
            {
                (true, false) => return Err(err(libc::ENOTDIR)),
                (false, true) => return Err(err(libc::EISDIR)),
                (true, true) if Self::children(&nodes, to).next().is_some() => {
                    return Err(err(libc::ENOTEMPTY));
                }
                _ => {}
            },
            _ => {}
        }
        if from.starts_with(to) && mode == RenameMode::Exchange {
            return Err(err(libc::EINVAL));
        }
        // Take both subtrees out, then put them back under their new names.
        let take = |nodes: &mut BTreeMap<PathBuf, Node>, root: &Path| -> Vec<(PathBuf, Node)> {
            let keys: Vec<PathBuf> = nodes
                .range(root.to_path_buf()..)
                .take_while(|(p, _)| p.starts_with(root))
                .map(|(p, _)| p.clone())
                .collect();
            keys.into_iter()
                .map(|k| {
                    let rel = k.strip_prefix(root).expect("under root").to_path_buf();
                    let node = nodes.remove(&k).expect("listed");
                    (rel, node)
                })
                .collect()
        };
        let moved = take(&mut nodes, from);
        let replaced = take(&mut nodes, to);
        for (rel, node) in moved {
            nodes.insert(join(to, &rel), node);
        }
        if mode == RenameMode::Exchange {
            for (rel, node) in replaced {
                nodes.insert(join(from, &rel), node);
            }
        }
        let t = now();
        for p in [from, to] {
            if let Some(n) = nodes.get_mut(p) {
                n.ctime = t;
            }
            touch_parent(&mut nodes, p);
        }
        Ok(())
    }

    fn link(&self, _from: &Path, _to: &Path) -> StoreResult<Meta> {
        Err(err(libc::EPERM))
    }

    fn symlink(&self, target: &Path, path: &Path, owner: Owner) -> StoreResult<Meta> {
        let mut node = Node::new(Kind::Symlink, 0o777, owner_of(owner));
        node.target = Some(target.to_path_buf());
        self.insert_new(path, node)
    }

    fn readlink(&self, path: &Path) -> StoreResult<PathBuf> {
        let nodes = self.nodes();
        Self::lookup(&nodes, path)?
            .target
            .clone()
            .ok_or_else(|| err(libc::EINVAL))
    }

    fn set_attr(&self, path: &Path, attr: &SetAttr) -> StoreResult<Meta> {
        let mut nodes = self.nodes();
        Self::lookup(&nodes, path)?;
        let node = nodes.get_mut(path).expect("looked up");
        let time = |t: TimeSpec| match t {
            TimeSpec::Now => now(),
            TimeSpec::At(t) => t,
        };
        if let Some(perm) = attr.perm {
            node.perm = perm;
        }
        if let Some(uid) = attr.uid {
            node.uid = uid;
        }
        if let Some(gid) = attr.gid {
            node.gid = gid;
        }
        if let Some(t) = attr.atime {
            node.atime = time(t);
        }
        if let Some(t) = attr.mtime {
            node.mtime = time(t);
        }
        node.ctime = now();
        Ok(node.meta(self.id))
    }

    fn sync(&self, path: &Path) -> StoreResult<()> {
        self.stat(path).map(|_| ())
    }

    fn statfs(&self) -> StoreResult<StoreStatfs> {
        let usage = self.usage()?;
        Ok(StoreStatfs {
            blocks: 1 << 30,
            bfree: (1u64 << 30).saturating_sub(usage.bytes / 4096),
            bavail: (1u64 << 30).saturating_sub(usage.bytes / 4096),
            files: 1 << 20,
            ffree: (1u64 << 20).saturating_sub(usage.files),
            bsize: 4096,
            namelen: 255,
        })
    }

    fn usage(&self) -> StoreResult<Usage> {
        let nodes = self.nodes();
        let mut usage = Usage::default();
        for (path, node) in nodes.iter() {
            if path.as_os_str().is_empty() {
                continue;
            }
            usage.files += 1;
            if let Some(o) = &node.object {
                usage.bytes += o.len();
            }
        }
        Ok(usage)
    }

    fn get_xattr(&self, path: &Path, name: &OsStr) -> StoreResult<Vec<u8>> {
        let nodes = self.nodes();
        Self::lookup(&nodes, path)?
            .xattrs
            .get(name)
            .cloned()
            .ok_or_else(|| err(libc::ENODATA))
    }

    fn set_xattr(
        &self,
        path: &Path,
        name: &OsStr,
        value: &[u8],
        mode: XattrMode,
    ) -> StoreResult<()> {
        let mut nodes = self.nodes();
        Self::lookup(&nodes, path)?;
        let node = nodes.get_mut(path).expect("looked up");
        match (mode, node.xattrs.contains_key(name)) {
            (XattrMode::Create, true) => return Err(err(libc::EEXIST)),
            (XattrMode::Replace, false) => return Err(err(libc::ENODATA)),
            _ => {}
        }
        node.xattrs.insert(name.to_os_string(), value.to_vec());
        node.ctime = now();
        Ok(())
    }

    fn list_xattr(&self, path: &Path) -> StoreResult<Vec<OsString>> {
        let nodes = self.nodes();
        Ok(Self::lookup(&nodes, path)?.xattrs.keys().cloned().collect())
    }

    fn remove_xattr(&self, path: &Path, name: &OsStr) -> StoreResult<()> {
        let mut nodes = self.nodes();
        Self::lookup(&nodes, path)?;
        let node = nodes.get_mut(path).expect("looked up");
        node.xattrs.remove(name).ok_or_else(|| err(libc::ENODATA))?;
        node.ctime = now();
        Ok(())
    }

    fn forget(&self, _path: &Path, _tree: bool) {}

    fn forget_removed(&self, _path: &Path) {}
}

fn join(root: &Path, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(store: &MemStore, path: &str, bytes: &[u8]) {
        let path = Path::new(path);
        store.create(path, 0o644, None, false).unwrap();
        let base = store.open(path).unwrap();
        let copy = store.working_copy(Path::new("f")).unwrap();
        copy.write_at(bytes, 0).unwrap();
        store
            .commit(CommitRequest {
                path,
                base: &base,
                change: Change::Whole(&copy),
                durable: false,
                attrs: None,
            })
            .unwrap();
    }

    fn read(content: &dyn Content) -> Vec<u8> {
        let mut buf = vec![0u8; 1 << 16];
        let n = content.read_at(&mut buf, 0).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn readers_keep_their_version_and_follow_appends_of_it() {
        let s = MemStore::new();
        write(&s, "f", b"one");
        let old = s.open(Path::new("f")).unwrap();
        let appended = s
            .commit(CommitRequest {
                path: Path::new("f"),
                base: &old,
                change: Change::Append {
                    tail: b"+two",
                    follow: true,
                },
                durable: false,
                attrs: None,
            })
            .unwrap();
        assert!(!appended.followed);
        assert_eq!(read(appended.content.as_ref()), b"one+two");
        assert_eq!(read(old.as_ref()), b"one", "its own version");
        let mut buf = [0u8; 16];
        let n = old.read_appended_at(&mut buf, 0).unwrap();
        assert_eq!(
            &buf[..n],
            b"one+two",
            "and on into appends of the same object"
        );
        // Another append based on the old version follows the first.
        let again = s
            .commit(CommitRequest {
                path: Path::new("f"),
                base: &old,
                change: Change::Append {
                    tail: b"!",
                    follow: true,
                },
                durable: false,
                attrs: None,
            })
            .unwrap();
        assert!(again.followed);
        assert_eq!(read(again.content.as_ref()), b"one+two!");
        // A whole commit makes a new object: the old reader stays where it was.
        write(&s, "f", b"new");
        assert_eq!(read(old.as_ref()), b"one");
        assert_eq!(read(s.open(Path::new("f")).unwrap().as_ref()), b"new");
    }

    #[test]
    fn the_tree_answers_with_posix_errnos() {
        let s = MemStore::new();
        let e = |r: StoreResult<Meta>| r.unwrap_err().raw_os_error();
        s.mkdir(Path::new("d"), 0o755, None).unwrap();
        assert_eq!(e(s.mkdir(Path::new("d"), 0o755, None)), libc::EEXIST);
        assert_eq!(e(s.mkdir(Path::new("x/y"), 0o755, None)), libc::ENOENT);
        write(&s, "d/f", b"1");
        assert_eq!(e(s.stat(Path::new("d/f/g"))), libc::ENOTDIR);
        assert_eq!(
            s.rmdir(Path::new("d")).unwrap_err().raw_os_error(),
            libc::ENOTEMPTY
        );
        assert_eq!(
            s.unlink(Path::new("d")).unwrap_err().raw_os_error(),
            libc::EISDIR
        );
        let r = s.rename(Path::new("d"), Path::new("d/sub"), RenameMode::Replace);
        assert_eq!(r.unwrap_err().raw_os_error(), libc::EINVAL);
        s.rename(Path::new("d"), Path::new("e"), RenameMode::Replace)
            .unwrap();
        assert_eq!(read(s.open(Path::new("e/f")).unwrap().as_ref()), b"1");
        write(&s, "g", b"2");
        let r = s.rename(Path::new("g"), Path::new("e/f"), RenameMode::NoReplace);
        assert_eq!(r.unwrap_err().raw_os_error(), libc::EEXIST);
        s.rename(Path::new("g"), Path::new("e/f"), RenameMode::Exchange)
            .unwrap();
        assert_eq!(read(s.open(Path::new("e/f")).unwrap().as_ref()), b"2");
        assert_eq!(read(s.open(Path::new("g")).unwrap().as_ref()), b"1");
        let names: Vec<_> = s
            .list(Path::new(""))
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["e", "g"]);
        assert_eq!(s.usage().unwrap(), Usage { files: 3, bytes: 2 });
    }
}
