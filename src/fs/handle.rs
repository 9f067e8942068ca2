//! Open files and directories. A file opened for writing works on a staged copy (created at
//! the first write, or at open with `O_TRUNC`), private to the handle or shared by read-write
//! opens; reads through it see its writes, and everybody else keeps seeing the committed
//! content until the copy is committed.
//! Appends (`O_APPEND`) first wait in memory, so they can be committed by adding them to the
//! committed file in place (see `store::append`) instead of copying it.

use std::ffi::OsString;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::SystemTime;

use nix::unistd::{Whence, lseek};

use super::closers::Users;
use super::error::{Errno, FsResult};
use super::inode::Ino;
use super::seed::{LAZY_SEED_MIN, Seeding};
use crate::store::{Content, Kind, Meta, Staged, Store};

/// Appended bytes kept in memory, at most: beyond that a working copy takes them over.
pub const APPEND_BUFFER_MAX: usize = 128 << 10;

/// What a `fallocate(2)` asks of an open file (the modes the kernel forwards to FUSE).
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

/// An open regular file.
pub struct FileHandle {
    pub ino: Ino,
    pub writable: bool,
    pub append: bool,
    /// Whether the kernel serves this handle without its page cache.
    pub direct_io: bool,
    /// The committed content as of open (or of this handle's last commit).
    pub committed: Option<Arc<dyn Content>>,
    /// The working copy, once this handle has started changing the file.
    pub staged: Option<Staged>,
    /// The copying of the committed content into a large working copy, while under way.
    pub seeding: Option<Arc<Seeding>>,
    /// Bytes appended after the committed content, while there is no working copy.
    pub appended: Vec<u8>,
    /// When `appended` last grew (the mtime the handle shows).
    pub appended_at: Option<SystemTime>,
    /// The working copy differs from what was last committed.
    pub dirty: bool,
    /// Where changes to the working copy failed part way (a write on a full disk): those
    /// bytes are undefined, so the copy is not committed (see `Fs::commit`) until later writes
    /// or a truncation define them again (as a database rolling back does).
    pub spoiled: Option<Spoiled>,
    /// Nobody else had the file open when this writer opened it: a large working copy is
    /// seeded on demand only, hoping to commit it as a patch (see `store::patch`).
    pub may_patch: bool,
    /// The kernel's cached pages of the file are not what this append handle sees: it moved on
    /// to a version others committed (see `Fs::follow_appends`), or the kernel, going by a
    /// size it cached before another commit, placed its appends elsewhere than at the end.
    pub moved: bool,
    /// Where this append handle's bytes begin in its working copy, while it has only appended
    /// since the copy was made: they can then be taken back out and appended to a newer
    /// version (see `Fs::commit`).
    pub appends_from: Option<u64>,
    /// The threads that opened the handle or changed the file through it.
    pub users: Users,
}

impl FileHandle {
    /// A handle open on `committed` that has not changed anything yet.
    pub fn new(
        ino: Ino,
        writable: bool,
        append: bool,
        direct_io: bool,
        committed: Option<Arc<dyn Content>>,
    ) -> FileHandle {
        FileHandle {
            ino,
            writable,
            append,
            direct_io,
            committed,
            staged: None,
            seeding: None,
            appended: Vec::new(),
            appended_at: None,
            dirty: false,
            spoiled: None,
            may_patch: false,
            moved: false,
            appends_from: None,
            users: Users::default(),
        }
    }

    /// Creates the working copy if there is none yet, seeded from the committed content and
    /// the appends waiting in memory.
    pub fn ensure_staged(&mut self, store: &dyn Store) -> FsResult<&Staged> {
        if self.staged.is_none() {
            self.stage(store)?;
            if !self.appended.is_empty() {
                let at = self.committed_size()?;
                let written = self
                    .seeded(at, self.appended.len() as u64, true)
                    .and_then(|()| {
                        let staged = self.staged.as_ref().expect("just staged");
                        Ok(staged.file.write_all_at(&self.appended, at)?)
                    });
                if let Err(e) = written {
                    // Back to the appends in memory; nothing is lost.
                    if let Some(seeding) = self.seeding.take() {
                        seeding.cancel();
                    }
                    if let Some(staged) = self.staged.take() {
                        store.discard(staged);
                    }
                    return Err(e);
                }
                self.appended = Vec::new();
                self.appended_at = None;
            }
        }
        Ok(self.staged.as_ref().expect("just staged"))
    }

    /// Creates the working copy, seeded from the committed content.
    fn stage(&mut self, store: &dyn Store) -> FsResult<()> {
        let size = self.committed_size()?;
        match &self.committed {
            Some(content) if size >= LAZY_SEED_MIN => {
                // A sparse copy of the right size, filled in chunks (see `seed`).
                let staged = store.stage(None)?;
                let prepared = staged
                    .file
                    .set_len(size)
                    .and_then(|()| staged.file.try_clone());
                match prepared {
                    Ok(dest) => {
                        let on_demand = self.may_patch;
                        self.seeding = Some(Seeding::start(content.clone(), dest, size, on_demand));
                        self.staged = Some(staged);
                    }
                    Err(e) => {
                        store.discard(staged);
                        return Err(e.into());
                    }
                }
            }
            seed => self.staged = Some(store.stage(seed.as_deref())?),
        }
        Ok(())
    }

    /// Completes the seeding of the working copy, if under way (before a commit).
    pub fn finish_seeding(&mut self) -> FsResult<()> {
        if let Some(seeding) = &self.seeding {
            seeding.finish()?;
        }
        self.seeding = None;
        Ok(())
    }

    /// The ranges to patch into the committed file, when the working copy may be committed
    /// as a patch: seeded on demand, and never cut (a truncation completes the seeding).
    pub fn patch_ranges(&self) -> Option<Vec<(u64, u64)>> {
        self.seeding
            .as_ref()
            .filter(|s| s.on_demand())
            .map(|s| s.written())
    }

    /// Makes the working copy ready to be read or written at `offset..offset + len`.
    fn seeded(&self, offset: u64, len: u64, write: bool) -> FsResult<()> {
        if let Some(seeding) = &self.seeding {
            seeding.prepare(offset, len, write)?;
        }
        Ok(())
    }

    /// The size this handle sees now.
    pub fn size(&self) -> FsResult<u64> {
        match &self.staged {
            Some(staged) => Ok(staged.file.metadata()?.len()),
            None => Ok(self.committed_size()? + self.appended.len() as u64),
        }
    }

    /// Attributes of what this handle sees, while it has uncommitted changes.
    pub fn pending_meta(&self) -> FsResult<Option<Meta>> {
        if let Some(staged) = &self.staged {
            // The working copy gives the size and times; mode, owner and the rest stay the
            // file's (the copy itself is a private 0600 file in the staging area).
            let copy = staged.meta()?;
            let mut meta = match &self.committed {
                Some(content) => content.meta()?,
                None => copy.clone(),
            };
            meta.size = copy.size;
            meta.blocks = copy.blocks;
            meta.mtime = copy.mtime;
            meta.ctime = copy.ctime;
            return Ok(Some(meta));
        }
        let (Some(content), Some(at)) = (&self.committed, self.appended_at) else {
            return Ok(None);
        };
        let mut meta = content.meta()?;
        meta.size += self.appended.len() as u64;
        meta.blocks = meta.size.div_ceil(512);
        meta.mtime = at;
        meta.ctime = at;
        Ok(Some(meta))
    }

    /// The size of the committed content this handle started from.
    pub fn committed_size(&self) -> FsResult<u64> {
        match &self.committed {
            Some(content) => Ok(content.meta()?.size),
            None => Ok(0),
        }
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
        let (file, known) = match (&self.staged, &self.committed) {
            (Some(_), _) if self.seeding.is_some() => (None, 0),
            (Some(staged), _) => (Some(&staged.file), size),
            (None, Some(content)) => (content.local_file(), self.committed_size()?.min(size)),
            (None, None) => (None, 0),
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
        let committed_size = self.committed_size()?;
        while done < size {
            let at = offset + done as u64;
            let n = match (&self.staged, &self.committed) {
                (Some(staged), _) => staged.file.read_at(&mut buf[done..], at)?,
                // A reader follows whole appends committed after it opened; a writer's view
                // of the committed part ends where its own appends begin.
                (None, Some(content)) if !self.writable => {
                    content.read_appended_at(&mut buf[done..], at)?
                }
                (None, _) if at >= committed_size => {
                    let from = (at - committed_size).min(self.appended.len() as u64) as usize;
                    let n = (size - done).min(self.appended.len() - from);
                    buf[done..done + n].copy_from_slice(&self.appended[from..from + n]);
                    n
                }
                (None, Some(content)) => content.read_at(&mut buf[done..], at)?,
                (None, None) => 0,
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
        if !self.writable {
            return Err(Errno::EBADF);
        }
        let append = self.append && !placed;
        if !append {
            self.appends_from = None;
        }
        // Where an append lands: the end of what this handle sees (the working copy made
        // below, if any, holds exactly that).
        let end = if append { Some(self.size()?) } else { None };
        if end.is_some_and(|end| end != offset) {
            self.moved = true;
        }
        if append && self.staged.is_none() && self.appended.len() + data.len() <= APPEND_BUFFER_MAX
        {
            self.appended.extend_from_slice(data);
            self.appended_at = Some(SystemTime::now());
            self.dirty = true;
            return Ok(data.len() as u32);
        }
        if append && self.staged.is_none() {
            // The working copy takes the committed bytes, then only appends.
            self.appends_from = Some(self.committed_size()?);
        }
        self.ensure_staged(store)?;
        let offset = end.unwrap_or(offset);
        self.seeded(offset, data.len() as u64, true)?;
        let staged = self.staged.as_ref().expect("staged above");
        let len = data.len() as u64;
        if let Err(e) = staged.file.write_all_at(data, offset) {
            if let Some(seeding) = &self.seeding {
                seeding.write_failed(offset, len);
            }
            return Err(self.spoil(offset, len, e));
        }
        self.dirty = true;
        self.defined(offset, len);
        Ok(data.len() as u32)
    }

    /// Sets the working copy's length.
    pub fn truncate(&mut self, store: &dyn Store, size: u64) -> FsResult<()> {
        self.appends_from = None;
        if size == 0 && self.staged.is_none() {
            // Truncating to nothing (`open(O_TRUNC)`): no need to copy the old content first.
            self.staged = Some(store.stage(None)?);
            self.appended = Vec::new();
            self.appended_at = None;
        }
        self.ensure_staged(store)?;
        if let Some(seeding) = self.seeding.take() {
            // Nothing beyond `size` is needed; nothing may be copied there after the cut.
            if let Err(e) = seeding.finish_up_to(size) {
                self.seeding = Some(seeding);
                return Err(e.into());
            }
        }
        let staged = self.staged.as_ref().expect("staged above");
        staged.file.set_len(size)?;
        self.dirty = true;
        self.cut_spoiled(size);
        Ok(())
    }

    /// The working copy was cut to `size`: nothing past it is left of a failed change.
    fn cut_spoiled(&mut self, size: u64) {
        self.spoiled = self.spoiled.and_then(|s| {
            (size > s.from).then_some(Spoiled {
                to: s.to.min(size),
                ..s
            })
        });
    }

    /// Takes the appends out of the working copy (see `appends_from`) back into memory,
    /// dropping the copy, so they can be appended to another version; false (nothing changed)
    /// when the copy holds other changes, or more than `most` appended bytes.
    pub fn take_back_appends(&mut self, store: &dyn Store, most: u64) -> FsResult<bool> {
        let (Some(from), Some(staged)) = (self.appends_from, &self.staged) else {
            return Ok(false);
        };
        let len = staged.file.metadata()?.len();
        if len < from || len - from > most || self.spoiled.is_some() {
            return Ok(false);
        }
        let mut tail = vec![0u8; (len - from) as usize];
        staged.file.read_exact_at(&mut tail, from)?;
        if let Some(seeding) = self.seeding.take() {
            seeding.cancel();
        }
        if let Some(staged) = self.staged.take() {
            store.discard(staged);
        }
        tail.extend_from_slice(&self.appended);
        self.appended = tail;
        self.appended_at = Some(SystemTime::now());
        self.appends_from = None;
        Ok(true)
    }

    /// Records that a change of `offset..offset + len` failed part way (see `spoiled`).
    fn spoil(&mut self, offset: u64, len: u64, e: std::io::Error) -> Errno {
        let errno = Errno::from(e);
        let (from, to) = (offset, offset.saturating_add(len));
        self.spoiled = Some(match self.spoiled {
            Some(s) => Spoiled {
                from: s.from.min(from),
                to: s.to.max(to),
                errno: s.errno,
            },
            None => Spoiled { from, to, errno },
        });
        self.dirty = true;
        errno
    }

    /// `offset..offset + len` of the working copy was written in full: a spoiled span it
    /// covers, from either end, is defined again.
    fn defined(&mut self, offset: u64, len: u64) {
        let Some(s) = &mut self.spoiled else { return };
        let end = offset.saturating_add(len);
        if offset <= s.from && end > s.from {
            s.from = end;
        } else if offset < s.to && end >= s.to {
            s.to = offset;
        }
        if s.from >= s.to {
            self.spoiled = None;
        }
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
        if !self.writable {
            return Err(Errno::EBADF);
        }
        self.appends_from = None;
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
                let staged = self.staged.as_ref().expect("staged above");
                if let Err(e) = staged.zero(offset, len) {
                    if let Some(seeding) = &self.seeding {
                        seeding.write_failed(offset, len);
                    }
                    return Err(self.spoil(offset, len, e));
                }
                self.dirty = true;
                self.defined(offset, len);
            }
            Allocation::Zero { .. } => {}
            // Space past the end (`FALLOC_FL_KEEP_SIZE`) is not reserved: it would be disk use
            // the size-based quota does not see.
            Allocation::Reserve { .. } if offset < grown => {
                if let Some(staged) = &self.staged {
                    staged.reserve(offset, end.min(grown) - offset)?;
                }
            }
            Allocation::Reserve { .. } => {}
        }
        Ok(())
    }
}

impl Drop for FileHandle {
    fn drop(&mut self) {
        if let Some(seeding) = &self.seeding {
            seeding.cancel();
        }
    }
}

/// One entry of a directory listing.
#[derive(Clone, Debug)]
pub struct DirItem {
    pub name: OsString,
    pub kind: Kind,
}

/// An open directory: a snapshot of its entries, refreshed when reading restarts at 0.
pub struct DirHandle {
    pub ino: Ino,
    pub entries: Vec<DirItem>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enospc() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::ENOSPC)
    }

    fn span(h: &FileHandle) -> Option<(u64, u64)> {
        h.spoiled.map(|s| (s.from, s.to))
    }

    #[test]
    fn a_failed_span_is_defined_again_by_writes_covering_it_or_a_cut() {
        let mut h = FileHandle::new(1, true, false, false, None);
        assert_eq!(h.spoil(100, 50, enospc()), Errno::ENOSPC);
        h.spoil(120, 50, std::io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(span(&h), Some((100, 170)));
        assert_eq!(
            h.spoiled.unwrap().errno,
            Errno::ENOSPC,
            "the first error stays"
        );
        h.defined(130, 10); // inside: still undefined on both sides
        assert_eq!(span(&h), Some((100, 170)));
        h.defined(90, 20); // covers the start
        assert_eq!(span(&h), Some((110, 170)));
        h.defined(160, 100); // covers the end
        assert_eq!(span(&h), Some((110, 160)));
        h.defined(110, 50);
        assert_eq!(span(&h), None);

        // A cut into the span shortens it; one at or before its start ends it.
        h.spoil(4096, 4096, enospc());
        h.cut_spoiled(9000);
        assert_eq!(span(&h), Some((4096, 8192)));
        h.cut_spoiled(6000);
        assert_eq!(span(&h), Some((4096, 6000)));
        h.cut_spoiled(4096);
        assert_eq!(span(&h), None);
    }
}
