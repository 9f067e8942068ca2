//! The committed content of an object, as opened: one version (ETag) of one key.
//!
//! - Every GET asks for that version (`If-Match`), so a reader never mixes two versions; if
//!   another writer replaced the object since the open, bytes not read yet are gone (S3 keeps
//!   no old versions) and the read fails with `EIO` (logged), where the local store would go
//!   on reading the old version. A small file is fetched whole at a reader's open
//!   (`fetch_whole`, see `Store::open_to_read`), so this only concerns larger files read over
//!   a longer time — and not a version replaced by appends
//!   (below): a reader following appends reads its version's bytes from the newer one.
//! - Objects the cache takes (see `cache`) are read through it, in chunks; a sequential
//!   reader's requests grow ahead of it (read-ahead up to 16 MiB a request). A whole cached
//!   entry is a local file (`Content::local`), which the core may hand to the kernel.
//! - Larger objects, and what a sequential reader of an object of 64 MiB or more reads that
//!   is not cached, are read through a window of memory (up to 16 MiB) per open file, the
//!   next window fetched on a read-ahead thread (`Shared::readers`) while a sequential reader
//!   reads this one: memory stays flat whatever the size of the file, and a window's memory,
//!   once read through, holds the next one (fresh memory is faulted in page by page). (Through
//!   the cache file, the same bytes cost twice: written, then read back.)
//! - **Reading on into appends** (`tail -f`): every version made from another by appends
//!   alone carries the same *lineage* (object metadata `roomfs-lineage`, a new random name at
//!   every other commit, see `commit`). A reader at the end of its version asks (at most every
//!   200 ms, the first time 200 ms after its version was looked up) which version is current; if it is of the same lineage and longer, it
//!   begins with the reader's version, and the reader reads on into it. Whatever another
//!   writer did otherwise (a rewrite, a truncation) starts a new lineage: the reader stops at
//!   its version's end.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Shared;
use super::cache::Entry;
use crate::store::{Content, LocalFile, Meta, Version};

/// Read-ahead of a sequential reader, at most.
const AHEAD_MAX: u64 = 16 << 20;
/// The first request of a sequential reader (and the window of a random one).
const AHEAD_MIN: u64 = 1 << 20;
/// How often a reader at the end of its version asks for a newer one, at most.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// How far a sequential reader of a cached object is read ahead of, in the background.
const PREFETCH_AHEAD: u64 = 32 << 20;
/// How far from where a reader's reads so far ended a read may start and still count as
/// sequential (see `streaming`).
const STREAM_SLACK: u64 = 4 << 20;
/// The size of each of those background requests.
const PREFETCH_PIECE: u64 = 4 << 20;
/// Objects up to this size are fetched whole at a reader's open, or at their first read.
const WHOLE_MAX: u64 = 4 << 20;
/// A sequential reader of an object at least this large reads what is not cached through
/// memory windows rather than the cache file (see `read_at`).
const STREAM_MIN: u64 = 64 << 20;

struct Window {
    start: u64,
    data: Arc<Vec<u8>>,
}

struct Reading {
    /// Where a sequential reader reads next.
    next: u64,
    /// The current read-ahead.
    ahead: u64,
    window: Option<Window>,
    /// The next window, being fetched.
    prefetch: Option<(u64, std::sync::mpsc::Receiver<io::Result<Vec<u8>>>)>,
    /// The memory of a window read to its end, for the next one: a fresh buffer of 16 MiB
    /// is new pages, each faulted in and zeroed by the kernel (a quarter of the daemon's time
    /// for a cold sequential reader), and given back when freed.
    spare: Option<Vec<u8>>,
}

/// When a reader last asked for a newer version (and this process's count of commits to its
/// key then), and the newest one found that extends its own.
type Follower = (Option<(Instant, u64)>, Option<Arc<S3Content>>);

/// One version of an object (see the module docs).
pub struct S3Content {
    shared: Arc<Shared>,
    key: String,
    etag: String,
    meta: Meta,
    /// Whole in the cache when opened.
    whole: Option<Arc<Entry>>,
    reading: Mutex<Reading>,
    /// The newest version known to extend this one by appends, and when that was asked (and
    /// how many commits to its key this process had made then).
    follower: Mutex<Follower>,
    /// When a fetch of this version last found the store unavailable, and the error.
    unavailable: Arc<Unavailable>,
}

/// When a fetch last found the store unavailable (after the client's retries), and why.
type Unavailable = Mutex<Option<(Instant, String)>>;

/// How long after a fetch of a version found the store unavailable other reads of it fail at
/// once rather than asking again: the kernel reads a page again right after a failed read
/// (and read-ahead), and each ask would wait the whole bound of `EIO` once more.
const UNAVAILABLE_RECENTLY: Duration = Duration::from_secs(2);

impl S3Content {
    /// The version `etag` of `key`, with attributes `meta`; `whole`: its cache entry, when
    /// it holds every byte.
    pub fn new(
        shared: Arc<Shared>,
        key: String,
        etag: String,
        meta: Meta,
        whole: Option<Arc<Entry>>,
    ) -> S3Content {
        let commits = shared.commits_to(&key);
        let whole = whole
            .or_else(|| shared.cache.lookup(&key, &etag))
            .filter(|e| e.is_whole() && e.size == meta.size);
        S3Content {
            shared,
            key,
            etag,
            meta,
            whole,
            reading: Mutex::new(Reading {
                next: 0,
                ahead: 0,
                window: None,
                prefetch: None,
                spare: None,
            }),
            // What the store said of the object when this content was made of it counts as
            // an ask: a reader reading its version to the end right after opening it (every
            // file whose size is not a multiple of the page, which the kernel reads by whole
            // pages) asks the store nothing.
            follower: Mutex::new((Some((Instant::now(), commits)), None)),
            unavailable: Arc::new(Mutex::new(None)),
        }
    }

    /// Fetches a small version whole into the cache (a reader's open: see
    /// `Store::open_to_read`). False if it is not one to fetch now (empty, large, not taken
    /// by the cache), true if it is cached whole; the error of the fetch otherwise
    /// (`version_gone` says whether the version was replaced or removed).
    pub(super) fn fetch_whole(&self) -> io::Result<bool> {
        let size = self.meta.size;
        if self.whole.is_some() {
            return Ok(true);
        }
        if size == 0 || size > WHOLE_MAX {
            return Ok(false);
        }
        let Some(entry) = self
            .grown_entry()
            .or_else(|| self.shared.cache.entry(&self.key, &self.etag, size))
        else {
            return Ok(false);
        };
        entry.read(&mut [0u8; 1], 0, size, &|s, e, w| self.fetch(s, e, w))?;
        Ok(entry.is_whole())
    }

    /// This version's entry made by growing the cache's whole entry of an older version of the
    /// same lineage (which this one begins with), fetching only the bytes past its end: a log
    /// appended to is fetched a tail at a time, and the older entry's readers here (whom the
    /// kernel may serve from its file itself) read on with it. `None` where the cache holds
    /// no such entry, or the lineages are not known.
    fn grown_entry(&self) -> Option<Arc<Entry>> {
        let current = self.shared.cache.current(&self.key)?;
        let size = self.meta.size;
        if current.etag == self.etag || !current.is_whole() || current.size >= size {
            return None;
        }
        let mine = self.shared.lineage_of(&self.key, &self.etag)?;
        if self.shared.lineage_of(&self.key, &current.etag)? != mine {
            return None;
        }
        let (base, base_size) = (current.etag.clone(), current.size);
        drop(current);
        self.shared.cache.grow_with(
            &self.key,
            &base,
            base_size,
            &self.etag,
            size,
            false,
            &|start, end, write| self.fetch(start, end, write),
        )
    }

    /// The newest version of the key that extends this one by appends (see the module docs),
    /// asking the store at most once per `metadata_ttl`, unless `now`.
    pub(super) fn follower(&self, now: bool) -> io::Result<Option<Arc<S3Content>>> {
        if !now {
            let f = self.follower.lock().unwrap_or_else(|e| e.into_inner());
            // Asked again soon: a read past the end reaches the store only once the kernel
            // learnt of a longer file (its attribute TTL), or for a direct-I/O reader.
            let commits = self.shared.commits_to(&self.key);
            // Not when the kernel was told of a longer file since: it reads up to that size,
            // and an answer cut short there would be zeros in its cached page.
            let reach = f.1.as_ref().map_or(self.meta.size, |n| n.meta.size);
            let told = self.shared.size_told(&self.key).unwrap_or(0);
            if let Some((at, seen)) = f.0
                && seen == commits
                && at.elapsed() < self.shared.metadata_ttl.min(FOLLOW_EVERY)
                && told <= reach
            {
                return Ok(f.1.clone());
            }
        }
        let commits = self.shared.commits_to(&self.key);
        let mine = self.shared.lineage_of(&self.key, &self.etag);
        let found = match self.shared.client.head(&self.key) {
            Ok(info) => {
                self.shared
                    .learn_lineage(&self.key, &info.etag, &info.metadata);
                let theirs = info.metadata.get(super::LINEAGE);
                let extends = info.etag != self.etag
                    && info.size > self.meta.size
                    && mine.is_some()
                    && theirs == mine.as_ref();
                extends.then(|| {
                    let mut meta = self.meta.clone();
                    meta.size = info.size;
                    meta.blocks = info.size.div_ceil(512);
                    meta.version = crate::store::Version::from_tag(&info.etag);
                    Arc::new(S3Content::new(
                        self.shared.clone(),
                        self.key.clone(),
                        info.etag,
                        meta,
                        None,
                    ))
                })
            }
            Err(e) if e.is(super::client::Failure::NotFound) => None,
            Err(e) => return Err(io::Error::other(e)),
        };
        let mut f = self.follower.lock().unwrap_or_else(|e| e.into_inner());
        // Keep a follower found earlier if this one is no newer.
        let keep = match (&f.1, &found) {
            (Some(old), Some(new)) => new.meta.size >= old.meta.size,
            (Some(_), None) => false,
            _ => true,
        };
        if keep {
            f.1 = found;
        }
        f.0 = Some((Instant::now(), commits));
        Ok(f.1.clone())
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn etag(&self) -> &str {
        &self.etag
    }

    /// Fetches `start..end` of this version, handing the bytes to `write`.
    fn fetch(
        &self,
        start: u64,
        end: u64,
        write: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        fetch_noting(
            &self.shared,
            &self.key,
            &self.etag,
            (start, end),
            write,
            &self.unavailable,
        )
    }

    /// Whether a read at `offset` continues a sequential reader of a cached object: it starts
    /// within a few MiB of where the reads so far ended. (The kernel's read-ahead sends several
    /// reads at once, served by several threads, so they arrive a little out of order; a strict
    /// test would see a random reader and read nothing ahead.)
    fn streaming(&self, offset: u64, len: u64) -> bool {
        let mut r = self.reading.lock().unwrap_or_else(|e| e.into_inner());
        let near = r.next > 0 && offset + STREAM_SLACK >= r.next && offset <= r.next + STREAM_SLACK;
        r.next = if near {
            r.next.max(offset + len)
        } else {
            offset + len
        };
        near
    }

    fn read_windowed(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let size = self.meta.size;
        let want = (buf.len() as u64).min(size - offset) as usize;
        let mut done = 0;
        while done < want {
            let at = offset + done as u64;
            let window = self.window_at(at)?;
            let from = (at - window.start) as usize;
            let n = (want - done).min(window.data.len() - from);
            if n == 0 {
                break;
            }
            buf[done..done + n].copy_from_slice(&window.data[from..from + n]);
            done += n;
        }
        crate::metrics::cache_read(false);
        Ok(done)
    }

    /// The window holding `at`: the current one, the prefetched one, or one fetched now; a
    /// sequential reader's next one starts being fetched.
    fn window_at(&self, at: u64) -> io::Result<Window> {
        let size = self.meta.size;
        let mut r = self.reading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = &r.window
            && at >= w.start
            && at < w.start + w.data.len() as u64
        {
            return Ok(Window {
                start: w.start,
                data: w.data.clone(),
            });
        }
        let sequential = r
            .window
            .as_ref()
            .is_some_and(|w| w.start + w.data.len() as u64 == at);
        r.ahead = if sequential {
            (r.ahead * 2).clamp(AHEAD_MIN, AHEAD_MAX)
        } else {
            AHEAD_MIN
        };
        let ahead = r.ahead;
        let prefetched = match r.prefetch.take() {
            Some((start, rx)) if start == at => Some(rx),
            _ => None,
        };
        let spare = if prefetched.is_none() {
            r.spare.take()
        } else {
            None
        };
        drop(r);
        let data = match prefetched {
            Some(rx) => rx
                .try_recv()
                .or_else(|_| {
                    crate::store::wait::announce();
                    rx.recv()
                })
                .unwrap_or_else(|_| Err(io::Error::other("the read-ahead job ended")))?,
            None => {
                let end = (at + ahead).min(size);
                let mut data = emptied(spare, (end - at) as usize);
                self.fetch(at, end, &mut |b| {
                    data.extend_from_slice(b);
                    Ok(())
                })?;
                data
            }
        };
        let window = Window {
            start: at,
            data: Arc::new(data),
        };
        let mut r = self.reading.lock().unwrap_or_else(|e| e.into_inner());
        let old = r.window.replace(Window {
            start: window.start,
            data: window.data.clone(),
        });
        // Unless another read still copies out of it.
        if let Some(old) = old
            && let Ok(data) = Arc::try_unwrap(old.data)
        {
            r.spare = Some(data);
        }
        let next = at + window.data.len() as u64;
        if sequential && next < size && r.prefetch.is_none() {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let (shared, key, etag) = (self.shared.clone(), self.key.clone(), self.etag.clone());
            let unavailable = self.unavailable.clone();
            let end = (next + r.ahead.max(AHEAD_MIN)).min(size);
            let spare = r.spare.take();
            self.shared.readers.run(move || {
                let mut data = emptied(spare, (end - next) as usize);
                let mut write = |b: &[u8]| {
                    data.extend_from_slice(b);
                    Ok(())
                };
                let r = fetch_noting(&shared, &key, &etag, (next, end), &mut write, &unavailable);
                let _ = tx.send(r.map(|()| data));
            });
            r.prefetch = Some((next, rx));
        }
        Ok(window)
    }
}

/// `spare` (the memory of an earlier window) emptied, or a new buffer, for `len` bytes.
fn emptied(spare: Option<Vec<u8>>, len: usize) -> Vec<u8> {
    let mut data = spare.unwrap_or_default();
    data.clear();
    data.reserve_exact(len);
    data
}

/// Whether `e`, from a read of a version, says that version is gone (replaced or removed).
pub(super) fn version_gone(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|s| s.downcast_ref::<super::client::ClientError>())
        .is_some_and(|c| {
            c.is(super::client::Failure::Precondition) || c.is(super::client::Failure::NotFound)
        })
}

/// Fetches `start..end` of version `etag` of `key` (see the module docs for a version gone).
/// `fetch_range`, failing at once within `UNAVAILABLE_RECENTLY` of a fetch that found the
/// store unavailable (noted in `unavailable`, as this one's is).
fn fetch_noting(
    shared: &Shared,
    key: &str,
    etag: &str,
    (start, end): (u64, u64),
    write: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    unavailable: &Unavailable,
) -> io::Result<()> {
    if let Some((at, why)) = &*unavailable.lock().unwrap_or_else(|e| e.into_inner())
        && at.elapsed() < UNAVAILABLE_RECENTLY
    {
        return Err(io::Error::other(format!(
            "{why} (the store did not answer {:.1} s ago: not asked again yet)",
            at.elapsed().as_secs_f64()
        )));
    }
    let result = fetch_range(shared, key, etag, start, end, write);
    if let Err(e) = &result
        && e.get_ref()
            .and_then(|e| e.downcast_ref::<super::client::ClientError>())
            .is_some_and(|e| e.is(super::client::Failure::Unavailable))
    {
        *unavailable.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), e.to_string()));
    }
    result
}

pub fn fetch_range(
    shared: &Shared,
    key: &str,
    etag: &str,
    start: u64,
    end: u64,
    write: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    if end <= start {
        return Ok(());
    }
    match shared
        .client
        .get(key, Some((start, end)), Some(etag), write)
    {
        Ok(info) => {
            shared.learn_lineage(key, &info.etag, &info.metadata);
            Ok(())
        }
        Err(e)
            if e.is(super::client::Failure::Precondition)
                || e.is(super::client::Failure::NotFound) =>
        {
            // Reported by whoever asked (a reader gets EIO, logged by the core with this
            // cause; an append reads its base again).
            log::debug!(
                "{key}: the version a reader opened was replaced or removed by another writer; \
                 its bytes {start}..{end} cannot be read any more ({e})"
            );
            Err(io::Error::other(e))
        }
        Err(e) => Err(io::Error::other(e)),
    }
}

impl Content for S3Content {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let size = self.meta.size;
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        if let Some(e) = &self.whole {
            crate::metrics::cache_read(true);
            let want = (buf.len() as u64).min(size - offset) as usize;
            use std::os::unix::fs::FileExt;
            let mut done = 0;
            while done < want {
                match e
                    .file()
                    .read_at(&mut buf[done..want], offset + done as u64)?
                {
                    0 => break,
                    n => done += n,
                }
            }
            return Ok(done);
        }
        let len = (buf.len() as u64).min(size - offset);
        if size >= STREAM_MIN && self.streaming(offset, len) {
            // A sequential reader of a large object: what is cached is read from the cache,
            // the rest through memory windows, fetched ahead while it reads. Through the cache
            // file the same bytes cost twice the CPU (written, then read back: measured 2x
            // slower on a 2-core machine); the kernel's page cache keeps what was read for
            // re-reads of this version.
            if let Some(e) = self.shared.cache.lookup(&self.key, &self.etag)
                && e.has(offset, offset + len)
            {
                return e.read(buf, offset, 0, &|s, e, w| self.fetch(s, e, w));
            }
            return self.read_windowed(buf, offset);
        }
        let Some(entry) = self
            .grown_entry()
            .or_else(|| self.shared.cache.entry(&self.key, &self.etag, size))
        else {
            return self.read_windowed(buf, offset);
        };
        if size <= WHOLE_MAX {
            return entry.read(buf, offset, size, &|s, e, w| self.fetch(s, e, w));
        }
        if size < STREAM_MIN && self.streaming(offset, len) {
            // A sequential reader: what follows its read is fetched in the background, in
            // several requests at once, while it reads (a single stream of GETs is several
            // times slower than the store).
            let (shared, key, etag) = (self.shared.clone(), self.key.clone(), self.etag.clone());
            let unavailable = self.unavailable.clone();
            let fetch: Arc<super::cache::OwnedFetch> = Arc::new(move |s, e, w| {
                fetch_noting(&shared, &key, &etag, (s, e), w, &unavailable)
            });
            entry.prefetch(
                offset + len,
                offset + len + PREFETCH_AHEAD,
                PREFETCH_PIECE,
                &self.shared.pool,
                fetch,
            );
        }
        entry.read(buf, offset, 0, &|s, e, w| self.fetch(s, e, w))
    }

    fn read_appended_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset < self.meta.size {
            return match self.read_at(buf, offset) {
                // Another host appended to the file since (a `tail -f` of its log, whose
                // pages the kernel reads again from the start when the file grows): the
                // newer version begins with these bytes, and is read instead.
                Err(e) if version_gone(&e) => match self.follower(true)? {
                    Some(next) => next.read_appended_at(buf, offset),
                    None => Err(e),
                },
                // A read across this version's end goes on into the appends after it: cut
                // there, the page the kernel reads (up to the longer size it knows) would
                // hold zeros where they are.
                Ok(n) if n < buf.len() && offset + n as u64 == self.meta.size => {
                    match self.follower(false)? {
                        Some(next) => {
                            Ok(n + next.read_appended_at(&mut buf[n..], offset + n as u64)?)
                        }
                        None => Ok(n),
                    }
                }
                done => done,
            };
        }
        match self.follower(false)? {
            Some(next) => next.read_appended_at(buf, offset),
            None => Ok(0),
        }
    }

    fn meta(&self) -> &Meta {
        &self.meta
    }

    fn local(&self) -> Option<LocalFile<'_>> {
        // Not a version fetched from the store: a reader the kernel served from it would not
        // read on into what another host appends (one this host writes grows its file).
        self.whole
            .as_ref()
            .filter(|e| e.written_here)
            .map(|e| LocalFile {
                file: e.file(),
                // A file grown in place by appends is the same file for each version it holds.
                object: Version::from_tag(&e.object),
            })
    }
}
