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

use std::sync::Arc;

use serde_json::json;
use tokio::sync::{broadcast, mpsc};

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

/// Sends `watch`'s lines of `feed` to `out` until the watcher goes away (its receiver is
/// dropped), or, without `follow`, once the retained events are sent.
pub async fn run(feed: Arc<dyn ChangeFeed>, watch: Watch, out: mpsc::Sender<String>) {
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
    loop {
        tokio::select! {
            received = rx.recv() => match received {
                Ok(record) => {
                    if record.seq <= last {
                        continue;
                    }
                    last = record.seq;
                    if let Some(line) = line_for(&watch, &record)
                        && out.send(line).await.is_err()
                    {
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
    let missed = since + 1 < backlog.oldest;
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
            if record.seq <= last {
                continue;
            }
            last = record.seq;
            if let Some(line) = line_for(watch, record) {
                out.send(line).await.ok()?;
            }
        }
        if !full {
            return Some(last);
        }
        backlog = read(last).await?.ok()?;
    }
}
