//! Per-space limits: largest file (EFBIG), number of entries and total bytes (EDQUOT). One
//! [`Quota`] is shared by every mount of a space, so all of them count against the same usage.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::errno::{Errno, FsResult};

/// Limits of a space; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest size of one file, in bytes.
    #[serde(default)]
    pub max_file_bytes: Option<u64>,
    /// Most entries (files, directories and symlinks together).
    #[serde(default)]
    pub max_files: Option<u64>,
    /// Most bytes in all files together.
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        *self == Limits::default()
    }
}

pub use crate::store::Usage;

/// Limits and the usage counted against them.
#[derive(Debug)]
pub struct Quota {
    limits: Limits,
    usage: Mutex<Usage>,
}

impl Quota {
    pub fn new(limits: Limits, usage: Usage) -> Quota {
        Quota {
            limits,
            usage: Mutex::new(usage),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn usage(&self) -> Usage {
        *self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_usage<T>(&self, f: impl FnOnce(&mut Usage) -> T) -> T {
        f(&mut self.usage.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// How many of `len` bytes written at `offset` fit under the file-size limit: all of them,
    /// the part below the limit (a short write), or none (EFBIG).
    pub fn fit_write(&self, offset: u64, len: usize) -> FsResult<usize> {
        match self.limits.max_file_bytes {
            Some(max) if offset.saturating_add(len as u64) > max => {
                if offset >= max {
                    Err(Errno::EFBIG)
                } else {
                    Ok((max - offset) as usize)
                }
            }
            _ => Ok(len),
        }
    }

    /// Checks that a file may be `size` bytes long (truncate/extend): EFBIG past the limit.
    pub fn check_size(&self, size: u64) -> FsResult<()> {
        match self.limits.max_file_bytes {
            Some(max) if size > max => Err(Errno::EFBIG),
            _ => Ok(()),
        }
    }

    /// Checks that a file growing from `old` to `new` bytes stays within the byte quota.
    pub fn check_growth(&self, old: u64, new: u64) -> FsResult<()> {
        let Some(max) = self.limits.max_bytes else {
            return Ok(());
        };
        let used = self.usage().bytes;
        if new > old && used.saturating_add(new - old) > max {
            return Err(Errno::EDQUOT);
        }
        Ok(())
    }

    /// Records that a file's committed size went from `old` to `new` (checked first).
    pub fn resize(&self, old: u64, new: u64) -> FsResult<()> {
        self.with_usage(|u| {
            if let Some(max) = self.limits.max_bytes
                && new > old
                && u.bytes.saturating_add(new - old) > max
            {
                return Err(Errno::EDQUOT);
            }
            u.bytes = u.bytes.saturating_sub(old).saturating_add(new);
            Ok(())
        })
    }

    /// Corrects the byte count reserved with `resize(old, new)` to what a commit actually did
    /// (replaced `replaced` bytes by `now`): never refused, the data is in.
    pub fn settle(&self, (old, new): (u64, u64), (replaced, now): (u64, u64)) {
        self.with_usage(|u| {
            let bytes =
                u.bytes as i128 - new as i128 + old as i128 - replaced as i128 + now as i128;
            u.bytes = bytes.max(0) as u64;
        })
    }

    /// Reserves one entry for something being created: EDQUOT when the space is full.
    pub fn add_entry(&self) -> FsResult<()> {
        self.with_usage(|u| {
            if let Some(max) = self.limits.max_files
                && u.files >= max
            {
                return Err(Errno::EDQUOT);
            }
            u.files += 1;
            Ok(())
        })
    }

    /// Releases an entry (removed, or its creation failed) holding `bytes`.
    pub fn remove_entry(&self, bytes: u64) {
        self.with_usage(|u| {
            u.files = u.files.saturating_sub(1);
            u.bytes = u.bytes.saturating_sub(bytes);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota() -> Quota {
        Quota::new(
            Limits {
                max_file_bytes: Some(100),
                max_files: Some(2),
                max_bytes: Some(150),
            },
            Usage::default(),
        )
    }

    #[test]
    fn file_size_limit_allows_short_writes_then_efbig() {
        let q = quota();
        assert_eq!(q.fit_write(0, 50), Ok(50));
        assert_eq!(q.fit_write(90, 50), Ok(10));
        assert_eq!(q.fit_write(100, 1), Err(Errno::EFBIG));
        assert_eq!(q.check_size(101), Err(Errno::EFBIG));
        assert_eq!(q.check_size(100), Ok(()));
    }

    #[test]
    fn entries_and_bytes_are_counted() {
        let q = quota();
        q.add_entry().unwrap();
        q.resize(0, 100).unwrap();
        q.add_entry().unwrap();
        assert_eq!(q.add_entry(), Err(Errno::EDQUOT));
        assert_eq!(q.check_growth(0, 60), Err(Errno::EDQUOT));
        assert_eq!(q.resize(0, 60), Err(Errno::EDQUOT));
        q.resize(0, 50).unwrap();
        assert_eq!(
            q.usage(),
            Usage {
                files: 2,
                bytes: 150
            }
        );
        q.remove_entry(100);
        assert_eq!(
            q.usage(),
            Usage {
                files: 1,
                bytes: 50
            }
        );
        q.add_entry().unwrap();
    }
}
