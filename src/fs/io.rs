//! Reading and writing open files, and allocating their space.

use std::path::Path;

use super::handle::{Allocation, FileHandle, Mode};
use super::{Errno, Fs, FsResult, Tid, lock, read_lock, seed};
use crate::space::quota::Quota;

impl Fs {
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let handle = self.file(fh)?;
        let h = lock(&handle);
        h.read(offset, size as usize)
    }

    /// `lseek` with `SEEK_DATA` or `SEEK_HOLE` (the kernel answers the other kinds itself).
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<u64> {
        let hole = match whence {
            libc::SEEK_DATA => false,
            libc::SEEK_HOLE => true,
            _ => return Err(Errno::EINVAL),
        };
        let offset = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
        let handle = self.file(fh)?;
        let h = lock(&handle);
        h.seek(offset, hole)
    }

    /// `write(2)` through `fh` by thread `by`: at `offset`, or at the end for an `O_APPEND`
    /// handle.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], by: Tid) -> FsResult<u32> {
        self.write_to(fh, offset, data, Some(by))
    }

    /// A write-back of cached pages (a shared mapping) through `fh`: always at `offset`, even
    /// for an `O_APPEND` handle.
    pub fn write_back(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.write_to(fh, offset, data, None)
    }

    /// A write by thread `by`, or a write-back (`None`: the kernel's, at its offset).
    fn write_to(&self, fh: u64, offset: u64, data: &[u8], by: Option<Tid>) -> FsResult<u32> {
        let placed = by.is_none();
        let handle = self.file(fh)?;
        let mut h = lock(&handle);
        self.sealed()?;
        if let Some(by) = by {
            h.users.add(by);
        }
        let Some(q) = self.space.quota() else {
            return h.write(self.store.as_ref(), offset, data, placed);
        };
        let start = if h.appends() && !placed {
            h.size()?
        } else {
            offset
        };
        let len = q.fit_write(start, data.len())?;
        self.check_growth(q, &h, start + len as u64)?;
        h.write(self.store.as_ref(), offset, &data[..len], placed)
    }

    /// `copy_file_range(2)` by thread `by`: copies up to `len` bytes of what `fh_in` sees at
    /// `off_in` into `fh_out` at `off_out`, as a read and a write through the two handles would
    /// (the kernel has checked modes, `O_APPEND` and overlaps), without the data crossing into
    /// the kernel and back. Returns the bytes copied: fewer at the source's end, at a size
    /// limit, or when an error cuts a long copy short after some bytes went in.
    pub fn copy_file_range(
        &self,
        (fh_in, off_in): (u64, u64),
        (fh_out, off_out): (u64, u64),
        len: u64,
        by: Tid,
    ) -> FsResult<u32> {
        /// Bytes moved per step, and at most per call (callers loop on short copies).
        const CHUNK: u64 = 1 << 20;
        const MOST: u64 = 64 << 20;
        let len = len.min(MOST);
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(CHUNK) as u32;
            let step = self
                .read(fh_in, off_in + done, want)
                .and_then(|data| Ok((data.len(), self.write(fh_out, off_out + done, &data, by)?)));
            match step {
                Ok((read, written)) => {
                    done += u64::from(written);
                    if written as usize != read || read < want as usize {
                        break; // the source's end, or a size limit
                    }
                }
                Err(e) if done == 0 => return Err(e),
                Err(_) => break, // report what went in; the caller's next call gets the error
            }
        }
        Ok(done as u32)
    }

    /// `fallocate(2)` through `fh` by thread `by`, with the kernel's `mode` flags.
    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32, by: Tid) -> FsResult<()> {
        let how = Allocation::from_mode(mode)?;
        let handle = self.file(fh)?;
        let mut h = lock(&handle);
        if !h.writable() {
            return Err(Errno::EBADF);
        }
        self.sealed()?;
        h.users.add(by);
        if let Some(q) = self.space.quota() {
            let grown = how.size_after(h.size()?, offset.saturating_add(len));
            q.check_size(grown)?;
            self.check_growth(q, &h, grown)?;
        }
        h.allocate(self.store.as_ref(), how, offset, len)
    }

    /// Checks that `h` growing to `size` bytes stays within the byte quota. Growth counts from
    /// the version the handle opened, but a handle that does not append replaces, when it
    /// commits, the file as it is then, which another writer's close may have replaced
    /// meanwhile (two writers of one file): refused, the growth is checked again from the
    /// file's size now (one `stat`, only then).
    pub(super) fn check_growth(&self, q: &Quota, h: &FileHandle, size: u64) -> FsResult<()> {
        match q.check_growth(h.committed_size(), size) {
            Err(Errno::EDQUOT) if !h.appends() => {
                let path = read_lock(&self.table).path(h.ino);
                match path.map(|p| self.size_now(&p)).transpose()?.flatten() {
                    Some(now) if now != h.committed_size() => q.check_growth(now, size),
                    _ => Err(Errno::EDQUOT),
                }
            }
            checked => checked,
        }
    }

    /// The committed size of the file at `path` now (`None`: there is none).
    pub(super) fn size_now(&self, path: &Path) -> FsResult<Option<u64>> {
        match self.store.stat(path) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(e) if e.raw_os_error() == libc::ENOENT => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether closing `fh` may take long: a durable commit, or the commit of a large working
    /// copy (written as a patch, or completed by copying the rest).
    pub fn commit_may_block(&self, fh: u64) -> bool {
        if self.options.sync_on_close {
            return true;
        }
        let Ok(handle) = self.file(fh) else {
            return false;
        };
        let h = lock(&handle);
        h.staged().is_some_and(|s| s.seeding.is_some())
    }

    /// Whether a write through `fh` would first copy a large committed file into a working copy.
    pub fn write_may_copy(&self, fh: u64) -> bool {
        const LARGE: u64 = 1 << 20;
        let Ok(handle) = self.file(fh) else {
            return false;
        };
        let h = lock(&handle);
        // Larger files are seeded lazily (see `seed`): their first write copies a block or two.
        // Appends wait in memory (up to `APPEND_BUFFER_MAX`, past which this misses one copy).
        let size = h.committed_size();
        h.mode() == Mode::Write
            && h.staged().is_none()
            && size > LARGE
            && size < seed::LAZY_SEED_MIN
    }
}
