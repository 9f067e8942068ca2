//! Directory listings: what the grant shows of a directory, with attributes for
//! `readdirplus`.
//!
//! An open directory reads from a listing of it taken at `opendir`, and again when reading
//! restarts at offset 0 after it was read (`rewinddir`). The offset of an entry is its place in
//! that listing (`.` and `..`, then the entries sorted by name), and the listing does not change
//! under a handle: entries created or removed while it is read neither shift nor repeat the
//! others (`rm -rf` removes what it has read and misses nothing), a `seekdir` to a `telldir`
//! offset goes back to the same entry, and what was created after the listing was taken shows
//! at the next rewind. `readdirplus` gives each entry the attributes it was listed with (or, if
//! the store lists none, asks for them).
//!
//! Memory per handle does not grow with the directory. A listing is immutable and shared
//! ([`Listing`]): a handle whose listing finds the same entries (names, kinds, listed
//! attributes) as the one last taken of that directory and still held shares it, so any number
//! of handles of an unchanged directory cost one listing. The listings the handles of a mount
//! hold are counted and kept within [`LISTINGS_BUDGET`] bytes between them, and with them
//! those of every mount sharing the count (`FsOptions::listings_held`: all mounts of a
//! process share one, so a daemon holds at most the budget whatever its mounts): a handle whose
//! listing does not fit (only when many large directories are open at once, or a large one
//! changes between opens) holds a window of at most [`WINDOW`] entries of it instead, numbered
//! from the offset it reads at; past the window it lists the directory again and goes on after
//! the window's last name. Invariant: a handle holds a share of a counted listing or at most
//! `WINDOW` entries, and the counted listings of the mounts sharing a count take at most the
//! budget. A window keeps
//! what POSIX promises (an entry there throughout the reading is read once; one created or
//! removed meanwhile may or may not show) but not the snapshot: an entry created after
//! `opendir` shows if its name comes after the window, and a `seekdir` outside the window goes
//! to that place of a new listing.
//!
//! Each listing is taken whole from the store (it has no paged listing) and dropped at the end
//! of the request when it is shared or windowed: a request costs one listing while it runs. No
//! lock is held while the store lists; the handles' lock is never taken under the listings'
//! lock or the other way round.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use super::handle::DirItem;
use super::{Attr, Errno, Fs, FsResult, Ino, Listed, ROOT, lock, read_lock};
use crate::store::{Kind, Meta};

/// Entries taken from a listing at a time (a reply of the kernel's holds a few dozen).
const BATCH: usize = 128;

/// Bytes that the listings held by the open directories of the mounts sharing a count (a
/// process's) may take between them (a directory of 100,000 entries with long names takes
/// about 40 MB).
pub const LISTINGS_BUDGET: usize = 256 << 20;

/// Entries held by a handle whose listing is over the budget.
pub const WINDOW: usize = 1024;

/// A directory's entries as listed once, sorted by name; shared by the handles that read it.
#[derive(Debug)]
pub struct Listing {
    items: Vec<DirItem>,
    /// What it takes of the budget, counted in `held` while it lives.
    cost: usize,
    held: Arc<AtomicUsize>,
}

impl Drop for Listing {
    fn drop(&mut self) {
        self.held.fetch_sub(self.cost, Ordering::Relaxed);
    }
}

/// The bytes `items` take in a listing (names and entries; attributes are counted by their
/// fixed size).
fn cost(items: &[DirItem]) -> usize {
    std::mem::size_of::<Listing>()
        + items
            .iter()
            .map(|i| std::mem::size_of::<DirItem>() + i.name.len())
            .sum::<usize>()
}

/// The listings of one mount's open directories: the last one taken of each directory (to be
/// shared while it is held), and the count of bytes held (by these, and by the listings of
/// the other mounts sharing the count).
#[derive(Debug)]
pub struct Listings {
    last: HashMap<PathBuf, Weak<Listing>>,
    /// Size of `last` at which entries no longer held are dropped from it.
    prune_at: usize,
    held: Arc<AtomicUsize>,
    budget: usize,
}

impl Listings {
    /// No listings yet, counted in `held`.
    pub fn counted_in(held: Arc<AtomicUsize>) -> Listings {
        Listings {
            last: HashMap::new(),
            prune_at: 64,
            held,
            budget: LISTINGS_BUDGET,
        }
    }

    /// The last listing taken of `dir`, if it is still held.
    fn last(&self, dir: &Path) -> Option<Arc<Listing>> {
        self.last.get(dir).and_then(Weak::upgrade)
    }

    /// `fresh`, a listing of `dir` just taken, made the last one of `dir` if it fits in the
    /// budget; `fresh` back if not.
    fn add(&mut self, dir: &Path, fresh: Vec<DirItem>) -> Result<Arc<Listing>, Vec<DirItem>> {
        let cost = cost(&fresh);
        // One step, since other mounts' listings are counted in `held` too, under their locks.
        let budget = self.budget;
        let taken = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(cost).filter(|&total| total <= budget)
            });
        if taken.is_err() {
            return Err(fresh);
        }
        let listing = Arc::new(Listing {
            items: fresh,
            cost,
            held: self.held.clone(),
        });
        if self.last.len() >= self.prune_at {
            self.last.retain(|_, l| l.strong_count() > 0);
            self.prune_at = (self.last.len() * 2).max(64);
        }
        self.last
            .insert(dir.to_path_buf(), Arc::downgrade(&listing));
        Ok(listing)
    }
}

/// What an open directory holds of its listing.
#[derive(Debug)]
enum Entries {
    /// All of it, shared.
    Shared(Arc<Listing>),
    /// The listing's entries from offset `start` on, at most `WINDOW` of them; `end`: the
    /// listing has no more.
    Window {
        start: u64,
        items: Vec<DirItem>,
        end: bool,
    },
}

impl Entries {
    /// The entry at offset `i` (2 and on: `.` and `..` come first), if held.
    fn get(&self, i: u64) -> Option<&DirItem> {
        match self {
            Entries::Shared(listing) => listing.items.get(usize::try_from(i - 2).ok()?),
            Entries::Window { start, items, .. } => {
                items.get(usize::try_from(i.checked_sub(*start)?).ok()?)
            }
        }
    }

    /// Whether a reading at offset `i` finds what it needs here: the entry at `i`, or the end
    /// of the listing before it.
    fn covers(&self, i: u64) -> bool {
        match self {
            Entries::Shared(_) => true,
            Entries::Window { start, items, end } => {
                i >= *start && (*end || i < *start + items.len() as u64)
            }
        }
    }

    /// The last name of this window if a reading at offset `i` goes on just past it.
    fn after(&self, i: u64) -> Option<OsString> {
        match self {
            Entries::Window { start, items, .. } if i == *start + items.len() as u64 => {
                items.last().map(|last| last.name.clone())
            }
            _ => None,
        }
    }
}

/// A window of `fresh` (a listing just taken) for a reading at offset `i`: from the first name
/// past `after` (the end of the window read before) if given, else from place `i` of `fresh`.
fn window_at(i: u64, after: Option<OsString>, fresh: Vec<DirItem>) -> Entries {
    let from = match after {
        Some(last) => fresh.partition_point(|e| e.name <= last),
        None => usize::try_from(i - 2)
            .unwrap_or(usize::MAX)
            .min(fresh.len()),
    };
    window(i, fresh, from)
}

/// A window of `fresh` from its entry `from` on, read at offset `start`.
fn window(start: u64, mut fresh: Vec<DirItem>, from: usize) -> Entries {
    let end = fresh.len() - from <= WINDOW;
    fresh.truncate(from + WINDOW.min(fresh.len() - from));
    fresh.drain(..from);
    fresh.shrink_to_fit();
    Entries::Window {
        start,
        items: fresh,
        end,
    }
}

/// An open directory.
#[derive(Debug)]
pub struct DirHandle {
    ino: Ino,
    entries: Entries,
    /// Reading started at 0 since the listing was taken.
    read: bool,
}

impl Fs {
    pub fn opendir(&self, ino: Ino) -> FsResult<u64> {
        self.touch();
        let path = read_lock(&self.table).path(ino);
        let entries = match path {
            Some(path) => {
                self.allow_traverse("opendir", &path)?;
                let fresh = self.list(&path)?;
                self.hold(&path, fresh)
            }
            // Removed while a process is in it (`ls` in a removed working directory): empty,
            // as on a local disk.
            None if read_lock(&self.table).removed_dir(ino).is_some() => Entries::Window {
                start: 2,
                items: Vec::new(),
                end: true,
            },
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

    /// What a handle reading from the start holds of `fresh`, a listing of `path` just
    /// taken: a share of the last listing of `path` if that is still held and the same, else
    /// `fresh` as the new last listing if it fits in the budget, else its first window.
    fn hold(&self, path: &Path, fresh: Vec<DirItem>) -> Entries {
        // Compared (and `fresh` dropped) with no lock held.
        let last = lock(&self.listings).last(path);
        if let Some(last) = last
            && last.items == fresh
        {
            return Entries::Shared(last);
        }
        let added = lock(&self.listings).add(path, fresh);
        match added {
            Ok(listing) => Entries::Shared(listing),
            Err(fresh) => {
                log::debug!(
                    "listing of {path:?} ({} entries) over the budget of open directories: \
                     read a window at a time",
                    fresh.len()
                );
                window(2, fresh, 0)
            }
        }
    }

    /// The bytes of listings the open directories of this mount hold.
    #[cfg(test)]
    pub(super) fn listings_held(&self) -> usize {
        lock(&self.listings).held.load(Ordering::Relaxed)
    }

    /// Sets the bytes of listings the open directories may hold.
    #[cfg(test)]
    pub(super) fn set_listings_budget(&self, bytes: usize) {
        lock(&self.listings).budget = bytes;
    }

    /// The listing open directory `fh` shares, if it holds all of one.
    #[cfg(test)]
    pub(super) fn dir_listing(&self, fh: u64) -> Option<Arc<Listing>> {
        match &lock(&self.dirs).get(&fh)?.entries {
            Entries::Shared(listing) => Some(listing.clone()),
            Entries::Window { .. } => None,
        }
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
    /// holds, however large the directory; a batch ends at the end of a window.
    fn listing(&self, fh: u64, offset: u64, most: usize) -> FsResult<Vec<(Listed, Option<Meta>)>> {
        let (ino, refresh) = {
            let mut dirs = lock(&self.dirs);
            let dir = dirs.get_mut(&fh).ok_or(Errno::EBADF)?;
            // rewinddir(): show the directory as it is now.
            let rewind = offset == 0 && std::mem::replace(&mut dir.read, true);
            (dir.ino, rewind || !dir.entries.covers(offset.max(2)))
        };
        if refresh {
            // Listed with no lock held; a handle reading at 0 takes what a new one would.
            let path = self.path(ino)?;
            let fresh = self.list(&path)?;
            let entries = if offset == 0 {
                self.hold(&path, fresh)
            } else {
                let after = lock(&self.dirs)
                    .get(&fh)
                    .ok_or(Errno::EBADF)?
                    .entries
                    .after(offset);
                window_at(offset.max(2), after, fresh)
            };
            let old = match lock(&self.dirs).get_mut(&fh) {
                Some(dir) => std::mem::replace(&mut dir.entries, entries),
                None => return Err(Errno::EBADF),
            };
            // The listing it held is freed here if no other handle shares it, after the lock.
            drop(old);
        }
        let dirs = lock(&self.dirs);
        let dir = dirs.get(&fh).ok_or(Errno::EBADF)?;
        let table = read_lock(&self.table);
        let dots = dot_entries();
        let mut out = Vec::with_capacity(most);
        for i in offset..offset.saturating_add(most as u64) {
            let item = match i {
                0 | 1 => &dots[i as usize],
                _ => match dir.entries.get(i) {
                    Some(item) => item,
                    None => break,
                },
            };
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
                    next: i + 1,
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
        // Its listing is freed (if no other handle shares it) after the lock.
        let dir = lock(&self.dirs).remove(&fh);
        drop(dir);
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
