//! The command line and the daemon's configuration as an operator meets them: which arguments
//! are taken, and what a mistake says and exits with.

mod common;

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, is_mounted, output};

/// Runs `roomfs ARGS`; returns (exit code, stdout, stderr).
fn roomfs<I, S>(args: I) -> (i32, String, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new(BIN).args(args))
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = output(cmd.env("RUST_BACKTRACE", "0"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An argument of these bytes (which need not be UTF-8).
fn bytes(b: &[u8]) -> OsString {
    OsString::from_vec(b.to_vec())
}

/// `dir` joined with a name of these bytes.
fn odd_path(dir: &Path, name: &[u8]) -> PathBuf {
    dir.join(bytes(name))
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn arguments_that_are_not_utf8_are_paths_or_named_mistakes_never_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    // Text arguments (ids, grants, the paths the daemon's JSON API takes) are refused by name,
    // as the command-line mistakes they are.
    for (args, named) in [
        (
            vec![
                bytes(b"url"),
                "--room".into(),
                "r1".into(),
                bytes(b"odd/\xff.txt"),
            ],
            "invalid value 'odd/\\xFF.txt' for '<PATH>': not UTF-8 text",
        ),
        (
            vec![bytes(b"mount"), bytes(b"--room=r\xff"), "/mnt".into()],
            "invalid value 'r\\xFF' for '--room <ID>'",
        ),
        (
            vec![
                "session".into(),
                "end".into(),
                "s1".into(),
                "--to-room".into(),
                "r1".into(),
                "--export".into(),
                bytes(b"out\xff/"),
            ],
            "for '--export <PATH>'",
        ),
        (
            vec![
                "token".into(),
                "issue".into(),
                "--secret-file".into(),
                "/s".into(),
                "--room".into(),
                "r1".into(),
                "--path".into(),
                bytes(b"a\xff:rw"),
            ],
            "for '--path <PATH[:ro|:rw]>'",
        ),
    ] {
        let (code, _, err) = roomfs(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(named), "{args:?}: {err}");
        assert!(err.contains("--help"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // A path of this host may be any bytes: a socket...
    let socket = odd_path(tmp.path(), b"s\xff.sock");
    let (code, _, err) = roomfs([OsStr::new("status"), "--socket".as_ref(), socket.as_ref()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no roomfs daemon at"), "{err}");
    // ... and a mount point, served by `roomfs mount`...
    let data = tmp.path().join("data");
    let mnt = odd_path(tmp.path(), b"m\xff");
    std::fs::create_dir(&mnt).unwrap();
    let mut child = Command::new(BIN)
        .args(["mount", "--room", "r1", "--data-dir"])
        .arg(&data)
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the mount is up", || {
        assert!(child.try_wait().unwrap().is_none(), "roomfs mount exited");
        is_mounted(&mnt)
    });
    std::fs::write(mnt.join("f"), "one").unwrap();
    let (code, _, err) = roomfs([OsStr::new("unmount"), mnt.as_ref()]);
    assert_eq!(code, 0, "{err}");
    assert!(child.wait().unwrap().success());
    assert_eq!(
        std::fs::read(data.join("rooms/r1/f")).unwrap(),
        b"one".to_vec()
    );
    // ... or by the mount helper mount(8) runs.
    let helper = tmp.path().join("mount.fuse.roomfs");
    std::os::unix::fs::symlink(BIN, &helper).unwrap();
    // With a log of its own: the server it starts would otherwise hold our stderr pipe open.
    let log = tmp.path().join("helper.log");
    let options = format!("data_dir={},log={}", data.display(), log.display());
    let (code, _, err) = run(Command::new(&helper)
        .arg("room:r1")
        .arg(&mnt)
        .args(["-o", &options]));
    assert_eq!(code, 0, "{err}");
    assert!(is_mounted(&mnt));
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"one".to_vec());
    let (code, _, err) = roomfs([OsStr::new("unmount"), mnt.as_ref()]);
    assert_eq!(code, 0, "{err}");
    wait_until("the helper's mount is gone", || !is_mounted(&mnt));
    // The daemon's API takes paths as text: such a mount point is refused before asking it,
    // not sent mangled.
    let (code, _, err) = roomfs([
        OsStr::new("mount"),
        "--daemon".as_ref(),
        "--socket".as_ref(),
        tmp.path().join("none.sock").as_ref(),
        "--room".as_ref(),
        "r1".as_ref(),
        mnt.as_ref(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("is not UTF-8, and the daemon's API takes paths as text"),
        "{err}"
    );
    let (code, _, err) = run(Command::new(&helper)
        .arg("room:r1")
        .arg(&mnt)
        .args(["-o", "daemon"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is not UTF-8"), "{err}");
    assert!(!is_mounted(&mnt));
}

#[test]
fn a_records_dir_named_but_missing_is_refused_not_created() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no/such/agent-dir");
    let config = tmp.path().join("c.json");
    std::fs::write(
        &config,
        format!(r#"{{"records_dir": "{}"}}"#, missing.display()),
    )
    .unwrap();
    // Under timeout(1): a daemon that started would serve until killed.
    let (code, _, err) = run(Command::new("timeout")
        .args(["20", BIN, "serve", "--config"])
        .arg(&config)
        .arg("--socket")
        .arg(tmp.path().join("s.sock"))
        .arg("--data-dir")
        .arg(tmp.path().join("data")));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("records_dir {} does not exist", missing.display())),
        "{err}"
    );
    // The same for a mount served here.
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let (code, _, err) = roomfs([
        OsStr::new("mount"),
        "--room".as_ref(),
        "r1".as_ref(),
        "--data-dir".as_ref(),
        tmp.path().join("data").as_ref(),
        "--records-dir".as_ref(),
        missing.as_ref(),
        mnt.as_ref(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--records-dir"), "{err}");
    assert!(!tmp.path().join("no").exists(), "nothing was created");
    assert!(!is_mounted(&mnt));
    // One that exists is served.
    let dir = tmp.path().join("agent");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        &config,
        format!(r#"{{"records_dir": "{}"}}"#, dir.display()),
    )
    .unwrap();
    let (code, _, err) = run(Command::new("timeout")
        .args(["-s", "TERM", "2", BIN, "serve", "--config"])
        .arg(&config)
        .arg("--socket")
        .arg(tmp.path().join("s.sock"))
        .arg("--data-dir")
        .arg(tmp.path().join("data")));
    assert_eq!(code, 124, "an existing records_dir serves: {err}");
    assert!(dir.join("session").is_dir());
}

#[test]
fn an_empty_path_is_named_inside_the_space_it_was_meant_for() {
    let d = common::daemon::Daemon::start();
    let (code, _, err) = d.cli(&["url", "--room", "r1", ""]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(r#""" names no path inside room r1"#), "{err}");
    d.json(&["session", "create", "s1", "--json"]);
    let (code, _, err) = d.cli(&["session", "end", "s1", "--export", "./", "--to-room", "r1"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(r#""./" names no path inside session s1"#),
        "{err}"
    );
}

/// A daemon that goes away in the middle of a request (stopped, crashed) is said to have,
/// with what that means for the request, not as a protocol error.
#[test]
fn a_daemon_gone_before_it_answered_is_said_so() {
    use std::io::Read;
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("ctl.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    // Takes the request, then closes the connection without a word.
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = conn.read(&mut buf);
    });
    let (code, _, err) = roomfs([OsStr::new("status"), "--socket".as_ref(), socket.as_ref()]);
    server.join().unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("went away before it answered") && err.contains("run the command again"),
        "{err}"
    );
}
