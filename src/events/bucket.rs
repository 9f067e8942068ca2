//! The change feed kept in an S3 bucket: how daemons on different hosts, sharing a bucket and
//! nothing else, hear of each other's changes to a space, in one order of events per space.
//!
//! Layout: `<prefix>/.roomfs/events/<rooms|sessions>/<id>/<n>`, a chain of objects numbered
//! n = 1, 2, 3... (twenty digits, so that a listing sorts them by number). No space's key
//! starts there (a space's objects are `<prefix>/rooms/<id>/...`), so no mount shows them.
//! Each object is one batch of changes one host made, as text, one JSON object per line:
//!
//! ```text
//! {"roomfs_feed":1,"first":7,"head":8,"time":1763700000123}
//! {"seq":7,"type":"file.updated","time":1763700000123,"participant":"agent","by":"6c0f…","path":"a.txt","size":3}
//! {"type":"attributes","time":1763700000123,"participant":"agent","by":"6c0f…","path":"a.txt"}
//! {"seq":8,"type":"file.deleted","time":1763700000123,"participant":"agent","by":"6c0f…","path":"b.txt"}
//! ```
//!
//! The header says which `seq`s the batch's events have (`first..=head`; none when `head` is
//! below `first`: a batch of internal records only); the records are a change log's lines
//! (see [`super::log`]). An object whose lines do not hold each `seq` of its header's range is
//! not a batch (skipped, like anything else that does not parse): the bucket's contents are
//! hostile input, and a header alone never moves a host's numbering.
//!
//! **Bounds.** Nor do numbers near the end of `u64`. A batch with a `seq` past `i64::MAX`
//! ([`MAX_NUMBER`]) is not a batch, a key numbered past it (or 0) is not a feed object, and
//! no host numbers an event past it; so no sum the feed makes of numbers read from the bucket
//! (a head plus one, plus a batch's events, an object number plus one) can overflow. A batch
//! that starts more than 2^24 ([`MAX_JUMP`]) past the head read before it is skipped (no host
//! numbers so), so a forged object cannot walk the numbering to the bound either. An object
//! over 16 MiB is not a batch: its GET stops there, unread. Whatever is skipped is logged and
//! passed over: the chain goes on after it. The one batch taken on trust is the newest
//! object of a feed a host opens (the batches before it are not read): a forged one there
//! sets that host's numbering apart from the hosts that follow the feed (their batches and its
//! own then skip each other) until it opens the feed again, and when it sets it at the bound,
//! the host writes nothing (logged).
//!
//! **The seq rule.** A host writes object n+1 only after it has read object n (so it knows the
//! last `seq`, n's `head`), numbering its events on from there, and creates it with
//! `If-None-Match: *`: of hosts racing for n+1, exactly one succeeds. A loser reads the
//! winner's object, numbers its events after the winner's and tries n+2. So the objects form one
//! chain, `seq` increases by one per event whichever host made it, and every host reads the same
//! order. A PUT is atomic: a batch is there whole or not at all. On a store that ignores
//! conditional writes (probed at start), a host looks (HEAD) before it writes, which narrows
//! the race but cannot close it: two hosts writing the same object in the same moment lose one
//! batch (doc/S3.md).
//!
//! **Following.** One thread per S3 store (`roomfs-s3-events`) writes what this process
//! published and, every `events_poll_secs` (default 0.25 s), GETs the next object of every space
//! open in the process, until one is missing. So while nothing changes, each open space costs one
//! GET answered 404 per poll interval: 4 requests per second per space and host by default
//! (doc/S3.md, Events across hosts), and one LIST a minute, which finds whether compaction
//! left this host behind (see below). The feed's requests are counted apart in the metrics
//! (`roomfs_backend_requests_total{op="feed_get"}`...). A publish wakes the thread at once; while
//! changes stream, the thread writes at most one object per turn of 20 ms, carrying all the
//! changes published meanwhile, so a busy host makes a few PUTs a second per space, not one per
//! change. A write is tried at the next number without reading first; losing the race (412)
//! makes it read on and try again.
//!
//! **Retention.** Each process keeps the retained events it has read in memory (older ones are
//! read back from the bucket when a watcher resumes from further back). When the chain holds
//! half as many events again as retention keeps (`event_retention`), the host that just wrote
//! deletes the oldest objects whose every event retention drops, among those it has read (a
//! host that joined late leaves older ones to hosts that read them, or to the next compaction
//! once it has read enough). The first object left says which `seq` is the oldest retained;
//! a watcher resuming from before it is told of the gap. A host that did not read while the
//! others wrote and compacted (stopped, or cut off from the bucket) finds its next object
//! deleted and later ones there: it goes on from the first one left
//! ([`BucketFeed::skip_compacted`]), looking after any stall and once a minute anyway.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::feed::{Backlog, ChangeFeed, Fanout, ForeignChanges, Retention};
use super::{Changed, Origin, Record, now_ms};
use crate::space::SpaceId;
use crate::store::s3::client::{Body, ClientError, Condition, Failure, Metadata, ObjectClient};

/// The chain is compacted once it holds this many times what retention keeps.
const COMPACT_AT: f64 = 1.5;
/// A feed object larger than this is not one (skipped, without reading the rest of it).
const MAX_OBJECT: usize = 16 << 20;
/// The largest `seq`, and the largest object number, a feed holds (`i64::MAX`: a signed
/// 64-bit integer holds every one). A batch with a `seq` past it is not one, a key numbered
/// past it is not a feed object, and this host numbers no event past it. No chain gets there
/// (a million events a second take 290,000 years), and every sum the feed makes of these
/// numbers (a head plus one, plus a batch's events) stays far below `u64::MAX`.
const MAX_NUMBER: u64 = i64::MAX as u64;
/// How far a batch may start past the head read before it (`first - 1 - head`); one that
/// jumps further is skipped. Hosts number each batch on from the last one (the seq rule), so
/// a jump is only seen where a store that ignores conditional writes lost a batch (by its
/// events). The bound keeps whoever can write the bucket from walking the numbering to
/// [`MAX_NUMBER`]: that would take 2^39 objects.
const MAX_JUMP: u64 = 1 << 24;
/// Changes queued while the bucket cannot be written, at most (the oldest go first, logged).
const MAX_QUEUED: usize = 100_000;
/// Conditional PUTs lost to other hosts in a row before a batch waits for the next round.
const MAX_RACES: u32 = 64;
/// While changes stream, the feed is written at most once per turn (a turn's changes go in
/// one object): requests per change fall with the rate, and an event waits at most this long.
const TURN: Duration = Duration::from_millis(20);
/// A feed not read for this many poll intervals, and at least [`STALL_MIN`] (2 s by default),
/// was stalled: this process was stopped, or could not reach the bucket. Before it writes or
/// reads on, it looks whether a compaction left it behind ([`BucketFeed::skip_compacted`]).
const STALL_POLLS: u32 = 8;
const STALL_MIN: Duration = Duration::from_secs(2);
/// And it looks every this many poll intervals anyway (a minute by default): one LIST.
const GAP_CHECK_POLLS: u32 = 240;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The feeds of the spaces of one S3 store, and the thread that writes and follows them (see
/// the module docs). The thread runs while this or any of its feeds is alive.
pub struct BucketFeeds {
    shared: Arc<Shared>,
}

struct Shared {
    client: Arc<dyn ObjectClient>,
    /// `<prefix>/.roomfs/events/` (or `.roomfs/events/` without a prefix).
    root: String,
    origin: Origin,
    retention: Retention,
    /// Whether the store honours `If-None-Match: *`.
    conditional: bool,
    feeds: Mutex<HashMap<SpaceId, Weak<BucketFeed>>>,
    /// Set to wake the thread (a feed has changes to write); the thread clears it.
    wake: Mutex<bool>,
    woken: Condvar,
    /// How often the feeds are read.
    poll: Duration,
}

impl Shared {
    fn wake(&self) {
        *lock(&self.wake) = true;
        self.woken.notify_one();
    }
}

/// Where the feeds of a bucket prefix (normalized, as the store's keys use it) live.
pub fn root_of(prefix: &str) -> String {
    if prefix.is_empty() {
        ".roomfs/events/".to_string()
    } else {
        format!("{prefix}/.roomfs/events/")
    }
}

impl BucketFeeds {
    /// The feeds under the bucket prefix `prefix`, followed every `poll`; starts their thread.
    pub fn start(
        client: Arc<dyn ObjectClient>,
        prefix: &str,
        conditional: bool,
        retention: Retention,
        poll: Duration,
    ) -> io::Result<BucketFeeds> {
        let shared = Arc::new(Shared {
            client,
            root: root_of(prefix),
            origin: Origin::new(),
            retention,
            conditional,
            feeds: Mutex::new(HashMap::new()),
            wake: Mutex::new(false),
            woken: Condvar::new(),
            poll,
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("roomfs-s3-events".into())
            .spawn(move || run(&weak, poll))?;
        Ok(BucketFeeds { shared })
    }

    /// The feed of `space`: the one open in this process, or opened now (which lists the
    /// space's feed objects and reads the last one).
    pub fn feed(&self, space: &SpaceId) -> io::Result<Arc<BucketFeed>> {
        if let Some(feed) = lock(&self.shared.feeds).get(space).and_then(Weak::upgrade) {
            return Ok(feed);
        }
        // Opened without the table's lock (requests); a racing open keeps the first one in.
        let feed = {
            let _counted = crate::metrics::FeedRequests::enter();
            Arc::new(BucketFeed::open(self.shared.clone(), space.clone())?)
        };
        let mut feeds = lock(&self.shared.feeds);
        if let Some(existing) = feeds.get(space).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        feeds.retain(|_, f| f.strong_count() > 0);
        feeds.insert(space.clone(), Arc::downgrade(&feed));
        Ok(feed)
    }

    /// Stops following `space` (it is being deleted: see [`remove_feed`]).
    pub fn forget(&self, space: &SpaceId) {
        lock(&self.shared.feeds).remove(space);
    }
}

/// Deletes the feed of `space` under the bucket prefix `prefix` (the space is deleted): a
/// space made again under the same id starts from `seq` 1.
pub fn remove_feed(client: &dyn ObjectClient, prefix: &str, space: &SpaceId) -> io::Result<()> {
    let _counted = crate::metrics::FeedRequests::enter();
    let prefix = space_prefix(&root_of(prefix), space);
    loop {
        let page = client.list(&prefix, false, None, None).map_err(io_err)?;
        if page.objects.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = page.objects.into_iter().map(|o| o.key).collect();
        for batch in keys.chunks(crate::store::s3::client::DELETE_BATCH) {
            client.delete_many(batch).map_err(io_err)?;
        }
    }
}

impl Drop for BucketFeeds {
    fn drop(&mut self) {
        self.shared.wake();
    }
}

fn io_err(e: ClientError) -> io::Error {
    let errno = e.errno();
    io::Error::new(io::Error::from_raw_os_error(errno).kind(), e.to_string())
}

fn space_prefix(root: &str, space: &SpaceId) -> String {
    format!("{root}{}/{}/", space.kind.dir(), space.id)
}

/// The thread: writes what this process published, reads what other hosts wrote; ends once
/// the feeds and their owner are gone.
fn run(shared: &Weak<Shared>, poll: Duration) {
    // When the last round wrote something (changes are streaming).
    let mut wrote: Option<Instant> = None;
    loop {
        let feeds: Vec<Arc<BucketFeed>> = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            {
                let mut woken = lock(&shared.wake);
                if !*woken {
                    woken = shared
                        .woken
                        .wait_timeout(woken, poll)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                *woken = false;
            }
            let feeds = lock(&shared.feeds);
            feeds.values().filter_map(Weak::upgrade).collect()
        };
        // While changes stream, one object per turn carries what the turn gathered.
        if let Some(left) = wrote.and_then(|at| TURN.checked_sub(at.elapsed())) {
            std::thread::sleep(left);
        }
        wrote = None;
        let _counted = crate::metrics::FeedRequests::enter();
        for feed in &feeds {
            let mut chain = lock(&feed.chain);
            // Left behind while stalled? Then this host looks before it writes.
            if feed.behind(&chain)
                && let Err(e) = feed.follow(&mut chain)
            {
                feed.failed(&mut chain, "reading", &e);
                continue;
            }
            match feed.write_pending(&mut chain) {
                Ok(true) => wrote = Some(Instant::now()),
                Ok(false) => {}
                Err(e) => {
                    feed.failed(&mut chain, "writing", &e);
                    continue;
                }
            }
            // Other hosts' objects are looked for once per poll interval, not after each
            // write: a write that lost a race has read them already.
            let due = chain.followed.is_none_or(|at| at.elapsed() >= poll);
            if !due {
                continue;
            }
            if let Err(e) = feed.follow(&mut chain) {
                feed.failed(&mut chain, "reading", &e);
            } else if chain.failing {
                chain.failing = false;
                log::info!(
                    "the change feed of {} in the bucket works again",
                    feed.space
                );
            }
        }
    }
}

/// One batch: an object of the chain.
#[derive(Debug)]
struct Batch {
    /// The `seq` of its first event (the last `seq` before it, plus one).
    first: u64,
    /// The last `seq` after it.
    head: u64,
    time: u64,
    records: Vec<Record>,
}

impl Batch {
    fn to_bytes(&self) -> Vec<u8> {
        let header = json!({
            "roomfs_feed": 1,
            "first": self.first,
            "head": self.head,
            "time": self.time,
        });
        let mut text = header.to_string();
        text.push('\n');
        for r in &self.records {
            text.push_str(&r.log_line());
            text.push('\n');
        }
        text.into_bytes()
    }

    /// Reads a batch; `None` if it is not one. Records out of the header's range are dropped,
    /// and so are those naming a path that is not one of a space (see
    /// [`Changed::names_space_paths`]; no host writes one): their number comes back with the
    /// batch. Their `seq`s still count for the header's range, so the numbering stays whole.
    fn parse(bytes: &[u8]) -> Option<(Batch, usize)> {
        let mut lines = bytes.split(|&b| b == b'\n');
        let header: Value = serde_json::from_slice(lines.next()?).ok()?;
        header.get("roomfs_feed")?;
        let num = |k: &str| header.get(k).and_then(Value::as_u64);
        let (first, head, time) = (num("first")?, num("head")?, num("time")?);
        // Past `MAX_NUMBER`, numbering would come near overflowing (see there).
        if first == 0 || head > MAX_NUMBER || head + 1 < first {
            return None;
        }
        let lines: Vec<&[u8]> = lines.filter(|l| !l.is_empty()).collect();
        // The header is believed only as far as the lines bear it out: each of `first..=head`
        // is the `seq` of one line (of any type, so that a newer host's events count too).
        // Anyone who can write the bucket could otherwise move every host's head far ahead
        // with a few lines (and `take` refuses a batch that starts too far past the head).
        let mut seqs: Vec<u64> = lines
            .iter()
            .filter_map(|l| {
                serde_json::from_slice::<Value>(l)
                    .ok()?
                    .get("seq")?
                    .as_u64()
            })
            .filter(|s| (first..=head).contains(s))
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        if seqs.len() as u64 != head + 1 - first {
            return None;
        }
        let (records, forged): (Vec<Record>, Vec<Record>) = lines
            .into_iter()
            .filter_map(Record::parse_log_line)
            .filter(|r| r.seq == 0 || (first..=head).contains(&r.seq))
            .partition(|r| r.change.names_space_paths());
        let batch = Batch {
            first,
            head,
            time,
            records,
        };
        Some((batch, forged.len()))
    }
}

/// What [`BucketFeed::get`] found at an object number.
enum Got {
    /// No object.
    Missing,
    /// An object that is not a batch (skipped, logged).
    NotBatch,
    Batch(Batch),
}

/// What the chain is known to hold (held across requests: one host's reading and writing of a
/// feed are one at a time).
struct Chain {
    /// The next object to read (or write): every object before it was taken.
    next: u64,
    /// The last `seq` (0: none yet); at most [`MAX_NUMBER`].
    head: u64,
    /// Whether `head` is the last `seq` before object `next`: false only while a feed opened
    /// at its last object has taken no batch yet (that batch may start anywhere; any later
    /// one may start at most [`MAX_JUMP`] past the head).
    known: bool,
    /// The first object the bucket still holds, as far as this process knows.
    first_object: u64,
    /// The first event the bucket still holds, as far as this process knows.
    oldest: u64,
    /// The objects read since the feed was opened, in order: (number, head, time).
    objects: VecDeque<(u64, u64, u64)>,
    /// The last round failed (logged once until it works again).
    failing: bool,
    /// When the chain was last read to its end.
    followed: Option<Instant>,
    /// Whether the next object missing is to be checked for a gap (see `skip_compacted`), and
    /// when that was last done.
    check_gap: bool,
    gap_checked: Instant,
}

impl Chain {
    /// A chain not read yet.
    fn new() -> Chain {
        Chain {
            next: 1,
            head: 0,
            known: true,
            first_object: 1,
            oldest: 1,
            objects: VecDeque::new(),
            failing: false,
            followed: None,
            check_gap: false,
            gap_checked: Instant::now(),
        }
    }
}

/// The events this process holds in memory, for watchers.
struct Window {
    /// The first object whose events are here, all of them from there on (events of older
    /// ones are read back on demand).
    from_object: u64,
    /// The events, in order, each with the number of its object.
    events: VecDeque<(u64, Arc<Record>)>,
}

impl Window {
    fn new() -> Window {
        Window {
            from_object: 1,
            events: VecDeque::new(),
        }
    }
}

/// One space's feed in the bucket, as this process writes and follows it (see the module
/// docs).
pub struct BucketFeed {
    space: SpaceId,
    /// `<root><kind>/<id>/`.
    prefix: String,
    shared: Arc<Shared>,
    queue: Mutex<Queue>,
    written: Condvar,
    chain: Mutex<Chain>,
    window: Mutex<Window>,
    fanout: Fanout,
}

#[derive(Default)]
struct Queue {
    changes: VecDeque<(Arc<str>, Changed)>,
    /// Changes ever published, and ever written (or given up on).
    published: u64,
    written: u64,
    /// The last batch this process wrote whose PUT failed without an answer (a timeout): it
    /// may have landed all the same, and its changes, queued again at the front, are then
    /// taken as written when the chain shows it (see `BucketFeed::take`).
    unconfirmed: Option<Unconfirmed>,
}

/// A batch written at object `n` (at `time`) whose PUT failed without an answer.
struct Unconfirmed {
    n: u64,
    time: u64,
    /// Its changes, at the front of the queue.
    count: usize,
}

impl BucketFeed {
    fn key(&self, n: u64) -> String {
        format!("{}{n:020}", self.prefix)
    }

    /// The object number of `key`, if it is one of this feed's (1 to [`MAX_NUMBER`]).
    fn number(&self, key: &str) -> Option<u64> {
        let rest = key.strip_prefix(&self.prefix)?;
        (rest.len() == 20 && rest.bytes().all(|b| b.is_ascii_digit()))
            .then(|| rest.parse().ok())
            .flatten()
            .filter(|n| (1..=MAX_NUMBER).contains(n))
    }

    /// Opens the feed: lists its objects, reads the first (the oldest `seq` retained) and the
    /// last (the last `seq`, and the events it holds).
    fn open(shared: Arc<Shared>, space: SpaceId) -> io::Result<BucketFeed> {
        let prefix = space_prefix(&shared.root, &space);
        let feed = BucketFeed {
            space,
            prefix,
            shared,
            queue: Mutex::new(Queue::default()),
            written: Condvar::new(),
            chain: Mutex::new(Chain::new()),
            window: Mutex::new(Window::new()),
            fanout: Fanout::default(),
        };
        let (mut first, mut last) = (None, None);
        let mut token = None;
        loop {
            let page = feed
                .shared
                .client
                .list(&feed.prefix, false, token.as_deref(), None)
                .map_err(io_err)?;
            for o in &page.objects {
                if let Some(n) = feed.number(&o.key) {
                    first = Some(first.unwrap_or(n).min(n));
                    last = Some(last.unwrap_or(n).max(n));
                }
            }
            match page.next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        if let (Some(first), Some(last)) = (first, last) {
            let mut chain = lock(&feed.chain);
            chain.first_object = first;
            if let Got::Batch(b) = feed.get(first).map_err(io_err)? {
                chain.oldest = b.first;
            }
            // Read from the last one on: its events are the window's first, and where it
            // starts is taken on trust (the batches before it are not read).
            chain.next = last;
            chain.known = last == 1;
            lock(&feed.window).from_object = last;
            feed.follow_quietly(&mut chain).map_err(io_err)?;
            if chain.oldest > chain.head + 1 {
                chain.oldest = chain.head + 1;
            }
        }
        Ok(feed)
    }

    /// GETs object `n`. One larger than [`MAX_OBJECT`] is not a batch: its GET ends there,
    /// the rest unread.
    fn get(&self, n: u64) -> Result<Got, ClientError> {
        let key = self.key(n);
        let mut bytes = Vec::new();
        let mut oversize = false;
        let got = self.shared.client.get(&key, None, None, &mut |b| {
            if bytes.len() + b.len() > MAX_OBJECT {
                oversize = true;
                return Err(io::Error::other("a feed object larger than 16 MiB"));
            }
            bytes.extend_from_slice(b);
            Ok(())
        });
        match got {
            Err(_) if oversize => {
                log::warn!("{key}: larger than 16 MiB, not a change feed batch; skipped");
                Ok(Got::NotBatch)
            }
            Ok(_) => match Batch::parse(&bytes) {
                Some((b, forged)) => {
                    if forged > 0 {
                        log::debug!(
                            "{key}: ignored {forged} change(s) naming a path outside the space \
                             (empty, absolute, with . or .. or NUL)"
                        );
                    }
                    Ok(Got::Batch(b))
                }
                None => {
                    log::warn!("{key}: not a change feed batch; skipped");
                    Ok(Got::NotBatch)
                }
            },
            Err(e) if e.is(Failure::NotFound) => Ok(Got::Missing),
            Err(e) => Err(e),
        }
    }

    /// Reads the objects written since the last look, delivering them.
    fn follow(&self, chain: &mut Chain) -> Result<(), ClientError> {
        if self.behind(chain) {
            chain.check_gap = true;
        }
        self.read_on(chain, true)?;
        chain.followed = Some(Instant::now());
        Ok(())
    }

    /// Whether a compaction may have left this host behind since it last read the chain: it
    /// was stalled ([`STALL_POLLS`]), or it has not looked for a while ([`GAP_CHECK_POLLS`]).
    fn behind(&self, chain: &Chain) -> bool {
        let poll = self.shared.poll;
        chain
            .followed
            .is_some_and(|at| at.elapsed() >= (poll * STALL_POLLS).max(STALL_MIN))
            || chain.gap_checked.elapsed() >= poll * GAP_CHECK_POLLS
    }

    /// With object `chain.next` missing: whether the chain went on without it, and if so moves
    /// on to the first object left after it.
    ///
    /// A host writes object n+1 only after reading n, so a later object means n was there,
    /// and is gone: compacted away, with every object before it, by hosts that read them
    /// while this one did not (it was stopped, or cut off from the bucket, for longer than
    /// retention keeps). Waiting for n would stall this host for good, and writing n would put
    /// its batch where no other host reads. The events in between are lost to it: logged, as
    /// the local change log does; its mounts learn of those changes at their cache TTL, and a
    /// watcher resuming from before the first object left is told of the gap.
    fn skip_compacted(&self, chain: &mut Chain) -> Result<bool, ClientError> {
        let n = chain.next;
        chain.gap_checked = Instant::now();
        let page = self.shared.client.list_after(&self.prefix, &self.key(n))?;
        let Some(m) = page
            .objects
            .iter()
            .filter_map(|o| self.number(&o.key))
            .filter(|&m| m > n)
            .min()
        else {
            return Ok(false);
        };
        // Written since it was found missing (others wrote on after it): no gap.
        if !matches!(self.get(n)?, Got::Missing) {
            return Ok(true);
        }
        log::warn!(
            "change feed of {}: objects {n}..{m} were compacted away before this host read \
             them (it was stopped, or could not reach the bucket); going on from object {m}: \
             its mounts learn of those changes at their cache TTL",
            self.space
        );
        chain.next = m;
        // Object m starts wherever the chain had got to.
        chain.known = false;
        chain.first_object = chain.first_object.max(m);
        chain.objects.clear();
        if let Got::Batch(b) = self.get(m)? {
            chain.oldest = b.first;
        }
        let mut window = lock(&self.window);
        window.events.clear();
        window.from_object = m;
        Ok(true)
    }

    /// Like `follow`, without delivering (what the chain held when the feed was opened).
    fn follow_quietly(&self, chain: &mut Chain) -> Result<(), ClientError> {
        self.read_on(chain, false)
    }

    /// Takes the objects from `chain.next` on, until one is missing.
    fn read_on(&self, chain: &mut Chain, deliver: bool) -> Result<(), ClientError> {
        loop {
            let n = chain.next;
            match self.get(n)? {
                Got::Missing => {
                    if std::mem::take(&mut chain.check_gap) && self.skip_compacted(chain)? {
                        continue;
                    }
                    return Ok(());
                }
                Got::NotBatch => self.take(chain, n, None, deliver),
                Got::Batch(batch) => self.take(chain, n, Some(batch), deliver),
            }
        }
    }

    /// Takes object `n`, its batch if it is one: the chain moves past it, the batch's events
    /// join the window, and (with `deliver`) its records go to subscribers and, when another
    /// host wrote them, to listeners. A batch that starts too far past the head (see
    /// [`MAX_JUMP`]) or goes back is skipped, as an object that is no batch.
    fn take(&self, chain: &mut Chain, n: u64, batch: Option<Batch>, deliver: bool) {
        chain.next = n + 1;
        {
            let mut q = lock(&self.queue);
            if let Some(u) = q.unconfirmed.take_if(|u| n >= u.n) {
                let ours = n == u.n
                    && batch.as_ref().is_some_and(|b| {
                        b.time == u.time && b.records.iter().all(|r| r.origin == self.shared.origin)
                    });
                if ours {
                    // It landed: its changes are in the chain, not to be written again.
                    let landed = u.count.min(q.changes.len());
                    q.changes.drain(..landed);
                    q.written += landed as u64;
                    self.written.notify_all();
                }
            }
        }
        let Some(batch) = batch else {
            return;
        };
        if batch.head < chain.head {
            // A batch of a chain older than what was read (cannot happen unless objects were
            // replaced behind our back): its events were seen.
            log::warn!(
                "change feed of {}: object {n} goes back to seq {}; skipped",
                self.space,
                batch.head
            );
            return;
        }
        let jump = batch.first.saturating_sub(1).saturating_sub(chain.head);
        if chain.known && jump > MAX_JUMP {
            // No host numbers so (the seq rule): whoever can write the bucket wrote it.
            log::warn!(
                "change feed of {}: object {n} starts at seq {}, {jump} past the head; skipped",
                self.space,
                batch.first
            );
            return;
        }
        chain.known = true;
        chain.head = batch.head;
        chain.objects.push_back((n, batch.head, batch.time));
        let records: Vec<Arc<Record>> = batch.records.into_iter().map(Arc::new).collect();
        let retention = &self.shared.retention;
        let droppable =
            |&(_, head, time): &(u64, u64, u64)| !retention.keeps(time, chain.head - head);
        {
            let mut window = lock(&self.window);
            for r in records.iter().filter(|r| r.seq > 0) {
                window.events.push_back((n, r.clone()));
            }
            // Whole objects leave the window, oldest first, once retention drops all of their
            // events (never the last: it holds the head).
            for o in chain.objects.iter().take(chain.objects.len() - 1) {
                if !droppable(o) {
                    break;
                }
                window.from_object = window.from_object.max(o.0 + 1);
            }
            let from = window.from_object;
            while window.events.front().is_some_and(|(m, _)| *m < from) {
                window.events.pop_front();
            }
        }
        // The index of objects read is kept while compaction may need it.
        while chain.objects.len() as u64 > retention.max_events.unwrap_or(1000).max(1000) * 2
            && chain.objects.front().is_some_and(droppable)
        {
            chain.objects.pop_front();
        }
        if deliver {
            for r in records {
                let foreign = r.origin != self.shared.origin;
                self.fanout.deliver(r, foreign);
            }
        }
    }

    /// Writes the queued changes as the next object of the chain (see the seq rule); whether
    /// there were any.
    ///
    /// On a store that decides conditional writes, the PUT is tried at once at the number
    /// after the last object read: if another host wrote that one, the PUT fails, and the
    /// chain is read on before the next try (one request per batch while nobody races).
    fn write_pending(&self, chain: &mut Chain) -> Result<bool, ClientError> {
        if lock(&self.queue).unconfirmed.is_some() {
            // Read on first: the batch whose PUT got no answer may be there, its changes then
            // taken as written (see `take`) before they are drained to be written again.
            self.follow(chain)?;
        }
        let changes: Vec<(Arc<str>, Changed)> = {
            let mut q = lock(&self.queue);
            if q.changes.is_empty() {
                return Ok(false);
            }
            q.changes.drain(..).collect()
        };
        let count = changes.len() as u64;
        let mut races = 0;
        // The batch whose PUT got no answer, if the last try was one.
        let mut unanswered = None;
        let result = loop {
            if (races > 0 || !self.shared.conditional)
                && let Err(e) = self.follow(chain)
            {
                break Err(e);
            }
            let n = chain.next;
            if !self.shared.conditional {
                // Looked at first: narrows (cannot close) the race the store does not decide.
                match self.shared.client.head(&self.key(n)) {
                    Ok(_) => continue,
                    Err(e) if e.is(Failure::NotFound) => {}
                    Err(e) => break Err(e),
                }
            }
            let Some(batch) = self.batch(chain.head, &changes) else {
                break Err(ClientError::with_source(
                    Failure::Other,
                    format!("PUT {}", self.key(n)),
                    io::Error::other(format!(
                        "its events would be numbered past {MAX_NUMBER}, the last seq of a feed"
                    )),
                ));
            };
            let body = Body::Bytes(Arc::new(batch.to_bytes()));
            match self
                .shared
                .client
                .put(&self.key(n), body, &Metadata::new(), &Condition::Absent)
            {
                Ok(_) => {
                    self.take(chain, n, Some(batch), true);
                    self.compact(chain);
                    break Ok(());
                }
                Err(e) if e.is(Failure::Precondition) || e.is(Failure::Conflict) => {
                    // Another host wrote object n first: read it, then number ours after it.
                    races += 1;
                    if races >= MAX_RACES {
                        break Err(e);
                    }
                }
                Err(e) => {
                    if e.is(Failure::Unavailable) || e.is(Failure::Other) {
                        unanswered = Some((n, batch.time));
                    }
                    break Err(e);
                }
            }
        };
        let mut q = lock(&self.queue);
        match &result {
            Ok(()) => q.written += count,
            Err(_) => {
                // Tried again next round, before anything published since.
                q.unconfirmed = unanswered.map(|(n, time)| Unconfirmed {
                    n,
                    time,
                    count: changes.len(),
                });
                for c in changes.into_iter().rev() {
                    q.changes.push_front(c);
                }
                let excess = q.changes.len().saturating_sub(MAX_QUEUED);
                if excess > 0 {
                    q.changes.drain(..excess);
                    q.written += excess as u64;
                    log::error!(
                        "change feed of {}: the bucket cannot be written; {excess} changes \
                         dropped (other hosts learn of them at their cache TTL)",
                        self.space
                    );
                }
            }
        }
        self.written.notify_all();
        result.map(|()| true)
    }

    /// `changes` as the batch following `head`; `None` if that numbers an event past
    /// [`MAX_NUMBER`].
    fn batch(&self, head: u64, changes: &[(Arc<str>, Changed)]) -> Option<Batch> {
        let events = changes.iter().filter(|(_, c)| c.is_event()).count() as u64;
        head.checked_add(events).filter(|&h| h <= MAX_NUMBER)?;
        let time = now_ms();
        let mut seq = head;
        let records = changes
            .iter()
            .map(|(participant, change)| Record {
                seq: if change.is_event() {
                    seq += 1;
                    seq
                } else {
                    0
                },
                time,
                participant: participant.clone(),
                origin: self.shared.origin,
                change: change.clone(),
            })
            .collect();
        Some(Batch {
            first: head + 1,
            head: seq,
            time,
            records,
        })
    }

    /// Deletes the oldest objects once the chain holds half as much again as retention keeps
    /// (see the module docs).
    fn compact(&self, chain: &mut Chain) {
        let retention = &self.shared.retention;
        let count = (chain.head + 1).saturating_sub(chain.oldest);
        let oldest_time = chain
            .objects
            .front()
            .filter(|o| o.0 <= chain.first_object)
            .map(|o| o.2);
        if !retention.exceeded(count, oldest_time, COMPACT_AT) {
            return;
        }
        let head = chain.head;
        let Some(&(cut, cut_head, _)) = chain
            .objects
            .iter()
            .take_while(|&&(n, h, time)| {
                n < chain.next.saturating_sub(1) && !retention.keeps(time, head - h)
            })
            .last()
        else {
            return;
        };
        if cut < chain.first_object {
            return;
        }
        let started = Instant::now();
        let keys: Vec<String> = (chain.first_object..=cut).map(|n| self.key(n)).collect();
        for batch in keys.chunks(crate::store::s3::client::DELETE_BATCH) {
            if let Err(e) = self.shared.client.delete_many(batch) {
                log::warn!("compacting the change feed of {}: {e}", self.space);
                return;
            }
        }
        chain.first_object = cut + 1;
        chain.oldest = cut_head + 1;
        log::debug!(
            "compacted the change feed of {}: {} objects deleted, events from {} kept, {} ms",
            self.space,
            keys.len(),
            chain.oldest,
            started.elapsed().as_millis()
        );
    }

    /// Logs a failed round (once until it works again).
    fn failed(&self, chain: &mut Chain, doing: &str, e: &ClientError) {
        if !chain.failing {
            chain.failing = true;
            log::warn!(
                "{doing} the change feed of {} in the bucket: {e}; other hosts' changes show \
                 at the cache TTL until it works again",
                self.space
            );
        }
    }

    /// Reads back older objects until the window holds the events after `since` (or the
    /// oldest the bucket holds).
    fn load_older(&self, chain: &mut Chain, since: u64) -> Result<(), ClientError> {
        loop {
            let (from, start) = {
                let w = lock(&self.window);
                let start = w.events.front().map_or(chain.head + 1, |(_, r)| r.seq);
                (w.from_object, start)
            };
            // `since` is a watcher's, any number.
            if start <= since.saturating_add(1) || from <= chain.first_object {
                return Ok(());
            }
            let n = from - 1;
            let batch = match self.get(n)? {
                Got::Batch(batch) => batch,
                Got::NotBatch => {
                    lock(&self.window).from_object = n;
                    continue;
                }
                Got::Missing => {
                    // Compacted by another host.
                    chain.first_object = from;
                    chain.oldest = chain.oldest.max(start);
                    return Ok(());
                }
            };
            let mut w = lock(&self.window);
            for r in batch.records.into_iter().rev() {
                if r.seq > 0 && r.seq < start {
                    w.events.push_front((n, Arc::new(r)));
                }
            }
            w.from_object = n;
        }
    }
}

impl Drop for BucketFeed {
    /// The last holder let go (the space's last mount went): what it published and the
    /// thread has not written yet goes out now, from a thread of its own (the bucket may be
    /// slow or down: an unmount does not wait for it), so other hosts hear of the last changes.
    fn drop(&mut self) {
        let changes = std::mem::take(&mut lock(&self.queue).changes);
        if changes.is_empty() {
            return;
        }
        let last = BucketFeed {
            space: self.space.clone(),
            prefix: self.prefix.clone(),
            shared: self.shared.clone(),
            queue: Mutex::new(Queue {
                changes,
                ..Queue::default()
            }),
            written: Condvar::new(),
            chain: Mutex::new(std::mem::replace(&mut *lock(&self.chain), Chain::new())),
            window: Mutex::new(Window::new()),
            fanout: Fanout::default(),
        };
        let spawned = std::thread::Builder::new()
            .name("roomfs-s3-events".into())
            .spawn(move || {
                let _counted = crate::metrics::FeedRequests::enter();
                let mut chain = lock(&last.chain);
                if let Err(e) = last.write_pending(&mut chain) {
                    log::warn!(
                        "the last changes of {} could not be written to its change feed: {e}; \
                         other hosts see them at their cache TTL",
                        last.space
                    );
                }
                drop(chain);
                // Given up on, if not written: this one's drop has nothing left to write.
                lock(&last.queue).changes.clear();
            });
        if let Err(e) = spawned {
            log::warn!(
                "the last changes of {} are not written to its change feed: no thread ({e})",
                self.space
            );
        }
    }
}

impl ChangeFeed for BucketFeed {
    fn publish(&self, participant: &Arc<str>, changes: &[Changed]) {
        if changes.is_empty() {
            return;
        }
        {
            let mut q = lock(&self.queue);
            q.changes
                .extend(changes.iter().map(|c| (participant.clone(), c.clone())));
            q.published += changes.len() as u64;
        }
        self.shared.wake();
    }

    fn flush(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut q = lock(&self.queue);
        let target = q.published;
        while q.written < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!("change feed of {}: flush timed out", self.space);
                return;
            }
            q = self
                .written
                .wait_timeout(q, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn read(&self, since: u64, max: usize) -> io::Result<Backlog> {
        let _counted = crate::metrics::FeedRequests::enter();
        let mut chain = lock(&self.chain);
        // Up to date with what other hosts wrote, not only with the last poll.
        if let Err(e) = self.follow(&mut chain) {
            log::debug!("reading the change feed of {}: {e}", self.space);
        }
        self.load_older(&mut chain, since).map_err(io_err)?;
        let w = lock(&self.window);
        let start = w.events.front().map_or(chain.head + 1, |(_, r)| r.seq);
        let oldest = if w.from_object <= chain.first_object {
            chain.oldest.min(start)
        } else {
            start
        };
        Ok(Backlog {
            oldest,
            head: chain.head,
            events: w
                .events
                .iter()
                .filter(|(_, r)| r.seq > since)
                .take(max)
                .map(|(_, r)| r.clone())
                .collect(),
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Record>> {
        self.fanout.subscribe()
    }

    fn listen(&self, listener: Weak<dyn ForeignChanges>) {
        self.fanout.listen(listener);
    }
}

#[cfg(test)]
mod tests;
