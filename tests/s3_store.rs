//! The S3 store across hosts and through failures, on a real engine (SeaweedFS, see
//! `common::s3`) with real mounts.
//!
//! - Two hosts: two daemons (`roomfs serve`), each with its own data dir, spool and cache, on
//!   one bucket prefix: what one writes the other reads once its attribute TTL has passed; an
//!   `O_EXCL` race has one winner; appenders on both keep every line; renames and deletes show
//!   on both; sqlite written on one is read on the other; readers polling a log the other
//!   appends to read every line, never zeros.
//! - Requests: `ls -l` of a directory of 1,000 files is one LIST, a new small file one PUT
//!   (the daemon's metrics count every request); a file created by an open is the host's
//!   own until its close; files stat'ed by name are answered by one listing, and new names in
//!   a directory of more than a page cost no page each.
//! - Failures: the store killed in the middle of an upload, or frozen, gives `EIO` at close in
//!   bounded time, leaves the previous version and no upload behind, and the mount works again
//!   once the store is back; while one request waits on a frozen store, others that need no
//!   answer from it (reads of cached files) are served; `kill -9` of roomfs during an upload leaves the previous object,
//!   and the next start aborts the upload it left.
//! - Credentials from a profile file, and from instance metadata (a fake IMDSv2 here).
//! - An `https` endpoint whose certificate a private CA signed: refused with a clear line
//!   until that CA's certificate is given (`AWS_CA_BUNDLE` or the store's `ca_bundle`).
//! - Bad store settings are one clear line at mount time; the mount helper (`mount -t
//!   fuse.roomfs ... -o store=s3://...`) mounts a room in the bucket.
//!
//! Independent checks of the bucket go through boto3 (`SeaweedFs::boto3`).

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::daemon::Daemon;
use common::s3::{SeaweedFs, unique_prefix};
use common::{BIN, Bucket, Mounted, output, python};

/// Two hosts' daemons on one prefix of the shared bucket, each with a room `r1` mounted.
struct Hosts {
    /// Host A's daemon (its mount is `ma`).
    a: Daemon,
    b: Daemon,
    ma: PathBuf,
    mb: PathBuf,
}

fn two_hosts() -> Hosts {
    let prefix = unique_prefix();
    let s3 = SeaweedFs::shared();
    let (a, b) = (
        Daemon::on(None, Some(Bucket::on(s3, &prefix))),
        Daemon::on(None, Some(Bucket::on(s3, &prefix))),
    );
    let (ma, mb) = (a.dir("room"), b.dir("room"));
    a.mount(&["--room", "r1"], &ma);
    b.mount(&["--room", "r1"], &mb);
    Hosts { a, b, ma, mb }
}

/// Waits (up to 5 s) until `check` holds; returns how long it took.
fn eventually(what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{what}: not after 5 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

#[test]
fn written_on_one_host_read_on_the_other() {
    let h = two_hosts();
    let big: Vec<u8> = (0..20u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    fs::create_dir_all(h.ma.join("out/charts")).unwrap();
    fs::write(h.ma.join("out/report.md"), b"# findings\n").unwrap();
    fs::write(h.ma.join("out/charts/big.bin"), &big).unwrap();
    fs::write(h.ma.join("secret"), b"s").unwrap();
    fs::set_permissions(h.ma.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("out/report.md", h.ma.join("latest")).unwrap();
    // Close-to-open: after the close on A, B sees it once its TTL (1 s, plus 1 s of what its
    // store remembers) has passed.
    let took = eventually("B sees A's files", || {
        fs::read(h.mb.join("out/report.md")).is_ok_and(|b| b == b"# findings\n")
    });
    assert!(took < Duration::from_millis(2600), "{took:?}");
    assert!(fs::read(h.mb.join("out/charts/big.bin")).unwrap() == big);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(h.mb.join("secret")).unwrap().mode() & 0o777,
        0o600
    );
    assert_eq!(
        fs::read_link(h.mb.join("latest")).unwrap(),
        Path::new("out/report.md")
    );
    // A new version on A replaces B's view of it once the TTL has passed.
    fs::write(h.ma.join("out/report.md"), b"# findings, revised\n").unwrap();
    eventually("B sees the new version", || {
        fs::read(h.mb.join("out/report.md")).is_ok_and(|b| b == b"# findings, revised\n")
    });
}

use std::os::unix::fs::PermissionsExt;

#[test]
fn an_o_excl_race_between_hosts_has_one_winner() {
    let h = two_hosts();
    // Both hosts create the same names with O_EXCL at the same moment, 20 times.
    let script = r#"
import os, sys, time
mnt, start = sys.argv[1], float(sys.argv[2])
wins = []
for i in range(20):
    while time.time() < start + i * 0.15:
        time.sleep(0.001)
    try:
        os.close(os.open(f'{mnt}/lock{i}', os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        wins.append(i)
    except FileExistsError:
        pass
print(' '.join(map(str, wins)))
"#;
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + 1.0;
    let run = |mnt: &Path| {
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(mnt)
            .arg(format!("{start}"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (pa, pb) = (run(&h.ma), run(&h.mb));
    let wins = |p: std::process::Child| -> Vec<u32> {
        let out = p.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|w| w.parse().unwrap())
            .collect()
    };
    let (wa, wb) = (wins(pa), wins(pb));
    for i in 0..20 {
        assert!(
            wa.contains(&i) != wb.contains(&i),
            "lock{i}: exactly one host wins (A {wa:?}, B {wb:?})"
        );
    }
}

#[test]
fn appenders_on_both_hosts_keep_every_line() {
    let h = two_hosts();
    // Large enough that each append is a PUT of a megabyte: a try takes a while.
    let head = format!("{}\n", "h".repeat((1 << 20) - 1));
    fs::write(h.ma.join("shared.log"), &head).unwrap();
    eventually("B sees the log", || h.mb.join("shared.log").exists());
    let script = r#"
import sys
path, tag = sys.argv[1], sys.argv[2]
for i in range(40):
    with open(path, 'a') as f:
        f.write(f'{tag} {i:03} ' + 'x' * 50 + '\n')
"#;
    let run = |mnt: &Path, tag: &str| {
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(mnt.join("shared.log"))
            .arg(tag)
            .spawn()
            .unwrap()
    };
    // Two appenders on each host: each try of a loser goes after a winner's append, and the
    // winners kept winning (one host's appender failed with EIO after 32 tries, its line lost).
    let mut procs =
        [(&h.ma, "A"), (&h.ma, "C"), (&h.mb, "B"), (&h.mb, "D")].map(|(mnt, tag)| run(mnt, tag));
    for p in &mut procs {
        assert!(p.wait().unwrap().success(), "an appender failed");
    }
    let read = |mnt: &Path| fs::read_to_string(mnt.join("shared.log")).unwrap();
    eventually("both hosts see all 160 lines", || {
        read(&h.ma).lines().count() == 161 && read(&h.mb).lines().count() == 161
    });
    let text = read(&h.mb);
    assert!(text.starts_with(&head));
    for tag in ["A", "B", "C", "D"] {
        let mine: Vec<&str> = text.lines().filter(|l| l.starts_with(tag)).collect();
        let want: Vec<String> = (0..40)
            .map(|i| format!("{tag} {i:03} {}", "x".repeat(50)))
            .collect();
        assert_eq!(mine, want, "every line of {tag}, whole and in order");
    }
}

/// `tail -f` on host B of logs host A writes: a running process's output (`cmd > out.log`)
/// and lines appended one `>>` at a time. B's kernel reads each grown file again from its
/// start, when the version B opened has been replaced by longer ones.
#[test]
fn tail_f_on_another_host_follows_a_growing_log() {
    let h = two_hosts();
    fs::write(h.ma.join("app.log"), b"start\n").unwrap();
    let writer = "import sys, time\nfor i in range(10):\n    print('out', i, flush=True)\n    time.sleep(0.4)";
    let mut out = Command::new("python3")
        .args(["-c", writer])
        .stdout(File::create(h.ma.join("out.log")).unwrap())
        .spawn()
        .unwrap();
    eventually("B sees both logs", || {
        h.mb.join("app.log").exists()
            && fs::metadata(h.mb.join("out.log")).is_ok_and(|m| m.len() > 0)
    });
    let tail = |name: &str| {
        Command::new("timeout")
            .args(["7", "tail", "-f"])
            .arg(h.mb.join(name))
            .output()
            .unwrap()
    };
    let tails = std::thread::scope(|s| {
        let app = s.spawn(|| tail("app.log"));
        let out = s.spawn(|| tail("out.log"));
        for i in 0..10 {
            std::thread::sleep(Duration::from_millis(400));
            let mut f = OpenOptions::new()
                .append(true)
                .open(h.ma.join("app.log"))
                .unwrap();
            writeln!(f, "line {i}").unwrap();
        }
        [app.join().unwrap(), out.join().unwrap()]
    });
    assert!(out.wait().unwrap().success());
    let mut want = vec!["start".to_string()];
    want.extend((0..10).map(|i| format!("line {i}")));
    let wants = [
        want,
        (0..10).map(|i| format!("out {i}")).collect::<Vec<_>>(),
    ];
    for (got, want) in tails.iter().zip(wants) {
        assert_eq!(
            String::from_utf8_lossy(&got.stderr),
            "",
            "tail read every version"
        );
        let lines: Vec<&str> = std::str::from_utf8(&got.stdout).unwrap().lines().collect();
        assert_eq!(lines, want);
    }
}

/// A reader of a large log reads on into the lines another host appends, as they come. On
/// the host that wrote the log, the kernel reads it straight from the cached file of this
/// host's version (passthrough), which stopped there; on the other, a reader's open fetches a
/// log of a few MiB whole into the cache, which the kernel read the same way.
#[test]
fn a_reader_of_a_large_log_follows_another_hosts_appends() {
    use std::io::Read;
    let h = two_hosts();
    let head: Vec<u8> = (0..2u32 << 20).map(|i| b'a' + (i % 26) as u8).collect();
    fs::write(h.ma.join("big.log"), &head).unwrap();
    eventually("B sees the log", || {
        fs::metadata(h.mb.join("big.log")).is_ok_and(|m| m.len() == head.len() as u64)
    });
    let mut readers = [&h.ma, &h.mb].map(|m| File::open(m.join("big.log")).unwrap());
    for r in &mut readers {
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert!(got == head);
    }
    // A's lines reach B's reader, then B's lines A's.
    for (i, writer) in [&h.ma, &h.ma, &h.mb, &h.mb].into_iter().enumerate() {
        let line = format!("line {i}\n");
        OpenOptions::new()
            .append(true)
            .open(writer.join("big.log"))
            .unwrap()
            .write_all(line.as_bytes())
            .unwrap();
        for (r, host) in readers.iter_mut().zip(["A", "B"]) {
            let mut new = Vec::new();
            eventually(&format!("{host}'s reader reads {line:?}"), || {
                r.read_to_end(&mut new).unwrap();
                new.len() >= line.len()
            });
            assert_eq!(String::from_utf8_lossy(&new), line, "on {host}");
        }
    }
}

/// Readers polling a log through the page cache on host B, while host A appends a line and
/// `fsync`s every 10-100 ms, read every line and never a zero byte. The kernel keeps the last
/// page of what a reader read, cut with zeros at that end; once it is told a longer size it
/// would serve those zeros where the next line begins (about one run in eight read a few dozen
/// zero bytes), so the mount has it drop that page before it tells it the longer size. And
/// their opens, racing the appends, never fail: each open found the version this host knew
/// replaced by a longer one, then again at the kernel's retry (`ESTALE`, one run in ten).
#[test]
fn readers_on_another_host_read_appended_lines_and_never_zeros() {
    let h = two_hosts();
    fs::write(h.ma.join("poll.log"), b"").unwrap();
    eventually("B sees the log", || h.mb.join("poll.log").exists());
    common::append_beside_polling_readers(&h.ma.join("poll.log"), &h.mb.join("poll.log"));
}

/// Programs on host B open and read a log (and `cat` it) in a loop while host A appends a line
/// and `fsync`s every 1-10 ms: every open succeeds and reads whole lines of the log. Opens found
/// the version B knew replaced, again at the kernel's retry (`ESTALE`); and a lookup whose reply
/// waited for pages to be dropped behind an entry's invalidation, which waited for that
/// lookup's directory, hung the mount for good.
#[test]
fn opens_of_a_log_another_host_appends_to_neither_fail_nor_hang() {
    let h = two_hosts();
    let script = r#"
import os, sys, time, random, threading, subprocess
wp, rp = sys.argv[1], sys.argv[2]
line = lambda i: f'line {i:06d} {"x" * (i % 97)}\n'.encode()
want = b''.join(line(i) for i in range(100000))
open(wp, 'wb').write(line(0))
while not os.path.exists(rp) or os.path.getsize(rp) == 0:
    time.sleep(0.05)
stop, bad = threading.Event(), []
def writer():
    fd = os.open(wp, os.O_WRONLY | os.O_APPEND)
    for i in range(1, 100000):
        if stop.is_set():
            break
        os.write(fd, line(i)); os.fsync(fd)
        time.sleep(random.uniform(0.001, 0.01))
    os.close(fd)
def judge(got, how):
    if not (want.startswith(got) and got.endswith(b'\n')):
        bad.append(f'{how}: {len(got)} bytes, not whole lines of the log: {got[-60:]!r}')
def opener():
    while not stop.is_set():
        try:
            with open(rp, 'rb') as f:
                judge(f.read(), 'open')
        except OSError as e:
            bad.append(f'open: {e}')
def cat():
    while not stop.is_set():
        p = subprocess.run(['cat', rp], capture_output=True)
        if p.returncode:
            bad.append(f'cat: {p.stderr!r}')
        else:
            judge(p.stdout, 'cat')
threads = [threading.Thread(target=f) for f in (writer, opener, opener, cat)]
for t in threads:
    t.start()
time.sleep(5)
stop.set()
for t in threads:
    t.join()
if bad:
    sys.exit(f'{len(bad)} bad: ' + '; '.join(bad[:5]))
"#;
    let mut run = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(h.ma.join("log"))
        .arg(h.mb.join("log"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while run.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "hung: the readers on B are stuck"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = run.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A reader reads the version it opened, whole, when another host saves the file between its
/// open and its first read; and a reader's open of a version another host replaced since this
/// host learnt of it (within the TTL) reads the new one, with its size. S3 keeps no replaced
/// versions: both were `EIO` at the first read.
#[test]
fn a_reader_gets_a_whole_version_when_another_host_saves_the_file_around_its_open() {
    use std::io::Read;
    let m = Mounted::on(&["--room", "r1"], |_| {}, Some(Bucket::shared()));
    let other_host = m.s3.as_ref().unwrap();
    other_host.put(&m.key("status"), b"one\n");
    assert_eq!(fs::metadata(m.p("status")).unwrap().len(), 4);
    let mut reader = File::open(m.p("status")).unwrap();
    other_host.put(&m.key("status"), b"two, longer\n");
    let mut got = String::new();
    reader.read_to_string(&mut got).unwrap();
    assert_eq!(got, "one\n", "the version it opened");
    drop(reader);

    other_host.put(&m.key("config"), b"old\n");
    assert_eq!(fs::metadata(m.p("config")).unwrap().len(), 4);
    other_host.put(&m.key("config"), b"new, longer\n");
    assert_eq!(fs::read(m.p("config")).unwrap(), b"new, longer\n");
    assert_eq!(fs::metadata(m.p("config")).unwrap().len(), 12);
}

/// A file B creates just after A removed the name, or moved it away, is B's: A's change,
/// heard by B while its writer still writes (the new file is not in the bucket before its
/// close), is older than B's create and must not drop it. And `open(O_CREAT)` of the name B
/// had looked up just before is never `ENOENT`.
#[test]
fn a_file_made_right_after_another_host_removed_the_name_is_kept() {
    let h = two_hosts();
    for (i, how) in ["remove", "move"].iter().enumerate() {
        let (y, z) = (format!("y{i}"), format!("z{i}"));
        fs::write(h.ma.join(&y), b"old").unwrap();
        eventually("B sees y", || h.mb.join(&y).exists());
        // What B knows of y expires (the TTL): B's open asks the store, which says y is gone,
        // and B creates it; A's change reaches B a moment later, through the feed.
        std::thread::sleep(Duration::from_millis(1500));
        match *how {
            "remove" => fs::remove_file(h.ma.join(&y)).unwrap(),
            _ => fs::rename(h.ma.join(&y), h.ma.join(&z)).unwrap(),
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(h.mb.join(&y))
            .unwrap_or_else(|e| panic!("{how}: {e}"));
        f.write_all(b"new, from B").unwrap();
        // Long enough for B to hear A's change while the file is open.
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(
            fs::read(h.mb.join(&y)).unwrap_or_else(|e| panic!("{how}: {e}")),
            b"",
            "{how}: B's own file, still open (nothing committed yet)"
        );
        drop(f);
        eventually("A sees B's file", || {
            fs::read(h.ma.join(&y)).is_ok_and(|b| b == b"new, from B")
        });
        assert_eq!(fs::read(h.mb.join(&y)).unwrap(), b"new, from B", "{how}");
    }
    assert_eq!(fs::read(h.mb.join("z1")).unwrap(), b"old");
}

#[test]
fn renames_and_deletes_show_on_both_hosts() {
    let h = two_hosts();
    fs::create_dir_all(h.ma.join("d/sub")).unwrap();
    for i in 0..5 {
        fs::write(h.ma.join(format!("d/sub/f{i}")), format!("{i}")).unwrap();
    }
    fs::write(h.ma.join("doomed"), b"x").unwrap();
    fs::write(h.ma.join("old-name"), b"content").unwrap();
    eventually("B sees A's tree", || h.mb.join("d/sub/f4").exists());
    fs::rename(h.ma.join("old-name"), h.ma.join("new-name")).unwrap();
    fs::rename(h.ma.join("d"), h.ma.join("e")).unwrap();
    fs::remove_file(h.ma.join("doomed")).unwrap();
    eventually("B sees the renames and the delete", || {
        !h.mb.join("old-name").exists()
            && fs::read(h.mb.join("new-name")).is_ok_and(|b| b == b"content")
            && !h.mb.join("d").exists()
            && fs::read(h.mb.join("e/sub/f3")).is_ok_and(|b| b == b"3")
            && !h.mb.join("doomed").exists()
    });
    // And the other way round.
    fs::remove_dir_all(h.mb.join("e")).unwrap();
    eventually("A sees B's delete", || !h.ma.join("e").exists());
    let mut names: Vec<_> = fs::read_dir(&h.ma)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["new-name"]);
}

#[test]
fn sqlite_written_on_one_host_is_read_on_the_other() {
    let h = two_hosts();
    python(
        &h.ma,
        r#"
import os, sqlite3
db = sqlite3.connect(os.environ['MNT'] + '/notes.db')
db.execute('create table notes(id integer primary key, body text)')
for i in range(200):
    db.execute('insert into notes(body) values (?)', (f'note {i} ' + 'x' * 200,))
    if i % 50 == 49:
        db.commit()
db.commit()
db.close()
"#,
    );
    let read = r#"
import os, sqlite3
db = sqlite3.connect('file:' + os.environ['MNT'] + '/notes.db?mode=ro', uri=True)
print(db.execute('pragma integrity_check').fetchone()[0], db.execute('select count(*) from notes').fetchone()[0])
"#;
    eventually("B reads the database", || {
        h.mb.join("notes.db").exists() && fs::metadata(h.mb.join("notes.db")).unwrap().len() > 0
    });
    let mut out = String::new();
    eventually("B sees all 200 rows", || {
        out = python(&h.mb, read);
        out == "ok 200\n"
    });
    // More on A; B sees them at its next open once the TTL has passed.
    python(
        &h.ma,
        "import os, sqlite3\ndb = sqlite3.connect(os.environ['MNT'] + '/notes.db')\n\
         db.execute(\"insert into notes(body) values ('late')\")\ndb.commit()",
    );
    eventually("B sees the new row", || python(&h.mb, read) == "ok 201\n");
}

/// Sums a metric's samples with `label` (e.g. `op="list"`) in Prometheus text.
fn metric(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The change in `roomfs_backend_requests_total{op}` between two metrics texts.
fn requests(before: &str, after: &str, op: &str) -> u64 {
    let label = format!("op=\"{op}\"");
    metric(after, "roomfs_backend_requests_total", &label)
        - metric(before, "roomfs_backend_requests_total", &label)
}

/// `touch` of new files (create, `futimens(UTIME_NOW)`, close): one PUT each, the time of the
/// call being the new object's own, with no index entry to write. (GNU touch opens its first
/// file onto standard input, by a dup2() and a close() of the descriptor it opened: that close
/// makes the file, and its times are then set by a copy of the object onto itself.)
/// Keys another tool wrote holding characters XML 1.0 cannot carry (controls, U+FFFF), or
/// `%`, `+` and spaces, show under their own names and work: read, renamed, removed, and
/// their directory removed after them. Listings are asked for URL-encoded: before, SeaweedFS
/// put U+FFFD in their place, a name whose GET was a 404 (`EIO`), which `rm` could not
/// remove. Pages of a listing go on after such keys too.
#[test]
fn keys_with_characters_xml_cannot_carry_are_files_like_any_other() {
    let m = Mounted::on(&["--room", "r1"], |_| {}, Some(Bucket::shared()));
    let other_tool = m.s3.as_ref().unwrap();
    let names = [
        "a%b+c d",
        "bad\u{1}name",
        "esc\u{1b}x",
        "ff\u{ffff}z",
        "plus+",
        "pct%41",
        "\u{e9}t\u{e9}",
    ];
    for n in names {
        other_tool.put(&m.key(&format!("cc/{n}")), format!("{n}\n").as_bytes());
    }
    other_tool.put(&m.key("cc/sub\u{2}dir/x"), b"x\n");
    let mut listed: Vec<String> = fs::read_dir(m.p("cc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    let mut want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    want.push("sub\u{2}dir".into());
    want.sort();
    assert_eq!(listed, want);
    for n in names {
        assert_eq!(
            fs::read(m.p(&format!("cc/{n}"))).unwrap(),
            format!("{n}\n").as_bytes(),
            "{n:?}"
        );
    }
    assert_eq!(fs::read(m.p("cc/sub\u{2}dir/x")).unwrap(), b"x\n");

    // Pages of a listing go on from such keys and prefixes, keys and common prefixes alike.
    let dir = m.key("cc/");
    let mut keys: Vec<String> = names.iter().map(|n| format!("{dir}{n}")).collect();
    keys.push(format!("{dir}sub\u{2}dir/x"));
    keys.sort();
    assert_eq!(other_tool.names_paged(&dir, false, 1), keys);
    let mut delimited: Vec<String> = names.iter().map(|n| format!("{dir}{n}")).collect();
    delimited.push(format!("{dir}sub\u{2}dir/"));
    delimited.sort();
    for max in [1, 2, 3] {
        assert_eq!(
            other_tool.names_paged(&dir, true, max),
            delimited,
            "pages of {max}"
        );
    }

    fs::rename(m.p("cc/bad\u{1}name"), m.p("cc/good\u{1}name")).unwrap();
    fs::rename(m.p("cc/a%b+c d"), m.p("cc/moved %2B+")).unwrap();
    assert_eq!(fs::read(m.p("cc/good\u{1}name")).unwrap(), b"bad\x01name\n");
    assert_eq!(fs::read(m.p("cc/moved %2B+")).unwrap(), b"a%b+c d\n");
    assert_eq!(other_tool.get(&m.key("cc/bad\u{1}name")), None);
    assert_eq!(
        other_tool.get(&m.key("cc/moved %2B+")).as_deref(),
        Some(&b"a%b+c d\n"[..])
    );
    let out = output(Command::new("rm").arg("-r").arg(m.p("cc")));
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log()
    );
    assert!(!m.p("cc").exists());
    assert_eq!(other_tool.keys(&dir), Vec::<String>::new());
}

#[test]
fn touch_of_new_files_is_one_put_each() {
    use std::os::unix::fs::MetadataExt;
    let h = two_hosts();
    let names: Vec<PathBuf> = (0..10).map(|i| h.ma.join(format!("t{i}"))).collect();
    let before = h.a.cli(&["metrics"]).1;
    let out = output(Command::new("touch").args(&names));
    assert!(out.status.success(), "{out:?}");
    let after = h.a.cli(&["metrics"]).1;
    assert_eq!(
        requests(&before, &after, "put"),
        10,
        "one PUT a file, no index entry"
    );
    assert_eq!(
        requests(&before, &after, "copy"),
        1,
        "the first file's times"
    );
    let now = || {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    std::thread::sleep(Duration::from_millis(1100));
    for n in &names {
        let m = fs::metadata(h.mb.join(n.file_name().unwrap())).unwrap();
        assert_eq!(m.len(), 0);
        assert!((now() - m.mtime()).abs() < 30, "{n:?}: an mtime of now");
    }
    // An existing file touched again takes the time of the touch, after an explicit one too,
    // by a lookup and in a listing.
    let touch = |args: &[&str]| {
        let out = output(Command::new("touch").args(args).arg(&names[0]));
        assert!(out.status.success(), "{out:?}");
        std::thread::sleep(Duration::from_millis(1100));
    };
    let listed = || {
        let out = output(
            Command::new("ls")
                .arg("-l")
                .arg("--time-style=+%s")
                .arg(&h.mb),
        );
        String::from_utf8(out.stdout).unwrap()
    };
    touch(&["-d", "@1000000000"]);
    assert_eq!(
        fs::metadata(h.mb.join("t0")).unwrap().mtime(),
        1_000_000_000
    );
    assert!(listed().contains(" 1000000000 t0"), "{}", listed());
    touch(&[]);
    assert!((now() - fs::metadata(h.mb.join("t0")).unwrap().mtime()).abs() < 30);
    assert!(!listed().contains(" 1000000000 t0"), "{}", listed());
}

/// `tar -x` (as root) and `cp -a` set each file's owner, mode and times after writing it,
/// through its descriptor: they reach the store with the file's commit, in its PUT, instead of
/// a HEAD, a copy of the object onto itself and an index write each.
#[test]
fn tar_x_and_cp_a_publish_owner_mode_and_times_with_each_files_bytes() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let h = two_hosts();
    let outside = h.a.dir("outside");
    const N: u32 = 20;
    let old = 1_000_000_000i64;
    fs::create_dir_all(outside.join("tree")).unwrap();
    for i in 0..N {
        let f = outside.join(format!("tree/f{i:02}"));
        fs::write(&f, vec![i as u8; 100 + i as usize]).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600 + i % 8 * 0o10)).unwrap();
        std::os::unix::fs::chown(&f, Some(1234 + i), Some(2345)).unwrap();
        let t = filetime_of(old + i as i64);
        let c = std::ffi::CString::new(f.to_str().unwrap()).unwrap();
        assert_eq!(
            unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), t.as_ptr(), 0) },
            0
        );
    }
    let tarball = h.a.dir("t").join("t.tar");
    let ok = |out: std::process::Output| assert!(out.status.success(), "{out:?}");
    ok(output(
        Command::new("tar")
            .arg("-cf")
            .arg(&tarball)
            .arg("-C")
            .arg(&outside)
            .arg("tree"),
    ));
    let run = |what: &str, cmd: &mut Command, dir: &str| {
        let before = h.a.cli(&["metrics"]).1;
        ok(output(cmd));
        let after = h.a.cli(&["metrics"]).1;
        // Each file: the O_EXCL claim (and its index entry), its commit with the attributes
        // (and the entry they need); besides, the directory's own and the change feed's (a
        // PUT each 20 ms while changes stream). It was 14 a file.
        assert_eq!(
            requests(&before, &after, "copy"),
            0,
            "{what}: no copy onto itself"
        );
        let heads = requests(&before, &after, "head");
        assert!(heads <= 6, "{what}: {heads} HEADs for {N} files");
        let total: u64 = ["head", "get", "put", "copy", "list", "delete"]
            .iter()
            .map(|op| requests(&before, &after, op))
            .sum();
        assert!(
            total <= 5 * N as u64 + 10,
            "{what}: {total} requests for {N} files"
        );
        // Another host, once its metadata TTL has passed, sees them by a lookup and in a
        // listing (`ls -l` takes them from the directory's index).
        std::thread::sleep(Duration::from_millis(1100));
        let listing =
            String::from_utf8(output(Command::new("ls").arg("-ln").arg(h.mb.join(dir))).stdout)
                .unwrap();
        for i in 0..N {
            let m = fs::metadata(h.mb.join(format!("{dir}/f{i:02}"))).unwrap();
            let mode = 0o600 + i % 8 * 0o10;
            assert_eq!(
                (m.mode() & 0o7777, m.uid(), m.gid(), m.mtime(), m.size()),
                (mode, 1234 + i, 2345, old + i as i64, 100 + i as u64),
                "{what}: f{i:02} on the other host"
            );
            let line = listing
                .lines()
                .find(|l| l.ends_with(&format!(" f{i:02}")))
                .unwrap_or_else(|| panic!("{what}: f{i:02} not listed:\n{listing}"));
            assert!(
                line.starts_with(&format!("-{}", rwx(mode)))
                    && line.contains(&format!(" {} 2345 ", 1234 + i)),
                "{what}: mode and owner in the listing: {line}"
            );
        }
    };
    fs::create_dir(h.ma.join("x")).unwrap();
    run(
        "tar -x",
        Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(h.ma.join("x")),
        "x/tree",
    );
    run(
        "cp -a",
        Command::new("cp")
            .arg("-a")
            .arg(outside.join("tree"))
            .arg(h.ma.join("copied")),
        "copied",
    );
}

/// The permission bits as `ls -l` shows them.
fn rwx(mode: u32) -> String {
    (0..9)
        .map(|i| {
            if mode & (0o400 >> i) == 0 {
                '-'
            } else {
                ['r', 'w', 'x'][i % 3]
            }
        })
        .collect()
}

/// Access and modification times `t` (seconds), as `utimensat` takes them.
fn filetime_of(t: i64) -> [libc::timespec; 2] {
    [libc::timespec {
        tv_sec: t,
        tv_nsec: 0,
    }; 2]
}

#[test]
fn a_new_file_is_one_put_and_other_hosts_see_it_from_its_close() {
    let h = two_hosts();
    fs::create_dir(h.ma.join("out")).unwrap();
    let before = h.a.cli(&["metrics"]).1;
    // A file held open for a second is published before its close (a second PUT): on a
    // loaded machine one of these may be, so those are counted.
    let held_long: u64 = python(
        &h.ma,
        r#"
import os, time
slow = 0
for i in range(50):
    t = time.monotonic()
    with open(os.environ['MNT'] + f'/out/f{i:02}', 'wb') as f:
        f.write(bytes([i]) * 4096)
    slow += time.monotonic() - t > 0.9
print(slow)
"#,
    )
    .trim()
    .parse()
    .unwrap();
    let after = h.a.cli(&["metrics"]).1;
    let puts = requests(&before, &after, "put");
    assert!(
        (50..=50 + held_long).contains(&puts),
        "one PUT a file, its bytes with it: {puts} ({held_long} held open a second)"
    );
    // Held open on A: A shows it at once; B from its first commit on, which the mount makes
    // a second after the open (as it publishes a running writer's output), or the close.
    let mut held = File::create(h.ma.join("out/held.txt")).unwrap();
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert!(names(&h.ma.join("out")).contains(&"held.txt".to_string()));
    eventually("B sees the file held open on A", || {
        fs::metadata(h.mb.join("out/held.txt")).is_ok_and(|m| m.len() == 0)
    });
    held.write_all(b"partial").unwrap();
    drop(held);
    eventually("B sees the file closed on A", || {
        fs::read(h.mb.join("out/held.txt")).is_ok_and(|b| b == b"partial")
    });
    // Created and closed without a write (`touch`): made, empty, at the close.
    let touch = output(Command::new("touch").arg(h.ma.join("out/empty")));
    assert!(touch.status.success());
    eventually("B sees the touched file", || {
        fs::metadata(h.mb.join("out/empty")).is_ok_and(|m| m.len() == 0)
    });
    // Removed before its close on A: never made.
    let gone = File::create(h.ma.join("out/gone")).unwrap();
    fs::remove_file(h.ma.join("out/gone")).unwrap();
    drop(gone);
    std::thread::sleep(Duration::from_millis(2100));
    assert!(!h.mb.join("out/gone").exists());
    assert!(!h.ma.join("out/gone").exists());
}

#[test]
fn ls_l_of_a_thousand_files_is_one_list() {
    let h = two_hosts();
    python(
        &h.ma,
        r#"
import os
d = os.environ['MNT'] + '/many'
os.mkdir(d)
for i in range(1000):
    with open(f'{d}/f{i:04}', 'w') as f:
        f.write(str(i))
for i in range(0, 1000, 100):
    os.chmod(f'{d}/f{i:04}', 0o600)
"#,
    );
    // B has never seen the directory: what does `ls -l` cost it?
    std::thread::sleep(Duration::from_millis(2100));
    let before = h.b.cli(&["metrics"]).1;
    let out = output(Command::new("ls").arg("-l").arg(h.mb.join("many")));
    assert!(out.status.success());
    let after = h.b.cli(&["metrics"]).1;
    let listing = String::from_utf8_lossy(&out.stdout);
    assert_eq!(listing.lines().filter(|l| l.starts_with('-')).count(), 1000);
    assert_eq!(
        listing
            .lines()
            .filter(|l| l.starts_with("-rw-------"))
            .count(),
        10,
        "modes from the listing, without a HEAD each:\n{listing}"
    );
    let delta = |op: &str| {
        let label = format!("op=\"{op}\"");
        metric(&after, "roomfs_backend_requests_total", &label)
            - metric(&before, "roomfs_backend_requests_total", &label)
    };
    // One LIST of the directory (1,000 keys and the index: two pages of at most 1,000) and
    // one GET of its index; the lookup of `many` itself is a HEAD, a LIST of the root and a
    // GET of the root's index.
    assert_eq!(delta("head"), 1, "{after}");
    assert!(delta("list") <= 3, "{} LISTs", delta("list"));
    assert_eq!(delta("get"), 2, "the two directories' indexes");

    // New names there, once the TTL has passed: the directory takes more than one page to
    // list, so each name is asked about alone (a HEAD, a LIST of its own prefix), not with a
    // page of the directory each.
    std::thread::sleep(Duration::from_millis(1100));
    let before = h.b.cli(&["metrics"]).1;
    python(
        &h.mb,
        r#"
import os
d = os.environ['MNT'] + '/many'
for i in range(20):
    with open(f'{d}/new{i}', 'w') as f:
        f.write(str(i))
"#,
    );
    let after = h.b.cli(&["metrics"]).1;
    let lists = requests(&before, &after, "list");
    assert!(lists <= 25, "{lists} LISTs for 20 new names");

    // `rm -rf` of it: rm lists it, then removes the names in that order, and the kernel looks
    // up each name whose TTL has passed meanwhile: a page of the listing answers a run of
    // them, not a HEAD each.
    std::thread::sleep(Duration::from_millis(1100));
    let before = h.b.cli(&["metrics"]).1;
    let out = output(Command::new("rm").arg("-rf").arg(h.mb.join("many")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = h.b.cli(&["metrics"]).1;
    let (heads, deletes) = (
        requests(&before, &after, "head"),
        requests(&before, &after, "delete"),
    );
    assert!(deletes >= 1020, "{deletes} DELETEs");
    assert!(heads <= 40, "{heads} HEADs to remove 1,020 files");
    assert!(!h.ma.join("many").exists() || fs::read_dir(h.ma.join("many")).unwrap().count() == 0);
}

/// A program that stats a directory's files by name (`git status`, `make`) on a host that
/// has not seen them lately gets them from one listing rather than a HEAD each, and sees
/// what HEADs would show.
#[test]
fn files_stat_by_name_on_another_host_are_answered_by_one_listing() {
    let h = two_hosts();
    python(
        &h.ma,
        r#"
import os
d = os.environ['MNT'] + '/src'
os.mkdir(d)
for i in range(60):
    with open(f'{d}/f{i:02}', 'w') as f:
        f.write('x' * i)
os.chmod(f'{d}/f07', 0o600)
os.utime(f'{d}/f08', (1_600_000_000, 1_600_000_000))
"#,
    );
    std::thread::sleep(Duration::from_millis(1100));
    let stat_all = r#"
import os
d = os.environ['MNT'] + '/src'
for i in range(60):
    st = os.stat(f'{d}/f{i:02}')
    print(i, st.st_size, oct(st.st_mode), int(st.st_mtime) if i == 8 else 0)
"#;
    let before = h.b.cli(&["metrics"]).1;
    let seen = python(&h.mb, stat_all);
    let after = h.b.cli(&["metrics"]).1;
    let (heads, lists) = (
        requests(&before, &after, "head"),
        requests(&before, &after, "list"),
    );
    // The lookup of `src` and the first three names, then one LIST of `src`.
    assert!(heads <= 5, "{heads} HEADs for 60 files");
    assert!(lists <= 3, "{lists} LISTs");
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines.len(), 60);
    assert_eq!(lines[7], "7 7 0o100600 0");
    assert_eq!(lines[8], "8 8 0o100644 1600000000");
    assert_eq!(lines[59], "59 59 0o100644 0");
}

#[test]
fn a_random_write_into_a_large_file_uploads_only_the_part_it_changed() {
    let h = two_hosts();
    let big: Vec<u8> = (0..40u32 << 20).map(|i| (i * 13 % 251) as u8).collect();
    fs::write(h.mb.join("big.bin"), &big).unwrap();
    let before = h.b.cli(&["metrics"]).1;
    // 4 KiB in the middle of the third of five 8 MiB parts, through an O_RDWR descriptor.
    {
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(h.mb.join("big.bin"))
            .unwrap();
        f.write_all_at(&[7u8; 4096], 20 << 20).unwrap();
    }
    let after = h.b.cli(&["metrics"]).1;
    let delta = |op: &str| {
        let label = format!("op=\"{op}\"");
        metric(&after, "roomfs_backend_requests_total", &label)
            - metric(&before, "roomfs_backend_requests_total", &label)
    };
    // The changed part goes up; the four others are copied inside the store (UploadPartCopy).
    assert_eq!(delta("upload_part"), 1, "{after}");
    assert_eq!(delta("upload_part_copy"), 4, "{after}");
    assert_eq!(delta("complete_upload"), 1, "{after}");
    assert_eq!(delta("put"), 0, "no whole upload");
    let mut want = big;
    want[20 << 20..(20 << 20) + 4096].fill(7);
    eventually("A reads the new version", || {
        fs::read(h.ma.join("big.bin")).is_ok_and(|b| b == want)
    });
}

/// A mount of its own SeaweedFS that fails fast (2 attempts of at most 2 s).
fn fragile_mount(weed: &SeaweedFs, prefix: &str) -> Mounted {
    let bucket = Bucket::on(weed, prefix);
    // (Later options win over the defaults before them.)
    let url = bucket.url("timeout_secs=2&connect_timeout_secs=1&attempts=2");
    Mounted::on(&["--room", "r1", "--store", &url], |_| {}, Some(bucket))
}

/// The keys with multipart uploads in progress under `prefix`, as boto3 sees them.
fn uploads(weed: &SeaweedFs, prefix: &str) -> Vec<String> {
    let out = weed.boto3(&format!(
        "r = s3.list_multipart_uploads(Bucket=BUCKET, Prefix='{prefix}/')\n\
         print('\\n'.join(u['Key'] for u in r.get('Uploads', [])))"
    ));
    out.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The bytes of `key` as boto3 reads them.
fn object(weed: &SeaweedFs, key: &str) -> Vec<u8> {
    let out = weed.boto3(&format!(
        "import sys\nsys.stdout.buffer.write(s3.get_object(Bucket=BUCKET, Key='{key}')['Body'].read())"
    ));
    out.into_bytes()
}

/// Writes `mib` MiB into `path` from a Python process, which prints `written` and then waits
/// for a line on stdin before closing the file; returns the process.
fn slow_writer(path: &Path, mib: usize) -> std::process::Child {
    let script = r#"
import os, sys
f = open(sys.argv[1], 'wb')
for i in range(int(sys.argv[2])):
    f.write(bytes([i % 251]) * (1 << 20))
print('written', flush=True)
sys.stdin.readline()
try:
    f.close()
    print('closed')
except OSError as e:
    print('close failed', e.errno)
"#;
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .arg(mib.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn read_line(child: &mut std::process::Child) -> String {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim().to_string()
}

#[test]
fn a_store_killed_mid_upload_gives_eio_keeps_the_previous_version_and_leaves_no_parts() {
    let mut weed = SeaweedFs::start();
    let prefix = unique_prefix();
    let m = fragile_mount(&weed, &prefix);
    let previous: Vec<u8> = b"previous version\n".repeat(1000);
    fs::write(m.p("data.bin"), &previous).unwrap();
    let mut writer = slow_writer(&m.p("data.bin"), 40);
    assert_eq!(read_line(&mut writer), "written");
    // Its full parts went up while it wrote: an upload is in progress.
    eventually("parts uploaded early", || {
        !uploads(&weed, &prefix).is_empty()
    });
    weed.stop(); // SIGKILL, in the middle of what is in flight
    let start = Instant::now();
    writeln!(writer.stdin.as_mut().unwrap()).unwrap();
    assert_eq!(read_line(&mut writer), "close failed 5", "EIO at close");
    assert!(writer.wait().unwrap().success());
    let took = start.elapsed();
    assert!(took < Duration::from_secs(15), "the close took {took:?}");
    weed.restart();
    let key = format!("{prefix}/rooms/r1/data.bin");
    assert!(object(&weed, &key) == previous, "the previous version");
    // The upload the failed commit left is aborted once the store answers again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !uploads(&weed, &prefix).is_empty() {
        assert!(
            Instant::now() < deadline,
            "parts left behind: {:?}",
            uploads(&weed, &prefix)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The mount works again.
    fs::write(m.p("after.txt"), b"back").unwrap();
    assert_eq!(
        object(&weed, &format!("{prefix}/rooms/r1/after.txt")),
        b"back"
    );
    assert!(fs::read(m.p("data.bin")).unwrap() == previous);
}

#[test]
fn a_frozen_store_gives_eio_in_bounded_time_and_the_mount_answers_again() {
    let mut weed = SeaweedFs::start();
    let prefix = unique_prefix();
    let m = fragile_mount(&weed, &prefix);
    fs::write(m.p("kept"), b"kept").unwrap();
    weed.pause(); // SIGSTOP: connections are accepted, nothing answers
    let start = Instant::now();
    // The open asks nothing of the store (a new file is made by its commit): the close's
    // commit meets the frozen store, and so does a duplicate's (every close commits what is
    // not committed yet).
    let mut f = File::create(m.p("new")).unwrap();
    f.write_all(b"data").unwrap();
    let close = |fd| {
        let r = unsafe { libc::close(fd) };
        (r, std::io::Error::last_os_error().raw_os_error())
    };
    let dup = std::os::fd::IntoRawFd::into_raw_fd(f.try_clone().unwrap());
    assert_eq!(close(dup), (-1, Some(libc::EIO)));
    assert_eq!(
        close(std::os::fd::IntoRawFd::into_raw_fd(f)),
        (-1, Some(libc::EIO))
    );
    let took = start.elapsed();
    assert!(took < Duration::from_secs(20), "{took:?}");
    // An open revalidates (close-to-open): with the store frozen, that is EIO too, in bounded
    // time (once what the mount knew of the file is older than its TTL).
    std::thread::sleep(Duration::from_millis(2100));
    let start = Instant::now();
    assert_eq!(common::errno(fs::read(m.p("kept"))), libc::EIO);
    assert!(start.elapsed() < Duration::from_secs(20));
    weed.resume();
    fs::write(m.p("new"), b"now it works").unwrap();
    assert_eq!(
        object(&weed, &format!("{prefix}/rooms/r1/new")),
        b"now it works"
    );
}

/// Agents creating files in their working directory while the store is frozen: the kernel
/// sends the look-ups of one directory one after another (a create holds its lock), so each
/// waiting the whole bound made the last of N wait N times it. Once a look-up went
/// unanswered, the next ones fail at once for a moment: every create gets `EIO` within about
/// one bound.
#[test]
fn creates_queued_behind_a_frozen_store_do_not_each_wait_the_whole_bound() {
    use std::io::{BufRead, Write};
    let mut weed = SeaweedFs::start();
    let prefix = unique_prefix();
    let m = fragile_mount(&weed, &prefix);
    fs::create_dir(m.p("work")).unwrap();
    fs::write(m.p("work/kept"), b"kept").unwrap();
    // The agents are in the directory already; they create when told.
    let script = r#"
import os, sys, threading, time
time.sleep(2.5)  # what the mount remembers of the directory's entries is stale by then
os.chdir(sys.argv[1])
print("in", flush=True)
sys.stdin.readline()
start = time.monotonic()
def create(i):
    try:
        open(f"new{i}", "w").close()
        r = "ok"
    except OSError as e:
        r = e.strerror
    results.append(f"{time.monotonic() - start:.1f} {r}")
# Printed after the joins: threads printing at once interleave their lines.
results = []
ts = [threading.Thread(target=create, args=(i,)) for i in range(4)]
for t in ts: t.start()
for t in ts: t.join()
print("\n".join(results), flush=True)
"#;
    let mut agents = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(m.p("work"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(agents.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "in");
    weed.pause(); // SIGSTOP: connections are accepted, nothing answers
    agents.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let results: Vec<String> = lines.map(|l| l.unwrap()).collect();
    agents.wait().unwrap();
    weed.resume();
    let text = results.join("\n");
    assert_eq!(results.len(), 4, "{text}");
    // One bound is two attempts of 2 s (and backoff): four of them one after another took
    // 16 s and more.
    for line in &results {
        let (took, result) = line.split_once(' ').unwrap();
        assert_eq!(result, "Input/output error", "{text}");
        assert!(took.parse::<f64>().unwrap() < 9.0, "{text}");
    }
    // Look-ups are sent again 2 s after the last one that went unanswered.
    std::thread::sleep(Duration::from_millis(2100));
    fs::write(m.p("work/after"), b"back").unwrap();
    assert_eq!(fs::read(m.p("work/kept")).unwrap(), b"kept");
}

#[test]
fn a_directory_rename_the_store_cut_short_is_finished_when_it_answers_and_mv_nests_nothing() {
    let mut weed = SeaweedFs::start();
    let prefix = unique_prefix();
    let m = fragile_mount(&weed, &prefix);
    let watch = Bucket::on(&weed, &prefix);
    // Enough files that the rename's copies take a while: the store is frozen among them.
    const N: usize = 1000;
    fs::create_dir(m.p("t4")).unwrap();
    for i in 0..N {
        fs::write(m.p(&format!("t4/f{i}")), i.to_string()).unwrap();
    }
    let mut mv = Command::new("mv")
        .arg(m.p("t4"))
        .arg(m.p("t5"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let copies = watch.key("rooms", "r1", "t5/");
    let deadline = Instant::now() + Duration::from_secs(30);
    while watch.keys(&copies).is_empty() {
        assert!(
            mv.try_wait().unwrap().is_none() && Instant::now() < deadline,
            "the rename was over before the store could be frozen"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    weed.pause(); // SIGSTOP: connections are accepted, nothing answers
    let out = mv.wait_with_output().unwrap();
    assert!(!out.status.success(), "mv failed with the store frozen");
    weed.resume();
    // A person (or agent) tries again, as soon as the store is back: the rename is finished
    // first, so there is nothing left to move, rather than half the tree moved into the other.
    let again = output(Command::new("mv").arg(m.p("t4")).arg(m.p("t5")));
    assert!(!again.status.success());
    // (Finishing copies the rest of the tree: seconds.)
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(fs::symlink_metadata(m.p("t4")).is_err()
        && fs::read_dir(m.p("t5")).is_ok_and(|d| d.count() == N))
    {
        assert!(
            Instant::now() < deadline,
            "the rename is not finished: {}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!m.p("t5/t4").exists(), "nested");
    assert_eq!(fs::read_to_string(m.p("t5/f789")).unwrap(), "789");
    assert!(watch.keys(&watch.key("rooms", "r1", "t4/")).is_empty());
}

#[test]
fn small_files_written_past_the_open_files_limit_commit_and_a_large_one_after_them() {
    let weed = SeaweedFs::start();
    let prefix = unique_prefix();
    let bucket = Bucket::on(&weed, &prefix);
    let mut m = Mounted::on(
        &["--room", "r1", "--store", &bucket.url("")],
        |_| {},
        Some(bucket),
    );
    // Each file read back or written stays cached; each cache entry holds its file open.
    m.restart_with_open_files(256);
    fs::create_dir(m.p("x")).unwrap();
    for i in 0..400 {
        fs::write(m.p(&format!("x/s{i}")), i.to_string())
            .unwrap_or_else(|e| panic!("file {i}: {e}: {}", m.log()));
    }
    // A large file's parts go up from the part threads while it is written.
    let big: Vec<u8> = (0..20u32 << 20).map(|i| (i % 253) as u8).collect();
    let path = m.p("x/big");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(fs::write(path, big));
    });
    let written = rx.recv_timeout(Duration::from_secs(120));
    assert!(matches!(written, Ok(Ok(()))), "{written:?}: {}", m.log());
    for i in (0..400).step_by(37) {
        assert_eq!(
            fs::read_to_string(m.p(&format!("x/s{i}"))).unwrap(),
            i.to_string()
        );
    }
    assert_eq!(fs::metadata(m.p("x/big")).unwrap().len(), 20 << 20);
    let open = fs::read_dir(format!("/proc/{}/fd", m.pid()))
        .unwrap()
        .count();
    assert!(open < 200, "{open} descriptors open");
}

#[test]
fn a_request_waiting_on_the_store_holds_up_no_other_request() {
    use std::os::fd::IntoRawFd;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let mut weed = SeaweedFs::start();
    let prefix = unique_prefix();
    let bucket = Bucket::on(&weed, &prefix);
    let m = Mounted::on(
        &["--room", "r1", "--store", &bucket.url("")],
        |_| {},
        Some(bucket),
    );
    fs::write(m.p("kept"), vec![7u8; 8192]).unwrap();
    // Read once, it is in this host's cache: reading it again needs no request to the store.
    // Direct reads each reach the mount (no page cache in between).
    assert_eq!(fs::read(m.p("kept")).unwrap().len(), 8192);
    let direct = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.p("kept"))
        .unwrap();
    let mut new = File::create(m.p("new")).unwrap();
    new.write_all(b"data").unwrap();
    weed.pause(); // SIGSTOP: connections are accepted, nothing answers
    // Its close commits: a PUT that waits on the frozen store.
    let closing = std::thread::spawn(move || {
        // SAFETY: the descriptor is ours, and closed once.
        let r = unsafe { libc::close(new.into_raw_fd()) };
        (r, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(500));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // O_DIRECT wants an aligned buffer: a 4 KiB-aligned window of a larger one.
        let mut raw = vec![0u8; 3 * 4096];
        let at = raw.as_ptr().align_offset(4096);
        let buf = &mut raw[at..at + 4096];
        let reads: std::io::Result<()> = (0..5).try_for_each(|_| {
            direct.read_exact_at(buf, 4096)?;
            assert!(buf.iter().all(|&b| b == 7));
            Ok(())
        });
        let _ = tx.send((reads, Instant::now()));
    });
    assert!(m.log().contains(", 16 threads)"), "S3 mounts' default");
    let read = rx.recv_timeout(Duration::from_secs(20));
    let still_closing = !closing.is_finished();
    weed.resume();
    let (closed, close_end) = closing.join().unwrap();
    assert_eq!(closed, 0, "the close commits once the store answers");
    let (reads, read_end) =
        read.expect("reads of a cached file finish while another request waits on the store");
    reads.unwrap();
    assert!(still_closing && read_end < close_end);
    assert_eq!(object(&weed, &format!("{prefix}/rooms/r1/new")), b"data");
}

#[test]
fn kill_9_during_an_upload_leaves_the_previous_object_and_the_next_start_aborts_it() {
    let weed = SeaweedFs::start();
    let prefix = unique_prefix();
    let mut m = fragile_mount(&weed, &prefix);
    let previous = b"previous\n".repeat(100);
    fs::write(m.p("big.bin"), &previous).unwrap();
    let mut writer = slow_writer(&m.p("big.bin"), 40);
    assert_eq!(read_line(&mut writer), "written");
    eventually("parts uploaded early", || {
        !uploads(&weed, &prefix).is_empty()
    });
    m.crash(); // kill -9 of roomfs
    let _ = writer.kill();
    let _ = writer.wait();
    let key = format!("{prefix}/rooms/r1/big.bin");
    assert!(object(&weed, &key) == previous, "the previous object");
    assert_eq!(
        uploads(&weed, &prefix),
        [key.as_str()],
        "the upload it left"
    );
    // The next start (same data dir: its journal) aborts this host's dangling upload.
    m.start();
    eventually("the dangling upload is aborted", || {
        uploads(&weed, &prefix).is_empty()
    });
    assert!(fs::read(m.p("big.bin")).unwrap() == previous);
    assert!(
        m.log().contains("aborted 1 multipart uploads"),
        "{}",
        m.log()
    );
}

#[test]
fn bad_store_settings_are_one_clear_line_at_mount_time() {
    let weed = SeaweedFs::shared();
    let tmp = tempfile::tempdir().unwrap();
    let mount = |store: &str, env: &[(&str, String)]| refused_mount(tmp.path(), store, env);
    let env = weed.env();
    let e = mount("s3://no-such-bucket/x", &env);
    assert!(e.contains("does not exist"), "{e}");
    let e = mount("s3:/roomfs-test", &env);
    assert!(e.contains("expected local or s3://"), "{e}");
    let e = mount("s3://roomfs-test/p?part_size=1k", &env);
    assert!(e.contains("part_size"), "{e}");
    let e = mount("s3://roomfs-test/p?colour=blue", &env);
    assert!(e.contains("unknown field `colour`"), "{e}");
    let unreachable: Vec<(&str, String)> = env
        .iter()
        .map(|(k, v)| match *k {
            "AWS_ENDPOINT_URL" => (*k, "http://127.0.0.1:9".to_string()),
            _ => (*k, v.clone()),
        })
        .collect();
    let e = mount(
        "s3://roomfs-test/p?connect_timeout_secs=1&attempts=1",
        &unreachable,
    );
    assert!(e.contains("cannot reach the S3 endpoint"), "{e}");
    let no_keys: Vec<(&str, String)> = env
        .iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET"))
        .cloned()
        .collect();
    let e = mount("s3://roomfs-test/p", &no_keys);
    assert!(e.contains("no AWS credentials"), "{e}");
    let wrong_key: Vec<(&str, String)> = env
        .iter()
        .map(|(k, v)| match *k {
            "AWS_SECRET_ACCESS_KEY" => (*k, "wrong".to_string()),
            _ => (*k, v.clone()),
        })
        .collect();
    let e = mount("s3://roomfs-test/p", &wrong_key);
    assert!(e.contains("refused"), "{e}");
}

/// `roomfs mount` of room `r1` with `store` at `<dir>/mnt` (data in `<dir>/data`), with only
/// `env` (and PATH) in its environment: the mount point and the command.
fn mount_command(dir: &Path, store: &str, env: &[(&str, String)]) -> (PathBuf, Command) {
    let mnt = dir.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("mount")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--room", "r1", "--store", store])
        .arg(&mnt)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    (mnt, cmd)
}

/// `roomfs mount` of room `r1` with `store` under `dir`, with only `env` (and PATH) in its
/// environment, which must fail: its one line of error.
fn refused_mount(dir: &Path, store: &str, env: &[(&str, String)]) -> String {
    let (mnt, mut cmd) = mount_command(dir, store, env);
    let out = output(&mut cmd);
    assert_eq!(out.status.code(), Some(1), "{store}: {out:?}");
    assert!(!common::is_mounted(&mnt));
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn an_https_endpoint_of_a_private_ca_is_trusted_through_its_ca_bundle() {
    let weed = SeaweedFs::start_https();
    let tmp = tempfile::tempdir().unwrap();
    let env = weed.env();
    let store = "s3://roomfs-test/p";
    // Without the CA's certificate, the endpoint is not trusted: said so, with what to do.
    let without: Vec<(&str, String)> = env
        .iter()
        .filter(|(k, _)| *k != "AWS_CA_BUNDLE")
        .cloned()
        .collect();
    let e = refused_mount(tmp.path(), store, &without);
    assert!(
        e.contains("certificate is not trusted") && e.contains("AWS_CA_BUNDLE"),
        "{e}"
    );
    // A bundle that cannot be read or holds no certificate is named (from the environment or
    // the store's `ca_bundle`).
    let missing = tmp.path().join("missing.pem");
    let with_bundle = |path: &Path| -> Vec<(&str, String)> {
        without
            .iter()
            .cloned()
            .chain([("AWS_CA_BUNDLE", path.display().to_string())])
            .collect()
    };
    let e = refused_mount(tmp.path(), store, &with_bundle(&missing));
    assert!(
        e.contains(&format!("CA bundle {}", missing.display())) && e.contains("No such file"),
        "{e}"
    );
    let junk = tmp.path().join("junk.pem");
    fs::write(&junk, "not a certificate\n").unwrap();
    let e = refused_mount(
        tmp.path(),
        &format!("{store}?ca_bundle={}", junk.display()),
        &without,
    );
    assert!(e.contains("no certificate in it"), "{e}");
    // With it: a small file (one PUT) and one of three parts (a multipart upload, whose parts
    // are sent unsigned over TLS with a checksum), stored as written.
    let prefix = unique_prefix();
    let mnt = mount_with_env(tmp.path(), &prefix, &env);
    // Text (`object` reads text), 20 MiB.
    let big: Vec<u8> = (0..1_500_000)
        .flat_map(|i| format!("line {i:08}\n").into_bytes())
        .collect();
    fs::write(mnt.0.join("small"), b"over TLS").unwrap();
    fs::write(mnt.0.join("big"), &big).unwrap();
    assert_eq!(fs::read(mnt.0.join("small")).unwrap(), b"over TLS");
    drop(mnt);
    assert_eq!(
        object(&weed, &format!("{prefix}/rooms/r1/small")),
        b"over TLS"
    );
    assert!(object(&weed, &format!("{prefix}/rooms/r1/big")) == big);
}

#[test]
fn the_daemon_keeps_rooms_in_its_store_and_refuses_another() {
    let bucket = Bucket::shared();
    let prefix = bucket.prefix.clone();
    let d = Daemon::on(None, Some(bucket));
    let mnt = d.dir("room");
    // `--store` naming the daemon's own store works; another one is refused clearly.
    let url = format!("s3://roomfs-test/{prefix}");
    d.mount(&["--room", "r1", "--store", &url], &mnt);
    fs::write(mnt.join("f"), b"in the bucket").unwrap();
    assert_eq!(d.stored("rooms/r1/f").unwrap(), b"in the bucket");
    let (code, _, err) = d.cli(&[
        "mount",
        "--daemon",
        "--room",
        "r2",
        "--store",
        "local",
        d.dir("other").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("this daemon keeps rooms in s3://"), "{err}");
}

#[test]
fn rooms_in_s3_and_sessions_on_the_local_disk() {
    // Rooms in the bucket, sessions (one host's scratch) in the data dir: "store" set,
    // "session_store" left to its default.
    let bucket = Bucket::shared();
    let prefix = bucket.prefix.clone();
    let config = format!(r#"{{"store": "s3://roomfs-test/{prefix}", "session_store": "local"}}"#);
    let d = Daemon::on(Some(&config), Some(bucket));
    let (room, session) = (d.dir("room"), d.dir("session"));
    d.mount(&["--room", "r1"], &room);
    d.json(&["session", "create", "s1", "--json"]);
    d.mount(&["--session", "s1"], &session);
    fs::write(room.join("shared.txt"), b"for every host").unwrap();
    fs::write(session.join("scratch.txt"), b"this host only").unwrap();
    assert_eq!(d.stored("rooms/r1/shared.txt").unwrap(), b"for every host");
    assert!(!d.data.join("rooms/r1/shared.txt").exists());
    assert_eq!(
        fs::read(d.data.join("sessions/s1/scratch.txt")).unwrap(),
        b"this host only"
    );
    assert!(d.stored("sessions/s1/scratch.txt").is_none());
    // Each mount is served by as many threads as its store wants by default.
    let log = d.log();
    let mounted = |what: &str| {
        log.lines()
            .find(|l| l.contains(&format!("mounted {what} at")))
            .unwrap_or_else(|| panic!("no mount of {what} in the log:\n{log}"))
            .to_string()
    };
    assert!(mounted("room r1").contains(", 16 threads)"), "{log}");
    assert!(mounted("session s1").contains(", 4 threads)"), "{log}");
}

#[test]
fn credentials_come_from_a_profile_file_as_well_as_the_environment() {
    let weed = SeaweedFs::shared();
    let tmp = tempfile::tempdir().unwrap();
    let env = weed.env();
    let get = |k: &str| env.iter().find(|(n, _)| *n == k).unwrap().1.clone();
    let creds = tmp.path().join("credentials");
    fs::write(
        &creds,
        format!(
            "[agents]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            get("AWS_ACCESS_KEY_ID"),
            get("AWS_SECRET_ACCESS_KEY")
        ),
    )
    .unwrap();
    // No key in the environment: only the profile named by AWS_PROFILE has them.
    let env: Vec<(&str, String)> = env
        .iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET"))
        .filter(|(k, _)| *k != "AWS_SHARED_CREDENTIALS_FILE" && *k != "AWS_PROFILE")
        .cloned()
        .chain([
            ("AWS_SHARED_CREDENTIALS_FILE", creds.display().to_string()),
            ("AWS_PROFILE", "agents".to_string()),
        ])
        .collect();
    let prefix = unique_prefix();
    let mnt = mount_with_env(tmp.path(), &prefix, &env);
    fs::write(mnt.0.join("f"), b"signed with the profile's key").unwrap();
    drop(mnt);
    assert_eq!(
        object(weed, &format!("{prefix}/rooms/r1/f")),
        b"signed with the profile's key"
    );
}

/// `roomfs mount` of room `r1` in `prefix` of the test bucket, under `dir`, with only `env`
/// (and PATH) in its environment; unmounted and reaped when dropped, even if the test fails.
fn mount_with_env(dir: &Path, prefix: &str, env: &[(&str, String)]) -> EnvMount {
    let store = format!("s3://roomfs-test/{prefix}");
    let (mnt, mut cmd) = mount_command(dir, &store, env);
    let log = Default::default();
    let child = common::start_logged(&mut cmd, " mounted ", &log);
    EnvMount(mnt, child)
}

struct EnvMount(PathBuf, std::process::Child);

impl Drop for EnvMount {
    fn drop(&mut self) {
        if common::is_mounted(&self.0) {
            let _ = output(Command::new(BIN).arg("unmount").arg(&self.0));
        }
        if common::is_mounted(&self.0) {
            let _ = output(Command::new("umount").arg("-l").arg(&self.0));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.1.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.1.kill();
        let _ = self.1.wait();
    }
}

#[test]
fn credentials_come_from_instance_metadata_when_nothing_else_has_them() {
    let weed = SeaweedFs::shared();
    let tmp = tempfile::tempdir().unwrap();
    let imds = FakeImds::start(weed.access_key(), weed.secret_key());
    // No key in the environment or in profile files: only instance metadata (IMDSv2) has them.
    let env: Vec<(&str, String)> = weed
        .env()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET"))
        .filter(|(k, _)| *k != "AWS_EC2_METADATA_DISABLED")
        .chain([("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url())])
        .collect();
    let prefix = unique_prefix();
    let mnt = mount_with_env(tmp.path(), &prefix, &env);
    fs::write(mnt.0.join("f"), b"signed with the instance's key").unwrap();
    drop(mnt);
    assert_eq!(
        object(weed, &format!("{prefix}/rooms/r1/f")),
        b"signed with the instance's key"
    );
    let asked = imds.requests();
    assert!(
        asked.iter().any(|r| r.starts_with("PUT /latest/api/token")),
        "no session token asked for: {asked:?}"
    );
    assert!(
        asked
            .iter()
            .any(|r| r.contains("/iam/security-credentials") && r.ends_with("roomfs-agents")),
        "the role's credentials were not asked for: {asked:?}"
    );
}

/// A minimal EC2 instance metadata service (IMDSv2) on a free local port that gives one role
/// `roomfs-agents` the key `(id, secret)`; it records each request as "METHOD PATH" and answers
/// 401 to a metadata GET without its session token. EC2 gives temporary keys with a session
/// token; SeaweedFS takes any session token for one of its own STS tokens and refuses the
/// request, so this one gives an empty token (which the SDK then does not send).
struct FakeImds {
    port: u16,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeImds {
    fn start(id: &str, secret: &str) -> FakeImds {
        use std::io::{BufRead, BufReader, Read};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let creds = format!(
            r#"{{"Code":"Success","Type":"AWS-HMAC","AccessKeyId":"{id}","SecretAccessKey":"{secret}","Token":"","Expiration":"{}","LastUpdated":"{}"}}"#,
            utc_rfc3339("+6 hours"),
            utc_rfc3339("now")
        );
        let seen = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (seen, creds) = (seen.clone(), creds.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut conn = conn;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut parts = line.split_whitespace();
                        let (method, path) = (
                            parts.next().unwrap_or("").to_string(),
                            parts.next().unwrap_or("").to_string(),
                        );
                        let (mut length, mut token) = (0usize, None);
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                                return;
                            }
                            let h = h.trim_end();
                            if h.is_empty() {
                                break;
                            }
                            let (name, value) = h.split_once(':').unwrap_or((h, ""));
                            match name.to_ascii_lowercase().as_str() {
                                "content-length" => length = value.trim().parse().unwrap_or(0),
                                "x-aws-ec2-metadata-token" => {
                                    token = Some(value.trim().to_string())
                                }
                                _ => {}
                            }
                        }
                        let mut body = vec![0; length];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        seen.lock().unwrap().push(format!("{method} {path}"));
                        let authorized = token.as_deref() == Some("roomfs-test-imds-token");
                        let (status, reply) = match (method.as_str(), path.as_str()) {
                            ("PUT", "/latest/api/token") => {
                                ("200 OK", "roomfs-test-imds-token".to_string())
                            }
                            ("GET", _) if !authorized => ("401 Unauthorized", String::new()),
                            (
                                "GET",
                                "/latest/meta-data/iam/security-credentials/"
                                | "/latest/meta-data/iam/security-credentials-extended/",
                            ) => ("200 OK", "roomfs-agents".to_string()),
                            (
                                "GET",
                                "/latest/meta-data/iam/security-credentials/roomfs-agents"
                                | "/latest/meta-data/iam/security-credentials-extended/roomfs-agents",
                            ) => ("200 OK", creds.clone()),
                            _ => ("404 Not Found", String::new()),
                        };
                        let head = format!(
                            "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\
                             X-aws-ec2-metadata-token-ttl-seconds: 21600\r\n\r\n",
                            reply.len()
                        );
                        if conn.write_all(head.as_bytes()).is_err()
                            || conn.write_all(reply.as_bytes()).is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        FakeImds { port, requests }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Now plus `offset` (a `date -d` phrase such as "+6 hours") as RFC 3339 in UTC.
fn utc_rfc3339(offset: &str) -> String {
    let out = output(Command::new("date").args(["-u", "-d", offset, "+%Y-%m-%dT%H:%M:%SZ"]));
    assert!(out.status.success(), "date: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn a_direct_url_downloads_the_object_from_the_store_without_credentials() {
    let h = two_hosts();
    fs::write(h.mb.join("report.md"), b"# the report\n").unwrap();
    let (code, out, err) = h.b.cli(&[
        "url",
        "--room",
        "r1",
        "report.md",
        "--direct",
        "--attachment",
        "--ttl",
        "5s",
    ]);
    assert_eq!(code, 0, "{err}");
    let url = out.trim();
    assert!(url.contains("X-Amz-Signature="), "a presigned URL: {url}");
    // curl has no credentials: the signature in the URL is all it has.
    let get = |url: &str| {
        let out = output(
            Command::new("curl")
                .args(["-s", "-D", "-", url])
                .env_clear(),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let answer = get(url);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-disposition: attachment; filename=\"report.md\""),
        "{answer}"
    );
    assert!(answer.ends_with("\r\n\r\n# the report\n"), "{answer}");
    // A path that is no file is refused before anything is signed; the URL expires.
    let (code, _, err) = h.b.cli(&["url", "--room", "r1", "nothing.md", "--direct"]);
    assert!(code == 1 && err.contains("no file"), "{err}");
    // (Signed with its time to the second: 5 s leave a loaded machine more than 4.)
    std::thread::sleep(Duration::from_millis(6100));
    let answer = get(url);
    assert!(answer.starts_with("HTTP/1.1 403"), "expired: {answer}");
}

#[test]
fn a_full_spool_is_enospc_at_the_write_and_the_previous_version_stays() {
    let bucket = Bucket::shared();
    let url = bucket.url("spool_bytes=4Mi");
    let m = Mounted::on(&["--room", "r1", "--store", &url], |_| {}, Some(bucket));
    fs::write(m.p("notes.txt"), b"the previous version\n").unwrap();
    // 6 MiB into a spool of 4: the write that passes the bound fails, the close commits
    // nothing, and readers keep the previous version.
    let out = python(
        &m.mnt,
        r#"
import os
f = open(os.environ['MNT'] + '/notes.txt', 'wb')
try:
    for i in range(6):
        f.write(b'x' * (1 << 20))
        f.flush()
    print('all written')
except OSError as e:
    print('write failed', e.errno)
try:
    f.close()
except OSError as e:
    print('close failed', e.errno)
"#,
    );
    assert!(
        out.starts_with(&format!("write failed {}\n", libc::ENOSPC)),
        "{out}"
    );
    assert_eq!(
        fs::read(m.p("notes.txt")).unwrap(),
        b"the previous version\n"
    );
    // Room comes back once the copy is gone: a small write goes through.
    fs::write(m.p("notes.txt"), b"new\n").unwrap();
    assert_eq!(fs::read(m.p("notes.txt")).unwrap(), b"new\n");
}

/// Unmounts `0` when dropped, also after a failed assertion (the helper's background server
/// then exits by itself).
struct UnmountOnDrop(PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        if common::is_mounted(&self.0) {
            let c = common::cstr(&self.0);
            if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

#[test]
fn the_mount_helper_mounts_a_room_in_the_bucket() {
    let weed = SeaweedFs::shared();
    let prefix = unique_prefix();
    let dir = tempfile::tempdir().unwrap();
    // mount(8) runs /sbin/mount.fuse.roomfs; the same program under that name here.
    let helper = dir.path().join("mount.fuse.roomfs");
    std::os::unix::fs::symlink(BIN, &helper).unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let opts = format!(
        "rw,store=s3://{}/{prefix},data_dir={},_netdev",
        weed.bucket(),
        dir.path().join("data").display()
    );
    // (stderr in a file: the background server would hold a pipe open.)
    let err = dir.path().join("helper.err");
    let status = Command::new(&helper)
        .args([
            Path::new("room:r1"),
            &mnt,
            Path::new("-o"),
            Path::new(&opts),
        ])
        .envs(weed.env())
        .stdin(std::process::Stdio::null())
        .stderr(File::create(&err).unwrap())
        .status()
        .unwrap();
    let _unmount = UnmountOnDrop(mnt.clone());
    assert!(status.success(), "{}", fs::read_to_string(&err).unwrap());
    fs::write(mnt.join("via-helper.txt"), b"hello").unwrap();
    assert_eq!(
        object(weed, &format!("{prefix}/rooms/r1/via-helper.txt")),
        b"hello"
    );
}
