//! Attributes of entries: in each object's user metadata, and in each directory's index, so
//! that a listing (one LIST) shows them without a HEAD per entry.
//!
//! - **Object metadata** is the truth for an object (what HEAD answers): `mode` (the decimal
//!   `st_mode`, type bits included: a symlink is an object holding its target with `S_IFLNK`,
//!   a FIFO or a socket an empty object with `S_IFIFO`/`S_IFSOCK`), `uid`, `gid`, and `mtime`
//!   (seconds, with nanoseconds after the point) only when times were set explicitly (`touch
//!   -d`, `cp -p`, `tar -x`): otherwise the mtime is the object's `Last-Modified`, to the
//!   second (on the host that wrote the version, that host's time of the commit: see
//!   `S3Store::made_meta`). These are s3fs's names, so s3fs reads them too.
//! - **The defaults** are what an entry has when nothing says otherwise: files `0644`,
//!   directories `0755`, owned by the space's owner, files modified at their `Last-Modified`,
//!   directories at the space's creation. Objects written by other tools get them.
//! - **The index** (`<dir>/.roomfs-attrs`, JSON) holds the attributes of the entries of its
//!   directory that are not the defaults: kind and mode, owner, explicit mtime (valid only for
//!   the object version with the ETag recorded beside it, since a new version has a new mtime),
//!   and the attributes of subdirectories (SeaweedFS keeps no metadata on directory markers).
//!   The root directory's own attributes are its entry `.`. It is read-modified-written with
//!   conditional PUTs (`If-Match` on its ETag, `If-None-Match: *` when new), retried on 412, so
//!   hosts changing one directory keep each other's entries. A listing shows the index's ETag,
//!   so a host reads it again only when it changed.
//!
//! Writing an ordinary file (mode `0644` under the usual umask, the space owner's) touches no
//! index: the index costs requests only for unusual modes, owners, explicit times, symlinks,
//! FIFOs and directories made with such attributes.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::client::Metadata;
use crate::store::Kind;

/// Mode of files without metadata.
pub const FILE_PERM: u16 = 0o644;
/// Mode of directories without an index entry.
pub const DIR_PERM: u16 = 0o755;

/// What an entry has when nothing says otherwise (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Defaults {
    pub uid: u32,
    pub gid: u32,
    /// The mtime of directories without an index entry.
    pub dir_mtime: SystemTime,
}

/// The attributes the store keeps of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attrs {
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    /// Set explicitly (else the object's `Last-Modified`, or the default for directories).
    pub mtime: Option<SystemTime>,
}

fn type_bits(kind: Kind) -> u32 {
    match kind {
        Kind::File => libc::S_IFREG,
        Kind::Dir => libc::S_IFDIR,
        Kind::Symlink => libc::S_IFLNK,
        Kind::Fifo => libc::S_IFIFO,
        Kind::Socket => libc::S_IFSOCK,
        Kind::BlockDevice => libc::S_IFBLK,
        Kind::CharDevice => libc::S_IFCHR,
    }
}

/// The kind and permission bits of an `st_mode` (devices are not kept: a file).
fn split_mode(mode: u32) -> (Kind, u16) {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFIFO => Kind::Fifo,
        libc::S_IFSOCK => Kind::Socket,
        _ => Kind::File,
    };
    (kind, (mode & 0o7777) as u16)
}

/// `t` as seconds with nanoseconds after the point (`1700000000.000000001`).
pub fn format_time(t: SystemTime) -> String {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => format!("{}.{:09}", d.as_secs(), d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            format!("-{}.{:09}", d.as_secs(), d.subsec_nanos())
        }
    }
}

/// Parses what [`format_time`] writes (and whole seconds, as s3fs writes them).
pub fn parse_time(text: &str) -> Option<SystemTime> {
    let (neg, text) = match text.strip_prefix('-') {
        Some(t) => (true, t),
        None => (false, text),
    };
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: u64 = secs.parse().ok()?;
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        format!("{frac:0<9}").parse().ok()?
    };
    let d = Duration::new(secs, nanos);
    if neg {
        UNIX_EPOCH.checked_sub(d)
    } else {
        UNIX_EPOCH.checked_add(d)
    }
}

/// A `Last-Modified` as the mtime of an entry: whole seconds (what listings and HEAD agree on).
pub fn to_second(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => UNIX_EPOCH,
    }
}

impl Attrs {
    /// The user metadata of an object with these attributes.
    pub fn to_metadata(&self) -> Metadata {
        let mut m = Metadata::new();
        m.insert(
            "mode".into(),
            (type_bits(self.kind) | u32::from(self.perm)).to_string(),
        );
        m.insert("uid".into(), self.uid.to_string());
        m.insert("gid".into(), self.gid.to_string());
        if let Some(t) = self.mtime {
            m.insert("mtime".into(), format_time(t));
        }
        m
    }

    /// The attributes an object's metadata gives it (the defaults where it says nothing or
    /// something unreadable: it is another tool's, or hostile).
    pub fn from_metadata(m: &Metadata, defaults: &Defaults) -> Attrs {
        let (kind, perm) = m
            .get("mode")
            .and_then(|v| v.parse::<u32>().ok())
            .map(split_mode)
            .filter(|(kind, _)| *kind != Kind::Dir)
            .unwrap_or((Kind::File, FILE_PERM));
        Attrs {
            kind,
            perm,
            uid: m
                .get("uid")
                .and_then(|v| v.parse().ok())
                .unwrap_or(defaults.uid),
            gid: m
                .get("gid")
                .and_then(|v| v.parse().ok())
                .unwrap_or(defaults.gid),
            mtime: m.get("mtime").and_then(|v| parse_time(v)),
        }
    }

    /// The attributes of an object without an index entry, as a listing shows it.
    pub fn default_object(defaults: &Defaults) -> Attrs {
        Attrs {
            kind: Kind::File,
            perm: FILE_PERM,
            uid: defaults.uid,
            gid: defaults.gid,
            mtime: None,
        }
    }

    /// The attributes of a directory without an index entry.
    pub fn default_dir(defaults: &Defaults) -> Attrs {
        Attrs {
            kind: Kind::Dir,
            perm: DIR_PERM,
            uid: defaults.uid,
            gid: defaults.gid,
            mtime: None,
        }
    }

    /// Whether a listing shows these attributes without an index entry.
    pub fn are_default(&self, defaults: &Defaults) -> bool {
        let base = if self.kind == Kind::Dir {
            Attrs::default_dir(defaults)
        } else {
            Attrs::default_object(defaults)
        };
        *self == base
    }

    /// Whether these attributes take from other users than the owner something `shown`
    /// grants them: a permission bit of the group or of others. (A change of owner or group
    /// is not weighed: as root, `tar -x` and `cp -a` give every file its owner.)
    pub fn narrow(&self, shown: &Attrs) -> bool {
        shown.perm & !self.perm & 0o077 != 0
    }
}

/// One entry of a directory's index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IndexEntry {
    /// `st_mode`, type bits included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// An explicit mtime ([`format_time`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtime: Option<String>,
    /// The ETag of the object version `mtime` is of (files); none for directories.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

impl IndexEntry {
    /// Takes the mode and owner of `attrs`, keeping its explicit mtime (of the version it
    /// names).
    pub fn set_access(&mut self, attrs: &Attrs) {
        self.mode = Some(type_bits(attrs.kind) | u32::from(attrs.perm));
        self.uid = Some(attrs.uid);
        self.gid = Some(attrs.gid);
    }

    /// The entry recording `attrs` (the explicit mtime of the object version `etag`).
    pub fn of(attrs: &Attrs, etag: Option<&str>) -> IndexEntry {
        IndexEntry {
            mode: Some(type_bits(attrs.kind) | u32::from(attrs.perm)),
            uid: Some(attrs.uid),
            gid: Some(attrs.gid),
            mtime: attrs.mtime.map(format_time),
            etag: attrs.mtime.and(etag.map(str::to_string)),
        }
    }

    /// The attributes it gives an entry listed as `kind` (`Dir` for a common prefix, `File`
    /// for an object) whose version is `etag`; `None` when it does not apply (an object where
    /// the entry says directory, or the reverse: the index is stale).
    pub fn attrs(&self, listed: Kind, etag: Option<&str>, defaults: &Defaults) -> Option<Attrs> {
        let (kind, perm) = match self.mode.map(split_mode) {
            Some((kind, perm)) => (kind, perm),
            None if listed == Kind::Dir => (Kind::Dir, DIR_PERM),
            None => (Kind::File, FILE_PERM),
        };
        if (kind == Kind::Dir) != (listed == Kind::Dir) {
            return None;
        }
        let mtime = match (&self.mtime, &self.etag) {
            (Some(t), _) if kind == Kind::Dir => parse_time(t),
            // (Compared unquoted: entries written before ETags were normalized hold a copy's
            // ETag as SeaweedFS gives it, without quotes.)
            (Some(t), Some(e))
                if etag.is_some_and(|v| v.trim_matches('"') == e.trim_matches('"')) =>
            {
                parse_time(t)
            }
            _ => None,
        };
        Some(Attrs {
            kind,
            perm,
            uid: self.uid.unwrap_or(defaults.uid),
            gid: self.gid.unwrap_or(defaults.gid),
            mtime,
        })
    }
}

/// A directory's index: its entries' attributes that are not the defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Index {
    pub v: u32,
    pub entries: BTreeMap<String, IndexEntry>,
}

/// Entries of one index, at most (a bigger one is refused as hostile).
const MAX_ENTRIES: usize = 1 << 20;

impl Index {
    pub fn parse(bytes: &[u8]) -> Result<Index, String> {
        let index: Index = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if index.entries.len() > MAX_ENTRIES {
            return Err(format!("{} entries", index.entries.len()));
        }
        Ok(index)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut copy = self.clone();
        copy.v = 1;
        serde_json::to_vec(&copy).expect("an index serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            uid: 1000,
            gid: 1000,
            dir_mtime: UNIX_EPOCH,
        }
    }

    #[test]
    fn metadata_round_trips_and_hostile_values_fall_back_to_defaults() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        let a = Attrs {
            kind: Kind::Symlink,
            perm: 0o777,
            uid: 5,
            gid: 6,
            mtime: Some(t),
        };
        let m = a.to_metadata();
        assert_eq!(m["mode"], (libc::S_IFLNK | 0o777).to_string());
        assert_eq!(m["mtime"], "1700000000.000000005");
        assert_eq!(Attrs::from_metadata(&m, &defaults()), a);
        let hostile: Metadata = [
            ("mode".to_string(), "banana".to_string()),
            ("uid".to_string(), "-1".to_string()),
            ("mtime".to_string(), "1.2.3".to_string()),
        ]
        .into();
        assert_eq!(
            Attrs::from_metadata(&hostile, &defaults()),
            Attrs::default_object(&defaults())
        );
        // A directory mode on an object is not believed: it is a file.
        let dir: Metadata = [("mode".to_string(), (libc::S_IFDIR | 0o700).to_string())].into();
        assert_eq!(Attrs::from_metadata(&dir, &defaults()).kind, Kind::File);
        assert_eq!(parse_time("12"), Some(UNIX_EPOCH + Duration::from_secs(12)));
        assert_eq!(
            parse_time("12.5"),
            Some(UNIX_EPOCH + Duration::from_millis(12_500))
        );
        assert_eq!(parse_time(&format_time(t)), Some(t));
    }

    #[test]
    fn index_entries_apply_to_their_kind_and_their_mtime_to_its_version() {
        let t = UNIX_EPOCH + Duration::from_secs(99);
        let file = Attrs {
            kind: Kind::File,
            perm: 0o600,
            uid: 1000,
            gid: 1000,
            mtime: Some(t),
        };
        let e = IndexEntry::of(&file, Some("\"v1\""));
        assert_eq!(e.attrs(Kind::File, Some("\"v1\""), &defaults()), Some(file));
        let newer = e.attrs(Kind::File, Some("\"v2\""), &defaults()).unwrap();
        assert_eq!((newer.perm, newer.mtime), (0o600, None));
        // An entry holding an unquoted ETag (a copy's, before ETags were normalized).
        let unquoted = IndexEntry::of(&file, Some("v1"));
        assert_eq!(
            unquoted.attrs(Kind::File, Some("\"v1\""), &defaults()),
            Some(file)
        );
        assert_eq!(
            e.attrs(Kind::Dir, None, &defaults()),
            None,
            "stale: now a dir"
        );
        let index = Index {
            v: 1,
            entries: [("a".to_string(), e)].into(),
        };
        assert_eq!(Index::parse(&index.to_bytes()).unwrap(), index);
        assert!(Index::parse(b"{\"entries\": {\"a\": {\"evil\": 1}}}").is_err());
        assert!(Attrs::default_object(&defaults()).are_default(&defaults()));
        assert!(!file.are_default(&defaults()));
    }
}
