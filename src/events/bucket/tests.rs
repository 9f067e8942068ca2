//! The bucket feed between "hosts": several [`BucketFeeds`] on one in-memory bucket (with
//! AWS's conditional-write rules), each with its own origin, as daemons on different hosts.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::space::{SpaceId, SpaceKind};
use crate::store::s3::mock::MemClient;

fn host(client: &Arc<MemClient>, retention: Retention) -> BucketFeeds {
    BucketFeeds::start(
        client.clone(),
        "p",
        true,
        retention,
        Duration::from_millis(10),
    )
    .unwrap()
}

fn room() -> SpaceId {
    SpaceId::new(SpaceKind::Room, "r1").unwrap()
}

fn file(p: &str) -> Changed {
    Changed::file(std::path::Path::new(p), 1)
}

/// (seq, type, path) of every event `feed` retains after `since`.
fn events(feed: &BucketFeed, since: u64) -> Vec<(u64, String, String)> {
    let b = feed.read(since, usize::MAX).unwrap();
    b.events
        .iter()
        .map(|r| {
            let json = r.event_json("rooms/r1", &r.change);
            (
                r.seq,
                r.change.type_name().to_string(),
                json.get("path")
                    .or(json.get("destination_path"))
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

#[derive(Default)]
struct Heard(Mutex<Vec<Changed>>);

impl ForeignChanges for Heard {
    fn heard(&self, record: &Record) {
        self.0.lock().unwrap().push(record.change.clone());
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(5), "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn hosts_share_one_order_of_events_and_hear_each_other() {
    let client = Arc::new(MemClient::new());
    let (a, b) = (
        host(&client, Retention::default()),
        host(&client, Retention::default()),
    );
    let (fa, fb) = (a.feed(&room()).unwrap(), b.feed(&room()).unwrap());
    let heard_b = Arc::new(Heard::default());
    fb.listen(Arc::downgrade(&heard_b) as Weak<dyn ForeignChanges>);
    let heard_a = Arc::new(Heard::default());
    fa.listen(Arc::downgrade(&heard_a) as Weak<dyn ForeignChanges>);
    let (pa, pb): (Arc<str>, Arc<str>) = (Arc::from("alice"), Arc::from("bob"));
    fa.publish(&pa, &[file("a1"), Changed::attributes("a1".as_ref())]);
    fa.flush();
    fb.publish(&pb, &[file("b1"), Changed::file_deleted("a1".as_ref())]);
    fb.flush();
    fa.publish(&pa, &[file("a2")]);
    fa.flush();
    let want = vec![
        (1, "file.updated".to_string(), "a1".to_string()),
        (2, "file.updated".into(), "b1".into()),
        (3, "file.deleted".into(), "a1".into()),
        (4, "file.updated".into(), "a2".into()),
    ];
    assert_eq!(events(&fa, 0), want);
    assert_eq!(events(&fb, 0), want);
    assert_eq!(events(&fb, 2), want[2..].to_vec());
    // Each hears the other's changes (internal records too), never its own.
    wait_until("B hears A's three changes", || {
        heard_b.0.lock().unwrap().len() == 3
    });
    assert_eq!(
        *heard_b.0.lock().unwrap(),
        vec![file("a1"), Changed::attributes("a1".as_ref()), file("a2")]
    );
    wait_until("A hears B's two changes", || {
        heard_a.0.lock().unwrap().len() == 2
    });
    // The feed's objects are outside every space's keys.
    let keys = client.keys();
    assert!(!keys.is_empty());
    for k in &keys {
        if k.contains("/.roomfs/events/") {
            assert!(k.starts_with("p/.roomfs/events/rooms/r1/"), "{k}");
        }
    }
    // A third host, opened now, reads the same history.
    let c = host(&client, Retention::default());
    assert_eq!(events(&c.feed(&room()).unwrap(), 0), want);
}

#[test]
fn racing_hosts_number_every_event_once() {
    let client = Arc::new(MemClient::new());
    let hosts: Vec<BucketFeeds> = (0..3)
        .map(|_| host(&client, Retention::default()))
        .collect();
    let feeds: Vec<Arc<BucketFeed>> = hosts.iter().map(|h| h.feed(&room()).unwrap()).collect();
    std::thread::scope(|s| {
        for (i, f) in feeds.iter().enumerate() {
            s.spawn(move || {
                let p: Arc<str> = Arc::from(format!("h{i}"));
                for j in 0..40 {
                    f.publish(&p, &[file(&format!("h{i}/{j}"))]);
                    if j % 7 == 0 {
                        f.flush();
                    }
                }
                f.flush();
            });
        }
    });
    let first = events(&feeds[0], 0);
    assert_eq!(first.len(), 120);
    for (i, e) in first.iter().enumerate() {
        assert_eq!(e.0, i as u64 + 1);
    }
    let mut paths: Vec<&str> = first.iter().map(|e| e.2.as_str()).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), 120, "every event once");
    // Each host's own events keep their order.
    for i in 0..3 {
        let mine: Vec<&str> = first
            .iter()
            .map(|e| e.2.as_str())
            .filter(|p| p.starts_with(&format!("h{i}/")))
            .collect();
        let want: Vec<String> = (0..40).map(|j| format!("h{i}/{j}")).collect();
        assert_eq!(mine, want);
    }
    for f in &feeds[1..] {
        assert_eq!(events(f, 0), first);
    }
}

#[test]
fn retention_compacts_the_chain_and_a_late_reader_is_told_of_the_gap() {
    let client = Arc::new(MemClient::new());
    let retention = Retention {
        max_events: Some(10),
        max_age_secs: None,
    };
    let a = host(&client, retention);
    let fa = a.feed(&room()).unwrap();
    let p: Arc<str> = Arc::from("a");
    for i in 0..60 {
        fa.publish(&p, &[file(&format!("f{i}"))]);
        fa.flush();
    }
    let objects = client
        .keys()
        .iter()
        .filter(|k| k.starts_with("p/.roomfs/events/"))
        .count();
    assert!(objects <= 16, "{objects} objects left");
    let b = host(&client, retention);
    let fb = b.feed(&room()).unwrap();
    let backlog = fb.read(0, usize::MAX).unwrap();
    assert_eq!(backlog.head, 60);
    assert!(
        backlog.oldest > 1 && backlog.oldest <= 51,
        "{}",
        backlog.oldest
    );
    // At least what retention keeps, in order, up to the head.
    let seqs: Vec<u64> = backlog.events.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (backlog.oldest..=60).collect::<Vec<_>>());
    // Resuming from within what is retained gives exactly what follows.
    assert_eq!(
        fb.read(55, usize::MAX)
            .unwrap()
            .events
            .iter()
            .map(|r| r.seq)
            .collect::<Vec<_>>(),
        (56..=60).collect::<Vec<_>>()
    );
}

/// A host stalled (stopped, or cut off from the bucket) while the others wrote on and compacted
/// the objects it had not read: it goes on from the first object left, rather than waiting for
/// a compacted object for good or writing its batch there, where no other host reads.
#[test]
fn a_host_left_behind_by_a_compaction_goes_on_from_what_is_left() {
    let client = Arc::new(MemClient::new());
    let retention = Retention {
        max_events: Some(10),
        max_age_secs: None,
    };
    let (a, b) = (host(&client, retention), host(&client, retention));
    let (fa, fb) = (a.feed(&room()).unwrap(), b.feed(&room()).unwrap());
    let heard_a = Arc::new(Heard::default());
    fa.listen(Arc::downgrade(&heard_a) as Weak<dyn ForeignChanges>);
    let heard_b = Arc::new(Heard::default());
    fb.listen(Arc::downgrade(&heard_b) as Weak<dyn ForeignChanges>);
    let (pa, pb): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
    fa.publish(&pa, &[file("first")]);
    fa.flush();
    wait_until("b hears the first", || heard_b.0.lock().unwrap().len() == 1);
    // B's thread stalls (as when its process is stopped) while A writes 60 events.
    let stalled = lock(&fb.chain);
    for i in 0..60 {
        fa.publish(&pa, &[file(&format!("f{i}"))]);
        fa.flush();
    }
    assert!(
        client
            .keys()
            .iter()
            .filter(|k| k.ends_with(&format!("{:020}", 2)))
            .count()
            == 0,
        "object 2 was compacted away"
    );
    std::thread::sleep(STALL_MIN + Duration::from_millis(100));
    drop(stalled);
    // B goes on from what is left and hears A's later changes.
    wait_until("b reads on past the gap", || {
        fb.read(0, usize::MAX).unwrap().head == 61
    });
    fa.publish(&pa, &[file("after")]);
    fa.flush();
    wait_until("b hears A after the gap", || {
        heard_b.0.lock().unwrap().last() == Some(&file("after"))
    });
    // What B writes now goes on the chain A reads, numbered on from A's events.
    fb.publish(&pb, &[file("from-b")]);
    fb.flush();
    wait_until("a hears b", || {
        heard_a.0.lock().unwrap().last() == Some(&file("from-b"))
    });
    let seen = events(&fa, 61);
    assert_eq!(
        seen.iter().map(|e| (e.0, e.2.as_str())).collect::<Vec<_>>(),
        vec![(62, "after"), (63, "from-b")]
    );
    // A watcher of B resuming from before what is left is told of the gap.
    let backlog = fb.read(0, usize::MAX).unwrap();
    assert!(backlog.oldest > 2, "{}", backlog.oldest);
    assert_eq!(backlog.head, 63);
}

#[test]
fn a_failed_write_is_retried_and_nothing_is_lost() {
    use crate::store::s3::mock::Op;
    let client = Arc::new(MemClient::new());
    let a = host(&client, Retention::default());
    let fa = a.feed(&room()).unwrap();
    client.fail(Op::Put, Some(".roomfs/events/"), Failure::Unavailable, 3);
    let p: Arc<str> = Arc::from("a");
    fa.publish(&p, &[file("x"), file("y")]);
    fa.flush();
    let b = host(&client, Retention::default());
    let seen = events(&b.feed(&room()).unwrap(), 0);
    assert_eq!(
        seen.iter().map(|e| (e.0, e.2.as_str())).collect::<Vec<_>>(),
        vec![(1, "x"), (2, "y")]
    );
}

/// A batch whose PUT was reported failed but landed (a request that timed out and ran when
/// the store woke up) is taken as written when the chain is read: its changes are not
/// written a second time under new seqs.
#[test]
fn a_batch_that_landed_though_its_put_failed_is_not_written_twice() {
    let client = Arc::new(MemClient::new());
    let a = host(&client, Retention::default());
    let fa = a.feed(&room()).unwrap();
    client.lose_put_replies(".roomfs/events/", 1);
    let p: Arc<str> = Arc::from("a");
    fa.publish(&p, &[file("x"), file("y")]);
    fa.flush();
    fa.publish(&p, &[file("z")]);
    fa.flush();
    let b = host(&client, Retention::default());
    let seen = events(&b.feed(&room()).unwrap(), 0);
    assert_eq!(
        seen.iter().map(|e| (e.0, e.2.as_str())).collect::<Vec<_>>(),
        vec![(1, "x"), (2, "y"), (3, "z")]
    );
    assert_eq!(events(&fa, 0).len(), 3);
}

#[test]
fn what_is_published_before_the_feed_goes_is_written() {
    let client = Arc::new(MemClient::new());
    let a = BucketFeeds::start(
        client.clone(),
        "p",
        true,
        Retention::default(),
        Duration::from_secs(60),
    )
    .unwrap();
    let fa = a.feed(&room()).unwrap();
    // Queued without waking the thread, which looks once a minute: only the drop writes it.
    fa.queue
        .lock()
        .unwrap()
        .changes
        .push_back((Arc::from("a"), file("last")));
    drop(fa);
    let b = host(&client, Retention::default());
    let fb = b.feed(&room()).unwrap();
    wait_until("the last change is written", || !events(&fb, 0).is_empty());
    assert_eq!(
        events(&fb, 0),
        vec![(1, "file.updated".into(), "last".into())]
    );
}

#[test]
fn a_forged_object_cannot_push_the_chain_past_the_events_it_holds() {
    let client = Arc::new(MemClient::new());
    let (a, b) = (
        host(&client, Retention::default()),
        host(&client, Retention::default()),
    );
    let (fa, fb) = (a.feed(&room()).unwrap(), b.feed(&room()).unwrap());
    let heard_b = Arc::new(Heard::default());
    fb.listen(Arc::downgrade(&heard_b) as Weak<dyn ForeignChanges>);
    let pa: Arc<str> = Arc::from("alice");
    fa.publish(&pa, &[file("a1")]);
    fa.flush();
    // Anyone who may write the bucket writes the next object: a header claiming seqs up to
    // near u64::MAX, with one event (or none) to show for them.
    let forged = |first: u64, head: u64| {
        let header = json!({"roomfs_feed": 1, "first": first, "head": head, "time": now_ms()});
        let line = json!({"seq": first, "type": "file.updated", "time": now_ms(),
            "participant": "x", "by": "1", "path": "forged", "size": 1});
        Body::Bytes(Arc::new(format!("{header}\n{line}\n").into_bytes()))
    };
    let key = |n: u64| format!("p/.roomfs/events/rooms/r1/{n:020}");
    client
        .put(
            &key(2),
            forged(2, u64::MAX - 1),
            &Metadata::new(),
            &Condition::Absent,
        )
        .unwrap();
    client
        .put(
            &key(3),
            forged(3, u64::MAX),
            &Metadata::new(),
            &Condition::Absent,
        )
        .unwrap();
    // Both hosts go on numbering from the real head, and hear each other.
    fa.publish(&pa, &[file("a2")]);
    fa.flush();
    fa.publish(&pa, &[file("a3")]);
    fa.flush();
    wait_until("B hears A's changes after the forged objects", || {
        heard_b.0.lock().unwrap().len() == 3
    });
    assert_eq!(
        *heard_b.0.lock().unwrap(),
        vec![file("a1"), file("a2"), file("a3")]
    );
    let seqs: Vec<u64> = events(&fb, 0).iter().map(|e| e.0).collect();
    assert_eq!(seqs, [1, 2, 3]);
}

#[test]
fn forged_changes_naming_paths_outside_the_space_are_ignored() {
    let client = Arc::new(MemClient::new());
    let (a, b) = (
        host(&client, Retention::default()),
        host(&client, Retention::default()),
    );
    let (fa, fb) = (a.feed(&room()).unwrap(), b.feed(&room()).unwrap());
    let heard_b = Arc::new(Heard::default());
    fb.listen(Arc::downgrade(&heard_b) as Weak<dyn ForeignChanges>);
    let pa: Arc<str> = Arc::from("alice");
    fa.publish(&pa, &[file("a1")]);
    fa.flush();
    // Anyone who may write the bucket writes the next object, with one honest change among
    // changes no host makes: an empty path (a folder.deleted of "" would clear every cache),
    // absolute ones, `.` and `..`, empty names, NUL.
    let t = now_ms();
    let rec = |seq: Option<u64>, kind: &str, fields: Value| {
        let mut m = json!({"type": kind, "time": t, "participant": "x", "by": "1"});
        if let Some(seq) = seq {
            m["seq"] = json!(seq);
        }
        for (k, v) in fields.as_object().unwrap() {
            m[k] = v.clone();
        }
        m.to_string()
    };
    let lines = [
        json!({"roomfs_feed": 1, "first": 2, "head": 10, "time": t}).to_string(),
        rec(
            Some(2),
            "file.updated",
            json!({"path": "fine.txt", "size": 1}),
        ),
        rec(Some(3), "folder.deleted", json!({"path": ""})),
        rec(
            Some(4),
            "file.updated",
            json!({"path": "/etc/passwd", "size": 1}),
        ),
        rec(Some(5), "file.deleted", json!({"path": "a/../b"})),
        rec(
            Some(6),
            "folder.moved",
            json!({"source_path": "./a", "destination_path": "b"}),
        ),
        rec(
            Some(7),
            "file.moved",
            json!({"source_path": "a", "destination_path": "b//c", "size": 1}),
        ),
        rec(Some(8), "folder.created", json!({"path": "..", })),
        rec(
            Some(9),
            "file.deleted",
            json!({"path": "x", "path_base64": "YQBi"}),
        ),
        rec(Some(10), "file.deleted", json!({"path": "a\u{0}b"})),
        rec(None, "attributes", json!({"path": ""})),
        rec(None, "attributes", json!({"path": "/abs"})),
        rec(
            None,
            "exchanged",
            json!({"path": "a", "destination_path": "d/"}),
        ),
    ];
    client
        .put(
            "p/.roomfs/events/rooms/r1/00000000000000000002",
            Body::Bytes(Arc::new(format!("{}\n", lines.join("\n")).into_bytes())),
            &Metadata::new(),
            &Condition::Absent,
        )
        .unwrap();
    fa.publish(&pa, &[file("a2")]);
    fa.flush();
    wait_until("B hears A's change after the forged object", || {
        heard_b.0.lock().unwrap().len() == 4
    });
    // Only the honest change (and a change of the root's attributes) is believed; the
    // numbering goes on after the whole object.
    assert_eq!(
        *heard_b.0.lock().unwrap(),
        vec![
            file("a1"),
            file("fine.txt"),
            Changed::attributes("".as_ref()),
            file("a2")
        ]
    );
    let seqs: Vec<u64> = events(&fb, 0).iter().map(|e| e.0).collect();
    assert_eq!(seqs, [1, 2, 11]);
    let seqs: Vec<u64> = events(&fa, 0).iter().map(|e| e.0).collect();
    assert_eq!(seqs, [1, 2, 11]);
}

/// The next object number of the feed of `room()` under `p` (nothing compacted).
fn next_key(client: &MemClient) -> String {
    let n = client
        .keys()
        .iter()
        .filter(|k| k.starts_with("p/.roomfs/events/rooms/r1/"))
        .count()
        + 1;
    format!("p/.roomfs/events/rooms/r1/{n:020}")
}

/// One event of seq `first..=head` each, under a header saying so, as whoever can write the
/// bucket may put it.
fn forged_batch(first: u64, head: u64) -> Vec<u8> {
    let t = now_ms();
    let mut text =
        format!("{{\"roomfs_feed\":1,\"first\":{first},\"head\":{head},\"time\":{t}}}\n");
    for seq in first..=head {
        text.push_str(&format!(
            "{{\"by\":\"x\",\"participant\":\"x\",\"path\":\"forged.txt\",\"seq\":{seq},\
             \"time\":{t},\"type\":\"file.created\"}}\n"
        ));
    }
    text.into_bytes()
}

/// Two hosts, each listening to the other; after each object `put` writes, both publish one
/// change and hear the other's, numbered on from the real head.
fn feed_goes_on_after(objects: &[Vec<u8>]) {
    let client = Arc::new(MemClient::new());
    let (a, b) = (
        host(&client, Retention::default()),
        host(&client, Retention::default()),
    );
    let (fa, fb) = (a.feed(&room()).unwrap(), b.feed(&room()).unwrap());
    let (heard_a, heard_b) = (Arc::new(Heard::default()), Arc::new(Heard::default()));
    fa.listen(Arc::downgrade(&heard_a) as Weak<dyn ForeignChanges>);
    fb.listen(Arc::downgrade(&heard_b) as Weak<dyn ForeignChanges>);
    let (pa, pb): (Arc<str>, Arc<str>) = (Arc::from("alice"), Arc::from("bob"));
    fa.publish(&pa, &[file("a0")]);
    fa.flush();
    let (mut want_a, mut want_b) = (vec![], vec![file("a0")]);
    wait_until("B hears A's first change", || {
        *heard_b.0.lock().unwrap() == want_b
    });
    for (i, body) in objects.iter().enumerate() {
        client
            .put(
                &next_key(&client),
                Body::Bytes(Arc::new(body.clone())),
                &Metadata::new(),
                &Condition::Absent,
            )
            .unwrap();
        fa.publish(&pa, &[file(&format!("a{}", i + 1))]);
        fa.flush();
        fb.publish(&pb, &[file(&format!("b{}", i + 1))]);
        fb.flush();
        want_b.push(file(&format!("a{}", i + 1)));
        want_a.push(file(&format!("b{}", i + 1)));
        wait_until(&format!("B hears A's change after object {i}"), || {
            *heard_b.0.lock().unwrap() == want_b
        });
        wait_until(&format!("A hears B's change after object {i}"), || {
            *heard_a.0.lock().unwrap() == want_a
        });
    }
    // One numbering, whole, on both hosts and on a third one opened now.
    let want: Vec<u64> = (1..=2 * objects.len() as u64 + 1).collect();
    let seqs = |f: &BucketFeed| events(f, 0).iter().map(|e| e.0).collect::<Vec<_>>();
    assert_eq!(seqs(&fa), want);
    assert_eq!(seqs(&fb), want);
    let c = host(&client, Retention::default());
    assert_eq!(seqs(&c.feed(&room()).unwrap()), want);
}

/// Numbers near `u64::MAX` in a forged object neither panic the feed's thread (which serves
/// every space of the store) nor move the numbering: a batch past `MAX_NUMBER` is not one,
/// and one starting further than `MAX_JUMP` past the head is skipped.
#[test]
fn forged_numbers_near_the_end_of_u64_neither_panic_nor_stop_the_feed() {
    feed_goes_on_after(&[
        forged_batch(u64::MAX - 1, u64::MAX - 1),
        forged_batch(u64::MAX, u64::MAX),
        forged_batch(MAX_NUMBER + 1, MAX_NUMBER + 1),
        forged_batch(MAX_NUMBER, MAX_NUMBER),
        forged_batch(MAX_NUMBER - 1, MAX_NUMBER - 1),
        // The head is 11 here (a0, then two changes after each object): the first `first`
        // past the jump allowed.
        forged_batch(11 + MAX_JUMP + 2, 11 + MAX_JUMP + 2),
        // Not a batch: a header only (`first` past `head` by more than one).
        format!(
            "{{\"roomfs_feed\":1,\"first\":{},\"head\":5,\"time\":1}}\n",
            u64::MAX
        )
        .into_bytes(),
    ]);
}

/// An object over `MAX_OBJECT` is not a batch: skipped like any other, not a failure that
/// stops the feed.
#[test]
fn a_feed_object_over_16_mib_is_skipped_and_the_feed_goes_on() {
    let mut big = forged_batch(2, 2);
    big.resize(MAX_OBJECT + 1, b' ');
    feed_goes_on_after(&[big]);
}

#[test]
fn no_host_numbers_an_event_past_the_bound() {
    let client = Arc::new(MemClient::new());
    let a = host(&client, Retention::default());
    let fa = a.feed(&room()).unwrap();
    let p: Arc<str> = Arc::from("a");
    let changes = [
        (p.clone(), file("x")),
        (p.clone(), Changed::attributes("x".as_ref())),
        (p.clone(), file("y")),
    ];
    assert_eq!(fa.batch(MAX_NUMBER - 2, &changes).unwrap().head, MAX_NUMBER);
    assert!(fa.batch(MAX_NUMBER - 1, &changes).is_none());
    assert!(fa.batch(u64::MAX - 1, &changes).is_none());
    assert_eq!(
        fa.batch(MAX_NUMBER, &changes[1..2]).unwrap().head,
        MAX_NUMBER
    );
    // Nor believes one that does.
    let parsed = |first, head| Batch::parse(&forged_batch(first, head)).map(|b| b.0.head);
    assert_eq!(parsed(MAX_NUMBER, MAX_NUMBER), Some(MAX_NUMBER));
    assert_eq!(parsed(MAX_NUMBER + 1, MAX_NUMBER + 1), None);
    assert_eq!(parsed(MAX_NUMBER, MAX_NUMBER + 1), None);
    // Object numbers too: a key past the bound, or 0, is not a feed object.
    let key = |n: u64| format!("p/.roomfs/events/rooms/r1/{n:020}");
    assert_eq!(fa.number(&key(MAX_NUMBER)), Some(MAX_NUMBER));
    assert_eq!(fa.number(&key(MAX_NUMBER + 1)), None);
    assert_eq!(fa.number(&key(u64::MAX)), None);
    assert_eq!(fa.number(&key(0)), None);
}
