//! Commits: how a close (or fsync) becomes the object.
//!
//! - **Whole** (a writer's working copy): below `part_size`, one PUT streamed from the spool
//!   file; from it on, a multipart upload of `part_size` parts, several in flight, reusing the
//!   parts the copy uploaded early (see `spool`). The object appears only at the PUT's or
//!   CompleteMultipartUpload's success; on failure (after the client's retries) the upload is
//!   aborted and the previous object is untouched. Unconditional: the last close wins, whole.
//! - **Ranges** (random writes into a large file): a multipart upload where every part the
//!   writer did not touch is copied server-side from the version it started from
//!   (UploadPartCopy, on that version's ETag), and only the touched parts are uploaded. If that
//!   version is gone meanwhile, the copy is completed and committed whole (the last close wins).
//! - **Append** (bytes added at the end): the base and the bytes, as one PUT (the base read from
//!   the cache, or fetched) while small, else as a multipart upload copying the base
//!   server-side and uploading the bytes as the last part. An `O_APPEND` writer's commit is
//!   conditional on the base's ETag (`If-Match`): if another host committed meanwhile, its
//!   bytes go after that version instead, retried until they go in, so appenders on several
//!   hosts keep all their bytes. A multipart completion's condition is only as atomic as the
//!   store makes it (SeaweedFS 4.48 does not: see doc/S3.md).
//!
//! Every new object carries the mode and owner of the version it replaces, and no explicit
//! mtime (its `Last-Modified` is its mtime).

use std::any::Any;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::attrs::Attrs;
use super::client::{Body, ClientError, Condition, Failure, Metadata};
use super::content::S3Content;
use super::spool::{EarlyUpload, SpoolCopy};
use super::store::S3Store;
use super::{MAX_PARTS, MIN_PART, Shared};
use crate::store::{
    Change, CommitRequest, Committed, Content, StoreError, StoreResult, TimeSpec, WorkingCopy,
};

/// A request run on the part threads.
type Job<T> = Box<dyn FnOnce() -> Result<T, ClientError> + Send>;

/// How long a conditional append goes on trying while other writers append first (each time
/// after theirs), before it gives up with `EIO`.
const APPEND_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// The pause before the next try of an append that other writers went before: growing from
/// 2 ms to at most 32 ms, and random within half of that either way, so that the tries of
/// several losers spread among the winners' appends (a fixed, longer pause let appenders on
/// another host win every time: one host appended 9 lines in 20 s, then failed).
fn append_pause(attempt: u32) -> std::time::Duration {
    use std::hash::{BuildHasher, Hasher};
    let ceiling = 2u64 << attempt.min(4);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(attempt);
    let micros = ceiling * 1000 / 2 + h.finish() % (ceiling * 1000);
    std::time::Duration::from_micros(micros)
}

/// What a commit wrote.
struct Written {
    etag: String,
    size: u64,
    /// A local file holding exactly the new version, for the cache.
    file: Option<Arc<File>>,
    followed: bool,
    /// The new version's lineage.
    lineage: String,
    /// For appends that extend their base (the new version begins with it, same lineage):
    /// the base's ETag.
    extends: Option<String>,
}

/// `metadata` with the lineage `lineage`.
fn with_lineage(metadata: &Metadata, lineage: &str) -> Metadata {
    let mut m = metadata.clone();
    m.insert(super::LINEAGE.into(), lineage.to_string());
    m
}

fn own<'a>(store: &S3Store, copy: &'a Arc<dyn WorkingCopy>) -> StoreResult<&'a SpoolCopy> {
    (copy.as_ref() as &dyn Any)
        .downcast_ref::<SpoolCopy>()
        .filter(|c| Arc::ptr_eq(c.shared(), store.shared()))
        .ok_or_else(|| {
            StoreError::failed(
                libc::EXDEV,
                "commit",
                io::Error::other("the working copy was made by another store"),
            )
        })
}

pub(super) fn commit(store: &S3Store, req: CommitRequest<'_>) -> StoreResult<Committed> {
    let path = req.path;
    let base_tag = req
        .base
        .meta()
        .version
        .tag()
        .unwrap_or_default()
        .to_string();
    let result = commit_once(store, req);
    if let Err(e) = &result
        && e.raw_os_error() == libc::EIO
        && super::store::is_new_tag(&base_tag)
    {
        // The store failed the first commit of a file this host created: whether the object
        // was made (a request timed out but landed later) is the store's to say from now on,
        // not this host's memory of the create (which would show the file empty for as long
        // as the mount lives). A later commit of a handle still open makes it.
        store.unmade(path, &base_tag);
    }
    result
}

fn commit_once(store: &S3Store, req: CommitRequest<'_>) -> StoreResult<Committed> {
    let key = store.keys().key(req.path)?;
    let base_meta = req.base.meta().clone();
    let base_tag = base_meta.version.tag().unwrap_or_default().to_string();
    let new = super::store::is_new_tag(&base_tag);
    if new
        && matches!(req.change, Change::Append { tail, .. } if tail.is_empty())
        && !store.still_pending(req.path, &base_tag)
    {
        // A file created and closed empty, made meanwhile by another open's commit (or a
        // rename or a change of attributes): nothing of this handle's is left to write.
        if let Ok(meta) = store.lookup(req.path) {
            return Ok(Committed {
                // Counted by whoever made it.
                replaced_size: meta.size,
                content: store.content(key, meta, None),
                followed: false,
            });
        }
    }
    // What it replaces, for the space's byte count: the file as this host last knew it (a
    // commit of another handle since the base, or its listing), else the base.
    let replaced_size = match store.remembered(req.path) {
        Some(known) => known.map_or(0, |m| m.size),
        None => base_meta.size,
    };
    // The mode and owner of the version it replaces (as this store last set them: a write by
    // another user drops set-IDs after the open); its mtime is the new object's own.
    let before = store.meta_attrs(&store.attrs_base(req.path, &base_meta));
    let mut attrs = before;
    attrs.mtime = None;
    // Attributes set while the writer held the change go with it: one PUT, instead of a
    // HEAD, a copy onto itself and an index write each (see `Capabilities::attrs_at_commit`).
    if let Some(set) = &req.attrs {
        attrs.perm = set.perm.unwrap_or(attrs.perm);
        attrs.uid = set.uid.unwrap_or(attrs.uid);
        attrs.gid = set.gid.unwrap_or(attrs.gid);
        // `UTIME_NOW` (`touch`): the new version's own time, its `Last-Modified`.
        attrs.mtime = match set.mtime {
            Some(TimeSpec::At(t)) => Some(t),
            Some(TimeSpec::Now) | None => None,
        };
    }
    // Listings show a file's mode, owner and explicit mtime from its directory's index: one
    // narrowed by this commit goes there before the version does.
    let listed = Attrs {
        mtime: None,
        ..before
    };
    let indexed = req.attrs.is_some() && attrs != listed;
    if indexed && let Err(e) = store.narrow_index_first(req.path, &attrs) {
        log::warn!(
            "{}: the narrower mode or owner set before its commit is not in its directory's \
             index yet (listings show the previous one until the commit's index write): {e}",
            req.path.display()
        );
    }
    let metadata = attrs.to_metadata();
    let written = match &req.change {
        Change::Whole(copy) => {
            let own = own(store, copy)?;
            whole(
                store.shared(),
                &key,
                own,
                &with_lineage(&metadata, own.lineage()),
            )?
        }
        Change::Ranges {
            copy,
            written,
            complete,
        } => {
            let own = own(store, copy)?;
            let lineage = store.shared().new_lineage();
            match ranged(
                store,
                &key,
                req.base,
                own,
                written,
                &with_lineage(&metadata, &lineage),
            )? {
                Some(w) => w,
                None => {
                    complete()?;
                    whole(
                        store.shared(),
                        &key,
                        own,
                        &with_lineage(&metadata, own.lineage()),
                    )?
                }
            }
        }
        Change::Append { tail, follow } => {
            append(store, req.path, &key, req.base, tail, *follow, &metadata)?
        }
    };
    let cache = &store.shared().cache;
    // Appends grow a whole cached base in place, which its passthrough readers read on into.
    let grown = match (&req.change, &written.extends) {
        (Change::Append { tail, .. }, Some(base)) => {
            cache.grow(&key, base, tail, &written.etag, written.size)
        }
        _ => None,
    };
    // Not grown: another append of this host to the file may be growing an older entry now.
    let kept = grown.is_none()
        && written.extends.is_some()
        && store.keeps_growing(&key, &written.lineage, written.size);
    let entry = grown.or_else(|| {
        (!kept)
            .then_some(written.file.as_ref())
            .flatten()
            .and_then(|f| cache.adopt(&key, &written.etag, f, written.size))
    });
    if entry.is_none() && !kept {
        store.shared().cache.forget(&key);
    }
    store.shared().learn_lineage(
        &key,
        &written.etag,
        &with_lineage(&Metadata::new(), &written.lineage),
    );
    store.shared().committed_to(&key);
    if new {
        store.created(req.path, &base_tag);
    }
    // The entry follows what the commit set (its mtime is of this version).
    // The version is committed whatever becomes of the entry: a failure to write it is
    // logged (`stat` shows the attributes, from the object; a listing the entry's).
    if indexed
        && let Err(e) = store.index_attrs(
            req.path,
            &attrs,
            Some(&written.etag),
            !before.are_default(store.defaults()),
        )
    {
        log::warn!(
            "{}: the attributes set before its commit are on the object but not in its \
             directory's index (listings show the previous ones): {e}",
            req.path.display()
        );
    }
    let meta = store.made_meta(req.path, written.size, &written.etag, &attrs);
    store.remember(req.path, Some(meta.clone()));
    let content: Arc<dyn Content> = Arc::new(S3Content::new(
        store.shared().clone(),
        key,
        written.etag,
        meta,
        entry,
    ));
    Ok(Committed {
        content,
        replaced_size,
        followed: written.followed,
    })
}

/// The early upload of `copy` (see `SpoolCopy::take_early`), or `EIO` if the store left an
/// early request unanswered while the close waited for it (the upload is then aborted).
fn taken_early(
    shared: &Arc<Shared>,
    key: &str,
    copy: &SpoolCopy,
) -> StoreResult<Option<EarlyUpload>> {
    let taken = copy.take_early();
    let Some(cause) = taken.unavailable else {
        return Ok(taken.early);
    };
    if let Some(e) = taken.early {
        shared.abort_upload_later(
            copy.key().unwrap_or(key).to_string(),
            e.upload_id,
            e.journal,
        );
    }
    Err(StoreError::failed(
        libc::EIO,
        format!("commit {key}"),
        io::Error::other(format!(
            "the store did not answer this file's early upload while the close waited: {cause}"
        )),
    )
    .transient())
}

/// Uploads the whole copy to `key` (see the module docs).
fn whole(
    shared: &Arc<Shared>,
    key: &str,
    copy: &SpoolCopy,
    metadata: &Metadata,
) -> StoreResult<Written> {
    let size = copy.size();
    let early = taken_early(shared, key, copy)?;
    let result = if size < shared.part_size {
        if let Some(e) = early {
            shared.abort_upload_later(
                copy.key().unwrap_or(key).to_string(),
                e.upload_id,
                e.journal,
            );
        }
        let body = Body::File {
            file: copy.file().clone(),
            offset: 0,
            len: size,
        };
        shared
            .client
            .put(key, body, metadata, &Condition::None)
            .map_err(StoreError::from)
    } else {
        let early = match early {
            Some(e) if copy.key() == Some(key) => Some(e),
            Some(e) => {
                // Made for another name (the file was renamed while written).
                shared.abort_upload_later(
                    copy.key().unwrap_or(key).to_string(),
                    e.upload_id,
                    e.journal,
                );
                None
            }
            None => None,
        };
        let early_metadata = copy.early_metadata().cloned();
        multipart(shared, key, copy.file(), size, metadata, early).and_then(|etag| {
            // Parts uploaded early carry the metadata of when the copy was made.
            match early_metadata {
                Some(m) if m != *metadata => shared
                    .client
                    .copy(key, key, Some(metadata), Some(&etag), &Condition::None)
                    .map_err(StoreError::from),
                _ => Ok(etag),
            }
        })
    };
    match result {
        Ok(etag) => Ok(Written {
            etag,
            size,
            file: Some(copy.file().clone()),
            followed: false,
            lineage: metadata.get(super::LINEAGE).cloned().unwrap_or_default(),
            extends: None,
        }),
        Err(e) => {
            copy.reopen();
            Err(e.context(format!("commit {key}")))
        }
    }
}

/// Uploads `size` bytes of `file` to `key` as a multipart upload, taking over `early` (its
/// parts still valid are not uploaded again); aborts the upload if anything fails.
fn multipart(
    shared: &Shared,
    key: &str,
    file: &Arc<File>,
    size: u64,
    metadata: &Metadata,
    early: Option<EarlyUpload>,
) -> StoreResult<String> {
    let part = shared.part_size;
    let n = size.div_ceil(part) as usize;
    if n > MAX_PARTS {
        return Err(StoreError::failed(
            libc::EFBIG,
            format!("commit {key}"),
            io::Error::other(format!(
                "{size} bytes need more than {MAX_PARTS} parts of {part}: raise part_size"
            )),
        ));
    }
    let (upload_id, journal, have) = match early {
        Some(e) => (e.upload_id, e.journal, e.parts),
        None => {
            let (id, j) = shared.create_upload(key, metadata)?;
            (id, j, HashMap::new())
        }
    };
    let mut etags: Vec<Option<String>> = (0..n).map(|i| have.get(&i).cloned()).collect();
    let jobs: Vec<Job<(usize, String)>> = (0..n)
        .filter(|i| etags[*i].is_none())
        .map(|i| {
            let (client, file, key, id) = (
                shared.client.clone(),
                file.clone(),
                key.to_string(),
                upload_id.clone(),
            );
            Box::new(move || {
                let start = i as u64 * part;
                let len = part.min(size - start);
                let body = Body::File {
                    file,
                    offset: start,
                    len,
                };
                let etag = client.upload_part(&key, &id, i as u32 + 1, body)?;
                Ok((i, etag))
            }) as Job<(usize, String)>
        })
        .collect();
    for r in shared.pool.run_all(jobs) {
        match r {
            Ok((i, etag)) => etags[i] = Some(etag),
            Err(e) => {
                shared.abort_upload(key, &upload_id, journal);
                return Err(e.into());
            }
        }
    }
    let parts: Vec<(u32, String)> = etags
        .into_iter()
        .enumerate()
        .map(|(i, e)| (i as u32 + 1, e.expect("every part uploaded")))
        .collect();
    finish(shared, key, upload_id, journal, &parts, &Condition::None)
}

/// Completes an upload, or aborts it if that fails.
fn finish(
    shared: &Shared,
    key: &str,
    upload_id: String,
    journal: super::state::Journaled,
    parts: &[(u32, String)],
    condition: &Condition,
) -> StoreResult<String> {
    match shared
        .client
        .complete_upload(key, &upload_id, parts, condition)
    {
        Ok(etag) => {
            journal.done();
            Ok(etag)
        }
        Err(e) => {
            shared.abort_upload(key, &upload_id, journal);
            Err(e.into())
        }
    }
}

/// The S3 content behind a base, if it is one of this store's.
fn s3_content(base: &Arc<dyn Content>) -> Option<&S3Content> {
    (base.as_ref() as &dyn Any).downcast_ref::<S3Content>()
}

/// Commits only the changed parts of a large file, copying the others server-side; `None`
/// when that cannot be done (nothing to copy, or the base version is gone): the caller
/// commits the whole copy.
fn ranged(
    store: &S3Store,
    key: &str,
    base: &Arc<dyn Content>,
    copy: &SpoolCopy,
    written: &[(u64, u64)],
    metadata: &Metadata,
) -> StoreResult<Option<Written>> {
    let shared = store.shared();
    let Some(source) = s3_content(base) else {
        return Ok(None);
    };
    let (base_size, size, part) = (base.meta().size, copy.size(), shared.part_size);
    let n = size.div_ceil(part) as usize;
    if size < base_size || n > MAX_PARTS || base_size < MIN_PART {
        return Ok(None);
    }
    let touched = |start: u64, end: u64| {
        end > base_size || written.iter().any(|&(o, l)| o < end && o + l > start)
    };
    let clean: Vec<bool> = (0..n)
        .map(|i| {
            let start = i as u64 * part;
            !touched(start, (start + part).min(size))
        })
        .collect();
    if !clean.iter().any(|c| *c) {
        return Ok(None);
    }
    if let Some(e) = taken_early(shared, key, copy)? {
        shared.abort_upload_later(
            copy.key().unwrap_or(key).to_string(),
            e.upload_id,
            e.journal,
        );
    }
    let (upload_id, journal) = shared.create_upload(key, metadata)?;
    let (source_key, source_etag) = (source.key().to_string(), source.etag().to_string());
    let written: Arc<Vec<(u64, u64)>> = Arc::new(written.to_vec());
    let jobs: Vec<Job<String>> = (0..n)
        .map(|i| {
            let start = i as u64 * part;
            let end = (start + part).min(size);
            let (client, key, id) = (shared.client.clone(), key.to_string(), upload_id.clone());
            let (source_key, source_etag) = (source_key.clone(), source_etag.clone());
            let file = copy.file().clone();
            let base = base.clone();
            let written = written.clone();
            let is_clean = clean[i];
            Box::new(move || {
                if is_clean {
                    return client.upload_part_copy(
                        &key,
                        &id,
                        i as u32 + 1,
                        &source_key,
                        (start, end),
                        &source_etag,
                    );
                }
                let buf = assemble(&file, &base, &written, base_size, start, end).map_err(|e| {
                    // The base's bytes could not be read: is it gone?
                    let failure = e
                        .get_ref()
                        .and_then(|s| s.downcast_ref::<ClientError>())
                        .map_or(Failure::Other, |c| c.failure);
                    ClientError::with_source(failure, format!("reading part {}", i + 1), e)
                })?;
                client.upload_part(&key, &id, i as u32 + 1, Body::Bytes(Arc::new(buf)))
            }) as Job<String>
        })
        .collect();
    let mut parts = Vec::with_capacity(n);
    let mut gone = false;
    let mut failed = None;
    for (i, r) in shared.pool.run_all(jobs).into_iter().enumerate() {
        match r {
            Ok(etag) => parts.push((i as u32 + 1, etag)),
            Err(e) if e.is(Failure::Precondition) || e.is(Failure::NotFound) => gone = true,
            Err(e) => failed = Some(e),
        }
    }
    if gone || failed.is_some() {
        shared.abort_upload(key, &upload_id, journal);
        if let Some(e) = failed {
            return Err(StoreError::from(e).context(format!("commit {key}")));
        }
        // The version the writer started from was replaced: its copy wins whole.
        return Ok(None);
    }
    let etag = finish(shared, key, upload_id, journal, &parts, &Condition::None)?;
    Ok(Some(Written {
        etag,
        size,
        file: None,
        followed: false,
        lineage: metadata.get(super::LINEAGE).cloned().unwrap_or_default(),
        extends: None,
    }))
}

/// The bytes of `start..end` of the new version: the writer's where it wrote (and past the
/// base's end), the base's elsewhere.
fn assemble(
    copy: &File,
    base: &Arc<dyn Content>,
    written: &[(u64, u64)],
    base_size: u64,
    start: u64,
    end: u64,
) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; (end - start) as usize];
    read_file(copy, &mut buf, start)?;
    // The stretches below the base's end that the writer did not write come from the base.
    let mut at = start;
    let stop = end.min(base_size);
    let mut spans: Vec<(u64, u64)> = written
        .iter()
        .map(|&(o, l)| (o.max(start), (o + l).min(stop)))
        .filter(|(a, b)| a < b)
        .collect();
    spans.sort();
    spans.push((stop, stop));
    for (a, b) in spans {
        if a > at {
            let dst = &mut buf[(at - start) as usize..(a - start) as usize];
            read_content(base.as_ref(), dst, at)?;
        }
        at = at.max(b);
    }
    Ok(buf)
}

fn read_file(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => {
                buf[done..].fill(0);
                return Ok(());
            }
            n => done += n,
        }
    }
    Ok(())
}

fn read_content(content: &dyn Content, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match content.read_at(&mut buf[done..], offset + done as u64)? {
            0 => {
                return Err(io::Error::other(format!(
                    "the base ended at {} before {}",
                    offset + done as u64,
                    offset + buf.len() as u64
                )));
            }
            n => done += n,
        }
    }
    Ok(())
}

/// How an append is written: its condition and the metadata (with lineage) of the result.
type Decide<'a> = &'a dyn Fn() -> (Condition, Metadata);

/// Adds `tail` after the base (see the module docs). The result keeps the base's lineage only
/// when the write is conditional on the base (it then begins with the base, which readers of
/// the base can rely on to read on into it); otherwise it starts a new one.
fn append(
    store: &S3Store,
    path: &std::path::Path,
    key: &str,
    base: &Arc<dyn Content>,
    tail: &[u8],
    follow: bool,
    metadata: &Metadata,
) -> StoreResult<Written> {
    let shared = store.shared();
    let mut base = base.clone();
    let mut followed = false;
    // A plain writer (not O_APPEND) whose base is no longer current replaces the file whole.
    let mut replace = false;
    let started = std::time::Instant::now();
    for attempt in 0.. {
        if started.elapsed() > APPEND_PATIENCE {
            break;
        }
        let base_meta = base.meta().clone();
        let etag = base_meta.version.tag().unwrap_or_default().to_string();
        let new_lineage = shared.new_lineage();
        let decide = || {
            let extends = shared.conditional && (follow || !replace);
            if super::store::is_new_tag(&etag) {
                // A file this process created, made now: if another host made the name
                // meanwhile, an appender goes after theirs, a writer replaces it.
                return match (extends, shared.lineage_of(key, &etag)) {
                    (true, Some(lineage)) => (Condition::Absent, with_lineage(metadata, &lineage)),
                    (true, None) => (Condition::Absent, with_lineage(metadata, &new_lineage)),
                    (false, _) => (Condition::None, with_lineage(metadata, &new_lineage)),
                };
            }
            match (extends, shared.lineage_of(key, &etag)) {
                (true, Some(lineage)) => (
                    Condition::Matches(etag.clone()),
                    with_lineage(metadata, &lineage),
                ),
                (true, None) => (
                    Condition::Matches(etag.clone()),
                    with_lineage(metadata, &new_lineage),
                ),
                (false, _) => (Condition::None, with_lineage(metadata, &new_lineage)),
            }
        };
        let size = base_meta.size + tail.len() as u64;
        let result = if size < shared.part_size || base_meta.size < MIN_PART {
            append_put(shared, key, base.as_ref(), tail, size, &decide)
        } else {
            append_copy(shared, key, base.as_ref(), tail, &decide).map(|(etag, m)| (etag, None, m))
        };
        match result {
            Ok((new_etag, file, written)) => {
                // Written on the condition that the base is current: it begins with the base.
                let extends =
                    shared.conditional && (follow || !replace) && !super::store::is_new_tag(&etag);
                return Ok(Written {
                    etag: new_etag,
                    size,
                    file,
                    followed,
                    lineage: written.get(super::LINEAGE).cloned().unwrap_or_default(),
                    extends: extends.then_some(etag),
                });
            }
            Err(e)
                if e.is(Failure::Precondition)
                    || e.is(Failure::Conflict)
                    || e.is(Failure::NotFound) =>
            {
                if !follow {
                    // The base is not current: its bytes and these replace the file whole.
                    replace = true;
                    continue;
                }
                // Another writer committed first: these bytes go after its version (another
                // host's, where this process had the name pending).
                if super::store::is_new_tag(&etag) {
                    store.created(path, &etag);
                }
                let meta = match store.lookup(path) {
                    Ok(m) => m,
                    Err(e) if e.raw_os_error() == libc::ENOENT => {
                        return Err(StoreError::failed(
                            libc::ENOENT,
                            format!("append to {key}"),
                            io::Error::other("the file was removed by another writer"),
                        ));
                    }
                    Err(e) => return Err(e),
                };
                base = store.content(key.to_string(), meta, None);
                followed = true;
                std::thread::sleep(append_pause(attempt));
            }
            Err(e) => return Err(StoreError::from(e).context(format!("append to {key}"))),
        }
    }
    Err(StoreError::failed(
        libc::EIO,
        format!("append to {key}"),
        io::Error::other("other writers kept appending first"),
    ))
}

/// The base and `tail` as one PUT, built in a spool file (kept for the cache).
fn append_put(
    shared: &Shared,
    key: &str,
    base: &dyn Content,
    tail: &[u8],
    size: u64,
    decide: Decide<'_>,
) -> Result<(String, Option<Arc<File>>, Metadata), ClientError> {
    let fail = |e: io::Error| {
        // The base could not be read because it was replaced: as a failed condition would.
        let failure = e
            .get_ref()
            .and_then(|s| s.downcast_ref::<ClientError>())
            .map_or(Failure::Other, |c| c.failure);
        ClientError::with_source(failure, format!("append to {key}"), e)
    };
    let _room = shared.spool.reserve(size).map_err(fail)?;
    let file = Arc::new(shared.spool.file().map_err(fail)?);
    let base_size = base.meta().size;
    let mut buf = vec![0u8; (base_size.min(1 << 20)) as usize];
    let mut at = 0;
    while at < base_size {
        let n = (base_size - at).min(buf.len() as u64) as usize;
        read_content(base, &mut buf[..n], at).map_err(fail)?;
        file.write_all_at(&buf[..n], at).map_err(fail)?;
        at += n as u64;
    }
    file.write_all_at(tail, base_size).map_err(fail)?;
    let body = Body::File {
        file: file.clone(),
        offset: 0,
        len: size,
    };
    // Decided now: reading the base taught its lineage.
    let (condition, metadata) = decide();
    let etag = shared.client.put(key, body, &metadata, &condition)?;
    Ok((etag, Some(file), metadata))
}

/// The base copied server-side in parts, `tail` uploaded as the last part.
fn append_copy(
    shared: &Shared,
    key: &str,
    base: &dyn Content,
    tail: &[u8],
    decide: Decide<'_>,
) -> Result<(String, Metadata), ClientError> {
    let (condition, metadata) = decide();
    let (condition, metadata) = (&condition, &metadata);
    let (source_key, source_etag) = match (base as &dyn Any).downcast_ref::<S3Content>() {
        Some(c) => (c.key().to_string(), c.etag().to_string()),
        None => {
            return Err(ClientError::new(
                Failure::Other,
                format!("append to {key}: not this store's content"),
            ));
        }
    };
    let base_size = base.meta().size;
    let part = shared.part_size;
    // Whole parts, the last one taking the rest (parts may be up to 5 GiB).
    let copies = (base_size / part).max(1) as usize;
    if copies + 1 > MAX_PARTS {
        return Err(ClientError::new(
            Failure::Refused,
            format!("append to {key}: too many parts: raise part_size"),
        ));
    }
    let (upload_id, journal) = shared.create_upload(key, metadata)?;
    let mut jobs: Vec<Job<String>> = Vec::new();
    for i in 0..copies {
        let start = i as u64 * part;
        let end = if i + 1 == copies {
            base_size
        } else {
            start + part
        };
        let (client, key, id, sk, se) = (
            shared.client.clone(),
            key.to_string(),
            upload_id.clone(),
            source_key.clone(),
            source_etag.clone(),
        );
        jobs.push(Box::new(move || {
            client.upload_part_copy(&key, &id, i as u32 + 1, &sk, (start, end), &se)
        }));
    }
    let (client, k, id, body) = (
        shared.client.clone(),
        key.to_string(),
        upload_id.clone(),
        Arc::new(tail.to_vec()),
    );
    jobs.push(Box::new(move || {
        client.upload_part(&k, &id, copies as u32 + 1, Body::Bytes(body))
    }));
    let mut parts = Vec::new();
    for (i, r) in shared.pool.run_all(jobs).into_iter().enumerate() {
        match r {
            Ok(etag) => parts.push((i as u32 + 1, etag)),
            Err(e) => {
                shared.abort_upload(key, &upload_id, journal);
                return Err(e);
            }
        }
    }
    match shared
        .client
        .complete_upload(key, &upload_id, &parts, condition)
    {
        Ok(etag) => {
            journal.done();
            Ok((etag, metadata.clone()))
        }
        Err(e) => {
            shared.abort_upload(key, &upload_id, journal);
            Err(e)
        }
    }
}
