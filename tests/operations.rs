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

/// One HTTP/1.1 request to the control socket; returns the status and the body.
fn api(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: roomfs\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// Runs `f` on a thread of its own and waits up to `secs` for its answer; panics naming
/// `what` if there is none by then.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} got no answer within {secs} s"))
}

/// A standalone mount whose process is stopped (SIGSTOP): every request to it hangs until it
/// is continued. Dropping it continues the process, then the mount is unmounted and the
/// process stopped as for any [`Mounted`].
struct Stopped(Mounted);

impl Stopped {
    fn stop(m: Mounted) -> Stopped {
        assert_eq!(unsafe { libc::kill(m.pid() as i32, libc::SIGSTOP) }, 0);
        Stopped(m)
    }

    fn resume(&self) {
        unsafe { libc::kill(self.0.pid() as i32, libc::SIGCONT) };
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.resume();
    }
}

/// Generous for a loaded 2-core machine: this checks that the daemon answers at all while a
/// mount point hangs, not how fast.
const ANSWERS_WITHIN: u64 = 15;

#[test]
fn a_hanging_mount_point_stalls_only_its_own_mount_request() {
    let d = Daemon::start();
    // A mount point inside a FUSE mount whose server no longer answers (no attribute caching:
    // every look at the path asks the server).
    let hung = Mounted::with_args(&["--room", "hung", "--cache-ttl", "0"]);
    fs::create_dir(hung.p("sub")).unwrap();
    let target = hung.p("sub").to_str().unwrap().to_string();
    let hung = Stopped::stop(hung);
    let request = serde_json::json!({"mountpoint": target, "room": "r2"}).to_string();
    // Two requests for that mount point: one waits for it, the other is refused at once,
    // whichever comes first.
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..2 {
        let (socket, request, tx) = (d.socket.clone(), request.clone(), tx.clone());
        std::thread::spawn(move || {
            let _ = tx.send(api(&socket, "POST", "/v1/mounts", &request));
        });
    }
    let (status, body) = rx
        .recv_timeout(Duration::from_secs(ANSWERS_WITHIN))
        .expect("the second request for a mount point being set up is answered");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("being set up"), "{body}");
    // Everything else answers meanwhile: status, the mount list, another mount.
    let socket = d.socket.clone();
    let status = within(ANSWERS_WITHIN, "roomfs status", move || {
        api(&socket, "GET", "/v1/status", "")
    });
    assert_eq!(status.0, 200, "{}", status.1);
    let other = d.dir("other");
    let cli = {
        let (socket, other) = (d.socket.clone(), other.clone());
        move |args: &[&str]| {
            Command::new(BIN)
                .args(args)
                .arg("--socket")
                .arg(&socket)
                .arg(&other)
                .output()
                .unwrap()
        }
    };
    let out = within(ANSWERS_WITHIN, "roomfs mount --daemon", move || {
        cli(&["mount", "--daemon", "--room", "r3"])
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&other.canonicalize().unwrap()));
    let mounts = d.json(&["mounts", "--json"]);
    assert_eq!(mounts.as_array().unwrap().len(), 1, "{mounts}");
    // Once the mount point answers again, the waiting request goes through.
    hung.resume();
    let (status, body) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the waiting request is answered once the mount point answers");
    assert_eq!(status, 201, "{body}");
    assert!(is_mounted(Path::new(&target)));
    assert_eq!(d.json(&["mounts", "--json"]).as_array().unwrap().len(), 2);
    let (code, _, err) = d.cli(&["unmount", &target]);
    assert_eq!(code, 0, "{err}");
}

/// A daemon whose configuration has a `secret_file` (`{tmp}/secret`), for tokens.
fn daemon_with_secret() -> Daemon {
    Daemon::with_setup(Some(r#"{"secret_file": "{tmp}/secret"}"#), |tmp| {
        fs::write(
            tmp.join("secret"),
            "operations-test-secret-of-32-bytes-or-more\n",
        )
        .unwrap()
    })
}

/// `roomfs token issue` with the daemon's secret.
fn token(d: &Daemon, args: &[&str]) -> String {
    let secret = d.tmp.path().join("secret");
    let mut all = vec!["token", "issue", "--secret-file", secret.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, out, err) = roomfs(&all);
    assert_eq!(code, 0, "{err}");
    out.trim().to_string()
}

/// The daemon's mounts, sorted by mount point.
fn mounts(d: &Daemon) -> Vec<serde_json::Value> {
    let mut all = d.json(&["mounts", "--json"]).as_array().unwrap().clone();
    all.sort_by_key(|m| m["mountpoint"].as_str().unwrap().to_string());
    all
}

#[test]
fn mounts_added_through_the_api_come_back_after_a_restart_unless_they_went_away() {
    let mut d = daemon_with_secret();
    for s in ["s1", "s2"] {
        d.json(&["session", "create", s, "--json"]);
    }
    let dir = |name: &str| d.dir(name).canonicalize().unwrap();
    let (granted, ro, session, by_token) = (dir("granted"), dir("ro"), dir("session"), dir("tok"));
    let (removed, unmounted, ended) = (dir("removed"), dir("unmounted"), dir("ended"));
    let (vanishing, expiring) = (dir("vanishing"), dir("expiring"));
    fs::create_dir_all(d.data.join("rooms/r1/inputs")).unwrap();
    fs::write(d.data.join("rooms/r1/inputs/data.csv"), b"a,b\n").unwrap();
    d.mount(
        &[
            "--room",
            "r1",
            "--grant",
            "inputs/:ro",
            "--grant",
            "outputs/:rw",
        ],
        &granted,
    );
    d.mount(&["--room", "r2", "--read-only"], &ro);
    // Listed as what it is: nothing can be changed through it.
    let (_, listed, _) = d.cli(&["mounts"]);
    let line = listed.lines().find(|l| l.contains("room r2")).unwrap();
    assert!(line.contains("full access, read-only mount"), "{listed}");
    let listed = d.json(&["mounts", "--json"]);
    let r2 = listed.as_array().unwrap().iter().find(|m| m["id"] == "r2");
    assert_eq!(r2.unwrap()["read_only"], true, "{listed}");
    d.mount(&["--session", "s1", "--label", "agent-1"], &session);
    let long = token(&d, &["--room", "r3", "--path", "/:rw", "--ttl", "1h"]);
    d.mount(&["--token", &long], &by_token);
    d.mount(&["--room", "r4"], &removed);
    d.mount(&["--room", "r5"], &unmounted);
    d.mount(&["--session", "s2"], &ended);
    d.mount(&["--room", "r6"], &vanishing);
    let short = token(&d, &["--room", "r7", "--path", "/:rw", "--ttl", "3s"]);
    d.mount(&["--token", &short], &expiring);
    fs::create_dir(granted.join("outputs")).unwrap();
    fs::write(granted.join("outputs/report.md"), b"# Report\n").unwrap();
    fs::write(session.join("notes.txt"), b"session notes").unwrap();
    fs::write(by_token.join("t.txt"), b"by token").unwrap();
    // Gone for good: removed through the API, unmounted by its user, its session ended.
    let (code, _, err) = d.cli(&["unmount", removed.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let out = Command::new("umount").arg(&unmounted).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.json(&["session", "end", "s2", "--json"]);
    eventually("the daemon forgets the mount its user unmounted", || {
        mounts(&d).len() == 6
    });
    let before = mounts(&d);
    assert!(d.stop().success());
    for m in &before {
        let at = Path::new(m["mountpoint"].as_str().unwrap());
        assert!(!is_mounted(at), "{} is left mounted", at.display());
    }
    // While the daemon is down, a mount point goes away and a token expires.
    fs::remove_dir(&vanishing).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    d.run();
    let after = mounts(&d);
    let expected: Vec<_> = before
        .iter()
        .filter(|m| {
            let at = m["mountpoint"].as_str().unwrap();
            at != vanishing.to_str().unwrap() && at != expiring.to_str().unwrap()
        })
        .cloned()
        .collect();
    assert_eq!(after, expected, "{}", d.log());
    // They serve the same files, with the same grants and options.
    assert_eq!(
        fs::read(granted.join("outputs/report.md")).unwrap(),
        b"# Report\n"
    );
    assert_eq!(fs::read(granted.join("inputs/data.csv")).unwrap(), b"a,b\n");
    let denied = fs::write(granted.join("inputs/new.csv"), b"x").unwrap_err();
    assert_eq!(denied.raw_os_error(), Some(libc::EACCES));
    let refused = fs::write(ro.join("x"), b"x").unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EROFS));
    assert_eq!(
        fs::read(session.join("notes.txt")).unwrap(),
        b"session notes"
    );
    assert_eq!(fs::read(by_token.join("t.txt")).unwrap(), b"by token");
    for gone in [&removed, &unmounted, &ended, &expiring] {
        assert!(!is_mounted(gone), "{} came back", gone.display());
    }
    // Those that could not come back are named with the reason, once.
    let log = d.log();
    let line = |at: &Path| {
        log.lines()
            .filter(|l| {
                l.contains("not restoring the mount at") && l.contains(at.to_str().unwrap())
            })
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let missing = line(&vanishing);
    assert!(
        missing.len() == 1 && missing[0].contains("does not exist"),
        "{log}"
    );
    let expired = line(&expiring);
    assert!(
        expired.len() == 1 && expired[0].contains("expired"),
        "{log}"
    );
    // ... and are forgotten: the next start does not try them again. A crash (SIGKILL) keeps
    // the mounts as they were.
    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    d.run();
    assert_eq!(mounts(&d), expected, "{}", d.log());
    assert_eq!(
        fs::read(session.join("notes.txt")).unwrap(),
        b"session notes"
    );
    assert_eq!(line(&vanishing).len(), 1, "{}", d.log());
    let log = d.log();
    assert_eq!(
        log.matches("not restoring the mount at").count(),
        2,
        "{log}"
    );
}

/// Unix milliseconds now.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The ids of the daemon's sessions.
fn sessions(d: &Daemon) -> Vec<String> {
    d.json(&["session", "list", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn session_activity_outlives_unmounts_and_restarts() {
    const TTL: Duration = Duration::from_secs(5);
    let mut d = Daemon::start();
    for s in ["busy", "quiet"] {
        d.json(&["session", "create", s, "--ttl", "5s", "--json"]);
    }
    let (busy, quiet) = (d.dir("busy"), d.dir("quiet"));
    d.mount(&["--session", "busy"], &busy);
    d.mount(&["--session", "quiet"], &quiet);
    // Both are used for longer than their TTL.
    let until = Instant::now() + TTL + Duration::from_secs(2);
    let mut n = 0u32;
    // Activity is kept in whole seconds: the last write to quiet began in this second or later.
    let mut last_write = 0;
    while Instant::now() < until {
        n += 1;
        fs::write(busy.join("f"), n.to_string()).unwrap();
        last_write = now_ms() / 1000 * 1000;
        fs::write(quiet.join("f"), n.to_string()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    // Its mount gone, a session is not idle since its creation: it is not ended at once.
    let (code, _, err) = d.cli(&["unmount", quiet.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sessions(&d), ["busy", "quiet"], "{}", d.log());
    // Nor after a restart: the idle clock starts again, and the activity is kept.
    assert!(d.stop().success());
    let stopped_at = now_ms();
    d.run();
    let restarted = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sessions(&d), ["busy", "quiet"], "{}", d.log());
    let shown = d.json(&["session", "show", "quiet", "--json"]);
    assert!(
        shown["last_active"].as_u64().unwrap() >= last_write,
        "{shown} (last write at {last_write})"
    );
    // ... and it says when it will end: a TTL after the start.
    assert!(
        shown["ends_at"].as_u64().unwrap() >= stopped_at + TTL.as_millis() as u64,
        "{shown} (stopped at {stopped_at})"
    );
    // Kept busy through its mount (back after the restart), busy stays; quiet, idle since,
    // ends a TTL after the restart.
    while sessions(&d).contains(&"quiet".to_string()) {
        assert!(
            restarted.elapsed() < TTL + Duration::from_secs(15),
            "the idle session was not ended: {}",
            d.log()
        );
        n += 1;
        fs::write(busy.join("f"), n.to_string()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    // (The daemon started a moment before `restarted`.)
    assert!(
        restarted.elapsed() >= TTL - Duration::from_secs(1),
        "ended {:?} after the restart",
        restarted.elapsed()
    );
    assert_eq!(sessions(&d), ["busy"]);
    assert_eq!(fs::read(busy.join("f")).unwrap(), n.to_string().as_bytes());
    assert!(!d.data.join("sessions/quiet").exists());
    assert!(
        d.log().contains("session quiet idle for over 5s"),
        "{}",
        d.log()
    );
}

#[test]
fn mount_daemon_forwards_every_flag_the_api_takes_and_refuses_the_others() {
    let d = daemon_with_secret();
    let mnt = d.dir("mnt").canonicalize().unwrap();
    let p = mnt.to_str().unwrap();
    // Bad input: status 1 (2 for a usage error, clap's), and one line.
    let one_line = |expected: i32, code: i32, err: &str| {
        assert_eq!(code, expected, "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    };
    // What the daemon's config decides is refused, each flag named, nothing mounted.
    let (code, _, err) = d.cli(&[
        "mount",
        "--daemon",
        "--room",
        "r1",
        "--data-dir",
        "/tmp",
        "--threads",
        "2",
        p,
    ]);
    one_line(1, code, &err);
    assert!(
        err.contains("--data-dir and --threads are for mounts served here")
            && err.contains("data_dir and threads")
            && err.contains("leave them out"),
        "{err}"
    );
    for flag in [
        ["--records-dir", "/tmp"],
        ["--cache-ttl", "5"],
        ["--poll-window-us", "0"],
        ["--secret-file", "/tmp/secret"],
    ] {
        let (code, _, err) = d.cli(&["mount", "--daemon", "--room", "r1", flag[0], flag[1], p]);
        one_line(1, code, &err);
        assert!(
            err.contains(&format!("{} is for mounts served here", flag[0])),
            "{err}"
        );
    }
    let (_, _, err) = d.cli(&[
        "mount",
        "--daemon",
        "--room",
        "r1",
        "--secret-file",
        "/s",
        p,
    ]);
    assert!(
        err.contains("the daemon verifies tokens with its own secret_file"),
        "{err}"
    );
    assert!(!is_mounted(&mnt));
    // A token needs no --secret-file with --daemon: the daemon verifies it with its own.
    let tok = token(
        &d,
        &["--room", "r9", "--path", "outputs/:rw", "--name", "minted"],
    );
    let (code, out, err) = d.cli(&["mount", "--daemon", "--token", &tok, p]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("mounted room r9"), "{out}");
    let (code, _, err) = d.cli(&["unmount", p]);
    assert_eq!(code, 0, "{err}");
    // Without --daemon it does, and says so.
    let (code, _, err) = roomfs(&["mount", "--token", &tok, p]);
    one_line(1, code, &err);
    assert!(
        err.contains("--token needs --secret-file") && err.contains("--daemon"),
        "{err}"
    );
    // --socket is for --daemon only (a usage error: status 2).
    let (code, _, err) = d.cli(&["mount", "--room", "r1", p]);
    one_line(2, code, &err);
    assert!(err.contains("--daemon"), "{err}");
    let (code, _, err) = roomfs(&["mount", "--room", "r1", "--poll-window-us", "2000000", p]);
    one_line(1, code, &err);
    assert!(
        err.contains("--poll-window-us must be at most 1000000"),
        "{err}"
    );
    // Everything the API takes arrives: the persisted request shows it.
    let (code, _, err) = d.cli(&[
        "mount",
        "--daemon",
        "--session",
        "s1",
        "--grant",
        "outputs/:rw",
        "--sync-on-close",
        "--no-passthrough",
        "--read-only",
        "--label",
        "agent-7",
        p,
    ]);
    assert!(code == 1 && err.contains("no session"), "{err}");
    d.json(&["session", "create", "s1", "--json"]);
    let (code, _, err) = d.cli(&[
        "mount",
        "--daemon",
        "--session",
        "s1",
        "--grant",
        "outputs/:rw",
        "--sync-on-close",
        "--no-passthrough",
        "--read-only",
        "--noexec",
        "--label",
        "agent-7",
        p,
    ]);
    assert_eq!(code, 0, "{err}");
    let persisted: serde_json::Value =
        serde_json::from_slice(&fs::read(d.data.join("state/mounts.json")).unwrap()).unwrap();
    assert_eq!(
        persisted["mounts"],
        serde_json::json!([{
            "mountpoint": p, "room": null, "session": "s1", "grant": ["outputs/:rw"],
            "token": null, "sync_on_close": true, "passthrough": false, "label": "agent-7",
            "read_only": true, "noexec": true
        }])
    );
    let refused = fs::write(mnt.join("outputs"), b"x").unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EROFS));
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(p))
        .unwrap();
    let options = line.split(' ').nth(5).unwrap();
    assert!(options.split(',').any(|o| o == "noexec"), "{line}");
    // Listed as such.
    let listed = d.json(&["mounts", "--json"]);
    assert_eq!(listed[0]["noexec"], true, "{listed}");
    let (_, table, _) = d.cli(&["mounts"]);
    assert!(table.contains("read-only mount, noexec"), "{table}");
}

#[test]
fn an_unprivileged_user_mounts_through_fusermount3() {
    // In a mount namespace of its own (gone with its last process, mounts and all), where
    // /dev/fuse is usable by every user as distributions ship it, `nobody` mounts a room
    // through the setuid fusermount3 (noexec: nothing in it runs), writes into it, and
    // unmounts it.
    let tmp = tempfile::Builder::new()
        .prefix("roomfs-user-")
        .tempdir_in("/tmp")
        .unwrap();
    let t = tmp.path();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(t, fs::Permissions::from_mode(0o755)).unwrap();
    fs::copy(BIN, t.join("roomfs")).unwrap();
    for dir in ["mnt", "data"] {
        fs::create_dir(t.join(dir)).unwrap();
        std::os::unix::fs::chown(t.join(dir), Some(65534), Some(65534)).unwrap();
    }
    let script = r#"
        set -e
        mknod -m 666 "$T/fuse" c 10 229
        mount --bind "$T/fuse" /dev/fuse
        as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
        as_nobody "$T/roomfs" mount --data-dir "$T/data" --room r1 --noexec "$T/mnt" 2>"$T/log" &
        server=$!
        for i in $(seq 200); do
            grep -q " $T/mnt " /proc/self/mountinfo && break
            kill -0 $server 2>/dev/null || { cat "$T/log"; exit 1; }
            sleep 0.1
        done
        grep " $T/mnt " /proc/self/mountinfo
        as_nobody sh -c "echo hello > $T/mnt/f"
        as_nobody sh -c "printf '#!/bin/sh\\n' > $T/mnt/run.sh && chmod +x $T/mnt/run.sh"
        as_nobody "$T/mnt/run.sh" 2>/dev/null && echo "a script ran" || echo "exec refused: $?"
        echo "content: $(cat "$T/data/rooms/r1/f")"
        as_nobody "$T/roomfs" unmount "$T/mnt"
        for i in $(seq 200); do
            kill -0 $server 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 $server 2>/dev/null; then kill -9 $server; echo "server still running"; fi
        wait $server && echo "server exited: 0"
        grep -q " $T/mnt " /proc/self/mountinfo && echo "still mounted" || true
        cat "$T/log"
    "#;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .env("T", t)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("fuse.roomfs roomfs:rooms/r1") && text.contains("user_id=65534"),
        "{text}"
    );
    assert!(text.contains("content: hello"), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("fuse.roomfs roomfs:rooms/r1"))
        .unwrap();
    let options = line.split(' ').nth(5).unwrap();
    for want in ["noexec", "nosuid", "nodev"] {
        assert!(options.split(',').any(|o| o == want), "{want}: {line}");
    }
    // setpriv exits 126 when it cannot execute the program (127: not found).
    assert!(text.contains("exec refused: 126"), "{text}");
    assert!(text.contains("server exited: 0"), "{text}");
    assert!(!text.contains("still mounted"), "{text}");
}

#[test]
fn a_mount_elsewhere_on_a_path_that_is_not_utf8_hides_no_mount() {
    // Any user may mount on a directory named with any bytes. Mounts are checked in
    // mountinfo, where one such line made every new mount "not listed" (and refused).
    use std::os::unix::ffi::OsStrExt;
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let c = common::cstr(&self.0);
            // SAFETY: a NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let d = Daemon::start();
    let odd = d.dir("odd").join(std::ffi::OsStr::from_bytes(b"m\xff"));
    fs::create_dir(&odd).unwrap();
    common::mount_tmpfs(&odd, "size=1m");
    let _odd = Unmount(odd);
    let mnt = d.dir("mnt");
    d.mount(&["--room", "r1"], &mnt);
    fs::write(mnt.join("marker"), b"served").unwrap();
    assert!(serves(&mnt, b"served"));
    let (code, _, err) = roomfs(&["unmount", mnt.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(!is_mounted(&mnt));
}
