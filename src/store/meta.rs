//! The `.meta` view of a session space: the agent's session records as read-only JSON files,
//! rendered from the record store when they are looked at, layered over the space's store.
//!
//! ```text
//! .meta/session.json          the Session record
//! .meta/history.json          messages in order, each with its parts in index order
//! .meta/messages/<id>.json    each Message record
//! .meta/parts/<id>.json       each Part record
//! ```
//! Every change under `.meta` is refused with EROFS (mounts also refuse it earlier, with
//! EACCES, through their grant).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::XattrMode;
use super::{
    Capabilities, CommitRequest, Committed, Content, DirEntry, Kind, LocalFile, Meta, Owner,
    RenameMode, SetAttr, Store, StoreError, StoreResult, StoreStatfs, Usage, Version, WorkingCopy,
};
use crate::records::{ChildCollection, MetaPath, RecordStore};

/// The name of the virtual directory at the root of session spaces.
pub const META_DIR: &str = ".meta";

/// A session space's store with the `.meta` view on top.
pub struct MetaOverlay {
    inner: Arc<dyn Store>,
    records: Arc<RecordStore>,
    session: String,
    root_owner: std::sync::OnceLock<(u32, u32)>,
}

/// What a path under `.meta` names.
enum Node {
    Root,
    Dir(ChildCollection),
    File(MetaPath),
}

fn erofs() -> StoreError {
    StoreError::errno(libc::EROFS)
}

fn enoent() -> StoreError {
    StoreError::errno(libc::ENOENT)
}

/// Classifies `path`: `None` if it is not under `.meta`.
fn classify(path: &Path) -> Option<StoreResult<Node>> {
    let mut parts = path.components().map(|c| match c {
        Component::Normal(s) => s.as_bytes(),
        _ => b"",
    });
    if parts.next()? != META_DIR.as_bytes() {
        return None;
    }
    let node = match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => Ok(Node::Root),
        (Some(b"session.json"), None, _) => Ok(Node::File(MetaPath::Session)),
        (Some(b"history.json"), None, _) => Ok(Node::File(MetaPath::History)),
        (Some(b"messages"), None, _) => Ok(Node::Dir(ChildCollection::Message)),
        (Some(b"parts"), None, _) => Ok(Node::Dir(ChildCollection::Part)),
        (Some(dir @ (b"messages" | b"parts")), Some(file), None) => {
            match file
                .strip_suffix(b".json")
                .and_then(|id| std::str::from_utf8(id).ok())
            {
                Some(id) if *dir == b"messages"[..] => {
                    Ok(Node::File(MetaPath::Message(id.to_string())))
                }
                Some(id) => Ok(Node::File(MetaPath::Part(id.to_string()))),
                None => Err(enoent()),
            }
        }
        _ => Err(enoent()),
    };
    Some(node)
}

/// Rendered JSON held in memory: a `.meta` file as opened.
struct Rendered {
    bytes: Arc<[u8]>,
    meta: Meta,
}

impl Content for Rendered {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = (offset as usize).min(self.bytes.len());
        let n = buf.len().min(self.bytes.len() - start);
        buf[..n].copy_from_slice(&self.bytes[start..start + n]);
        Ok(n)
    }
    fn read_appended_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        // Rendered once at open: a later record shows at the next open.
        self.read_at(buf, offset)
    }
    fn meta(&self) -> &Meta {
        &self.meta
    }
    fn local(&self) -> Option<LocalFile<'_>> {
        None
    }
}

impl MetaOverlay {
    pub fn new(inner: Arc<dyn Store>, records: Arc<RecordStore>, session: String) -> MetaOverlay {
        MetaOverlay {
            inner,
            records,
            session,
            root_owner: std::sync::OnceLock::new(),
        }
    }

    /// Attributes of a virtual entry (`bytes`: a file's rendering); owned like the space
    /// root. A file's version is the record store's version of the session (any change of its
    /// records makes the kernel's and the core's views stale) with its size; directories keep
    /// theirs, so the kernel may cache them.
    fn virtual_meta(&self, kind: Kind, bytes: Option<&[u8]>) -> StoreResult<Meta> {
        let (uid, gid) = self.root_owner()?;
        let now = SystemTime::now();
        let (size, perm, version, volatile) = match bytes {
            Some(b) => {
                let v = self.records.version(&self.session);
                (
                    b.len() as u64,
                    0o444,
                    Version::from_words([u64::MAX, v, b.len() as u64, 0]),
                    true,
                )
            }
            None => (0, 0o555, Version::from_words([u64::MAX, 0, 0, 0]), false),
        };
        Ok(Meta {
            kind,
            size,
            blocks: size.div_ceil(512),
            perm,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            rdev: 0,
            version,
            file_id: None,
            volatile,
        })
    }

    /// The owner of the space root, looked up once.
    fn root_owner(&self) -> StoreResult<(u32, u32)> {
        if let Some(owner) = self.root_owner.get() {
            return Ok(*owner);
        }
        let root = self.inner.stat(Path::new(""))?;
        Ok(*self.root_owner.get_or_init(|| (root.uid, root.gid)))
    }

    /// The rendering of a `.meta` file (cached by the record store, shared).
    fn render(&self, path: &MetaPath) -> StoreResult<Arc<[u8]>> {
        self.records
            .meta_bytes(&self.session, path)?
            .ok_or_else(enoent)
    }

    fn list_meta(&self, node: Node) -> StoreResult<Vec<DirEntry>> {
        let entry = |name: String, kind| DirEntry {
            name: OsString::from(name),
            kind,
            meta: None,
        };
        match node {
            Node::Root => {
                let mut out = vec![
                    entry("messages".into(), Kind::Dir),
                    entry("parts".into(), Kind::Dir),
                ];
                if self
                    .records
                    .meta_file(&self.session, &MetaPath::Session)?
                    .is_some()
                {
                    out.push(entry("session.json".into(), Kind::File));
                    out.push(entry("history.json".into(), Kind::File));
                }
                Ok(out)
            }
            Node::Dir(collection) => Ok(self
                .records
                .list_ids(collection, &self.session)?
                .unwrap_or_default()
                .into_iter()
                .map(|id| entry(format!("{id}.json"), Kind::File))
                .collect()),
            Node::File(_) => Err(StoreError::errno(libc::ENOTDIR)),
        }
    }

    fn refuse_meta(&self, path: &Path) -> StoreResult<()> {
        match classify(path) {
            Some(_) => Err(erofs()),
            None => Ok(()),
        }
    }
}

impl Store for MetaOverlay {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn stat(&self, path: &Path) -> StoreResult<Meta> {
        match classify(path) {
            None => self.inner.stat(path),
            Some(node) => match node? {
                Node::Root | Node::Dir(_) => self.virtual_meta(Kind::Dir, None),
                Node::File(file) => self.virtual_meta(Kind::File, Some(&self.render(&file)?)),
            },
        }
    }

    fn list(&self, path: &Path) -> StoreResult<Vec<DirEntry>> {
        match classify(path) {
            Some(node) => self.list_meta(node?),
            None if path.as_os_str().is_empty() => {
                let mut entries = self.inner.list(path)?;
                // The view replaces anything stored under that name.
                entries.retain(|e| e.name != META_DIR);
                entries.push(DirEntry {
                    name: META_DIR.into(),
                    kind: Kind::Dir,
                    meta: None,
                });
                Ok(entries)
            }
            None => self.inner.list(path),
        }
    }

    fn open_to_read(&self, path: &Path) -> StoreResult<Arc<dyn Content>> {
        match classify(path) {
            None => self.inner.open_to_read(path),
            // Rendered records are read from memory, whole.
            Some(_) => self.open(path),
        }
    }

    fn open(&self, path: &Path) -> StoreResult<Arc<dyn Content>> {
        match classify(path) {
            None => self.inner.open(path),
            Some(node) => match node? {
                Node::File(file) => {
                    let bytes = self.render(&file)?;
                    let meta = self.virtual_meta(Kind::File, Some(&bytes))?;
                    Ok(Arc::new(Rendered { bytes, meta }))
                }
                _ => Err(StoreError::errno(libc::EISDIR)),
            },
        }
    }

    fn create(&self, path: &Path, perm: u16, owner: Owner, exclusive: bool) -> StoreResult<Meta> {
        self.refuse_meta(path)?;
        self.inner.create(path, perm, owner, exclusive)
    }

    fn create_held(&self, path: &Path, perm: u16, owner: Owner) -> StoreResult<Meta> {
        self.refuse_meta(path)?;
        self.inner.create_held(path, perm, owner)
    }

    fn working_copy(&self, path: &Path) -> StoreResult<Arc<dyn WorkingCopy>> {
        self.inner.working_copy(path)
    }

    fn commit(&self, req: CommitRequest<'_>) -> StoreResult<Committed> {
        self.refuse_meta(req.path)?;
        self.inner.commit(req)
    }

    fn mknod(&self, path: &Path, kind: Kind, perm: u16, owner: Owner) -> StoreResult<Meta> {
        self.refuse_meta(path)?;
        self.inner.mknod(path, kind, perm, owner)
    }

    fn mkdir(&self, path: &Path, perm: u16, owner: Owner) -> StoreResult<Meta> {
        self.refuse_meta(path)?;
        self.inner.mkdir(path, perm, owner)
    }

    fn rmdir(&self, path: &Path) -> StoreResult<()> {
        self.refuse_meta(path)?;
        self.inner.rmdir(path)
    }

    fn unlink(&self, path: &Path) -> StoreResult<()> {
        self.refuse_meta(path)?;
        self.inner.unlink(path)
    }

    fn rename(&self, from: &Path, to: &Path, mode: RenameMode) -> StoreResult<()> {
        self.refuse_meta(from)?;
        self.refuse_meta(to)?;
        self.inner.rename(from, to, mode)
    }

    fn link(&self, from: &Path, to: &Path) -> StoreResult<Meta> {
        self.refuse_meta(from)?;
        self.refuse_meta(to)?;
        self.inner.link(from, to)
    }

    fn symlink(&self, target: &Path, path: &Path, owner: Owner) -> StoreResult<Meta> {
        self.refuse_meta(path)?;
        self.inner.symlink(target, path, owner)
    }

    fn readlink(&self, path: &Path) -> StoreResult<PathBuf> {
        match classify(path) {
            Some(_) => Err(StoreError::errno(libc::EINVAL)),
            None => self.inner.readlink(path),
        }
    }

    fn set_attr(&self, path: &Path, attr: &SetAttr) -> StoreResult<Meta> {
        self.refuse_meta(path)?;
        self.inner.set_attr(path, attr)
    }

    fn sync(&self, path: &Path) -> StoreResult<()> {
        match classify(path) {
            Some(_) => Ok(()),
            None => self.inner.sync(path),
        }
    }

    fn statfs(&self) -> StoreResult<StoreStatfs> {
        self.inner.statfs()
    }

    fn usage(&self) -> StoreResult<Usage> {
        self.inner.usage()
    }

    fn get_xattr(&self, path: &Path, name: &OsStr) -> StoreResult<Vec<u8>> {
        match classify(path) {
            Some(node) => node.and(Err(StoreError::errno(libc::ENODATA))),
            None => self.inner.get_xattr(path, name),
        }
    }

    fn set_xattr(
        &self,
        path: &Path,
        name: &OsStr,
        value: &[u8],
        mode: XattrMode,
    ) -> StoreResult<()> {
        self.refuse_meta(path)?;
        self.inner.set_xattr(path, name, value, mode)
    }

    fn list_xattr(&self, path: &Path) -> StoreResult<Vec<OsString>> {
        match classify(path) {
            Some(node) => node.map(|_| Vec::new()),
            None => self.inner.list_xattr(path),
        }
    }

    fn remove_xattr(&self, path: &Path, name: &OsStr) -> StoreResult<()> {
        self.refuse_meta(path)?;
        self.inner.remove_xattr(path, name)
    }

    fn forget(&self, path: &Path, tree: bool) {
        self.inner.forget(path, tree)
    }

    fn forget_removed(&self, path: &Path) {
        self.inner.forget_removed(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::{SpaceId, SpaceKind};
    use crate::store::local::LocalBackend;

    fn overlay() -> (tempfile::TempDir, MetaOverlay) {
        let dir = tempfile::tempdir().unwrap();
        let (backend, _) = LocalBackend::open(dir.path()).unwrap();
        let id = SpaceId::new(SpaceKind::Session, "ses_7f3a").unwrap();
        let store = backend.open_space(&id, Some(None)).unwrap();
        let records_dir = dir.path().join("records");
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/agent-records");
        for entry in std::fs::read_dir(fixtures).unwrap() {
            let entry = entry.unwrap();
            let to = records_dir.join(entry.file_name());
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(entry.path()).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        }
        let records = Arc::new(RecordStore::open(&records_dir).unwrap());
        let o = MetaOverlay::new(Arc::new(store), records, "ses_7f3a".into());
        (dir, o)
    }

    fn names(o: &MetaOverlay, path: &str) -> Vec<String> {
        let mut v: Vec<_> = o
            .list(Path::new(path))
            .unwrap()
            .into_iter()
            .map(|e| e.name.into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_view_lists_and_renders_the_sessions_records() {
        let (_d, o) = overlay();
        assert_eq!(names(&o, ""), [".meta"]);
        assert_eq!(
            names(&o, ".meta"),
            ["history.json", "messages", "parts", "session.json"]
        );
        assert_eq!(
            names(&o, ".meta/messages"),
            [
                "msg_0001.json",
                "msg_0002.json",
                "msg_0003.json",
                "msg_0004.json"
            ]
        );
        let content = o.open(Path::new(".meta/session.json")).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = content.read_at(&mut buf, 0).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&buf[..n]).unwrap();
        assert_eq!(v["id"], "ses_7f3a");
        let meta = o.stat(Path::new(".meta/session.json")).unwrap();
        assert_eq!(meta.size, n as u64);
        assert_eq!(meta.perm, 0o444);
        assert!(meta.volatile);
        assert_eq!(o.stat(Path::new(".meta/parts")).unwrap().perm, 0o555);
        assert_eq!(
            o.stat(Path::new(".meta/messages/nope.json"))
                .unwrap_err()
                .raw_os_error(),
            libc::ENOENT
        );
    }

    #[test]
    fn changes_under_meta_are_erofs() {
        let (_d, o) = overlay();
        let p = Path::new(".meta/session.json");
        let code = |e: StoreError| Some(e.raw_os_error());
        assert_eq!(code(o.unlink(p).unwrap_err()), Some(libc::EROFS));
        assert_eq!(
            code(
                o.create(Path::new(".meta/x"), 0o644, None, true)
                    .unwrap_err()
            ),
            Some(libc::EROFS)
        );
        assert_eq!(
            code(o.mkdir(Path::new(".meta/d"), 0o755, None).unwrap_err()),
            Some(libc::EROFS)
        );
        assert_eq!(
            code(
                o.rename(p, Path::new("out"), RenameMode::Replace)
                    .unwrap_err()
            ),
            Some(libc::EROFS)
        );
        assert_eq!(
            code(o.rmdir(Path::new(".meta")).unwrap_err()),
            Some(libc::EROFS)
        );
        let copy = o.working_copy(Path::new("f")).unwrap();
        let base = o.open(p).unwrap();
        let e = o
            .commit(CommitRequest {
                path: p,
                base: &base,
                change: crate::store::Change::Whole(&copy),
                durable: false,
                attrs: None,
            })
            .err()
            .unwrap();
        assert_eq!(e.raw_os_error(), libc::EROFS);
        // FIFOs and sockets outside `.meta` are the space's (a decorator inherits nothing).
        let fifo = o.mknod(Path::new("pipe"), Kind::Fifo, 0o600, None).unwrap();
        assert_eq!(fifo.kind, Kind::Fifo);
        assert_eq!(
            code(
                o.mknod(Path::new(".meta/pipe"), Kind::Fifo, 0o600, None)
                    .unwrap_err()
            ),
            Some(libc::EROFS)
        );
    }
}
