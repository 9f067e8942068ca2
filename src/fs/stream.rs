//! The output of running processes, published while they run.
//!
//! Agents start servers and training runs with their output in a file (`server > log &`,
//! `>> log`, `print(..., flush=True)`), then read it to see how they are doing. Committing only
//! at close would show an empty log until the process exits. So a file written *sequentially*
//! (every write at the end of what the writer sees, see `FileHandle::stream_due`) by a
//! descriptor that stays open is committed by the mount itself at least every
//! `PUBLISH_EVERY` while its output grows: readers in this mount and, through each commit,
//! in other mounts see the output grow, each time a whole prefix of it. Each publication is an
//! ordinary commit (atomic, crash-safe: a crash leaves the last one); after the first, a
//! growing log is committed by adding its new bytes in place, so publishing costs what the new
//! bytes cost, not the file's size.
//!
//! A store whose every commit rewrites the whole object (S3) bounds this: past its
//! `Capabilities::stream_commits_up_to` (the part size), the output waits for the close.
//!
//! Writers that close within `PUBLISH_EVERY` — the ordinary short write of a file — and
//! writers that seek back, truncate, or share a read-write open (a database) are committed at
//! close only, whole, as always.

use std::time::Instant;

use super::{Fs, read_lock};

impl Fs {
    /// Publishes the output of the sequential writers that are due (see the module docs);
    /// returns how many it committed. A handle busy in a request is left for the next round.
    /// The mount calls it from a thread of its own a few times a second.
    pub fn publish_streams(&self) -> usize {
        self.publish_streams_at(Instant::now())
    }

    /// `publish_streams` as of `now`.
    pub fn publish_streams_at(&self, now: Instant) -> usize {
        let handles: Vec<_> = read_lock(&self.files).values().cloned().collect();
        let most = self.store.capabilities().stream_commits_up_to;
        let mut published = 0;
        let mut seen = Vec::new();
        for handle in handles {
            // Read-write opens share one handle under several descriptors.
            let key = std::sync::Arc::as_ptr(&handle);
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            let Ok(mut h) = handle.try_lock() else {
                continue;
            };
            if !h.stream_due(now) {
                continue;
            }
            if let Some(most) = most
                && h.size().is_ok_and(|size| size > most)
            {
                // Each commit would rewrite the whole object: this one waits for its close.
                continue;
            }
            match self.commit(&mut h, self.options.sync_on_close) {
                Ok(()) => published += 1,
                // Kept for the close, which reports it.
                Err(e) => log::warn!("publishing the output of inode {} failed: {e}", h.ino),
            }
            h.mark_published(now);
        }
        published
    }
}
