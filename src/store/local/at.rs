//! Paths of the local store, resolved beneath a directory held open and never through a
//! symlink: the daemon runs as root for other users, and everything inside a space (symlinks,
//! FIFOs, odd names, directories swapped for links while we work) is hostile input.
//!
//! The invariant: every name the local store touches is reached from a held directory
//! descriptor ([`Dir`]) by the kernel's own resolution with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS` (`openat2(2)`), or, on kernels without
//! `openat2`, one component at a time with `O_NOFOLLOW`. The last component of a path is never
//! followed either: callers use the `*at` calls with `AT_SYMLINK_NOFOLLOW`, and [`At::open`]
//! adds `O_NOFOLLOW`. No path is checked as a string; the kernel checks it as it resolves. A
//! directory replaced by a symlink behind our back makes the call fail with `ELOOP` (or
//! `ENOTDIR`), never lands outside.
//!
//! The only paths resolved the ordinary way are the operator's own (the data dir, the records
//! dir), once, when they are opened ([`Dir::open_trusted`]).
//!
//! Resolving the parent costs one `openat2` where the path has one; a path that is itself
//! `PATH_MAX` bytes or longer (a process working deep inside the mount can use one) is
//! reached a piece at a time. A [`DirCache`] keeps parent directories so resolved for a moment
//! (a file's create, write and close each need its directory): what it holds was resolved
//! exactly as above, and it only ever saves the resolution, never widens what can be reached.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PATH_MAX: usize = libc::PATH_MAX as usize;

/// Set once the kernel answered `ENOSYS` to `openat2`: resolve component by component.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// A store path ready for the `*at` calls: a directory descriptor and one name in it.
pub struct At {
    /// The parent directory, when the path has one (else the name is in `base`).
    opened: Option<Arc<OwnedFd>>,
    base: RawFd,
    name: CString,
}

impl At {
    /// `path` beneath the directory `base` (the empty path is `base` itself); `base` must stay
    /// open while the result is used. Its parent directories are resolved beneath `base`
    /// without following any symlink; `..` components are refused (`EINVAL`: store paths never
    /// have them).
    pub fn new(base: RawFd, path: &Path) -> io::Result<At> {
        At::with_cache(base, path, None)
    }

    /// [`At::new`], taking the parent from `cache` (`base`'s) when it holds it, and leaving it
    /// there when it was resolved now.
    pub fn with_cache(base: RawFd, path: &Path, cache: Option<&DirCache>) -> io::Result<At> {
        let bytes = path.as_os_str().as_bytes();
        let bytes = bytes.strip_suffix(b"/").unwrap_or(bytes);
        if bytes.split(|&b| b == b'/').any(|c| c == b"..") || bytes.starts_with(b"/") {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let Some(split) = bytes.iter().rposition(|&b| b == b'/') else {
            let name = if bytes.is_empty() { b"." } else { bytes };
            return Ok(At {
                opened: None,
                base,
                name: cstring(name)?,
            });
        };
        let (parent, last) = (&bytes[..split], &bytes[split + 1..]);
        let name = cstring(last)?;
        if let Some(fd) = cache.and_then(|c| c.get(parent)) {
            return Ok(At {
                opened: Some(fd),
                base,
                name,
            });
        }
        let epoch = cache.map(DirCache::epoch);
        let opened = Arc::new(open_beneath(
            base,
            parent,
            libc::O_PATH | libc::O_DIRECTORY,
        )?);
        if let (Some(cache), Some(epoch)) = (cache, epoch) {
            cache.put(parent, &opened, epoch);
        }
        Ok(At {
            opened: Some(opened),
            base,
            name,
        })
    }

    /// The directory descriptor to pass.
    pub fn dir(&self) -> RawFd {
        self.opened.as_ref().map_or(self.base, |fd| fd.as_raw_fd())
    }

    /// The name to pass with `dir()`.
    pub fn name(&self) -> &CStr {
        &self.name
    }

    /// `openat` with `flags` (`O_CLOEXEC` and `O_NOFOLLOW` are added) and, for a new file,
    /// `mode`.
    pub fn open(&self, flags: libc::c_int, mode: libc::mode_t) -> io::Result<File> {
        let flags = flags | libc::O_CLOEXEC | libc::O_NOFOLLOW;
        // SAFETY: a valid descriptor and a NUL-terminated path.
        let fd = unsafe { libc::openat(self.dir(), self.name.as_ptr(), flags, mode) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Attributes of the entry itself (a symlink is not followed).
    pub fn stat(&self) -> io::Result<libc::stat> {
        fstatat(self.dir(), &self.name)
    }
}

/// Parent directories resolved beneath one held directory, kept for a moment, so that the
/// operations on one file (its lookup, create, open, commit) resolve its directory once.
///
/// An entry is a directory descriptor opened by [`open_beneath`] (never through a symlink), so
/// using it reaches nothing a fresh resolution could not have reached then. It can only be
/// stale: a directory renamed or removed meanwhile. Renames and removals of directories made
/// through this process's store forget every entry at once (see [`DirCache::forget_all`]), and
/// so do those another roomfs process on the data dir made, when its change log tells of them
/// (as it tells the mounts' kernel caches); changes made behind roomfs's back (an operator)
/// are seen once an entry is older than its time to live, as the kernel's own caches of the
/// mount see them. A stale
/// entry still names a directory beneath the held one, or one removed (where nothing can be
/// created).
pub struct DirCache {
    shards: [Mutex<Shard>; DIR_CACHE_SHARDS],
    /// Bumped by [`DirCache::forget_all`]: entries of an older epoch are not used, and a
    /// resolution that started before a bump is not kept.
    epoch: AtomicU64,
    ttl: Duration,
}

/// One shard of a [`DirCache`]: directories by path, each with when it was resolved and the
/// epoch it was resolved in.
type Shard = HashMap<Vec<u8>, (Arc<OwnedFd>, Instant, u64)>;

/// Shards of the directory cache (each behind its own lock), and the entries each keeps.
const DIR_CACHE_SHARDS: usize = 16;
const DIR_CACHE_SHARD_SIZE: usize = 64;

impl DirCache {
    /// A cache whose entries live for `ttl` at most.
    pub fn new(ttl: Duration) -> DirCache {
        DirCache {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            epoch: AtomicU64::new(0),
            ttl,
        }
    }

    fn shard(&self, path: &[u8]) -> &Mutex<Shard> {
        use std::hash::Hasher;
        let mut h = std::hash::DefaultHasher::new();
        h.write(path);
        &self.shards[h.finish() as usize % DIR_CACHE_SHARDS]
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The directory at `path`, if resolved recently and nothing was forgotten since.
    fn get(&self, path: &[u8]) -> Option<Arc<OwnedFd>> {
        let epoch = self.epoch();
        let shard = self.shard(path).lock().unwrap_or_else(|e| e.into_inner());
        let (fd, at, e) = shard.get(path)?;
        (*e == epoch && at.elapsed() < self.ttl).then(|| fd.clone())
    }

    /// Keeps `fd`, resolved from `path` by a resolution that started in `epoch`.
    fn put(&self, path: &[u8], fd: &Arc<OwnedFd>, epoch: u64) {
        let mut shard = self.shard(path).lock().unwrap_or_else(|e| e.into_inner());
        if self.epoch() != epoch {
            return; // a rename or removal ran meanwhile: the result may be stale already
        }
        if shard.len() >= DIR_CACHE_SHARD_SIZE {
            let ttl = self.ttl;
            shard.retain(|_, (_, at, e)| *e == epoch && at.elapsed() < ttl);
            if shard.len() >= DIR_CACHE_SHARD_SIZE {
                shard.clear();
            }
        }
        shard.insert(path.to_vec(), (fd.clone(), Instant::now(), epoch));
    }

    /// Forgets every entry: a directory was renamed or removed, so paths may name others now.
    pub fn forget_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn fstatat(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: a valid descriptor, a NUL-terminated path and room for the result.
    let ret = unsafe {
        libc::fstatat(
            dir,
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat filled it in.
    Ok(unsafe { st.assume_init() })
}

/// Opens `path` (no `..`, relative) beneath `base` with `flags`, never following a symlink at
/// any component, the last included.
fn open_beneath(base: RawFd, path: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
    // No O_NOFOLLOW for openat2: RESOLVE_NO_SYMLINKS refuses a trailing symlink with ELOOP
    // (with O_NOFOLLOW and O_PATH it would open the link itself).
    let flags = flags | libc::O_CLOEXEC;
    if path.is_empty() {
        return reopen(base, c".", flags | libc::O_NOFOLLOW);
    }
    let mut rest = path;
    let mut opened: Option<OwnedFd> = None;
    while !rest.is_empty() {
        // The longest run of whole components one call can take.
        let take = if rest.len() < PATH_MAX {
            rest.len()
        } else {
            rest[..PATH_MAX]
                .iter()
                .rposition(|&b| b == b'/')
                .filter(|&i| i > 0)
                .ok_or_else(too_long)?
        };
        let dir = opened.as_ref().map_or(base, |fd| fd.as_raw_fd());
        let last = take == rest.len();
        let piece_flags = if last {
            flags
        } else {
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC
        };
        opened = Some(open_piece(dir, &cstring(&rest[..take])?, piece_flags)?);
        rest = rest[take..].strip_prefix(b"/").unwrap_or(&rest[take..]);
    }
    opened.ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

/// One `openat2` beneath `dir`, or the component walk where the kernel has none.
fn open_piece(dir: RawFd, path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        // SAFETY: `open_how` is plain data; all zeros is its empty value.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = flags as u64;
        how.resolve =
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        loop {
            // SAFETY: a valid descriptor, a NUL-terminated path, and `how` with its size.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    dir,
                    path.as_ptr(),
                    &how as *const libc::open_how,
                    std::mem::size_of::<libc::open_how>(),
                )
            };
            if fd >= 0 {
                // SAFETY: just opened, owned by nobody else.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // The kernel restarts the resolution after a concurrent rename.
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                Some(libc::ENOSYS) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                    log::info!(
                        "no openat2 on this kernel: resolving paths one component at a time"
                    );
                    break;
                }
                _ => return Err(e),
            }
        }
    }
    open_components(dir, path.to_bytes(), flags)
}

/// Opens `path` beneath `dir` one component at a time, each with `O_NOFOLLOW` from the one
/// before (kernels without `openat2`); `..` is refused.
fn open_components(dir: RawFd, path: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
    let mut parts = path
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".");
    let mut current: Option<OwnedFd> = None;
    let mut next = parts.next();
    while let Some(part) = next {
        next = parts.next();
        if part == b".." {
            return Err(io::Error::from_raw_os_error(libc::EXDEV));
        }
        let here = current.as_ref().map_or(dir, |fd| fd.as_raw_fd());
        let f = if next.is_none() {
            flags
        } else {
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW
        };
        current = Some(reopen(here, &cstring(part)?, f | libc::O_NOFOLLOW)?);
    }
    match current {
        Some(fd) => Ok(fd),
        None => reopen(dir, c".", flags),
    }
}

/// Plain `openat` of one name (no slash) in `dir`.
fn reopen(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: a valid descriptor and a NUL-terminated name.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A directory held open; paths below it are resolved beneath it (see the module docs).
#[derive(Debug)]
pub struct Dir(OwnedFd);

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for Dir {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// What a walk of a tree found (or removed): entries of every kind, and the bytes of files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub entries: u64,
    pub bytes: u64,
}

impl Dir {
    /// Opens the directory the operator named by `path`, creating it (mode 0755) where
    /// missing. The path is the operator's choice and resolved as such (it may be a symlink);
    /// nothing below it will be.
    pub fn open_trusted(path: &Path, create: bool) -> io::Result<Dir> {
        if create {
            // Only its owner may reach in (the spaces' roots in it belong to their owners,
            // who must not get at the files behind the mounts' back).
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)?;
        }
        let c = cstring(path.as_os_str().as_bytes())?;
        let fd = reopen(libc::AT_FDCWD, &c, libc::O_RDONLY | libc::O_DIRECTORY)?;
        Ok(Dir(fd))
    }

    /// The directory `rel` beneath this one (never through a symlink).
    pub fn open(&self, rel: &Path) -> io::Result<Dir> {
        let bytes = rel.as_os_str().as_bytes();
        if bytes.split(|&b| b == b'/').any(|c| c == b"..") || bytes.starts_with(b"/") {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(Dir(open_beneath(
            self.as_raw_fd(),
            bytes,
            libc::O_RDONLY | libc::O_DIRECTORY,
        )?))
    }

    /// The directory `rel` beneath this one, each missing component made with `mode`; an
    /// existing component must be a directory (a symlink is refused). Returns it, and whether
    /// its last component was made now.
    pub fn create_dirs(&self, rel: &Path, mode: libc::mode_t) -> io::Result<(Dir, bool)> {
        let mut dir = self.reopen()?;
        let mut made = false;
        for part in rel.iter() {
            let name = cstring(part.as_bytes())?;
            if part == ".." {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            // SAFETY: a valid descriptor and a NUL-terminated name.
            made = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) } == 0;
            if !made {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(e);
                }
            }
            dir = Dir(reopen(
                dir.as_raw_fd(),
                &name,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            )?);
        }
        Ok((dir, made))
    }

    /// This directory opened again (its own descriptor, e.g. to list it).
    pub fn reopen(&self) -> io::Result<Dir> {
        Ok(Dir(reopen(
            self.as_raw_fd(),
            c".",
            libc::O_RDONLY | libc::O_DIRECTORY,
        )?))
    }

    /// `rel` beneath this directory, for the `*at` calls.
    pub fn at(&self, rel: &Path) -> io::Result<At> {
        At::new(self.as_raw_fd(), rel)
    }

    /// The names in this directory (without `.` and `..`), with their types where the
    /// filesystem gives them (`None`: ask with `fstatat`).
    pub fn entries(&self) -> io::Result<Vec<(OsString, Option<libc::mode_t>)>> {
        let fd = self.reopen()?;
        let mut listing = nix::dir::Dir::from_fd(fd.0).map_err(io::Error::from)?;
        let mut out = Vec::new();
        for entry in listing.iter() {
            let entry = entry.map_err(io::Error::from)?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            use nix::dir::Type;
            let kind = entry.file_type().map(|t| match t {
                Type::File => libc::S_IFREG,
                Type::Directory => libc::S_IFDIR,
                Type::Symlink => libc::S_IFLNK,
                Type::Fifo => libc::S_IFIFO,
                Type::Socket => libc::S_IFSOCK,
                Type::BlockDevice => libc::S_IFBLK,
                Type::CharacterDevice => libc::S_IFCHR,
            });
            out.push((OsString::from_vec(name.to_vec()), kind));
        }
        Ok(out)
    }

    /// Counts what this directory holds, all the way down, without following a symlink (a
    /// symlink or FIFO counts as one entry of no bytes; nothing is opened but directories).
    pub fn tally(&self) -> io::Result<Tally> {
        let mut tally = Tally::default();
        let mut stack = vec![self.reopen()?];
        while let Some(dir) = stack.pop() {
            for (name, _) in dir.entries()? {
                let c = cstring(name.as_bytes())?;
                let st = match fstatat(dir.as_raw_fd(), &c) {
                    Ok(st) => st,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                    Err(e) => return Err(e),
                };
                tally.entries += 1;
                match st.st_mode & libc::S_IFMT {
                    libc::S_IFREG => tally.bytes += st.st_size as u64,
                    libc::S_IFDIR => match reopen(
                        dir.as_raw_fd(),
                        &c,
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    ) {
                        Ok(sub) => stack.push(Dir(sub)),
                        // Swapped for something else meanwhile: counted as it was seen.
                        Err(e)
                            if matches!(
                                e.raw_os_error(),
                                Some(libc::ELOOP | libc::ENOTDIR | libc::ENOENT)
                            ) => {}
                        Err(e) => return Err(e),
                    },
                    _ => {}
                }
            }
        }
        Ok(tally)
    }

    /// Removes the entry `name` of this directory and, if it is a directory, everything below
    /// it, never following a symlink (a symlink is removed, not its target). Returns what was
    /// removed; a missing entry is nothing removed.
    pub fn remove_all(&self, name: &OsStr) -> io::Result<Tally> {
        let mut tally = Tally::default();
        remove_entry(self.as_raw_fd(), &single_name(name)?, &mut tally)?;
        Ok(tally)
    }

    /// The content of the regular file `name` in this directory; `None` if there is none. A
    /// symlink, FIFO or anything else there is refused (`EINVAL`), never followed or waited on.
    pub fn read_file(&self, name: &OsStr) -> io::Result<Option<Vec<u8>>> {
        use std::io::Read;
        let c = single_name(name)?;
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let mut file = match reopen(self.as_raw_fd(), &c, flags) {
            Ok(fd) => File::from(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(not_a_file(name));
            }
            Err(e) => return Err(e),
        };
        if !file.metadata()?.is_file() {
            return Err(not_a_file(name));
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(Some(bytes))
    }

    /// Replaces the file `name` in this directory with `bytes`, atomically and durably: a new
    /// file (mode `mode`) beside it, synced, renamed over it, the directory synced.
    pub fn write_file_atomic(
        &self,
        name: &OsStr,
        bytes: &[u8],
        mode: libc::mode_t,
    ) -> io::Result<()> {
        use std::io::Write;
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = OsString::from(format!(".tmp-{}-{seq}-", std::process::id()));
        tmp_name.push(name);
        let (tmp, target) = (cstring(tmp_name.as_bytes())?, single_name(name)?);
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        // SAFETY: a valid descriptor and a NUL-terminated name.
        let fd = unsafe {
            libc::openat(
                self.as_raw_fd(),
                tmp.as_ptr(),
                flags | libc::O_CLOEXEC,
                mode,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just opened, owned by nobody else.
        let mut file = unsafe { File::from_raw_fd(fd) };
        let written = (|| {
            file.write_all(bytes)?;
            file.sync_all()?;
            // SAFETY: a valid descriptor and NUL-terminated names.
            check(unsafe {
                libc::renameat(
                    self.as_raw_fd(),
                    tmp.as_ptr(),
                    self.as_raw_fd(),
                    target.as_ptr(),
                )
            })?;
            self.sync()
        })();
        if written.is_err() {
            // SAFETY: a valid descriptor and a NUL-terminated name.
            unsafe { libc::unlinkat(self.as_raw_fd(), tmp.as_ptr(), 0) };
        }
        written
    }

    /// Renames the entry `from` of this directory to `to` (both single names), refusing to
    /// replace an existing `to` (`RENAME_NOREPLACE`).
    pub fn rename_noreplace(&self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        let (from, to) = (single_name(from)?, single_name(to)?);
        let fd = self.as_raw_fd();
        // SAFETY: a valid descriptor and NUL-terminated names.
        check(unsafe {
            libc::renameat2(fd, from.as_ptr(), fd, to.as_ptr(), libc::RENAME_NOREPLACE)
        })
    }

    /// Removes the name `name` (not a directory) from this directory; a missing one is no
    /// error. Returns whether it existed.
    pub fn remove_file(&self, name: &OsStr) -> io::Result<bool> {
        let c = single_name(name)?;
        // SAFETY: a valid descriptor and a NUL-terminated name.
        match check(unsafe { libc::unlinkat(self.as_raw_fd(), c.as_ptr(), 0) }) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes the directory's entries durable.
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: a valid descriptor.
        check(unsafe { libc::fsync(self.as_raw_fd()) })
    }
}

/// Directory descriptors a removal holds at most. An agent can nest directories as deep as its
/// file limit allows; the removal holds the deepest levels it is emptying and reopens the ones
/// above by name when it climbs back to them (see [`remove_entry`]), so that no tree costs the
/// daemon more descriptors than this.
const REMOVE_HELD: usize = 64;

/// One directory [`remove_entry`] is emptying.
struct Level {
    /// Its name in the level above (the first level's: in the directory removed from).
    name: CString,
    /// The directory, while held (only the deepest [`REMOVE_HELD`] levels are).
    dir: Option<Dir>,
    /// Names listed in it and not removed yet.
    left: Vec<OsString>,
}

/// Removes `name` in `dir` (see [`Dir::remove_all`]), adding what went to `tally`.
///
/// Iterative: the levels being emptied are an explicit stack, not a recursion per level, since
/// a tree thousands of directories deep (an agent's to make) overflowed a worker thread's
/// stack and aborted the daemon at every session end after. Each level's names are listed
/// once, when it is entered; a level whose descriptor was let go is reopened by its names from
/// the nearest level still held (or `dir`), by [`open_beneath`] like any store path: beneath
/// it and through no symlink.
fn remove_entry(dir: RawFd, name: &CStr, tally: &mut Tally) -> io::Result<()> {
    let Some(top) = remove_or_open(dir, name, tally)? else {
        return Ok(());
    };
    let mut levels = vec![Level {
        name: name.to_owned(),
        left: names(&top)?,
        dir: Some(top),
    }];
    while let Some(level) = levels.last_mut() {
        if let Some(child) = level.left.pop() {
            let here = match &level.dir {
                Some(d) => d.as_raw_fd(),
                None => unreachable!("the deepest level is held"),
            };
            let child = cstring(child.as_bytes())?;
            if let Some(sub) = remove_or_open(here, &child, tally)? {
                let left = names(&sub)?;
                levels.push(Level {
                    name: child,
                    dir: Some(sub),
                    left,
                });
                if let Some(i) = levels.len().checked_sub(REMOVE_HELD + 1) {
                    levels[i].dir = None;
                }
            }
            continue;
        }
        let emptied = levels.pop().expect("a level was there");
        drop(emptied.dir);
        let parent = if levels.is_empty() {
            dir
        } else {
            hold_deepest(dir, &mut levels)?
        };
        // SAFETY: a valid descriptor and a NUL-terminated name.
        let removed =
            check(unsafe { libc::unlinkat(parent, emptied.name.as_ptr(), libc::AT_REMOVEDIR) });
        match removed {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            other => {
                other?;
                tally.entries += 1;
            }
        }
    }
    Ok(())
}

/// The deepest of `levels` (beneath `base`), reopened with those above it up to
/// [`REMOVE_HELD`] where the walk let them go.
fn hold_deepest(base: RawFd, levels: &mut [Level]) -> io::Result<RawFd> {
    let last = levels.len() - 1;
    if levels[last].dir.is_none() {
        let first = (last + 1).saturating_sub(REMOVE_HELD);
        let from = levels[..first].iter().rposition(|l| l.dir.is_some());
        let anchor = from.map_or(base, |i| {
            levels[i].dir.as_ref().map_or(base, |d| d.as_raw_fd())
        });
        let start = from.map_or(0, |i| i + 1);
        let path = levels[start..=first]
            .iter()
            .map(|l| l.name.as_bytes())
            .collect::<Vec<_>>()
            .join(&b'/');
        let flags = libc::O_RDONLY | libc::O_DIRECTORY;
        levels[first].dir = Some(Dir(open_beneath(anchor, &path, flags)?));
        for i in first + 1..=last {
            let above = levels[i - 1].dir.as_ref().map(|d| d.as_raw_fd());
            let above = above.expect("opened just before");
            let opened = reopen(above, &levels[i].name, flags | libc::O_NOFOLLOW)?;
            levels[i].dir = Some(Dir(opened));
        }
    }
    Ok(levels[last].dir.as_ref().expect("held now").as_raw_fd())
}

/// The names in `dir`, as [`Dir::entries`] lists them.
fn names(dir: &Dir) -> io::Result<Vec<OsString>> {
    Ok(dir.entries()?.into_iter().map(|(name, _)| name).collect())
}

/// Removes `name` in `dir` if it is not a directory (adding it to `tally`), or opens it
/// without following a symlink if it is; a missing `name` is nothing removed.
fn remove_or_open(dir: RawFd, name: &CStr, tally: &mut Tally) -> io::Result<Option<Dir>> {
    // SAFETY: a valid descriptor and a NUL-terminated name.
    let unlink = || check(unsafe { libc::unlinkat(dir, name.as_ptr(), 0) });
    let st = match fstatat(dir, name) {
        Ok(st) => st,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        match unlink() {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            // Swapped for a directory meanwhile: remove that instead.
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {}
            other => {
                other?;
                tally.entries += 1;
                if st.st_mode & libc::S_IFMT == libc::S_IFREG {
                    tally.bytes += st.st_size as u64;
                }
                return Ok(None);
            }
        }
    }
    match reopen(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
    ) {
        Ok(fd) => Ok(Some(Dir(fd))),
        // Swapped for a symlink or a file meanwhile: remove that name itself.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
            unlink()?;
            tally.entries += 1;
            Ok(None)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `name` as one name in a directory: no `/`, not empty, `.` or `..` (`EINVAL`).
fn single_name(name: &OsStr) -> io::Result<CString> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    cstring(bytes)
}

fn not_a_file(name: &OsStr) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} is not a regular file", name.to_string_lossy()),
    )
}

fn too_long() -> io::Error {
    io::Error::from_raw_os_error(libc::ENAMETOOLONG)
}

/// Turns a libc return value into a result.
/// The ext2/3/4 inode flag `FS_TOPDIR_FL` (`chattr +T`): the directories made in this one
/// are tops of hierarchies, so the allocator (Orlov's) spreads them over the block groups.
const FS_TOPDIR_FL: libc::c_int = 0x0002_0000;

/// Marks `dir` so that ext2/3/4 spreads the directories made in it over the disk's block
/// groups, instead of placing each near its parent; a no-op elsewhere (any error is ignored:
/// it is a placement hint, nothing depends on it).
///
/// What it is for: files are allocated inodes in their directory's group, and on ext4
/// without a journal each new inode is searched for past every inode of that group freed in
/// the last minute (`recently_deleted`, up to six minutes while the inode table block is
/// dirty). Agents working in directories of one space, creating and deleting files, would
/// all allocate in one group and scan each other's freed inodes: after a few thousand
/// deletes a create cost several times as much (measured: 8 agents, 2.7–3.9k files a second
/// after a round of deletes against 7.8–8.1k spread). Spread, each directory made at the top
/// of a space starts in a group of its own, with the most free inodes.
pub fn spread_subdirs(dir: BorrowedFd<'_>) {
    let mut flags: libc::c_int = 0;
    // SAFETY: a valid descriptor; both ioctls read or write one int (the kernel's ABI for
    // FS_IOC_[GS]ETFLAGS, despite the `long` in their numbers).
    unsafe {
        if libc::ioctl(dir.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) == 0
            && flags & FS_TOPDIR_FL == 0
        {
            flags |= FS_TOPDIR_FL;
            libc::ioctl(dir.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags);
        }
    }
}

/// Whether `dir` is marked by [`spread_subdirs`] (for tests).
pub fn spreads_subdirs(dir: BorrowedFd<'_>) -> bool {
    let mut flags: libc::c_int = 0;
    // SAFETY: as in `spread_subdirs`.
    let got = unsafe { libc::ioctl(dir.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    got == 0 && flags & FS_TOPDIR_FL != 0
}

pub fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;

    fn raw(e: io::Result<impl Sized>) -> Option<i32> {
        e.err().and_then(|e| e.raw_os_error())
    }

    #[test]
    fn cached_directories_go_stale_only_for_their_time_and_never_lead_out() {
        let dir = tempfile::tempdir().unwrap();
        let root = Dir::open_trusted(&dir.path().join("root"), true).unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::create_dir(dir.path().join("root/a")).unwrap();
        let cache = DirCache::new(Duration::from_millis(300));
        let at = |p: &str| At::with_cache(root.as_raw_fd(), Path::new(p), Some(&cache)).unwrap();
        let create = |a: At| a.open(libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o644);
        create(at("a/x")).unwrap();
        // Behind the cache's back, "a" moves away and a symlink out takes its name: the cached
        // directory is the one that moved, still beneath the root, never the link's target.
        fs::rename(dir.path().join("root/a"), dir.path().join("root/b")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.path().join("root/a")).unwrap();
        create(at("a/y")).unwrap();
        assert!(dir.path().join("root/b/y").exists());
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        // Once its time is up the path is resolved again, and the link refused.
        std::thread::sleep(Duration::from_millis(350));
        let again = At::with_cache(root.as_raw_fd(), Path::new("a/z"), Some(&cache));
        assert_eq!(raw(again), Some(libc::ELOOP));
        // Forgetting (a rename or removal through the store) takes effect at once.
        fs::remove_file(dir.path().join("root/a")).unwrap();
        fs::create_dir(dir.path().join("root/a")).unwrap();
        create(at("a/1")).unwrap();
        fs::rename(dir.path().join("root/a"), dir.path().join("root/c")).unwrap();
        fs::create_dir(dir.path().join("root/a")).unwrap();
        cache.forget_all();
        create(at("a/2")).unwrap();
        assert!(dir.path().join("root/a/2").exists(), "the new directory");
        assert!(dir.path().join("root/c/1").exists());
    }

    #[test]
    fn a_path_longer_than_path_max_is_reached_through_its_parent() {
        let dir = tempfile::tempdir().unwrap();
        let root = Dir::open_trusted(dir.path(), false).unwrap();
        let component = "d".repeat(200);
        let mut rel = PathBuf::new();
        while rel.as_os_str().len() < PATH_MAX + 300 {
            rel.push(&component);
            let at = root.at(&rel).unwrap();
            // SAFETY: valid descriptor and path.
            check(unsafe { libc::mkdirat(at.dir(), at.name().as_ptr(), 0o755) }).unwrap();
        }
        let file = rel.join("f");
        let at = root.at(&file).unwrap();
        assert!(at.opened.is_some(), "a long path goes through its parent");
        at.open(libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o644)
            .unwrap();
        let st = root.at(&file).unwrap().stat().unwrap();
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFREG);
        // The empty path is the base directory itself.
        let st = root.at(Path::new("")).unwrap().stat().unwrap();
        assert_eq!(st.st_ino, fs::metadata(dir.path()).unwrap().ino());
        // A component longer than one call can take is refused, not truncated.
        let huge = Path::new(&"y".repeat(PATH_MAX + 10)).join("z");
        assert_eq!(raw(root.at(&huge)), Some(libc::ENAMETOOLONG));
        // The whole deep tree is removed without following anything.
        let first = rel.iter().next().unwrap().to_owned();
        let removed = root.remove_all(&first).unwrap();
        assert!(removed.entries >= 16, "{removed:?}");
        assert!(!dir.path().join(&first).exists());
    }

    #[test]
    fn a_tree_deeper_than_a_small_stack_is_removed_holding_few_descriptors() {
        const DEPTH: usize = 10_000;
        let dir = tempfile::tempdir().unwrap();
        let root = Dir::open_trusted(dir.path(), false).unwrap();
        let mut here = root.reopen().unwrap();
        for level in 0..DEPTH {
            // SAFETY: a valid descriptor and a NUL-terminated name.
            check(unsafe { libc::mkdirat(here.as_raw_fd(), c"d".as_ptr(), 0o755) }).unwrap();
            let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
            here = Dir(reopen(here.as_raw_fd(), c"d", flags).unwrap());
            if (level + 1) % 1000 == 0 {
                fs::write(format!("/proc/self/fd/{}/f", here.as_raw_fd()), b"abc").unwrap();
            }
        }
        drop(here);
        // A recursion per level needs far more than this stack (and a descriptor per level).
        let removing = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || root.remove_all(OsStr::new("d")))
            .unwrap();
        let removed = removing.join().expect("no overflow").unwrap();
        assert_eq!(
            removed,
            Tally {
                entries: DEPTH as u64 + 10,
                bytes: 30
            }
        );
        assert!(!dir.path().join("d").exists());
    }

    /// A tree with an outside directory, and a space beside it full of links out.
    fn hostile() -> (tempfile::TempDir, Dir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir_all(outside.join("sub")).unwrap();
        fs::write(outside.join("secret"), b"secret").unwrap();
        fs::write(outside.join("sub/deep"), b"deep").unwrap();
        let space = tmp.path().join("space");
        fs::create_dir_all(space.join("real")).unwrap();
        fs::write(space.join("real/file"), b"in").unwrap();
        std::os::unix::fs::symlink(&outside, space.join("abs")).unwrap();
        std::os::unix::fs::symlink("../outside", space.join("rel")).unwrap();
        std::os::unix::fs::symlink("/", space.join("root")).unwrap();
        std::os::unix::fs::symlink("real", space.join("inner")).unwrap();
        let dir = Dir::open_trusted(&space, false).unwrap();
        (tmp, dir, outside)
    }

    #[test]
    fn no_symlink_is_followed_anywhere_in_a_path() {
        let (_tmp, space, outside) = hostile();
        for link in ["abs", "rel", "root", "inner"] {
            for rel in [format!("{link}/secret"), format!("{link}/sub/deep")] {
                let at = space.at(Path::new(&rel));
                assert_eq!(raw(at), Some(libc::ELOOP), "{rel}");
            }
            // The link itself is an entry like any other, never followed.
            let at = space.at(Path::new(link)).unwrap();
            assert_eq!(at.stat().unwrap().st_mode & libc::S_IFMT, libc::S_IFLNK);
            assert_eq!(raw(at.open(libc::O_RDONLY, 0)), Some(libc::ELOOP));
            assert_eq!(raw(space.open(Path::new(link))), Some(libc::ELOOP));
            let created = space.create_dirs(&Path::new(link).join("new"), 0o755);
            assert!(created.is_err(), "{link}");
        }
        assert!(space.at(Path::new("real/file")).unwrap().stat().is_ok());
        assert_eq!(
            raw(space.at(Path::new("real/../../outside/secret"))),
            Some(libc::EINVAL)
        );
        assert_eq!(raw(space.at(Path::new("/etc/passwd"))), Some(libc::EINVAL));
        // Counting and removing the space touch nothing outside it.
        let tally = space.tally().unwrap();
        assert_eq!(
            tally,
            Tally {
                entries: 6,
                bytes: 2
            }
        );
        for name in ["abs", "rel", "root", "inner", "real"] {
            space.remove_all(OsStr::new(name)).unwrap();
        }
        assert_eq!(fs::read(outside.join("secret")).unwrap(), b"secret");
        assert_eq!(fs::read(outside.join("sub/deep")).unwrap(), b"deep");
        assert!(space.entries().unwrap().is_empty());
    }

    #[test]
    fn the_component_walk_refuses_links_too() {
        let (_tmp, space, _outside) = hostile();
        let flags = libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW;
        for rel in [
            "abs/secret",
            "rel/sub/deep",
            "root/etc/passwd",
            "inner/file",
            "abs",
        ] {
            let opened = open_components(space.as_raw_fd(), rel.as_bytes(), flags);
            assert!(
                matches!(raw(opened), Some(libc::ELOOP | libc::ENOTDIR)),
                "{rel}"
            );
        }
        assert_eq!(
            raw(open_components(
                space.as_raw_fd(),
                b"real/../../outside",
                flags
            )),
            Some(libc::EXDEV)
        );
        let file = open_components(space.as_raw_fd(), b"real/file", flags).unwrap();
        assert_eq!(
            fs::read_to_string(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap(),
            "in"
        );
    }
}
