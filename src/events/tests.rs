//! Events: their JSON forms, grant filtering, the in-process feed and the change log (two
//! `Logs` on one data dir stand for two processes: each has its own origin and thread).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::log::Logs;
use super::*;
use crate::grant::Grant;
use crate::space::{SpaceId, SpaceKind};
use crate::store::local::at::Dir;

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

fn who(name: &str) -> Arc<str> {
    Arc::from(name)
}

#[test]
fn records_round_trip_through_log_lines_even_with_names_that_are_not_utf8() {
    let odd = PathBuf::from(OsStr::from_bytes(b"dir/caf\xe9.txt"));
    let changes = [
        Changed::file(&odd, 7),
        Changed::file_deleted(&p("a")),
        Changed::FileMoved {
            from: p("a"),
            to: odd.clone(),
            size: 3,
        },
        Changed::folder_created(&p("d")),
        Changed::folder_deleted(&p("d")),
        Changed::FolderMoved {
            from: p("d"),
            to: p("e/f"),
        },
        Changed::attributes(&p("a")),
        Changed::Exchanged {
            a: p("a"),
            b: p("b"),
        },
    ];
    for (i, change) in changes.into_iter().enumerate() {
        let record = Record {
            seq: if change.is_event() { i as u64 + 1 } else { 0 },
            time: 1_763_700_000_000 + i as u64,
            participant: who("agent \"x\""),
            origin: Origin(0xfeed_beef),
            change,
        };
        let line = record.log_line();
        assert!(!line.contains('\n'));
        assert_eq!(Record::parse_log_line(line.as_bytes()), Some(record));
    }
    // The public form: MeshAgent's names; a name that is not UTF-8 also given exactly.
    let record = Record {
        seq: 4,
        time: 5,
        participant: who("api"),
        origin: Origin(1),
        change: Changed::file(&odd, 7),
    };
    let v = record.event_json("rooms/r1", &record.change);
    assert_eq!(v["type"], "file.updated");
    assert_eq!(v["space"], "rooms/r1");
    assert_eq!(v["seq"], 4);
    assert_eq!(v["size"], 7);
    assert_eq!(v["participant"], "api");
    assert_eq!(v["path"], "dir/caf\u{fffd}.txt");
    assert_eq!(v["path_base64"], "ZGlyL2NhZukudHh0");
    assert!(v.get("by").is_none(), "the origin is internal: {v}");
    let moved = Changed::FileMoved {
        from: p("a"),
        to: p("b"),
        size: 1,
    };
    let v = record.event_json("rooms/r1", &moved);
    assert_eq!(
        (v["type"].as_str(), v["source_path"].as_str()),
        (Some("file.moved"), Some("a"))
    );
    assert_eq!(v["destination_path"], "b");
    // Torn, foreign or inconsistent lines are not records.
    for bad in [
        &b"{\"seq\":1,\"type\":\"file.upd"[..],
        b"\0\0\0\0",
        b"{\"seq\":1,\"type\":\"attributes\",\"time\":1,\"participant\":\"a\",\"by\":\"1\",\"path\":\"a\"}",
        b"{\"type\":\"file.deleted\",\"time\":1,\"participant\":\"a\",\"by\":\"1\",\"path\":\"a\"}",
        b"{\"seq\":2,\"type\":\"file.exploded\",\"time\":1,\"participant\":\"a\",\"by\":\"1\"}",
    ] {
        assert_eq!(Record::parse_log_line(bad), None, "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn watchers_with_a_grant_see_only_what_it_shows_and_moves_across_it_as_they_look() {
    let grant = Grant::parse_cli(&["outputs/reports/:ro".into(), "shared/:rw".into()]).unwrap();
    let sees = |c: Changed| c.as_seen_by(&grant);
    assert_eq!(
        sees(Changed::file(&p("shared/a"), 1)),
        Some(Changed::file(&p("shared/a"), 1))
    );
    assert_eq!(sees(Changed::file(&p("secret/a"), 1)), None);
    assert_eq!(sees(Changed::file_deleted(&p("outputs/x"))), None);
    // Directories above granted paths are listed, so their comings and goings show.
    assert!(sees(Changed::folder_created(&p("outputs"))).is_some());
    assert!(sees(Changed::folder_created(&p("outputs/other"))).is_none());
    let mv = |from: &str, to: &str| Changed::FileMoved {
        from: p(from),
        to: p(to),
        size: 9,
    };
    assert_eq!(
        sees(mv("shared/a", "shared/b")),
        Some(mv("shared/a", "shared/b"))
    );
    assert_eq!(
        sees(mv("shared/a", "secret/a")),
        Some(Changed::file_deleted(&p("shared/a")))
    );
    assert_eq!(
        sees(mv("secret/a", "shared/a")),
        Some(Changed::file(&p("shared/a"), 9))
    );
    assert_eq!(sees(mv("secret/a", "secret/b")), None);
    let dmv = |from: &str, to: &str| Changed::FolderMoved {
        from: p(from),
        to: p(to),
    };
    assert_eq!(
        sees(dmv("secret/d", "shared/d")),
        Some(Changed::folder_created(&p("shared/d")))
    );
    assert_eq!(
        sees(dmv("shared/d", "secret/d")),
        Some(Changed::folder_deleted(&p("shared/d")))
    );
    // Internal records are nobody's events.
    assert_eq!(sees(Changed::attributes(&p("shared/a"))), None);
    assert_eq!(
        Changed::attributes(&p("a")).as_seen_by(&Grant::full()),
        None
    );
}

#[test]
fn the_in_process_feed_numbers_keeps_and_forgets_by_count() {
    let feed = MemFeed::new(Retention {
        max_events: Some(3),
        max_age_secs: None,
    });
    let mut rx = feed.subscribe();
    for i in 0..5 {
        let changes = [
            Changed::file(&p(&format!("f{i}")), i),
            Changed::attributes(&p("x")),
        ];
        feed.publish(&who("a"), &changes);
    }
    let seqs: Vec<u64> = (0..5).map(|_| rx.try_recv().unwrap().seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5], "attributes are no events");
    let b = feed.read(0, 100).unwrap();
    assert_eq!((b.oldest, b.head), (3, 5));
    assert_eq!(
        b.events.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [3, 4, 5]
    );
    assert_eq!(feed.read(4, 100).unwrap().events.len(), 1);
    assert_eq!(feed.read(0, 2).unwrap().events.len(), 2);
}

/// A data dir with two "processes" (their `Logs`) on it.
struct TwoProcesses {
    _tmp: tempfile::TempDir,
    path: PathBuf,
    a: Logs,
    b: Logs,
}

fn two_processes(retention: Retention) -> TwoProcesses {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("data");
    let data = Dir::open_trusted(&path, true).unwrap();
    TwoProcesses {
        a: Logs::open(&data, Some(retention)).unwrap(),
        b: Logs::open(&data, Some(retention)).unwrap(),
        path,
        _tmp: tmp,
    }
}

fn room(id: &str) -> SpaceId {
    SpaceId::new(SpaceKind::Room, id).unwrap()
}

/// Hears what another process did.
#[derive(Default)]
struct Heard(Mutex<Vec<Record>>);

impl ForeignChanges for Heard {
    fn heard(&self, record: &Record) {
        self.0.lock().unwrap().push(record.clone());
    }
}

impl Heard {
    fn wait_for(&self, n: usize) -> Vec<Record> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.0.lock().unwrap().clone();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn processes_on_one_data_dir_share_one_sequence_and_hear_each_other() {
    let t = two_processes(Retention::default());
    let r1 = room("r1");
    let (fa, fb) = (t.a.feed(&r1).unwrap(), t.b.feed(&r1).unwrap());
    let (heard_a, heard_b) = (Arc::new(Heard::default()), Arc::new(Heard::default()));
    fa.listen(Arc::downgrade(&heard_a) as _);
    fb.listen(Arc::downgrade(&heard_b) as _);
    let mut rx_b = fb.subscribe();
    for i in 0..20 {
        let (feed, who_) = if i % 2 == 0 { (&fa, "a") } else { (&fb, "b") };
        feed.publish(&who(who_), &[Changed::file(&p(&format!("f{i}")), i)]);
        if i % 5 == 0 {
            feed.publish(&who(who_), &[Changed::attributes(&p("f0"))]);
        }
        feed.flush();
    }
    // Each hears exactly the other's changes, internal records included, in order.
    let by_b = heard_a.wait_for(12);
    assert_eq!(by_b.len(), 12, "{by_b:?}");
    assert!(by_b.iter().all(|r| &*r.participant == "b"));
    let by_a = heard_b.wait_for(12);
    assert_eq!(by_a.len(), 12);
    assert!(by_a.iter().all(|r| &*r.participant == "a"));
    // One sequence: every event numbered once, in the order made.
    let b = fa.read(0, 100).unwrap();
    assert_eq!((b.oldest, b.head), (1, 20));
    let seqs: Vec<u64> = b.events.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    for r in &b.events {
        assert_eq!(
            r.change,
            Changed::file(&p(&format!("f{}", r.seq - 1)), r.seq - 1)
        );
    }
    // B's subscribers heard all 20 events, its own and A's, in order.
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 20 && Instant::now() < deadline {
        match rx_b.try_recv() {
            Ok(r) => got.push(r.seq),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    assert_eq!(got, (1..=20).collect::<Vec<_>>());
    // Another space's log is its own sequence.
    let r2 = t.b.feed(&room("r2")).unwrap();
    r2.publish(&who("b"), &[Changed::folder_created(&p("d"))]);
    r2.flush();
    assert_eq!(r2.read(0, 10).unwrap().head, 1);
    // A process started later reads on from where the log is.
    drop((fa, fb));
    let data = Dir::open_trusted(&t.path, false).unwrap();
    let c = Logs::open(&data, None).unwrap();
    let fc = c.feed(&r1).unwrap();
    fc.publish(&who("c"), &[Changed::file_deleted(&p("f1"))]);
    fc.flush();
    let b = fc.read(19, 10).unwrap();
    assert_eq!(b.events.iter().map(|r| r.seq).collect::<Vec<_>>(), [20, 21]);
}

#[test]
fn a_torn_last_line_is_ended_skipped_and_its_place_taken() {
    let t = two_processes(Retention::default());
    let r1 = room("r1");
    let fa = t.a.feed(&r1).unwrap();
    fa.publish(&who("a"), &[Changed::file(&p("x"), 1)]);
    fa.flush();
    // A crash in the middle of a write: half a line, no newline.
    let log = t.path.join("events/rooms/r1.log");
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, b"{\"seq\":2,\"type\":\"file.upd").unwrap();
    let fb = t.b.feed(&r1).unwrap();
    fb.publish(&who("b"), &[Changed::file(&p("y"), 2)]);
    fb.flush();
    fa.publish(&who("a"), &[Changed::file(&p("z"), 3)]);
    fa.flush();
    let events = fb.read(0, 10).unwrap().events;
    let got: Vec<(u64, Changed)> = events.iter().map(|r| (r.seq, r.change.clone())).collect();
    assert_eq!(
        got,
        [
            (1, Changed::file(&p("x"), 1)),
            (2, Changed::file(&p("y"), 2)),
            (3, Changed::file(&p("z"), 3)),
        ]
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("\"type\":\"file.upd\n"), "{text}");
}

#[test]
fn logs_are_compacted_to_what_retention_keeps_and_followers_read_on() {
    let retention = Retention {
        max_events: Some(10),
        max_age_secs: None,
    };
    let t = two_processes(retention);
    let r1 = room("r1");
    let (fa, fb) = (t.a.feed(&r1).unwrap(), t.b.feed(&r1).unwrap());
    let heard_b = Arc::new(Heard::default());
    fb.listen(Arc::downgrade(&heard_b) as _);
    let log = t.path.join("events/rooms/r1.log");
    for i in 1..=40u64 {
        fa.publish(&who("a"), &[Changed::file(&p(&format!("f{i}")), i)]);
        if i == 17 {
            fa.publish(&who("a"), &[Changed::attributes(&p("f17"))]);
        }
        fa.flush();
        // B reads on between A's compactions (each few events here); one that fell behind
        // by two compactions would have lost what came between (it says so in the log).
        heard_b.wait_for(i as usize + usize::from(i >= 17));
    }
    // Compaction writes a new file over the log (the inode number is no evidence: a freed
    // one comes back), starting after what it dropped.
    let text = std::fs::read_to_string(&log).unwrap();
    let header: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(
        header["base_seq"].as_u64().unwrap() > 0,
        "compacted: {header}"
    );
    let lines = text.lines().count();
    assert!(
        lines <= 17,
        "at most 1.5 times retention (and the header): {lines}"
    );
    for feed in [&fa, &fb] {
        let b = feed.read(0, 100).unwrap();
        assert_eq!(b.head, 40);
        assert!(b.oldest > 1 && b.oldest <= 31, "{}", b.oldest);
        assert_eq!(b.events.first().unwrap().seq, b.oldest);
        assert_eq!(b.events.last().unwrap().seq, 40);
    }
    // B heard each of A's changes exactly once, across the compactions.
    let heard = heard_b.wait_for(41);
    let seqs: Vec<u64> = heard.iter().filter(|r| r.seq > 0).map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
    assert_eq!(heard.iter().filter(|r| r.seq == 0).count(), 1);
    // B writes on after them.
    fb.publish(&who("b"), &[Changed::file_deleted(&p("f1"))]);
    fb.flush();
    assert_eq!(fa.read(40, 10).unwrap().events[0].seq, 41);
}

#[test]
fn a_deleted_space_starts_a_new_log() {
    let t = two_processes(Retention::default());
    let s1 = SpaceId::new(SpaceKind::Session, "s1").unwrap();
    let f = t.a.feed(&s1).unwrap();
    f.publish(&who("a"), &[Changed::folder_created(&p("d"))]);
    f.flush();
    assert!(t.path.join("events/sessions/s1.log").exists());
    drop(f);
    t.a.remove(&s1).unwrap();
    assert!(!t.path.join("events/sessions/s1.log").exists());
    let f = t.a.feed(&s1).unwrap();
    assert_eq!(f.read(0, 10).unwrap().head, 0);
}

#[test]
fn a_standalone_process_keeps_what_the_daemon_was_told_to_keep() {
    let tmp = tempfile::tempdir().unwrap();
    let data = Dir::open_trusted(&tmp.path().join("data"), true).unwrap();
    let log = tmp.path().join("data/events/rooms/r1.log");
    let header = || -> serde_json::Value {
        let text = std::fs::read_to_string(&log).unwrap();
        serde_json::from_str(text.lines().next().unwrap()).unwrap()
    };
    // No daemon ever ran: the default (10,000 events), so 40 events are all kept.
    let alone = Logs::open(&data, None).unwrap();
    let r1 = room("r1");
    let feed = alone.feed(&r1).unwrap();
    for i in 1..=40u64 {
        feed.publish(&who("m"), &[Changed::file(&p(&format!("f{i}")), i)]);
    }
    feed.flush();
    assert_eq!(header()["base_seq"], 0);
    drop((feed, alone));
    // The daemon starts with its configuration and records it...
    let kept = Retention {
        max_events: Some(10),
        max_age_secs: None,
    };
    let daemon = Logs::open(&data, Some(kept)).unwrap();
    let recorded = std::fs::read(tmp.path().join("data/events/retention.json")).unwrap();
    assert_eq!(
        serde_json::from_slice::<Retention>(&recorded).unwrap(),
        kept
    );
    // ... and a standalone mount started beside it compacts to that, not to its default.
    let alone = Logs::open(&data, None).unwrap();
    let feed = alone.feed(&r1).unwrap();
    feed.publish(&who("m"), &[Changed::file(&p("g"), 1)]);
    feed.flush();
    let base = header()["base_seq"].as_u64().unwrap();
    assert!(
        (31..=41 - 10).contains(&base),
        "kept at least 10 of 41: base {base}"
    );
    let backlog = feed.read(0, 100).unwrap();
    assert!(backlog.events.len() >= 10, "{}", backlog.events.len());
    assert_eq!(backlog.head, 41);
    drop(daemon);
    // An unreadable record is the default, said in the log, and nothing is compacted for it.
    std::fs::write(tmp.path().join("data/events/retention.json"), "{").unwrap();
    let alone = Logs::open(&data, None).unwrap();
    assert_eq!(alone.retention(), Retention::default());
}
