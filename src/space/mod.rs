//! Spaces (rooms and sessions): their ids, the hub that keeps one [`hub::Space`] per open space
//! for all its mounts, copying between spaces ([`export`]), and the daemon's record of
//! sessions ([`state`]).

pub mod claims;
pub mod export;
pub mod hub;
pub mod locks;
pub mod quota;
pub mod state;

pub use hub::{Hub, Made, Space, SpaceWatcher, Spaces};
pub use state::SessionState;

use std::fmt;
use std::path::PathBuf;

use crate::error::Invalid;

/// What kind of space a mount shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpaceKind {
    /// A durable file store shared by a collaboration room.
    Room,
    /// An agent session's scoped storage.
    Session,
}

/// A room or a session, by id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpaceId {
    pub kind: SpaceKind,
    pub id: String,
}

/// Longest space id accepted.
const MAX_ID: usize = 128;

impl SpaceId {
    /// Checks `id`: 1–128 characters of `A-Z a-z 0-9 . _ -`, not starting with `.`, so that it
    /// is always one safe directory name.
    pub fn new(kind: SpaceKind, id: &str) -> Result<SpaceId, Invalid> {
        let valid = !id.is_empty()
            && id.len() <= MAX_ID
            && !id.starts_with('.')
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(Invalid(format!(
                "invalid {} id {id:?}: use 1-{MAX_ID} characters from A-Z a-z 0-9 . _ - \
                 (not starting with '.')",
                kind.noun()
            )));
        }
        Ok(SpaceId {
            kind,
            id: id.to_string(),
        })
    }

    /// A space by its name in events and URLs, `rooms/<id>` or `sessions/<id>`.
    pub fn parse(name: &str) -> Result<SpaceId, Invalid> {
        match name.trim_end_matches('/').split_once('/') {
            Some(("rooms", id)) => SpaceId::new(SpaceKind::Room, id),
            Some(("sessions", id)) => SpaceId::new(SpaceKind::Session, id),
            _ => Err(Invalid(format!(
                "{name:?} names no space: use rooms/ID or sessions/ID"
            ))),
        }
    }

    /// The space's name in events and URLs: `rooms/<id>` or `sessions/<id>`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.kind.dir(), self.id)
    }

    /// The space's directory relative to the data dir: `rooms/<id>` or `sessions/<id>`.
    pub fn rel_dir(&self) -> PathBuf {
        PathBuf::from(self.kind.dir()).join(&self.id)
    }
}

impl SpaceKind {
    /// The data-dir subdirectory holding spaces of this kind.
    pub fn dir(self) -> &'static str {
        match self {
            SpaceKind::Room => "rooms",
            SpaceKind::Session => "sessions",
        }
    }

    pub fn noun(self) -> &'static str {
        match self {
            SpaceKind::Room => "room",
            SpaceKind::Session => "session",
        }
    }
}

impl fmt::Display for SpaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.noun(), self.id)
    }
}

/// The default data dir: `/var/lib/roomfs` for root, else `$XDG_DATA_HOME/roomfs`
/// (`~/.local/share/roomfs`).
pub fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/roomfs");
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("roomfs");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/share/roomfs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_single_safe_names() {
        assert!(SpaceId::new(SpaceKind::Room, "demo-1.v2_x").is_ok());
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            let err = SpaceId::new(SpaceKind::Room, bad).unwrap_err();
            assert!(err.0.contains("invalid room id"), "{bad}: {err}");
        }
        let s = SpaceId::new(SpaceKind::Session, "s1").unwrap();
        assert_eq!(s.rel_dir(), PathBuf::from("sessions/s1"));
    }
}
