//! Appends committed in place. Bytes appended through a handle (`O_APPEND`) are committed by
//! writing them at the end of the committed file itself, instead of copying the whole file into
//! a working copy and exchanging names: a commit then costs the same for a 1 KiB log as for a
//! 1 GiB one, and frees no blocks.
//!
//! What keeps this as safe as an exchange:
//! - Isolation: the tail is written only at commit (until then it waits in the handle), and
//!   readers read past the size they opened only while no append is under way (no marker,
//!   below), so they see whole appends only (`LocalContent::read_appended_at`).
//! - One appender at a time: the appender holds an exclusive `flock` on the file (shared by all
//!   processes using the data dir) and checks the file still is the version it started from.
//! - Crash safety: before writing, a hard link to the file is made in the staging area, named
//!   after the file's size and mtime before the append; it is removed when the tail is in.
//!   A process starting later finds the marker of a dead one and cuts the file back (and
//!   restores its mtime), so a `kill -9` mid-append leaves the previous version. While a
//!   marker exists the file has a second link, which makes every other appender stand aside.
//! - A tail that falls within one 4 KiB page of the file (a new small file, a log line) needs
//!   no marker: it is written by one `pwrite`, which the kernel copies into that page whole or
//!   not at all (a process killed meanwhile finishes the system call; the check for a fatal
//!   signal comes only between pages), and the file's size grows only once the bytes are in,
//!   so readers see the file before or after it. The `flock` still keeps other appenders out.
//! - Power loss: a durable append (`fsync`, `--sync-on-close`) syncs the marker's directory
//!   before the tail is written, then the file, then removes the marker and syncs its directory
//!   again (a marker coming back after a power cut would cut a durable append off); a tail
//!   within one page syncs the file. Until the append returns, a power cut leaves the file
//!   before or after it; a sync that fails takes the tail back out.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use super::at::{At, Dir};
use super::patch::{open_for_change, target_name};
use super::staging::{link_open_file, markers, open_in};

/// What a marker records: the file's size and mtime before the append, and the size after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendMark {
    pub from: u64,
    pub to: u64,
    pub mtime: (i64, i64),
}

impl AppendMark {
    const PREFIX: &'static str = "append-";

    /// The marker's file name (`n` keeps names unique within a staging area).
    pub fn name(&self, n: u64) -> String {
        let (sec, nsec) = self.mtime;
        format!("{}{}-{}-{sec}.{nsec}-{n}", Self::PREFIX, self.from, self.to)
    }

    pub fn parse(name: &str) -> Option<AppendMark> {
        let mut parts = name.strip_prefix(Self::PREFIX)?.splitn(4, '-');
        let from = parts.next()?.parse().ok()?;
        let to = parts.next()?.parse().ok()?;
        let (sec, nsec) = parts.next()?.split_once('.')?;
        parts.next()?.parse::<u64>().ok()?;
        Some(AppendMark {
            from,
            to,
            mtime: (sec.parse().ok()?, nsec.parse().ok()?),
        })
    }
}

/// Appends `tail` to the committed file `target`, which must still be the object
/// `(dev, ino)` of size `size`. `marker` names the crash marker (a fresh name in the staging
/// directory `staging`, on the same filesystem); `durable`: on disk before it returns. Returns
/// the file (open for reading) when the tail is in, `None` when the file is not in the
/// expected state or another appender holds it.
pub fn append_in_place(
    target: &At,
    (dev, ino): (u64, u64),
    size: u64,
    tail: &[u8],
    staging: &Dir,
    marker: impl FnOnce(&AppendMark) -> String,
    durable: bool,
) -> io::Result<Option<File>> {
    let Some(file) = open_for_change(target) else {
        return Ok(None);
    };
    let result = append_locked(&file, (dev, ino), size, tail, staging, marker, durable);
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
    Ok(result?.then_some(file))
}

fn append_locked(
    file: &File,
    (dev, ino): (u64, u64),
    size: u64,
    tail: &[u8],
    staging: &Dir,
    marker: impl FnOnce(&AppendMark) -> String,
    durable: bool,
) -> io::Result<bool> {
    let now = file.metadata()?;
    // A second link is another appender's marker (alive, or dead and not yet rolled back).
    if !now.is_file()
        || (now.dev(), now.ino()) != (dev, ino)
        || now.len() != size
        || now.nlink() != 1
    {
        return Ok(false);
    }
    let mark = AppendMark {
        from: size,
        to: size + tail.len() as u64,
        mtime: (now.mtime(), now.mtime_nsec()),
    };
    if within_one_page(size, tail.len()) {
        // Whole or not at all (see the module docs): no marker to make and remove.
        let written = file.write_all_at(tail, size);
        let synced = written.and_then(|()| if durable { file.sync_all() } else { Ok(()) });
        if let Err(e) = synced {
            if let Err(undo) = roll_back(file, &mark) {
                log::error!(
                    "append to {} failed ({e}) and could not be undone ({undo})",
                    target_name(file)
                );
            }
            return Err(e);
        }
        return Ok(true);
    }
    let marker = marker(&mark);
    let remove = || staging.at(Path::new(&marker)).and_then(|at| unlink(&at));
    if let Err(e) = link_open_file(file, staging, &marker) {
        log::debug!("no crash marker for an in-place append ({e}): copying instead");
        return Ok(false);
    }
    if durable && let Err(e) = staging.sync() {
        let _ = remove();
        return Err(e);
    }
    let written = file.write_all_at(tail, size);
    let synced = written.and_then(|()| if durable { file.sync_all() } else { Ok(()) });
    let done = synced.and_then(|()| remove());
    if let Err(e) = done {
        // Take the tail back out; if that fails too, the marker stays for the next start.
        match roll_back(file, &mark) {
            Ok(()) => {
                let _ = remove();
            }
            Err(undo) => log::error!(
                "append to {} failed ({e}) and could not be undone ({undo}); \
                 the next start undoes it",
                target_name(file)
            ),
        }
        return Err(e);
    }
    if durable {
        // The tail is on disk; its marker must not come back after a power cut.
        staging.sync()?;
    }
    Ok(true)
}

/// The smallest page size Linux has: a write within one such page is within one page of any.
const PAGE: u64 = 4096;

/// Whether `len` bytes written at `offset` fall within one page of the file.
fn within_one_page(offset: u64, len: usize) -> bool {
    len > 0 && offset / PAGE == (offset + len as u64 - 1) / PAGE
}

/// Cuts `file` back to its size before the append and restores its mtime.
fn roll_back(file: &File, mark: &AppendMark) -> io::Result<()> {
    file.set_len(mark.from)?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: mark.mtime.0,
            tv_nsec: mark.mtime.1,
        },
    ];
    if unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Undoes the appends a dead process left unfinished in its staging directory `dir`; returns
/// how many it undid. A file whose size is outside what the marker allows was changed since by
/// something else and is left alone.
pub fn roll_back_unfinished(dir: &Dir) -> usize {
    let mut undone = 0;
    for (mark, name) in markers(dir, AppendMark::parse) {
        let result = open_in(dir, &name, libc::O_WRONLY | libc::O_NONBLOCK).and_then(|file| {
            let m = file.metadata()?;
            if m.is_file() && (mark.from..=mark.to).contains(&m.len()) {
                roll_back(&file, &mark).map(|()| true)
            } else {
                Ok(false)
            }
        });
        match result {
            Ok(true) => {
                undone += 1;
                log::warn!(
                    "undid an append interrupted by a crash (file cut back to {} bytes)",
                    mark.from
                );
            }
            Ok(false) => {}
            Err(e) => log::error!("could not undo an interrupted append ({e})"),
        }
    }
    undone
}

/// `unlinkat` of a name that is not a directory.
fn unlink(at: &At) -> io::Result<()> {
    // SAFETY: a valid descriptor and a NUL-terminated name.
    super::at::check(unsafe { libc::unlinkat(at.dir(), at.name().as_ptr(), 0) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn only_tails_within_one_page_go_without_a_marker() {
        assert!(within_one_page(0, 1));
        assert!(within_one_page(0, 4096));
        assert!(!within_one_page(0, 4097));
        assert!(within_one_page(4000, 96));
        assert!(!within_one_page(4000, 97));
        assert!(within_one_page(8192, 4096));
        assert!(
            !within_one_page(10, 0),
            "nothing to write: the marked path decides"
        );
    }

    #[test]
    fn marks_round_trip_through_their_names() {
        let mark = AppendMark {
            from: 10,
            to: 25,
            mtime: (1_700_000_000, 123_456_789),
        };
        assert_eq!(AppendMark::parse(&mark.name(7)), Some(mark));
        assert_eq!(AppendMark::parse("w12"), None);
        assert_eq!(AppendMark::parse("append-1-2-x.y-3"), None);
    }

    #[test]
    fn appends_only_to_the_expected_version_and_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let held = Dir::open_trusted(dir.path(), false).unwrap();
        let target = dir.path().join("log");
        fs::write(&target, b"one\n").unwrap();
        let m = fs::metadata(&target).unwrap();
        let id = (m.dev(), m.ino());
        let at = || held.at(Path::new("log")).unwrap();
        let marker = |_: &AppendMark| "marker".to_string();

        // Wrong size: somebody appended meanwhile.
        assert!(
            append_in_place(&at(), id, 3, b"x", &held, marker, false)
                .unwrap()
                .is_none()
        );
        // Another appender holds the file.
        let other = File::open(&target).unwrap();
        assert_eq!(
            unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
            0
        );
        assert!(
            append_in_place(&at(), id, 4, b"x", &held, marker, false)
                .unwrap()
                .is_none()
        );
        drop(other);
        // A marker (second link) of an unfinished append.
        fs::hard_link(&target, dir.path().join("stale")).unwrap();
        assert!(
            append_in_place(&at(), id, 4, b"x", &held, marker, false)
                .unwrap()
                .is_none()
        );
        fs::remove_file(dir.path().join("stale")).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"one\n");

        let file = append_in_place(&at(), id, 4, b"two\n", &held, marker, false)
            .unwrap()
            .expect("appended");
        assert_eq!(fs::read(&target).unwrap(), b"one\ntwo\n");
        assert_eq!(file.metadata().unwrap().nlink(), 1, "the marker is gone");
        assert!(!dir.path().join("marker").exists());
    }

    #[test]
    fn a_dead_appenders_marker_cuts_the_file_back() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("staging");
        fs::create_dir(&staging).unwrap();
        let target = dir.path().join("log");
        fs::write(&target, b"kept\n").unwrap();
        let old = fs::metadata(&target).unwrap();
        let mark = AppendMark {
            from: 5,
            to: 12,
            mtime: (old.mtime(), old.mtime_nsec()),
        };
        fs::hard_link(&target, staging.join(mark.name(0))).unwrap();
        // The crash came in the middle of the tail.
        std::thread::sleep(std::time::Duration::from_millis(10));
        let f = fs::OpenOptions::new().append(true).open(&target).unwrap();
        f.write_all_at(b"par", 5).unwrap();
        // A marker whose file was changed beyond its range since is left alone.
        let other = dir.path().join("other");
        fs::write(&other, b"0123456789").unwrap();
        let moved = AppendMark {
            from: 2,
            to: 4,
            mtime: (0, 0),
        };
        fs::hard_link(&other, staging.join(moved.name(1))).unwrap();
        // A symlink planted as a marker is not followed.
        let outside = dir.path().join("outside");
        fs::write(&outside, b"0123456789abcdef").unwrap();
        let planted = AppendMark {
            from: 1,
            to: 20,
            mtime: (0, 0),
        };
        std::os::unix::fs::symlink(&outside, staging.join(planted.name(2))).unwrap();

        let held = Dir::open_trusted(&staging, false).unwrap();
        assert_eq!(roll_back_unfinished(&held), 1);
        assert_eq!(fs::read(&target).unwrap(), b"kept\n");
        let now = fs::metadata(&target).unwrap();
        assert_eq!(
            (now.mtime(), now.mtime_nsec()),
            (old.mtime(), old.mtime_nsec())
        );
        assert_eq!(fs::read(&other).unwrap(), b"0123456789");
        assert_eq!(fs::read(&outside).unwrap(), b"0123456789abcdef");
    }
}
