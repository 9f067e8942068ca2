//! The spool: working copies of an S3 store, as unnamed files on local disk, within a bounded
//! number of bytes (`spool_bytes`): a write that would pass the bound fails with `ENOSPC` (as
//! a full disk does; the core then keeps the file's previous version), never a silent drop.
//!
//! A working copy also uploads itself early: it knows the key it was made for, counts changes
//! per part (`part_size` bytes), and once a sequential writer has written past a whole part,
//! that part goes up as a part of a multipart upload on the store's part threads while the
//! writer goes on. The commit then uploads only the parts not uploaded yet, or changed since,
//! and completes the upload. A copy dropped uncommitted (or committed elsewhere) aborts its
//! upload; the upload's id is in the journal from its creation, so a crash cannot leave it
//! behind for good (see `state`).
//!
//! Invariant: a part counts as uploaded only with the change count it had before its bytes
//! were read (they are streamed from the file as they are sent); any change to it from then on
//! makes the commit upload it again.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use super::Shared;
use super::client::{Body, Failure, Metadata};
use super::state::Journaled;
use crate::store::{CopyStat, WorkingCopy};

/// Subdirectories of the spool that its files are made in, in turn (see [`Spool::new`]).
const SPREAD: usize = 8;
/// The largest object S3 stores (5 TiB): a write past it is `EFBIG`, as past a disk's largest
/// file, before anything is written.
const MAX_OBJECT: u64 = 5 << 40;

/// The spool's bound and what its copies use of it.
pub struct Spool {
    dir: PathBuf,
    /// Where files are made, in turn.
    subdirs: Vec<PathBuf>,
    next: AtomicUsize,
    limit: u64,
    used: AtomicU64,
}

impl Spool {
    /// The spool in `dir` (this process's own, made already), bounded to `limit` bytes. Its
    /// files are made in [`SPREAD`] subdirectories in turn, which ext2/3/4 places in block
    /// groups of their own (`local::at::spread_subdirs`): a file's inode comes from its
    /// directory's group, and on ext4 without a journal each new inode is searched for past
    /// every inode of that group freed in the last minute, so one directory receiving every
    /// new file, while cached files are deleted, made each create scan the others' freed
    /// inodes (about half of the daemon's CPU with 8 agents creating and deleting files).
    /// Where subdirectories cannot be made, files are made in `dir` itself.
    pub fn new(dir: PathBuf, limit: u64) -> Spool {
        let subdirs = match File::open(&dir) {
            Ok(d) => {
                crate::store::local::at::spread_subdirs(std::os::fd::AsFd::as_fd(&d));
                (0..SPREAD)
                    .map(|i| {
                        let sub = dir.join(i.to_string());
                        match std::fs::create_dir(&sub) {
                            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
                            _ => Ok(sub),
                        }
                    })
                    .collect::<io::Result<Vec<_>>>()
                    .unwrap_or_else(|e| {
                        log::warn!("spool {}: no subdirectories ({e})", dir.display());
                        vec![dir.clone()]
                    })
            }
            Err(_) => vec![dir.clone()],
        };
        Spool {
            dir,
            subdirs,
            next: AtomicUsize::new(0),
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// Bytes the copies use now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn charge(&self, n: u64) -> io::Result<()> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let Some(next) = used.checked_add(n).filter(|&u| u <= self.limit) else {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            };
            match self
                .used
                .compare_exchange(used, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }

    fn release(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// Holds `n` bytes of the spool until the returned guard is dropped (`ENOSPC` past the
    /// bound).
    pub fn reserve(&self, n: u64) -> io::Result<Reserved<'_>> {
        self.charge(n)?;
        Ok(Reserved { spool: self, n })
    }

    /// A new unnamed file in the spool (nothing is left behind by a crash).
    pub fn file(&self) -> io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = &self.subdirs[self.next.fetch_add(1, Ordering::Relaxed) % self.subdirs.len()];
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o600)
            .open(dir)
        {
            Ok(f) => Ok(f),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {
                // No O_TMPFILE here: a named file, unlinked at once.
                static N: AtomicU64 = AtomicU64::new(0);
                let path = dir.join(format!(
                    ".tmp-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?;
                std::fs::remove_file(&path)?;
                Ok(f)
            }
            Err(e) => Err(e),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Bytes held in the spool (see [`Spool::reserve`]).
pub struct Reserved<'a> {
    spool: &'a Spool,
    n: u64,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.spool.release(self.n);
    }
}

/// The multipart upload a copy made early.
enum Early {
    /// None yet.
    None,
    /// A part thread is creating it.
    Creating,
    Ready {
        upload_id: String,
        journal: Journaled,
    },
    /// Creating or uploading failed: the commit uploads everything itself.
    Failed,
}

struct Parts {
    /// Change count of each part.
    changes: Vec<u64>,
    /// Parts uploaded to the early upload: (index) → (ETag, change count when read).
    uploaded: HashMap<usize, (String, u64)>,
    /// Parts being uploaded now.
    in_flight: std::collections::HashSet<usize>,
    /// Where the next sequential write goes; parts wholly before it (with more after) are
    /// uploaded early.
    frontier: u64,
    early: Early,
    /// Early uploads are off (the copy is committed, or was made without a key).
    closed: bool,
    /// When an early request last went unanswered (the store unavailable after the client's
    /// retries), and why: a close that waited for it fails with it (see `take_early`).
    unavailable: Option<(Instant, String)>,
}

/// How long before a close began an early request that went unanswered still fails it (the
/// store is taken to be unreachable still, rather than tried again for as long once more).
const UNAVAILABLE_RECENTLY: Duration = Duration::from_secs(2);

/// The early upload a commit takes over (see [`SpoolCopy::take_early`]).
pub struct Taken {
    pub early: Option<EarlyUpload>,
    /// The store did not answer an early request while the close waited for it (or just
    /// before): the commit fails with this rather than trying again.
    pub unavailable: Option<String>,
}

/// A working copy in the spool (see the module docs).
pub struct SpoolCopy {
    shared: Arc<Shared>,
    file: Arc<File>,
    /// The size, and the bytes charged to the spool for it.
    size: Mutex<u64>,
    mtime: Mutex<SystemTime>,
    parts: Mutex<Parts>,
    idle: Condvar,
    /// The key this copy is meant for, and the metadata its object will have.
    key: Option<(String, Metadata)>,
    /// The lineage its commit gives the object (see `content`).
    lineage: String,
    me: std::sync::Weak<SpoolCopy>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a commit can take of a copy's early upload.
pub struct EarlyUpload {
    pub upload_id: String,
    pub journal: Journaled,
    /// Parts whose uploaded bytes are still the copy's: index → ETag.
    pub parts: HashMap<usize, String>,
}

impl SpoolCopy {
    /// A new empty copy; with `key`, meant for that object (with `metadata`), and uploading
    /// itself early.
    pub fn new(shared: Arc<Shared>, key: Option<(String, Metadata)>) -> io::Result<Arc<SpoolCopy>> {
        let file = shared.spool.file()?;
        let lineage = shared.new_lineage();
        let key = key.map(|(k, mut m)| {
            m.insert(super::LINEAGE.into(), lineage.clone());
            (k, m)
        });
        Ok(Arc::new_cyclic(|me| SpoolCopy {
            lineage,
            shared,
            file: Arc::new(file),
            size: Mutex::new(0),
            mtime: Mutex::new(SystemTime::now()),
            parts: Mutex::new(Parts {
                changes: Vec::new(),
                uploaded: HashMap::new(),
                in_flight: std::collections::HashSet::new(),
                frontier: 0,
                early: Early::None,
                closed: false,
                unavailable: None,
            }),
            idle: Condvar::new(),
            key,
            me: me.clone(),
        }))
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The spool file.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    pub fn size(&self) -> u64 {
        *lock(&self.size)
    }

    pub fn mtime(&self) -> SystemTime {
        *lock(&self.mtime)
    }

    /// The key this copy was made for.
    pub fn key(&self) -> Option<&str> {
        self.key.as_ref().map(|(k, _)| k.as_str())
    }

    /// The lineage its commit gives the object.
    pub fn lineage(&self) -> &str {
        &self.lineage
    }

    /// The metadata its early upload gives the object.
    pub fn early_metadata(&self) -> Option<&Metadata> {
        self.key.as_ref().map(|(_, m)| m)
    }

    /// Grows or shrinks the size to `new`, charging or releasing the spool.
    fn resize(&self, size: &mut u64, new: u64) -> io::Result<()> {
        if new > *size {
            self.shared.spool.charge(new - *size)?;
        } else {
            self.shared.spool.release(*size - new);
        }
        *size = new;
        Ok(())
    }

    /// Counts a change of `start..end` (`written`: by a write, which moves a sequential
    /// writer's frontier), and starts early uploads a sequential writer made possible.
    fn changed(&self, start: u64, end: u64, written: bool) {
        *lock(&self.mtime) = SystemTime::now();
        let part = self.shared.part_size;
        let mut p = lock(&self.parts);
        if end > start {
            let (first, last) = ((start / part) as usize, ((end - 1) / part) as usize);
            if p.changes.len() <= last {
                p.changes.resize(last + 1, 0);
            }
            for c in &mut p.changes[first..=last] {
                *c += 1;
            }
        }
        if written && start == p.frontier {
            p.frontier = end;
        }
        if p.closed || self.key.is_none() || matches!(p.early, Early::Failed) {
            return;
        }
        // Parts wholly before the frontier, with more written after them.
        let whole = (p.frontier.saturating_sub(1) / part) as usize;
        let limit = (self.shared.pool.threads() * 2).max(2);
        for index in 0..whole.min(super::MAX_PARTS) {
            if p.in_flight.len() >= limit {
                break;
            }
            let change = p.changes.get(index).copied().unwrap_or(0);
            if p.in_flight.contains(&index)
                || p.uploaded.get(&index).is_some_and(|(_, c)| *c == change)
            {
                continue;
            }
            p.in_flight.insert(index);
            let this = self.me.clone();
            self.shared.pool.run(move || {
                if let Some(copy) = this.upgrade() {
                    copy.upload_early(index, change);
                }
            });
        }
    }

    /// Uploads part `index` (as of change count `change`) to the early upload.
    fn upload_early(&self, index: usize, change: u64) {
        // A panic on the way (a part thread that cannot start its S3 runtime, with no
        // descriptor left) fails this part like an unanswered request: the early upload is
        // then `Failed`, not `Creating` for ever, which `take_early` — and the writer's
        // `close()` — would wait on for good.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.try_upload_early(index)
        }))
        .unwrap_or_else(|_| Err(("a part thread panicked".into(), true)));
        let mut p = lock(&self.parts);
        p.in_flight.remove(&index);
        match result {
            Ok(etag) => {
                p.uploaded.insert(index, (etag, change));
            }
            Err((e, unavailable)) => {
                log::debug!("uploading part {} early failed: {e}", index + 1);
                if unavailable {
                    p.unavailable = Some((Instant::now(), e));
                }
                p.uploaded.remove(&index);
                if !matches!(p.early, Early::Ready { .. }) {
                    p.early = Early::Failed;
                }
            }
        }
        self.idle.notify_all();
    }

    /// Uploads part `index` to the early upload (made first if need be); the error says
    /// whether the store was unavailable.
    fn try_upload_early(&self, index: usize) -> Result<String, (String, bool)> {
        let (key, metadata) = self.key.as_ref().expect("early uploads have a key");
        let upload_id = {
            let mut p = lock(&self.parts);
            loop {
                match &p.early {
                    Early::Ready { upload_id, .. } => break upload_id.clone(),
                    Early::Failed => return Err(("no upload".into(), false)),
                    Early::Creating => p = self.idle.wait(p).unwrap_or_else(|e| e.into_inner()),
                    Early::None => {
                        p.early = Early::Creating;
                        drop(p);
                        let made = self.shared.create_upload(key, metadata);
                        p = lock(&self.parts);
                        match made {
                            Ok((upload_id, journal)) => {
                                p.early = Early::Ready {
                                    upload_id: upload_id.clone(),
                                    journal,
                                };
                                self.idle.notify_all();
                                break upload_id;
                            }
                            Err(e) => {
                                p.early = Early::Failed;
                                self.idle.notify_all();
                                return Err((e.to_string(), e.is(Failure::Unavailable)));
                            }
                        }
                    }
                }
            }
        };
        // Streamed from the spool file: its bytes are read as they are sent, so a write to the
        // part meanwhile changes its count (taken before), and the commit sends it again.
        let part = self.shared.part_size;
        let body = Body::File {
            file: self.file.clone(),
            offset: index as u64 * part,
            len: part,
        };
        self.shared
            .client
            .upload_part(key, &upload_id, index as u32 + 1, body)
            .map_err(|e| (e.to_string(), e.is(Failure::Unavailable)))
    }

    /// Stops early uploads, waits for those under way, and hands over the early upload (if
    /// any) with the parts still valid; the caller completes or aborts it. If the store left
    /// an early request unanswered while this waited (or just before), that is said too: the
    /// commit then fails at once, instead of asking an unreachable store again for as long
    /// (`close()` would take twice the bound of `EIO`).
    pub fn take_early(&self) -> Taken {
        let began = Instant::now();
        let mut p = lock(&self.parts);
        p.closed = true;
        if !p.in_flight.is_empty() {
            crate::store::wait::announce();
        }
        while !p.in_flight.is_empty() {
            p = self.idle.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        let unavailable = p
            .unavailable
            .take()
            .filter(|(at, _)| *at + UNAVAILABLE_RECENTLY >= began)
            .map(|(_, e)| e);
        let early = std::mem::replace(&mut p.early, Early::None);
        let Early::Ready { upload_id, journal } = early else {
            return Taken {
                early: None,
                unavailable,
            };
        };
        let parts = p
            .uploaded
            .iter()
            .filter(|(i, (_, c))| p.changes.get(**i).copied().unwrap_or(0) == *c)
            .map(|(i, (e, _))| (*i, e.clone()))
            .collect();
        p.uploaded.clear();
        Taken {
            early: Some(EarlyUpload {
                upload_id,
                journal,
                parts,
            }),
            unavailable,
        }
    }

    /// Allows early uploads again (after a commit failed, the copy stays the writer's).
    pub fn reopen(&self) {
        let mut p = lock(&self.parts);
        p.closed = false;
        if matches!(p.early, Early::Failed) {
            p.early = Early::None;
        }
    }
}

impl Drop for SpoolCopy {
    fn drop(&mut self) {
        let size = *lock(&self.size);
        self.shared.spool.release(size);
        let early = std::mem::replace(&mut lock(&self.parts).early, Early::None);
        if let (Early::Ready { upload_id, journal }, Some((key, _))) = (early, &self.key) {
            self.shared
                .abort_upload_later(key.clone(), upload_id, journal);
        }
    }
}

impl WorkingCopy for SpoolCopy {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let size = self.size();
        if offset >= size {
            return Ok(0);
        }
        let want = buf.len().min((size - offset) as usize);
        let mut done = 0;
        while done < want {
            match self
                .file
                .read_at(&mut buf[done..want], offset + done as u64)?
            {
                0 => {
                    // A hole past the file's end on disk (a size set by `set_len`): zeros.
                    buf[done..want].fill(0);
                    done = want;
                }
                n => done += n,
            }
        }
        Ok(want)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&end| end <= MAX_OBJECT)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        {
            let mut size = lock(&self.size);
            if end > *size {
                self.resize(&mut size, end)?;
            }
        }
        if let Err(e) = self.file.write_all_at(data, offset) {
            // Counted as changed anyway: the bytes there are undefined now.
            self.changed(offset, end, false);
            return Err(e);
        }
        self.changed(offset, end, true);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let old = {
            let mut size = lock(&self.size);
            let old = *size;
            self.resize(&mut size, len)?;
            old
        };
        if let Err(e) = self.file.set_len(len) {
            let mut size = lock(&self.size);
            let _ = self.resize(&mut size, old);
            return Err(e);
        }
        if len < old {
            // The part where it now ends is shorter; those past it are gone.
            {
                let mut p = lock(&self.parts);
                p.frontier = p.frontier.min(len);
            }
            self.changed(len.saturating_sub(1), old, false);
        } else if len > old {
            self.changed(old, len, false);
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.size();
        let end = (offset.saturating_add(len)).min(size);
        if offset >= end {
            return Ok(());
        }
        let (start, n) = crate::store::off_t_range(offset, end - offset)?;
        // SAFETY: a valid descriptor and plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&*self.file),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start,
                n,
            )
        };
        if r != 0 {
            // No hole punching here: write zeros.
            let zeros = vec![0u8; (end - offset).min(1 << 20) as usize];
            let mut at = offset;
            while at < end {
                let n = (end - at).min(zeros.len() as u64) as usize;
                self.file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
        }
        self.changed(offset, end, false);
        Ok(())
    }

    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        let (start, n) = crate::store::off_t_range(offset, len)?;
        // SAFETY: a valid descriptor and plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&*self.file),
                libc::FALLOC_FL_KEEP_SIZE,
                start,
                n,
            )
        };
        match r {
            0 => Ok(()),
            _ => {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    fn stat(&self) -> io::Result<CopyStat> {
        let size = self.size();
        let mtime = self.mtime();
        Ok(CopyStat {
            size,
            blocks: size.div_ceil(512),
            mtime,
            ctime: mtime,
        })
    }

    fn local_file(&self) -> Option<&File> {
        // Not handed out: writes through it would bypass the per-part change counts.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_made_in_the_spools_subdirectories_in_turn() {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let dir = tmp.path().join("spool");
        std::fs::create_dir(&dir).unwrap();
        let spool = Spool::new(dir.clone(), 1 << 20);
        let files: Vec<File> = (0..SPREAD + 1).map(|_| spool.file().unwrap()).collect();
        let made_in: Vec<PathBuf> = files
            .iter()
            .map(|f| {
                use std::os::fd::AsRawFd;
                let link = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
                link.parent().unwrap().to_path_buf()
            })
            .collect();
        for (i, d) in made_in.iter().enumerate() {
            assert_eq!(*d, dir.join((i % SPREAD).to_string()), "file {i}");
        }
    }
}
