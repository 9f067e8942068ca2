//! The read cache: objects' bytes on local disk, within `cache_bytes`, each entry one version
//! of one key (its ETag), filled in 1 MiB chunks as readers need them. A file this host just
//! committed enters whole (its spool file is linked in), so reading back what was written
//! costs no request, and a whole entry is a local file the kernel can read directly
//! (passthrough). Entries are validated by ETag: a reader always asks for the version it
//! opened, and a newer version of a key replaces the older entry. A version made by appends
//! to a whole entry's (this host's, or fetched: only the bytes past its end) grows its file
//! in place instead (`grow`, `grow_with`): the entry of the newer version shares the file, so
//! what the kernel reads of it reads on into the appends, while the older entry still reads
//! its own version's bytes (the same, up to its size).
//!
//! Past the bound, the least recently used entries are removed (their files unlinked); a
//! reader still holding a removed entry keeps reading it, so the disk can hold more than the
//! bound by what open readers of removed entries use, until they close. Objects larger than a
//! quarter of the bound are not cached: they are read in windows (see `content`).
//!
//! No lock is held across a request: a chunk being fetched is marked as loading, and readers
//! that need it wait for it on a condition variable. A fetch that finds the store unavailable
//! fails the readers that waited for it too (the client has retried already); a reader that
//! comes later fetches again.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use sha2::{Digest, Sha256};

/// Fetches `start..end` of an entry's version, handing the bytes to the writer in order.
pub type Fetch<'a> =
    &'a dyn Fn(u64, u64, &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()>;

/// The unit in which entries are filled.
pub const CHUNK: u64 = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Chunks {
    present: Vec<bool>,
    loading: Vec<bool>,
    missing: usize,
    /// Why the last fetch failed, if it did because the store was unavailable (after the
    /// client's retries): the readers that waited for it fail with it rather than fetching
    /// again. (A version gone is left for each reader to find: the error itself tells a
    /// reader of a file appended to elsewhere to read the newer version.)
    unavailable: Option<String>,
}

/// One cached version of one object.
pub struct Entry {
    pub etag: String,
    pub size: u64,
    /// Shared by the entries grown from one another (see `grow`).
    file: Arc<File>,
    path: PathBuf,
    chunks: Mutex<Chunks>,
    loaded: Condvar,
    last_used: AtomicU64,
    /// Bytes counted against the cache for it.
    charged: AtomicU64,
    removed: AtomicBool,
    /// It was grown into the entry of a newer version (see [`Cache::grow`]): it grows no more.
    grown: AtomicBool,
    /// The first version its file was made for: entries grown from it share the file.
    pub object: String,
    /// Its bytes are this host's: a version it committed (or appended to). Only such a file
    /// is handed to the kernel to read itself: appends this host commits grow it (`grow`),
    /// where a version fetched from the store would stay as fetched when another host appends.
    pub written_here: bool,
    cache: std::sync::Weak<CacheInner>,
}

struct CacheInner {
    dir: PathBuf,
    limit: u64,
    /// Entries kept, at most: each holds its file open.
    max_entries: usize,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    used: AtomicU64,
    tick: AtomicU64,
}

/// The cache (see the module docs).
#[derive(Clone)]
pub struct Cache {
    inner: Arc<CacheInner>,
}

fn file_name(key: &str, etag: &str) -> String {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.update([0]);
    h.update(etag.as_bytes());
    h.finalize()[..20]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `from..to` of a version into `file` at the same offsets, as `fetch` hands the bytes.
fn fill(file: &File, from: u64, to: u64, fetch: Fetch<'_>) -> io::Result<()> {
    let mut at = from;
    fetch(from, to, &mut |bytes: &[u8]| {
        file.write_all_at(bytes, at)?;
        at += bytes.len() as u64;
        Ok(())
    })?;
    if at == to {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "the store sent {} bytes of {from}..{to}",
            at - from
        )))
    }
}

/// Gives the open `file` the name `path` (a leftover file of that name, of an entry of the
/// same version, is replaced: rare, versions are new at each commit).
fn link_in(file: &File, path: &std::path::Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let to = CString::new(path.as_os_str().as_bytes())?;
    let link = || {
        // SAFETY: NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    link().or_else(|e| match e.raw_os_error() {
        Some(libc::EEXIST) => std::fs::remove_file(path).and_then(|()| link()),
        _ => Err(e),
    })
}

impl Cache {
    /// A cache in `dir` (emptied: a cache does not outlive its process) of at most `limit`
    /// bytes, and of at most a quarter of the descriptors the process may open (each entry
    /// holds its file open: small files would otherwise take them all long before the bytes
    /// are reached, and then every commit fails), between 64 and 65,536 entries.
    pub fn new(dir: PathBuf, limit: u64) -> io::Result<Cache> {
        let mut open = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a plain system call on a struct of ours.
        let files = match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut open) } {
            0 => usize::try_from(open.rlim_cur).unwrap_or(usize::MAX),
            _ => 1024,
        };
        Cache::with_entries(dir, limit, (files / 4).clamp(64, 65_536))
    }

    /// A cache of at most `limit` bytes and `max_entries` entries.
    pub fn with_entries(dir: PathBuf, limit: u64, max_entries: usize) -> io::Result<Cache> {
        std::fs::create_dir_all(&dir)?;
        for e in std::fs::read_dir(&dir)?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        Ok(Cache {
            inner: Arc::new(CacheInner {
                dir,
                limit,
                max_entries,
                entries: Mutex::new(HashMap::new()),
                used: AtomicU64::new(0),
                tick: AtomicU64::new(1),
            }),
        })
    }

    /// The largest object the cache takes.
    pub fn max_object(&self) -> u64 {
        self.inner.limit / 4
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.inner.used.load(Ordering::Relaxed)
    }

    /// The entry of `key` at version `etag`, if cached (whole or not).
    pub fn lookup(&self, key: &str, etag: &str) -> Option<Arc<Entry>> {
        let entries = lock(&self.inner.entries);
        let e = entries.get(key).filter(|e| e.etag == etag)?.clone();
        e.touch();
        Some(e)
    }

    /// The entry of `key` at `etag` of `size` bytes: the cached one, or a new empty one; `None`
    /// when such an object is too large to cache (or the cache cannot make a file).
    pub fn entry(&self, key: &str, etag: &str, size: u64) -> Option<Arc<Entry>> {
        if size > self.max_object() || size == 0 {
            return None;
        }
        if let Some(e) = self.lookup(key, etag) {
            return Some(e);
        }
        let path = self.inner.dir.join(file_name(key, etag));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| log::warn!("cache: cannot make {}: {e}", path.display()))
            .ok()?;
        let file = Arc::new(file);
        let entry = self.make_entry(etag, size, file, path, false, etag, false);
        Some(self.insert(key, entry))
    }

    fn insert(&self, key: &str, entry: Arc<Entry>) -> Arc<Entry> {
        let mut entries = lock(&self.inner.entries);
        let old = entries.insert(key.to_string(), entry.clone());
        if let Some(old) = old
            && !Arc::ptr_eq(&old, &entry)
        {
            // The same version again (the same bytes committed again make the same ETag):
            // its file's name is the new entry's now, and stays.
            self.inner.retire(&old, old.path != entry.path);
        }
        while entries.len() > self.inner.max_entries {
            let Some(victim) = CacheInner::least_used(&entries, &entry) else {
                break;
            };
            if let Some(e) = entries.remove(&victim) {
                self.inner.remove(&e);
            }
        }
        entry
    }

    /// A new entry (not in the map yet) of the version `etag`, `size` bytes held in `file`
    /// (named `path`): with every chunk there if `whole`; `object` and `written_here` as the
    /// fields say.
    #[allow(clippy::too_many_arguments)]
    fn make_entry(
        &self,
        etag: &str,
        size: u64,
        file: Arc<File>,
        path: PathBuf,
        whole: bool,
        object: &str,
        written_here: bool,
    ) -> Arc<Entry> {
        let chunks = size.div_ceil(CHUNK) as usize;
        Arc::new(Entry {
            etag: etag.to_string(),
            size,
            file,
            path,
            chunks: Mutex::new(Chunks {
                present: vec![whole; chunks],
                loading: vec![false; chunks],
                missing: if whole { 0 } else { chunks },
                unavailable: None,
            }),
            loaded: Condvar::new(),
            last_used: AtomicU64::new(self.inner.tick.fetch_add(1, Ordering::Relaxed)),
            charged: AtomicU64::new(0),
            removed: AtomicBool::new(false),
            grown: AtomicBool::new(false),
            object: object.to_string(),
            written_here,
            cache: Arc::downgrade(&self.inner),
        })
    }

    /// Takes `file` (a committed working copy of `size` bytes, now the version `etag` of
    /// `key`) in as a whole entry, by linking it into the cache; `None` if it is too large or
    /// cannot be linked.
    pub fn adopt(&self, key: &str, etag: &str, file: &File, size: u64) -> Option<Arc<Entry>> {
        if size > self.max_object() || size == 0 {
            self.forget(key);
            return None;
        }
        let path = self.inner.dir.join(file_name(key, etag));
        if let Err(e) = link_in(file, &path) {
            log::debug!("cache: cannot link a committed copy in: {e}");
            self.forget(key);
            return None;
        }
        // The same open file: the copy is not written after its commit.
        let file = Arc::new(file.try_clone().ok()?);
        let entry = self.make_entry(etag, size, file, path, true, etag, true);
        let entry = self.insert(key, entry);
        entry.charge(size);
        Some(entry)
    }

    /// Makes the version `etag` of `key` (`size` bytes), committed by appending `tail` to the
    /// version `base` this cache holds whole, an entry by growing `base`'s file in place: the
    /// kernel reads that file itself for passthrough readers of `base`, which so read on into
    /// the appends as they are committed, as `tail -f` does on the local store (and no copy of
    /// the base is made). `None` (nothing changed but perhaps bytes of `tail` past `base`'s
    /// end, which its readers do not read through the cache) when `base` is not cached whole,
    /// or was grown already (another commit of this process that appended to it first).
    ///
    /// `base`'s entry keeps its size, so reads of it through the cache stay that version; its
    /// file takes the new version's name (and loses the old one as `base`'s entry leaves the
    /// map), so an entry made again for `base` later (a reader of that version whose entry
    /// was evicted) is a file of its own.
    pub fn grow(
        &self,
        key: &str,
        base: &str,
        tail: &[u8],
        etag: &str,
        size: u64,
    ) -> Option<Arc<Entry>> {
        let end = size.checked_sub(tail.len() as u64)?;
        self.grow_with(key, base, end, etag, size, true, &|_, _, write| write(tail))
    }

    /// [`Cache::grow`] with the bytes past `base`'s end (`base_size`) handed over by `fetch`
    /// (as for any entry's chunks): this host's (`own`), or appended elsewhere and fetched
    /// from the store (the new entry is then written here as far as `base` was). A failed
    /// fetch leaves `base` to be grown again later.
    #[allow(clippy::too_many_arguments)]
    pub fn grow_with(
        &self,
        key: &str,
        base: &str,
        base_size: u64,
        etag: &str,
        size: u64,
        own: bool,
        fetch: Fetch<'_>,
    ) -> Option<Arc<Entry>> {
        let old = {
            let entries = lock(&self.inner.entries);
            let e = entries.get(key).filter(|e| e.etag == base)?;
            if e.size != base_size
                || size <= base_size
                || size > self.max_object()
                || e.removed.load(Ordering::Relaxed)
                || !e.is_whole()
                || e.grown.swap(true, Ordering::Relaxed)
            {
                return None;
            }
            e.clone()
        };
        let grown = (|| {
            if old.file.metadata()?.len() < old.size {
                return Err(io::Error::other(
                    "the cached file is shorter than its version",
                ));
            }
            fill(&old.file, old.size, size, fetch)?;
            old.file.set_len(size)?;
            let path = self.inner.dir.join(file_name(key, etag));
            link_in(&old.file, &path)?;
            Ok::<_, io::Error>((old.file.clone(), path))
        })();
        let (file, path) = match grown {
            Ok(grown) => grown,
            Err(e) => {
                log::debug!("cache: cannot grow the entry of {key} in place: {e}");
                old.grown.store(false, Ordering::Relaxed);
                return None;
            }
        };
        let written_here = own || old.written_here;
        let entry = self.make_entry(etag, size, file, path, true, &old.object, written_here);
        let entry = self.insert(key, entry);
        // Out of the count (the map held another entry of `key` by now, if a reader made one
        // for another version meanwhile); its file's name went with the new entry.
        self.inner.retire(&old, false);
        entry.charge(size);
        Some(entry)
    }

    /// The entry of `key`, of whichever version is cached.
    pub fn current(&self, key: &str) -> Option<Arc<Entry>> {
        lock(&self.inner.entries).get(key).cloned()
    }

    /// Drops what is cached of `key` (it was removed or replaced by this host).
    pub fn forget(&self, key: &str) {
        let old = lock(&self.inner.entries).remove(key);
        if let Some(old) = old {
            self.inner.remove(&old);
        }
    }
}

impl CacheInner {
    /// The key of the least recently used entry but `keep`.
    fn least_used(entries: &HashMap<String, Arc<Entry>>, keep: &Entry) -> Option<String> {
        entries
            .iter()
            .filter(|(_, e)| !std::ptr::eq(e.as_ref(), keep))
            .min_by_key(|(_, e)| e.last_used.load(Ordering::Relaxed))
            .map(|(k, _)| k.clone())
    }

    /// Removes `entry` (already out of the map): its file goes, its bytes are given back.
    fn remove(&self, entry: &Entry) {
        self.retire(entry, true)
    }

    /// Takes `entry` (already out of the map) out of the count, and its file with it if
    /// `unlink`.
    fn retire(&self, entry: &Entry, unlink: bool) {
        if entry.removed.swap(true, Ordering::Relaxed) {
            return;
        }
        if unlink {
            let _ = std::fs::remove_file(&entry.path);
        }
        let charged = entry.charged.swap(0, Ordering::Relaxed);
        let used = self.used.fetch_sub(charged, Ordering::Relaxed) - charged;
        crate::metrics::cache_size(used);
    }

    /// Counts `n` more bytes, removing least recently used entries (not `keep`) past the bound.
    fn add(&self, n: u64, keep: &Entry) {
        let used = self.used.fetch_add(n, Ordering::Relaxed) + n;
        crate::metrics::cache_size(used);
        if used <= self.limit {
            return;
        }
        let mut entries = lock(&self.entries);
        while self.used.load(Ordering::Relaxed) > self.limit {
            let Some(victim) = CacheInner::least_used(&entries, keep) else {
                break;
            };
            if let Some(e) = entries.remove(&victim) {
                self.remove(&e);
            }
        }
    }
}

impl Entry {
    fn touch(&self) {
        if let Some(cache) = self.cache.upgrade() {
            self.last_used.store(
                cache.tick.fetch_add(1, Ordering::Relaxed),
                Ordering::Relaxed,
            );
        }
    }

    fn charge(&self, n: u64) {
        if self.removed.load(Ordering::Relaxed) {
            return;
        }
        self.charged.fetch_add(n, Ordering::Relaxed);
        if let Some(cache) = self.cache.upgrade() {
            cache.add(n, self);
        }
    }

    /// Whether `start..end` is here.
    pub fn has(&self, start: u64, end: u64) -> bool {
        let (first, last) = ((start / CHUNK) as usize, end.div_ceil(CHUNK) as usize);
        let c = lock(&self.chunks);
        c.present
            .get(first..last.min(c.present.len()))
            .is_some_and(|p| p.iter().all(|&b| b))
    }

    /// Whether every byte is here.
    pub fn is_whole(&self) -> bool {
        lock(&self.chunks).missing == 0
    }

    /// The local file (meaningful once whole).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether a reader holds this entry, or another entry of its file (an older version it
    /// was grown from), besides `held_here` references the caller knows of (the map's, its own).
    pub fn is_read(self: &Arc<Self>, held_here: usize) -> bool {
        Arc::strong_count(self) > held_here || Arc::strong_count(&self.file) > 1
    }

    /// Reads at `offset`, once `offset..offset + len` (and `ahead` bytes more) are here:
    /// missing chunks are fetched with `fetch(start, end, write)`, which must call `write`
    /// with the bytes of `start..end` in order.
    pub fn read(
        &self,
        buf: &mut [u8],
        offset: u64,
        ahead: u64,
        fetch: Fetch<'_>,
    ) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.size - offset);
        self.touch();
        let hit = self.ensure(offset, (offset + want + ahead).min(self.size), fetch)?;
        crate::metrics::cache_read(hit);
        let mut done = 0;
        while (done as u64) < want {
            match self
                .file
                .read_at(&mut buf[done..want as usize], offset + done as u64)?
            {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
    }

    /// Makes `start..end` present; true if it already was.
    fn ensure(&self, start: u64, end: u64, fetch: Fetch<'_>) -> io::Result<bool> {
        let (first, last) = ((start / CHUNK) as usize, (end.div_ceil(CHUNK)) as usize);
        let mut hit = true;
        let mut c = lock(&self.chunks);
        let mut i = first;
        while i < last {
            if c.present[i] {
                i += 1;
                continue;
            }
            hit = false;
            if c.loading[i] {
                crate::store::wait::announce();
                c = self.loaded.wait(c).unwrap_or_else(|e| e.into_inner());
                if !c.present[i]
                    && !c.loading[i]
                    && let Some(why) = &c.unavailable
                {
                    // Its fetch failed, the store unavailable: fetching again would make this
                    // read wait as long once more, and every reader queued behind it too, so
                    // an outage's EIO would take a multiple of the bound it has.
                    return Err(io::Error::other(why.clone()));
                }
                continue;
            }
            // A run of missing chunks nobody is loading: fetched in one request.
            let mut j = i;
            while j < last && !c.present[j] && !c.loading[j] {
                c.loading[j] = true;
                j += 1;
            }
            drop(c);
            self.load(i, j, fetch)?;
            c = lock(&self.chunks);
            i = j;
        }
        Ok(hit)
    }

    /// Fetches chunks `i..j`, which the caller marked as loading, and marks them present (or
    /// missing again, if the fetch failed).
    fn load(&self, i: usize, j: usize, fetch: Fetch<'_>) -> io::Result<()> {
        let (from, to) = (i as u64 * CHUNK, (j as u64 * CHUNK).min(self.size));
        let result = fill(&self.file, from, to, fetch);
        let mut c = lock(&self.chunks);
        for k in i..j {
            c.loading[k] = false;
            if result.is_ok() {
                c.present[k] = true;
                c.missing -= 1;
            }
        }
        c.unavailable = match &result {
            Err(e)
                if e.get_ref()
                    .and_then(|e| e.downcast_ref::<super::client::ClientError>())
                    .is_some_and(|e| e.is(super::client::Failure::Unavailable)) =>
            {
                Some(e.to_string())
            }
            _ => None,
        };
        self.loaded.notify_all();
        drop(c);
        result?;
        self.charge(to - from);
        Ok(())
    }

    /// Starts fetching on `pool` the chunks of `start..end` that are neither here nor being
    /// loaded, in requests of at most `piece` bytes, several in flight: a sequential reader's
    /// read-ahead, which then finds them here or waits for them as for any chunk being loaded.
    /// A failed fetch leaves its chunks missing: a reader waiting for them fails with its error
    /// if the store was unavailable,
    /// a reader that comes later fetches them itself.
    pub fn prefetch(
        self: &Arc<Self>,
        start: u64,
        end: u64,
        piece: u64,
        pool: &super::pool::Pool,
        fetch: Arc<OwnedFetch>,
    ) {
        let end = end.min(self.size);
        if start >= end {
            return;
        }
        let per = (piece / CHUNK).max(1) as usize;
        let (first, last) = ((start / CHUNK) as usize, (end.div_ceil(CHUNK)) as usize);
        let mut runs = Vec::new();
        {
            let mut c = lock(&self.chunks);
            let mut i = first;
            while i < last {
                if c.present[i] || c.loading[i] {
                    i += 1;
                    continue;
                }
                let mut j = i;
                while j < last && j - i < per && !c.present[j] && !c.loading[j] {
                    c.loading[j] = true;
                    j += 1;
                }
                runs.push((i, j));
                i = j;
            }
        }
        for (i, j) in runs {
            let (me, fetch) = (self.clone(), fetch.clone());
            pool.run(move || {
                if let Err(e) = me.load(i, j, &*fetch) {
                    log::debug!("read-ahead of {}: {e}", me.path.display());
                }
            });
        }
    }
}

/// A [`Fetch`] that a part thread can own.
pub type OwnedFetch =
    dyn Fn(u64, u64, &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> + Send + Sync;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_bytes_committed_again_keep_their_cached_file() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().join("c"), 64 * CHUNK).unwrap();
        // Two commits of the same bytes: one ETag (the MD5 of a single PUT's bytes).
        for _ in 0..2 {
            let mut copy = tempfile::tempfile().unwrap();
            copy.write_all(&[b'a'; 5000]).unwrap();
            let e = cache.adopt("k", "\"md5\"", &copy, 5000).unwrap();
            assert!(e.path.exists(), "the entry's file is there");
            assert_eq!(std::fs::metadata(&e.path).unwrap().len(), 5000);
            assert_eq!(cache.used(), 5000, "counted once");
        }
    }

    #[test]
    fn an_append_grows_a_whole_entry_in_place_for_the_readers_of_its_file() {
        use std::io::Write;
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().join("c"), 64 * CHUNK).unwrap();
        let mut copy = tempfile::tempfile().unwrap();
        copy.write_all(b"start\n").unwrap();
        let v1 = cache.adopt("log", "v1", &copy, 6).unwrap();
        let never = |_: u64, _: u64, _: &mut dyn FnMut(&[u8]) -> io::Result<()>| {
            Err(io::Error::other("the store was asked"))
        };
        let v2 = cache.grow("log", "v1", b"one\n", "v2", 10).unwrap();
        // One file: what the kernel reads of v1's file (passthrough) goes on into the append.
        let (a, b) = (v1.file().metadata().unwrap(), v2.file().metadata().unwrap());
        assert_eq!((a.ino(), a.len()), (b.ino(), 10));
        assert_eq!(v2.object, v1.object);
        assert!(cache.lookup("log", "v1").is_none());
        assert!(Arc::ptr_eq(&cache.lookup("log", "v2").unwrap(), &v2));
        // Through the cache, each entry reads its own version, without asking the store.
        let mut buf = [0u8; 64];
        let n = v1.read(&mut buf, 0, 0, &never).unwrap();
        assert_eq!(&buf[..n], b"start\n");
        let n = v2.read(&mut buf, 0, 0, &never).unwrap();
        assert_eq!(&buf[..n], b"start\none\n");
        assert_eq!(cache.used(), 10, "v1 is out of the count");
        // The file has the newest version's name only: an entry made for v1 again is a file
        // of its own.
        let names = std::fs::read_dir(tmp.path().join("c")).unwrap().count();
        assert_eq!(names, 1);
        assert!(v2.path.exists() && !v1.path.exists());
        // An entry grows once (a second append from the same base is another version), only
        // from the version it holds, only with the sizes adding up, and only when whole.
        assert!(cache.grow("log", "v1", b"x", "v3", 7).is_none());
        assert!(cache.grow("log", "v2", b"two\n", "v3", 99).is_none());
        let v3 = cache.grow("log", "v2", b"two\n", "v3", 14).unwrap();
        assert_eq!(v1.file().metadata().unwrap().len(), 14);
        assert!(cache.grow("log", "v2", b"three\n", "v4", 20).is_none());
        drop(v3);
        let part = cache.entry("big", "w1", 3 * CHUNK).unwrap();
        assert!(!part.is_whole());
        assert!(cache.grow("big", "w1", b"x", "w2", 3 * CHUNK + 1).is_none());
    }

    #[test]
    fn prefetched_chunks_are_fetched_in_pieces_on_the_pool_and_waited_for() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().join("c"), 64 * CHUNK).unwrap();
        let data: Arc<Vec<u8>> = Arc::new((0..10 * CHUNK).map(|i| (i % 251) as u8).collect());
        let e = cache.entry("k", "\"x\"", 10 * CHUNK).unwrap();
        let pool = super::super::pool::Pool::new(2, "test-prefetch").unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let (d, c) = (data.clone(), calls.clone());
        let fetch: Arc<OwnedFetch> = Arc::new(move |s, e, w| {
            c.lock().unwrap().push((s / CHUNK, e / CHUNK));
            std::thread::sleep(std::time::Duration::from_millis(20));
            w(&d[s as usize..e as usize])
        });
        e.prefetch(CHUNK, 10 * CHUNK, 4 * CHUNK, &pool, fetch.clone());
        // Asked again while loading: nothing is fetched twice.
        e.prefetch(0, 10 * CHUNK, 4 * CHUNK, &pool, fetch);
        // The reader waits for the chunks being loaded rather than fetching them itself.
        let mut buf = vec![0u8; (9 * CHUNK) as usize];
        let never = |_: u64, _: u64, _: &mut dyn FnMut(&[u8]) -> io::Result<()>| {
            Err(io::Error::other("fetched by the reader"))
        };
        assert_eq!(e.read(&mut buf, CHUNK, 0, &never).unwrap(), buf.len());
        assert!(buf[..] == data[CHUNK as usize..]);
        let mut calls = calls.lock().unwrap().clone();
        calls.sort();
        assert_eq!(calls, [(0, 1), (1, 5), (5, 9), (9, 10)]);
    }

    /// A fetch that fails (after the client's retries) fails the readers waiting for it with
    /// its error: none fetches again, which would make an outage's EIO take twice as long (and
    /// longer for each reader queued); a reader that comes later fetches again.
    #[test]
    fn readers_waiting_for_a_failed_fetch_fail_with_it() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().join("c"), 64 * CHUNK).unwrap();
        let e = cache.entry("k", "\"x\"", 4 * CHUNK).unwrap();
        let pool = super::super::pool::Pool::new(2, "test-prefetch").unwrap();
        // The fetch fails once the three readers wait for it (each announces its wait).
        let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = waiting.clone();
        let fetch: Arc<OwnedFetch> = Arc::new(move |_, _, _| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while w.load(Ordering::SeqCst) < 3 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(io::Error::other(super::super::client::ClientError::new(
                super::super::client::Failure::Unavailable,
                "GET k: the store timed out",
            )))
        });
        e.prefetch(0, 4 * CHUNK, 4 * CHUNK, &pool, fetch);
        let fetched = std::sync::atomic::AtomicUsize::new(0);
        let again = |s: u64, e: u64, w: &mut dyn FnMut(&[u8]) -> io::Result<()>| {
            fetched.fetch_add(1, Ordering::Relaxed);
            w(&vec![7u8; (e - s) as usize])
        };
        let mut buf = vec![0u8; 100];
        std::thread::scope(|s| {
            let readers: Vec<_> = (0..3)
                .map(|_| {
                    let waiting = waiting.clone();
                    s.spawn(|| {
                        crate::store::wait::set_hook(Box::new(move || {
                            waiting.fetch_add(1, Ordering::SeqCst);
                        }));
                        e.read(&mut [0u8; 100], CHUNK, 0, &again)
                    })
                })
                .collect();
            for r in readers {
                let err = r.join().unwrap().unwrap_err();
                assert!(err.to_string().contains("timed out"), "{err}");
            }
        });
        assert_eq!(fetched.load(Ordering::Relaxed), 0, "nobody fetched again");
        // Later, a reader fetches for itself.
        assert_eq!(e.read(&mut buf, CHUNK, 0, &again).unwrap(), 100);
        assert_eq!(buf, [7u8; 100]);
        assert_eq!(fetched.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn entries_are_bounded_in_number_as_each_holds_its_file_open() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let cache = Cache::with_entries(dir.clone(), 1 << 30, 4).unwrap();
        let mut held = Vec::new();
        for k in ["a", "b", "c", "d"] {
            held.push(cache.entry(k, "\"x\"", 10).unwrap());
        }
        assert!(cache.lookup("a", "\"x\"").is_some()); // a is now the most recent
        for k in ["e", "f"] {
            held.push(cache.entry(k, "\"x\"", 10).unwrap());
        }
        let kept: Vec<&str> = ["a", "b", "c", "d", "e", "f"]
            .into_iter()
            .filter(|k| cache.lookup(k, "\"x\"").is_some())
            .collect();
        assert_eq!(kept, ["a", "d", "e", "f"]);
        // The others' files are gone from the cache's directory (their holders keep reading).
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 4);
        // Adopted copies count the same.
        let copy = tempfile::tempfile_in(tmp.path()).unwrap();
        copy.write_all_at(b"committed", 0).unwrap();
        cache.adopt("g", "\"y\"", &copy, 9).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 4);
        assert!(cache.lookup("g", "\"y\"").is_some());
        // A cache of the process's own: a quarter of its descriptors, 64 at least.
        let own = Cache::new(tmp.path().join("own"), 1 << 30).unwrap();
        assert!(own.inner.max_entries >= 64);
    }

    #[test]
    fn chunks_are_fetched_once_and_the_bound_removes_the_least_recently_used() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().join("c"), 16 * CHUNK).unwrap();
        let data: Vec<u8> = (0..3 * CHUNK + 10).map(|i| (i % 251) as u8).collect();
        let fetches = std::sync::atomic::AtomicUsize::new(0);
        let fetch = |s: u64, e: u64, w: &mut dyn FnMut(&[u8]) -> io::Result<()>| {
            fetches.fetch_add(1, Ordering::Relaxed);
            w(&data[s as usize..e as usize])
        };
        let e = cache.entry("k", "\"1\"", data.len() as u64).unwrap();
        let mut buf = vec![0u8; 100];
        assert_eq!(e.read(&mut buf, CHUNK - 50, 0, &fetch).unwrap(), 100);
        assert_eq!(&buf[..], &data[CHUNK as usize - 50..CHUNK as usize + 50]);
        assert_eq!(
            fetches.load(Ordering::Relaxed),
            1,
            "two chunks, one request"
        );
        e.read(&mut buf, 10, 0, &fetch).unwrap();
        assert_eq!(fetches.load(Ordering::Relaxed), 1, "already here");
        assert!(!e.is_whole());
        e.read(&mut buf, 0, 4 * CHUNK, &fetch).unwrap();
        assert!(e.is_whole());
        assert_eq!(cache.used(), data.len() as u64);
        // Another version of the key replaces it.
        let e2 = cache.entry("k", "\"2\"", 10).unwrap();
        assert!(cache.lookup("k", "\"1\"").is_none());
        assert_eq!(cache.used(), 0);
        drop(e2);
        // Past the bound, the least recently used go.
        let mut small = |k: &str| {
            let e = cache.entry(k, "\"x\"", 4 * CHUNK).unwrap();
            e.read(&mut buf, 0, 4 * CHUNK, &|s, e, w| {
                w(&vec![1u8; (e - s) as usize])
            })
            .unwrap();
        };
        for k in ["a", "b", "c", "d"] {
            small(k);
        }
        assert!(cache.lookup("a", "\"x\"").is_some()); // a is now the most recent
        small("e");
        assert!(
            cache.lookup("b", "\"x\"").is_none(),
            "b was the least recently used"
        );
        assert!(cache.lookup("a", "\"x\"").is_some());
        assert!(cache.used() <= 16 * CHUNK);
        assert!(
            cache.entry("huge", "\"x\"", 5 * CHUNK).is_none(),
            "over a quarter"
        );
    }
}
