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
