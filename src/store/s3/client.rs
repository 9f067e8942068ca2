//! The S3 operations the store uses, as a small synchronous trait ([`ObjectClient`]), so the
//! store is written once and runs over the real service ([`super::sdk::SdkClient`]) or an
//! in-memory one that enforces AWS's rules ([`super::mem::MemClient`], for tests without a
//! server). Methods block the calling thread until the request (with its retries) is done.
//!
//! Errors are classified once, here ([`Failure`]), from the HTTP status and S3 error code, so
//! the store decides on kinds (a 412 is "somebody else changed it", a 404 "not there") and
//! never on strings; every error keeps its cause for the log line.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::sync::Arc;
use std::time::SystemTime;

/// User metadata of an object (`x-amz-meta-*`, names in lower case).
pub type Metadata = BTreeMap<String, String>;

/// What a write requires of the object already at its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Nothing: the write replaces whatever is there.
    None,
    /// No object may be there (`If-None-Match: *`).
    Absent,
    /// The object there must have this ETag (`If-Match`).
    Matches(String),
}

/// The body of a PUT or an uploaded part.
#[derive(Clone)]
pub enum Body {
    Bytes(Arc<Vec<u8>>),
    /// `len` bytes of a local file from `offset` (streamed, never all in memory).
    File {
        file: Arc<File>,
        offset: u64,
        len: u64,
    },
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn empty() -> Body {
        Body::Bytes(Arc::new(Vec::new()))
    }

    /// The bytes, read into memory (the in-memory client; small bodies).
    pub fn to_vec(&self) -> io::Result<Vec<u8>> {
        match self {
            Body::Bytes(b) => Ok(b.as_ref().clone()),
            Body::File { file, offset, len } => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; *len as usize];
                file.read_exact_at(&mut buf, *offset)?;
                Ok(buf)
            }
        }
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Body({} bytes)", self.len())
    }
}

/// An object's head: what a HEAD (or the start of a GET) says.
#[derive(Clone, Debug)]
pub struct ObjectInfo {
    pub size: u64,
    pub etag: String,
    pub last_modified: SystemTime,
    pub metadata: Metadata,
}

/// One object of a listing.
#[derive(Clone, Debug)]
pub struct ListedObject {
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub last_modified: SystemTime,
}

/// One page of a ListObjectsV2.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    pub objects: Vec<ListedObject>,
    /// Common prefixes (with their trailing `/`), when listed with the delimiter.
    pub prefixes: Vec<String>,
    /// The continuation token of the next page, if there is one.
    pub next: Option<String>,
}

/// A multipart upload in progress, as ListMultipartUploads shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadInfo {
    pub key: String,
    pub upload_id: String,
}

/// How a request failed, as far as the store cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// 404: no such key (or upload, or bucket: see `NoBucket`).
    NotFound,
    /// The bucket does not exist.
    NoBucket,
    /// 412: a condition did not hold (somebody else changed the object).
    Precondition,
    /// 409 ConditionalRequestConflict: a concurrent conditional write; try again.
    Conflict,
    /// 416: a range past the end.
    InvalidRange,
    /// 403: credentials refused or missing rights.
    Denied,
    /// 400: the request itself was refused (too small a part, too much metadata...).
    Refused,
    /// No answer, a timeout, a 5xx or a throttle, after the retries: the store may be back later.
    Unavailable,
    /// Anything else.
    Other,
}

/// A failed request: what kind of failure, which request, and the cause.
pub struct ClientError {
    pub failure: Failure,
    /// The request (`"PUT rooms/r1/a.txt"`).
    pub what: String,
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
    /// The store did not answer at all (a timeout, no connection): not a 5xx or a throttle,
    /// which are answers.
    pub unanswered: bool,
}

pub type ClientResult<T> = Result<T, ClientError>;

impl ClientError {
    pub fn new(failure: Failure, what: impl Into<String>) -> ClientError {
        ClientError {
            failure,
            what: what.into(),
            source: None,
            unanswered: false,
        }
    }

    pub fn with_source(
        failure: Failure,
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> ClientError {
        ClientError {
            failure,
            what: what.into(),
            source: Some(source.into()),
            unanswered: false,
        }
    }

    pub fn is(&self, failure: Failure) -> bool {
        self.failure == failure
    }

    /// The errno the mount reports for it: a local failure's own (a full spool's `ENOSPC`),
    /// else `ENOENT` for a missing object and `EIO` for the rest.
    pub fn errno(&self) -> i32 {
        let local = self
            .source
            .as_deref()
            .and_then(|s| s.downcast_ref::<io::Error>())
            .and_then(io::Error::raw_os_error);
        match (self.failure, local) {
            (Failure::Other, Some(errno)) => errno,
            (Failure::NotFound, _) => libc::ENOENT,
            _ => libc::EIO,
        }
    }

    /// The store error carrying this one as its cause.
    pub fn into_store(self) -> super::super::StoreError {
        let errno = self.errno();
        let transient = matches!(self.failure, Failure::Unavailable | Failure::Conflict);
        let e = super::super::StoreError::failed(errno, String::new(), self);
        if transient { e.transient() } else { e }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.failure {
            Failure::NotFound => "not found",
            Failure::NoBucket => "no such bucket",
            Failure::Precondition => "precondition failed",
            Failure::Conflict => "conflicting concurrent write",
            Failure::InvalidRange => "range not satisfiable",
            Failure::Denied => "access denied",
            Failure::Refused => "request refused",
            Failure::Unavailable => "store unavailable",
            Failure::Other => "failed",
        };
        write!(f, "{}: {kind}", self.what)?;
        if let Some(s) = &self.source {
            write!(f, " ({s})")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The cause is part of the message (see `Display`), so it is not also a `source`: a chain
/// printed whole would say it twice.
impl std::error::Error for ClientError {}

impl From<ClientError> for super::super::StoreError {
    fn from(e: ClientError) -> Self {
        e.into_store()
    }
}

/// Receives the bytes of a GET as they arrive.
pub type Sink<'a> = &'a mut dyn FnMut(&[u8]) -> io::Result<()>;

/// The S3 operations of the store, on one bucket. Keys are full object keys.
pub trait ObjectClient: Send + Sync + 'static {
    /// HEAD: the object's size, ETag, time and user metadata.
    fn head(&self, key: &str) -> ClientResult<ObjectInfo>;
    /// GET of `range` (`start..end`, or all), handing the bytes to `sink` as they come, so
    /// memory stays flat; with `if_match`, only if the object still has that ETag
    /// (`Precondition` otherwise). Returns the object's head (`size` is the whole object's).
    fn get(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
        if_match: Option<&str>,
        sink: Sink<'_>,
    ) -> ClientResult<ObjectInfo>;
    /// PUT with user metadata, on `condition`; returns the new ETag.
    fn put(
        &self,
        key: &str,
        body: Body,
        metadata: &Metadata,
        condition: &Condition,
    ) -> ClientResult<String>;
    /// CopyObject `from` to `to`: with `metadata`, replacing the metadata (the REPLACE
    /// directive), else copying it; `source_etag` must be the source's ETag; `condition` is
    /// on the destination. Returns the new ETag.
    fn copy(
        &self,
        from: &str,
        to: &str,
        metadata: Option<&Metadata>,
        source_etag: Option<&str>,
        condition: &Condition,
    ) -> ClientResult<String>;
    /// CreateMultipartUpload with the object's metadata; returns the upload id.
    fn create_upload(&self, key: &str, metadata: &Metadata) -> ClientResult<String>;
    /// UploadPart `part` (from 1); returns its ETag.
    fn upload_part(&self, key: &str, upload: &str, part: u32, body: Body) -> ClientResult<String>;
    /// UploadPartCopy of `range` (`start..end`) of `from`, which must have the ETag
    /// `source_etag`; returns the part's ETag.
    fn upload_part_copy(
        &self,
        key: &str,
        upload: &str,
        part: u32,
        from: &str,
        range: (u64, u64),
        source_etag: &str,
    ) -> ClientResult<String>;
    /// CompleteMultipartUpload of `parts` (number, ETag) on `condition`; returns the ETag.
    fn complete_upload(
        &self,
        key: &str,
        upload: &str,
        parts: &[(u32, String)],
        condition: &Condition,
    ) -> ClientResult<String>;
    /// AbortMultipartUpload (a missing upload is not an error).
    fn abort_upload(&self, key: &str, upload: &str) -> ClientResult<()>;
    /// The multipart uploads in progress under `prefix`.
    fn list_uploads(&self, prefix: &str) -> ClientResult<Vec<UploadInfo>>;
    /// One page of ListObjectsV2 under `prefix`, with `/` as the delimiter if `delimited`.
    fn list(
        &self,
        prefix: &str,
        delimited: bool,
        token: Option<&str>,
        max_keys: Option<u32>,
    ) -> ClientResult<ListPage>;
    /// One page of a ListObjectsV2 of `prefix`, delimited by `/`, of the keys after
    /// `start_after` (in the order of their bytes).
    fn list_after(&self, prefix: &str, start_after: &str) -> ClientResult<ListPage>;
    /// DeleteObject (a missing key is not an error).
    fn delete(&self, key: &str) -> ClientResult<()>;
    /// DeleteObjects of up to 1000 keys.
    fn delete_many(&self, keys: &[String]) -> ClientResult<()>;
    /// Whether the bucket exists and answers (HeadBucket).
    fn check_bucket(&self) -> ClientResult<()>;
    /// A presigned URL that GETs `key` for `expires_in` (at most 7 days), answering with
    /// `content_disposition`: anyone holding it downloads the object without credentials.
    fn presign_get(
        &self,
        key: &str,
        expires_in: std::time::Duration,
        content_disposition: &str,
    ) -> ClientResult<String>;
}

/// The maximum number of keys of one DeleteObjects.
pub const DELETE_BATCH: usize = 1000;
