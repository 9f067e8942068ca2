//! The per-process directory of working copies and crash markers,
//! `<data-dir>/.staging/<instance>/`, on the same filesystem as the spaces (a commit exchanges
//! names, a marker is a hard link).
//!
//! Each process holds an exclusive `flock` on its instance's `lock` file. At start-up (and when
//! a reader meets a crash marker), instance directories whose lock can be taken belong to
//! processes that are gone (a crash, `kill -9`): their unfinished patches are finished and their
//! unfinished appends undone (see `patch` and `append`), then the directory is removed; its
//! working copies were never committed, so the committed files are untouched.
//!
//! An instance appears whole: it is made as `.new-<instance>`, its lock file created and
//! locked, and only then renamed to `<instance>`. So another process starting meanwhile never
//! takes a directory being made (no lock file yet, or one not locked yet) for a dead one.
//! `.new-` directories are removed only when their lock can be taken and they are older than
//! [`NEW_GRACE`] (a process that died while making one).
//!
//! An instance directory holds its `lock`, working copies (`w<n>`), crash markers, and
//! `spread-0` .. `spread-7`, empty subdirectories where working copies are allocated before
//! they are named in the instance directory itself (see [`StagingArea::new_file`]).
//!
//! Everything here is reached from the held `.staging` directory, never through a symlink
//! (see `at`).

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{SystemTime, UNIX_EPOCH};

use super::append::roll_back_unfinished;
use super::at::{Dir, check};
use super::patch::finish_unfinished;

/// Replaced versions at least this large are removed in the background: freeing their blocks
/// takes milliseconds on ext4 (more with `discard`), which `close()` would otherwise wait for.
const REMOVE_LATER_SIZE: u64 = 1 << 20;

/// How old a `.new-` instance directory must be before a process that can take its lock removes
/// it: making one takes microseconds, so one this old belongs to a process that died meanwhile.
const NEW_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Subdirectories of an instance directory whose block groups working copies are allocated
/// in, in turn (see [`StagingArea::new_file`]).
const SPREAD: usize = 8;

/// This process's staging directory (see the module docs).
pub struct StagingArea {
    /// `<data-dir>/.staging`.
    base: Dir,
    /// This process's instance directory in it.
    dir: Dir,
    /// Its `spread-N` subdirectories (none where they could not be made), and the next one.
    spread: Vec<Dir>,
    next: AtomicUsize,
    instance: OsString,
    counter: AtomicU64,
    /// Removes replaced versions of large files off the request path, started at first use.
    remover: Mutex<Option<mpsc::Sender<String>>>,
    _lock: nix::fcntl::Flock<File>,
}

fn cname(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl StagingArea {
    /// Creates this process's staging directory under the data dir `data` and recovers and
    /// removes stale ones; returns it and how many working copies of dead processes went.
    pub fn create(data: &Dir) -> io::Result<(StagingArea, usize)> {
        let (base, _) = data.create_dirs(std::path::Path::new(".staging"), 0o700)?;
        let removed = Self::remove_stale(&base, true)?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let instance = OsString::from(format!("{}-{nanos}", std::process::id()));
        let mut making = OsString::from(".new-");
        making.push(&instance);
        let (dir, _) = base.create_dirs(std::path::Path::new(&making), 0o700)?;
        let lock = dir
            .at(std::path::Path::new("lock"))?
            .open(libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600)?;
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| io::Error::from(e))?;
        super::at::spread_subdirs(std::os::fd::AsFd::as_fd(&dir));
        let spread = (0..SPREAD)
            .map(|i| {
                let name = format!("spread-{i}");
                dir.create_dirs(std::path::Path::new(&name), 0o700)
                    .map(|(d, _)| d)
            })
            .collect::<io::Result<Vec<Dir>>>()
            .unwrap_or_else(|e| {
                log::warn!("staging: working copies in one directory ({e})");
                Vec::new()
            });
        // Whole and held: now it may be seen (the descriptor follows the rename).
        base.rename_noreplace(&making, &instance)?;
        Ok((
            StagingArea {
                base,
                dir,
                spread,
                next: AtomicUsize::new(0),
                instance,
                counter: AtomicU64::new(0),
                remover: Mutex::new(None),
                _lock: lock,
            },
            removed,
        ))
    }

    /// The instance directory (working copies and markers are names in it).
    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    /// Removes instance directories no live process holds, after finishing the patches and
    /// undoing the appends they left unfinished; returns how many working copies were dropped.
    /// `at_start`: also directories without a lock file (later, one may be a process starting).
    fn remove_stale(base: &Dir, at_start: bool) -> io::Result<usize> {
        let mut removed = 0;
        for (name, _) in base.entries()? {
            let Ok(dir) = base.open(std::path::Path::new(&name)) else {
                // Not a directory (nothing of ours): left alone.
                continue;
            };
            // One being made by a process starting now is left alone; one left by a process
            // that died making it goes once its lock is free and it is old enough.
            let being_made = name.as_encoded_bytes().starts_with(b".new-");
            if being_made && !Self::older_than(&dir, NEW_GRACE) {
                continue;
            }
            let lock = dir
                .at(std::path::Path::new("lock"))
                .and_then(|at| at.open(libc::O_RDONLY, 0));
            let Ok(lock) = lock else {
                if !at_start && !being_made {
                    continue;
                }
                // A directory without a lock file was never fully created: stale.
                removed += copies_in(&dir);
                base.remove_all(&name)?;
                continue;
            };
            match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(_held) => {
                    finish_unfinished(&dir);
                    roll_back_unfinished(&dir);
                    removed += copies_in(&dir);
                    base.remove_all(&name)?;
                }
                Err(_) => continue, // a live process owns it
            }
        }
        Ok(removed)
    }

    /// Whether the directory was last changed longer than `age` ago.
    fn older_than(dir: &Dir, age: std::time::Duration) -> bool {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: a valid descriptor, an empty path with AT_EMPTY_PATH, a buffer for the answer.
        let ok = unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                c"".as_ptr(),
                st.as_mut_ptr(),
                libc::AT_EMPTY_PATH,
            )
        } == 0;
        if !ok {
            return false;
        }
        // SAFETY: filled by the successful call above.
        let st = unsafe { st.assume_init() };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        now.saturating_sub(st.st_ctime) > age.as_secs() as i64
    }

    /// Recovers what dead processes left unfinished, while running: a file that still shows a
    /// crash marker's second link must be whole before anybody reads it.
    pub fn recover_stale(&self) {
        if let Err(e) = Self::remove_stale(&self.base, false) {
            log::warn!("could not recover stale staging: {e}");
        }
    }

    /// A fresh name in this staging area.
    pub fn new_name(&self, name: impl FnOnce(u64) -> String) -> String {
        name(self.counter.fetch_add(1, Ordering::Relaxed))
    }

    /// A new, empty working copy (readable and writable, mode 0600), and its name.
    ///
    /// Its inode is allocated in one of the `spread-N` subdirectories in turn (an unnamed
    /// file, then linked under its name here), which ext2/3/4 places in block groups of
    /// their own: a commit swaps the copy in and frees the replaced version, so all the
    /// inodes of rewritten files would otherwise come from, and go back to, this directory's
    /// group, and on ext4 without a journal each new one is searched for past every inode of
    /// the group freed in the last minute (`recently_deleted`), under this directory's lock
    /// (8 agents rewriting files: ~45 % of the daemon's samples in the scan, a third waiting
    /// for the lock).
    pub fn new_file(&self) -> io::Result<(File, String)> {
        let name = self.new_name(|n| format!("w{n}"));
        if !self.spread.is_empty() {
            let sub = &self.spread[self.next.fetch_add(1, Ordering::Relaxed) % self.spread.len()];
            // SAFETY: a valid descriptor and a NUL-terminated path.
            let fd = unsafe {
                libc::openat(
                    sub.as_raw_fd(),
                    c".".as_ptr(),
                    libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
                    0o600 as libc::c_uint,
                )
            };
            if fd >= 0 {
                // SAFETY: `fd` was just opened and is owned by nobody else.
                let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                link_open_file(&file, &self.dir, &name)?;
                return Ok((file, name));
            }
            let e = io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) {
                return Err(e);
            }
            // No unnamed files on this filesystem: named ones, here.
        }
        let file = self
            .dir
            .at(std::path::Path::new(&name))?
            .open(libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600)?;
        Ok((file, name))
    }

    /// Removes the name `name` of this staging area now.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        let c = cname(name)?;
        // SAFETY: a valid descriptor and a NUL-terminated name.
        check(unsafe { libc::unlinkat(self.dir.as_raw_fd(), c.as_ptr(), 0) })
    }

    /// Links the open `file` under `name` in this staging area (through `/proc/self/fd`,
    /// which needs no privilege), so the link is to exactly this object even if its name
    /// changes meanwhile.
    pub fn link_open_file(&self, file: &File, name: &str) -> io::Result<()> {
        link_open_file(file, &self.dir, name)
    }

    /// Links the name `from` of this staging area under `to` too.
    pub fn link(&self, from: &str, to: &str) -> io::Result<()> {
        let (from, to) = (cname(from)?, cname(to)?);
        let fd = self.dir.as_raw_fd();
        // SAFETY: valid descriptors and NUL-terminated names.
        check(unsafe { libc::linkat(fd, from.as_ptr(), fd, to.as_ptr(), 0) })
    }

    /// Removes `name` (a replaced version inside this staging area) now, or soon on a
    /// background thread if it is large. One left behind by a crash is stale staging, removed
    /// at the next start.
    pub fn remove_replaced(&self, name: String, size: u64) {
        if size >= REMOVE_LATER_SIZE {
            let mut remover = self.remover.lock().unwrap_or_else(|e| e.into_inner());
            if remover.is_none()
                && let Ok(dir) = self.dir.reopen()
            {
                let (tx, rx) = mpsc::channel::<String>();
                let spawned = std::thread::Builder::new()
                    .name("roomfs-remove".into())
                    .spawn(move || {
                        for name in rx {
                            let removed = cname(&name).and_then(|c| {
                                // SAFETY: a valid descriptor and a NUL-terminated name.
                                check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) })
                            });
                            if let Err(e) = removed {
                                log::warn!("could not remove replaced version {name}: {e}");
                            }
                        }
                    });
                if spawned.is_ok() {
                    *remover = Some(tx);
                }
            }
            let name = match remover.as_ref() {
                Some(tx) => match tx.send(name) {
                    Ok(()) => return,
                    Err(mpsc::SendError(name)) => name,
                },
                None => name,
            };
            drop(remover);
            self.remove_now(&name);
            return;
        }
        self.remove_now(&name);
    }

    fn remove_now(&self, name: &str) {
        if let Err(e) = self.remove(name) {
            log::warn!("could not remove replaced version {name}: {e}");
        }
    }
}

impl Drop for StagingArea {
    fn drop(&mut self) {
        let _ = self.base.remove_all(OsStr::new(&self.instance));
    }
}

/// Set once `linkat` refused to link a descriptor itself (`AT_EMPTY_PATH` needs
/// `CAP_DAC_READ_SEARCH`): links go through `/proc/self/fd` from then on.
static NO_EMPTY_PATH_LINKS: AtomicBool = AtomicBool::new(false);

/// Links the open `file` under `name` in `dir` (see [`StagingArea::link_open_file`]): by its
/// descriptor where the daemon may (`AT_EMPTY_PATH`), which spares resolving a `/proc` path.
pub fn link_open_file(file: &File, dir: &Dir, name: &str) -> io::Result<()> {
    let to = cname(name)?;
    if !NO_EMPTY_PATH_LINKS.load(Ordering::Relaxed) {
        // SAFETY: valid descriptors and NUL-terminated names.
        let linked = check(unsafe {
            libc::linkat(
                file.as_raw_fd(),
                c"".as_ptr(),
                dir.as_raw_fd(),
                to.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        });
        match linked {
            // A file with no name left cannot be linked either way.
            Err(e) if file.metadata().is_ok_and(|m| m.nlink() == 0) => return Err(e),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EPERM)) => {
                NO_EMPTY_PATH_LINKS.store(true, Ordering::Relaxed);
            }
            other => return other,
        }
    }
    let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    // SAFETY: valid descriptors and NUL-terminated paths.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            dir.as_raw_fd(),
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
}

/// How many working copies and markers the instance directory `dir` holds (not its lock file
/// nor its `spread-N` subdirectories).
fn copies_in(dir: &Dir) -> usize {
    dir.entries().map_or(0, |entries| {
        entries
            .iter()
            .filter(|(name, kind)| *kind != Some(libc::S_IFDIR) && name != "lock")
            .count()
    })
}

/// The crash markers in the staging directory `dir` that `parse` recognizes by name.
pub fn markers<T>(dir: &Dir, parse: fn(&str) -> Option<T>) -> Vec<(T, String)> {
    let Ok(entries) = dir.entries() else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|(name, _)| {
            let name = name.into_string().ok()?;
            Some((parse(&name)?, name))
        })
        .collect()
}

/// Opens the marker or working copy `name` in `dir` with `flags` (never through a symlink).
pub fn open_in(dir: &Dir, name: &str, flags: libc::c_int) -> io::Result<File> {
    dir.at(std::path::Path::new(name))?.open(flags, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn working_copies_are_allocated_in_the_spread_subdirectories_and_named_here() {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let data = Dir::open_trusted(tmp.path(), false).unwrap();
        let (area, _) = StagingArea::create(&data).unwrap();
        let instance = tmp.path().join(".staging").join(&area.instance);
        assert_eq!(area.spread.len(), SPREAD);
        for i in 0..SPREAD {
            assert!(instance.join(format!("spread-{i}")).is_dir());
        }
        let copies: Vec<(File, String)> = (0..3).map(|_| area.new_file().unwrap()).collect();
        for (file, name) in &copies {
            let named = std::fs::metadata(instance.join(name)).unwrap();
            let open = file.metadata().unwrap();
            assert_eq!((named.ino(), named.nlink()), (open.ino(), 1), "{name}");
            assert_eq!(named.mode() & 0o777, 0o600);
        }
        // Nothing named in the subdirectories; a dead instance's count ignores them.
        for i in 0..SPREAD {
            let sub = instance.join(format!("spread-{i}"));
            assert_eq!(std::fs::read_dir(sub).unwrap().count(), 0);
        }
        assert_eq!(copies_in(area.dir()), 3);
    }

    #[test]
    fn an_instance_appears_whole_and_one_being_made_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let data = Dir::open_trusted(tmp.path(), false).unwrap();
        let staging = tmp.path().join(".staging");
        // Another process, starting: its instance is being made (no lock file yet).
        std::fs::create_dir_all(staging.join(".new-77-1")).unwrap();
        // A dead process's instance, and one that died before its lock file existed.
        std::fs::create_dir_all(staging.join("78-1")).unwrap();
        std::fs::write(staging.join("78-1/lock"), b"").unwrap();
        std::fs::write(staging.join("78-1/wc-1"), b"uncommitted").unwrap();
        std::fs::create_dir_all(staging.join("79-1")).unwrap();
        let (area, dropped) = StagingArea::create(&data).unwrap();
        assert_eq!(dropped, 1, "the dead instance's working copy");
        let mut names: Vec<String> = std::fs::read_dir(&staging)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let ours = area.instance.to_str().unwrap().to_string();
        assert!(!ours.starts_with(".new-"), "{ours}");
        assert_eq!(names, [".new-77-1".to_string(), ours.clone()]);
        // Ours holds its lock under its final name.
        let lock = File::open(staging.join(&ours).join("lock")).unwrap();
        assert!(
            nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err(),
            "our lock is held"
        );
        // One being made is left alone while running too; an old one is removed.
        area.recover_stale();
        assert!(staging.join(".new-77-1").exists());
        // Its age is its ctime, which cannot be set back: the grace is checked both ways.
        let made = data.open(Path::new(".staging/.new-77-1")).unwrap();
        assert!(!StagingArea::older_than(&made, NEW_GRACE));
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert!(StagingArea::older_than(&made, std::time::Duration::ZERO));
    }
}
