//! An in-memory bucket behind the [`ObjectClient`] trait, for testing the S3 store without a
//! server (as mountpoint-s3 tests against its mock client). It enforces AWS's rules, also those
//! the test engine (SeaweedFS) does not, so that the store stays portable:
//! - non-last parts of at least 5 MiB (400 EntityTooSmall), at most 2 KiB of user metadata (400
//!   MetadataTooLarge), 416 for a range past the end;
//! - `If-None-Match: *` and `If-Match` as AWS answers them: 412 when the condition fails, 404
//!   for `If-Match` on a missing key; ETags are content hashes (a copy of the same bytes has the
//!   same ETag, as on AWS), multipart ones end in `-<parts>`;
//! - keys the store must never produce are refused outright (`//`, `/./`, `/../`, a leading
//!   `/`, `\`, over 1024 bytes): SeaweedFS would rewrite or refuse them;
//! - like SeaweedFS, a directory marker (a key ending in `/`) keeps no user metadata.
//!
//! Faults can be injected per operation ([`MemClient::fail`], [`MemClient::delay`]), and every
//! request is counted ([`MemClient::count`]), so tests can say "one LIST, no HEAD".

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::client::{
    Body, ClientError, ClientResult, Condition, Failure, ListPage, ListedObject, Metadata,
    ObjectClient, ObjectInfo, Sink, UploadInfo,
};

/// The smallest part but the last, as on AWS.
pub const MIN_PART: u64 = 5 << 20;
/// The most user metadata, as on AWS (names and values together).
pub const MAX_METADATA: usize = 2048;

/// An operation of the client (for faults and counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Head,
    Get,
    Put,
    Copy,
    CreateUpload,
    UploadPart,
    UploadPartCopy,
    Complete,
    Abort,
    ListUploads,
    List,
    Delete,
    DeleteMany,
    CheckBucket,
}

#[derive(Clone)]
struct Object {
    data: std::sync::Arc<Vec<u8>>,
    etag: String,
    metadata: Metadata,
    last_modified: SystemTime,
}

struct Upload {
    key: String,
    metadata: Metadata,
    parts: BTreeMap<u32, (String, Vec<u8>)>,
}

struct Fault {
    op: Op,
    key_contains: Option<String>,
    failure: Failure,
    remaining: u32,
}

/// The in-memory bucket (see the module docs).
#[derive(Default)]
pub struct MemClient {
    objects: Mutex<BTreeMap<String, Object>>,
    uploads: Mutex<HashMap<String, Upload>>,
    faults: Mutex<Vec<Fault>>,
    /// PUTs carried out, then reported failed (see `lose_put_replies`).
    lost_replies: Mutex<Vec<(String, u32)>>,
    delays: Mutex<HashMap<Op, Duration>>,
    /// HEADs answered late: the object as it was when the request came, after this long.
    slow_head_replies: Mutex<Option<(Duration, u32)>>,
    counts: Mutex<HashMap<Op, u64>>,
    /// Bytes sent by GETs.
    bytes_got: AtomicU64,
    next_upload: AtomicU64,
    /// Ignore `If-None-Match`/`If-Match` on writes, as some S3 servers do.
    pub ignore_conditions: std::sync::atomic::AtomicBool,
    /// Seconds the store's clock is behind the hosts' (its `Last-Modified` stamps).
    pub clock_behind_secs: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    let digest = h.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

fn what(op: &str, key: &str) -> String {
    format!("{op} {key}")
}

impl MemClient {
    pub fn new() -> MemClient {
        MemClient::default()
    }

    /// The store's clock.
    fn now(&self) -> SystemTime {
        SystemTime::now() - Duration::from_secs(self.clock_behind_secs.load(Ordering::Relaxed))
    }

    /// Makes the next `times` requests of `op` (on keys containing `key_contains`, if given)
    /// fail with `failure`.
    pub fn fail(&self, op: Op, key_contains: Option<&str>, failure: Failure, times: u32) {
        lock(&self.faults).push(Fault {
            op,
            key_contains: key_contains.map(str::to_string),
            failure,
            remaining: times,
        });
    }

    /// Makes the next `times` PUTs of keys containing `key_contains` be carried out and then
    /// reported failed (`Unavailable`): a request that timed out and landed after all.
    pub fn lose_put_replies(&self, key_contains: &str, times: u32) {
        lock(&self.lost_replies).push((key_contains.to_string(), times));
    }

    /// Removes every injected fault.
    pub fn heal(&self) {
        lock(&self.faults).clear();
        lock(&self.lost_replies).clear();
        lock(&self.delays).clear();
    }

    /// Makes the next `times` HEADs answer what the object was when they came, `delay` later
    /// (a reply on its way while the object changes).
    pub fn slow_head_replies(&self, delay: Duration, times: u32) {
        *lock(&self.slow_head_replies) = Some((delay, times));
    }

    /// Makes every request of `op` take `delay` first (a slow store).
    pub fn delay(&self, op: Op, delay: Duration) {
        lock(&self.delays).insert(op, delay);
    }

    /// How many requests of `op` were made.
    pub fn count(&self, op: Op) -> u64 {
        lock(&self.counts).get(&op).copied().unwrap_or(0)
    }

    /// Forgets the counts.
    pub fn reset_counts(&self) {
        lock(&self.counts).clear();
        self.bytes_got.store(0, Ordering::Relaxed);
    }

    /// How many bytes GETs sent.
    pub fn bytes_got(&self) -> u64 {
        self.bytes_got.load(Ordering::Relaxed)
    }

    /// The keys stored, in order.
    pub fn keys(&self) -> Vec<String> {
        lock(&self.objects).keys().cloned().collect()
    }

    /// The bytes of `key`, if stored.
    pub fn object(&self, key: &str) -> Option<Vec<u8>> {
        lock(&self.objects)
            .get(key)
            .map(|o| o.data.as_ref().clone())
    }

    /// The user metadata of `key`, if stored.
    pub fn metadata(&self, key: &str) -> Option<Metadata> {
        lock(&self.objects).get(key).map(|o| o.metadata.clone())
    }

    /// Stores `key` behind the store's back (another tool, another host).
    pub fn insert(&self, key: &str, data: &[u8], metadata: Metadata) {
        let object = Object {
            data: std::sync::Arc::new(data.to_vec()),
            etag: format!("\"{}\"", hash(&[data])),
            metadata,
            last_modified: self.now(),
        };
        lock(&self.objects).insert(key.to_string(), object);
    }

    /// The multipart uploads in progress.
    pub fn upload_count(&self) -> usize {
        lock(&self.uploads).len()
    }

    /// Counts the request and applies faults and delays.
    fn enter(&self, op: Op, key: &str, label: &str) -> ClientResult<()> {
        *lock(&self.counts).entry(op).or_default() += 1;
        let delay = lock(&self.delays).get(&op).copied();
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        let mut faults = lock(&self.faults);
        if let Some(i) = faults.iter().position(|f| {
            f.op == op
                && f.remaining > 0
                && f.key_contains
                    .as_ref()
                    .is_none_or(|k| key.contains(k.as_str()))
        }) {
            let f = &mut faults[i];
            f.remaining -= 1;
            let failure = f.failure;
            if f.remaining == 0 {
                faults.remove(i);
            }
            return Err(ClientError::new(failure, what(label, key)).with_injected());
        }
        Ok(())
    }

    fn conditions(&self) -> bool {
        !self.ignore_conditions.load(Ordering::Relaxed)
    }

    fn check_condition(
        &self,
        existing: Option<&Object>,
        condition: &Condition,
        label: &str,
        key: &str,
    ) -> ClientResult<()> {
        if !self.conditions() {
            return Ok(());
        }
        match (condition, existing) {
            (Condition::None, _) => Ok(()),
            (Condition::Absent, None) => Ok(()),
            (Condition::Absent, Some(_)) => {
                Err(ClientError::new(Failure::Precondition, what(label, key)))
            }
            (Condition::Matches(_), None) => {
                Err(ClientError::new(Failure::NotFound, what(label, key)))
            }
            (Condition::Matches(e), Some(o)) if *e == o.etag => Ok(()),
            (Condition::Matches(_), Some(_)) => {
                Err(ClientError::new(Failure::Precondition, what(label, key)))
            }
        }
    }
}

impl ClientError {
    fn with_injected(mut self) -> ClientError {
        self.source = Some("injected fault".into());
        self
    }
}

/// Refuses keys the store must never produce (see the module docs).
fn check_key(key: &str, label: &str) -> ClientResult<()> {
    let bad = key.is_empty()
        || key.len() > 1024
        || key.starts_with('/')
        || key.contains("//")
        || key.contains('\\')
        || key.split('/').any(|c| c == "." || c == "..");
    if bad {
        return Err(ClientError::with_source(
            Failure::Refused,
            what(label, key),
            "invalid key",
        ));
    }
    Ok(())
}

fn check_metadata(metadata: &Metadata, label: &str, key: &str) -> ClientResult<()> {
    let size: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_METADATA {
        return Err(ClientError::with_source(
            Failure::Refused,
            what(label, key),
            "MetadataTooLarge",
        ));
    }
    Ok(())
}

impl ObjectClient for MemClient {
    fn head(&self, key: &str) -> ClientResult<ObjectInfo> {
        self.enter(Op::Head, key, "HEAD")?;
        check_key(key, "HEAD")?;
        let answer = {
            let objects = lock(&self.objects);
            let o = objects
                .get(key)
                .ok_or_else(|| ClientError::new(Failure::NotFound, what("HEAD", key)))?;
            ObjectInfo {
                size: o.data.len() as u64,
                etag: o.etag.clone(),
                last_modified: o.last_modified,
                metadata: o.metadata.clone(),
            }
        };
        let slow = {
            let mut slow = lock(&self.slow_head_replies);
            match &mut *slow {
                Some((delay, times)) if *times > 0 => {
                    *times -= 1;
                    Some(*delay)
                }
                _ => None,
            }
        };
        if let Some(delay) = slow {
            std::thread::sleep(delay);
        }
        Ok(answer)
    }

    fn get(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
        if_match: Option<&str>,
        sink: Sink<'_>,
    ) -> ClientResult<ObjectInfo> {
        self.enter(Op::Get, key, "GET")?;
        check_key(key, "GET")?;
        let o = lock(&self.objects)
            .get(key)
            .cloned()
            .ok_or_else(|| ClientError::new(Failure::NotFound, what("GET", key)))?;
        if let Some(e) = if_match
            && e != o.etag
        {
            return Err(ClientError::new(Failure::Precondition, what("GET", key)));
        }
        let size = o.data.len() as u64;
        let (start, end) = match range {
            Some((start, end)) => {
                if start >= size || end <= start {
                    return Err(ClientError::new(Failure::InvalidRange, what("GET", key)));
                }
                (start, end.min(size))
            }
            None => (0, size),
        };
        self.bytes_got.fetch_add(end - start, Ordering::Relaxed);
        // In pieces, as a network body arrives.
        for piece in o.data[start as usize..end as usize].chunks(64 << 10) {
            sink(piece)
                .map_err(|e| ClientError::with_source(Failure::Other, what("GET", key), e))?;
        }
        Ok(ObjectInfo {
            size,
            etag: o.etag,
            last_modified: o.last_modified,
            metadata: o.metadata,
        })
    }

    fn put(
        &self,
        key: &str,
        body: Body,
        metadata: &Metadata,
        condition: &Condition,
    ) -> ClientResult<String> {
        self.enter(Op::Put, key, "PUT")?;
        check_key(key, "PUT")?;
        check_metadata(metadata, "PUT", key)?;
        let data = body
            .to_vec()
            .map_err(|e| ClientError::with_source(Failure::Other, what("PUT", key), e))?;
        // The check and the write under one lock: conditional writes are atomic.
        let mut objects = lock(&self.objects);
        self.check_condition(objects.get(key), condition, "PUT", key)?;
        let etag = format!("\"{}\"", hash(&[&data]));
        let stored_meta = if key.ends_with('/') {
            Metadata::new()
        } else {
            metadata.clone()
        };
        objects.insert(
            key.to_string(),
            Object {
                data: std::sync::Arc::new(data),
                etag: etag.clone(),
                metadata: stored_meta,
                last_modified: self.now(),
            },
        );
        drop(objects);
        let mut lost = lock(&self.lost_replies);
        if let Some(i) = lost
            .iter()
            .position(|(k, n)| *n > 0 && key.contains(k.as_str()))
        {
            lost[i].1 -= 1;
            if lost[i].1 == 0 {
                lost.remove(i);
            }
            return Err(ClientError::new(Failure::Unavailable, what("PUT", key)).with_injected());
        }
        Ok(etag)
    }

    fn copy(
        &self,
        from: &str,
        to: &str,
        metadata: Option<&Metadata>,
        source_etag: Option<&str>,
        condition: &Condition,
    ) -> ClientResult<String> {
        self.enter(Op::Copy, to, "COPY")?;
        check_key(from, "COPY")?;
        check_key(to, "COPY")?;
        if let Some(m) = metadata {
            check_metadata(m, "COPY", to)?;
        }
        let mut objects = lock(&self.objects);
        let source = objects
            .get(from)
            .cloned()
            .ok_or_else(|| ClientError::new(Failure::NotFound, what("COPY", from)))?;
        if let Some(e) = source_etag
            && e != source.etag
        {
            return Err(ClientError::new(Failure::Precondition, what("COPY", from)));
        }
        self.check_condition(objects.get(to), condition, "COPY", to)?;
        let metadata = metadata.cloned().unwrap_or(source.metadata.clone());
        let metadata = if to.ends_with('/') {
            Metadata::new()
        } else {
            metadata
        };
        objects.insert(
            to.to_string(),
            Object {
                data: source.data.clone(),
                etag: source.etag.clone(),
                metadata,
                last_modified: self.now(),
            },
        );
        Ok(source.etag)
    }

    fn create_upload(&self, key: &str, metadata: &Metadata) -> ClientResult<String> {
        self.enter(Op::CreateUpload, key, "CreateMultipartUpload")?;
        check_key(key, "CreateMultipartUpload")?;
        check_metadata(metadata, "CreateMultipartUpload", key)?;
        let id = format!(
            "upload-{}",
            self.next_upload.fetch_add(1, Ordering::Relaxed)
        );
        lock(&self.uploads).insert(
            id.clone(),
            Upload {
                key: key.to_string(),
                metadata: metadata.clone(),
                parts: BTreeMap::new(),
            },
        );
        Ok(id)
    }

    fn upload_part(&self, key: &str, upload: &str, part: u32, body: Body) -> ClientResult<String> {
        self.enter(Op::UploadPart, key, "UploadPart")?;
        if !(1..=10_000).contains(&part) {
            return Err(ClientError::new(Failure::Refused, what("UploadPart", key)));
        }
        let data = body
            .to_vec()
            .map_err(|e| ClientError::with_source(Failure::Other, what("UploadPart", key), e))?;
        let etag = format!("\"{}\"", hash(&[&data]));
        let mut uploads = lock(&self.uploads);
        let u = uploads
            .get_mut(upload)
            .filter(|u| u.key == key)
            .ok_or_else(|| ClientError::new(Failure::NotFound, what("UploadPart", key)))?;
        u.parts.insert(part, (etag.clone(), data));
        Ok(etag)
    }

    fn upload_part_copy(
        &self,
        key: &str,
        upload: &str,
        part: u32,
        from: &str,
        range: (u64, u64),
        source_etag: &str,
    ) -> ClientResult<String> {
        self.enter(Op::UploadPartCopy, key, "UploadPartCopy")?;
        check_key(from, "UploadPartCopy")?;
        let source = lock(&self.objects)
            .get(from)
            .cloned()
            .ok_or_else(|| ClientError::new(Failure::NotFound, what("UploadPartCopy", from)))?;
        if source.etag != source_etag {
            return Err(ClientError::new(
                Failure::Precondition,
                what("UploadPartCopy", from),
            ));
        }
        let size = source.data.len() as u64;
        if range.0 >= size || range.1 > size || range.1 <= range.0 {
            return Err(ClientError::new(
                Failure::InvalidRange,
                what("UploadPartCopy", from),
            ));
        }
        let data = source.data[range.0 as usize..range.1 as usize].to_vec();
        let etag = format!("\"{}\"", hash(&[&data]));
        let mut uploads = lock(&self.uploads);
        let u = uploads
            .get_mut(upload)
            .filter(|u| u.key == key)
            .ok_or_else(|| ClientError::new(Failure::NotFound, what("UploadPartCopy", key)))?;
        u.parts.insert(part, (etag.clone(), data));
        Ok(etag)
    }

    fn complete_upload(
        &self,
        key: &str,
        upload: &str,
        parts: &[(u32, String)],
        condition: &Condition,
    ) -> ClientResult<String> {
        self.enter(Op::Complete, key, "CompleteMultipartUpload")?;
        let label = "CompleteMultipartUpload";
        let mut uploads = lock(&self.uploads);
        let u = uploads
            .get(upload)
            .filter(|u| u.key == key)
            .ok_or_else(|| ClientError::new(Failure::NotFound, what(label, key)))?;
        if parts.is_empty() || parts.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(ClientError::with_source(
                Failure::Refused,
                what(label, key),
                "InvalidPartOrder",
            ));
        }
        let mut data = Vec::new();
        let mut etags = Vec::new();
        for (i, (n, etag)) in parts.iter().enumerate() {
            let (stored, bytes) = u.parts.get(n).ok_or_else(|| {
                ClientError::with_source(Failure::Refused, what(label, key), "InvalidPart")
            })?;
            if stored != etag {
                return Err(ClientError::with_source(
                    Failure::Refused,
                    what(label, key),
                    "InvalidPart",
                ));
            }
            if i + 1 < parts.len() && (bytes.len() as u64) < MIN_PART {
                return Err(ClientError::with_source(
                    Failure::Refused,
                    what(label, key),
                    "EntityTooSmall",
                ));
            }
            data.extend_from_slice(bytes);
            etags.push(etag.as_bytes().to_vec());
        }
        let mut objects = lock(&self.objects);
        self.check_condition(objects.get(key), condition, label, key)?;
        let refs: Vec<&[u8]> = etags.iter().map(Vec::as_slice).collect();
        let etag = format!("\"{}-{}\"", hash(&refs), parts.len());
        let metadata = u.metadata.clone();
        uploads.remove(upload);
        drop(uploads);
        objects.insert(
            key.to_string(),
            Object {
                data: std::sync::Arc::new(data),
                etag: etag.clone(),
                metadata,
                last_modified: self.now(),
            },
        );
        Ok(etag)
    }

    fn abort_upload(&self, key: &str, upload: &str) -> ClientResult<()> {
        self.enter(Op::Abort, key, "AbortMultipartUpload")?;
        lock(&self.uploads).remove(upload);
        Ok(())
    }

    fn list_uploads(&self, prefix: &str) -> ClientResult<Vec<UploadInfo>> {
        self.enter(Op::ListUploads, prefix, "ListMultipartUploads")?;
        let mut out: Vec<UploadInfo> = lock(&self.uploads)
            .iter()
            .filter(|(_, u)| u.key.starts_with(prefix))
            .map(|(id, u)| UploadInfo {
                key: u.key.clone(),
                upload_id: id.clone(),
            })
            .collect();
        out.sort_by(|a, b| (&a.key, &a.upload_id).cmp(&(&b.key, &b.upload_id)));
        Ok(out)
    }

    fn list(
        &self,
        prefix: &str,
        delimited: bool,
        token: Option<&str>,
        max_keys: Option<u32>,
    ) -> ClientResult<ListPage> {
        self.enter(Op::List, prefix, "LIST")?;
        let max = max_keys.unwrap_or(1000).clamp(1, 1000) as usize;
        let objects = lock(&self.objects);
        let mut page = ListPage::default();
        let mut count = 0;
        let mut last: Option<String> = None;
        let start = token.unwrap_or(prefix).to_string();
        for (key, o) in objects.range(start.clone()..) {
            if !key.starts_with(prefix) {
                break;
            }
            if token.is_some() && *key <= start {
                continue;
            }
            let rest = &key[prefix.len()..];
            if delimited && let Some(i) = rest.find('/') {
                let common = format!("{prefix}{}", &rest[..=i]);
                if page.prefixes.last() == Some(&common)
                    || token.is_some_and(|t| common.as_str() <= t)
                {
                    continue;
                }
                if count == max {
                    page.next = last;
                    return Ok(page);
                }
                page.prefixes.push(common.clone());
                // The next page starts after every key under this prefix.
                last = Some(format!("{common}\u{10ffff}"));
                count += 1;
                continue;
            }
            if count == max {
                page.next = last;
                return Ok(page);
            }
            page.objects.push(ListedObject {
                key: key.clone(),
                size: o.data.len() as u64,
                etag: o.etag.clone(),
                last_modified: o.last_modified,
            });
            last = Some(key.clone());
            count += 1;
        }
        Ok(page)
    }

    fn list_after(&self, prefix: &str, start_after: &str) -> ClientResult<ListPage> {
        // (This bucket's continuation token is the last key of a page: a start-after.)
        self.list(prefix, true, Some(start_after), None)
    }

    fn delete(&self, key: &str) -> ClientResult<()> {
        self.enter(Op::Delete, key, "DELETE")?;
        check_key(key, "DELETE")?;
        lock(&self.objects).remove(key);
        Ok(())
    }

    fn delete_many(&self, keys: &[String]) -> ClientResult<()> {
        let first = keys.first().map(String::as_str).unwrap_or("");
        self.enter(Op::DeleteMany, first, "DeleteObjects")?;
        if keys.len() > super::client::DELETE_BATCH {
            return Err(ClientError::new(Failure::Refused, "DeleteObjects"));
        }
        let mut objects = lock(&self.objects);
        for k in keys {
            objects.remove(k);
        }
        Ok(())
    }

    fn check_bucket(&self) -> ClientResult<()> {
        self.enter(Op::CheckBucket, "", "HeadBucket")
    }

    fn presign_get(
        &self,
        key: &str,
        expires_in: Duration,
        content_disposition: &str,
    ) -> ClientResult<String> {
        // Nothing is signed in memory: the URL only names what a real one would carry.
        Ok(format!(
            "memory:///{key}?expires_in={}&disposition={content_disposition}",
            expires_in.as_secs()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(c: &MemClient, key: &str, data: &[u8], cond: &Condition) -> ClientResult<String> {
        c.put(
            key,
            Body::Bytes(std::sync::Arc::new(data.to_vec())),
            &Metadata::new(),
            cond,
        )
    }

    #[test]
    fn conditions_parts_and_metadata_follow_aws() {
        let c = MemClient::new();
        let e1 = put(&c, "k", b"one", &Condition::Absent).unwrap();
        let again = put(&c, "k", b"two", &Condition::Absent).unwrap_err();
        assert!(again.is(Failure::Precondition));
        let missing = put(&c, "nokey", b"x", &Condition::Matches(e1.clone())).unwrap_err();
        assert!(missing.is(Failure::NotFound), "AWS answers 404");
        put(&c, "k", b"two", &Condition::Matches(e1.clone())).unwrap();
        assert!(
            put(&c, "k", b"3", &Condition::Matches(e1))
                .unwrap_err()
                .is(Failure::Precondition)
        );
        let big: Metadata = [("x".to_string(), "y".repeat(3000))].into();
        let e = c
            .put("m", Body::empty(), &big, &Condition::None)
            .unwrap_err();
        assert!(e.is(Failure::Refused), "{e}");
        for bad in ["/a", "a//b", "a/./b", "a/../b", "a\\b", ".."] {
            assert!(
                put(&c, bad, b"", &Condition::None)
                    .unwrap_err()
                    .is(Failure::Refused),
                "{bad}"
            );
        }
        // Parts: all but the last at least 5 MiB.
        let id = c.create_upload("mp", &Metadata::new()).unwrap();
        let small = Body::Bytes(std::sync::Arc::new(vec![1; 10]));
        let p1 = c.upload_part("mp", &id, 1, small.clone()).unwrap();
        let p2 = c.upload_part("mp", &id, 2, small).unwrap();
        let e = c
            .complete_upload("mp", &id, &[(1, p1), (2, p2)], &Condition::None)
            .unwrap_err();
        assert!(e.to_string().contains("EntityTooSmall") || e.is(Failure::Refused));
        c.abort_upload("mp", &id).unwrap();
        assert_eq!(c.upload_count(), 0);
        // Ranges past the end.
        let mut sink = |_: &[u8]| Ok(());
        assert!(
            c.get("k", Some((3, 10)), None, &mut sink)
                .unwrap_err()
                .is(Failure::InvalidRange)
        );
    }

    #[test]
    fn listings_group_by_the_delimiter_and_page() {
        let c = MemClient::new();
        for k in ["p/a", "p/b", "p/d/1", "p/d/2", "p/e", "p/f/x", "q"] {
            put(&c, k, b"1", &Condition::None).unwrap();
        }
        let mut token = None;
        let (mut objects, mut prefixes, mut pages) = (vec![], vec![], 0);
        loop {
            let page = c.list("p/", true, token.as_deref(), Some(2)).unwrap();
            pages += 1;
            objects.extend(page.objects.into_iter().map(|o| o.key));
            prefixes.extend(page.prefixes);
            match page.next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        assert_eq!(objects, ["p/a", "p/b", "p/e"]);
        assert_eq!(prefixes, ["p/d/", "p/f/"]);
        assert_eq!(pages, 3);
        let all = c.list("p/", false, None, None).unwrap();
        assert_eq!(all.objects.len(), 6);
    }
}
