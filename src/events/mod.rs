//! Events: what changed in a space, who changed it, and in which order.
//!
//! Every change to a space is described once, at its commit point (never per `write`), as a
//! [`Changed`]: a commit of a file (close, `fsync`, the periodic publication of a running
//! writer's output, an append, a truncate by path, an export), a removal, a move, a folder
//! made or removed. The space ([`crate::space::Space::changed`]) tells its other mounts in this
//! process at once (their kernel caches) and hands the change to its [`ChangeFeed`], which
//! gives it a place in the space's sequence and tells everybody else: other processes on the
//! data dir (and, with an S3 store, other hosts), which invalidate their own mounts' caches,
//! and the watchers of `GET /v1/events`.
//!
//! Public events are `file.updated {path, size}`, `file.deleted {path}`, `file.moved
//! {source_path, destination_path, size}`, `folder.created {path}`, `folder.deleted {path}` and
//! `folder.moved {source_path, destination_path}`, each with `space`, `seq` (increasing by one
//! per event of the space, across every process using it), `time` (Unix milliseconds) and
//! `participant`. Changes of attributes only (mode, owner, times, extended attributes) and the
//! swap of two names (`RENAME_EXCHANGE`) also travel through the feed, so that other processes'
//! caches hear of them, but as internal records without a `seq` that watchers never see (an
//! exchange is also announced as an update of each of its two paths).
//!
//! Module map: [`feed`] (the [`ChangeFeed`] trait, its in-process implementation, retention),
//! [`log`] (the change log in the data dir shared by the processes using it), [`bucket`] (the
//! feed kept in an S3 bucket, shared by the hosts using it), [`stream`] (what
//! a watcher of `GET /v1/events` receives: resume, gaps, grant filtering).

pub mod bucket;
pub mod feed;
pub mod log;
pub mod stream;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use serde_json::{Map, Value, json};

pub use feed::{Backlog, ChangeFeed, ForeignChanges, MemFeed, Retention};

use crate::grant::{Access, Grant};

/// One change to a space, as the mount or the daemon that made it describes it. Paths are
/// relative to the space's root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changed {
    /// A file (or another entry that is not a directory: a symlink, a FIFO) was committed:
    /// created, written, appended to, truncated, linked, exported. `file.updated`.
    File { path: PathBuf, size: u64 },
    /// An entry that is not a directory was removed. `file.deleted`.
    FileDeleted { path: PathBuf },
    /// A file (or another entry that is not a directory) moved, replacing whatever was at
    /// `to`. `file.moved`.
    FileMoved {
        from: PathBuf,
        to: PathBuf,
        size: u64,
    },
    /// A directory was made. `folder.created`.
    FolderCreated { path: PathBuf },
    /// A directory was removed. `folder.deleted`.
    FolderDeleted { path: PathBuf },
    /// A directory moved with everything in it. `folder.moved`.
    FolderMoved { from: PathBuf, to: PathBuf },
    /// Attributes only (mode, owner, times, extended attributes): for caches, not an event.
    Attributes { path: PathBuf },
    /// `a` and `b` swapped names (`RENAME_EXCHANGE`): for caches, not an event (the space
    /// announces an update of each path besides).
    Exchanged { a: PathBuf, b: PathBuf },
}

impl Changed {
    pub fn file(path: &Path, size: u64) -> Changed {
        Changed::File {
            path: path.to_path_buf(),
            size,
        }
    }

    pub fn file_deleted(path: &Path) -> Changed {
        Changed::FileDeleted {
            path: path.to_path_buf(),
        }
    }

    pub fn folder_created(path: &Path) -> Changed {
        Changed::FolderCreated {
            path: path.to_path_buf(),
        }
    }

    pub fn folder_deleted(path: &Path) -> Changed {
        Changed::FolderDeleted {
            path: path.to_path_buf(),
        }
    }

    pub fn attributes(path: &Path) -> Changed {
        Changed::Attributes {
            path: path.to_path_buf(),
        }
    }

    /// Whether watchers see it (and it takes a `seq`).
    pub fn is_event(&self) -> bool {
        !matches!(self, Changed::Attributes { .. } | Changed::Exchanged { .. })
    }

    /// The event's `type`, or the internal record's.
    pub fn type_name(&self) -> &'static str {
        match self {
            Changed::File { .. } => "file.updated",
            Changed::FileDeleted { .. } => "file.deleted",
            Changed::FileMoved { .. } => "file.moved",
            Changed::FolderCreated { .. } => "folder.created",
            Changed::FolderDeleted { .. } => "folder.deleted",
            Changed::FolderMoved { .. } => "folder.moved",
            Changed::Attributes { .. } => "attributes",
            Changed::Exchanged { .. } => "exchanged",
        }
    }

    /// The fields of its JSON form (besides `type`, `seq`, `time`, `participant`, `space`).
    fn put_fields(&self, out: &mut Map<String, Value>) {
        match self {
            Changed::File { path, size } => {
                put_path(out, "path", path);
                out.insert("size".into(), json!(size));
            }
            Changed::FileDeleted { path }
            | Changed::FolderCreated { path }
            | Changed::FolderDeleted { path }
            | Changed::Attributes { path } => put_path(out, "path", path),
            Changed::FileMoved { from, to, size } => {
                put_path(out, "source_path", from);
                put_path(out, "destination_path", to);
                out.insert("size".into(), json!(size));
            }
            Changed::FolderMoved { from, to } => {
                put_path(out, "source_path", from);
                put_path(out, "destination_path", to);
            }
            Changed::Exchanged { a, b } => {
                put_path(out, "path", a);
                put_path(out, "destination_path", b);
            }
        }
    }

    /// Reads the fields written by `put_fields` for the record `type`.
    fn from_fields(kind: &str, m: &Map<String, Value>) -> Option<Changed> {
        let path = |key: &str| get_path(m, key);
        let size = || m.get("size").and_then(Value::as_u64);
        Some(match kind {
            "file.updated" => Changed::File {
                path: path("path")?,
                size: size()?,
            },
            "file.deleted" => Changed::FileDeleted {
                path: path("path")?,
            },
            "file.moved" => Changed::FileMoved {
                from: path("source_path")?,
                to: path("destination_path")?,
                size: size()?,
            },
            "folder.created" => Changed::FolderCreated {
                path: path("path")?,
            },
            "folder.deleted" => Changed::FolderDeleted {
                path: path("path")?,
            },
            "folder.moved" => Changed::FolderMoved {
                from: path("source_path")?,
                to: path("destination_path")?,
            },
            "attributes" => Changed::Attributes {
                path: path("path")?,
            },
            "exchanged" => Changed::Exchanged {
                a: path("path")?,
                b: path("destination_path")?,
            },
            _ => return None,
        })
    }

    /// Whether every path it names is one inside the space, written as the space writes
    /// them: `/`-separated names, none of them empty, `.` or `..`, without NUL (so neither
    /// absolute nor empty). Only a change of attributes may name the root (`""`: a `chmod` of
    /// the mount point). What others wrote in a shared bucket is checked so before it is
    /// believed: a `folder.deleted` of `""` would otherwise clear every cache of the space.
    pub fn names_space_paths(&self) -> bool {
        let named = |p: &Path| {
            let bytes = p.as_os_str().as_bytes();
            !bytes.is_empty() && crate::grant::is_canonical(bytes)
        };
        match self {
            Changed::Attributes { path } => crate::grant::is_canonical(path.as_os_str().as_bytes()),
            Changed::File { path, .. }
            | Changed::FileDeleted { path }
            | Changed::FolderCreated { path }
            | Changed::FolderDeleted { path } => named(path),
            Changed::FileMoved { from, to, .. } | Changed::FolderMoved { from, to } => {
                named(from) && named(to)
            }
            Changed::Exchanged { a, b } => named(a) && named(b),
        }
    }

    /// This change as a watcher with `grant` may see it: unchanged when it sees every path
    /// involved; a move across the grant's boundary as the removal or the arrival it looks
    /// like from inside; `None` when it sees nothing of it (or it is not an event).
    pub fn as_seen_by(&self, grant: &Grant) -> Option<Changed> {
        let sees = |p: &Path| grant.check(p.as_os_str().as_bytes(), Access::Read).is_ok();
        // Directories above granted paths can be listed, so their comings and goings show.
        let sees_dir = |p: &Path| sees(p) || grant.leads_to(p.as_os_str().as_bytes());
        match self {
            Changed::File { path, .. } | Changed::FileDeleted { path } => {
                sees(path).then(|| self.clone())
            }
            Changed::FolderCreated { path } | Changed::FolderDeleted { path } => {
                sees_dir(path).then(|| self.clone())
            }
            Changed::FileMoved { from, to, size } => match (sees(from), sees(to)) {
                (true, true) => Some(self.clone()),
                (true, false) => Some(Changed::file_deleted(from)),
                (false, true) => Some(Changed::file(to, *size)),
                (false, false) => None,
            },
            Changed::FolderMoved { from, to } => match (sees_dir(from), sees_dir(to)) {
                (true, true) => Some(self.clone()),
                (true, false) => Some(Changed::folder_deleted(from)),
                (false, true) => Some(Changed::folder_created(to)),
                (false, false) => None,
            },
            Changed::Attributes { .. } | Changed::Exchanged { .. } => None,
        }
    }
}

/// A change given its place: the unit feeds keep and deliver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Its place among the space's events (from 1); 0 for internal records (not events).
    pub seq: u64,
    /// Unix milliseconds when it was recorded.
    pub time: u64,
    /// Who made it: the token's `name`, the mount's label, or the daemon itself.
    pub participant: Arc<str>,
    /// The process that made it (see [`Origin`]).
    pub origin: Origin,
    pub change: Changed,
}

/// Identifies one roomfs process among those sharing a feed, so that each can tell its own
/// records (whose effects it applied already) from others'.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin(pub u64);

impl Origin {
    /// A fresh, random origin for this process.
    pub fn new() -> Origin {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        Origin(h.finish())
    }
}

impl Default for Origin {
    fn default() -> Origin {
        Origin::new()
    }
}

/// Unix milliseconds now.
/// Checks a mount's label (its participant in events): not empty, at most 200 bytes, no
/// control characters (it is printed in tables and logs).
pub fn check_label(label: &str) -> Result<(), crate::error::Invalid> {
    if label.is_empty() || label.len() > 200 || label.chars().any(char::is_control) {
        return Err(crate::error::Invalid(format!(
            "label {label:?} must be 1 to 200 bytes without control characters"
        )));
    }
    Ok(())
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Record {
    /// The line a watcher of `space` (`rooms/r1`) receives: the event as JSON.
    pub fn event_json(&self, space: &str, change: &Changed) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), json!(change.type_name()));
        m.insert("space".into(), json!(space));
        m.insert("seq".into(), json!(self.seq));
        m.insert("time".into(), json!(self.time));
        m.insert("participant".into(), json!(&*self.participant));
        change.put_fields(&mut m);
        Value::Object(m)
    }

    /// Its line in a change log (without the newline).
    pub fn log_line(&self) -> String {
        let mut m = Map::new();
        if self.seq > 0 {
            m.insert("seq".into(), json!(self.seq));
        }
        m.insert("type".into(), json!(self.change.type_name()));
        m.insert("time".into(), json!(self.time));
        m.insert("participant".into(), json!(&*self.participant));
        m.insert("by".into(), json!(format!("{:016x}", self.origin.0)));
        self.change.put_fields(&mut m);
        Value::Object(m).to_string()
    }

    /// Reads a change log's line; `None` for anything that is not one (a torn line).
    pub fn parse_log_line(line: &[u8]) -> Option<Record> {
        let v: Value = serde_json::from_slice(line).ok()?;
        let m = v.as_object()?;
        let change = Changed::from_fields(m.get("type")?.as_str()?, m)?;
        let seq = match m.get("seq") {
            Some(s) => s.as_u64().filter(|&s| s > 0)?,
            None => 0,
        };
        if (seq > 0) != change.is_event() {
            return None;
        }
        Some(Record {
            seq,
            time: m.get("time")?.as_u64()?,
            participant: Arc::from(m.get("participant")?.as_str()?),
            origin: Origin(u64::from_str_radix(m.get("by")?.as_str()?, 16).ok()?),
            change,
        })
    }
}

/// Puts `path` under `key` as a string; a path that is not UTF-8 (names are bytes) is shown
/// with replacement characters and given exactly, base64-encoded, under `<key>_base64`.
fn put_path(out: &mut Map<String, Value>, key: &str, path: &Path) {
    let bytes = path.as_os_str().as_bytes();
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            out.insert(key.into(), json!(s));
        }
        Err(_) => {
            out.insert(key.into(), json!(String::from_utf8_lossy(bytes)));
            let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
            out.insert(format!("{key}_base64"), json!(b64));
        }
    }
}

fn get_path(m: &Map<String, Value>, key: &str) -> Option<PathBuf> {
    if let Some(b64) = m.get(&format!("{key}_base64")) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str()?)
            .ok()?;
        return Some(PathBuf::from(OsStr::from_bytes(&bytes)));
    }
    Some(PathBuf::from(m.get(key)?.as_str()?))
}

#[cfg(test)]
mod tests;
