//! Running roomfs as a service: mounts that survive a daemon restart, a mount point that hangs,
//! remounting a path right after unmounting it, session TTLs across restarts, and the CLI's
//! answers to flags it cannot honour.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::{BIN, Mounted, is_mounted};

/// Runs `roomfs ARGS`; returns (exit code, stdout, stderr).
fn roomfs(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits up to 20 s for `child` to exit.
fn wait_exit(child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the old roomfs mount did not exit"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits up to 20 s for `cond`.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the mount at `path` answers as roomfs room content: `marker` reads back.
fn serves(path: &Path, marker: &[u8]) -> bool {
    is_mounted(path) && fs::read(path.join("marker")).is_ok_and(|b| b == marker)
}

#[test]
fn a_standalone_mount_that_ends_never_unmounts_the_next_one_at_its_path() {
    let mut m = Mounted::room();
    fs::write(m.p("marker"), b"room r1").unwrap();
    // Lazily unmounted with a file open, the old process serves that file until it is closed;
    // meanwhile a new mount takes the path. Closing the file ends the old process, which must
    // leave the new mount alone.
    let held = fs::File::open(m.p("marker")).unwrap();
    let (code, _, err) = roomfs(&["unmount", "--lazy", m.mnt.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let mut old = m.child.take().unwrap();
    m.start();
    assert!(serves(&m.mnt, b"room r1"));
    drop(held);
    wait_exit(&mut old);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        serves(&m.mnt, b"room r1"),
        "the old process unmounted the new mount: {}",
        m.log()
    );
    // Unmount and remount at once, again and again.
    for round in 0..15 {
        let (code, _, err) = roomfs(&["unmount", m.mnt.to_str().unwrap()]);
        assert_eq!(code, 0, "round {round}: {err}");
        let mut old = m.child.take().unwrap();
        m.start();
        wait_exit(&mut old);
        assert!(
            serves(&m.mnt, b"room r1"),
            "round {round}: the old process unmounted the new mount: {}",
            m.log()
        );
    }
}

#[test]
fn a_daemon_mount_that_ends_never_unmounts_the_next_one_at_its_path() {
    let d = Daemon::start();
    let mnt = d.dir("mnt").canonicalize().unwrap();
    let p = mnt.to_str().unwrap();
    d.mount(&["--room", "r1"], &mnt);
    fs::write(mnt.join("marker"), b"room r1").unwrap();
    let held = fs::File::open(mnt.join("marker")).unwrap();
    let (code, _, err) = d.cli(&["unmount", "--lazy", p]);
    assert_eq!(code, 0, "{err}");
    d.mount(&["--room", "r1"], &mnt);
    drop(held);
    // The old mount's end is logged once its last file is closed.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        serves(&mnt, b"room r1"),
        "the old mount unmounted the new one: {}",
        d.log()
    );
    assert_eq!(d.json(&["mounts", "--json"]).as_array().unwrap().len(), 1);
    for round in 0..15 {
        let (code, _, err) = d.cli(&["unmount", p]);
        assert_eq!(code, 0, "round {round}: {err}");
        d.mount(&["--room", "r1"], &mnt);
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            serves(&mnt, b"room r1"),
            "round {round}: the old mount unmounted the new one: {}",
            d.log()
        );
    }
    eventually("the daemon lists the one mount", || {
        d.json(&["mounts", "--json"]).as_array().unwrap().len() == 1
    });
}
