//! What an S3 store keeps on local disk, per process: the spool of working copies, the read
//! cache, and a journal of the requests a crash must not leave half done.
//!
//! Layout: `<state dir>/proc-<pid>-<n>/` for each process using the store (a lock file held
//! with `flock` while it runs), with `spool/`, `cache/` and `journal/` inside. The journal has
//! one small JSON file per operation in flight, written before its first request and removed
//! after its last:
//! - a multipart upload (its key and upload id): a `kill -9` leaves the upload's parts on the
//!   server, invisible but paid for;
//! - a directory rename (every object copied, then deleted: not atomic on S3);
//! - a file rename (a copy, then a delete): a crash between them leaves the file at both names.
//!
//! At start, every `proc-*` directory whose lock nobody holds is a crashed process's: its
//! journal is replayed — uploads aborted, renames finished — and the directory removed (its
//! spool and cache go with it). A replay that fails (the store is unreachable) leaves the
//! journal for the next start. Only this host's own journal is replayed, so only this host's
//! dangling uploads are aborted.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// One operation in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Record {
    /// A multipart upload: abort it if found after a crash.
    Upload { key: String, upload_id: String },
    /// A directory rename from the prefix `from` to the prefix `to` (both end in `/`), in the
    /// space whose keys start with `root`: finish it after a crash. `from_name`/`to_name` are
    /// the directory's entry in its parent's index (the parents' paths relative to the space).
    Rename {
        root: String,
        from: String,
        to: String,
    },
    /// A file rename from the key `from` to the key `to` in the space whose keys start with
    /// `root`: the source's ETag when the rename began, and the target's (`None`: absent, as
    /// far as this host knew). After a crash, the source goes if the copy is found made and
    /// the source is still that version (see `S3Spaces::recover`).
    FileRename {
        root: String,
        from: String,
        to: String,
        source: String,
        target: Option<String>,
    },
}

/// A record in the journal, removed by [`Journaled::done`] (dropped without it, the record
/// stays for the next start to replay, as after a crash).
#[derive(Debug)]
pub struct Journaled {
    path: PathBuf,
}

impl Journaled {
    /// The operation is over: forget it.
    pub fn done(self) {
        if let Err(e) = fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            log::warn!("cannot remove journal record {}: {e}", self.path.display());
        }
    }
}

/// This process's local state (see the module docs).
pub struct LocalState {
    dir: PathBuf,
    _lock: File,
    next: AtomicU64,
}

/// A crashed process's journal, to replay.
pub struct Leftover {
    pub dir: PathBuf,
    pub records: Vec<(PathBuf, Record)>,
}

impl Leftover {
    /// Forgets one replayed record.
    pub fn forget(&self, path: &Path) {
        let _ = fs::remove_file(path);
    }

    /// Removes the directory once its journal is empty (its spool and cache in any case).
    pub fn finish(&self) {
        let _ = fs::remove_dir_all(self.dir.join("spool"));
        let _ = fs::remove_dir_all(self.dir.join("cache"));
        let journal = self.dir.join("journal");
        let empty = fs::read_dir(&journal).map_or(true, |mut d| d.next().is_none());
        if empty {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: a valid descriptor; flock takes no pointers.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

impl LocalState {
    /// Makes this process's directory under `root` and finds the journals crashed processes
    /// left there.
    pub fn open(root: &Path) -> io::Result<(LocalState, Vec<Leftover>)> {
        fs::create_dir_all(root)?;
        let mut leftovers = Vec::new();
        for entry in fs::read_dir(root)? {
            let entry = entry?;
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with("proc-") {
                continue;
            }
            let dir = entry.path();
            let lock = match File::open(dir.join("lock")) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Made but never locked: nothing in it can be in flight.
                    let _ = fs::remove_dir_all(&dir);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if !try_lock(&lock)? {
                continue; // a live process's
            }
            let mut records = Vec::new();
            if let Ok(journal) = fs::read_dir(dir.join("journal")) {
                for r in journal.flatten() {
                    let path = r.path();
                    match fs::read(&path)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
                    {
                        Some(record) => records.push((path, record)),
                        None => {
                            log::warn!("dropping unreadable journal record {}", path.display());
                            let _ = fs::remove_file(&path);
                        }
                    }
                }
            }
            leftovers.push(Leftover { dir, records });
        }
        let mut n = 0u32;
        let dir = loop {
            let dir = root.join(format!("proc-{}-{n}", std::process::id()));
            match fs::create_dir(&dir) {
                Ok(()) => break dir,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(e),
            }
        };
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        if !try_lock(&lock)? {
            return Err(io::Error::other(format!(
                "{} is locked by another process",
                dir.display()
            )));
        }
        for sub in ["spool", "cache", "journal"] {
            fs::create_dir(dir.join(sub))?;
        }
        Ok((
            LocalState {
                dir,
                _lock: lock,
                next: AtomicU64::new(1),
            },
            leftovers,
        ))
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.dir.join("spool")
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.dir.join("cache")
    }

    /// Writes `record` to the journal before the operation's first request.
    pub fn journal(&self, record: &Record) -> io::Result<Journaled> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join("journal").join(format!("{n}.json"));
        let tmp = self.dir.join("journal").join(format!(".{n}.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(record).map_err(io::Error::other)?)?;
        drop(f);
        fs::rename(&tmp, &path)?;
        Ok(Journaled { path })
    }
}

impl Drop for LocalState {
    fn drop(&mut self) {
        // A clean end: nothing is in flight any more (what is, the next start replays).
        let journal = self.dir.join("journal");
        let empty = fs::read_dir(&journal).map_or(true, |mut d| d.next().is_none());
        if empty {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_processs_journal_is_found_and_a_live_ones_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let (live, left) = LocalState::open(tmp.path()).unwrap();
        assert!(left.is_empty());
        let rec = Record::Upload {
            key: "k".into(),
            upload_id: "u".into(),
        };
        let j = live.journal(&rec).unwrap();
        // Another process (here: a second state) sees the live one's directory locked.
        let (other, left) = LocalState::open(tmp.path()).unwrap();
        assert!(left.is_empty(), "a live process's journal is not replayed");
        drop(other);
        // The first one "crashes": its lock goes with it, the record stays.
        std::mem::forget(j);
        let dir = live.dir.clone();
        drop(live); // releases the lock; the journal is not empty, so the dir stays
        assert!(dir.exists());
        let (_third, left) = LocalState::open(tmp.path()).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].records.len(), 1);
        assert_eq!(left[0].records[0].1, rec);
        left[0].forget(&left[0].records[0].0);
        left[0].finish();
        assert!(!dir.exists());
    }
}
