//! The mounts added through the API, kept in `<data-dir>/state/mounts.json` so that a restarted
//! daemon sets them up again: the requests that made them, as the API took them (the mount
//! point made canonical).
//!
//! The file is replaced whole and atomically (a new file, synced, renamed over the old one)
//! beneath the data dir's held descriptor, never through a symlink. It changes when a mount is
//! added through the API and when one goes away for good: removed through the API, unmounted
//! by its user, or its session ended. A daemon that stops (SIGTERM) or crashes leaves it as it
//! was, so the mounts it served come back at the next start.

use std::ffi::OsStr;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::control::MountRequest;
use crate::store::local::at::Dir;

const DIR: &str = "state";
const FILE: &str = "mounts.json";
const LOCK: &str = "daemon.lock";

/// What `state/mounts.json` holds. Entries stay JSON values until each is read on its own, so
/// that one entry a daemon cannot read does not hide the others.
#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
struct File<T> {
    mounts: Vec<T>,
}

/// The directory of the daemon's state beneath the data dir, made if missing.
fn state_dir(data: &Dir) -> io::Result<Dir> {
    Ok(data.create_dirs(Path::new(DIR), 0o700)?.0)
}

/// Takes the data dir for this daemon, for as long as it runs (the returned file holds an
/// exclusive `flock` on `state/daemon.lock`, released when the process ends however it ends):
/// two daemons on one data dir would each rewrite the other's saved mounts (a second one
/// finds the first's mount points in use and saves none). Standalone `roomfs mount`s may
/// share a data dir with a daemon: they take no such lock. Refused when another daemon holds
/// it, naming its process and socket (which the lock file records).
pub fn hold(data: &Dir, socket: &Path) -> io::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let mut file = state_dir(data)?
        .at(Path::new(LOCK))?
        .open(libc::O_RDWR | libc::O_CREAT, 0o600)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other(format!(
            "{DIR}/{LOCK} is not a regular file"
        )));
    }
    // SAFETY: a valid descriptor; flock touches no memory.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e);
        }
        let mut holder = String::new();
        let _ = file.take(4096).read_to_string(&mut holder);
        let holder = holder.trim();
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another roomfs daemon serves this data dir ({}): two daemons on one data dir \
                 would each rewrite the other's saved mounts; stop it, or give this one a data \
                 dir of its own",
                if holder.is_empty() {
                    "it holds state/daemon.lock"
                } else {
                    holder
                }
            ),
        ));
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(
        file,
        "pid {}, socket {}",
        std::process::id(),
        socket.display()
    )?;
    Ok(file)
}

/// The persisted mount requests, in the order they were made. An entry that cannot be read is
/// skipped with a warning naming it.
pub fn load(data: &Dir) -> io::Result<Vec<MountRequest>> {
    let Some(bytes) = state_dir(data)?.read_file(OsStr::new(FILE))? else {
        return Ok(Vec::new());
    };
    let file: File<serde_json::Value> = serde_json::from_slice(&bytes)
        .map_err(|e| io::Error::other(format!("{DIR}/{FILE}: {e}")))?;
    Ok(file
        .mounts
        .into_iter()
        .enumerate()
        .filter_map(
            |(i, entry)| match serde_json::from_value::<MountRequest>(entry) {
                Ok(mut req) => {
                    // Saved when an empty list still meant the whole space (now refused): it
                    // keeps meaning that.
                    if req.grant.as_ref().is_some_and(|g| g.is_empty()) {
                        req.grant = None;
                    }
                    Some(req)
                }
                Err(e) => {
                    log::warn!("skipping mounts[{i}] of {DIR}/{FILE}: {e}");
                    None
                }
            },
        )
        .collect())
}

/// Replaces the persisted mount requests with `mounts`.
pub fn save(data: &Dir, mounts: &[MountRequest]) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(&File {
        mounts: mounts.to_vec(),
    })
    .map_err(io::Error::other)?;
    state_dir(data)?.write_file_atomic(OsStr::new(FILE), &bytes, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(mountpoint: &str, room: &str) -> MountRequest {
        MountRequest {
            mountpoint: mountpoint.into(),
            room: Some(room.into()),
            grant: Some(vec!["outputs/:rw".into()]),
            label: Some("agent".into()),
            ..Default::default()
        }
    }

    #[test]
    fn requests_round_trip_and_a_bad_entry_hides_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let data = Dir::open_trusted(tmp.path(), false).unwrap();
        assert_eq!(load(&data).unwrap(), vec![]);
        let (a, b) = (request("/srv/a", "r1"), request("/srv/b", "r2"));
        save(&data, &[a.clone(), b.clone()]).unwrap();
        assert_eq!(load(&data).unwrap(), vec![a.clone(), b.clone()]);
        let file = tmp.path().join("state/mounts.json");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let mut text: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        text["mounts"][0]["colour"] = "blue".into();
        std::fs::write(&file, text.to_string()).unwrap();
        assert_eq!(load(&data).unwrap(), vec![b.clone()]);
        // An empty grant saved when it still meant the whole space keeps meaning that.
        text["mounts"][1]["grant"] = serde_json::json!([]);
        std::fs::write(&file, text.to_string()).unwrap();
        let full = MountRequest {
            grant: None,
            ..b.clone()
        };
        assert_eq!(load(&data).unwrap(), vec![full.clone()]);
        save(&data, std::slice::from_ref(&full)).unwrap();
        let saved = std::fs::read_to_string(&file).unwrap();
        assert!(!saved.contains("grant"), "{saved}");
        std::fs::write(&file, "{").unwrap();
        let e = load(&data).unwrap_err().to_string();
        assert!(e.contains("state/mounts.json"), "{e}");
    }

    #[test]
    fn one_daemon_at_a_time_holds_the_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let data = Dir::open_trusted(tmp.path(), false).unwrap();
        let held = hold(&data, Path::new("/run/a.sock")).unwrap();
        let e = hold(&data, Path::new("/run/b.sock"))
            .unwrap_err()
            .to_string();
        let me = format!("pid {}, socket /run/a.sock", std::process::id());
        assert!(
            e.contains("another roomfs daemon") && e.contains(&me),
            "{e}"
        );
        drop(held);
        hold(&data, Path::new("/run/b.sock")).unwrap();
    }

    #[test]
    fn a_symlink_in_place_of_the_file_is_refused_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let data = Dir::open_trusted(tmp.path(), false).unwrap();
        std::fs::create_dir(tmp.path().join("state")).unwrap();
        std::fs::write(tmp.path().join("elsewhere"), r#"{"mounts": []}"#).unwrap();
        std::os::unix::fs::symlink("../elsewhere", tmp.path().join("state/mounts.json")).unwrap();
        assert!(load(&data).is_err());
        save(&data, &[request("/srv/a", "r1")]).unwrap();
        // The symlink was replaced, its target left alone.
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("elsewhere")).unwrap(),
            r#"{"mounts": []}"#
        );
        assert_eq!(load(&data).unwrap().len(), 1);
    }
}
