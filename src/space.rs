//! Spaces (rooms and sessions) and where their data lives under the data dir.

use std::fmt;
use std::path::{Path, PathBuf};

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
    pub fn new(kind: SpaceKind, id: &str) -> Result<SpaceId, String> {
        let valid = !id.is_empty()
            && id.len() <= MAX_ID
            && !id.starts_with('.')
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(format!(
                "invalid {} id {id:?}: use 1-{MAX_ID} characters from A-Z a-z 0-9 . _ - \
                 (not starting with '.')",
                kind.noun()
            ));
        }
        Ok(SpaceId {
            kind,
            id: id.to_string(),
        })
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
            assert!(err.contains("invalid room id"), "{bad}: {err}");
        }
        let s = SpaceId::new(SpaceKind::Session, "s1").unwrap();
        assert_eq!(s.rel_dir(), PathBuf::from("sessions/s1"));
    }
}

/// What the daemon records about a session space, in `<data-dir>/state/sessions/<id>.json`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionState {
    pub id: String,
    pub limits: crate::fs::Limits,
    /// End the session after this many seconds without activity.
    pub ttl_secs: Option<u64>,
    /// Unix milliseconds.
    pub created_at: u64,
    /// Unix milliseconds of the last activity seen (a mount, a record write).
    pub last_active: u64,
}

fn sessions_state_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("state/sessions")
}

/// Loads the recorded state of session `id`, if it was created through the daemon.
pub fn load_session_state(data_dir: &Path, id: &str) -> std::io::Result<Option<SessionState>> {
    let path = sessions_state_dir(data_dir).join(format!("{id}.json"));
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes a session's state atomically (temporary file, fsync, rename).
pub fn save_session_state(data_dir: &Path, state: &SessionState) -> std::io::Result<()> {
    use std::io::Write;
    let dir = sessions_state_dir(data_dir);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".tmp-{}-{}", state.id, std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(format!("{}.json", state.id)))
}

/// Removes a session's recorded state.
pub fn delete_session_state(data_dir: &Path, id: &str) -> std::io::Result<()> {
    match std::fs::remove_file(sessions_state_dir(data_dir).join(format!("{id}.json"))) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The states of every recorded session.
pub fn list_session_states(data_dir: &Path) -> std::io::Result<Vec<SessionState>> {
    let dir = sessions_state_dir(data_dir);
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let name = entry?.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if id.starts_with('.') {
            continue;
        }
        if let Some(state) = load_session_state(data_dir, id)? {
            out.push(state);
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// The limits recorded for session `id` (none if it was not created through the daemon).
pub fn recorded_limits(data_dir: &Path, id: &str) -> Option<crate::fs::Limits> {
    load_session_state(data_dir, id)
        .ok()
        .flatten()
        .map(|s| s.limits)
}
