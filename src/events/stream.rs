//! What a watcher of a space's events receives (`GET /v1/events`, `roomfs events`): NDJSON,
//! one event per line, in `seq` order, from the `seq` it resumes after.
//!
//! - The retained events after `since` come first, then (when following) each new event as it
//!   is recorded. Nothing is missed between the two: the watcher subscribes before it reads
//!   what is retained, and skips what it has already sent.
//! - If `since` is older than what the space retains (or newer than its last event: the log
//!   was lost or made anew), the first line says so, `{"type": "events.gap", "space",
//!   "since", "oldest_seq", "head_seq"}`: the watcher has missed events and should scan the
//!   space again. The retained events follow.
//! - A watcher with a grant sees only the events of paths inside it; a move across its
//!   boundary shows as the removal or the arrival it is from inside ([`Changed::as_seen_by`]).
//! - A watcher that falls behind by more than the feed buffers reads the events it missed back
//!   from the feed (a gap line if they are no longer retained).
//! - A follower's stream ends when there is nothing more to follow: the daemon stops, or the
//!   space is deleted (a session ended). Its last line says why, `{"type": "events.end",
//!   "space", "reason": "stopping" | "deleted", "last_seq"}`, `last_seq` being where to resume
//!   ([`Ends`]). A stream that stops without it was cut (the daemon died, the connection broke).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::json;
use tokio::sync::{broadcast, mpsc, watch};

use super::{ChangeFeed, Changed, Record};
use crate::grant::Grant;

/// Events read from a feed at a time.
const CHUNK: usize = 1000;

/// What a watcher asked for.
#[derive(Clone, Debug)]
pub struct Watch {
    /// The space's name in events (`rooms/r1`).
    pub space: String,
    /// The last `seq` the watcher has seen (0: none).
    pub since: u64,
    /// Stay open and send new events as they come.
    pub follow: bool,
    /// Only what this grant shows (a watcher with a token).
    pub grant: Option<Grant>,
}

/// The line a watcher gets for `record`, if it sees it.
pub fn line_for(watch: &Watch, record: &Record) -> Option<String> {
    let change: Changed = match &watch.grant {
        Some(grant) => record.change.as_seen_by(grant)?,
        None if record.change.is_event() => record.change.clone(),
        None => return None,
    };
    let mut line = record.event_json(&watch.space, &change).to_string();
    line.push('\n');
    Some(line)
}

/// Runs `call` (a feed's blocking read) off the async threads.
async fn blocking<T: Send + 'static>(call: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(call).await.ok()
}

/// Why followers' streams end (the `reason` of an `events.end` line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The daemon is stopping: resume from `last_seq` once it is back.
    Stopping,
    /// The space was deleted (its session ended): nothing more will come.
    Deleted,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Stopping => "stopping",
            End::Deleted => "deleted",
        }
    }
}

/// Ends followers' streams: those of one space when it is deleted, all of them when the
/// daemon stops (an HTTP server's graceful shutdown waits for every response to finish, and a
/// follower's never would). Holds one channel per space followed now.
#[derive(Default)]
pub struct Ends {
    inner: Mutex<EndsInner>,
}

#[derive(Default)]
struct EndsInner {
    /// Set once the daemon stops: streams started after that end at once.
    stopping: bool,
    spaces: HashMap<String, watch::Sender<Option<End>>>,
}

/// What a stream watches to know when to end (`None` until it must).
pub type EndSignal = watch::Receiver<Option<End>>;

impl Ends {
    /// The signal for a stream of `space` (its name in events, `sessions/s1`).
    pub fn signal(&self, space: &str) -> EndSignal {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let initial = inner.stopping.then_some(End::Stopping);
        inner.spaces.retain(|_, tx| tx.receiver_count() > 0);
        inner
            .spaces
            .entry(space.to_owned())
            .or_insert_with(|| watch::channel(initial).0)
            .subscribe()
    }

    /// How many streams of `space` there are now.
    pub fn streams(&self, space: &str) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.spaces.get(space).map_or(0, |tx| tx.receiver_count())
    }

    /// Ends the streams of `space`, which was deleted. (Streams of a space made again under
    /// the same name get a channel of their own.)
    pub fn deleted(&self, space: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = inner.spaces.remove(space) {
            // The streams still see the value once the sender is gone.
            tx.send_replace(Some(End::Deleted));
        }
    }

    /// Ends every stream, now and from now on.
    pub fn stopping(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.stopping = true;
        for tx in inner.spaces.values() {
            tx.send_replace(Some(End::Stopping));
        }
    }
}

/// The last line of a follower's stream.
fn end_line(watch: &Watch, end: End, last: u64) -> String {
    let line = json!({
        "type": "events.end",
        "space": watch.space,
        "reason": end.as_str(),
        "last_seq": last,
    });
    format!("{line}\n")
}

/// Sends `watch`'s lines of `feed` to `out` until the watcher goes away (its receiver is
/// dropped), or `ended` says to stop (then an `events.end` line last), or, without `follow`,
/// once the retained events are sent.
pub async fn run(
    feed: Arc<dyn ChangeFeed>,
    watch: Watch,
    out: mpsc::Sender<String>,
    mut ended: EndSignal,
) {
    let mut rx = feed.subscribe();
    if !watch.follow {
        // What this process published before the request is in the answer.
        let f = feed.clone();
        if blocking(move || f.flush()).await.is_none() {
            return;
        }
    }
    let Some(mut last) = catch_up(&feed, &watch, watch.since, true, &out).await else {
        return;
    };
    if !watch.follow {
        return;
    }
    // Whether whoever ends streams is still there to (the channel's sender).
    let mut endable = true;
    loop {
        let end = *ended.borrow_and_update();
        if let Some(end) = end {
            // What was delivered before the end goes out first.
            while let Ok(record) = rx.try_recv() {
                if send(&watch, &record, &mut last, &out).await.is_none() {
                    return;
                }
            }
            let _ = out.send(end_line(&watch, end, last)).await;
            return;
        }
        tokio::select! {
            changed = ended.changed(), if endable => endable = changed.is_ok(),
            received = rx.recv() => match received {
                Ok(record) => {
                    if send(&watch, &record, &mut last, &out).await.is_none() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    match catch_up(&feed, &watch, last, false, &out).await {
                        Some(l) => last = l,
                        None => return,
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = out.closed() => return,
        }
    }
}

/// Sends `record` if the watcher sees it and has not had it yet; `None` once it is gone.
async fn send(
    watch: &Watch,
    record: &Record,
    last: &mut u64,
    out: &mpsc::Sender<String>,
) -> Option<()> {
    if record.seq <= *last {
        return Some(());
    }
    *last = record.seq;
    match line_for(watch, record) {
        Some(line) => out.send(line).await.ok(),
        None => Some(()),
    }
}

/// Sends the retained events after `since` (a gap line first if they do not reach back that
/// far; with `first`, also if `since` is past the last event). Returns the last `seq` sent or
/// passed over, or `None` once the watcher is gone or the feed failed.
async fn catch_up(
    feed: &Arc<dyn ChangeFeed>,
    watch: &Watch,
    since: u64,
    first: bool,
    out: &mpsc::Sender<String>,
) -> Option<u64> {
    let read = |from: u64| {
        let feed = feed.clone();
        async move { blocking(move || feed.read(from, CHUNK)).await }
    };
    let mut backlog = match read(since).await? {
        Ok(b) => b,
        Err(e) => {
            log::warn!("reading the events of {}: {e}", watch.space);
            return None;
        }
    };
    let missed = since.saturating_add(1) < backlog.oldest;
    let lost = first && since > backlog.head;
    let mut last = since;
    if missed || lost {
        let gap = json!({
            "type": "events.gap",
            "space": watch.space,
            "since": since,
            "oldest_seq": backlog.oldest,
            "head_seq": backlog.head,
        });
        out.send(format!("{gap}\n")).await.ok()?;
        if lost {
            // The watcher's place is in another history: all of this one follows.
            last = 0;
            backlog = read(0).await?.ok()?;
        }
    }
    loop {
        let full = backlog.events.len() >= CHUNK;
        for record in &backlog.events {
            send(watch, record, &mut last, out).await?;
        }
        if !full {
            return Some(last);
        }
        backlog = read(last).await?.ok()?;
    }
}
