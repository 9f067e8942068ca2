//! Events and coherence across hosts, through the change feed kept in the bucket, on a real
//! engine (SeaweedFS, see `common::s3`): two or three daemons (`roomfs serve`), each with its
//! own data dir, on one bucket prefix, as hosts that share nothing but the bucket.
//!
//! - Every kind of operation made on one host shows in the other's `roomfs events` with the
//!   same `seq`s, in one order; a watcher resumes from a `seq` on either host; a follower on
//!   one hears the other's changes live; a watcher with a token sees the other host's events
//!   inside its grant only; the retention gap holds across hosts; an idle host makes one GET
//!   per open space and poll interval, and no other request.
//! - Forged feed objects (numbers near the end of `u64`, a jump towards `i64::MAX`, one over
//!   16 MiB) are skipped: after each, both hosts hear each other's changes, numbered on.
//! - Coherence: with the kernel's attribute and entry TTL at 60 s, a change closed on A shows
//!   on B's `stat`, `open` and `readdir` within seconds, through the invalidations the feed
//!   brings; a third host that does not follow the feed in that time (its poll interval set to
//!   a minute) still shows the old state, which is what B would show without them.
//! - `roomfs url --direct` gives a presigned GET of the object that `curl` downloads with
//!   the disposition asked for; refused outside the token's grant and for a room on the local
//!   disk.

mod common;

use std::fs;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::s3::{SeaweedFs, unique_prefix};
use common::{BIN, Bucket};
use serde_json::Value;

/// A daemon on `prefix` of the shared SeaweedFS; `store_options` go into its store URL,
/// `config` (JSON fields, without braces) into its configuration.
fn host(prefix: &str, store_options: &str, config: &str) -> Daemon {
    let s3 = SeaweedFs::shared();
    let url = Bucket::on(s3, prefix).url(store_options);
    let sep = if config.is_empty() { "" } else { ", " };
    let config = format!(r#"{{"store": "{url}", "session_store": "{url}"{sep}{config}}}"#);
    Daemon::on(Some(&config), Some(Bucket::on(s3, prefix)))
}

fn mounted(d: &Daemon, name: &str, args: &[&str]) -> PathBuf {
    let m = d.dir(name);
    d.mount(args, &m);
    m
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

/// Waits (up to 10 s) until `roomfs events ARGS` prints at least `n` lines; returns them.
fn events_at_least(d: &Daemon, args: &[&str], n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = events(d, args);
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (seq, type, path or source -> destination, participant) of each event.
fn summary(events: &[Value]) -> Vec<(u64, String, String, String)> {
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
                e["seq"].as_u64().unwrap_or(0),
                e["type"].as_str().unwrap().to_string(),
                path,
                e["participant"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

#[test]
fn every_kind_of_event_made_on_one_host_shows_on_the_other_with_the_same_seqs() {
    let prefix = unique_prefix();
    let keys = tempfile::tempdir().unwrap();
    let secret = keys.path().join("secret");
    fs::write(&secret, "events-across-hosts-secret-of-32-bytes-or-more\n").unwrap();
    let with_secret = format!(r#""secret_file": "{}""#, secret.display());
    let (a, b) = (host(&prefix, "", ""), host(&prefix, "", &with_secret));
    let ma = mounted(&a, "a", &["--room", "r1", "--label", "alice"]);
    let mb = mounted(&b, "b", &["--room", "r1", "--label", "bob"]);
    // A watcher on B following from the start hears A's events live.
    let mut follower = Command::new(BIN)
        .args(["events", "--room", "r1", "--follow", "--socket"])
        .arg(&b.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = follower.stdout.take().unwrap();
    let followed = std::thread::spawn(move || {
        let mut got = Vec::new();
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            got.push(serde_json::from_str::<Value>(&line).unwrap());
            if got.len() == 3 {
                break;
            }
        }
        got
    });
    // On A: a file written, appended to, moved into a new folder; a folder moved, removed.
    fs::write(ma.join("report.md"), b"# draft").unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(ma.join("report.md"))
        .unwrap()
        .write_all(b"\nmore")
        .unwrap();
    fs::create_dir(ma.join("outputs")).unwrap();
    fs::rename(ma.join("report.md"), ma.join("outputs/report.md")).unwrap();
    fs::create_dir(ma.join("tmp")).unwrap();
    fs::rename(ma.join("tmp"), ma.join("old")).unwrap();
    fs::remove_dir(ma.join("old")).unwrap();
    // On B, once it has heard of A's: a file made and deleted.
    let from_a = events_at_least(&b, &["--room", "r1"], 8);
    assert_eq!(from_a.len(), 8, "{from_a:#?}");
    fs::write(mb.join("scratch"), b"x").unwrap();
    fs::remove_file(mb.join("scratch")).unwrap();
    let s = |seq: u64, t: &str, p: &str, who: &str| (seq, t.to_string(), p.to_string(), who.into());
    let expected = vec![
        s(1, "file.updated", "report.md", "alice"),
        s(2, "file.updated", "report.md", "alice"),
        s(3, "file.updated", "report.md", "alice"),
        s(4, "folder.created", "outputs", "alice"),
        s(5, "file.moved", "report.md -> outputs/report.md", "alice"),
        s(6, "folder.created", "tmp", "alice"),
        s(7, "folder.moved", "tmp -> old", "alice"),
        s(8, "folder.deleted", "old", "alice"),
        s(9, "file.updated", "scratch", "bob"),
        s(10, "file.updated", "scratch", "bob"),
        s(11, "file.deleted", "scratch", "bob"),
    ];
    // The same events with the same seqs on both hosts.
    let on_b = events_at_least(&b, &["--room", "r1"], 11);
    assert_eq!(summary(&on_b), expected, "{on_b:#?}");
    let on_a = events_at_least(&a, &["--room", "r1"], 11);
    assert_eq!(summary(&on_a), expected, "{on_a:#?}");
    assert_eq!(on_a, on_b, "the same lines, times included");
    let sizes: Vec<u64> = on_b[..3]
        .iter()
        .map(|e| e["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [0, 7, 12], "create, close, append");
    // Resume from a seq on either host: exactly what follows it.
    assert_eq!(
        summary(&events(&b, &["--room", "r1", "--since", "7"])),
        expected[7..]
    );
    assert_eq!(
        summary(&events(&a, &["--room", "r1", "--since", "10"])),
        expected[10..]
    );
    // A watcher on B with a token sees A's events inside its grant only; the move into it
    // is the arrival it looks like from inside.
    let token = common::issue_token(
        &secret,
        &["--room", "r1", "--path", "outputs/:ro", "--name", "viewer"],
    );
    assert_eq!(
        summary(&events(&b, &["--room", "r1", "--token", &token])),
        [
            s(4, "folder.created", "outputs", "alice"),
            s(5, "file.updated", "outputs/report.md", "alice"),
        ]
    );
    // The follower on B heard A's first events as they came.
    let live = followed.join().unwrap();
    let _ = follower.kill();
    let _ = follower.wait();
    assert_eq!(summary(&live), expected[..3]);
    // The feed's objects are not files of the room, on either mount or in its keys.
    let names = |m: &PathBuf| {
        let mut v: Vec<String> = fs::read_dir(m)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&ma), ["outputs"]);
    assert_eq!(names(&mb), ["outputs"]);
    let bucket = b.s3.as_ref().unwrap();
    let feed_keys = bucket.keys(&format!("{prefix}/.roomfs/events/rooms/r1/"));
    assert!(!feed_keys.is_empty());
    assert!(
        bucket
            .keys(&format!("{prefix}/rooms/r1/"))
            .iter()
            .all(|k| !k.contains(".roomfs/events")),
    );
}

#[test]
fn the_retention_gap_holds_across_hosts() {
    let prefix = unique_prefix();
    let retention = r#""event_retention": {"max_events": 5}"#;
    let (a, b) = (host(&prefix, "", retention), host(&prefix, "", retention));
    let ma = mounted(&a, "a", &["--room", "r1"]);
    for i in 0..20 {
        fs::write(ma.join(format!("f{i}")), b"").unwrap();
    }
    // A's own view, once everything it published is in the bucket: a gap, then the tail.
    let on_a = events(&a, &["--room", "r1"]);
    assert_eq!(on_a[0]["type"], "events.gap", "{on_a:#?}");
    let head = on_a[0]["head_seq"].as_u64().unwrap();
    assert!(head >= 20, "{on_a:#?}");
    // B reads the same from the bucket.
    let all = events(&b, &["--room", "r1"]);
    assert_eq!(all[0]["type"], "events.gap", "{all:#?}");
    assert_eq!(all[0]["head_seq"], head, "{all:#?}");
    let oldest = all[0]["oldest_seq"].as_u64().unwrap();
    assert!(oldest > 1 && head + 1 - oldest >= 5, "{all:#?}");
    let seqs: Vec<u64> = all[1..]
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (oldest..=head).collect::<Vec<_>>());
    assert_eq!(all[all.len() - 1]["path"], "f19");
    // From within what is retained: no gap.
    let tail = events(&b, &["--room", "r1", "--since", &(head - 3).to_string()]);
    assert_eq!(
        summary(&tail).iter().map(|e| e.0).collect::<Vec<_>>(),
        [head - 2, head - 1, head]
    );
    // From before it: told on both hosts.
    assert_eq!(
        events(&a, &["--room", "r1", "--since", "1"])[0]["type"],
        "events.gap"
    );
    assert_eq!(
        events(&b, &["--room", "r1", "--since", "1"])[0]["type"],
        "events.gap"
    );
}

#[test]
fn a_change_on_one_host_reaches_the_others_kernel_cache_at_once() {
    let prefix = unique_prefix();
    let ttl = r#""cache_ttl_secs": 60"#;
    let a = host(&prefix, "", ttl);
    let b = host(&prefix, "", ttl);
    // The control: a host that does not look at the feed for a minute.
    let c = host(&prefix, "events_poll_secs=60", ttl);
    let ma = mounted(&a, "a", &["--room", "r1"]);
    let mb = mounted(&b, "b", &["--room", "r1"]);
    fs::create_dir(ma.join("d")).unwrap();
    fs::write(ma.join("f"), b"one").unwrap();
    let mc = mounted(&c, "c", &["--room", "r1"]);
    // B looks: its kernel caches the entries, attributes, pages and listings.
    eventually("B sees A's files", Duration::from_secs(5), || {
        mb.join("f").exists() && mb.join("d").is_dir()
    });
    assert_eq!(fs::read(mb.join("f")).unwrap(), b"one");
    assert_eq!(fs::read_dir(mb.join("d")).unwrap().count(), 0);
    // C stats f only (a read would have the kernel ask for the atime again, and a listing
    // is asked of the daemon each time: either would reach C's store).
    assert_eq!(fs::metadata(mc.join("f")).unwrap().len(), 3);
    // A stat, no open: only an invalidation shows the new size.
    fs::write(ma.join("f"), b"the second version").unwrap();
    let took = eventually("B's stat", Duration::from_secs(5), || {
        fs::metadata(mb.join("f")).unwrap().len() == 18
    });
    eprintln!("B's stat showed A's change after {took:?}");
    assert_eq!(fs::read(mb.join("f")).unwrap(), b"the second version");
    fs::write(ma.join("d/new"), b"n").unwrap();
    eventually("B's readdir", Duration::from_secs(5), || {
        fs::read_dir(mb.join("d")).unwrap().count() == 1
    });
    // A new version of the same size: only the pages' invalidation shows it.
    fs::write(ma.join("f"), b"THE SECOND VERSION").unwrap();
    eventually("B's open", Duration::from_secs(5), || {
        fs::read(mb.join("f")).unwrap() == b"THE SECOND VERSION"
    });
    // Renames and removals.
    fs::rename(ma.join("f"), ma.join("g")).unwrap();
    eventually("B sees the rename", Duration::from_secs(5), || {
        !mb.join("f").exists() && mb.join("g").exists()
    });
    assert_eq!(fs::read(mb.join("g")).unwrap(), b"THE SECOND VERSION");
    fs::remove_file(mb.join("g")).unwrap();
    eventually("A sees B's removal", Duration::from_secs(5), || {
        !ma.join("g").exists()
    });
    // C, not following, still shows what it cached, though its store's own memory (1 s) has
    // long expired and f is gone: without the invalidations B would show this too.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(fs::metadata(mc.join("f")).unwrap().len(), 3);
    // A file open on B keeps its version; its attributes show the new one.
    fs::write(ma.join("h"), b"old").unwrap();
    eventually("B sees h", Duration::from_secs(5), || mb.join("h").exists());
    let held = fs::File::open(mb.join("h")).unwrap();
    let mut first = [0u8; 3];
    std::io::Read::read_exact(&mut &held, &mut first).unwrap();
    fs::write(ma.join("h"), b"newer").unwrap();
    eventually("B's stat of the open file", Duration::from_secs(5), || {
        fs::metadata(mb.join("h")).unwrap().len() == 5
    });
    assert_eq!(&first, b"old");
    drop(held);
    assert_eq!(fs::read(mb.join("h")).unwrap(), b"newer");
}

/// `roomfs url ARGS`: the URL, or the error.
fn url(d: &Daemon, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["url"];
    all.extend_from_slice(args);
    let (code, out, err) = d.cli(&all);
    if code == 0 {
        Ok(out.trim().to_string())
    } else {
        Err(err)
    }
}

/// `curl -s URL`: (status, lower-cased headers, body).
fn curl(url: &str) -> (u16, String, Vec<u8>) {
    let tmp = tempfile::tempdir().unwrap();
    let (headers, body) = (tmp.path().join("h"), tmp.path().join("b"));
    let out = Command::new("curl")
        .args(["-s", "-o"])
        .arg(&body)
        .arg("-D")
        .arg(&headers)
        .args(["-w", "%{http_code}"])
        .arg(url)
        .output()
        .expect("curl runs");
    let status = String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0);
    (
        status,
        fs::read_to_string(&headers)
            .unwrap_or_default()
            .to_ascii_lowercase(),
        fs::read(&body).unwrap_or_default(),
    )
}

#[test]
fn direct_urls_are_presigned_gets_of_the_object() {
    let keys = tempfile::tempdir().unwrap();
    let secret = keys.path().join("secret");
    fs::write(&secret, "direct-url-test-secret-of-32-bytes-or-more\n").unwrap();
    let secret_cfg = format!(r#""secret_file": "{}""#, secret.display());
    let d = host(&unique_prefix(), "", &secret_cfg);
    let m = mounted(&d, "m", &["--room", "r1"]);
    fs::create_dir(m.join("outputs")).unwrap();
    let body: Vec<u8> = (0..3u32 << 20).map(|i| (i * 13 % 251) as u8).collect();
    fs::write(m.join("outputs/report é.bin"), &body).unwrap();
    fs::write(m.join("private.txt"), b"no").unwrap();
    // Without credentials, from the object store itself; the daemon serves no downloads.
    let u = url(
        &d,
        &[
            "--room",
            "r1",
            "outputs/report é.bin",
            "--direct",
            "--attachment",
            "--ttl",
            "5m",
        ],
    )
    .unwrap();
    let endpoint = &d.s3.as_ref().unwrap().endpoint;
    assert!(u.starts_with(endpoint.as_str()), "{u}");
    assert!(u.contains("X-Amz-Expires=300"), "{u}");
    let (status, headers, got) = curl(&u);
    assert_eq!(status, 200, "{headers}");
    assert!(got == body, "the object's bytes");
    let disposition = headers
        .lines()
        .find_map(|l| l.strip_prefix("content-disposition: "))
        .unwrap_or_default();
    assert!(
        disposition.starts_with("attachment;")
            && disposition.contains("filename*=utf-8''report%20%c3%a9.bin"),
        "{disposition}"
    );
    // Inline by default.
    let inline = url(&d, &["--room", "r1", "private.txt", "--direct"]).unwrap();
    let (status, headers, got) = curl(&inline);
    assert_eq!((status, got.as_slice()), (200, &b"no"[..]), "{headers}");
    assert!(
        headers.contains("content-disposition: inline;"),
        "{headers}"
    );
    // A URL whose signature does not match what it asks (another key) is refused.
    let forged = inline.replace("private.txt", "outputs/report%20%C3%A9.bin");
    assert_eq!(curl(&forged).0, 403);
    // (Expiry: tests/s3_store.rs.)
    // With a token, only inside its grant.
    let token = common::issue_token(
        &secret,
        &["--room", "r1", "--path", "outputs/:ro", "--name", "viewer"],
    );
    let inside = url(
        &d,
        &[
            "--room",
            "r1",
            "outputs/report é.bin",
            "--direct",
            "--token",
            &token,
        ],
    );
    assert_eq!(curl(&inside.unwrap()).2, body);
    let outside = url(
        &d,
        &["--room", "r1", "private.txt", "--direct", "--token", &token],
    );
    let err = outside.unwrap_err();
    assert!(err.contains("outside the token's grant"), "{err}");
    // A missing file: no URL.
    let err = url(&d, &["--room", "r1", "nope.txt", "--direct"]).unwrap_err();
    assert!(err.contains("no file"), "{err}");
    // A room on the local disk has no object store to presign.
    let local = Daemon::on(None, None);
    let lm = mounted(&local, "m", &["--room", "r1"]);
    fs::write(lm.join("a.txt"), b"a").unwrap();
    let err = url(&local, &["--room", "r1", "a.txt", "--direct"]).unwrap_err();
    assert!(
        err.contains("direct URLs come from an object store"),
        "{err}"
    );
}

/// The daemon's count of requests to the store, by operation (from its metrics).
fn backend_requests(d: &Daemon) -> std::collections::BTreeMap<String, u64> {
    let (code, out, err) = d.cli(&["metrics"]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .filter_map(|l| l.strip_prefix("roomfs_backend_requests_total{op=\""))
        .map(|l| {
            let (op, rest) = l.split_once('"').unwrap();
            (
                op.to_string(),
                rest.rsplit(' ').next().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn an_idle_host_makes_one_get_per_open_space_and_poll_interval() {
    // What following the feed costs while nothing changes: the number of requests is the
    // design's (doc/S3.md), counted, not timed.
    let prefix = unique_prefix();
    let d = host(&prefix, "events_poll_secs=0.2", "");
    let m = mounted(&d, "m", &["--room", "r1"]);
    fs::write(m.join("f"), b"x").unwrap();
    let m2 = mounted(&d, "m2", &["--room", "r2"]);
    fs::write(m2.join("g"), b"y").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before = backend_requests(&d);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let after = backend_requests(&d);
    let secs = t0.elapsed().as_secs_f64();
    let delta: std::collections::BTreeMap<&str, u64> = after
        .iter()
        .map(|(op, n)| (op.as_str(), n - before.get(op).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    // Two open spaces, one look each every 0.2 s: at most 10 GETs a second (fewer when the
    // looks themselves are slow: the interval runs from the end of a round), and nothing else.
    let gets = delta.get("feed_get").copied().unwrap_or(0) as f64 / secs;
    assert!((2.0..=11.0).contains(&gets), "{gets} GETs/s: {delta:?}");
    assert_eq!(delta.keys().collect::<Vec<_>>(), [&"feed_get"], "{delta:?}");
}

#[test]
fn a_file_deleted_or_replaced_on_one_host_while_another_writes_it_stays_so_once_heard() {
    use std::io::Write;
    let prefix = unique_prefix();
    let ttl = r#""cache_ttl_secs": 60"#;
    let (a, b) = (host(&prefix, "", ttl), host(&prefix, "", ttl));
    let ma = mounted(&a, "a", &["--room", "r1"]);
    let mb = mounted(&b, "b", &["--room", "r1"]);
    let within = Duration::from_secs(10);
    // Deleted on A while B writes it: once B has heard, B's close does not bring it back.
    fs::write(ma.join("gone"), b"first").unwrap();
    eventually("B sees it", within, || mb.join("gone").exists());
    let mut writer = fs::OpenOptions::new()
        .write(true)
        .open(mb.join("gone"))
        .unwrap();
    writer.write_all(b"writer").unwrap();
    fs::remove_file(ma.join("gone")).unwrap();
    heard_all(&ma, &mb);
    assert!(!mb.join("gone").exists());
    writer.write_all(b"+more").unwrap();
    drop(writer);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!ma.join("gone").exists());
    assert!(!mb.join("gone").exists());
    // Replaced on A by a save through rename: B's writer does not overwrite the save.
    fs::write(ma.join("doc"), b"orig").unwrap();
    fs::write(ma.join("doc.tmp"), b"replacement").unwrap();
    eventually("B sees doc", within, || mb.join("doc").exists());
    let mut writer = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mb.join("doc"))
        .unwrap();
    // (Written before the save: on S3 the old version's bytes are gone with it, and a
    // working copy not yet made of them fails with EIO.)
    writer.write_all(b"XX").unwrap();
    fs::rename(ma.join("doc.tmp"), ma.join("doc")).unwrap();
    heard_all(&ma, &mb);
    assert_eq!(fs::metadata(mb.join("doc")).unwrap().len(), 11);
    writer.write_all(b"YY").unwrap();
    drop(writer);
    assert_eq!(fs::read(ma.join("doc")).unwrap(), b"replacement");
    assert_eq!(fs::read(mb.join("doc")).unwrap(), b"replacement");
}

/// Waits until host `b` has heard of every change made on host `a` so far (changes are heard
/// in order): `a` replaces a mark file by a rename while `b` holds it open, and only hearing
/// that gives the name a new inode on `b` (a look-up alone finds the old one, its attributes
/// cached for a minute). Each call writes bytes of its own: on S3 a version is told by its
/// ETag, the MD5 of its bytes, so a mark replaced by the same bytes as the one `b` holds is
/// the version `b` holds.
fn heard_all(a: &std::path::Path, b: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicU32, Ordering};
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    let within = Duration::from_secs(10);
    fs::write(a.join(".mark"), format!("m{n}")).unwrap();
    eventually("B sees the mark", within, || b.join(".mark").exists());
    let held = fs::File::open(b.join(".mark")).unwrap();
    let ino = held.metadata().unwrap().ino();
    fs::write(a.join(".mark.new"), format!("n{n}")).unwrap();
    fs::rename(a.join(".mark.new"), a.join(".mark")).unwrap();
    eventually("B hears A's changes", within, || {
        fs::metadata(b.join(".mark")).is_ok_and(|m| m.ino() != ino)
    });
}

#[test]
fn a_directory_removed_on_one_host_lists_empty_for_a_shell_in_it_on_the_other() {
    let prefix = unique_prefix();
    let ttl = r#""cache_ttl_secs": 60"#;
    let (a, b) = (host(&prefix, "", ttl), host(&prefix, "", ttl));
    let ma = mounted(&a, "a", &["--room", "r1"]);
    let mb = mounted(&b, "b", &["--room", "r1"]);
    fs::create_dir_all(ma.join("d/sub")).unwrap();
    eventually("B sees d/sub", Duration::from_secs(10), || {
        mb.join("d/sub").is_dir()
    });
    let go = a.dir("go");
    let shell = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while [ ! -e {}/now ]; do sleep 0.02; done; stat -c %h:%F . && ls -a && ls -a ..; \
             echo rc=$?",
            go.display()
        ))
        .current_dir(mb.join("d/sub"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    fs::remove_dir_all(ma.join("d")).unwrap();
    heard_all(&ma, &mb);
    fs::write(go.join("now"), b"").unwrap();
    let out = shell.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(stdout, "0:directory\nrc=0\n", "{stderr}");
    assert!(!mb.join("d").exists());
}

/// Objects anyone who can write the bucket may put in a feed, at the next number: numbers near
/// the end of `u64`, a jump towards `i64::MAX`, an object over 16 MiB. Each is skipped: after
/// each, changes on either host are heard by the other, numbered on from the real head.
#[test]
fn forged_feed_objects_are_skipped_and_the_feed_goes_on() {
    let prefix = unique_prefix();
    let (a, b) = (host(&prefix, "", ""), host(&prefix, "", ""));
    let ma = mounted(&a, "a", &["--room", "r1"]);
    let mb = mounted(&b, "b", &["--room", "r1"]);
    let bucket = b.s3.as_ref().unwrap();
    let feed = format!("{prefix}/.roomfs/events/rooms/r1/");
    let batch = |seq: u64| {
        let t = 1_796_562_172_190u64;
        format!(
            "{{\"roomfs_feed\":1,\"first\":{seq},\"head\":{seq},\"time\":{t}}}\n\
             {{\"by\":\"x\",\"participant\":\"x\",\"path\":\"forged.txt\",\"seq\":{seq},\
             \"time\":{t},\"type\":\"file.created\"}}\n"
        )
        .into_bytes()
    };
    let mut big = batch(2);
    big.resize((16 << 20) + 1, b' ');
    let forged = [batch(u64::MAX - 1), big, batch(i64::MAX as u64 - 1)];
    let paths = |d: &Daemon| -> Vec<(u64, String)> {
        events(d, &["--room", "r1"])
            .iter()
            .map(|e| {
                let s = &summary(std::slice::from_ref(e))[0];
                (s.0, s.2.clone())
            })
            .collect()
    };
    let mut want: Vec<String> = Vec::new();
    for (i, body) in forged.iter().enumerate() {
        let n = bucket.keys(&feed).len() + 1;
        bucket.put(&format!("{feed}{n:020}"), body);
        fs::write(ma.join(format!("a{i}")), b"a").unwrap();
        fs::write(mb.join(format!("b{i}")), b"b").unwrap();
        want.extend([format!("a{i}"), format!("b{i}")]);
        for (d, other) in [(&a, "A"), (&b, "B")] {
            eventually(
                &format!("{other} lists both changes after forged object {i}"),
                Duration::from_secs(10),
                || {
                    let seen = paths(d);
                    want.iter().all(|w| seen.iter().any(|(_, p)| p == w))
                },
            );
        }
    }
    // One numbering on both, whole, with nothing of the forged objects.
    let (on_a, on_b) = (paths(&a), paths(&b));
    assert_eq!(on_a, on_b);
    let seqs: Vec<u64> = on_a.iter().map(|e| e.0).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "{on_a:?}"
    );
    assert!(on_a.iter().all(|(_, p)| p != "forged.txt"), "{on_a:?}");
}
