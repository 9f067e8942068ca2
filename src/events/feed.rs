//! The change feed of a space: the seam between a space and whoever else must hear of its
//! changes. A feed gives each change made in this process its place in the space's sequence,
//! keeps the recent events for watchers that reconnect, delivers every event to the watchers
//! subscribed now, and delivers the changes other processes (or hosts) made to the space's
//! mounts in this process, so that they can drop what their kernels cached.
//!
//! Implementations, and what each costs while nothing changes:
//! - [`MemFeed`]: in-process only (tests, spaces outside a data dir). Events live in memory;
//!   no thread, nothing to do when idle.
//! - [`LogFeed`](super::log::LogFeed): an append-only change log in the data dir, shared by
//!   every roomfs process using it; one thread per process waits on inotify, so an idle space
//!   costs no wake-up at all (without inotify: one `fstat` per open space every 50 ms).
//! - [`BucketFeed`](super::bucket::BucketFeed): for spaces in an S3 bucket, a chain of objects
//!   in the bucket itself, shared by every host (and process) using it; one thread per S3 store
//!   polls it: while nothing changes, one GET (answered 404) per open space every
//!   `events_poll_secs` (4 requests per second per space and host by default).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{Changed, Origin, Record, now_ms};
use crate::error::Invalid;

/// How many events a space keeps for watchers that resume from a `seq` (`event_retention` in
/// the daemon's configuration). At least this much is kept; a log is compacted once it holds
/// half as much again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Keep at least the last this many events (`null`: no limit by count).
    pub max_events: Option<u64>,
    /// Keep events at least this many seconds (`null`: no limit by age).
    pub max_age_secs: Option<u64>,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            max_events: Some(10_000),
            max_age_secs: None,
        }
    }
}

impl Retention {
    /// Checks values serde cannot.
    pub fn check(&self) -> Result<(), Invalid> {
        if self.max_events == Some(0) {
            return Err(Invalid(
                "event_retention.max_events must be at least 1 (or null)".into(),
            ));
        }
        if self.max_age_secs == Some(0) {
            return Err(Invalid(
                "event_retention.max_age_secs must be at least 1 (or null)".into(),
            ));
        }
        Ok(())
    }

    /// Whether `count` retained events, the oldest recorded at `oldest_ms`, hold more than
    /// must be kept, by `slack` (1.0: any excess; 1.5: half as much again).
    pub fn exceeded(&self, count: u64, oldest_ms: Option<u64>, slack: f64) -> bool {
        let by_count = self
            .max_events
            .is_some_and(|max| count as f64 > max as f64 * slack);
        let by_age = match (self.max_age_secs, oldest_ms) {
            (Some(max), Some(oldest)) => {
                let age = now_ms().saturating_sub(oldest) as f64 / 1000.0;
                age > max as f64 * slack
            }
            _ => false,
        };
        by_count || by_age
    }

    /// Whether an event recorded at `time_ms`, with `newer` events after it, must still be
    /// kept.
    pub fn keeps(&self, time_ms: u64, newer: u64) -> bool {
        let by_count = self.max_events.is_none_or(|max| newer < max);
        let by_age = self
            .max_age_secs
            .is_none_or(|max| now_ms().saturating_sub(time_ms) <= max * 1000);
        by_count && by_age
    }
}

/// Hears the changes that another process (or host) made to a space, to invalidate what this
/// process's mounts cached (a [`crate::space::Space`]).
pub trait ForeignChanges: Send + Sync {
    fn heard(&self, record: &Record);
}

/// What a feed retains after a `seq`.
#[derive(Clone, Debug, Default)]
pub struct Backlog {
    /// The first event retained (`head + 1` when none is).
    pub oldest: u64,
    /// The last event recorded (0: none yet).
    pub head: u64,
    /// The events after the `since` asked for, in order.
    pub events: Vec<Arc<Record>>,
}

/// A space's change feed (see the module docs). Implementations must never block a caller of
/// `publish` on I/O: mounts call it from request handlers, after their commits.
pub trait ChangeFeed: Send + Sync {
    /// Records `changes`, made in this process by `participant`, in this order: events get
    /// the next `seq`s. Returns at once; [`ChangeFeed::flush`] waits for the recording.
    fn publish(&self, participant: &Arc<str>, changes: &[Changed]);
    /// Waits until everything published before the call is recorded and delivered.
    fn flush(&self);
    /// The retained events after `since` (at most `max` of them).
    fn read(&self, since: u64, max: usize) -> io::Result<Backlog>;
    /// Receives every event as it is recorded, whoever made it.
    fn subscribe(&self) -> broadcast::Receiver<Arc<Record>>;
    /// Has `listener` hear of the changes made by other processes (or hosts).
    fn listen(&self, listener: Weak<dyn ForeignChanges>);
}

/// How many events a subscriber may fall behind before it must read them back from the feed.
const SUBSCRIBER_BACKLOG: usize = 4096;

/// Delivery to subscribers and listeners, shared by the implementations.
pub struct Fanout {
    tx: broadcast::Sender<Arc<Record>>,
    listeners: Mutex<Vec<Weak<dyn ForeignChanges>>>,
}

impl Default for Fanout {
    fn default() -> Fanout {
        Fanout {
            tx: broadcast::channel(SUBSCRIBER_BACKLOG).0,
            listeners: Mutex::new(Vec::new()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Fanout {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Record>> {
        self.tx.subscribe()
    }

    pub fn listen(&self, listener: Weak<dyn ForeignChanges>) {
        let mut listeners = lock(&self.listeners);
        listeners.retain(|l| l.strong_count() > 0);
        listeners.push(listener);
    }

    /// Delivers `record` to subscribers (if it is an event) and, when another process made it,
    /// to listeners.
    pub fn deliver(&self, record: Arc<Record>, foreign: bool) {
        if foreign {
            let listeners: Vec<_> = lock(&self.listeners)
                .iter()
                .filter_map(Weak::upgrade)
                .collect();
            for l in listeners {
                l.heard(&record);
            }
        }
        if record.seq > 0 {
            // No subscriber is not an error.
            let _ = self.tx.send(record);
        }
    }
}

/// A feed in memory, for one process (see the module docs).
pub struct MemFeed {
    origin: Origin,
    retention: Retention,
    state: Mutex<MemState>,
    fanout: Fanout,
}

#[derive(Default)]
struct MemState {
    head: u64,
    events: VecDeque<Arc<Record>>,
}

impl MemFeed {
    pub fn new(retention: Retention) -> MemFeed {
        MemFeed {
            origin: Origin::new(),
            retention,
            state: Mutex::new(MemState::default()),
            fanout: Fanout::default(),
        }
    }
}

impl ChangeFeed for MemFeed {
    fn publish(&self, participant: &Arc<str>, changes: &[Changed]) {
        let mut state = lock(&self.state);
        for change in changes.iter().filter(|c| c.is_event()) {
            state.head += 1;
            let record = Arc::new(Record {
                seq: state.head,
                time: now_ms(),
                participant: participant.clone(),
                origin: self.origin,
                change: change.clone(),
            });
            state.events.push_back(record.clone());
            while let Some(first) = state.events.front() {
                let newer = state.events.len() as u64 - 1;
                if self.retention.keeps(first.time, newer) {
                    break;
                }
                state.events.pop_front();
            }
            // Delivered under the lock, so subscribers hear events in order.
            self.fanout.deliver(record, false);
        }
    }

    fn flush(&self) {}

    fn read(&self, since: u64, max: usize) -> io::Result<Backlog> {
        let state = lock(&self.state);
        Ok(Backlog {
            oldest: state.events.front().map_or(state.head + 1, |r| r.seq),
            head: state.head,
            events: state
                .events
                .iter()
                .filter(|r| r.seq > since)
                .take(max)
                .cloned()
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
