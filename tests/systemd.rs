//! The systemd unit is accepted by `systemd-analyze verify`.

use std::process::Command;

#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/roomfs.service"
    ))
    .unwrap();
    // Point the unit at the binary under test (verify checks that ExecStart exists).
    let unit = unit.replace("/usr/local/bin/roomfs", env!("CARGO_BIN_EXE_roomfs"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("roomfs.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed by scripts/setup");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("roomfs.service"),
        "{err}"
    );
}

/// The unit runs the daemon under a real systemd: scripts/check-unit boots systemd in new
/// namespaces, starts the unit with its hardening, drives the daemon (mounts, passthrough,
/// ownership, sessions and exports, a stop with a file open) with its system calls traced, and
/// tries what the sandbox must refuse. Skipped, with the reason, only where the machine refuses
/// that setup (exit status 77): no writable cgroup v2 hierarchy, or unshare(2) of the
/// namespaces refused.
#[test]
fn the_hardened_unit_serves_mounts_under_systemd() {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check-unit"))
        .args(["--strace", "--binary", env!("CARGO_BIN_EXE_roomfs")])
        .output()
        .expect("scripts/check-unit runs");
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(77) {
        eprintln!(
            "skipped: {}",
            err.trim_end().lines().last().unwrap_or_default()
        );
        return;
    }
    assert!(out.status.success(), "{err}");
}
