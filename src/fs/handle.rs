//! Open files and directories.
//!
//! A file handle works from one committed version, its *base* (as of open, or of its last
//! commit), and holds what it changed since in one of three states ([`Pending`]): nothing;
//! bytes appended (`O_APPEND`, or a plain writer's writes at the end of its base: a new file
//! written once), waiting in memory so they can be committed by adding them to the file in
//! place; or a working copy made by the store (created at the first other write, or at an open
//! with `O_TRUNC` of a file it did not create), seeded from the base. The empty working copy of
//! an `O_TRUNC` of an empty file gives way at the first write to bytes waiting in memory: they
//! go at the end of the version opened, so its readers read on into them (`: > log; tail -f
//! log & cmd > log`). Reads through the handle see its changes; everybody else keeps seeing the
//! committed content until the handle commits.
//! Read-write opens of one file share a handle (see `Fs::open`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::unistd::{Whence, lseek};

use super::closers::Users;
use super::inode::Ino;
use super::seed::{LAZY_SEED_MIN, Seeding};
use crate::errno::{Errno, FsResult};
use crate::store::{Content, Kind, Meta, SetAttr, Store, TimeSpec, WorkingCopy, copy_range};

/// Appended bytes kept in memory, at most: beyond that a working copy takes them over.
pub const APPEND_BUFFER_MAX: usize = 128 << 10;

/// How long a sequential writer keeps what it wrote to itself, at most (see `stream_due`).
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// What an open file may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Read only (`O_RDONLY`).
    Read,
    /// Write (`O_WRONLY`, `O_RDWR`).
    Write,
    /// Write, always at the end (`O_APPEND`).
    Append,
}

/// What an `fallocate(2)` asks of an open file (the modes the kernel forwards to FUSE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Space for the range (mode 0); the file grows to cover it unless `keep_size`.
    Reserve { keep_size: bool },
    /// The range reads as zeros (`FALLOC_FL_ZERO_RANGE`, or `FALLOC_FL_PUNCH_HOLE`, which
    /// always keeps the size); the file grows to cover it unless `keep_size`.
    Zero { keep_size: bool },
}

impl Allocation {
    /// The allocation `fallocate` mode `mode` asks for; EOPNOTSUPP for modes that move data
    /// (`COLLAPSE_RANGE`, `INSERT_RANGE`) or that no filesystem accepts.
    pub fn from_mode(mode: i32) -> FsResult<Allocation> {
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => Ok(Allocation::Reserve { keep_size }),
            libc::FALLOC_FL_PUNCH_HOLE if keep_size => Ok(Allocation::Zero { keep_size }),
            libc::FALLOC_FL_ZERO_RANGE => Ok(Allocation::Zero { keep_size }),
            _ => Err(Errno::EOPNOTSUPP),
        }
    }

    /// The size of a file of `size` bytes after this allocation of `offset..end`.
    pub fn size_after(self, size: u64, end: u64) -> u64 {
        match self {
            Allocation::Reserve { keep_size } | Allocation::Zero { keep_size } if !keep_size => {
                size.max(end)
            }
            _ => size,
        }
    }
}

/// The span of a working copy that failed changes left undefined, and the first error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spoiled {
    pub from: u64,
    pub to: u64,
    pub errno: Errno,
}

/// A working copy and what is known about it.
pub struct Staged {
    pub copy: Arc<dyn WorkingCopy>,
    /// The copying of the base into a large working copy, while under way.
    pub seeding: Option<Arc<Seeding>>,
    /// Where changes to the working copy failed part way (a write on a full disk): those
    /// bytes are undefined, so the copy is not committed (see `Fs::commit`) until later writes
    /// or a truncation define them again (as a database rolling back does).
    pub spoiled: Option<Spoiled>,
    /// Where this append handle's bytes begin in its working copy, while it has only appended
    /// since the copy was made: they can then be taken back out and appended to a newer
    /// version (see `Fs::commit`).
    pub appends_from: Option<u64>,
}

/// What a handle changed and has not committed.
pub enum Pending {
    /// Nothing: it reads (and writes into) its base.
    Clean,
    /// Bytes appended after the base, waiting in memory; `at` is when they last grew (the
    /// mtime the handle shows).
    Appended { tail: Vec<u8>, at: SystemTime },
    /// A working copy holds the changes.
    Staged(Staged),
}

/// An open regular file.
pub struct FileHandle {
    pub ino: Ino,
    mode: Mode,
    /// Whether the kernel serves this handle without its page cache.
    pub direct_io: bool,
    /// An appender alone on the file, served with direct I/O only so that the kernel does not
    /// ask for `security.capability` before its writes (it does before the first write through
    /// the page cache after each refresh of the file's attributes, i.e. at every
    /// open-append-close). The kernel's page cache still holds this handle's view: its
    /// writes only drop the pages they touch, all at or past the end it started from.
    pub appends_direct: bool,
    /// The committed version this handle works from.
    base: Arc<dyn Content>,
    /// When `base` became what it is (see `based_after`).
    based: Instant,
    pending: Pending,
    /// Nobody else had the file open when this writer opened it: a large working copy is
    /// seeded on demand only, hoping to commit only the changed ranges (see `Change::Ranges`).
    pub seed_on_demand: bool,
    /// Its open made the file (`O_CREAT` of a new name): no earlier version to keep private
    /// from the process writing it (see `Fs::shared_written_by`).
    pub made_by_open: bool,
    /// The kernel's cached pages of the file are not what this append handle sees: it moved on
    /// to a version others committed (its appends followed theirs), or the kernel, going by a
    /// size it cached before another commit, placed its appends elsewhere than at the end.
    pub moved: bool,
    /// The file it opened was deleted, or replaced by a move, elsewhere (another process or
    /// host, see `fs::coherence`) while the name stayed with this mount's inode: its changes
    /// are not committed over what is there now, as for a file unlinked while open.
    pub gone: bool,
    /// The threads that opened the handle or changed the file through it.
    pub users: Users,
    /// A POSIX lock was taken through it (see `fs::locks`).
    pub locker: bool,
    /// Times set (`futimens`, `utimensat`) since the handle last changed the file: they are
    /// the file's after the commit too, as on a local disk (`cp -p` and `tar -x` set them
    /// through the descriptor before closing it).
    times: Option<(Option<SystemTime>, Option<SystemTime>)>,
    /// Mode and owner set while the handle held uncommitted changes, on a store that takes
    /// them with the commit (`Capabilities::attrs_at_commit`; `perm`, `uid`, `gid` only): for
    /// that commit, together with `times`.
    held: SetAttr,
    /// The mtime in `times` was set to the time of the call (`UTIME_NOW`, `touch`): for a
    /// commit that takes attributes, the new version's own time is that.
    mtime_now: bool,
    /// Every write so far went at the end of what the handle saw (a log, `>`, `>>`): such a
    /// writer's output is published while it runs (see `stream_due`).
    sequential: bool,
    /// Where a sequential write goes next.
    next: u64,
    /// When the handle opened, and when it last published its output.
    opened: Instant,
    published: Option<Instant>,
    /// Where the file was when opened: the store's working copies are made for it (a hint;
    /// a rename since does not matter, the commit goes where the file is).
    path: PathBuf,
    /// Its open created the file, and the store makes it at the first commit, which has not
    /// succeeded yet (`commits_creation`).
    pub creates: bool,
    /// Its only change is emptying the file (`O_TRUNC`, a cut to nothing), nothing written
    /// since: what a shell's redirect holds until the command writes. Not published while
    /// open (there is no output yet), nor committed at a close its process still holds it
    /// open after, or at the exit of a killed process (see `closers`).
    pub only_emptied: bool,
    /// A user of the handle was killed while it held only the emptying (see `closers`): unless
    /// it changes more, the last close drops it instead of committing it.
    pub abandoned: bool,
}

impl FileHandle {
    /// A handle open on `base` that has not changed anything yet.
    pub fn new(ino: Ino, mode: Mode, direct_io: bool, base: Arc<dyn Content>) -> FileHandle {
        let next = base.meta().size;
        FileHandle {
            ino,
            mode,
            direct_io,
            appends_direct: false,
            base,
            based: Instant::now(),
            pending: Pending::Clean,
            locker: false,
            seed_on_demand: false,
            made_by_open: false,
            moved: false,
            gone: false,
            users: Users::default(),
            times: None,
            held: SetAttr::default(),
            mtime_now: false,
            sequential: mode != Mode::Read,
            next,
            opened: Instant::now(),
            published: None,
            path: PathBuf::new(),
            creates: false,
            only_emptied: false,
            abandoned: false,
        }
    }

    /// Whether the kernel's page cache shows what this handle sees, as far as it holds pages.
    pub fn cached_view(&self) -> bool {
        !self.direct_io || self.appends_direct
    }

    /// Says where the file is (see `path`).
    pub fn set_path(&mut self, path: &Path) {
        self.path = path.to_path_buf();
    }

    /// Whether the handle's output is due to be published now: it wrote only sequentially,
    /// has output not yet committed, and has kept it for `PUBLISH_EVERY` since it opened or
    /// last published. Writers done within that time commit only at close, whole.
    pub fn stream_due(&self, now: Instant) -> bool {
        self.sequential
            && self.dirty()
            && !self.only_emptied
            && now.duration_since(self.published.unwrap_or(self.opened)) >= PUBLISH_EVERY
    }

    /// The handle published its output (a commit while it stays open).
    pub fn mark_published(&mut self, now: Instant) {
        self.published = Some(now);
    }

    /// The handle is shared by read-write opens (a database): never published while open.
    pub fn not_sequential(&mut self) {
        self.sequential = false;
    }

    /// Keeps the access and modification times just set, for after the commit.
    pub fn keep_times(&mut self, atime: Option<TimeSpec>, mtime: Option<TimeSpec>) {
        let at = |t: TimeSpec| match t {
            TimeSpec::Now => SystemTime::now(),
            TimeSpec::At(t) => t,
        };
        let (a, m) = self.times.unwrap_or((None, None));
        self.times = Some((atime.map(at).or(a), mtime.map(at).or(m)));
        if let Some(t) = mtime {
            self.mtime_now = matches!(t, TimeSpec::Now);
        }
    }

    /// The times to set again once committed (see `times`).
    pub fn kept_times(&self) -> Option<SetAttr> {
        let (atime, mtime) = self.times?;
        Some(SetAttr {
            atime: atime.map(TimeSpec::At),
            mtime: mtime.map(TimeSpec::At),
            ..Default::default()
        })
    }

    /// Holds a change of mode or owner (and of times, as `keep_times`) for the next commit.
    pub fn hold_attrs(&mut self, attr: &SetAttr) {
        self.held.perm = attr.perm.or(self.held.perm);
        self.held.uid = attr.uid.or(self.held.uid);
        self.held.gid = attr.gid.or(self.held.gid);
        if attr.atime.is_some() || attr.mtime.is_some() {
            self.keep_times(attr.atime, attr.mtime);
        }
    }

    /// What the next commit sets (see `held`), if anything.
    pub fn commit_attrs(&self) -> Option<SetAttr> {
        let times = self.kept_times().unwrap_or_default();
        let attrs = SetAttr {
            atime: times.atime,
            mtime: match times.mtime {
                Some(_) if self.mtime_now => Some(TimeSpec::Now),
                m => m,
            },
            ..self.held.clone()
        };
        (!attrs.is_empty()).then_some(attrs)
    }

    /// `attr` with the mode and owner held for the next commit.
    pub fn show_held(&self, attr: &mut super::Attr) {
        attr.perm = self.held.perm.unwrap_or(attr.perm);
        attr.uid = self.held.uid.unwrap_or(attr.uid);
        attr.gid = self.held.gid.unwrap_or(attr.gid);
    }

    /// Drops the set-IDs of a mode held for the next commit, as `Fs::drop_set_ids` does on
    /// the file (a write or truncate by an unprivileged process); whether there were any.
    pub fn drop_held_set_ids(&mut self) -> bool {
        let Some(perm) = self.held.perm else {
            return false;
        };
        let mut without = perm & !(libc::S_ISUID as u16);
        if perm & libc::S_IXGRP as u16 != 0 {
            without &= !(libc::S_ISGID as u16);
        }
        self.held.perm = Some(without);
        without != perm
    }

    /// A change of content: times set earlier give way to the change's own.
    fn changed(&mut self) {
        self.times = None;
        self.only_emptied = false;
        self.abandoned = false;
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn writable(&self) -> bool {
        self.mode != Mode::Read
    }

    pub fn appends(&self) -> bool {
        self.mode == Mode::Append
    }

    /// The committed version this handle works from.
    pub fn base(&self) -> &Arc<dyn Content> {
        &self.base
    }

    /// Whether the handle holds changes not committed yet.
    pub fn dirty(&self) -> bool {
        !matches!(self.pending, Pending::Clean)
    }

    pub fn pending(&self) -> &Pending {
        &self.pending
    }

    /// Its working copy, if it has one.
    pub fn staged(&self) -> Option<&Staged> {
        match &self.pending {
            Pending::Staged(s) => Some(s),
            _ => None,
        }
    }

    fn staged_mut(&mut self) -> Option<&mut Staged> {
        match &mut self.pending {
            Pending::Staged(s) => Some(s),
            _ => None,
        }
    }

    /// The appended bytes waiting in memory.
    fn tail(&self) -> &[u8] {
        match &self.pending {
            Pending::Appended { tail, .. } => tail,
            _ => &[],
        }
    }

    /// The committed: `content` is now the base and nothing is pending. `followed`: its
    /// appends went onto a version others committed.
    pub fn committed(&mut self, content: Arc<dyn Content>, followed: bool) {
        if let Pending::Staged(s) = &self.pending
            && let Some(seeding) = &s.seeding
        {
            seeding.cancel();
        }
        self.base = content;
        self.based = Instant::now();
        self.pending = Pending::Clean;
        self.only_emptied = false;
        self.abandoned = false;
        self.moved |= followed;
        self.creates = false;
        self.held = SetAttr::default();
    }

    /// The file its open created was made, empty, without its changes (see
    /// `Fs::make_created`): the changes stay, on that base.
    pub fn rebase_created(&mut self, content: Arc<dyn Content>) {
        debug_assert_eq!(content.meta().size, self.base.meta().size);
        self.base = content;
        self.based = Instant::now();
        self.creates = false;
    }

    /// Drops the uncommitted changes (after a failed last commit, or an unlinked file's).
    pub fn drop_changes(&mut self) {
        if let Pending::Staged(s) = &self.pending
            && let Some(seeding) = &s.seeding
        {
            seeding.cancel();
        }
        self.pending = Pending::Clean;
        self.only_emptied = false;
        self.abandoned = false;
        // Attributes held for a commit that will not come go with the changes.
        self.held = SetAttr::default();
    }

    /// Starts from nothing (`O_TRUNC`): `copy`, an empty working copy, holds the changes.
    pub fn truncated(&mut self, copy: Arc<dyn WorkingCopy>) {
        let held = std::mem::take(&mut self.held);
        self.drop_changes();
        self.held = held;
        self.next = 0;
        self.pending = Pending::Staged(Staged {
            copy,
            seeding: None,
            spoiled: None,
            appends_from: None,
        });
        self.only_emptied = true;
    }

    /// The handle's open made the file, which the store makes for others only at the commit
    /// (`Capabilities::created_at_commit`): it commits even if nothing is written.
    pub fn commits_creation(&mut self) {
        self.creates = true;
        if matches!(self.pending, Pending::Clean) {
            self.pending = Pending::Appended {
                tail: Vec::new(),
                at: SystemTime::now(),
            };
        }
    }

    /// Moves a clean handle on to `latest` (a newer version); false if it has changes.
    pub fn move_to(&mut self, latest: Arc<dyn Content>) -> bool {
        if self.dirty() {
            return false;
        }
        self.base = latest;
        self.based = Instant::now();
        true
    }

    /// Whether the handle's base was set after `at`: a version found before then may be
    /// older than it (its own commit since), and must not replace it.
    pub fn based_after(&self, at: Instant) -> bool {
        self.based > at
    }

    /// Creates the working copy if there is none yet, seeded from the base and the appends
    /// waiting in memory.
    pub fn ensure_staged(&mut self, store: &dyn Store) -> FsResult<&Staged> {
        if self.staged().is_none() {
            let tail = match std::mem::replace(&mut self.pending, Pending::Clean) {
                Pending::Appended { tail, .. } => tail,
                _ => Vec::new(),
            };
            let at = self.committed_size();
            let staged = self.stage(store, (!tail.is_empty()).then_some((at, tail.len() as u64)));
            let staged = staged.and_then(|s| {
                if !tail.is_empty() {
                    s.copy.write_at(&tail, at)?;
                }
                Ok(s)
            });
            match staged {
                Ok(staged) => self.pending = Pending::Staged(staged),
                Err(e) => {
                    // Back to the appends in memory; nothing is lost.
                    if !tail.is_empty() {
                        self.pending = Pending::Appended {
                            tail,
                            at: SystemTime::now(),
                        };
                    }
                    return Err(e);
                }
            }
        }
        Ok(self.staged().expect("just staged"))
    }

    /// A working copy seeded from the base (large ones lazily, see `seed`); `write` is a range
    /// about to be written (its blocks need no seed).
    fn stage(&self, store: &dyn Store, write: Option<(u64, u64)>) -> FsResult<Staged> {
        let size = self.committed_size();
        let copy = store.working_copy(&self.path)?;
        let lazy = size >= LAZY_SEED_MIN || (self.seed_on_demand && ranged(store, size));
        let seeding = if size == 0 {
            None
        } else if lazy {
            // A sparse copy of the right size, filled in blocks (see `seed`).
            copy.set_len(size)?;
            let on_demand = self.seed_on_demand && ranged(store, size);
            let seeding = Seeding::start(self.base.clone(), copy.clone(), size, on_demand);
            if let Some((offset, len)) = write {
                seeding.prepare(offset, len, true)?;
            }
            Some(seeding)
        } else {
            // Sized first: the copy skips the holes of a sparse file.
            copy.set_len(size)?;
            copy_range(self.base.as_ref(), copy.as_ref(), 0, size)?;
            None
        };
        Ok(Staged {
            copy,
            seeding,
            spoiled: None,
            appends_from: None,
        })
    }

    /// Completes the seeding of the working copy, if under way (before a commit).
    pub fn finish_seeding(&mut self) -> FsResult<()> {
        if let Some(s) = self.staged_mut()
            && let Some(seeding) = &s.seeding
        {
            seeding.finish()?;
            s.seeding = None;
        }
        Ok(())
    }

    /// The ranges to commit alone, when the working copy may be committed so: seeded on
    /// demand, and never cut (a truncation completes the seeding).
    pub fn changed_ranges(&self) -> Option<Vec<(u64, u64)>> {
        self.staged()?
            .seeding
            .as_ref()
            .filter(|s| s.on_demand())
            .map(|s| s.written())
    }

    /// Makes the working copy ready to be read or written at `offset..offset + len`.
    fn seeded(&self, offset: u64, len: u64, write: bool) -> FsResult<()> {
        if let Some(seeding) = self.staged().and_then(|s| s.seeding.as_ref()) {
            seeding.prepare(offset, len, write)?;
        }
        Ok(())
    }

    /// The size this handle sees now.
    pub fn size(&self) -> FsResult<u64> {
        match &self.pending {
            Pending::Staged(s) => Ok(s.copy.stat()?.size),
            Pending::Appended { tail, .. } => Ok(self.committed_size() + tail.len() as u64),
            Pending::Clean => Ok(self.committed_size()),
        }
    }

    /// Attributes of what this handle sees, while it has uncommitted changes.
    pub fn pending_meta(&self) -> FsResult<Option<Meta>> {
        let mut meta = self.base.meta().clone();
        match &self.pending {
            Pending::Clean => return Ok(None),
            Pending::Staged(s) => {
                // The working copy gives the size and times; mode, owner and the rest stay
                // the file's.
                let copy = s.copy.stat()?;
                meta.size = copy.size;
                meta.blocks = copy.blocks;
                meta.mtime = copy.mtime;
                meta.ctime = copy.ctime;
            }
            Pending::Appended { tail, at } => {
                meta.size += tail.len() as u64;
                meta.blocks = meta.size.div_ceil(512);
                meta.mtime = *at;
                meta.ctime = *at;
            }
        }
        if let Some((atime, mtime)) = self.times {
            meta.atime = atime.unwrap_or(meta.atime);
            meta.mtime = mtime.unwrap_or(meta.mtime);
        }
        Ok(Some(meta))
    }

    /// The size of the base.
    pub fn committed_size(&self) -> u64 {
        self.base.meta().size
    }

    /// Where the first data (`SEEK_DATA`) or hole (`SEEK_HOLE`, with `hole`) at or after
    /// `offset` is in what this handle sees. Holes are reported only where the file behind
    /// this view is known to have them (a working copy still being seeded, bytes appended in
    /// memory and contents without a local file are all data), so the answer is never wrong,
    /// at worst less sparse; the end counts as a hole, and at or past it there is `ENXIO`.
    pub fn seek(&self, offset: u64, hole: bool) -> FsResult<u64> {
        let size = self.size()?;
        if offset >= size {
            return Err(Errno::ENXIO);
        }
        // The file whose extents are this view's up to `known`; past that, data.
        let local = self.base.local();
        let (file, known) = match &self.pending {
            Pending::Staged(s) if s.seeding.is_some() => (None, 0),
            Pending::Staged(s) => (s.copy.local_file(), size),
            _ => (
                local.as_ref().map(|l| l.file),
                self.committed_size().min(size),
            ),
        };
        if let Some(file) = file
            && offset < known
        {
            let whence = if hole {
                Whence::SeekHole
            } else {
                Whence::SeekData
            };
            match lseek(file, offset as i64, whence) {
                Ok(at) if (at as u64) < known => return Ok(at as u64),
                Ok(_) | Err(nix::errno::Errno::ENXIO) => {}
                Err(e) => return Err(Errno(e as i32)),
            }
            // Nothing of the kind before `known`: what follows it is data.
            return match (hole, known < size) {
                (true, _) => Ok(size),
                (false, true) => Ok(known),
                (false, false) => Err(Errno::ENXIO),
            };
        }
        Ok(if hole { size } else { offset })
    }

    /// Reads up to `size` bytes at `offset` from what this handle sees.
    pub fn read(&self, offset: u64, size: usize) -> FsResult<Vec<u8>> {
        self.seeded(offset, size as u64, false)?;
        let mut buf = vec![0u8; size];
        let mut done = 0;
        let committed_size = self.committed_size();
        while done < size {
            let at = offset + done as u64;
            let n = match &self.pending {
                Pending::Staged(s) => s.copy.read_at(&mut buf[done..], at)?,
                // A reader follows whole appends committed after it opened; a writer's view
                // of the committed part ends where its own appends begin.
                _ if !self.writable() => self.base.read_appended_at(&mut buf[done..], at)?,
                _ if at >= committed_size => {
                    let tail = self.tail();
                    let from = (at - committed_size).min(tail.len() as u64) as usize;
                    let n = (size - done).min(tail.len() - from);
                    buf[done..done + n].copy_from_slice(&tail[from..from + n]);
                    n
                }
                _ => self.base.read_at(&mut buf[done..], at)?,
            };
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// Writes `data` at `offset` (at the end for `O_APPEND` handles, unless `placed`: pages
    /// written back from a mapping) into the working copy.
    pub fn write(
        &mut self,
        store: &dyn Store,
        offset: u64,
        data: &[u8],
        placed: bool,
    ) -> FsResult<u32> {
        if !self.writable() {
            return Err(Errno::EBADF);
        }
        if self.only_emptied && self.base.meta().size == 0 {
            // Emptying an empty file (`> out.log` again) changed nothing but its times, which
            // this write changes anyway: its bytes go at the end of the version opened, to be
            // added in place, so that readers of that version read on into them.
            self.pending = Pending::Clean;
        }
        self.changed();
        let append = self.appends() && !placed;
        if !append {
            if offset != self.next {
                self.sequential = false;
            }
            self.next = offset + data.len() as u64;
        }
        if !append && let Some(s) = self.staged_mut() {
            s.appends_from = None;
        }
        if !append && self.mode == Mode::Write && self.write_at_end(offset, data) {
            return Ok(data.len() as u32);
        }
        // Where an append lands: the end of what this handle sees (the working copy made
        // below, if any, holds exactly that).
        let end = if append { Some(self.size()?) } else { None };
        if end.is_some_and(|end| end != offset) {
            self.moved = true;
        }
        let len = data.len() as u64;
        if append {
            match &mut self.pending {
                Pending::Clean if data.len() <= APPEND_BUFFER_MAX => {
                    self.pending = Pending::Appended {
                        tail: data.to_vec(),
                        at: SystemTime::now(),
                    };
                    return Ok(data.len() as u32);
                }
                Pending::Appended { tail, at } if tail.len() + data.len() <= APPEND_BUFFER_MAX => {
                    tail.extend_from_slice(data);
                    *at = SystemTime::now();
                    return Ok(data.len() as u32);
                }
                _ => {}
            }
        }
        let first_staging = self.staged().is_none();
        let appends_from = (append && first_staging).then(|| self.committed_size());
        self.ensure_staged(store)?;
        let offset = end.unwrap_or(offset);
        self.seeded(offset, len, true)?;
        let s = self.staged_mut().expect("staged above");
        if let Some(from) = appends_from {
            // The working copy takes the committed bytes, then only appends.
            s.appends_from = Some(from);
        }
        if let Err(e) = s.copy.write_at(data, offset) {
            if let Some(seeding) = &s.seeding {
                seeding.write_failed(offset, len);
            }
            return Err(spoil(s, offset, len, e));
        }
        defined(s, offset, len);
        Ok(data.len() as u32)
    }

    /// A plain writer's write exactly at the end of its base (and of what it added there),
    /// with nothing else pending: the bytes wait in memory like appends, to be added to the
    /// base in place at the commit. False when it is not such a write.
    fn write_at_end(&mut self, offset: u64, data: &[u8]) -> bool {
        let end = self.committed_size() + self.tail().len() as u64;
        if offset != end || self.tail().len() + data.len() > APPEND_BUFFER_MAX {
            return false;
        }
        match &mut self.pending {
            Pending::Clean => {
                self.pending = Pending::Appended {
                    tail: data.to_vec(),
                    at: SystemTime::now(),
                };
                true
            }
            Pending::Appended { tail, at } => {
                tail.extend_from_slice(data);
                *at = SystemTime::now();
                true
            }
            Pending::Staged(_) => false,
        }
    }

    /// Sets the size of what this handle sees (in its working copy).
    pub fn truncate(&mut self, store: &dyn Store, size: u64) -> FsResult<()> {
        self.changed();
        // Starting over from nothing (`O_TRUNC`) keeps a writer sequential; a cut elsewhere
        // does not.
        self.sequential &= size == 0;
        self.next = size;
        if size == 0 && self.staged().is_none() {
            // Truncating to nothing: no need to copy the old content first.
            self.truncated(store.working_copy(&self.path)?);
            return Ok(());
        }
        self.ensure_staged(store)?;
        let s = self.staged_mut().expect("staged above");
        s.appends_from = None;
        if let Some(seeding) = s.seeding.take() {
            // Nothing beyond `size` is needed; nothing may be copied there after the cut.
            if let Err(e) = seeding.finish_up_to(size) {
                s.seeding = Some(seeding);
                return Err(e.into());
            }
        }
        s.copy.set_len(size)?;
        cut_spoiled(s, size);
        Ok(())
    }

    /// Takes the appends out of the working copy (see [`Staged::appends_from`]) back into
    /// memory, dropping the copy, so they can be appended to another version; false (nothing
    /// changed) when the copy holds other changes, or more than `most` appended bytes.
    pub fn take_back_appends(&mut self, most: u64) -> FsResult<bool> {
        let Some(s) = self.staged() else {
            return Ok(false);
        };
        let Some(from) = s.appends_from else {
            return Ok(false);
        };
        let len = s.copy.stat()?.size;
        if len < from || len - from > most || s.spoiled.is_some() {
            return Ok(false);
        }
        let mut tail = vec![0u8; (len - from) as usize];
        let mut done = 0;
        while done < tail.len() {
            let n = s.copy.read_at(&mut tail[done..], from + done as u64)?;
            if n == 0 {
                return Ok(false); // shorter than it said: keep the copy
            }
            done += n;
        }
        self.drop_changes();
        self.pending = Pending::Appended {
            tail,
            at: SystemTime::now(),
        };
        Ok(true)
    }

    /// `fallocate(2)` of `offset..offset + len` through this handle (see [`Allocation`]).
    /// Growing and zeroing change the working copy like writes; a reservation changes no
    /// content, and takes space only in a working copy and below the end of the file.
    pub fn allocate(
        &mut self,
        store: &dyn Store,
        how: Allocation,
        offset: u64,
        len: u64,
    ) -> FsResult<()> {
        if !self.writable() {
            return Err(Errno::EBADF);
        }
        self.changed();
        self.sequential = false;
        if let Some(s) = self.staged_mut() {
            s.appends_from = None;
        }
        let end = offset.checked_add(len).ok_or(Errno::EFBIG)?;
        let size = self.size()?;
        let grown = how.size_after(size, end);
        if grown > size {
            self.truncate(store, grown)?;
        }
        match how {
            Allocation::Zero { .. } if offset < size => {
                let len = end.min(size) - offset;
                self.ensure_staged(store)?;
                self.seeded(offset, len, true)?;
                let s = self.staged_mut().expect("staged above");
                if let Err(e) = s.copy.zero(offset, len) {
                    if let Some(seeding) = &s.seeding {
                        seeding.write_failed(offset, len);
                    }
                    return Err(spoil(s, offset, len, e));
                }
                defined(s, offset, len);
            }
            Allocation::Zero { .. } => {}
            // Space past the end (`FALLOC_FL_KEEP_SIZE`) is not reserved: it would be disk use
            // the size-based quota does not see.
            Allocation::Reserve { .. } if offset < grown => {
                if let Some(s) = self.staged() {
                    s.copy.reserve(offset, end.min(grown) - offset)?;
                }
            }
            Allocation::Reserve { .. } => {}
        }
        Ok(())
    }
}

/// Whether `store` commits only the changed ranges of a file of `size` bytes.
fn ranged(store: &dyn Store, size: u64) -> bool {
    store
        .capabilities()
        .ranged_commits_from
        .is_some_and(|min| size >= min)
}

/// Records that a change of `offset..offset + len` failed part way (see
/// [`Staged::spoiled`]). A write the disk refused as past its largest file (`EFBIG`) that
/// left the copy's end at or before its offset wrote nothing: it spoils nothing, as the
/// space's own size limits do not. Any other failure spoils, even one that wrote nothing:
/// the writer's output is then incomplete (a full disk), and must not replace the file.
fn spoil(s: &mut Staged, offset: u64, len: u64, e: std::io::Error) -> Errno {
    let errno = Errno::from(e);
    let too_far = errno == Errno(libc::EFBIG);
    let (from, to) = (offset, offset.saturating_add(len));
    let before = s.spoiled;
    s.spoiled = Some(match s.spoiled {
        Some(old) => Spoiled {
            from: old.from.min(from),
            to: old.to.max(to),
            errno: old.errno,
        },
        None => Spoiled { from, to, errno },
    });
    if too_far
        && let Ok(now) = s.copy.stat()
        && now.size <= from
    {
        s.spoiled = before;
    }
    errno
}

/// `offset..offset + len` of the working copy was written in full: a spoiled span it
/// covers, from either end, is defined again.
fn defined(s: &mut Staged, offset: u64, len: u64) {
    let Some(sp) = &mut s.spoiled else { return };
    let end = offset.saturating_add(len);
    if offset <= sp.from && end > sp.from {
        sp.from = end;
    } else if offset < sp.to && end >= sp.to {
        sp.to = offset;
    }
    if sp.from >= sp.to {
        s.spoiled = None;
    }
}

/// The working copy was cut to `size`: nothing past it is left of a failed change.
fn cut_spoiled(s: &mut Staged, size: u64) {
    s.spoiled = s.spoiled.and_then(|sp| {
        (size > sp.from).then_some(Spoiled {
            to: sp.to.min(size),
            ..sp
        })
    });
}

impl Drop for FileHandle {
    fn drop(&mut self) {
        if let Pending::Staged(s) = &self.pending
            && let Some(seeding) = &s.seeding
        {
            seeding.cancel();
        }
    }
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq)]
pub struct DirItem {
    pub name: OsString,
    pub kind: Kind,
    /// Its attributes as listed, when the store gave them.
    pub meta: Option<Meta>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mem::MemStore;

    fn enospc() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::ENOSPC)
    }

    /// A working copy of 16 KiB.
    fn staged() -> Staged {
        let store = MemStore::new();
        let copy = store.working_copy(Path::new("f")).unwrap();
        copy.write_at(&[7; 16384], 0).unwrap();
        Staged {
            copy,
            seeding: None,
            spoiled: None,
            appends_from: None,
        }
    }

    fn span(s: &Staged) -> Option<(u64, u64)> {
        s.spoiled.map(|sp| (sp.from, sp.to))
    }

    #[test]
    fn a_failed_span_is_defined_again_by_writes_covering_it_or_a_cut() {
        let mut s = staged();
        assert_eq!(spoil(&mut s, 100, 50, enospc()), Errno::ENOSPC);
        spoil(
            &mut s,
            120,
            50,
            std::io::Error::from_raw_os_error(libc::EIO),
        );
        assert_eq!(span(&s), Some((100, 170)));
        assert_eq!(
            s.spoiled.unwrap().errno,
            Errno::ENOSPC,
            "the first error stays"
        );
        defined(&mut s, 130, 10); // inside: still undefined on both sides
        assert_eq!(span(&s), Some((100, 170)));
        defined(&mut s, 90, 20); // covers the start
        assert_eq!(span(&s), Some((110, 170)));
        defined(&mut s, 160, 100); // covers the end
        assert_eq!(span(&s), Some((110, 160)));
        defined(&mut s, 110, 50);
        assert_eq!(span(&s), None);

        // A cut into the span shortens it; one at or before its start ends it.
        spoil(&mut s, 4096, 4096, enospc());
        cut_spoiled(&mut s, 9000);
        assert_eq!(span(&s), Some((4096, 8192)));
        cut_spoiled(&mut s, 6000);
        assert_eq!(span(&s), Some((4096, 6000)));
        cut_spoiled(&mut s, 4096);
        assert_eq!(span(&s), None);
    }

    /// A write refused past the copy's end (`EFBIG` far past it) wrote nothing: the copy is
    /// still whole and committed at close, as on a local disk.
    #[test]
    fn a_write_refused_past_the_end_spoils_nothing() {
        let mut s = staged();
        let efbig = std::io::Error::from_raw_os_error(libc::EFBIG);
        assert_eq!(spoil(&mut s, 1 << 50, 1, efbig), Errno(libc::EFBIG));
        assert_eq!(span(&s), None);
        // A full disk at the end spoils, though nothing was written: the output is incomplete.
        spoil(&mut s, 16384, 10, enospc());
        assert_eq!(span(&s), Some((16384, 16394)));
        let mut s = staged();
        // An earlier failure inside stays.
        spoil(&mut s, 100, 50, enospc());
        spoil(
            &mut s,
            1 << 50,
            1,
            std::io::Error::from_raw_os_error(libc::EFBIG),
        );
        assert_eq!(span(&s), Some((100, 150)));
    }
}
