//! The storage seam: what the filesystem core asks of a backend, and nothing else. A backend
//! holds one space's committed files and makes working copies for writers; it owns how a
//! commit is done (the local store exchanges names, appends or patches in place; an object
//! store uploads), and says what it can do through [`Capabilities`] instead of methods that
//! quietly refuse: no trait method here has a default body, so a decorator cannot miss one.
//!
//! Paths are relative to the space root (`""` is the root itself) and never contain `.` or
//! `..` components. Versions are opaque: the core only compares them for equality.
//!
//! Implementations: [`local`] (the default: plain files under the data dir), [`meta`] (the
//! `.meta` view of agent records, a decorator over a session's store), and the test doubles
//! [`mem::MemStore`] and [`failing::FailingStore`].

pub mod ending;
pub mod error;
pub mod failing;
pub mod local;
pub mod mem;
pub mod meta;
pub mod s3;
pub mod wait;

use std::any::Any;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

pub use error::{StoreError, StoreResult};

/// The type of a stored entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A named pipe: the kernel passes its data between processes; the store keeps its name.
    Fifo,
    /// The name of a Unix socket (`bind`); as for a FIFO, only the name is stored.
    Socket,
    /// Device nodes, when found in the backing store: shown as what they are (with their
    /// device number), never created by roomfs; the kernel refuses to open them (`nodev`).
    BlockDevice,
    CharDevice,
}

/// The identity of one committed version of an entry, as the backend knows it (the local
/// store: the file's device, inode, ctime and size; an object store: the ETag). Opaque: equal
/// exactly when it is the same version.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Version(VersionRepr);

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum VersionRepr {
    Words([u64; 4]),
    Tag(Arc<str>),
}

impl Version {
    /// A version named by four numbers (whatever identifies it in the backend).
    pub fn from_words(words: [u64; 4]) -> Version {
        Version(VersionRepr::Words(words))
    }

    /// A version named by a tag (an ETag).
    pub fn from_tag(tag: &str) -> Version {
        Version(VersionRepr::Tag(Arc::from(tag)))
    }

    /// The tag of a version made by [`Version::from_tag`], for the store that made it.
    pub fn tag(&self) -> Option<&str> {
        match &self.0 {
            VersionRepr::Tag(t) => Some(t),
            VersionRepr::Words(_) => None,
        }
    }

    /// A name for this version that says nothing of what the backend identifies it by (for
    /// HTTP ETags): 32 hex digits of a SHA-256 of it. Equal exactly when the versions are
    /// (as far as a 128-bit hash tells).
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        match &self.0 {
            VersionRepr::Words(words) => {
                h.update(b"w");
                for w in words {
                    h.update(w.to_le_bytes());
                }
            }
            VersionRepr::Tag(tag) => {
                h.update(b"t");
                h.update(tag.as_bytes());
            }
        }
        h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The identity of a stored file across its names (hard links): equal for every name of one
/// file, whatever version it holds. Opaque.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId(pub u64, pub u64);

/// Attributes of a stored entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    pub kind: Kind,
    pub size: u64,
    pub blocks: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// The device number (`st_rdev`) of a device node; 0 for anything else.
    pub rdev: u64,
    /// Which committed version these attributes are of.
    pub version: Version,
    /// Which file this is, where the store keeps hard links (`None` otherwise).
    pub file_id: Option<FileId>,
    /// Generated on demand (the `.meta` view): the kernel must not cache its attributes.
    pub volatile: bool,
}

/// One directory entry as listed by the store.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: OsString,
    pub kind: Kind,
    /// Its attributes, where the backend has them from the listing itself (one listing
    /// instead of a look-up per entry); `None`: ask with `stat`.
    pub meta: Option<Meta>,
}

/// Attribute changes (`chmod`, `chown`, `utimens`); `None` leaves a field alone.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<TimeSpec>,
    pub mtime: Option<TimeSpec>,
}

impl SetAttr {
    /// Whether it changes anything.
    pub fn is_empty(&self) -> bool {
        self.perm.is_none()
            && self.uid.is_none()
            && self.gid.is_none()
            && self.atime.is_none()
            && self.mtime.is_none()
    }
}

/// A timestamp to set: a given time or "now".
#[derive(Clone, Copy, Debug)]
pub enum TimeSpec {
    Now,
    At(SystemTime),
}

/// How `rename` treats an existing target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenameMode {
    /// Replace the target (POSIX `rename`).
    Replace,
    /// Fail with EEXIST if the target exists (`RENAME_NOREPLACE`).
    NoReplace,
    /// Swap source and target atomically (`RENAME_EXCHANGE`).
    Exchange,
}

/// Owner given to new entries; `None` keeps the daemon's own (when it cannot chown).
pub type Owner = Option<(u32, u32)>;

/// What a backend can do, so the core (and its tests) can tell a refusal by design from a
/// failure, and choose the cheaper ways where they exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Hard links (`link`); without, `link` answers `EPERM`.
    pub hard_links: bool,
    /// FIFOs and sockets' names (`mknod`); without, `mknod` answers `EPERM`.
    pub special_files: bool,
    /// Appends committed by adding to the file in place, without a copy.
    pub in_place_append: bool,
    /// Commits of only the changed ranges of a large file are worth it from this size on: the
    /// core then seeds working copies of such files on demand only ([`Change::Ranges`]).
    pub ranged_commits_from: Option<u64>,
    /// Committed contents may have a local file the kernel can read directly (passthrough).
    pub local_files: bool,
    /// New names and replacements can be made conditional on what is there (`O_EXCL` and
    /// `RENAME_NOREPLACE` decided by the store itself, across hosts).
    pub conditional_writes: bool,
    /// Extended attributes of the `user.` namespace; without, the xattr calls answer
    /// `EOPNOTSUPP`.
    pub xattrs: bool,
    /// The output of a running sequential writer is committed while it runs (see `fs::stream`)
    /// only while the file is at most this large (`None`: always): a store where each commit
    /// rewrites the whole object bounds what that may cost.
    pub stream_commits_up_to: Option<u64>,
    /// A file made by [`Store::create_held`] is only this process's until the open that made
    /// it commits (other hosts see it, and it survives a crash of the process, from then on):
    /// the core commits such a handle at its release even if nothing was written, so that a
    /// file created and closed empty (`touch`) is made.
    pub created_at_commit: bool,
    /// Changes of mode, owner and times of a file that one handle of this process has
    /// uncommitted changes to are held by the core and passed to that handle's commit
    /// ([`CommitRequest::attrs`]), so that the store publishes them with the new version (one
    /// write instead of several on an object store: `tar -x` and `cp -a` set three after
    /// writing each file). This process shows them at once; others see them with the version
    /// (the file's bytes, too, reach them only then).
    pub attrs_at_commit: bool,
}

/// How `set_xattr` treats an existing attribute (`setxattr(2)`'s flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrMode {
    /// Create or replace.
    Set,
    /// Fail with `EEXIST` if it exists (`XATTR_CREATE`).
    Create,
    /// Fail with `ENODATA` if it does not (`XATTR_REPLACE`).
    Replace,
}

/// A local file behind committed content or a working copy.
pub struct LocalFile<'a> {
    pub file: &'a File,
    /// Which stored object the file is (equal for every version of one object: appends in
    /// place keep it, a commit by exchange makes a new one).
    pub object: Version,
}

/// The committed content of a file, opened at one moment: later commits do not change what
/// it reads (appends committed in place aside: see [`Content::read_appended_at`]; and a file
/// with several names, which a store keeps as one file, is read as it is now, as on a local
/// disk).
pub trait Content: Send + Sync + Any {
    /// Reads at `offset`; returns 0 at the end of this version.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Reads at `offset` like `read_at`, and on past this version's end into what whole
    /// appends committed to it since, as `tail -f` expects (stores that replace the object on
    /// every commit read only this version).
    fn read_appended_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Attributes of this version as it was opened or committed.
    fn meta(&self) -> &Meta;
    /// The local file holding this content, when there is one (passthrough, fast copies,
    /// holes).
    fn local(&self) -> Option<LocalFile<'_>>;
}

/// Attributes of a working copy as it is now.
#[derive(Clone, Copy, Debug)]
pub struct CopyStat {
    pub size: u64,
    pub blocks: u64,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// A writer's private copy of a file, made by the store that will commit it (which finds its
/// own type again through `Any`). It becomes the file's content only when committed; dropped
/// uncommitted, it is discarded.
pub trait WorkingCopy: Send + Sync + Any {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `data` at `offset` (growing the copy as needed).
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes `offset..offset + len` read as zeros without changing the size (a hole where
    /// the copy's storage can punch one).
    fn zero(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Allocates storage for `offset..offset + len` without changing the size, so a full disk
    /// shows now rather than at a later write.
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()>;
    fn stat(&self) -> io::Result<CopyStat>;
    /// The local file holding the copy, when there is one (fast copies, holes).
    fn local_file(&self) -> Option<&File>;
}

/// What a commit puts in place of the file's current version.
pub enum Change<'a> {
    /// The working copy is the whole new content.
    Whole(&'a Arc<dyn WorkingCopy>),
    /// The working copy holds the base version's bytes only where the writer needed them: the
    /// ranges `written` (below the base's size) are the writer's, and everything past the
    /// base's size is new. The store may commit just those; where it cannot (the file is no
    /// longer the base version, somebody reads it...), it calls `complete`, which copies the
    /// rest of the base into the working copy, and commits that whole.
    Ranges {
        copy: &'a Arc<dyn WorkingCopy>,
        written: &'a [(u64, u64)],
        complete: &'a dyn Fn() -> io::Result<()>,
    },
    /// Bytes added at the end of the base. With `follow` (`O_APPEND`), they go at the end of
    /// the file as it is when committed, after whatever others appended since the writer's
    /// base; without, they are added to the base, and if the file is no longer the base, the
    /// base and these bytes replace it whole (the last close wins).
    Append { tail: &'a [u8], follow: bool },
}

/// A commit: put `change` at `path`, whose version the writer started from is `base`.
pub struct CommitRequest<'a> {
    pub path: &'a Path,
    pub base: &'a Arc<dyn Content>,
    pub change: Change<'a>,
    /// The file and its directory entry are on stable storage when the commit returns.
    pub durable: bool,
    /// Attribute changes made while the writer held uncommitted changes, for the new version
    /// (only where [`Capabilities::attrs_at_commit`]; `None` elsewhere): applied as `set_attr`
    /// would, after the change, with the new version's own mtime giving way to one set here
    /// (`TimeSpec::Now`, `touch`: the new version's own time).
    pub attrs: Option<SetAttr>,
}

/// What a commit did.
pub struct Committed {
    /// The new version, opened.
    pub content: Arc<dyn Content>,
    /// The size of the version it replaced (for the space's byte count).
    pub replaced_size: u64,
    /// The change went onto another version than the base (appends following others').
    pub followed: bool,
}

/// Usage and capacity of the storage behind a space.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreStatfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// What a space holds: entries of every kind, and the bytes of its files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub files: u64,
    pub bytes: u64,
}

/// A storage backend holding one space.
///
/// Commits are atomic: readers see the previous version or the new one, never a mix, and a
/// failed commit leaves the previous version as it was. Implementations must not hold locks
/// that other operations of the store need across slow I/O (an upload), and take no lock of
/// the core's.
pub trait Store: Send + Sync + 'static {
    /// What this store can do.
    fn capabilities(&self) -> Capabilities;
    /// Attributes of `path` (symlinks are not followed).
    fn stat(&self, path: &Path) -> StoreResult<Meta>;
    /// Entries of the directory `path`, without `.` and `..`.
    fn list(&self, path: &Path) -> StoreResult<Vec<DirEntry>>;
    /// Opens the committed content of the file at `path`.
    fn open(&self, path: &Path) -> StoreResult<Arc<dyn Content>>;
    /// Opens the committed content of the file at `path` for a reader (an `O_RDONLY` open),
    /// which keeps reading the version it opened whatever other writers commit. A store that
    /// keeps no replaced version (an object store) fetches a small file whole now, rather than
    /// at its first read, when the version may be gone; and `ESTALE` if the version it knew
    /// of `path` is already gone, having learnt the current one: the kernel then looks the
    /// name up again, so that its attributes are those of the version its next open reads.
    fn open_to_read(&self, path: &Path) -> StoreResult<Arc<dyn Content>>;
    /// Creates an empty committed file (`EEXIST` if `exclusive` and something is there).
    fn create(&self, path: &Path, perm: u16, owner: Owner, exclusive: bool) -> StoreResult<Meta>;
    /// Creates an empty file for an open without `O_EXCL`, which holds it and commits it at
    /// its release (`EEXIST` if something is there). Where [`Capabilities::created_at_commit`],
    /// the store may keep the new name in this process until that commit, which then makes
    /// the object (one write instead of two on an object store); elsewhere it is `create`.
    fn create_held(&self, path: &Path, perm: u16, owner: Owner) -> StoreResult<Meta>;
    /// A new, empty working copy, to be committed to this store, meant for the file at `path`
    /// (a hint: the commit says where it goes; a store may start uploading there early).
    fn working_copy(&self, path: &Path) -> StoreResult<Arc<dyn WorkingCopy>>;
    /// Commits a change (see [`Change`]); the new version keeps the mode and owner of the
    /// version it replaces. On failure the previous version is untouched and the working copy
    /// stays the caller's, to try again or drop.
    fn commit(&self, req: CommitRequest<'_>) -> StoreResult<Committed>;
    /// Creates a FIFO or a socket's name (`kind` is `Fifo` or `Socket`); `EPERM` where
    /// [`Capabilities::special_files`] is false.
    fn mknod(&self, path: &Path, kind: Kind, perm: u16, owner: Owner) -> StoreResult<Meta>;
    fn mkdir(&self, path: &Path, perm: u16, owner: Owner) -> StoreResult<Meta>;
    fn rmdir(&self, path: &Path) -> StoreResult<()>;
    fn unlink(&self, path: &Path) -> StoreResult<()>;
    fn rename(&self, from: &Path, to: &Path, mode: RenameMode) -> StoreResult<()>;
    /// Makes `to` another name of the file at `from`; `EPERM` where
    /// [`Capabilities::hard_links`] is false.
    fn link(&self, from: &Path, to: &Path) -> StoreResult<Meta>;
    fn symlink(&self, target: &Path, path: &Path, owner: Owner) -> StoreResult<Meta>;
    fn readlink(&self, path: &Path) -> StoreResult<PathBuf>;
    fn set_attr(&self, path: &Path, attr: &SetAttr) -> StoreResult<Meta>;
    /// Makes the committed content of `path` and its directory entry durable.
    fn sync(&self, path: &Path) -> StoreResult<()>;
    fn statfs(&self) -> StoreResult<StoreStatfs>;
    /// What the whole space holds now (counted once when the space opens with limits).
    fn usage(&self) -> StoreResult<Usage>;
    /// The value of the extended attribute `name` of `path` (`ENODATA` if it has none). The
    /// core passes only `user.` names; commits keep a file's attributes.
    fn get_xattr(&self, path: &Path, name: &OsStr) -> StoreResult<Vec<u8>>;
    fn set_xattr(
        &self,
        path: &Path,
        name: &OsStr,
        value: &[u8],
        mode: XattrMode,
    ) -> StoreResult<()>;
    /// The names of `path`'s extended attributes.
    fn list_xattr(&self, path: &Path) -> StoreResult<Vec<OsString>>;
    /// Removes the attribute `name` (`ENODATA` if there is none).
    fn remove_xattr(&self, path: &Path, name: &OsStr) -> StoreResult<()>;
    /// Another host (or process) changed `path` (with `tree`, also what is below it): forgets
    /// what the store remembers of it, so that the next question asks the backend. A store
    /// that remembers nothing does nothing. Never waits for I/O.
    fn forget(&self, path: &Path, tree: bool);
    /// Another host (or process) removed the file at `path`, or moved it away: like
    /// `forget(path, false)`, except that a file this store made at `path` and has not stored
    /// yet (`create_held`) stays. Nobody else can have seen that one, so what they removed was
    /// there before it. Never waits for I/O.
    fn forget_removed(&self, path: &Path);
}

/// Where a process stores spaces of one kind: its data dir, or an S3 bucket. In JSON
/// `"local"`, `{"s3": {...}}` (see [`s3::S3Config`]) or the URL `"s3://bucket/prefix"`; on the
/// command line `local` or the URL.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum StoreConfig {
    #[default]
    Local,
    S3(Box<s3::S3Config>),
}

impl StoreConfig {
    /// Parses `local` or `s3://bucket/prefix?name=value...`.
    pub fn parse(text: &str) -> Result<StoreConfig, String> {
        match text {
            "local" => Ok(StoreConfig::Local),
            url if url.starts_with("s3://") => {
                Ok(StoreConfig::S3(Box::new(s3::S3Config::from_url(url)?)))
            }
            other => Err(format!(
                "store {other:?}: expected local or s3://BUCKET/PREFIX"
            )),
        }
    }

    /// `local`, or the store's `s3://bucket/prefix`.
    pub fn name(&self) -> String {
        match self {
            StoreConfig::Local => "local".into(),
            StoreConfig::S3(c) => c.url(),
        }
    }

    /// How many threads serve a mount of a space in this store, unless told: a few for the
    /// local disk, where a request takes microseconds and one hot thread serves best (see
    /// `reader_gate`); more for S3, where each thread waits out its request's round trip, so
    /// that many agents' requests are in flight at once (as many as the threads).
    pub fn default_threads(&self) -> usize {
        match self {
            StoreConfig::Local => 4,
            StoreConfig::S3(_) => 16,
        }
    }

    /// Checks what parsing cannot.
    pub fn check(&self) -> Result<(), String> {
        match self {
            StoreConfig::Local => Ok(()),
            StoreConfig::S3(c) => c.check(),
        }
    }

    /// Opens the store for a process whose data dir is `data_dir` (`None`: the data dir
    /// itself, which the caller has). The error is one sentence for the user.
    pub fn open(&self, data_dir: &Path) -> Result<Option<Arc<dyn crate::space::Spaces>>, String> {
        match self {
            StoreConfig::Local => Ok(None),
            StoreConfig::S3(c) => {
                let spaces = s3::open(c, data_dir)
                    .map_err(|e| format!("cannot open the store {}: {e}", c.url()))?;
                Ok(Some(Arc::new(spaces)))
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for StoreConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(t) => StoreConfig::parse(&t).map_err(D::Error::custom),
            serde_json::Value::Object(mut map) if map.len() == 1 && map.contains_key("s3") => {
                // An object only: serde would read the struct from an array by position.
                let s3 = map.remove("s3").unwrap_or_default();
                if !s3.is_object() {
                    return Err(D::Error::custom(format!(
                        "s3: expected a JSON object, found {}",
                        crate::daemon::config::json_kind(&s3)
                    )));
                }
                let config: s3::S3Config =
                    serde_json::from_value(s3).map_err(|e| D::Error::custom(format!("s3: {e}")))?;
                config
                    .check()
                    .map_err(|e| D::Error::custom(format!("s3: {e}")))?;
                Ok(StoreConfig::S3(Box::new(config)))
            }
            _ => Err(D::Error::custom(
                "expected \"local\", \"s3://BUCKET/PREFIX\" or {\"s3\": {\"bucket\": ...}}",
            )),
        }
    }
}

/// Copies `len` bytes at `offset` of `src` to the same offset of `dst` (in the kernel when
/// both are local files); stops early at the end of `src`. Between local files only the
/// source's data is copied, not its holes: `dst`, as long as needed already (a working copy is
/// sized first), keeps the holes of a sparse file.
pub fn copy_range(
    src: &dyn Content,
    dst: &dyn WorkingCopy,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let end = offset + len;
    if let (Some(from), Some(to)) = (src.local(), dst.local_file()) {
        // Only this version's bytes: a later in-place append may have grown the file.
        let end = end.min(src.meta().size);
        let mut pos = offset;
        while pos < end {
            let Some((data, hole)) = data_run(from.file, pos, end)? else {
                break;
            };
            let (mut off_in, mut off_out) = (data as i64, data as i64);
            while (off_in as u64) < hole {
                let want = (hole - off_in as u64).min(1 << 30) as usize;
                let n = nix::fcntl::copy_file_range(
                    from.file,
                    Some(&mut off_in),
                    to,
                    Some(&mut off_out),
                    want,
                )
                .map_err(io::Error::from)?;
                if n == 0 {
                    return Ok(());
                }
            }
            pos = hole;
        }
        return Ok(());
    }
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut off = offset;
    while off < end {
        let want = (end - off).min(buf.len() as u64) as usize;
        let n = src.read_at(&mut buf[..want], off)?;
        if n == 0 {
            break;
        }
        dst.write_at(&buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// The next run of data of `file` at or after `pos`, cut at `end`: its start and end (where
/// a hole or `end` begins); `None` if only holes are left before `end`.
fn data_run(file: &std::fs::File, pos: u64, end: u64) -> io::Result<Option<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let seek = |from: u64, whence| {
        // SAFETY: a valid descriptor; lseek changes only its offset, which no one else uses
        // (reads and copies of it give their offsets).
        let r = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    };
    let data = match seek(pos, libc::SEEK_DATA) {
        Ok(d) => d,
        // Nothing but a hole from `pos` to the end of the file.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(e) => return Err(e),
    };
    if data >= end {
        return Ok(None);
    }
    let hole = seek(data, libc::SEEK_HOLE)?.min(end);
    Ok(Some((data, hole)))
}

/// `offset` and `len` as the `off_t`s of `fallocate(2)` (EFBIG past its range).
pub fn off_t_range(offset: u64, len: u64) -> io::Result<(libc::off_t, libc::off_t)> {
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= libc::off_t::MAX as u64);
    match end {
        Some(_) => Ok((offset as libc::off_t, len as libc::off_t)),
        None => Err(io::Error::from_raw_os_error(libc::EFBIG)),
    }
}
