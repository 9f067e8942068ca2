//! Events and coherence across mounts and processes, through real mounts: every kind of
//! operation shows as its event (through another mount, another roomfs process on the same
//! data dir, an export), resume from a seq, the retention gap, grant filtering; and a second
//! `roomfs mount` process on the same data dir sees changes at once although its kernel may
//! cache for a minute.

mod common;

use std::fs;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::{BIN, is_mounted, start_logged};
use serde_json::Value;

/// A standalone `roomfs mount` (its own process) on a given data dir, unmounted and stopped
/// on drop.
struct Standalone {
    mnt: PathBuf,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Standalone {
    fn start(data: &Path, mnt: &Path, args: &[&str]) -> Standalone {
        fs::create_dir_all(mnt).unwrap();
        let log = Arc::default();
        let mut cmd = Command::new(BIN);
        cmd.arg("mount")
            .arg("--data-dir")
            .arg(data)
            .args(args)
            .arg(mnt);
        let child = start_logged(&mut cmd, " mounted ", &log);
        assert!(is_mounted(mnt));
        Standalone {
            mnt: mnt.to_path_buf(),
            child: Some(child),
            log,
        }
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let c = common::cstr(&self.mnt);
            // SAFETY: a NUL-terminated path.
            unsafe {
                if libc::umount2(c.as_ptr(), 0) != 0 {
                    libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `roomfs events ARGS` (without --follow): the lines it printed.
fn events(d: &Daemon, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["events"];
    all.extend_from_slice(args);
    let (code, out, err) = d.cli(&all);
    assert_eq!(code, 0, "roomfs {all:?}: {err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// Waits until `roomfs events ARGS` prints at least `n` lines; returns them.
fn events_at_least(d: &Daemon, args: &[&str], n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = events(d, args);
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// (type, path or source -> destination, participant) of each event.
fn summary(events: &[Value]) -> Vec<(String, String, String)> {
    events
        .iter()
        .map(|e| {
            let path = match e.get("path") {
                Some(p) => p.as_str().unwrap().to_string(),
                None => format!(
                    "{} -> {}",
                    e["source_path"].as_str().unwrap_or("?"),
                    e["destination_path"].as_str().unwrap_or("?")
                ),
            };
            (
                e["type"].as_str().unwrap().to_string(),
                path,
                e["participant"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn s(t: &str, p: &str, who: &str) -> (String, String, String) {
    (t.into(), p.into(), who.into())
}

#[test]
fn every_operation_is_one_event_in_one_sequence_across_mounts_processes_and_exports() {
    let d = Daemon::start();
    let (a, b) = (d.dir("a"), d.dir("b"));
    d.mount(&["--room", "r1", "--label", "alice"], &a);
    d.mount(&["--room", "r1"], &b);
    let b_name = b.canonicalize().unwrap().to_string_lossy().into_owned();
    // Another process on the same data dir.
    let ext = Standalone::start(&d.data, &d.dir("ext"), &["--room", "r1", "--label", "ext"]);
    // A watcher following from the start.
    let mut follower = Command::new(BIN)
        .args(["events", "--room", "r1", "--follow", "--socket"])
        .arg(&d.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let follower_out = follower.stdout.take().unwrap();
    let followed = std::thread::spawn(move || {
        let mut got = Vec::new();
        for line in std::io::BufReader::new(follower_out).lines() {
            let Ok(line) = line else { break };
            got.push(serde_json::from_str::<Value>(&line).unwrap());
            if got.len() == 14 {
                break;
            }
        }
        got
    });
    fs::write(a.join("report.md"), b"# draft").unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(a.join("report.md"))
        .unwrap()
        .write_all(b"\nmore")
        .unwrap();
    // Truncate by path commits at once.
    let c = common::cstr(&a.join("report.md"));
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 3) }, 0);
    fs::create_dir(a.join("outputs")).unwrap();
    fs::rename(a.join("report.md"), a.join("outputs/report.md")).unwrap();
    fs::create_dir(b.join("tmp")).unwrap();
    fs::write(b.join("tmp/scratch"), b"x").unwrap();
    fs::remove_file(b.join("tmp/scratch")).unwrap();
    fs::rename(b.join("tmp"), b.join("old")).unwrap();
    fs::remove_dir(b.join("old")).unwrap();
    // Attributes are no event: chmod shows nowhere.
    fs::set_permissions(
        a.join("outputs"),
        std::os::unix::fs::PermissionsExt::from_mode(0o750),
    )
    .unwrap();
    // Another process's change is numbered when that process writes it to the log: wait for
    // ours to be there, so that the order is known.
    events_at_least(&d, &["--room", "r1"], 12);
    fs::write(ext.mnt.join("from-ext.txt"), b"hello").unwrap();
    // An export from a session into the room.
    d.json(&["session", "create", "s1", "--json"]);
    let s1 = d.dir("s1");
    d.mount(&["--session", "s1"], &s1);
    fs::create_dir(s1.join("out")).unwrap();
    fs::write(s1.join("out/result.csv"), b"a,b\n").unwrap();
    // Wait for the standalone process's event before the export, to know the order.
    events_at_least(&d, &["--room", "r1"], 14);
    d.json(&[
        "session",
        "end",
        "s1",
        "--export",
        "out/",
        "--to-room",
        "r1",
        "--json",
    ]);
    let got = events_at_least(&d, &["--room", "r1"], 14);
    let expected = vec![
        s("file.updated", "report.md", "alice"),
        s("file.updated", "report.md", "alice"),
        s("file.updated", "report.md", "alice"),
        s("file.updated", "report.md", "alice"),
        s("folder.created", "outputs", "alice"),
        s("file.moved", "report.md -> outputs/report.md", "alice"),
        s("folder.created", "tmp", &b_name),
        s("file.updated", "tmp/scratch", &b_name),
        s("file.updated", "tmp/scratch", &b_name),
        s("file.deleted", "tmp/scratch", &b_name),
        s("folder.moved", "tmp -> old", &b_name),
        s("folder.deleted", "old", &b_name),
        s("file.updated", "from-ext.txt", "ext"),
        s("file.updated", "from-ext.txt", "ext"),
    ];
    // The creations of files (size 0) and their commits are one event each; the export's
    // come after.
    assert_eq!(summary(&got[..14]), expected, "{got:#?}");
    let exported = summary(&got[14..]);
    assert_eq!(
        exported,
        vec![
            s("folder.created", "out", "sessions/s1"),
            s("file.updated", "out/result.csv", "sessions/s1"),
        ]
    );
    let seqs: Vec<u64> = got.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=16).collect::<Vec<_>>());
    let sizes: Vec<u64> = got[..4]
        .iter()
        .map(|e| e["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [0, 7, 12, 3], "create, close, append, truncate");
    assert_eq!(got[5]["size"], 3);
    assert!(
        got.iter()
            .all(|e| e["space"] == "rooms/r1" && e["time"].as_u64().unwrap() > 0)
    );
    // The follower saw the same first 14, live.
    let live = followed.join().unwrap();
    let _ = follower.kill();
    let _ = follower.wait();
    assert_eq!(summary(&live), expected);
    drop(ext);
}

#[test]
fn a_running_writers_output_is_announced_while_it_runs() {
    let d = Daemon::start();
    let a = d.dir("a");
    d.mount(&["--room", "r1", "--label", "runner"], &a);
    // A log written line by line, open for two seconds.
    common::python(
        &a,
        "import os, time\n\
         f = open(os.environ['MNT'] + '/train.log', 'w')\n\
         for i in range(3):\n\
         \x20   f.write(f'step {i}\\n'); f.flush(); time.sleep(0.8)\n\
         f.close()\n",
    );
    let got = events(&d, &["--room", "r1"]);
    let updates: Vec<u64> = got
        .iter()
        .filter(|e| e["path"] == "train.log")
        .map(|e| e["size"].as_u64().unwrap())
        .collect();
    // Created (0), published while running (growing), committed at close (21).
    assert!(updates.len() >= 3, "{updates:?}");
    assert_eq!(updates.first(), Some(&0));
    assert_eq!(updates.last(), Some(&21));
    assert!(updates.iter().any(|&s| s > 0 && s < 21), "{updates:?}");
}

#[test]
fn watchers_resume_from_a_seq_and_are_told_of_a_gap() {
    let d = Daemon::with_config(Some(r#"{"event_retention": {"max_events": 5}}"#));
    let a = d.dir("a");
    d.mount(&["--room", "r1"], &a);
    for i in 0..12 {
        fs::create_dir(a.join(format!("d{i}"))).unwrap();
    }
    let all = events(&d, &["--room", "r1"]);
    // At least 5 are kept (at most half as many again before a compaction).
    assert_eq!(all[0]["type"], "events.gap", "{all:#?}");
    let oldest = all[0]["oldest_seq"].as_u64().unwrap();
    assert!((2..=8).contains(&oldest), "{oldest}");
    assert_eq!(all[0]["head_seq"], 12);
    assert_eq!(all[1]["seq"].as_u64(), Some(oldest));
    assert_eq!(all.last().unwrap()["seq"], 12);
    // From a seq still retained: exactly what followed it, no gap.
    let from10 = events(&d, &["--room", "r1", "--since", "10"]);
    let paths: Vec<&str> = from10.iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["d10", "d11"]);
    assert_eq!(from10[0]["seq"], 11);
    // From one no longer retained: the gap line, then everything retained.
    let from1 = events(&d, &["--room", "r1", "--since", "1"]);
    assert_eq!(from1[0]["type"], "events.gap");
    assert_eq!(from1[0]["since"], 1);
    assert_eq!(from1.len(), all.len());
    // From the future (a log made anew): a gap too.
    let ahead = events(&d, &["--room", "r1", "--since", "99"]);
    assert_eq!(ahead[0]["type"], "events.gap");
    // The largest seq there is: the same (it overflowed the daemon's arithmetic).
    let last = events(&d, &["--room", "r1", "--since", &u64::MAX.to_string()]);
    assert_eq!(last[0]["type"], "events.gap");
    // Unknown spaces are refused clearly.
    let (code, _, err) = d.cli(&["events", "--room", "nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("no room nope"), "{err}");
}

#[test]
fn a_watcher_with_a_token_sees_only_its_grant_and_moves_across_it_as_they_look() {
    let keys = tempfile::tempdir().unwrap();
    let secret = keys.path().join("secret");
    fs::write(&secret, "events-test-secret-of-32-bytes-or-more\n").unwrap();
    let config = format!(r#"{{"secret_file": "{}"}}"#, secret.display());
    let d = Daemon::with_config(Some(&config));
    let a = d.dir("a");
    d.mount(&["--room", "r1"], &a);
    let token = common::issue_token(
        &secret,
        &["--room", "r1", "--path", "shared/:ro", "--name", "watcher"],
    );
    fs::create_dir(a.join("shared")).unwrap();
    fs::create_dir(a.join("secret")).unwrap();
    fs::write(a.join("secret/plan.txt"), b"x").unwrap();
    fs::rename(a.join("secret/plan.txt"), a.join("shared/plan.txt")).unwrap();
    fs::write(a.join("shared/notes.txt"), b"y").unwrap();
    fs::rename(a.join("shared/notes.txt"), a.join("secret/notes.txt")).unwrap();
    fs::rename(a.join("shared/plan.txt"), a.join("shared/final.txt")).unwrap();
    let got = events(&d, &["--room", "r1", "--token", &token]);
    let who = got[0]["participant"].as_str().unwrap_or("").to_string();
    let w = |t: &str, p: &str| s(t, p, &who);
    assert_eq!(
        summary(&got),
        vec![
            w("folder.created", "shared"),
            w("file.updated", "shared/plan.txt"),
            w("file.updated", "shared/notes.txt"),
            w("file.updated", "shared/notes.txt"),
            w("file.deleted", "shared/notes.txt"),
            w("file.moved", "shared/plan.txt -> shared/final.txt"),
        ],
        "{got:#?}"
    );
    // The move in showed as an arrival of the whole file.
    assert_eq!(got[1]["size"], 1);
    // Without the token: everything (9 events).
    assert_eq!(events(&d, &["--room", "r1"]).len(), 9);
    // A token for another room is refused.
    let (code, _, err) = d.cli(&["events", "--room", "r2", "--token", &token]);
    assert_ne!(code, 0);
    assert!(err.contains("token refused"), "{err}");
}

/// Two standalone `roomfs mount` processes of room r1 on one data dir (under /tmp), each
/// kernel trusting what it cached for a minute: only the change log's invalidations can show
/// one the other's changes.
fn two_mount_processes() -> (tempfile::TempDir, Standalone, Standalone) {
    let tmp = tempfile::Builder::new()
        .prefix("roomfs-events-")
        .tempdir_in("/tmp")
        .unwrap();
    let data = tmp.path().join("data");
    let ttl = ["--room", "r1", "--cache-ttl", "60"];
    let pa = Standalone::start(&data, &tmp.path().join("a"), &ttl);
    let pb = Standalone::start(&data, &tmp.path().join("b"), &ttl);
    (tmp, pa, pb)
}

#[test]
fn two_mount_processes_on_one_data_dir_see_each_others_changes_at_once() {
    // Each kernel may trust what it cached for a minute: only the change log's invalidations
    // can show the other process's changes.
    let (_tmp, pa, pb) = two_mount_processes();
    let (a, b) = (pa.mnt.clone(), pb.mnt.clone());
    fs::write(a.join("f"), b"one").unwrap();
    // B looks: its kernel caches the entry, the attributes and the pages.
    eventually("B sees the new file", || b.join("f").exists());
    assert_eq!(fs::read(b.join("f")).unwrap(), b"one");
    assert_eq!(fs::metadata(b.join("f")).unwrap().len(), 3);
    fs::write(a.join("f"), b"the second version").unwrap();
    // A stat, no open: only an invalidation of B's cached attributes shows the new size.
    eventually("B sees A's commit", || {
        fs::metadata(b.join("f")).unwrap().len() == 18
    });
    assert_eq!(fs::read(b.join("f")).unwrap(), b"the second version");
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
    // A directory listing B cached.
    fs::create_dir(b.join("dir")).unwrap();
    assert_eq!(fs::read_dir(b.join("dir")).unwrap().count(), 0);
    eventually("A sees B's directory", || a.join("dir").is_dir());
    fs::write(a.join("dir/new"), b"n").unwrap();
    eventually("B lists A's new file", || {
        fs::read_dir(b.join("dir")).unwrap().count() == 1
    });
    // Renames and removals, both ways.
    fs::rename(a.join("f"), a.join("g")).unwrap();
    eventually("B sees the rename", || {
        !b.join("f").exists() && b.join("g").exists()
    });
    assert_eq!(fs::read(b.join("g")).unwrap(), b"the second version+more");
    fs::remove_file(b.join("g")).unwrap();
    eventually("A sees the removal", || !a.join("g").exists());
    // A file open for reading in B keeps its version; its size shows the new one.
    fs::write(a.join("h"), b"old").unwrap();
    eventually("B sees h", || b.join("h").exists());
    let held = fs::File::open(b.join("h")).unwrap();
    fs::write(a.join("h"), b"newer").unwrap();
    eventually("B's stat of the open file", || {
        fs::metadata(b.join("h")).unwrap().len() == 5
    });
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut &held, &mut buf).unwrap();
    // Its reader keeps the bytes of the version it opened. (Known gap, as between two mounts
    // of one daemon: once the kernel took the new, larger size, a reader of the old version
    // that reads through the page cache after it may get zeros past the old end.)
    assert_eq!(
        &buf[..3],
        b"old",
        "an open file keeps the version it opened"
    );
    assert!(buf[3..].iter().all(|&b| b == 0), "{buf:?}");
    drop(held);
}

/// Waits until the process of mount `b` has heard every change made so far through mount `a`
/// (changes are heard in order). `a` replaces a mark file by a rename while `b` holds it open:
/// only hearing that gives the name a new inode in `b` (a look-up alone, after another
/// invalidation, finds the old one).
fn heard_all(a: &Path, b: &Path) {
    use std::os::unix::fs::MetadataExt;
    fs::write(a.join(".mark"), b"m").unwrap();
    eventually("B sees the mark", || b.join(".mark").exists());
    let held = fs::File::open(b.join(".mark")).unwrap();
    let ino = held.metadata().unwrap().ino();
    fs::write(a.join(".mark.new"), b"n").unwrap();
    fs::rename(a.join(".mark.new"), a.join(".mark")).unwrap();
    eventually("B hears A's changes", || {
        fs::metadata(b.join(".mark")).is_ok_and(|m| m.ino() != ino)
    });
}

#[test]
fn a_file_removed_or_replaced_by_another_process_while_open_is_as_if_done_here() {
    use std::os::unix::fs::FileExt;
    let (_tmp, pa, pb) = two_mount_processes();
    let (a, b) = (pa.mnt.clone(), pb.mnt.clone());
    // A save by rename (an editor's) in A over a file B has open for writing: B's writes go
    // with the file it opened, not over A's save.
    fs::write(a.join("f"), b"orig").unwrap();
    fs::write(a.join("f.tmp"), b"replacement").unwrap();
    eventually("B sees f", || b.join("f").exists());
    let mut writer = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(b.join("f"))
        .unwrap();
    fs::rename(a.join("f.tmp"), a.join("f")).unwrap();
    heard_all(&a, &b);
    assert_eq!(fs::metadata(b.join("f")).unwrap().len(), 11);
    writer.write_all(b"XX").unwrap();
    drop(writer);
    assert_eq!(fs::read(a.join("f")).unwrap(), b"replacement");
    assert_eq!(fs::read(b.join("f")).unwrap(), b"replacement");
    // Removed in A while B reads it: B reads on, from where it was and from the start.
    fs::write(a.join("r"), b"hello world").unwrap();
    eventually("B sees r", || b.join("r").exists());
    let reader = fs::File::open(b.join("r")).unwrap();
    let mut head = [0u8; 5];
    reader.read_exact_at(&mut head, 0).unwrap();
    fs::remove_file(a.join("r")).unwrap();
    heard_all(&a, &b);
    assert!(!b.join("r").exists());
    let mut all = Vec::new();
    std::io::Read::read_to_end(&mut &reader, &mut all).unwrap();
    assert_eq!(all, b"hello world");
    let held = reader.metadata().unwrap();
    assert_eq!(held.len(), 11);
    // Its kernel was told it has no name left (it trusts what it cached for a minute).
    assert_eq!(std::os::unix::fs::MetadataExt::nlink(&held), 0);
    drop(reader);
    // Removed in A, then made again, while B writes it: B's close succeeds, and what A made
    // stays (B's changes went with the file it opened).
    fs::write(a.join("w"), b"first").unwrap();
    eventually("B sees w", || b.join("w").exists());
    let mut writer = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(b.join("w"))
        .unwrap();
    writer.write_all(b"writer-data").unwrap();
    writer.flush().unwrap();
    fs::remove_file(a.join("w")).unwrap();
    heard_all(&a, &b);
    assert!(!b.join("w").exists());
    fs::write(a.join("w"), b"recreated").unwrap();
    heard_all(&a, &b);
    assert_eq!(fs::read(b.join("w")).unwrap(), b"recreated");
    writer.write_all(b"+more").unwrap();
    writer.sync_all().unwrap();
    drop(writer);
    assert_eq!(fs::read(a.join("w")).unwrap(), b"recreated");
    // A name of a file with two removed in A while B writes it: the file lives on under the
    // other, with B's changes.
    // (Both names are made as links of a third, so that B never looks up a name of the file
    // while it has one: a mount joins the names of a file into one inode only when it looks
    // them up as names of a file with several.)
    fs::write(a.join("l0"), b"orig").unwrap();
    fs::hard_link(a.join("l0"), a.join("l1")).unwrap();
    fs::hard_link(a.join("l0"), a.join("l2")).unwrap();
    fs::remove_file(a.join("l0")).unwrap();
    eventually("B sees both names", || {
        b.join("l1").exists() && b.join("l2").exists()
    });
    let mut writer = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(b.join("l1"))
        .unwrap();
    writer.write_all(b"new").unwrap();
    fs::remove_file(a.join("l1")).unwrap();
    heard_all(&a, &b);
    assert!(!b.join("l1").exists());
    writer.write_all(b"data").unwrap();
    drop(writer);
    // A hears of B's commit through the change log, as it hears of every change made by
    // another process (not synchronously with B's close): wait until it has.
    heard_all(&b, &a);
    assert_eq!(fs::read(a.join("l2")).unwrap(), b"newdata");
}

/// A name the kernel cached is opened as the file it named: when another process removed it
/// since, `open(O_CREAT)` makes a new file (not `ENOENT`), and a plain open is `ENOENT`.
#[test]
fn a_create_of_a_name_another_process_just_removed_makes_the_file() {
    let (_tmp, pa, pb) = two_mount_processes();
    let (a, b) = (pa.mnt.clone(), pb.mnt.clone());
    for i in 0..20 {
        fs::write(a.join("c"), b"old").unwrap();
        eventually("B sees c", || b.join("c").exists());
        fs::remove_file(a.join("c")).unwrap();
        let created = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(b.join("c"));
        assert!(created.is_ok(), "round {i}: {created:?}");
        drop(created);
        assert_eq!(fs::read(a.join("c")).unwrap(), b"", "round {i}");
        fs::remove_file(a.join("c")).unwrap();
        let opened = fs::OpenOptions::new().write(true).open(b.join("c"));
        assert_eq!(
            opened.map_err(|e| e.raw_os_error()).err(),
            Some(Some(libc::ENOENT)),
            "round {i}"
        );
    }
}

#[test]
fn a_directory_another_process_moved_is_resolved_again_at_once() {
    // B's store keeps the directories it resolved for a moment; a move heard from A's process
    // must drop them, or B's next file under the old name would land in the moved directory.
    let (tmp, pa, pb) = two_mount_processes();
    let data = tmp.path().join("data");
    let (a, b) = (pa.mnt.clone(), pb.mnt.clone());
    fs::create_dir(a.join("d")).unwrap();
    eventually("B sees d", || b.join("d").is_dir());
    fs::write(b.join("d/one"), b"1").unwrap();
    fs::rename(a.join("d"), a.join("e")).unwrap();
    fs::create_dir(a.join("d")).unwrap();
    eventually("B sees the move", || {
        b.join("e/one").exists() && b.join("d").is_dir() && !b.join("d/one").exists()
    });
    fs::write(b.join("d/two"), b"2").unwrap();
    let room = data.join("rooms/r1");
    assert_eq!(fs::read(room.join("d/two")).unwrap(), b"2");
    assert!(
        !room.join("e/two").exists(),
        "written through a stale directory"
    );
    assert_eq!(fs::read(a.join("d/two")).unwrap(), b"2");
}

#[test]
fn tail_f_in_another_process_follows_output_written_through_another_mount() {
    let d = Daemon::start();
    let a = d.dir("a");
    d.mount(&["--room", "r1"], &a);
    let ext = Standalone::start(&d.data, &d.dir("ext"), &["--room", "r1"]);
    // A running process writes its log through the daemon's mount, a line every 300 ms...
    let mut writer = Command::new("python3")
        .arg("-c")
        .arg(
            "import time\nwith open('run.log', 'w') as f:\n    for i in range(12):\n        \
             print('step', i, flush=True, file=f); time.sleep(0.3)",
        )
        .current_dir(&a)
        .spawn()
        .unwrap();
    // ... and `tail -f` in the other process opens it as soon as it exists: before the
    // first of its output is published, so it holds the empty file it was created as.
    let log = ext.mnt.join("run.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log.exists() {
        assert!(Instant::now() < deadline, "run.log never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    let followed = common::tail_f(&ext.mnt, "run.log", 4, "the other process");
    assert_eq!(followed, ["step 0", "step 1", "step 2", "step 3"]);
    assert!(
        writer.try_wait().unwrap().is_none(),
        "seen while the writer still runs"
    );
    assert!(writer.wait().unwrap().success());
}

/// Readers polling a log at its end through one mount read every line another mount appends,
/// never a zero byte: before the kernel is shown the longer size, it drops the last page it
/// cached of the shorter one (cut with zeros there).
#[test]
fn readers_in_one_mount_read_what_another_appends_and_never_zeros() {
    let d = Daemon::start();
    let a = d.dir("a");
    d.mount(&["--room", "r1"], &a);
    let ext = Standalone::start(&d.data, &d.dir("ext"), &["--room", "r1"]);
    fs::write(a.join("poll.log"), b"").unwrap();
    common::append_beside_polling_readers(&a.join("poll.log"), &ext.mnt.join("poll.log"));
}

/// A `roomfs events --follow ARGS` whose lines are read as they come; its stderr kept.
struct Follower {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Follower {
    fn start(d: &Daemon, args: &[&str]) -> Follower {
        let mut child = Command::new(BIN)
            .arg("events")
            .args(args)
            .arg("--follow")
            .arg("--socket")
            .arg(&d.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines: Arc<Mutex<Vec<Value>>> = Arc::default();
        let got = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                got.lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).unwrap());
            }
        });
        Follower {
            child,
            lines,
            reader: Some(reader),
        }
    }

    fn types(&self) -> Vec<String> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .map(|l| l["type"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Waits (up to 15 s) for the follower to exit: its exit code, stderr and lines.
    fn finished(mut self) -> (Option<i32>, String, Vec<Value>) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let code = match self.child.try_wait().unwrap() {
            Some(status) => status.code(),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                None
            }
        };
        self.reader.take().unwrap().join().unwrap();
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err);
        let lines = self.lines.lock().unwrap().clone();
        (code, err, lines)
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn followers_end_when_their_session_ends_and_do_not_hold_up_the_daemon_stopping() {
    let mut d = Daemon::start();
    let (r, s) = (d.dir("r"), d.dir("s"));
    d.mount(&["--room", "r1"], &r);
    d.json(&["session", "create", "s1", "--json"]);
    d.mount(&["--session", "s1"], &s);
    let room = Follower::start(&d, &["--room", "r1"]);
    let session = Follower::start(&d, &["--session", "s1"]);
    // Both are following once they print what is written now.
    fs::write(r.join("a.txt"), b"a").unwrap();
    fs::write(s.join("b.txt"), b"b").unwrap();
    eventually("the followers hear of the writes", || {
        room.types().len() >= 2 && session.types().len() >= 2
    });
    // The session ends: its follower is told, and exits with success.
    d.json(&["session", "end", "s1", "--json"]);
    let (code, err, lines) = session.finished();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("sessions/s1 was deleted"), "{err}");
    let last = lines.last().unwrap();
    assert_eq!(
        (last["type"].as_str(), last["reason"].as_str()),
        (Some("events.end"), Some("deleted")),
        "{lines:?}"
    );
    assert_eq!(last["last_seq"], lines[lines.len() - 2]["seq"]);
    // SIGTERM: the daemon stops although a follower is connected, and the follower is told
    // where to resume.
    let mut daemon = d.child.take().unwrap();
    // SAFETY: a signal to the daemon this test started.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while daemon.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = daemon.try_wait().unwrap();
    if status.is_none() {
        let _ = daemon.kill();
        let _ = daemon.wait();
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "the daemon did not stop: {status:?}\n{}",
        d.log()
    );
    let (code, err, lines) = room.finished();
    assert_eq!(code, Some(1), "{err}");
    let seq = lines[lines.len() - 2]["seq"].as_u64().unwrap();
    assert!(
        err.contains(&format!(
            "the daemon is stopping: once it is back, resume with --since {seq}"
        )),
        "{err}"
    );
    assert_eq!(lines.last().unwrap()["reason"], "stopping");
    assert!(!is_mounted(&r));
}

#[test]
fn a_follower_cut_off_by_a_daemon_killed_says_where_to_resume() {
    let mut d = Daemon::start();
    let r = d.dir("r");
    d.mount(&["--room", "r1"], &r);
    let room = Follower::start(&d, &["--room", "r1"]);
    fs::write(r.join("a.txt"), b"a").unwrap();
    eventually("the follower hears of the write", || {
        !room.types().is_empty()
    });
    let mut daemon = d.child.take().unwrap();
    daemon.kill().unwrap(); // SIGKILL: no end line
    daemon.wait().unwrap();
    let (code, err, lines) = room.finished();
    assert_eq!(code, Some(1), "{err}");
    let seq = lines.last().unwrap()["seq"].as_u64().unwrap();
    assert!(
        err.contains("the stream of events was cut")
            && err.contains(&format!("resume with --since {seq}")),
        "{err}"
    );
    // The mount the killed daemon served is dead: unmount it.
    let _ = std::process::Command::new("fusermount3")
        .args(["-uz"])
        .arg(&r)
        .status();
}

#[test]
fn a_directory_removed_by_another_process_lists_empty_for_a_shell_in_it() {
    let (tmp, pa, pb) = two_mount_processes();
    let (a, b) = (pa.mnt.clone(), pb.mnt.clone());
    fs::create_dir_all(a.join("d/sub")).unwrap();
    fs::write(a.join("d/f"), b"x").unwrap();
    eventually("B sees d/sub", || b.join("d/sub").is_dir());
    // A shell in B's `d/sub` looks at where it is once A removed the tree (as on ext4: the
    // directory and its parent are there for it, with no links, and list nothing).
    let go = tmp.path().join("go");
    let shell = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while [ ! -e {} ]; do sleep 0.02; done; stat -c %h:%F . && ls -a && ls -a ..; \
             echo rc=$?",
            go.display()
        ))
        .current_dir(b.join("d/sub"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    fs::remove_dir_all(a.join("d")).unwrap();
    heard_all(&a, &b);
    fs::write(&go, b"").unwrap();
    let out = shell.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(stdout, "0:directory\nrc=0\n", "{stderr}");
    assert!(!b.join("d").exists());
    // Made again in A: B shows the new directory.
    fs::create_dir(a.join("d")).unwrap();
    fs::write(a.join("d/new"), b"y").unwrap();
    heard_all(&a, &b);
    assert_eq!(fs::read(b.join("d/new")).unwrap(), b"y");
}

#[test]
fn a_standalone_mount_of_a_session_the_daemon_ends_unmounts_itself() {
    let d = Daemon::start();
    d.json(&["session", "create", "s1", "--json"]);
    let mut ext = Standalone::start(&d.data, &d.dir("ext"), &["--session", "s1"]);
    fs::write(ext.mnt.join("out.txt"), b"x").unwrap();
    d.json(&["session", "end", "s1", "--json"]);
    // It says why, leaves the mount point empty, and exits with success.
    let mut child = ext.child.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still serving the ended session");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(!is_mounted(&ext.mnt));
    let log = ext.log.lock().unwrap().join("\n");
    assert!(log.contains("session s1 was ended"), "{log}");
}
