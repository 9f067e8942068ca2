//! Lazy seeding of a large working copy: the committed content is copied by a background
//! thread, and on demand, instead of all at once at the first write.
//!
//! So that a writer's first write into a large file does not wait for the whole file to be
//! copied (tens of milliseconds for 64 MiB), the working copy starts as a sparse file of the
//! committed size, and the copy is tracked in 4 KiB blocks: a block a write covers entirely is
//! simply marked as present (the write supplies it), a block a write or read covers in part is
//! copied first, and a background thread copies every block still missing, a chunk at a time.
//! A block is copied at most once and never after a write into it, so a copy never overwrites
//! newer data. Commits and truncations wait until every block is present ([`Seeding::finish`]).
//!
//! A writer that may commit only the ranges it changed (`Change::Ranges`) seeds without
//! the background copier: the working copy then holds only the blocks it wrote (and those it
//! read in part), which [`Seeding::written`] lists for the commit. Should the store not be
//! able to commit those alone, `finish` still copies the rest.
//!
//! The bookkeeping is proportional to what was written or seeded, never to the file's size
//! (an agent can `truncate -s 16T` a file and write one byte into it): the chunks below a
//! watermark are all present, and a map keeps only the chunks that differ from what the
//! watermark says of them (some blocks present above it, or missing again below it, or
//! written into). The background copier moves the watermark as it goes, so what it copied
//! takes no room.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::store::{Content, WorkingCopy, copy_range};

/// Files at least this large are seeded lazily; smaller ones are copied at once (a store
/// that commits changed ranges alone may ask for lazy seeding of smaller ones, see
/// `Capabilities::ranged_commits_from`).
pub const LAZY_SEED_MIN: u64 = 4 << 20;
const BLOCK: u64 = 4096;
/// Blocks per chunk: one bit each in a `u64`.
const BLOCKS: u64 = 64;
const CHUNK: u64 = BLOCK * BLOCKS;

#[derive(Clone, Copy, Default)]
struct Chunk {
    /// Blocks that hold their final data (seeded, or marked for a write that covers them).
    present: u64,
    /// Blocks the writer wrote into (in full or in part).
    written: u64,
}

/// Which blocks of the working copy are present and written (see the module docs).
struct Chunks {
    /// Every chunk below this one is present, unless `touched` says otherwise.
    seeded_below: usize,
    /// The chunks that are not as `seeded_below` says: a chunk at or above it that is not here
    /// has no block present, one below it that is not here has all, and neither was written.
    touched: BTreeMap<usize, Chunk>,
    /// The chunk the background copier is copying.
    copying: Option<usize>,
}

impl Chunks {
    fn get(&self, index: usize) -> Chunk {
        self.touched.get(&index).copied().unwrap_or(Chunk {
            present: if index < self.seeded_below {
                u64::MAX
            } else {
                0
            },
            written: 0,
        })
    }

    fn get_mut(&mut self, index: usize) -> &mut Chunk {
        let chunk = self.get(index);
        self.touched.entry(index).or_insert(chunk)
    }

    /// Forgets what chunk `index` of a file of `len` bytes no longer needs remembered, and
    /// moves the watermark over the chunks now present.
    fn tidy(&mut self, index: usize, len: u64) {
        let full =
            |i: usize, c: &Chunk| c.present & blocks_in_file(i, len) == blocks_in_file(i, len);
        if let Some(c) = self.touched.get(&index)
            && c.written == 0
            && (index < self.seeded_below && full(index, c)
                || index >= self.seeded_below && c.present == 0)
        {
            self.touched.remove(&index);
        }
        let count = len.div_ceil(CHUNK) as usize;
        while self.seeded_below < count && self.copying != Some(self.seeded_below) {
            let i = self.seeded_below;
            match self.touched.get(&i) {
                Some(c) if full(i, c) => {
                    if c.written == 0 {
                        self.touched.remove(&i);
                    }
                    self.seeded_below += 1;
                }
                _ => break,
            }
        }
    }

    /// The first chunk from `from` below `last` that may miss blocks.
    fn next_to_check(&self, from: usize, last: usize) -> Option<usize> {
        if from < self.seeded_below {
            let below = self.seeded_below.min(last);
            if let Some((&i, _)) = self
                .touched
                .range(from..below)
                .find(|(_, c)| c.present != u64::MAX)
            {
                return Some(i);
            }
        }
        let next = from.max(self.seeded_below);
        (next < last).then_some(next)
    }
}

/// The seeding state of one working copy, shared with its background copier.
pub struct Seeding {
    source: Arc<dyn Content>,
    dest: Arc<dyn WorkingCopy>,
    len: u64,
    chunks: Mutex<Chunks>,
    copied: Condvar,
    /// Set when the working copy is dropped or cut: the copier stops.
    cancelled: AtomicBool,
    /// No background copier: blocks are copied only when a read or a partial write needs them.
    on_demand: bool,
}

/// The bits of the blocks of chunk `index` that exist in a file of `len` bytes.
fn blocks_in_file(index: usize, len: u64) -> u64 {
    let start = index as u64 * CHUNK;
    let blocks = (len.saturating_sub(start)).div_ceil(BLOCK).min(BLOCKS);
    if blocks == BLOCKS {
        u64::MAX
    } else {
        (1u64 << blocks) - 1
    }
}

impl Seeding {
    /// Starts seeding `dest` (already sized to `len`) from `source`, copying in the background
    /// unless `on_demand`.
    pub fn start(
        source: Arc<dyn Content>,
        dest: Arc<dyn WorkingCopy>,
        len: u64,
        on_demand: bool,
    ) -> Arc<Seeding> {
        let seeding = Arc::new(Seeding {
            source,
            dest,
            len,
            chunks: Mutex::new(Chunks {
                seeded_below: 0,
                touched: BTreeMap::new(),
                copying: None,
            }),
            copied: Condvar::new(),
            cancelled: AtomicBool::new(false),
            on_demand,
        });
        if on_demand {
            return seeding;
        }
        let copier = seeding.clone();
        let spawned = std::thread::Builder::new()
            .name("roomfs-seed".into())
            .spawn(move || {
                // Idle time only: the requests the writer is waiting for come first.
                // SAFETY: a plain syscall on this thread.
                unsafe {
                    let param = libc::sched_param { sched_priority: 0 };
                    libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
                }
                copier.copy_all_in_background()
            });
        if let Err(e) = spawned {
            // Nothing lost: missing blocks are still copied by `finish`.
            log::debug!("seeding without a background copier: {e}");
        }
        seeding
    }

    fn lock(&self) -> MutexGuard<'_, Chunks> {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the background copier is done with chunk `index` (any chunk: `None`).
    fn idle<'a>(
        &'a self,
        mut chunks: MutexGuard<'a, Chunks>,
        index: Option<usize>,
    ) -> MutexGuard<'a, Chunks> {
        while chunks.copying.is_some() && (index.is_none() || chunks.copying == index) {
            chunks = self.copied.wait(chunks).unwrap_or_else(|e| e.into_inner());
        }
        chunks
    }

    fn copy_all_in_background(&self) {
        let count = self.len.div_ceil(CHUNK) as usize;
        let mut index = 0;
        while index < count {
            let missing = {
                let mut chunks = self.lock();
                // Checked under the lock, so `finish_up_to` sees every copy it must wait for.
                if self.cancelled.load(Ordering::Relaxed) {
                    return;
                }
                index = index.max(chunks.seeded_below);
                if index >= count {
                    return;
                }
                let missing = blocks_in_file(index, self.len) & !chunks.get(index).present;
                if missing == 0 {
                    index += 1;
                    continue;
                }
                chunks.copying = Some(index);
                missing
            };
            let copied = self.copy_blocks(index, missing);
            let mut chunks = self.lock();
            if copied.is_ok() {
                chunks.get_mut(index).present |= missing;
            }
            chunks.copying = None;
            chunks.tidy(index, self.len);
            self.copied.notify_all();
            drop(chunks);
            if let Err(e) = copied {
                // The blocks stay missing: `finish` copies them, and reports its error (the
                // copier would likely meet the same one at every chunk).
                log::debug!("seeding stopped copying in the background: {e}");
                return;
            }
            index += 1;
        }
    }

    /// Copies the blocks of chunk `index` in `mask` from the source, in runs.
    fn copy_blocks(&self, index: usize, mask: u64) -> io::Result<()> {
        for (offset, len) in self.runs(index, mask) {
            copy_range(self.source.as_ref(), self.dest.as_ref(), offset, len)?;
        }
        Ok(())
    }

    /// The byte ranges of the runs of blocks set in `mask`, in chunk `index` (cut at the end
    /// of the seeded size).
    fn runs(&self, index: usize, mut mask: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let base = index as u64 * CHUNK;
        std::iter::from_fn(move || {
            if mask == 0 {
                return None;
            }
            let first = mask.trailing_zeros() as u64;
            let run = (mask >> first).trailing_ones() as u64;
            mask &= !(if run == BLOCKS {
                u64::MAX
            } else {
                ((1u64 << run) - 1) << first
            });
            let offset = base + first * BLOCK;
            Some((offset, (run * BLOCK).min(self.len - offset)))
        })
    }

    /// Prepares `offset..offset + len` of the working copy to be read (`write == false`) or
    /// overwritten: copies the blocks it needs from the seed, and marks the blocks a write
    /// covers entirely as present without copying them.
    pub fn prepare(&self, offset: u64, len: u64, write: bool) -> io::Result<()> {
        let end = (offset + len).min(self.len);
        if len == 0 || offset >= end {
            return Ok(());
        }
        let first_block = offset / BLOCK;
        let last_block = (end - 1) / BLOCK;
        let mut block = first_block;
        while block <= last_block {
            let index = (block / BLOCKS) as usize;
            let chunk_end = (index as u64 + 1) * BLOCKS - 1;
            let (mut copy, mut cover) = (0u64, 0u64);
            for b in block..=last_block.min(chunk_end) {
                let bit = 1u64 << (b % BLOCKS);
                let (start, stop) = (b * BLOCK, ((b + 1) * BLOCK).min(self.len));
                if write && offset <= start && offset + len >= stop {
                    cover |= bit;
                } else {
                    copy |= bit;
                }
            }
            let chunks = self.lock();
            let mut chunks = self.idle(chunks, Some(index));
            if write {
                chunks.get_mut(index).written |= copy | cover;
            }
            let copy = copy & !chunks.get(index).present;
            if copy != 0 {
                // The chunk stays locked while its few blocks are copied: the copier cannot
                // take them meanwhile.
                let copied = self.copy_blocks(index, copy);
                chunks.tidy(index, self.len);
                copied?;
            }
            chunks.get_mut(index).present |= copy | cover;
            chunks.tidy(index, self.len);
            block = chunk_end + 1;
        }
        Ok(())
    }

    /// A write prepared with [`prepare`](Self::prepare) failed: the blocks it was to supply
    /// are missing again (copied from the seed later), so the working copy never keeps a hole.
    pub fn write_failed(&self, offset: u64, len: u64) {
        let mut chunks = self.lock();
        let end = (offset + len).min(self.len);
        let mut block = offset.div_ceil(BLOCK);
        while (block + 1) * BLOCK <= end || (block * BLOCK < end && end == self.len) {
            let index = (block / BLOCKS) as usize;
            let chunk = chunks.get_mut(index);
            chunk.present &= !(1u64 << (block % BLOCKS));
            chunk.written &= !(1u64 << (block % BLOCKS));
            chunks.tidy(index, self.len);
            block += 1;
        }
    }

    /// Whether this working copy is seeded without a background copier (it may be patched).
    pub fn on_demand(&self) -> bool {
        self.on_demand
    }

    /// The byte ranges of the seeded size the writer wrote into, whole blocks, in order.
    pub fn written(&self) -> Vec<(u64, u64)> {
        let chunks = self.lock();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (&index, chunk) in &chunks.touched {
            for (start, len) in self.runs(index, chunk.written) {
                match ranges.last_mut() {
                    Some((s, l)) if *s + *l == start => *l += len,
                    _ => ranges.push((start, len)),
                }
            }
        }
        ranges
    }

    /// Copies everything still missing (before a commit).
    pub fn finish(&self) -> io::Result<()> {
        self.finish_up_to(self.len)
    }

    /// Copies what is missing below `size` and stops copying the rest (before truncating the
    /// working copy to `size`: no copy may land beyond it afterwards).
    pub fn finish_up_to(&self, size: u64) -> io::Result<()> {
        self.cancel();
        let mut chunks = self.lock();
        let end = size.min(self.len);
        let last = end.div_ceil(CHUNK) as usize;
        let mut from = 0;
        while let Some(index) = chunks.next_to_check(from, last) {
            chunks = self.idle(chunks, Some(index));
            let missing = blocks_in_file(index, end) & !chunks.get(index).present;
            if missing != 0 {
                self.copy_blocks(index, missing)?;
                chunks.get_mut(index).present |= missing;
                chunks.tidy(index, self.len);
            }
            from = index + 1;
        }
        // No copy may land after this returns (beyond a truncation).
        drop(self.idle(chunks, None));
        Ok(())
    }

    /// Stops the background copier (the working copy is being dropped).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Chunks the bookkeeping keeps a record of (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().touched.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mem::MemStore;
    use crate::store::{LocalFile, Meta, Store, Version};
    use std::path::Path;

    /// Committed content held in memory (not a local file: exercises the read/write copy).
    struct Bytes(Vec<u8>, Meta);

    impl Bytes {
        fn new(data: Vec<u8>) -> Bytes {
            let store = MemStore::new();
            let mut meta = store.stat(std::path::Path::new("")).unwrap();
            meta.size = data.len() as u64;
            meta.version = Version::from_words([1, 2, 3, 4]);
            Bytes(data, meta)
        }
    }

    impl Content for Bytes {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let start = (offset as usize).min(self.0.len());
            let n = buf.len().min(self.0.len() - start);
            buf[..n].copy_from_slice(&self.0[start..start + n]);
            Ok(n)
        }
        fn read_appended_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            self.read_at(buf, offset)
        }
        fn meta(&self) -> &Meta {
            &self.1
        }
        fn local(&self) -> Option<LocalFile<'_>> {
            None
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// An in-memory working copy of `len` bytes (zeros).
    fn working_copy(len: u64) -> Arc<dyn WorkingCopy> {
        let copy = MemStore::new().working_copy(Path::new("f")).unwrap();
        copy.set_len(len).unwrap();
        copy
    }

    /// A working copy of `len` bytes being seeded from a pattern: (the working copy, its
    /// seeding, the seed).
    fn seeding_of(len: u64) -> (Arc<dyn WorkingCopy>, Arc<Seeding>, Vec<u8>) {
        let seed = pattern(len as usize);
        let copy = working_copy(len);
        let seeding = Seeding::start(Arc::new(Bytes::new(seed.clone())), copy.clone(), len, false);
        (copy, seeding, seed)
    }

    fn read_exact(copy: &Arc<dyn WorkingCopy>, buf: &mut [u8], offset: u64) {
        let n = copy.read_at(buf, offset).unwrap();
        assert_eq!(n, buf.len(), "short read at {offset}");
    }

    fn contents(copy: &Arc<dyn WorkingCopy>, len: usize) -> Vec<u8> {
        let mut got = vec![0u8; len];
        read_exact(copy, &mut got, 0);
        got
    }

    #[test]
    fn writes_survive_the_background_copy_and_the_rest_is_seeded() {
        let len = 5 * CHUNK + 123;
        let (file, seeding, seed) = seeding_of(len);
        // Writes into chunks the copier may not have reached yet, and across a boundary.
        let mut expect = seed.clone();
        for (offset, data) in [(3 * CHUNK + 10, b"three"), (CHUNK - 2, b"cross")] {
            seeding.prepare(offset, data.len() as u64, true).unwrap();
            file.write_at(data, offset).unwrap();
            expect[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        }
        seeding.finish().unwrap();
        assert!(
            contents(&file, len as usize) == expect,
            "working copy = seed + the writes"
        );
        assert_eq!(
            seeding.tracked(),
            3,
            "only the chunks written into are remembered"
        );
    }

    /// Committed content of zeros, taking no room (a sparse file's).
    struct Zeros(Meta);

    impl Content for Zeros {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let n = (buf.len() as u64).min(self.0.size.saturating_sub(offset)) as usize;
            buf[..n].fill(0);
            Ok(n)
        }
        fn read_appended_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            self.read_at(buf, offset)
        }
        fn meta(&self) -> &Meta {
            &self.0
        }
        fn local(&self) -> Option<LocalFile<'_>> {
            None
        }
    }

    /// A working copy that keeps only what is written into it (zeros elsewhere).
    #[derive(Default)]
    struct Holes(std::sync::Mutex<Vec<(u64, Vec<u8>)>>);

    impl WorkingCopy for Holes {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            buf.fill(0);
            for (at, data) in self.0.lock().unwrap().iter() {
                for (i, b) in data.iter().enumerate() {
                    if let Some(j) = (at + i as u64).checked_sub(offset)
                        && (j as usize) < buf.len()
                    {
                        buf[j as usize] = *b;
                    }
                }
            }
            Ok(buf.len())
        }
        fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
            self.0.lock().unwrap().push((offset, data.to_vec()));
            Ok(())
        }
        fn set_len(&self, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn zero(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn reserve(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn stat(&self) -> io::Result<crate::store::CopyStat> {
            Err(io::Error::from_raw_os_error(libc::ENOTSUP))
        }
        fn local_file(&self) -> Option<&std::fs::File> {
            None
        }
    }

    #[test]
    fn a_byte_written_into_a_16_tib_sparse_file_costs_a_record_not_gigabytes() {
        let len = 16u64 << 40;
        let mut meta = Bytes::new(Vec::new()).1;
        meta.size = len;
        let copy = Arc::new(Holes::default());
        let seeding = Seeding::start(Arc::new(Zeros(meta)), copy.clone(), len, true);
        let offset = (5u64 << 40) + 3;
        seeding.prepare(offset, 1, true).unwrap();
        copy.write_at(b"x", offset).unwrap();
        assert_eq!(seeding.tracked(), 1, "one chunk remembered");
        let block = offset / BLOCK * BLOCK;
        assert_eq!(seeding.written(), vec![(block, BLOCK)]);
        // The block written in part was seeded first (one copy of its 4 KiB).
        let writes = copy.0.lock().unwrap().clone();
        assert_eq!(
            writes,
            vec![(block, vec![0; BLOCK as usize]), (offset, b"x".to_vec())]
        );
        // A failed write's block is missing again, and forgotten once nothing is left of it.
        seeding.write_failed(block, BLOCK);
        assert_eq!(seeding.tracked(), 0);
    }

    #[test]
    fn a_cancelled_seeding_still_copies_on_demand() {
        let len = 3 * CHUNK;
        let (file, seeding, seed) = seeding_of(len);
        seeding.cancel();
        seeding.prepare(2 * CHUNK, 10, false).unwrap();
        let mut got = [0u8; 10];
        read_exact(&file, &mut got, 2 * CHUNK);
        assert_eq!(&got, &seed[2 * CHUNK as usize..2 * CHUNK as usize + 10]);
        seeding.finish().unwrap();
    }

    #[test]
    fn random_writes_and_reads_match_a_model() {
        let len = 3 * CHUNK + 5000;
        let (file, seeding, seed) = seeding_of(len);
        let mut model = seed.clone();
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for round in 0..300 {
            let offset = next(len);
            let size = 1 + next(3 * BLOCK);
            if round % 3 == 0 {
                seeding.prepare(offset, size, false).unwrap();
                let end = (offset + size).min(len) as usize;
                let mut got = vec![0u8; end - offset as usize];
                read_exact(&file, &mut got, offset);
                assert!(
                    got == model[offset as usize..end],
                    "read at {offset}+{size}"
                );
            } else {
                let data = vec![(round % 250) as u8 + 1; size as usize];
                seeding.prepare(offset, size, true).unwrap();
                file.write_at(&data, offset).unwrap();
                let end = offset as usize + data.len();
                if end > model.len() {
                    model.resize(end, 0);
                }
                model[offset as usize..end].copy_from_slice(&data);
            }
        }
        seeding.finish().unwrap();
        assert!(contents(&file, model.len()) == model);
    }

    #[test]
    fn on_demand_seeding_copies_only_what_reads_and_partial_writes_need() {
        let len = 3 * CHUNK + 100;
        let seed = pattern(len as usize);
        let file = working_copy(len);
        let seeding = Seeding::start(Arc::new(Bytes::new(seed.clone())), file.clone(), len, true);
        assert!(seeding.on_demand());
        // A whole block, a partial write across two blocks, a read, and the last short block.
        seeding.prepare(BLOCK, BLOCK, true).unwrap();
        seeding.prepare(CHUNK - 10, 20, true).unwrap();
        seeding.prepare(2 * CHUNK, 10, false).unwrap();
        seeding.prepare(len - 50, 50, true).unwrap();
        let last = (len - 1) / BLOCK * BLOCK;
        assert_eq!(
            seeding.written(),
            vec![
                (BLOCK, BLOCK),
                (CHUNK - BLOCK, 2 * BLOCK),
                (last, len - last)
            ],
            "adjacent blocks merge across chunks; the read is not a write"
        );
        // The partially written blocks were copied first; nothing else was copied.
        let mut got = vec![0u8; BLOCK as usize];
        read_exact(&file, &mut got, CHUNK - BLOCK);
        assert!(got == seed[(CHUNK - BLOCK) as usize..CHUNK as usize]);
        read_exact(&file, &mut got, 3 * BLOCK);
        assert!(
            got.iter().all(|&b| b == 0),
            "an untouched block stays a hole"
        );
        seeding.write_failed(BLOCK, BLOCK);
        assert_eq!(seeding.written()[0], (CHUNK - BLOCK, 2 * BLOCK));
        seeding.finish().unwrap();
        assert!(
            contents(&file, len as usize) == seed,
            "finish copies the rest"
        );
    }

    #[test]
    fn a_failed_write_gets_its_blocks_from_the_seed_again() {
        let len = 2 * CHUNK;
        let (file, seeding, seed) = seeding_of(len);
        seeding.cancel(); // no background copy: only `finish` can fill the blocks
        seeding.prepare(BLOCK, 2 * BLOCK, true).unwrap();
        seeding.write_failed(BLOCK, 2 * BLOCK);
        seeding.finish().unwrap();
        assert!(contents(&file, len as usize) == seed);
    }
}
