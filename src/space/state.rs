//! What the daemon records about the sessions it created: `<data-dir>/state/sessions/<id>.json`,
//! read and written beneath the data dir's held descriptor, never through a symlink.

use std::ffi::OsString;
use std::io;
use std::path::Path;

use super::quota::Limits;
use crate::store::local::at::Dir;

/// The longest idle TTL a session may have: 10 years (longer ones overflowed the times shown;
/// a session that should never expire has none).
pub const MAX_TTL_SECS: u64 = 10 * 365 * 86400;

/// Checks an idle TTL (`what` names it in the message).
pub fn check_ttl(what: &str, ttl: Option<u64>) -> Result<(), String> {
    match ttl {
        Some(0) => Err(format!(
            "{what} must be at least 1 (or left out: the default)"
        )),
        Some(t) if t > MAX_TTL_SECS => Err(format!(
            "{what} must be at most {MAX_TTL_SECS} (10 years; leave it out for no TTL), not {t}"
        )),
        _ => Ok(()),
    }
}

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
    /// Unix milliseconds of the last activity seen (a mount, a record write), as last saved:
    /// the daemon saves it now and then while the session is active, and when a mount of the
    /// session goes away or the daemon stops.
    pub last_active: u64,
}

impl SessionState {
    /// When the session is to be ended for inactivity (Unix ms), given its latest activity seen
    /// since its state was saved (`activity`, 0 for none) and when the daemon started; `None`
    /// without a TTL.
    ///
    /// The idle clock runs only while the daemon runs: after a start, a session is ended no
    /// sooner than a full TTL after that start, since its agents could not use it while no
    /// daemon ran, and the activity saved last may lag behind the real one (a crash).
    pub fn idle_deadline(&self, activity: u64, started: u64) -> Option<u64> {
        let ttl = self.ttl_secs?.saturating_mul(1000);
        Some(
            self.last_active
                .max(activity)
                .max(started)
                .saturating_add(ttl),
        )
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_clock_runs_only_while_the_daemon_runs() {
        const MIN: u64 = 60_000;
        let state = |ttl_secs, last_active| SessionState {
            id: "s".into(),
            limits: Limits::default(),
            ttl_secs,
            created_at: 0,
            last_active,
        };
        assert_eq!(state(None, 0).idle_deadline(0, 0), None);
        // Active at 10 min, TTL 30 min, the daemon started at 100 min: a full TTL from the
        // start, though the saved activity is older than the TTL.
        let s = state(Some(30 * 60), 10 * MIN);
        assert_eq!(s.idle_deadline(0, 100 * MIN), Some(130 * MIN));
        // Activity seen since the start counts from when it happened.
        assert_eq!(s.idle_deadline(120 * MIN, 100 * MIN), Some(150 * MIN));
        // Active since the start, saved: the same.
        assert_eq!(
            state(Some(30 * 60), 120 * MIN).idle_deadline(0, 100 * MIN),
            Some(150 * MIN)
        );
        // The daemon started before the activity: the activity decides.
        assert_eq!(s.idle_deadline(0, 5 * MIN), Some(40 * MIN));
    }

    #[test]
    fn states_round_trip_beneath_the_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let data = Dir::open_trusted(tmp.path(), false).unwrap();
        std::fs::create_dir_all(tmp.path().join("state/sessions")).unwrap();
        std::fs::write(
            tmp.path().join("state/sessions/old.json"),
            r#"{"id": "old", "limits": {}, "ttl_secs": 60, "created_at": 1, "last_active": 2}"#,
        )
        .unwrap();
        let s = load(&data, "old").unwrap().unwrap();
        assert_eq!((s.ttl_secs, s.last_active), (Some(60), 2));
        let later = SessionState {
            last_active: 3,
            ..s
        };
        save(&data, &later).unwrap();
        assert_eq!(load(&data, "old").unwrap().unwrap(), later);
        assert_eq!(list(&data).unwrap(), vec![later]);
    }
}
