//! Directory listings: what the grant shows of a directory, with attributes for
//! `readdirplus`.

use std::path::Path;
use std::sync::atomic::Ordering;

use super::handle::{DirHandle, DirItem};
use super::{Attr, Errno, Fs, FsResult, Ino, Listed, ROOT, lock, read_lock};
use crate::store::{Kind, Meta};

/// Entries taken from a listing at a time (a reply of the kernel's holds a few dozen).
const BATCH: usize = 128;

impl Fs {
    pub fn opendir(&self, ino: Ino) -> FsResult<u64> {
        self.touch();
        let path = read_lock(&self.table).path(ino);
        let entries = match path {
            Some(path) => {
                self.allow_traverse("opendir", &path)?;
                self.list(&path)?
            }
            // Removed while a process is in it (`ls` in a removed working directory): empty,
            // as on a local disk.
            None if read_lock(&self.table).removed_dir(ino).is_some() => Vec::new(),
            None => return Err(Errno::ENOENT),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.dirs).insert(
            fh,
            DirHandle {
                ino,
                entries,
                read: false,
            },
        );
        Ok(fh)
    }

    /// The entries of directory `path` that the grant shows, sorted by name.
    pub(super) fn list(&self, path: &Path) -> FsResult<Vec<DirItem>> {
        let mut entries: Vec<DirItem> = self
            .store
            .list(path)?
            .into_iter()
            .filter(|e| self.shows(path, &e.name))
            .map(|e| DirItem {
                name: e.name,
                kind: e.kind,
                meta: e.meta,
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Entries of an open directory from `offset` on (`.` and `..` first), handed to `emit`
    /// until it returns false (the kernel's reply buffer is full).
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        mut emit: impl FnMut(&Listed) -> bool,
    ) -> FsResult<()> {
        let mut offset = offset;
        loop {
            let batch = self.listing(fh, offset, BATCH)?;
            for (entry, _) in &batch {
                if !emit(entry) {
                    return Ok(());
                }
            }
            match batch.last() {
                Some((last, _)) if batch.len() == BATCH => offset = last.next,
                _ => return Ok(()),
            }
        }
    }

    /// Up to `most` of `readdir`'s entries from `offset` on, with the attributes the store
    /// listed them with (if it did). Taken a batch at a time, so that a reply costs what it
    /// holds, however large the directory.
    fn listing(&self, fh: u64, offset: u64, most: usize) -> FsResult<Vec<(Listed, Option<Meta>)>> {
        let mut dirs = lock(&self.dirs);
        let dir = dirs.get_mut(&fh).ok_or(Errno::EBADF)?;
        if offset == 0 {
            if dir.read {
                // rewinddir(): show the directory as it is now.
                dir.entries = self.list(&self.path(dir.ino)?)?;
            }
            dir.read = true;
        }
        let table = read_lock(&self.table);
        let dots = dot_entries();
        let items = dots.iter().chain(dir.entries.iter());
        let mut out = Vec::with_capacity(most);
        for (i, item) in items.enumerate().skip(offset as usize).take(most) {
            // Entries the kernel has not looked up yet have no inode number: readdir shows a
            // placeholder (the kernel looks the name up before using it).
            let ino = match i {
                0 => dir.ino,
                1 => table.parent(dir.ino).unwrap_or(ROOT),
                _ => table.child(dir.ino, &item.name).unwrap_or(u64::MAX),
            };
            out.push((
                Listed {
                    ino,
                    next: i as u64 + 1,
                    kind: item.kind,
                    name: item.name.clone(),
                },
                item.meta.clone(),
            ));
        }
        Ok(out)
    }

    /// `readdirplus`: like `readdir`, with attributes; every entry handed to `emit` counts as a
    /// lookup. `emit` returns false when the reply buffer is full (that entry is not counted).
    pub fn readdirplus(
        &self,
        fh: u64,
        offset: u64,
        mut emit: impl FnMut(&Listed, &Attr) -> bool,
    ) -> FsResult<()> {
        let dir_ino = lock(&self.dirs).get(&fh).ok_or(Errno::EBADF)?.ino;
        let dir_path = self.path(dir_ino)?;
        let mut offset = offset;
        loop {
            let batch = self.listing(fh, offset, BATCH)?;
            let full = batch.len() == BATCH;
            if let Some((last, _)) = batch.last() {
                offset = last.next;
            }
            if !self.emit_plus(dir_ino, &dir_path, batch, &mut emit) || !full {
                return Ok(());
            }
        }
    }

    /// Emits a batch of `readdirplus` entries of the directory `dir_ino` at `dir_path`;
    /// false once `emit` is full.
    fn emit_plus(
        &self,
        dir_ino: Ino,
        dir_path: &Path,
        batch: Vec<(Listed, Option<Meta>)>,
        emit: &mut impl FnMut(&Listed, &Attr) -> bool,
    ) -> bool {
        for (entry, listed_meta) in batch {
            let dot = entry.name == "." || entry.name == "..";
            let attr = if dot {
                let ino = if entry.name == "." {
                    dir_ino
                } else {
                    entry.ino
                };
                let path = if entry.name == "." {
                    dir_path.to_path_buf()
                } else {
                    dir_path.parent().map(Path::to_path_buf).unwrap_or_default()
                };
                let Ok(meta) = self.store.stat(&path) else {
                    continue;
                };
                Attr::new(ino, &meta)
            } else {
                let meta = match listed_meta {
                    Some(meta) => meta,
                    None => match self.store.stat(&dir_path.join(&entry.name)) {
                        Ok(meta) => meta,
                        Err(_) => continue, // removed since the listing was taken
                    },
                };
                self.remember(dir_ino, &entry.name, &meta)
            };
            let listed = Listed {
                ino: attr.ino,
                ..entry
            };
            if !emit(&listed, &attr) {
                if !dot {
                    self.forget(attr.ino, 1);
                }
                return false;
            }
        }
        true
    }

    /// `fsync` of a directory: its entries are durable on return.
    pub fn fsyncdir(&self, ino: Ino) -> FsResult<()> {
        let path = self.path(ino)?;
        self.allow_traverse("fsyncdir", &path)?;
        Ok(self.store.sync(&path)?)
    }

    pub fn releasedir(&self, fh: u64) {
        lock(&self.dirs).remove(&fh);
    }
}

/// The `.` and `..` entries of a directory listing.
fn dot_entries() -> [DirItem; 2] {
    [
        DirItem {
            name: ".".into(),
            kind: Kind::Dir,
            meta: None,
        },
        DirItem {
            name: "..".into(),
            kind: Kind::Dir,
            meta: None,
        },
    ]
}
