//! What the daemon records about the sessions it created: `<data-dir>/state/sessions/<id>.json`,
//! read and written beneath the data dir's held descriptor, never through a symlink.

use std::ffi::OsString;
use std::io;
use std::path::Path;

use super::quota::Limits;
use crate::store::local::at::Dir;

/// What the daemon records about a session space, in `<data-dir>/state/sessions/<id>.json`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionState {
    pub id: String,
    pub limits: Limits,
    /// End the session after this many seconds without activity.
    pub ttl_secs: Option<u64>,
    /// Unix milliseconds.
    pub created_at: u64,
    /// Unix milliseconds of the last activity seen (a mount, a record write).
    pub last_active: u64,
}

const DIR: &str = "state/sessions";

fn file_name(id: &str) -> OsString {
    OsString::from(format!("{id}.json"))
}

/// The directory of session states beneath the data dir `data`, made if missing.
fn states(data: &Dir) -> io::Result<Dir> {
    Ok(data.create_dirs(Path::new(DIR), 0o700)?.0)
}

/// Loads the recorded state of session `id`, if it was created through the daemon.
pub fn load(data: &Dir, id: &str) -> io::Result<Option<SessionState>> {
    let Some(bytes) = states(data)?.read_file(&file_name(id))? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| io::Error::other(format!("{DIR}/{id}.json: {e}")))
}

/// Writes a session's state atomically (temporary file, fsync, rename).
pub fn save(data: &Dir, state: &SessionState) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    states(data)?.write_file_atomic(&file_name(&state.id), &bytes, 0o600)
}

/// Removes a session's recorded state.
pub fn delete(data: &Dir, id: &str) -> io::Result<()> {
    states(data)?.remove_file(&file_name(id)).map(|_| ())
}

/// The states of every recorded session, sorted by id. A file that cannot be read is skipped
/// with a warning, so one damaged file cannot hide the rest.
pub fn list(data: &Dir) -> io::Result<Vec<SessionState>> {
    let mut out = Vec::new();
    for (name, _) in states(data)?.entries()? {
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if id.starts_with('.') {
            continue;
        }
        match load(data, id) {
            Ok(Some(state)) => out.push(state),
            Ok(None) => {}
            Err(e) => log::warn!("skipping the state of session {id}: {e}"),
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// The limits recorded for session `id` (none if it was not created through the daemon).
pub fn recorded_limits(data: &Dir, id: &str) -> Option<Limits> {
    load(data, id).ok().flatten().map(|s| s.limits)
}
