//! Patch commits: a large file changed in a few places is committed by writing the blocks the
//! writer changed into the committed file in place, instead of completing a copy of the whole
//! file and exchanging names. 2,000 random 4 KiB writes into a 64 MiB file then commit ~8 MiB,
//! not 64 MiB, and free no blocks.
//!
//! What keeps this as safe as an exchange:
//! - Isolation: every reader of a file of at least [`PATCH_MIN`] bytes (every roomfs process
//!   using the data dir, and every writer's view of the version it started from) holds a shared
//!   open-file-description lock on it ([`hold_for_reading`]). A patch needs the exclusive lock,
//!   taken without waiting: with anybody reading, the caller commits a whole copy instead, and
//!   the readers keep their version. A reader opening while a patch is applied waits for it.
//! - One writer at a time, last close wins: the patcher also holds the exclusive `flock` that
//!   in-place appenders take (see `append`), and checks the file still is the version it
//!   started from (same object, same size, one link). The working copy has every block the
//!   writer changed; the blocks it did not change are, in the file, still exactly those of that
//!   version (nobody could patch them meanwhile: the writer held its shared lock).
//! - Crash safety (redo, where appends undo): before the first byte changes, the working copy
//!   and the file get hard links in the staging area, `patch-<base size>-<new size>-<n>.data`
//!   and `patch-<base size>-<new size>-<n>`; the second is the commit point. A process starting
//!   later finds the pair of a dead one and finishes the patch from the working copy (its data
//!   extents, which hold the writer's blocks and blocks copied unchanged from the same
//!   version), so a `kill -9` mid-patch leaves the new version. Space is reserved before the
//!   marker (`fallocate`), so running out of disk never leaves a half-applied patch.
//! - Power loss: a durable patch syncs the working copy and the markers before it starts and
//!   the file before the markers go, so the redo survives a power cut too.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::at::{At, Dir, check};
use super::staging::{link_open_file, markers, open_in};

/// Files at least this large may be patched in place, and their readers hold the read lock.
pub const PATCH_MIN: u64 = 4 << 20;

/// What a marker records: the file's size before the patch and after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchMark {
    pub from: u64,
    pub to: u64,
}

impl PatchMark {
    const PREFIX: &'static str = "patch-";
    const DATA: &'static str = ".data";

    /// The file marker's name (`n` keeps names unique within a staging area).
    pub fn name(&self, n: u64) -> String {
        format!("{}{}-{}-{n}", Self::PREFIX, self.from, self.to)
    }

    /// The name of the working copy's link next to the file marker `marker`.
    pub fn data_name(marker: &str) -> String {
        format!("{marker}{}", Self::DATA)
    }

    pub fn parse(name: &str) -> Option<PatchMark> {
        let mut parts = name.strip_prefix(Self::PREFIX)?.splitn(3, '-');
        let from = parts.next()?.parse().ok()?;
        let to = parts.next()?.parse().ok()?;
        parts.next()?.parse::<u64>().ok()?;
        Some(PatchMark { from, to })
    }
}

/// Sets (or, with `F_UNLCK`, drops) an open-file-description lock of type `kind` on all of
/// `file`. Returns false when another description holds a conflicting lock and `wait` is off.
fn lock_whole(file: &File, kind: libc::c_int, wait: bool) -> io::Result<bool> {
    // SAFETY: an all-zero `flock` is valid (whole file from offset 0, `l_pid` 0 as OFD needs).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: `lock` is a valid `flock` for the duration of the call.
        if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &lock) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN | libc::EACCES) if !wait => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Takes the shared lock every reader of a patchable file holds while it has it open; waits
/// while a patch is being applied. Returns whether it waited (the file may have changed since
/// its attributes were read). Released when `file` is closed.
pub fn hold_for_reading(file: &File) -> io::Result<bool> {
    if lock_whole(file, libc::F_RDLCK, false)? {
        return Ok(false);
    }
    lock_whole(file, libc::F_RDLCK, true).map(|_| true)
}

/// A working copy to patch into the committed file.
pub struct Patch<'a> {
    /// The working copy (a sparse copy of the base version plus the writer's changes).
    pub staged: &'a File,
    /// The working copy's name in the staging directory.
    pub staged_name: &'a str,
    /// The size of the version the writer started from.
    pub from: u64,
    /// The size of the new version (never smaller than `from`).
    pub to: u64,
    /// The ranges below `from` the writer changed; everything from `from` to `to` is new too.
    pub written: &'a [(u64, u64)],
    /// Make the patch, and its redo record, survive a power cut.
    pub durable: bool,
}

/// Patches the committed file `target`, which must still be the object `(dev, ino)` of
/// size `patch.from`, with `patch`. `base` is the writer's open view of that version (its
/// shared lock is given up while the patch is applied, and taken back if there is no patch);
/// `marker` names the crash marker (a fresh name in the staging directory `staging`, which holds
/// the working copy and is on the same filesystem as the target). Returns the file (open, holding the shared lock) when the patch is in,
/// `None` when it is not possible now: the file is not in the expected state, somebody reads
/// it, appends to it or patches it, or there is no room for the new bytes.
pub fn patch_in_place(
    target: &At,
    base: &File,
    (dev, ino): (u64, u64),
    patch: &Patch,
    staging: &Dir,
    marker: impl FnOnce(&PatchMark) -> String,
) -> io::Result<Option<File>> {
    let Some(file) = open_for_change(target) else {
        return Ok(None);
    };
    let result = patch_locked(&file, base, (dev, ino), patch, staging, marker);
    if let Ok(true) = result
        && let Err(e) = lock_whole(&file, libc::F_RDLCK, false)
    {
        // The patch is in; only the new version's view goes without its lock.
        log::error!("could not downgrade the lock of a patched file ({e})");
    }
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
    Ok(result?.then_some(file))
}

fn patch_locked(
    file: &File,
    base: &File,
    (dev, ino): (u64, u64),
    patch: &Patch,
    staging: &Dir,
    marker: impl FnOnce(&PatchMark) -> String,
) -> io::Result<bool> {
    let now = file.metadata()?;
    // A second link is an appender's or a patcher's marker (alive, or dead and not yet
    // recovered). A sparse file could run out of space in the middle of a patch.
    if !now.is_file()
        || (now.dev(), now.ino()) != (dev, ino)
        || now.len() != patch.from
        || now.nlink() != 1
        || now.blocks() * 512 < patch.from
        || patch.to < patch.from
    {
        return Ok(false);
    }
    // The writer's own shared lock is handed over: nobody else may hold one.
    if let Err(e) = lock_whole(base, libc::F_UNLCK, false) {
        log::debug!("no patch commit (unlocking: {e}): copying instead");
        return Ok(false);
    }
    let give_back = |why: &str| {
        let _ = lock_whole(file, libc::F_UNLCK, false);
        if let Err(e) = hold_for_reading(base) {
            log::error!("could not take back the read lock on a file being written ({e})");
        }
        log::debug!("no patch commit ({why}): copying instead");
        Ok(false)
    };
    match lock_whole(file, libc::F_WRLCK, false) {
        Ok(true) => {}
        Ok(false) => return give_back("the file is being read"),
        Err(e) => return give_back(&format!("locking: {e}")),
    }
    if patch.to > patch.from {
        let len = (patch.to - patch.from) as libc::off_t;
        let ret = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                patch.from as libc::off_t,
                len,
            )
        };
        if ret != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return give_back(&format!("no room for the new bytes: {e}"));
            }
        }
    }
    let mark = PatchMark {
        from: patch.from,
        to: patch.to,
    };
    let marker = marker(&mark);
    let data = PatchMark::data_name(&marker);
    let remove = |name: &str| {
        let c = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a valid descriptor and a NUL-terminated name.
        check(unsafe { libc::unlinkat(staging.as_raw_fd(), c.as_ptr(), 0) })
    };
    if let Err(e) = link_in(staging, patch.staged_name, &data) {
        return give_back(&format!("no crash marker: {e}"));
    }
    if let Err(e) = link_open_file(file, staging, &marker) {
        let _ = remove(&data);
        return give_back(&format!("no crash marker: {e}"));
    }
    if patch.durable {
        let synced = patch.staged.sync_data().and_then(|()| staging.sync());
        if let Err(e) = synced {
            let _ = remove(&marker);
            let _ = remove(&data);
            give_back("the working copy could not be synced")?;
            return Err(e);
        }
    }
    let mut applied = apply(file, patch);
    if let Err(e) = &applied {
        log::warn!("patch commit interrupted ({e}); trying again");
        applied = apply(file, patch);
    }
    if let Err(e) = applied {
        log::error!(
            "patch commit of {} failed ({e}); the next start finishes it",
            target_name(file)
        );
        return Err(e);
    }
    if patch.durable {
        file.sync_all()?;
    }
    remove(&marker)?;
    remove(&data)?;
    if patch.durable {
        // A marker coming back after a power cut would replay this patch over later changes.
        staging.sync()?;
    }
    Ok(true)
}

/// Links the name `from` of the directory `dir` under `to` too.
fn link_in(dir: &Dir, from: &str, to: &str) -> io::Result<()> {
    let cname = |n: &str| CString::new(n).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL));
    let (from, to) = (cname(from)?, cname(to)?);
    let fd = dir.as_raw_fd();
    // SAFETY: valid descriptors and NUL-terminated names.
    check(unsafe { libc::linkat(fd, from.as_ptr(), fd, to.as_ptr(), 0) })
}

/// Writes the patch into `file`, and gives the file the mtime of the working copy (the time
/// of the writer's last change, as a whole-copy commit would).
fn apply(file: &File, patch: &Patch) -> io::Result<()> {
    if patch.to != patch.from {
        file.set_len(patch.to)?;
    }
    for &(offset, len) in patch.written {
        copy_file_range(patch.staged, file, offset, len)?;
    }
    copy_file_range(patch.staged, file, patch.from, patch.to - patch.from)?;
    copy_mtime(patch.staged, file)
}

fn copy_mtime(from: &File, to: &File) -> io::Result<()> {
    let m = from.metadata()?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: m.mtime(),
            tv_nsec: m.mtime_nsec(),
        },
    ];
    if unsafe { libc::futimens(to.as_raw_fd(), times.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Copies `len` bytes at `offset` of `src` to the same offset of `dst`, in the kernel.
fn copy_file_range(src: &File, dst: &File, offset: u64, len: u64) -> io::Result<()> {
    let (mut off_in, mut off_out) = (offset as i64, offset as i64);
    let end = offset + len;
    while (off_in as u64) < end {
        let want = (end - off_in as u64).min(1 << 30) as usize;
        let n = nix::fcntl::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want)
            .map_err(io::Error::from)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the working copy is shorter than the patch",
            ));
        }
    }
    Ok(())
}

/// The data extents of `file` below `end` (holes skipped).
fn data_extents(file: &File, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut at = 0i64;
    while (at as u64) < end {
        let start = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
        if start < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `at`
            }
            return Err(e);
        }
        if start as u64 >= end {
            break;
        }
        let stop = unsafe { libc::lseek(file.as_raw_fd(), start, libc::SEEK_HOLE) };
        if stop < 0 {
            return Err(io::Error::last_os_error());
        }
        let stop = (stop as u64).min(end);
        out.push((start as u64, stop - start as u64));
        at = stop as i64;
    }
    Ok(out)
}

/// `target` opened for an in-place change, holding its `flock` (which appenders and patchers
/// take, and readers of a file with a crash marker wait on): `None` when it cannot be opened
/// or somebody else holds the lock. The lock goes with the file when it is closed.
pub fn open_for_change(target: &At) -> Option<File> {
    let file = target.open(libc::O_RDWR | libc::O_NOFOLLOW, 0).ok()?;
    // SAFETY: a valid descriptor; flock touches no memory.
    (unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0).then_some(file)
}

/// The file's path, for messages.
pub fn target_name(file: &File) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "a file".into())
}

/// What a rewrite marker records: the new size (see [`rewrite_in_place`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RewriteMark {
    pub to: u64,
}

impl RewriteMark {
    const PREFIX: &'static str = "rewrite-";

    /// The file marker's name (`n` keeps names unique within a staging area).
    pub fn name(&self, n: u64) -> String {
        format!("{}{}-{n}", Self::PREFIX, self.to)
    }

    pub fn parse(name: &str) -> Option<RewriteMark> {
        let mut parts = name.strip_prefix(Self::PREFIX)?.splitn(2, '-');
        let to = parts.next()?.parse().ok()?;
        parts.next()?.parse::<u64>().ok()?;
        Some(RewriteMark { to })
    }
}

/// Rewrites the committed file `target` in place with the whole content of the working copy
/// `staged` (named `staged_name` in `staging`): the commit of a file with several names (hard
/// links), which must stay one file. As crash-safe as a patch (redo, see the module docs):
/// the working copy and the file get marker links in the staging area before the first byte
/// changes, and a process starting later finishes the rewrite from them. Waits for an append
/// or patch under way on the file (its `flock`). Readers that have the file open read it as it
/// is rewritten, as on a local disk; readers opening meanwhile wait for it. Returns the file.
pub fn rewrite_in_place(
    target: &At,
    staged: &File,
    staged_name: &str,
    staging: &Dir,
    marker: impl FnOnce(&RewriteMark) -> String,
    durable: bool,
) -> io::Result<File> {
    let file = target.open(libc::O_RDWR | libc::O_NONBLOCK, 0)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::from_raw_os_error(libc::EISDIR));
    }
    super::flock_waiting(&file, libc::LOCK_EX)?;
    let to = staged.metadata()?.len();
    let mark = RewriteMark { to };
    let marker = marker(&mark);
    let data = PatchMark::data_name(&marker);
    let remove = |name: &str| {
        let c = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a valid descriptor and a NUL-terminated name.
        check(unsafe { libc::unlinkat(staging.as_raw_fd(), c.as_ptr(), 0) })
    };
    let result = (|| {
        link_in(staging, staged_name, &data)?;
        if let Err(e) = link_open_file(&file, staging, &marker) {
            let _ = remove(&data);
            return Err(e);
        }
        if durable {
            staged.sync_data()?;
            staging.sync()?;
        }
        rewrite(&file, staged, to)?;
        if durable {
            file.sync_all()?;
        }
        remove(&marker)?;
        remove(&data)?;
        if durable {
            staging.sync()?;
        }
        Ok(())
    })();
    // SAFETY: as above.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
    if let Err(e) = &result {
        log::error!(
            "rewrite of {} failed ({e}); the next start finishes it",
            target_name(&file)
        );
    }
    result.map(|()| file)
}

/// Makes `file` hold exactly the `to` bytes of `staged`: its data copied, its holes punched
/// (or zeroed), its length and mtime.
fn rewrite(file: &File, staged: &File, to: u64) -> io::Result<()> {
    let mut at = 0;
    for (offset, len) in data_extents(staged, to)? {
        zero_range(file, at, offset - at)?;
        copy_file_range(staged, file, offset, len)?;
        at = offset + len;
    }
    zero_range(file, at, to.saturating_sub(at))?;
    file.set_len(to)?;
    copy_mtime(staged, file)
}

/// Makes `offset..offset + len` of `file` read as zeros (a hole where possible).
fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let flags = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: a valid descriptor; fallocate touches no memory.
    let ret = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            flags,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e);
    }
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Finishes the patches a dead process left unfinished in its staging directory `dir`;
/// returns how many it finished. Markers whose working copy link is missing were never
/// started (the file marker comes second) and are dropped.
pub fn finish_unfinished(dir: &Dir) -> usize {
    let mut finished = 0;
    for (mark, marker) in markers(dir, PatchMark::parse) {
        let data = PatchMark::data_name(&marker);
        let staged = match open_in(dir, &data, libc::O_RDONLY | libc::O_NONBLOCK) {
            Ok(staged) => staged,
            Err(_) => continue,
        };
        let result = (|| {
            let file = open_in(dir, &marker, libc::O_WRONLY | libc::O_NONBLOCK)?;
            if !file.metadata()?.is_file() || !staged.metadata()?.is_file() {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            // Every data extent below the old size is the writer's or a copy of the same
            // version's block: writing them all again is the patch, and harmless twice.
            let written = data_extents(&staged, mark.from)?;
            let patch = Patch {
                staged: &staged,
                staged_name: &data,
                from: mark.from,
                to: mark.to,
                written: &written,
                durable: true,
            };
            apply(&file, &patch)?;
            file.sync_all()
        })();
        let remove = |name: &str| {
            if let Ok(at) = dir.at(Path::new(name)) {
                // SAFETY: a valid descriptor and a NUL-terminated name.
                let _ = unsafe { libc::unlinkat(at.dir(), at.name().as_ptr(), 0) };
            }
        };
        match result {
            Ok(()) => {
                finished += 1;
                remove(&marker);
                remove(&data);
                log::warn!(
                    "finished a patch commit interrupted by a crash ({} bytes)",
                    mark.to
                );
            }
            Err(e) => log::error!("could not finish an interrupted patch commit ({e})"),
        }
    }
    for (mark, marker) in markers(dir, RewriteMark::parse) {
        let data = PatchMark::data_name(&marker);
        let remove = |name: &str| {
            if let Ok(at) = dir.at(Path::new(name)) {
                // SAFETY: a valid descriptor and a NUL-terminated name.
                let _ = unsafe { libc::unlinkat(at.dir(), at.name().as_ptr(), 0) };
            }
        };
        let Ok(staged) = open_in(dir, &data, libc::O_RDONLY | libc::O_NONBLOCK) else {
            remove(&marker); // never started: the file marker comes second
            continue;
        };
        let result = (|| {
            let file = open_in(dir, &marker, libc::O_WRONLY | libc::O_NONBLOCK)?;
            if !file.metadata()?.is_file() || !staged.metadata()?.is_file() {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            rewrite(&file, &staged, mark.to)?;
            file.sync_all()
        })();
        match result {
            Ok(()) => {
                finished += 1;
                remove(&marker);
                remove(&data);
                log::warn!(
                    "finished the rewrite of a linked file interrupted by a crash ({} bytes)",
                    mark.to
                );
            }
            Err(e) => log::error!("could not finish an interrupted rewrite ({e})"),
        }
    }
    finished
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, OpenOptions};
    use std::os::unix::fs::FileExt;
    use std::path::PathBuf;

    const MIB: usize = 1 << 20;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u64 * 7 + seed as u64) as u8)
            .collect()
    }

    /// A committed file of `len` bytes, a reader view of it holding the read lock, and a
    /// sparse working copy `w0` of the same size: (dir, target, base, dir held, staged).
    fn setup(len: usize) -> (tempfile::TempDir, PathBuf, File, Dir, File) {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("db");
        fs::write(&target, pattern(len, 0)).unwrap();
        let base = File::open(&target).unwrap();
        hold_for_reading(&base).unwrap();
        let staged_path = dir.path().join("w0");
        let staged = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&staged_path)
            .unwrap();
        staged.set_len(len as u64).unwrap();
        let held = Dir::open_trusted(dir.path(), false).unwrap();
        (dir, target, base, held, staged)
    }

    fn db(held: &Dir) -> At {
        held.at(Path::new("db")).unwrap()
    }

    fn id(path: &Path) -> (u64, u64) {
        let m = fs::metadata(path).unwrap();
        (m.dev(), m.ino())
    }

    #[test]
    fn marks_round_trip_through_their_names() {
        let mark = PatchMark { from: 10, to: 25 };
        assert_eq!(PatchMark::parse(&mark.name(7)), Some(mark));
        assert_eq!(PatchMark::parse("append-1-2-3.4-5"), None);
        assert_eq!(PatchMark::parse("patch-1-2"), None);
        assert_eq!(PatchMark::data_name("patch-1-2-3"), "patch-1-2-3.data");
    }

    #[test]
    fn a_patch_writes_only_the_changed_blocks_and_the_new_tail() {
        let len = 5 * MIB;
        let (_dir, target, base, held, staged) = setup(len);
        let mut expect = pattern(len, 0);
        for (offset, byte) in [(4096usize, 1u8), (3 * MIB + 8192, 2)] {
            staged.write_all_at(&[byte; 4096], offset as u64).unwrap();
            expect[offset..offset + 4096].fill(byte);
        }
        staged.write_all_at(b"tail", len as u64).unwrap();
        expect.extend_from_slice(b"tail");
        let written = [(4096, 4096), (3 * MIB as u64 + 8192, 4096)];
        let patch = Patch {
            staged: &staged,
            staged_name: "w0",
            from: len as u64,
            to: len as u64 + 4,
            written: &written,
            durable: false,
        };
        let before = id(&target);
        let file = patch_in_place(&db(&held), &base, before, &patch, &held, |m| m.name(0))
            .unwrap()
            .expect("patched");
        assert!(fs::read(&target).unwrap() == expect);
        assert_eq!(id(&target), before, "the same file, patched in place");
        let m = file.metadata().unwrap();
        assert_eq!(m.nlink(), 1, "the markers are gone");
        assert_eq!(
            m.mtime_nsec(),
            staged.metadata().unwrap().mtime_nsec(),
            "the mtime of the writer's last change"
        );
        // The new version's view holds the read lock: a second patch must wait for it.
        let other = Patch {
            from: len as u64 + 4,
            to: len as u64 + 4,
            written: &[],
            ..patch
        };
        let stranger = File::open(&target).unwrap();
        assert!(
            patch_in_place(&db(&held), &stranger, before, &other, &held, |m| m.name(1))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn no_patch_while_somebody_reads_appends_or_holds_a_marker() {
        let len = 4 * MIB;
        let (dir, target, base, held, staged) = setup(len);
        staged.write_all_at(&[9u8; 4096], 0).unwrap();
        let written = [(0, 4096)];
        let patch = Patch {
            staged: &staged,
            staged_name: "w0",
            from: len as u64,
            to: len as u64,
            written: &written,
            durable: false,
        };
        let ident = id(&target);
        let try_patch =
            || patch_in_place(&db(&held), &base, ident, &patch, &held, |m| m.name(0)).unwrap();
        // Another reader.
        let reader = File::open(&target).unwrap();
        hold_for_reading(&reader).unwrap();
        assert!(try_patch().is_none());
        drop(reader);
        // An appender.
        let appender = File::open(&target).unwrap();
        assert_eq!(
            unsafe { libc::flock(appender.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
            0
        );
        assert!(try_patch().is_none());
        drop(appender);
        // A marker (second link) of an unfinished append or patch.
        fs::hard_link(&target, dir.path().join("stale")).unwrap();
        assert!(try_patch().is_none());
        fs::remove_file(dir.path().join("stale")).unwrap();
        // Refused attempts gave the writer's read lock back: a stranger cannot patch either.
        let stranger = File::open(&target).unwrap();
        assert!(
            patch_in_place(&db(&held), &stranger, ident, &patch, &held, |m| m.name(1))
                .unwrap()
                .is_none()
        );
        drop(stranger);
        assert!(fs::read(&target).unwrap() == pattern(len, 0), "untouched");
        assert!(try_patch().is_some());
        assert_eq!(&fs::read(&target).unwrap()[..4096], &[9u8; 4096]);
    }

    #[test]
    fn an_interrupted_patch_is_finished_from_its_markers() {
        let len = 4 * MIB;
        let (dir, target, _base, _held, staged) = setup(len);
        let staged_path = dir.path().join("w0");
        let staging = dir.path().join("staging");
        fs::create_dir(&staging).unwrap();
        // The working copy: two changed blocks, one block copied unchanged for a read, and
        // a new tail.
        let mut expect = pattern(len, 0);
        for offset in [0usize, 2 * MIB] {
            staged.write_all_at(&[5u8; 4096], offset as u64).unwrap();
            expect[offset..offset + 4096].fill(5);
        }
        staged
            .write_all_at(&expect[MIB..MIB + 4096], MIB as u64)
            .unwrap();
        staged.write_all_at(b"more", len as u64).unwrap();
        expect.extend_from_slice(b"more");
        let mark = PatchMark {
            from: len as u64,
            to: len as u64 + 4,
        };
        let marker = staging.join(mark.name(0));
        let data = staging.join(PatchMark::data_name(&mark.name(0)));
        fs::hard_link(&staged_path, &data).unwrap();
        fs::hard_link(&target, &marker).unwrap();
        // The crash came after the first block.
        let f = OpenOptions::new().write(true).open(&target).unwrap();
        f.write_all_at(&[5u8; 4096], 0).unwrap();
        // A working copy link without its file marker: that patch never started.
        let other = dir.path().join("other");
        fs::write(&other, b"keep").unwrap();
        fs::write(staging.join("patch-4-8-1.data"), b"junk").unwrap();

        // A symlink planted as a marker pair is not followed.
        let outside = dir.path().join("outside");
        fs::write(&outside, b"untouched").unwrap();
        std::os::unix::fs::symlink(&outside, staging.join("patch-1-9-2")).unwrap();
        std::os::unix::fs::symlink(&staged_path, staging.join("patch-1-9-2.data")).unwrap();

        let held = Dir::open_trusted(&staging, false).unwrap();
        assert_eq!(finish_unfinished(&held), 1);
        assert!(fs::read(&target).unwrap() == expect);
        assert!(!marker.exists() && !data.exists());
        assert_eq!(fs::read(&outside).unwrap(), b"untouched");
        assert_eq!(fs::read(&other).unwrap(), b"keep");
    }
}
