//! The daemon, driven through its socket and CLI as an agent host would.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::{
    BIN, cached_second_read, cstr, errno, is_mounted, output, python,
    second_read_after_a_change_on_disk,
};
use serde_json::{Value, json};

fn fixture(collection: &str, id: &str) -> Value {
    let p = format!(
        "{}/tests/fixtures/agent-records/{collection}/{id}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap()
}

/// Loads the fixture session ses_7f3a with its messages and parts through the API.
fn load_fixture_session(d: &Daemon) {
    d.call(
        json!({"method": "session.set", "id": "ses_7f3a", "value": fixture("session", "ses_7f3a")}),
    );
    for m in ["msg_0001", "msg_0002", "msg_0003", "msg_0004"] {
        d.call(json!({"method": "message.set", "id": m, "value": fixture("message", m)}));
    }
    for p in 1..=7 {
        let id = format!("prt_000{p}");
        d.call(json!({"method": "part.set", "id": id, "value": fixture("part", &id)}));
    }
}

#[test]
fn records_follow_the_sdk_semantics_for_every_collection() {
    let d = Daemon::start();
    for (collection, id) in [
        ("session", "ses_7f3a"),
        ("session", "ses_empty"),
        ("message", "msg_0003"),
        ("part", "prt_0007"),
        ("sandbox", "sbx_19c"),
        ("setup", "setup_v3"),
    ] {
        let value = fixture(collection, id);
        assert_eq!(
            d.call(json!({"method": format!("{collection}.get"), "id": id})),
            Value::Null
        );
        d.call(json!({"method": format!("{collection}.set"), "id": id, "value": value}));
        // Unknown fields, nulls, floats and non-ASCII text round-trip unchanged.
        assert_eq!(
            d.call(json!({"method": format!("{collection}.get"), "id": id})),
            value,
            "{collection}/{id}"
        );
    }
    let merged = d.call(json!({"method": "session.update", "id": "ses_7f3a", "updates": {"updatedAt": 5, "model": "m2"}}));
    assert_eq!(merged["model"], "m2");
    assert_eq!(merged["system"], fixture("session", "ses_7f3a")["system"]);
    let merged = d.call(
        json!({"method": "sandbox.update", "id": "sbx_19c", "updates": {"binding": "local"}}),
    );
    assert_eq!(
        merged["metadata"],
        fixture("sandbox", "sbx_19c")["metadata"]
    );
    load_fixture_session(&d);
    let messages = d.call(json!({"method": "message.listBySession", "sessionId": "ses_7f3a"}));
    let ids: Vec<_> = messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["msg_0001", "msg_0002", "msg_0003", "msg_0004"]);
    let parts = d.call(json!({"method": "part.listBySession", "sessionId": "ses_7f3a"}));
    assert_eq!(parts.as_array().unwrap().len(), 7);
    assert_eq!(
        d.call(json!({"method": "message.listBySession", "sessionId": "ses_empty"})),
        json!([])
    );
    // update of a missing id is a 404 error with a readable message; bad calls are refused.
    let (code, _, err) = d.cli(&[
        "records",
        "call",
        r#"{"method":"message.update","id":"nope","updates":{}}"#,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("nope"), "{err}");
    let (code, _, err) = d.cli(&["records", "call", r#"{"method":"session.drop","id":"x"}"#]);
    assert_eq!(code, 1);
    assert!(err.contains("session.drop"), "{err}");
    let (code, _, err) = d.cli(&["records", "call", "not json"]);
    assert_eq!(code, 1);
    assert!(err.contains("not JSON"), "{err}");
    // The records are plain files in the SDK's localStorage layout.
    assert!(d.data.join("records/message/msg_0003.json").exists());
    // CLI conveniences.
    assert_eq!(
        d.json(&["records", "get", "setup", "setup_v3"]),
        fixture("setup", "setup_v3")
    );
    let file = d.dir("rec").join("sandbox.json");
    fs::write(&file, r#"{"id": "sbx_cli", "binding": "local"}"#).unwrap();
    let (code, out, err) = d.cli(&[
        "records",
        "set",
        "sandbox",
        "sbx_cli",
        file.to_str().unwrap(),
    ]);
    assert_eq!(
        (code, out.as_str()),
        (0, "stored sandbox \"sbx_cli\"\n"),
        "{err}"
    );
    assert_eq!(
        d.json(&["records", "get", "sandbox", "sbx_cli"])["binding"],
        "local"
    );
    // A collection that does not exist is named as such, with those that do.
    for args in [
        vec!["records", "get", "bogus", "x"],
        vec!["records", "list", "session", "--session", "ses_7f3a"],
    ] {
        let (code, _, err) = d.cli(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains("invalid value") && err.contains("possible values"),
            "{err}"
        );
    }
    assert_eq!(
        d.json(&[
            "records",
            "list",
            "message",
            "--session",
            "ses_7f3a",
            "--json"
        ])
        .as_array()
        .unwrap()
        .len(),
        4
    );
}

/// A mount of a session ended while busy (an agent's shell in it: the daemon can only detach
/// it) is done with: an agent creating entries through it as fast as it can does not keep the
/// session's files from being deleted, nothing more can be made there, and it shows nothing of
/// a later session of the same id (whose `.meta` records are found by that id).
#[test]
fn a_busy_mount_of_an_ended_session_shows_nothing_of_the_next_session_of_its_id() {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    let d = Daemon::start();
    // No limit on entries: only the end stops the agent making them.
    d.json(&[
        "session",
        "create",
        "ses_7f3a",
        "--max-files",
        "unlimited",
        "--json",
    ]);
    let mnt = d.dir("mnt");
    d.mount(&["--session", "ses_7f3a"], &mnt);
    // Where the agent is (a descriptor of the mount's root, as a shell's cwd).
    let held = fs::File::open(&mnt).unwrap();
    let through = |rel: &str| format!("/proc/self/fd/{}/{rel}", held.as_raw_fd());
    fs::write(through("before"), b"x").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let creator = {
        let (stop, at) = (stop.clone(), through(""));
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = fs::create_dir(format!("{at}d{i}"));
                i += 1;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let (code, _, err) = d.cli(&["session", "end", "ses_7f3a"]);
    stop.store(true, Ordering::Relaxed);
    creator.join().unwrap();
    assert_eq!(code, 0, "{err}");
    // The id is taken again, and the new session has records.
    d.json(&["session", "create", "ses_7f3a", "--json"]);
    load_fixture_session(&d);
    let mnt2 = d.dir("mnt2");
    d.mount(&["--session", "ses_7f3a"], &mnt2);
    assert!(mnt2.join(".meta/session.json").exists());
    for rel in [".meta/session.json", ".meta/history.json", "before"] {
        let err = fs::read(through(rel)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{rel}: {err}");
    }
    assert_eq!(
        fs::create_dir(through("after")).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    assert!(!mnt2.join("after").exists());
    drop(held);
}

#[test]
fn meta_shows_the_sessions_records_read_only_and_fresh() {
    let d = Daemon::start();
    d.json(&["session", "create", "ses_7f3a", "--json"]);
    load_fixture_session(&d);
    let mnt = d.dir("mnt");
    d.mount(&["--session", "ses_7f3a"], &mnt);
    let meta = mnt.join(".meta");
    let session: Value =
        serde_json::from_slice(&fs::read(meta.join("session.json")).unwrap()).unwrap();
    assert_eq!(session, fixture("session", "ses_7f3a"));
    // `cp` (copy_file_range, served by the daemon) of a record into the space.
    let cp = std::process::Command::new("cp")
        .arg(meta.join("session.json"))
        .arg(mnt.join("session-copy.json"))
        .status()
        .unwrap();
    assert!(cp.success());
    assert_eq!(
        fs::read(mnt.join("session-copy.json")).unwrap(),
        fs::read(meta.join("session.json")).unwrap()
    );
    assert_eq!(
        fs::metadata(meta.join("session.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o444
    );
    assert_eq!(
        fs::metadata(&meta).unwrap().permissions().mode() & 0o777,
        0o555
    );
    let mut names: Vec<_> = fs::read_dir(meta.join("parts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 7);
    assert_eq!(names[0], "prt_0001.json");
    let msg3: Value =
        serde_json::from_slice(&fs::read(meta.join("messages/msg_0003.json")).unwrap()).unwrap();
    assert_eq!(msg3, fixture("message", "msg_0003"));
    // history: messages in order, each with its parts in index order.
    let history: Value =
        serde_json::from_slice(&fs::read(meta.join("history.json")).unwrap()).unwrap();
    let msgs = history["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 4);
    let last_parts: Vec<_> = msgs[3]["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        last_parts[0], "prt_0007",
        "prt_0007 has index 0 in msg_0004"
    );
    // The size at stat is the size read, and an update shows on the next open.
    let path = meta.join("session.json");
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        fs::read(&path).unwrap().len() as u64
    );
    d.call(json!({"method": "session.update", "id": "ses_7f3a", "updates": {"system": "A much longer system prompt than before, to change the size."}}));
    let fresh: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(
        fresh["system"],
        "A much longer system prompt than before, to change the size."
    );
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        fs::read(&path).unwrap().len() as u64
    );
    d.call(json!({"method": "message.set", "id": "msg_0005", "value": {"id": "msg_0005", "sessionId": "ses_7f3a", "role": "user", "createdAt": 1763700099000u64}}));
    assert!(meta.join("messages/msg_0005.json").exists());
    // Every change under .meta is refused with EACCES, and nothing changes.
    let before = fs::read(&path).unwrap();
    assert_eq!(errno(fs::write(meta.join("new.json"), b"{}")), libc::EACCES);
    assert_eq!(
        errno(fs::OpenOptions::new().write(true).open(&path)),
        libc::EACCES
    );
    assert_eq!(
        errno(
            fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&path)
        ),
        libc::EACCES
    );
    assert_eq!(unsafe { libc::truncate(cstr(&path).as_ptr(), 0) }, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EACCES)
    );
    assert_eq!(errno(fs::remove_file(&path)), libc::EACCES);
    assert_eq!(
        errno(fs::rename(&path, mnt.join("stolen.json"))),
        libc::EACCES
    );
    fs::write(mnt.join("mine.json"), b"{}").unwrap();
    assert_eq!(
        errno(fs::rename(mnt.join("mine.json"), meta.join("mine.json"))),
        libc::EACCES
    );
    assert_eq!(errno(fs::create_dir(meta.join("d"))), libc::EACCES);
    assert_eq!(errno(fs::remove_dir(meta.join("parts"))), libc::EACCES);
    assert_eq!(
        errno(fs::set_permissions(
            &path,
            fs::Permissions::from_mode(0o666)
        )),
        libc::EACCES
    );
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, cstr(&path).as_ptr(), std::ptr::null(), 0) },
        -1
    );
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EACCES)
    );
    assert_eq!(fs::read(&path).unwrap(), before);
    // A mount whose grant does not cover .meta cannot read it.
    let narrow = d.dir("narrow");
    d.mount(
        &["--session", "ses_7f3a", "--grant", "outputs/:rw"],
        &narrow,
    );
    assert_eq!(
        errno(fs::read(narrow.join(".meta/session.json"))),
        libc::EACCES
    );
    assert_eq!(fs::read_dir(&narrow).unwrap().count(), 0);
}

/// Another process (the agent SDK) writing the records dir: its changes show at the next
/// look, in place or by rename; what is not a record (a FIFO, a symlink out, a directory) is
/// skipped, never waited on or followed.
#[test]
fn meta_follows_other_writers_and_skips_what_is_not_a_record() {
    let d = Daemon::start();
    d.json(&["session", "create", "ses_7f3a", "--json"]);
    load_fixture_session(&d);
    let mnt = d.dir("mnt");
    d.mount(&["--session", "ses_7f3a"], &mnt);
    let meta = mnt.join(".meta");
    let records = d.data.join("records");
    let names = |dir: &std::path::Path| -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let cat = |path: &std::path::Path| -> Value {
        let out = Command::new("cat").arg(path).output().unwrap();
        assert!(out.status.success(), "cat {}", path.display());
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(names(&meta.join("messages")).len(), 4);

    // A new message written in place, as Node's writeFile does.
    let message = json!({"id": "msg_ext", "sessionId": "ses_7f3a", "role": "user", "createdAt": 1763700099000u64});
    fs::write(records.join("message/msg_ext.json"), message.to_string()).unwrap();
    assert!(names(&meta.join("messages")).contains(&"msg_ext.json".to_owned()));
    assert_eq!(cat(&meta.join("messages/msg_ext.json")), message);
    assert_eq!(
        cat(&meta.join("history.json"))["messages"][4]["id"],
        "msg_ext"
    );
    // An existing part rewritten in place.
    let mut part = fixture("part", "prt_0001");
    part["text"] = json!("rewritten by another process");
    fs::write(records.join("part/prt_0001.json"), part.to_string()).unwrap();
    assert_eq!(cat(&meta.join("parts/prt_0001.json")), part);

    // Planted: a FIFO, a symlink to a file outside, a directory.
    let outside = d.dir("outside");
    let secret = json!({"id": "prt_link", "sessionId": "ses_7f3a", "messageId": "msg_0001", "index": 9, "text": "SECRET"});
    fs::write(outside.join("secret.json"), secret.to_string()).unwrap();
    let fifo = cstr(&records.join("message/msg_fifo.json"));
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    std::os::unix::fs::symlink(
        outside.join("secret.json"),
        records.join("part/prt_link.json"),
    )
    .unwrap();
    fs::create_dir(records.join("part/prt_dir.json")).unwrap();
    let ls = Command::new("timeout")
        .args(["20", "ls", "-l"])
        .arg(meta.join("messages"))
        .output()
        .unwrap();
    assert!(ls.status.success(), "ls -l .meta/messages did not finish");
    assert_eq!(String::from_utf8(ls.stdout).unwrap().lines().count(), 1 + 5);
    assert_eq!(names(&meta.join("parts")).len(), 7);
    assert_eq!(
        errno(fs::read(meta.join("parts/prt_link.json"))),
        libc::ENOENT
    );
    let history = fs::read_to_string(meta.join("history.json")).unwrap();
    assert!(!history.contains("SECRET"));
    // Through the API, a get of one names what is there.
    let (code, _, err) = d.cli(&["records", "get", "message", "msg_fifo"]);
    assert_ne!(code, 0);
    assert!(err.contains("msg_fifo.json is a FIFO"), "{err}");
    let (code, _, err) = d.cli(&["records", "get", "part", "prt_link"]);
    assert_ne!(code, 0);
    assert!(err.contains("prt_link.json is a symbolic link"), "{err}");
    assert!(!err.contains("SECRET"), "{err}");
}

#[test]
fn ending_a_session_removes_everything_after_exporting() {
    let mut d = Daemon::start();
    d.json(&["session", "create", "s1", "--json"]);
    d.call(json!({"method": "session.set", "id": "s1", "value": {"id": "s1", "createdAt": 1, "updatedAt": 1, "model": "m"}}));
    d.call(json!({"method": "message.set", "id": "m1", "value": {"id": "m1", "sessionId": "s1", "role": "user", "createdAt": 2}}));
    let mnt = d.dir("mnt");
    d.mount(&["--session", "s1"], &mnt);
    fs::create_dir_all(mnt.join("outputs/charts")).unwrap();
    fs::write(mnt.join("outputs/report.md"), b"# done").unwrap();
    fs::write(mnt.join("outputs/charts/a.svg"), b"<svg/>").unwrap();
    fs::write(mnt.join("scratch.tmp"), b"x").unwrap();
    let report = d.json(&[
        "session",
        "end",
        "s1",
        "--export",
        "outputs/",
        "--to-room",
        "team",
        "--json",
    ]);
    assert_eq!(report["exported"], json!(["team/outputs"]));
    assert_eq!(report["deleted_records"], 2);
    assert!(
        !is_mounted(&mnt.canonicalize().unwrap()),
        "the session's mount is gone"
    );
    assert!(!d.stored_exists("sessions/s1"));
    assert!(!d.data.join("records/message/m1.json").exists());
    assert_eq!(d.stored("rooms/team/outputs/report.md").unwrap(), b"# done");
    assert_eq!(
        d.stored("rooms/team/outputs/charts/a.svg").unwrap(),
        b"<svg/>"
    );
    assert!(!d.stored_exists("rooms/team/scratch.tmp"));
    let (code, _, err) = d.cli(&["session", "show", "s1"]);
    assert_eq!(code, 1);
    assert!(err.contains("no session"), "{err}");
    // Bad requests change nothing.
    let (code, _, err) = d.cli(&["session", "create", "s9", "--ttl", "4000d"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("at most 315360000 (10 years"), "{err}");
    d.json(&["session", "create", "s2", "--json"]);
    let (code, _, err) = d.cli(&[
        "session",
        "end",
        "s2",
        "--export",
        "../etc",
        "--to-room",
        "team",
    ]);
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = d.cli(&[
        "session",
        "end",
        "s2",
        "--export",
        "missing/",
        "--to-room",
        "team",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("missing"), "{err}");
    // A room to export to, with nothing to export: everything would be deleted. Refused by
    // the CLI and by the API.
    let (code, _, err) = d.cli(&["session", "end", "s2", "--to-room", "team"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--export"), "{err}");
    let out = output(
        std::process::Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&d.socket)
            .args(["-X", "POST", "-d", r#"{"to_room": "team"}"#])
            .arg("http://roomfs/v1/sessions/s2/end"),
    );
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(answer.ends_with("\n400"), "{answer}");
    assert!(answer.contains("without export"), "{answer}");
    assert!(d.stored_exists("sessions/s2"));
    let (code, _, err) = d.cli(&["session", "create", "s2"]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    assert!(d.stop().success());
}

#[test]
fn an_export_that_fails_part_way_ends_nothing_and_can_be_done_again() {
    if common::store_is_s3() {
        return; // the data dir is a disk of 3 MiB here, which a bucket is not
    }
    // The data dir is a disk of 3 MiB (the whole of it: commits rename within it) that the
    // session's two files of 512 KiB and a room's 1.25 MiB nearly fill: the second file of the
    // export does not fit.
    let d = Daemon::with_setup(None, |tmp| {
        let data = tmp.join("data");
        fs::create_dir_all(&data).unwrap();
        common::mount_tmpfs(&data, "size=3m,mode=0700"); // unmounted with the daemon
        fs::create_dir_all(data.join("rooms/team")).unwrap();
        fs::write(data.join("rooms/team/ballast"), vec![1u8; 1280 << 10]).unwrap();
    });
    d.json(&["session", "create", "s1", "--json"]);
    let mnt = d.dir("mnt");
    d.mount(&["--session", "s1"], &mnt);
    fs::create_dir(mnt.join("outputs")).unwrap();
    let data = vec![7u8; 512 << 10];
    for name in ["a.bin", "b.bin"] {
        fs::write(mnt.join("outputs").join(name), &data).unwrap();
    }
    let end = || {
        d.cli(&[
            "session",
            "end",
            "s1",
            "--export",
            "outputs/",
            "--to-room",
            "team",
        ])
    };
    let (code, _, err) = end();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("No space left") && err.contains("was not ended") && err.contains("again"),
        "{err}"
    );
    // Nothing of the session is lost; it is still there to end.
    for name in ["a.bin", "b.bin"] {
        assert!(d.stored(&format!("sessions/s1/outputs/{name}")).unwrap() == data);
    }
    let (code, _, err) = d.cli(&["session", "show", "s1"]);
    assert_eq!(code, 0, "{err}");
    // Once the room has room, the same end exports everything and ends the session.
    let room = d.data.join("rooms/team");
    fs::remove_file(room.join("ballast")).unwrap();
    let (code, _, err) = end();
    assert_eq!(code, 0, "{err}");
    for name in ["a.bin", "b.bin"] {
        assert!(fs::read(room.join("outputs").join(name)).unwrap() == data);
    }
    assert!(!d.stored_exists("sessions/s1"));
}

#[test]
fn idle_sessions_end_after_their_ttl() {
    let d = Daemon::start();
    d.json(&["session", "create", "brief", "--ttl", "2s", "--json"]);
    d.store_behind("sessions/brief/f", b"x");
    // Ending removes the files, then the records, then the session's state: wait for the last.
    let deadline = Instant::now() + Duration::from_secs(15);
    while d.json(&["session", "list", "--json"]) != json!([]) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        d.json(&["session", "list", "--json"]),
        json!([]),
        "{}",
        d.log()
    );
    assert!(!d.stored_exists("sessions/brief"));
    assert!(d.log().contains("idle for over 2s"), "{}", d.log());
}

/// A second `roomfs serve` on the socket of a running daemon fails before it changes anything:
/// the running daemon's mounts added through the API still come back at its next restart (the
/// failed start used to save them as none).
#[test]
fn a_second_daemon_on_the_socket_or_the_data_dir_changes_nothing() {
    let mut d = Daemon::start();
    let mnt = d.dir("mnt");
    d.mount(&["--room", "r1"], &mnt);
    let out = output(
        std::process::Command::new(BIN)
            .arg("serve")
            .arg("--socket")
            .arg(&d.socket)
            .arg("--data-dir")
            .arg(&d.data),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("another roomfs daemon is serving"), "{err}");
    assert!(!err.contains("not restoring"), "{err}");
    // Nor does one on the same data dir with a socket of its own (it found the first one's
    // mount points in use and saved its mounts as none), nor one that cannot listen for
    // downloads; neither leaves a socket behind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = d.dir("conf").join("config.json");
    let listen = taken.local_addr().unwrap();
    let secret = d.dir("conf").join("secret");
    fs::write(&secret, "s".repeat(40)).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(
        &config,
        format!(
            r#"{{"http_listen": "{listen}", "secret_file": "{}"}}"#,
            secret.display()
        ),
    )
    .unwrap();
    for (other, data, conf, says) in [
        (
            "other.sock",
            d.data.clone(),
            None,
            "another roomfs daemon serves this data dir",
        ),
        (
            "third.sock",
            d.dir("elsewhere"),
            Some(&config),
            "cannot listen for downloads",
        ),
    ] {
        let socket = d.dir("sockets").join(other);
        let mut cmd = std::process::Command::new(BIN);
        cmd.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--data-dir")
            .arg(&data);
        if let Some(conf) = conf {
            cmd.arg("--config").arg(conf);
        }
        let out = output(&mut cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(says), "{err}");
        assert!(!err.contains("not restoring"), "{err}");
        assert!(!socket.exists(), "{other} left behind");
    }
    assert!(d.stop().success());
    d.run();
    let mounts = d.json(&["mounts", "--json"]);
    assert!(is_mounted(&mnt.canonicalize().unwrap()), "{mounts}");
}

/// A session with a file open in one of its mounts is in use, however long its writer pauses:
/// its TTL does not end it (it ended under a writer, whose output was lost at the close).
#[test]
fn a_session_with_a_file_open_is_not_idle() {
    let d = Daemon::start();
    d.json(&["session", "create", "busy", "--ttl", "2s", "--json"]);
    let mnt = d.dir("mnt");
    d.mount(&["--session", "busy"], &mnt);
    let mut log = fs::File::create(mnt.join("log.txt")).unwrap();
    use std::io::Write;
    for i in 0..4 {
        writeln!(log, "line {i}").unwrap();
        std::thread::sleep(Duration::from_millis(1500));
    }
    drop(log);
    assert_eq!(
        fs::read_to_string(mnt.join("log.txt"))
            .unwrap()
            .lines()
            .count(),
        4,
        "{}",
        d.log()
    );
    assert!(!d.log().contains("idle for over"), "{}", d.log());
    // Closed, and idle for its TTL: it ends.
    let deadline = Instant::now() + Duration::from_secs(15);
    while d.json(&["session", "list", "--json"]) != json!([]) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(d.log().contains("idle for over 2s"), "{}", d.log());
}

#[test]
fn limits_give_efbig_and_edquot_and_show_in_statfs() {
    let d = Daemon::start();
    d.json(&[
        "session",
        "create",
        "lim",
        "--max-file-size",
        "1000",
        "--max-files",
        "4",
        "--max-bytes",
        "2500",
        "--json",
    ]);
    let mnt = d.dir("mnt");
    d.mount(&["--session", "lim"], &mnt);
    // Largest file: a write is cut at the limit, then EFBIG; the file keeps what fit.
    let mut f = fs::File::create(mnt.join("big")).unwrap();
    use std::io::Write;
    let err = f.write_all(&[b'x'; 1500]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFBIG));
    drop(f);
    assert_eq!(fs::metadata(mnt.join("big")).unwrap().len(), 1000);
    let extend = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("big"))
        .and_then(|f| f.set_len(2000));
    assert_eq!(errno(extend), libc::EFBIG);
    // ... and so is growing it with fallocate, while zeroing inside it is fine.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("big"))
        .unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    assert_eq!(unsafe { libc::posix_fallocate(fd, 0, 2000) }, libc::EFBIG);
    let zero = libc::FALLOC_FL_ZERO_RANGE;
    assert_eq!(unsafe { libc::fallocate(fd, zero, 990, 10) }, 0);
    drop(f);
    assert_eq!(fs::metadata(mnt.join("big")).unwrap().len(), 1000);
    assert_eq!(
        fs::read(mnt.join("big")).unwrap()[985..],
        *b"xxxxx\0\0\0\0\0\0\0\0\0\0"
    );
    // Total bytes: 1000 used; 1000 more fits, the next 1000 does not.
    fs::write(mnt.join("b"), [b'y'; 1000]).unwrap();
    let err = fs::write(mnt.join("c"), [b'z'; 1000]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EDQUOT));
    // Entries: big, b, c (created, empty) → one more, then EDQUOT.
    fs::create_dir(mnt.join("d")).unwrap();
    assert_eq!(errno(fs::write(mnt.join("e"), b"")), libc::EDQUOT);
    assert_eq!(errno(fs::create_dir(mnt.join("e"))), libc::EDQUOT);
    fs::remove_file(mnt.join("c")).unwrap();
    fs::write(mnt.join("e"), b"").unwrap();
    // statfs reports the limits and the usage.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(cstr(&mnt).as_ptr(), &mut s) }, 0);
    assert_eq!(s.f_files, 4);
    assert_eq!(s.f_ffree, 0);
    assert_eq!(s.f_blocks * s.f_frsize, 2500 / s.f_frsize * s.f_frsize);
    let info = d.json(&["session", "show", "lim", "--json"]);
    assert_eq!(info["files"], 4);
    assert_eq!(info["bytes"], 2000);
}

#[test]
fn two_writers_replacing_one_file_count_once_against_the_byte_limit() {
    use std::io::Write;
    let d = Daemon::start();
    d.json(&[
        "session",
        "create",
        "lim",
        "--max-bytes",
        "100000",
        "--json",
    ]);
    let mnt = d.dir("mnt");
    d.mount(&["--session", "lim"], &mnt);
    // Two programs rewrite one report, 60 KB each: the second close replaces the first's
    // file, so the session never holds more than 60 KB.
    let open = || {
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(mnt.join("report.txt"))
            .unwrap()
    };
    let (mut a, mut b) = (open(), open());
    a.write_all(&[b'a'; 60_000]).unwrap();
    b.write_all(&[b'b'; 60_000]).unwrap();
    drop(a);
    // A third opens before the second's close, and writes after it.
    let mut c = open();
    b.sync_all().unwrap();
    drop(b);
    assert_eq!(
        fs::read(mnt.join("report.txt")).unwrap(),
        vec![b'b'; 60_000]
    );
    c.write_all(&[b'c'; 60_000]).unwrap();
    drop(c);
    assert_eq!(
        fs::read(mnt.join("report.txt")).unwrap(),
        vec![b'c'; 60_000]
    );
    let info = d.json(&["session", "show", "lim", "--json"]);
    assert_eq!(info["bytes"], 60_000, "{info}");
    // The limit still holds for what would be more.
    let mut e = fs::File::create(mnt.join("other.txt")).unwrap();
    let err = e.write_all(&[b'e'; 60_000]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EDQUOT));
}

/// Every name of a hard-linked file counts its bytes, and a link past the limit is `EDQUOT`:
/// linking and unlinking cannot take the usage below what is stored (each unlink gives a
/// name's bytes back, so links made past the limit took the count down to 0).
#[test]
fn hard_links_count_against_a_byte_limit_and_cannot_take_it_below_what_is_stored() {
    if common::store_is_s3() {
        return; // no hard links on S3 (EPERM, tested in posix.rs)
    }
    let d = Daemon::start();
    d.json(&["session", "create", "q", "--max-bytes", "200000", "--json"]);
    let mnt = d.dir("mnt");
    d.mount(&["--session", "q"], &mnt);
    fs::write(mnt.join("f1"), vec![b'1'; 90_000]).unwrap();
    fs::hard_link(mnt.join("f1"), mnt.join("x1")).unwrap();
    assert_eq!(
        errno(fs::hard_link(mnt.join("f1"), mnt.join("x2"))),
        libc::EDQUOT,
        "270,000 bytes of names"
    );
    assert!(!mnt.join("x2").exists());
    fs::remove_file(mnt.join("x1")).unwrap();
    let info = d.json(&["session", "show", "q", "--json"]);
    assert_eq!(info["bytes"], 90_000, "{info}");
    // What the limit leaves room for is still refused past it.
    fs::write(mnt.join("f2"), vec![b'2'; 90_000]).unwrap();
    let mut f3 = fs::File::create(mnt.join("f3")).unwrap();
    assert_eq!(
        f3.write_all(&[b'3'; 90_000]).unwrap_err().raw_os_error(),
        Some(libc::EDQUOT)
    );
    drop(f3);
    fs::remove_file(mnt.join("f2")).unwrap();
    fs::remove_file(mnt.join("f3")).unwrap();
    // Growth is charged for the names the file has at its close: names removed while it was
    // open leave room for it; names added meanwhile count.
    fs::write(mnt.join("g"), vec![b'g'; 10_000]).unwrap();
    for i in 0..4 {
        fs::hard_link(mnt.join("g"), mnt.join(format!("g{i}"))).unwrap();
    }
    let mut g = fs::OpenOptions::new()
        .append(true)
        .open(mnt.join("g"))
        .unwrap();
    for i in 0..4 {
        fs::remove_file(mnt.join(format!("g{i}"))).unwrap();
    }
    g.write_all(&[b'+'; 50_000]).unwrap();
    g.sync_all().unwrap();
    drop(g);
    assert_eq!(fs::metadata(mnt.join("g")).unwrap().len(), 60_000);
    let mut h = fs::File::create(mnt.join("h")).unwrap();
    for i in 0..4 {
        fs::hard_link(mnt.join("h"), mnt.join(format!("h{i}"))).unwrap();
    }
    h.write_all(&[b'h'; 30_000]).unwrap();
    assert_eq!(
        h.sync_all().unwrap_err().raw_os_error(),
        Some(libc::EDQUOT),
        "five names of 30,000 bytes past what is left"
    );
    let info = d.json(&["session", "show", "q", "--json"]);
    assert!(info["bytes"].as_u64().unwrap() <= 200_000, "{info}");
}

#[test]
fn configured_mounts_come_back_after_a_restart_and_sigterm_unmounts_all() {
    let mut d = Daemon::with_config(Some(
        r#"{"mounts": [{"mountpoint": "{tmp}/room", "room": "r1", "grant": ["inputs/:ro", "outputs/:rw"]}]}"#,
    ));
    let room = d.tmp.path().join("room");
    assert!(is_mounted(&room));
    d.make_dir_behind("rooms/r1/inputs");
    fs::create_dir(room.join("outputs")).unwrap();
    fs::write(room.join("outputs/x"), b"1").unwrap();
    assert_eq!(errno(fs::write(room.join("inputs/x"), b"1")), libc::EACCES);
    let runtime = d.dir("runtime");
    d.mount(&["--room", "r2"], &runtime);
    let mounts = d.json(&["mounts", "--json"]);
    assert_eq!(mounts.as_array().unwrap().len(), 2);
    assert_eq!(mounts[0]["from_config"], true);
    let status = d.stop();
    assert!(status.success(), "SIGTERM exits 0");
    assert!(
        !is_mounted(&room) && !is_mounted(&runtime),
        "nothing stays mounted"
    );
    assert!(!d.socket.exists(), "the socket is removed");
    d.run();
    assert!(is_mounted(&room), "the configured mount is back");
    assert_eq!(fs::read(room.join("outputs/x")).unwrap(), b"1");
    // So is the one added through the API (tests/operations.rs has the details).
    assert!(is_mounted(&runtime.canonicalize().unwrap()));
    let mounts = d.json(&["mounts", "--json"]);
    assert_eq!(mounts.as_array().unwrap().len(), 2, "{mounts}");
}

/// A file still open when a stopping daemon's grace period ends: what was written to it is
/// committed, and writes after that fail; none is reported done and then lost.
#[test]
fn a_stop_commits_what_a_writer_still_writing_wrote_and_fails_its_later_writes() {
    let mut d = Daemon::with_config(Some(
        r#"{"mounts": [{"mountpoint": "{tmp}/room", "room": "r1"}]}"#,
    ));
    let room = d.tmp.path().join("room");
    let script = r#"
import sys, time
f = open(sys.argv[1], 'w')
i = 0
while True:
    try:
        f.write(f"line {i}\n")
        f.flush()
    except OSError as e:
        print("error", e.errno, flush=True)
        break
    print("ok", i, flush=True)
    i += 1
    time.sleep(0.02)
"#;
    let mut writer = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(room.join("log"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let status = d.stop(); // the writer goes on writing through the grace period
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while writer.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = writer.kill();
    let out = writer.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    let last_ok = out
        .lines()
        .filter_map(|l| l.strip_prefix("ok "))
        .next_back()
        .expect("some writes went through")
        .parse::<u64>()
        .unwrap();
    assert!(
        last_ok > 100,
        "it wrote through the grace period: {last_ok}"
    );
    assert!(out.contains("error"), "later writes fail: {out}");
    d.run();
    let log = fs::read_to_string(room.join("log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines.len() as u64 > last_ok,
        "every write reported done is there: {} lines, last reported {last_ok}",
        lines.len()
    );
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(*line, format!("line {i}"));
    }
}

/// A daemon killed (`kill -9`) leaves its mounts dead (ENOTCONN): at the next start the
/// configured ones are set up again over them, as the ones added through the API are.
#[test]
fn configured_mounts_come_back_after_the_daemon_was_killed() {
    let mut d = Daemon::with_config(Some(
        r#"{"mounts": [{"mountpoint": "{tmp}/room", "room": "r1"}]}"#,
    ));
    let room = d.tmp.path().join("room");
    fs::write(room.join("x"), b"1").unwrap();
    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        fs::metadata(&room).unwrap_err().raw_os_error(),
        Some(libc::ENOTCONN)
    );
    d.run();
    assert!(is_mounted(&room), "{}", d.log());
    assert_eq!(fs::read(room.join("x")).unwrap(), b"1");
}

/// The same for a standalone `roomfs mount` given a relative mount point.
#[test]
fn a_standalone_mount_at_a_relative_path_clears_its_dead_predecessor() {
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir(tmp.path().join("mnt")).unwrap();
    /// Detaches whatever is mounted there, dead or alive, even when the test fails.
    struct Detach(std::ffi::CString);
    impl Drop for Detach {
        fn drop(&mut self) {
            // SAFETY: a NUL-terminated path.
            unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let detach = Detach(common::cstr(&tmp.path().join("mnt")));
    let start = || {
        let log = std::sync::Arc::default();
        let mut cmd = Command::new(BIN);
        cmd.args(["mount", "--data-dir", "data", "--room", "r1", "mnt"])
            .current_dir(tmp.path());
        (common::start_logged(&mut cmd, " mounted ", &log), log)
    };
    let (mut first, _) = start();
    fs::write(tmp.path().join("mnt/x"), b"1").unwrap();
    first.kill().unwrap();
    first.wait().unwrap();
    let (mut second, log) = start();
    let read = fs::read(tmp.path().join("mnt/x"));
    drop(detach);
    second.wait().unwrap();
    assert_eq!(read.unwrap(), b"1", "{}", log.lock().unwrap().join("\n"));
}

#[test]
fn a_configured_mount_that_fails_does_not_stop_the_daemon() {
    let d = Daemon::with_config(Some(
        r#"{"mounts": [{"mountpoint": "{tmp}/gone", "session": "ended-long-ago"},
                       {"mountpoint": "{tmp}/room", "room": "r1"}]}"#,
    ));
    assert!(is_mounted(&d.tmp.path().join("room")));
    assert!(!is_mounted(&d.tmp.path().join("gone")));
    assert!(d.log().contains("configured mount at"), "{}", d.log());
    assert_eq!(d.json(&["mounts", "--json"]).as_array().unwrap().len(), 1);
}

#[test]
fn mounts_are_managed_through_the_cli() {
    let d = Daemon::start();
    let mnt = d.dir("mnt");
    d.mount(&["--room", "r1"], &mnt);
    let (code, _, err) = d.cli(&["mount", "--daemon", "--room", "r1", mnt.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("already in use"), "{err}");
    let (code, _, err) = d.cli(&[
        "mount",
        "--daemon",
        "--session",
        "nope",
        d.dir("x").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("no session"), "{err}");
    let (code, _, err) = d.cli(&["unmount", mnt.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(!is_mounted(&mnt.canonicalize().unwrap()));
    assert_eq!(d.json(&["mounts", "--json"]), json!([]));
    let status = d.json(&["status", "--json"]);
    assert_eq!(status["mounts"], 0);
    // A missing daemon is one clear sentence.
    let out = Command::new(BIN)
        .args(["status", "--socket", "/nonexistent/sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no roomfs daemon"));
}

#[test]
fn passthrough_follows_the_config_and_each_mount_request() {
    // A long attribute TTL: the page cache must not be dropped because attributes expired
    // while a loaded machine runs the test (that would read the disk without passthrough).
    let configured_off =
        Daemon::with_config(Some(r#"{"passthrough": false, "cache_ttl_secs": 60}"#));
    let mnt = configured_off.dir("mnt");
    configured_off.mount(&["--room", "r1"], &mnt);
    assert_eq!(
        cached_second_read(&mnt.join("big"), || configured_off.committed_file("r1")),
        b"aaaa",
        "the config turned passthrough off"
    );
    let d = Daemon::with_config(Some(r#"{"cache_ttl_secs": 60}"#));
    let on = d.dir("on");
    d.mount(&["--room", "r1"], &on);
    if !d
        .log()
        .contains("the kernel does not offer FUSE passthrough")
    {
        assert_eq!(
            second_read_after_a_change_on_disk(&on.join("big"), || d.committed_file("r1")),
            b"DISK",
            "passthrough is on by default: {}",
            d.log()
        );
    }
    let off = d.dir("off");
    d.mount(&["--room", "r2", "--no-passthrough"], &off);
    assert_eq!(
        cached_second_read(&off.join("big"), || d.committed_file("r2")),
        b"aaaa",
        "the mount request turned it off"
    );
}

#[test]
fn bad_config_is_a_clear_error_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.json");
    fs::write(&cfg, r#"{"sesion_limits": {}}"#).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--socket"])
        .arg(tmp.path().join("s"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("unknown field `sesion_limits`"), "{err}");
    // A secret file that cannot be read stops the start, not the first token.
    let missing = tmp.path().join("no-secret");
    fs::write(
        &cfg,
        format!(r#"{{"secret_file": "{}"}}"#, missing.display()),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--socket"])
        .arg(tmp.path().join("s"))
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot read secret file {}", missing.display())),
        "{err}"
    );
    // Nor does a secret too short to sign with: anyone could guess it and forge tokens and URLs.
    let short = tmp.path().join("short-secret");
    fs::write(&short, "hunter2\n").unwrap();
    fs::write(&cfg, format!(r#"{{"secret_file": "{}"}}"#, short.display())).unwrap();
    // Under timeout(1): a daemon that took the secret would serve until killed.
    let out = Command::new("timeout")
        .args(["20", BIN, "serve", "--socket"])
        .arg(tmp.path().join("s"))
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("secret file {}", short.display()))
            && err.contains("too short")
            && err.contains("head -c 32 /dev/urandom"),
        "{err}"
    );
}

#[test]
fn a_node_script_plays_the_sdk_storage_function() {
    let d = Daemon::start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node/sdk_storage.mjs");
    let out = Command::new("node")
        .arg(script)
        .arg(&d.socket)
        .arg("ses_node")
        .output()
        .expect("node is installed by scripts/setup");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("sdk storage: ok"));
    // What the script stored is what the daemon holds.
    assert_eq!(
        d.call(json!({"method": "session.get", "id": "ses_node"}))["lastMessageId"],
        "m2"
    );
}

#[test]
fn the_daemon_tells_systemd_when_it_is_ready() {
    use std::os::unix::net::UnixDatagram;
    let tmp = tempfile::tempdir().unwrap();
    let notify = tmp.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--socket"])
        .arg(tmp.path().join("control.sock"))
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .env("NOTIFY_SOCKET", &notify);
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut child = common::start_logged(&mut cmd, "serving the control API", &log);
    let mut buf = [0u8; 256];
    let n = listener.recv(&mut buf).expect("a notification");
    let message = String::from_utf8_lossy(&buf[..n]);
    assert!(message.contains("READY=1"), "{message}");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let n = listener.recv(&mut buf).expect("a notification");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
}

/// Mounts room r1 twice through `d`, at `a` and `b` in its directory.
fn two_mounts_of_r1(d: &Daemon) -> (std::path::PathBuf, std::path::PathBuf) {
    let (a, b) = (d.dir("a"), d.dir("b"));
    d.mount(&["--room", "r1"], &a);
    d.mount(&["--room", "r1"], &b);
    (a, b)
}

/// Waits up to 5 s for `cond` (changes reach other mounts through a notifier thread of
/// their own, so not within the writer's call).
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_delete_through_one_mount_while_another_mount_commits_the_file_hangs_neither() {
    // Telling the other mount of the delete locks its open handles; its commit waits for the
    // delete's claim on the name: not told under the claim.
    let d = Daemon::start();
    let (a, b) = two_mounts_of_r1(&d);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let spawn = |work: Box<dyn Fn() -> bool + Send>| {
        let (stop, tx) = (stop.clone(), tx.clone());
        std::thread::spawn(move || {
            let mut done = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                done += usize::from(work());
            }
            let _ = tx.send(done);
        });
    };
    let f = b.join("f");
    spawn(Box::new(move || fs::write(&f, [b'x'; 100]).is_ok()));
    let f = a.join("f");
    spawn(Box::new(move || fs::remove_file(&f).is_ok()));
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ends: Vec<_> = (0..2)
        .map(|_| rx.recv_timeout(Duration::from_secs(30)))
        .collect();
    if ends.iter().any(|r| r.is_err()) {
        common::abort_fuse(&a);
        common::abort_fuse(&b);
        panic!("the writer or the deleter is stuck: the mounts are deadlocked");
    }
    let counts: Vec<usize> = ends.into_iter().map(Result::unwrap).collect();
    assert!(counts.iter().all(|&n| n > 0), "{counts:?}");
}

#[test]
fn a_file_written_in_one_mount_follows_a_rename_over_another_name_or_an_exchange_in_another() {
    // As on one disk: a writer's file moved by another participant, over a name that existed
    // or swapped with another file, is committed at its new name, and the other file keeps
    // its content. (Its data was dropped with ENOENT at close, or went to the other file.)
    use std::io::Write;
    let d = Daemon::start();
    let (a, b) = two_mounts_of_r1(&d);
    // (An S3 store cannot exchange two names: EINVAL, by design.)
    let exchanges: &[bool] = if common::store_is_s3() {
        &[false]
    } else {
        &[false, true]
    };
    let cases = exchanges
        .iter()
        .flat_map(|&exchange| [(false, exchange), (true, exchange)]);
    for (append, exchange) in cases {
        let case = format!("append {append}, exchange {exchange}");
        let _ = fs::remove_file(a.join("x"));
        let _ = fs::remove_file(a.join("y"));
        fs::write(a.join("x"), b"x-old\n").unwrap();
        fs::write(a.join("y"), b"y-old\n").unwrap();
        // Mount A knows both names.
        assert_eq!(fs::read(a.join("y")).unwrap(), b"y-old\n");
        let mut w = fs::OpenOptions::new()
            .write(true)
            .append(append)
            .truncate(!append)
            .open(a.join("x"))
            .unwrap();
        w.write_all(b"first\n").unwrap();
        if exchange {
            let (x, y) = (cstr(&b.join("x")), cstr(&b.join("y")));
            // SAFETY: NUL-terminated paths.
            let r = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    x.as_ptr(),
                    libc::AT_FDCWD,
                    y.as_ptr(),
                    libc::RENAME_EXCHANGE,
                )
            };
            assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        } else {
            fs::rename(b.join("x"), b.join("y")).unwrap();
        }
        w.write_all(b"second\n").unwrap();
        w.sync_all().expect(&case);
        drop(w);
        let written: &[u8] = if append {
            b"x-old\nfirst\nsecond\n"
        } else {
            b"first\nsecond\n"
        };
        assert_eq!(fs::read(b.join("y")).unwrap(), written, "{case}");
        if exchange {
            assert_eq!(fs::read(b.join("x")).unwrap(), b"y-old\n", "{case}");
        } else {
            assert!(!b.join("x").exists(), "{case}");
        }
    }
    // Into a directory mount A has never looked at (one agent files away a report another
    // is still writing): committed there, and A then finds it there too.
    let mut w = fs::File::create(a.join("report.md")).unwrap();
    w.write_all(b"draft\n").unwrap();
    fs::create_dir_all(b.join("done/2026")).unwrap();
    fs::rename(b.join("report.md"), b.join("done/2026/report.md")).unwrap();
    w.write_all(b"final\n").unwrap();
    drop(w);
    assert!(!b.join("report.md").exists());
    for m in [&a, &b] {
        assert_eq!(
            fs::read(m.join("done/2026/report.md")).unwrap(),
            b"draft\nfinal\n"
        );
        let names: Vec<_> = fs::read_dir(m.join("done/2026"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["report.md"]);
    }
}

#[test]
fn two_mounts_of_one_space_see_each_others_changes_at_once() {
    // The kernel may trust what it cached for a minute: only invalidation can show changes.
    let d = Daemon::with_config(Some(r#"{"cache_ttl_secs": 60}"#));
    let (a, b) = two_mounts_of_r1(&d);
    fs::write(a.join("f"), b"one").unwrap();
    // B looks: its kernel caches the entry, the attributes and the pages.
    assert_eq!(fs::read(b.join("f")).unwrap(), b"one");
    assert_eq!(fs::metadata(b.join("f")).unwrap().len(), 3);
    fs::write(a.join("f"), b"the second version").unwrap();
    // A stat, no open: only an invalidation of B's cached attributes shows the new size.
    eventually("B sees A's commit", || {
        fs::metadata(b.join("f")).unwrap().len() == 18
    });
    assert_eq!(fs::read(b.join("f")).unwrap(), b"the second version");
    // Appends, renames and removals too.
    fs::OpenOptions::new()
        .append(true)
        .open(a.join("f"))
        .unwrap()
        .write_all(b"+more")
        .unwrap();
    eventually("B sees the append", || {
        fs::metadata(b.join("f")).unwrap().len() == 23
    });
    assert_eq!(fs::read(b.join("f")).unwrap(), b"the second version+more");
    fs::rename(a.join("f"), a.join("g")).unwrap();
    eventually("B sees the rename", || {
        !b.join("f").exists() && b.join("g").exists()
    });
    fs::create_dir(a.join("dir")).unwrap();
    fs::remove_file(a.join("g")).unwrap();
    eventually("B sees the removal", || !b.join("g").exists());
    assert!(b.join("dir").is_dir());
}

/// Scrapes `GET /metrics` over the control socket with a bare HTTP/1.1 request; returns the
/// Content-Type and the body.
fn scrape(socket: &Path) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    (content_type, body.to_string())
}

/// The value of one series (`name{labels}` exactly as printed) in a scrape; 0 if absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn metrics_count_a_known_workload() {
    const N: usize = 20;
    const K: usize = 3000;
    let d = Daemon::start();
    d.json(&[
        "session",
        "create",
        "met",
        "--max-bytes",
        "200000",
        "--max-files",
        "1000",
        "--max-file-size",
        "unlimited",
        "--json",
    ]);
    let full = d.dir("full");
    let narrow = d.dir("narrow");
    d.mount(&["--session", "met"], &full);
    d.mount(&["--session", "met", "--grant", "outputs/:rw"], &narrow);
    fs::create_dir(full.join("outputs")).unwrap();
    fs::write(full.join("secret.txt"), b"not for the narrow mount").unwrap();

    let (content_type, before) = scrape(&d.socket);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let delta = |after: &str, series: &str| metric(after, series) - metric(&before, series);

    // N files of K bytes, each one write() and one commit at close.
    for i in 0..N {
        fs::write(full.join(format!("outputs/f{i}")), vec![b'x'; K]).unwrap();
    }
    // Read back through the other mount, whose kernel cache has none of it.
    for i in 0..N {
        assert_eq!(
            fs::read(narrow.join(format!("outputs/f{i}")))
                .unwrap()
                .len(),
            K
        );
    }
    // One access outside the narrow mount's grant.
    assert_eq!(errno(fs::read(narrow.join("secret.txt"))), libc::EACCES);

    // The CLI prints the same text as the endpoint.
    let (code, after, err) = d.cli(&["metrics"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.is_empty(),
        "no progress noise when stderr is not a terminal: {err:?}"
    );
    let writes = "roomfs_fuse_request_duration_seconds_count{op=\"write\"}";
    assert_eq!(delta(&after, writes), N as f64, "{after}");
    assert_eq!(delta(&after, "roomfs_written_bytes_total"), (N * K) as f64);
    assert_eq!(delta(&after, "roomfs_commits_total"), N as f64);
    assert!(
        delta(&after, "roomfs_read_bytes_total") >= (N * K) as f64,
        "{after}"
    );
    assert!(
        delta(
            &after,
            "roomfs_fuse_request_duration_seconds_count{op=\"read\"}"
        ) >= N as f64
    );
    assert_eq!(delta(&after, "roomfs_grant_denials_total"), 1.0, "{after}");
    assert_eq!(metric(&after, "roomfs_mounts{kind=\"session\"}"), 2.0);
    assert_eq!(metric(&after, "roomfs_mounts{kind=\"room\"}"), 0.0);
    assert_eq!(metric(&after, "roomfs_sessions"), 1.0);
    let space = "{space=\"sessions/met\"}";
    let used = (N * K + "not for the narrow mount".len()) as f64;
    assert_eq!(
        metric(&after, &format!("roomfs_space_used_bytes{space}")),
        used
    );
    // outputs/, secret.txt and the N files.
    let entries = (N + 2) as f64;
    assert_eq!(
        metric(&after, &format!("roomfs_space_used_files{space}")),
        entries
    );
    assert_eq!(
        metric(&after, &format!("roomfs_space_limit_bytes{space}")),
        200000.0
    );
    assert_eq!(
        metric(&after, &format!("roomfs_space_limit_files{space}")),
        1000.0
    );
    assert!(
        !after.contains("roomfs_space_limit_file_size_bytes{"),
        "no such limit: {after}"
    );
    assert!(!after.contains("outputs/"), "no path in any label: {after}");

    // Two writers that each fit the byte quota alone but not together: the second close
    // fails with EDQUOT (and so does the retry at its last release), keeping nothing.
    let big = 100_000;
    use std::io::Write;
    let mut a = fs::File::create(full.join("a")).unwrap();
    let mut b = fs::File::create(full.join("b")).unwrap();
    a.write_all(&vec![b'a'; big]).unwrap();
    b.write_all(&vec![b'b'; big]).unwrap();
    // Releases reach the daemon after close() returned: a scrape once the handles closed
    // before are gone, with `open` of them still open.
    let open_files = "roomfs_open_handles{kind=\"file\"}";
    let settled = |open: f64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = scrape(&d.socket).1;
            if metric(&text, open_files) == open || Instant::now() > deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let during = settled(2.0);
    assert_eq!(metric(&during, open_files), 2.0, "{during}");
    drop(a);
    let closed = unsafe { libc::close(std::os::fd::IntoRawFd::into_raw_fd(b)) };
    assert_eq!(closed, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EDQUOT)
    );
    let end = settled(0.0);
    let failed = "roomfs_commit_failures_total{errno=\"EDQUOT\"}";
    assert_eq!(delta(&end, "roomfs_commits_total"), (N + 1) as f64);
    assert_eq!(delta(&end, failed), 2.0, "{end}");
    assert_eq!(metric(&end, open_files), 0.0, "{end}");
    assert_eq!(
        metric(&end, &format!("roomfs_space_used_bytes{space}")),
        used + big as f64
    );
    // A space no longer mounted leaves the metrics.
    d.cli(&["unmount", full.to_str().unwrap()]);
    d.cli(&["unmount", narrow.to_str().unwrap()]);
    let (_, gone) = scrape(&d.socket);
    assert!(!gone.contains("sessions/met"), "{gone}");
    assert_eq!(metric(&gone, "roomfs_mounts{kind=\"session\"}"), 0.0);
}

/// The FUSE requests of each kind the daemon of `d` served while `code` ran in Python (with
/// `MNT` = `mnt`), once the handles it closed are released; and how many times an entry or
/// attribute cached for the TTL (1 s) may have expired meanwhile, at most.
fn requests_of(d: &Daemon, mnt: &Path, code: &str) -> (Vec<(String, f64)>, f64) {
    let counts = |text: &str| -> Vec<(String, f64)> {
        let prefix = "roomfs_fuse_request_duration_seconds_count{op=\"";
        text.lines()
            .filter_map(|l| {
                let (op, n) = l.strip_prefix(prefix)?.split_once("\"} ")?;
                Some((op.to_string(), n.parse().ok()?))
            })
            .collect()
    };
    let before = counts(&scrape(&d.socket).1);
    let started = Instant::now();
    python(mnt, code);
    let expiries = started.elapsed().as_secs_f64().ceil() + 5.0;
    // Releases reach the daemon after close() returned.
    let open_files = "roomfs_open_handles{kind=\"file\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let text = scrape(&d.socket).1;
        if metric(&text, open_files) == 0.0 || Instant::now() > deadline {
            break counts(&text);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let of = |c: &[(String, f64)], op: &str| c.iter().find(|(o, _)| o == op).map_or(0.0, |x| x.1);
    let delta = after
        .iter()
        .map(|(op, n)| (op.clone(), n - of(&before, op)))
        .filter(|(_, n)| *n != 0.0)
        .collect();
    (delta, expiries)
}

/// What a small file costs in FUSE requests, written and read back as agents do (Python
/// `open()`), and an append: the kernel's minimum for them (see doc/PERFORMANCE.md, "Requests
/// per small file"), kept there by the reply flags — no READ (a read-back keeps the writer's
/// pages), no FLUSH of a read-only handle, no SETATTR for `O_TRUNC`, at most one
/// `security.capability` query per write handle — so that none of them comes back unnoticed.
#[test]
fn small_files_and_appends_cost_the_kernels_minimum_of_requests() {
    let d = Daemon::start();
    let mnt = d.dir("mnt");
    d.mount(&["--room", "r1"], &mnt);
    fs::create_dir(mnt.join("agent")).unwrap();
    let count = |requests: &[(String, f64)], op: &str| {
        requests.iter().find(|(o, _)| o == op).map_or(0.0, |x| x.1)
    };

    const N: usize = 200;
    let (requests, expiries) = requests_of(
        &d,
        &mnt,
        &format!(
            r#"
import os
d = os.path.join(os.environ["MNT"], "agent")
data = os.urandom(4096)
paths = [os.path.join(d, f"f{{i:05d}}") for i in range({N})]
for p in paths:
    with open(p, "wb") as f:
        f.write(data)
for p in paths:
    with open(p, "rb") as f:
        assert f.read() == data, p
"#
        ),
    );
    let n = N as f64;
    for (op, expected) in [
        ("create", n),
        ("write", n),
        ("flush", n), // the writers' closes commit; readers' handles need no flush
        ("release", 2.0 * n),
        ("open", n),
        ("setattr", 0.0), // O_TRUNC travels with the create
    ] {
        assert_eq!(count(&requests, op), expected, "{op}: {requests:?}");
    }
    // The read-back is served from the writer's pages. Only a reader whose OPEN reached the
    // daemon before its writer's RELEASE (which the kernel sends after `close()` returns,
    // without waiting) reads directly, beside what it takes for a writer: a READ, rarely.
    assert!(count(&requests, "read") <= n / 50.0, "read: {requests:?}");
    // At most: Python's `isatty` after each open, and one `security.capability` before a new
    // file's first write.
    assert!(count(&requests, "getxattr") <= n, "{requests:?}");
    assert!(count(&requests, "ioctl") <= 2.0 * n, "{requests:?}");
    // The kernel's lookup of each new name, and a GETATTR of the directory each create changed
    // and of each file its write changed; where an entry expired in the meantime (on a slow
    // run), the LOOKUP that revalidates it refreshes the attributes in the GETATTR's place.
    // `agent`'s entry expires once a second too.
    let names = count(&requests, "lookup") + count(&requests, "getattr");
    assert!(names <= 3.0 * n + expiries, "{requests:?}");
    let total: f64 = requests.iter().map(|x| x.1).sum();
    assert!(
        total <= 12.0 * n + expiries,
        "{total} for {N} files: {requests:?}"
    );

    // Appends to a log of 64 KiB the kernel has cached: OPEN, GETATTR (Python's fstat: the
    // last append's write dropped the size the kernel knew), IOCTL, WRITE, FLUSH (committed in
    // place) and RELEASE. No GETXATTR: appenders write with direct I/O, for which the kernel
    // does not look for file capabilities to clear (the mount clears set-IDs itself).
    let log = mnt.join("agent/log");
    let head = vec![b'#'; 64 << 10];
    fs::write(&log, &head).unwrap();
    let read_bytes = || metric(&scrape(&d.socket).1, "roomfs_read_bytes_total");
    // Read until the kernel serves it from its cache (a read fetches nothing from the mount):
    // a reader whose OPEN reaches the daemon before the writer's RELEASE reads directly and
    // caches nothing (see above).
    let cache = |want: &[u8]| {
        for attempt in 0.. {
            let before = read_bytes();
            assert_eq!(fs::read(&log).unwrap(), want);
            if read_bytes() == before {
                break;
            }
            assert!(attempt < 5, "the log never got into the kernel's cache");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    cache(&head);
    const A: usize = 100;
    let (requests, expiries) = requests_of(
        &d,
        &mnt,
        &format!(
            r#"
import os
p = os.path.join(os.environ["MNT"], "agent", "log")
for i in range({A}):
    with open(p, "a") as f:
        f.write(f"line {{i}}\n")
"#
        ),
    );
    let a = A as f64;
    for (op, expected) in [
        ("open", a),
        ("write", a),
        ("flush", a),
        ("release", a),
        ("getxattr", 0.0),
        ("read", 0.0),
        ("setattr", 0.0),
    ] {
        assert_eq!(count(&requests, op), expected, "{op}: {requests:?}");
    }
    let total: f64 = requests.iter().map(|x| x.1).sum();
    assert!(
        total <= 6.0 * a + expiries,
        "{total} for {A} appends: {requests:?}"
    );
    // The kernel kept the pages the appends did not write into: reading the log back fetches
    // its last page and what was appended, not the 64 KiB before. On a loaded machine the
    // read-back (or the head's caching) can still meet the RELEASE race above once in a while
    // and read everything: then the log is cached again and a few more appends are measured
    // (a mount that drops the cached pages does it both times).
    let lines: String = (0..A).map(|i| format!("line {i}\n")).collect();
    let mut want = [head, lines.clone().into_bytes()].concat();
    let mut appended = lines.len();
    let mut fetched_each = Vec::new();
    for attempt in 0..2 {
        if attempt == 1 {
            cache(&want);
            let more: String = (0..10).map(|i| format!("more {i}\n")).collect();
            python(
                &mnt,
                r#"
import os
p = os.path.join(os.environ["MNT"], "agent", "log")
for i in range(10):
    with open(p, "a") as f:
        f.write(f"more {i}\n")
"#,
            );
            want.extend_from_slice(more.as_bytes());
            appended = more.len();
        }
        let before = read_bytes();
        assert_eq!(fs::read(&log).unwrap(), want);
        let fetched = read_bytes() - before;
        fetched_each.push(fetched);
        if fetched <= (4096 + appended) as f64 {
            return;
        }
    }
    panic!("{fetched_each:?} bytes read to read the log back, twice");
}

#[test]
fn the_cli_prints_tables_for_people_and_json_for_scripts() {
    let d = Daemon::start();
    let (code, out, err) = d.cli(&[
        "session",
        "create",
        "tab",
        "--max-files",
        "100",
        "--max-bytes",
        "50Mi",
        "--max-file-size",
        "unlimited",
        "--ttl",
        "2h",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "created session tab: up to 100 files, 50.0 MiB in all; ends after 2h idle\n"
    );
    let mnt = d.dir("mnt");
    d.mount(&["--session", "tab"], &mnt);
    fs::write(mnt.join("notes.md"), vec![b'n'; 3 << 10]).unwrap();
    let mnt = mnt.canonicalize().unwrap();
    let mnt = mnt.to_str().unwrap();

    // Every table below: header and rows aligned, nothing on stderr (not a terminal).
    let table = |args: &[&str]| -> Vec<String> {
        let (code, out, err) = d.cli(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert_eq!(err, "", "{args:?}: no progress or other noise on stderr");
        out.lines().map(str::to_owned).collect()
    };
    // The column of `word` in `line`.
    let col = |line: &str, word: &str| {
        line.find(word)
            .unwrap_or_else(|| panic!("{word:?} not in {line:?}"))
    };

    let sessions = table(&["session", "list"]);
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    let (head, row) = (&sessions[0], &sessions[1]);
    assert!(
        head.starts_with("ID     FILES                SIZE  MAX FILE  ENDS "),
        "{head}"
    );
    assert!(
        row.starts_with("tab  1 / 100  3.0 KiB / 50.0 MiB         -  after 2h idle  "),
        "{row}"
    );
    // Right-aligned numbers end under their heading; left-aligned text starts under it.
    assert_eq!(
        col(head, "FILES") + "FILES".len(),
        col(row, "1 / 100") + "1 / 100".len()
    );
    assert_eq!(col(head, "ENDS"), col(row, "after 2h idle"));
    assert_eq!(col(head, "MOUNTED AT"), col(row, mnt));
    assert!(row.contains("just now") || row.contains("s ago"), "{row}");

    let show = table(&["session", "show", "tab"]);
    assert_eq!(show[0], "session      tab");
    assert!(
        show.contains(&"size         3.0 KiB / 50.0 MiB".to_string()),
        "{show:?}"
    );
    assert!(
        show.contains(&"files        1 / 100".to_string()),
        "{show:?}"
    );
    assert!(show.contains(&format!("mounted at   {mnt}")), "{show:?}");
    assert!(
        show.iter()
            .any(|l| l.starts_with("ends         after 2h idle (in 1h 59m")
                || l.starts_with("ends         after 2h idle (in 2h")),
        "{show:?}"
    );

    let mounts = table(&["mounts"]);
    assert_eq!(mounts.len(), 2, "{mounts:?}");
    assert_eq!(col(&mounts[0], "SPACE"), col(&mounts[1], "session tab"));
    assert!(mounts[1].starts_with(mnt), "{mounts:?}");
    assert!(mounts[1].ends_with("  full access  api"), "{mounts:?}");

    let status = table(&["status"]);
    assert!(status.contains(&"mounts    1".to_string()), "{status:?}");
    assert!(status.contains(&"sessions  1".to_string()), "{status:?}");
    assert!(
        status
            .iter()
            .any(|l| l.starts_with("uptime    ") && l.ends_with('s')),
        "{status:?}"
    );

    load_fixture_session(&d);
    let parts = table(&["records", "list", "part", "--session", "ses_7f3a"]);
    assert_eq!(parts.len(), 8, "{parts:?}");
    assert!(
        parts[0].starts_with("ID        MESSAGE   INDEX  TYPE"),
        "{parts:?}"
    );
    assert!(
        parts[1].starts_with("prt_0001  msg_0001      0  text"),
        "{parts:?}"
    );
    assert!(
        parts[1].ends_with("Summarise sales.csv by region."),
        "{parts:?}"
    );
    let messages = table(&["records", "list", "message", "--session", "ses_7f3a"]);
    assert_eq!(messages.len(), 5, "{messages:?}");
    assert!(
        messages[3].starts_with("msg_0003  user       2025-11-2"),
        "{messages:?}"
    );

    // --json is the API's answer, unchanged.
    let (_, json_out, _) = d.cli(&["session", "show", "tab", "--json"]);
    let api: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(api["files"], 1);
    assert_eq!(api["limits"]["max_bytes"], 50 << 20);
    assert_eq!(api["mounts"], json!([mnt]));

    // Ending with an export of many files prints one sentence, and nothing on stderr.
    fs::create_dir(format!("{mnt}/outputs")).unwrap();
    for i in 0..60 {
        fs::write(format!("{mnt}/outputs/{i}.txt"), b"x").unwrap();
    }
    let ended = table(&[
        "session",
        "end",
        "tab",
        "--export",
        "outputs/",
        "--to-room",
        "kept",
    ]);
    assert_eq!(
        ended,
        [format!(
            "ended session tab: deleted 62 entries and 0 records; exported kept/outputs; \
             unmounted {mnt}"
        )]
    );
    assert_eq!(table(&["session", "list"]), ["no sessions"]);
}

/// A stand-in daemon whose answers to `GET /v1/status` take `delay`; serves `n` requests.
fn slow_daemon(socket: &Path, delay: Duration, n: usize) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        for _ in 0..n {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let got = conn.read(&mut buf).unwrap();
                assert!(got > 0, "the client hung up");
                request.extend_from_slice(&buf[..got]);
            }
            std::thread::sleep(delay);
            let body = json!({"version": "slow", "data_dir": "/d", "socket": "/s", "mounts": 0,
                              "sessions": 0, "uptime_secs": 7500})
            .to_string();
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(response.as_bytes()).unwrap();
        }
    })
}

#[test]
fn slow_calls_show_progress_on_a_terminal_only() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("slow.sock");
    let server = slow_daemon(&socket, Duration::from_millis(2500), 2);
    // stderr on a pseudo-terminal.
    let (mut master, mut slave) = (0, 0);
    let opened = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
    let (master, slave) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    };
    let out = Command::new(BIN)
        .args(["status", "--socket"])
        .arg(&socket)
        .stderr(std::process::Stdio::from(slave))
        .output()
        .unwrap();
    assert!(out.status.success());
    // What the terminal got: the child has exited, so read without blocking.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&master);
    unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
    let mut screen = Vec::new();
    let _ = std::io::Read::read_to_end(&mut &master, &mut screen);
    let screen = String::from_utf8_lossy(&screen);
    // After a second, the elapsed time, rewritten in place.
    assert!(
        screen.starts_with("\r\x1b[Kasking for status… 1s"),
        "{screen:?}"
    );
    assert!(
        screen.ends_with("\r\x1b[K"),
        "the line is erased at the end: {screen:?}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("uptime    2h 5m\n"), "{stdout}");
    // The same call with stderr not a terminal prints nothing there.
    let out = Command::new(BIN)
        .args(["status", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    server.join().unwrap();
}

/// Runs `script` with `sh -c` as the unprivileged user 65534; its exit status and stderr.
fn as_nobody(script: &str) -> (bool, String) {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .output()
        .expect("setpriv (util-linux) runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_session_belongs_to_its_owner_and_keeps_the_defaults_of_limits_it_leaves_out() {
    use std::os::unix::fs::MetadataExt;
    let d = Daemon::start();
    // The agent, 65534, must reach the mount points.
    fs::set_permissions(d.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let info = d.json(&[
        "session",
        "create",
        "agent",
        "--owner",
        "65534:65534",
        "--max-files",
        "5",
        "--json",
    ]);
    // What --max-files leaves out is the daemon's default, not unlimited.
    assert_eq!(info["limits"]["max_files"], 5, "{info}");
    assert_eq!(info["limits"]["max_bytes"], 50_000_000, "{info}");
    assert_eq!(info["limits"]["max_file_bytes"], 10_000_000, "{info}");
    // `unlimited` lifts a default.
    let info = d.json(&[
        "session",
        "create",
        "plain",
        "--max-bytes",
        "unlimited",
        "--json",
    ]);
    assert_eq!(info["limits"]["max_bytes"], Value::Null, "{info}");
    assert_eq!(info["limits"]["max_files"], 100, "{info}");
    let (agent, plain) = (d.dir("agent"), d.dir("plain"));
    d.mount(&["--session", "agent"], &agent);
    d.mount(&["--session", "plain"], &plain);
    // The agent writes at the root of its own session...
    let (ok, err) = as_nobody(&format!(
        "echo hi > {0}/f && mkdir {0}/out",
        agent.display()
    ));
    assert!(ok, "{err}");
    assert_eq!(fs::read_to_string(agent.join("f")).unwrap(), "hi\n");
    let meta = fs::metadata(agent.join("f")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    // ... not at the root of a session the daemon's user owns.
    let (ok, err) = as_nobody(&format!("echo hi > {}/f", plain.display()));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    // A user or group that does not exist is one clear line, and nothing is created.
    for (owner, says) in [
        ("no-such-user-xyz", "no user named \"no-such-user-xyz\""),
        (
            "0:no-such-group-xyz",
            "no group named \"no-such-group-xyz\"",
        ),
        ("1234", "a numeric user needs its group: UID:GID"),
    ] {
        let (code, _, err) = d.cli(&["session", "create", "s2", "--owner", owner]);
        assert_ne!(code, 0);
        assert!(err.contains(says), "{owner}: {err}");
    }
    let (code, _, _) = d.cli(&["session", "show", "s2"]);
    assert_ne!(code, 0, "no session was created");
}

/// `POST path` with `body` on the control socket: the status and the answer.
fn post(socket: &Path, path: &str, body: &str) -> (u16, String) {
    request(socket, &["-X", "POST", "-d", body], path)
}

/// `GET path` on the control API: (status, body).
fn get(socket: &Path, path: &str) -> (u16, String) {
    request(socket, &[], path)
}

fn request(socket: &Path, args: &[&str], path: &str) -> (u16, String) {
    let out = output(
        std::process::Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(socket)
            .args(args)
            .arg(format!("http://roomfs{path}")),
    );
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    let (text, code) = answer.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), text.to_owned())
}

#[test]
fn values_that_cannot_work_are_refused_by_the_api_and_the_cli() {
    let d = Daemon::start();
    let mnt = d.dir("mnt");
    for (path, body, says) in [
        (
            "/v1/sessions",
            r#"{"id": "t0", "ttl_secs": 0}"#,
            "ttl_secs must be at least 1",
        ),
        (
            "/v1/sessions",
            r#"{"id": "t1", "owner": {"uid": 4294967295, "gid": 0}}"#,
            "owner uid 4294967295 is not an id",
        ),
        (
            "/v1/mounts",
            &format!(
                r#"{{"mountpoint": "{}", "room": "r", "label": ""}}"#,
                mnt.display()
            ),
            "must be 1 to 200 bytes",
        ),
        (
            "/v1/mounts",
            &format!(
                r#"{{"mountpoint": "{}", "room": "r", "label": "a\nb"}}"#,
                mnt.display()
            ),
            "without control characters",
        ),
        (
            "/v1/mounts",
            &format!(
                r#"{{"mountpoint": "{}", "room": "r", "grant": []}}"#,
                mnt.display()
            ),
            "an empty grant grants nothing",
        ),
        (
            "/v1/mounts",
            &format!(
                r#"{{"mountpoint": "{}", "token": "x.y.z", "grant": ["a/:ro"]}}"#,
                mnt.display()
            ),
            "a token carries the grant: drop",
        ),
    ] {
        let (code, answer) = post(&d.socket, path, body);
        assert_eq!(code, 400, "{body}: {answer}");
        assert!(answer.contains(says), "{body}: {answer}");
    }
    // Ids no session can have are refused as such, before they name a file.
    for id in ["%2F", "a%2Fb", "%00", ".x", &"s".repeat(5000)] {
        let (code, answer) = get(&d.socket, &format!("/v1/sessions/{id}"));
        assert_eq!(code, 400, "{id}: {answer}");
        assert!(answer.contains("invalid session id"), "{id}: {answer}");
        let (code, answer) = post(&d.socket, &format!("/v1/sessions/{id}/end"), "{}");
        assert_eq!(code, 400, "{id}: {answer}");
        assert!(answer.contains("invalid session id"), "{id}: {answer}");
    }
    for (args, says) in [
        (
            vec!["session", "create", "t2", "--owner", "4294967295:0"],
            "owner uid 4294967295 is not an id",
        ),
        (
            vec!["session", "create", "t2", "--owner", "0:4294967295"],
            "owner gid 4294967295 is not an id",
        ),
        (
            vec![
                "mount",
                "--daemon",
                "--room",
                "r",
                "--label",
                "",
                mnt.to_str().unwrap(),
            ],
            "label \"\" must be 1 to 200 bytes",
        ),
    ] {
        let (code, _, err) = d.cli(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // Nothing was made.
    assert_eq!(d.json(&["session", "list", "--json"]), json!([]));
    assert!(!is_mounted(&mnt));
}

#[test]
fn the_control_socket_is_never_reachable_by_others_even_under_umask_0() {
    // A daemon started by hand with umask 0: bind(2) makes its socket 0777 until it is
    // restricted. Everything made in the socket's directory is watched as it happens: only a
    // directory (private, where the socket is bound) may appear there, and the socket only by a
    // rename, already 0600, never as a file others could connect to in between.
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    fs::create_dir(&run).unwrap();
    fs::set_permissions(&run, fs::Permissions::from_mode(0o755)).unwrap();
    let socket = run.join("control.sock");
    let watch = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
    watch
        .add_watch(&run, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
        .unwrap();
    let mut daemon = Command::new("sh")
        .arg("-c")
        .arg(r#"umask 0 && exec "$@""#)
        .arg("sh")
        .args([BIN, "serve", "--socket"])
        .arg(&socket)
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "no socket at {}",
            socket.display()
        );
        assert!(daemon.try_wait().unwrap().is_none(), "the daemon exited");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mode = fs::metadata(&socket).unwrap().permissions().mode() & 0o7777;
    // Nothing is left behind but the socket.
    let left: Vec<_> = fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
    assert_eq!(mode, 0o600);
    let events = watch.read_events().unwrap();
    let made: Vec<String> = events
        .iter()
        .map(|e| format!("{:?} {:?}", e.mask, e.name))
        .collect();
    assert!(!events.is_empty());
    for e in &events {
        let dir = e.mask.contains(AddWatchFlags::IN_ISDIR);
        let renamed_socket = e.mask.contains(AddWatchFlags::IN_MOVED_TO)
            && e.name.as_deref() == Some(std::ffi::OsStr::new("control.sock"));
        assert!(dir || renamed_socket, "made in {}: {made:?}", run.display());
    }
    assert_eq!(left, ["control.sock"], "{made:?}");
}

/// A writer's close racing a rename of its file in another mount of the daemon: the rename let
/// its claims go before this mount was told of it, so the commit went to the old name —
/// `ENOENT` from a close whose bytes were kept, and on S3 a rewrite made the old name again
/// (with the new content, the new name keeping the old). Now the close succeeds and the
/// bytes are at the new name, whichever ran first.
#[test]
fn a_close_racing_a_rename_in_another_mount_commits_at_the_new_name() {
    use std::os::fd::IntoRawFd;
    let d = Daemon::start();
    let (a, b) = two_mounts_of_r1(&d);
    let close = |f: fs::File| match unsafe { libc::close(f.into_raw_fd()) } {
        0 => 0,
        _ => std::io::Error::last_os_error().raw_os_error().unwrap(),
    };
    for k in 0..30u32 {
        for name in ["log", "log.mv"] {
            let _ = fs::remove_file(a.join(name));
        }
        fs::write(a.join("log"), b"old\n").unwrap();
        eventually("b sees the file", || b.join("log").exists());
        let rewrite = k % 2 == 1;
        let mut f = match rewrite {
            true => fs::File::create(a.join("log")).unwrap(),
            false => fs::OpenOptions::new()
                .append(true)
                .open(a.join("log"))
                .unwrap(),
        };
        let line = format!("new {k}\n");
        f.write_all(line.as_bytes()).unwrap();
        let renamer = {
            let b = b.clone();
            std::thread::spawn(move || fs::rename(b.join("log"), b.join("log.mv")))
        };
        std::thread::sleep(Duration::from_micros(u64::from(k % 10) * 500));
        let closed = close(f);
        renamer.join().unwrap().unwrap();
        assert_eq!(closed, 0, "round {k}: close failed with errno {closed}");
        let want = match rewrite {
            true => line.clone(),
            false => format!("old\n{line}"),
        };
        eventually(
            &format!("round {k}: the bytes at the new name only"),
            || {
                !a.join("log").exists()
                    && fs::read(a.join("log.mv")).is_ok_and(|got| got == want.as_bytes())
            },
        );
    }
}
