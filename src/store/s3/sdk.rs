//! The [`ObjectClient`] over the AWS SDK for Rust (`aws-sdk-s3`), for any S3-compatible
//! service.
//!
//! - Each thread that makes requests (FUSE requests, part uploaders, the change feed) drives
//!   them itself, on a single-threaded tokio runtime of its own with its own client and
//!   connections: a request's bytes are written and its answer read on the thread waiting for
//!   it, with no hand-off to a runtime's workers and back (two thread wake-ups per request).
//!   Every request is over when [`block`] returns, so nothing is left for that runtime to run
//!   but idle connections: each request first lets them see whether the server closed them,
//!   and none idle longer than [`IDLE`] is reused. The threads that make requests are
//!   long-lived (FUSE, part and read-ahead pools, the feed, the janitor); a thread of tokio's
//!   blocking pool (the control API, downloads) pays a new connection at its first request.
//! - Credentials and the endpoint come the standard AWS ways (`AWS_ACCESS_KEY_ID`...,
//!   `AWS_ENDPOINT_URL`, `~/.aws/config` and `credentials` profiles, web identity, ECS, instance
//!   metadata), or the endpoint and region from the configuration; never from the command line.
//!   A custom endpoint is addressed path-style (`http://host/bucket/key`), as SeaweedFS, MinIO
//!   and most S3-compatible servers want.
//! - Every request is retried with exponential backoff and jitter (the SDK's standard mode) and
//!   has a connect timeout and a timeout per attempt, so an unreachable or frozen store fails
//!   the request in bounded time ([`Failure::Unavailable`], `EIO` at the mount) instead of
//!   wedging the mount; requests, failures and retries are counted in the metrics.
//! - Every upload (PUT, UploadPart) carries the CRC32 of its body, which the store checks
//!   (`x-amz-checksum-crc32`, refused with `BadDigest` on a mismatch), and is sent as
//!   `UNSIGNED-PAYLOAD`: the request is signed, its body is not. Signing a body costs a SHA-256
//!   of every byte at both ends (over plain HTTP the SDK would sign each 64 KiB chunk of a
//!   streamed body; over HTTPS it signs none), and guards it only against an attacker on the
//!   path — who, over plain HTTP, reads every file and alters every download anyway. The
//!   checksum guards against corruption; TLS against attackers. (The AWS CRT, under
//!   mountpoint-s3, makes the same choice.) A file body's checksum is read from the file
//!   before it is sent, in one more pass over the page cache; a body refused for its checksum
//!   (a part written to while it uploads, or bytes damaged on the way) is sent again, with its
//!   checksum taken again, up to [`BODY_ATTEMPTS`] times.
//! - Keys may hold characters an XML 1.0 document cannot carry (controls, U+FFFF), which
//!   other tools can write: listings are asked for URL-encoded (`encoding-type=url`) and
//!   decoded ([`url_decoded`]), and go on from their last decoded key rather than the
//!   server's token (see [`next_token`]); DeleteObjects, whose body is XML, deletes such keys
//!   one by one ([`xml_carries`]).

use std::cell::RefCell;
use std::fs::File;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    CompletedMultipartUpload, CompletedPart, Delete, EncodingType, MetadataDirective,
    ObjectIdentifier,
};
use aws_smithy_http_client::tls::{TlsContext, TrustStore};

use super::client::{
    Body, ClientError, ClientResult, Condition, Failure, ListPage, ListedObject, Metadata,
    ObjectClient, ObjectInfo, Sink, UploadInfo,
};

/// How to reach the service.
#[derive(Clone, Debug, PartialEq)]
pub struct Connection {
    pub bucket: String,
    /// The endpoint URL (`http://127.0.0.1:8333`); `None`: the SDK's (from `AWS_ENDPOINT_URL`,
    /// profiles, or AWS's own).
    pub endpoint: Option<String>,
    /// `None`: from `AWS_REGION`/profiles, else `us-east-1`.
    pub region: Option<String>,
    pub connect_timeout: Duration,
    /// One attempt of a request, at most (a part upload included).
    pub attempt_timeout: Duration,
    /// Attempts per request (1 + retries).
    pub attempts: u32,
    /// Credentials given directly (tools and tests; the command line and the configuration
    /// never take any: `None` uses the standard AWS ways).
    pub credentials: Option<(String, String)>,
    /// A PEM file of CA certificates trusted besides the system's (see [`tls_context`]).
    pub ca_bundle: Option<std::path::PathBuf>,
}

/// What a thread that makes requests keeps: its own single-threaded runtime, and its own
/// client of each store (each with its own connections), so a request is written, awaited and
/// read on the thread that makes it, with no other thread to wake on the way.
struct Local {
    runtime: Rc<tokio::runtime::Runtime>,
    /// Each by the store's [`SdkClient::alive`]; a dropped store's go at the next new one.
    clients: Vec<(Weak<()>, Client)>,
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
}

fn with_local<R>(f: impl FnOnce(&mut Local) -> R) -> R {
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        let local = l.get_or_insert_with(|| Local {
            runtime: Rc::new(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a thread's S3 runtime starts"),
            ),
            clients: Vec::new(),
        });
        f(local)
    })
}

/// Runs `f` on this thread's runtime and waits for it (from any thread that is not itself
/// running async code). Every request is done within one call: nothing the runtime runs is
/// left to run between calls, but idle connections.
fn block<F: Future>(f: F) -> F::Output {
    // Not borrowed while it runs: the request takes this thread's client from `LOCAL`.
    with_local(|l| l.runtime.clone()).block_on(async {
        // Idle connections first hear what happened to them while this runtime did not run
        // (each yield lets the runtime poll for I/O, then run the tasks it woke): one the
        // server closed is then dropped from the pool, not given this request.
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        f.await
    })
}

/// The client (see the module docs).
pub struct SdkClient {
    /// Settings of this store's clients (one per thread, see [`Local`]).
    config: aws_sdk_s3::Config,
    /// Tells this store's clients from other stores' in a thread's [`Local`], and whether
    /// this store is still there.
    alive: Arc<()>,
    bucket: String,
    /// Where requests go, for messages.
    endpoint: String,
    /// The system's CA certificates and those of the configured bundle, if any.
    tls: Option<TlsContext>,
    /// When a look-up (HEAD, LIST) last failed for want of an answer, after all its attempts
    /// (see [`LOOKUPS_FAIL_FAST`]): a timeout or no connection, not an error the store
    /// answered (a 503 `SlowDown` of one request must not fail every look-up for a while).
    lookups_failed: std::sync::Mutex<Option<Instant>>,
}

/// For this long after a look-up got no answer through all its attempts (the store is down
/// or frozen), look-ups fail at once rather than each waiting the whole bound again. The
/// kernel sends the look-ups of one directory one after another while a create in it is under
/// way (it holds the directory's lock), so agents creating files in their working directory
/// would otherwise each wait for all those before them: N creates took N times the bound
/// (QA: the third of three took 10 minutes at the defaults). Writes are not cut short: a
/// close always tries the store itself.
const LOOKUPS_FAIL_FAST: Duration = Duration::from_secs(2);

/// How long an idle connection is reused. One the server closed is noticed at the next
/// request (see [`block`]); one dropped silently on the way (by a NAT's idle limit) is not, so
/// none is kept long.
const IDLE: Duration = Duration::from_secs(30);

/// An HTTP client; `pooled`: keeps idle connections for [`IDLE`]. Only a client used by one
/// thread may be pooled: a connection is driven by the runtime of the thread that opened it.
/// `tls`: whom to trust besides the system's CAs (`SSL_CERT_FILE` or `SSL_CERT_DIR`, where
/// set, replace the system's).
fn http_client(pooled: bool, tls: Option<&TlsContext>) -> aws_sdk_s3::config::SharedHttpClient {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    let builder = aws_smithy_http_client::Builder::new()
        .pool_idle_timeout(IDLE)
        .pool_max_idle_per_host(if pooled { usize::MAX } else { 0 })
        .tls_provider(Provider::Rustls(CryptoMode::Ring));
    match tls {
        Some(tls) => builder.tls_context(tls.clone()).build_https(),
        None => builder.build_https(),
    }
}

/// The system's CA certificates and those in the PEM file `bundle` (as the AWS CLI's
/// `AWS_CA_BUNDLE`); the error is one sentence. Every certificate is checked here: the SDK
/// would panic at the first connection on one it cannot take.
pub fn tls_context(bundle: &std::path::Path) -> Result<TlsContext, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let what = format!("CA bundle {}", bundle.display());
    let pem = std::fs::read(bundle).map_err(|e| format!("{what}: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what}: not PEM certificates ({e})"))?;
    if certs.is_empty() {
        return Err(format!(
            "{what}: no certificate in it (expected -----BEGIN CERTIFICATE----- blocks)"
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    for (n, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| format!("{what}: certificate {}: {e}", n + 1))?;
    }
    let store = TrustStore::default().with_pem_certificate(pem);
    TlsContext::builder()
        .with_trust_store(store)
        .build()
        .map_err(|e| format!("{what}: {e}"))
}

/// Counts the attempts of one request: each beyond the first is a retry.
#[derive(Debug)]
struct Attempts {
    op: &'static str,
    seen: AtomicU32,
}

impl Intercept for Attempts {
    fn name(&self) -> &'static str {
        "roomfs-attempts"
    }

    fn read_before_attempt(
        &self,
        _context: &aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        if self.seen.fetch_add(1, Ordering::Relaxed) > 0 {
            crate::metrics::backend_retry(self.op);
        }
        Ok(())
    }
}

fn attempts(op: &'static str) -> Attempts {
    Attempts {
        op,
        seen: AtomicU32::new(0),
    }
}

/// Percent-encodes a key for `x-amz-copy-source` (`/` stays).
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn time_of(t: Option<&aws_sdk_s3::primitives::DateTime>) -> SystemTime {
    t.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Classifies an SDK error (see [`Failure`]), keeping it as the cause.
fn classify<E>(
    op: &'static str,
    what: String,
    e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> ClientError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let failure = match &e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            match (status, se.err().code()) {
                (404, Some("NoSuchBucket")) => Failure::NoBucket,
                (404, _) => Failure::NotFound,
                (412, _) => Failure::Precondition,
                (409, _) => Failure::Conflict,
                (416, _) => Failure::InvalidRange,
                (403, _) => Failure::Denied,
                (400, Some("RequestTimeout" | "SlowDown")) => Failure::Unavailable,
                (400, _) => Failure::Refused,
                (429 | 500..=599, _) => Failure::Unavailable,
                _ => Failure::Other,
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Failure::Unavailable
        }
        _ => Failure::Other,
    };
    crate::metrics::backend_error(op, failure_name(failure));
    // What the service said, briefly (the raw response would fill a log line with XML).
    let cause = match &e {
        SdkError::ServiceError(se) => format!(
            "HTTP {} {}{}",
            se.raw().status().as_u16(),
            se.err().code().unwrap_or("(no code)"),
            se.err()
                .message()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ),
        SdkError::TimeoutError(_) => "no answer in time".to_string(),
        _ => causes(&e),
    };
    let unanswered = matches!(
        &e,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
    );
    ClientError {
        unanswered,
        ..ClientError::with_source(failure, what, cause)
    }
}

/// An error and its causes, `: `-separated (the SDK's own rendering adds the whole error in
/// debug form, a paragraph of nested structs for one failed connection).
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Some layers repeat their cause in their own message.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The name of a failure in the metrics (a closed set).
pub fn failure_name(f: Failure) -> &'static str {
    match f {
        Failure::NotFound => "not_found",
        Failure::NoBucket => "no_bucket",
        Failure::Precondition => "precondition",
        Failure::Conflict => "conflict",
        Failure::InvalidRange => "invalid_range",
        Failure::Denied => "denied",
        Failure::Refused => "refused",
        Failure::Unavailable => "unavailable",
        Failure::Other => "other",
    }
}

fn condition_headers(c: &Condition) -> (Option<String>, Option<String>) {
    match c {
        Condition::None => (None, None),
        Condition::Absent => (None, Some("*".to_string())),
        Condition::Matches(e) => (Some(e.clone()), None),
    }
}

/// Bodies up to this size are read into memory before their request.
const SMALL_BODY: u64 = 1 << 20;

/// How many times an upload refused for its checksum is sent: a file body may have changed
/// under it (its checksum is taken again), any body may have been damaged on the way.
const BODY_ATTEMPTS: u32 = 3;

/// A request body: the stream, the file it reads (if any), to be held until the request is
/// done, and the CRC32 of a streamed body (the SDK computes that of a body in memory).
struct Upload {
    stream: ByteStream,
    _file: Option<Arc<File>>,
    crc32: Option<String>,
}

/// The CRC32 of `len` bytes of `file` from `offset`, base64 of its 4 big-endian bytes (as
/// `x-amz-checksum-crc32` wants it), read in pieces of up to 1 MiB.
fn file_crc32(file: &File, offset: u64, len: u64) -> std::io::Result<String> {
    use base64::Engine;
    use std::os::unix::fs::FileExt;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = buf.len().min((len - done) as usize);
        file.read_exact_at(&mut buf[..n], offset + done)?;
        crc.update(&buf[..n]);
        done += n as u64;
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(crc.finalize().to_be_bytes()))
}

/// Whether the store refused a body whose checksum did not match what it received.
fn bad_digest<E: ProvideErrorMetadata>(
    e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> bool {
    matches!(e, SdkError::ServiceError(se) if se.err().code() == Some("BadDigest"))
}

/// Sends an upload of `body` (`send` makes the request of one [`Upload`] of it), and again
/// while the store refuses it for its checksum, up to [`BODY_ATTEMPTS`] times, each with the
/// body read and its checksum taken again.
async fn send_upload<T, E, F, Fut>(
    body: &Body,
    op: &'static str,
    what: impl Fn() -> String,
    send: F,
) -> ClientResult<T>
where
    F: Fn(Upload) -> Fut,
    Fut: Future<Output = Result<T, SdkError<E, aws_sdk_s3::config::http::HttpResponse>>>,
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let mut attempt = 1;
    loop {
        let sent = byte_stream(body.clone())
            .await
            .map_err(|e| ClientError::with_source(Failure::Other, what(), e))?;
        match send(sent).await {
            Err(e) if attempt < BODY_ATTEMPTS && bad_digest(&e) => {
                log::debug!("{}: the body did not match its checksum; again", what());
                attempt += 1;
            }
            r => return r.map_err(|e| classify(op, what(), e)),
        }
    }
}

/// The request body of `body`: a file body is read by its descriptor's number, at each attempt.
async fn byte_stream(body: Body) -> Result<Upload, String> {
    match body {
        // Moved, not copied, where the request holds the only reference (a part is 8 MiB).
        Body::Bytes(b) => Ok(Upload {
            stream: ByteStream::from(Arc::try_unwrap(b).unwrap_or_else(|b| b.as_ref().clone())),
            _file: None,
            crc32: None,
        }),
        // A small body is read here, on the request's thread: a file body is read on tokio's
        // blocking pool, a hand-off to another thread and back for each piece.
        Body::File { file, offset, len } if len <= SMALL_BODY => {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset)
                .map_err(|e| format!("reading the body: {e}"))?;
            Ok(Upload {
                stream: ByteStream::from(buf),
                _file: None,
                crc32: None,
            })
        }
        Body::File { file, offset, len } => {
            use std::os::fd::AsRawFd;
            let crc32 =
                file_crc32(&file, offset, len).map_err(|e| format!("reading the body: {e}"))?;
            // Through /proc, so each attempt opens the file again and the body is retryable;
            // read in pieces of up to 1 MiB (each is a turn of tokio's blocking pool).
            let path = format!("/proc/self/fd/{}", file.as_raw_fd());
            let stream = ByteStream::read_from()
                .path(path)
                .offset(offset)
                .length(aws_sdk_s3::primitives::Length::Exact(len))
                .buffer_size(len.clamp(64 << 10, 1 << 20) as usize)
                .build()
                .await
                .map_err(|e| e.to_string())?;
            Ok(Upload {
                stream,
                _file: Some(file),
                crc32: Some(crc32),
            })
        }
    }
}

/// A key, prefix or marker of a listing asked for with `encoding-type=url`, decoded: `+` is a
/// space and `%XX` a byte (the form encoding AWS and SeaweedFS use: a key's own `+` and `%`
/// come as `%2B` and `%25`). `None` if it does not decode to UTF-8.
pub(super) fn url_decoded(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Whether an XML 1.0 document carries `key` as it is: not with control characters other
/// than tab and newline (a carriage return is read back as a newline), nor U+FFFE or U+FFFF.
/// S3 keys can hold them all; a request body in XML (DeleteObjects) cannot, and listings
/// carry them only URL-encoded.
pub(super) fn xml_carries(key: &str) -> bool {
    !key.chars()
        .any(|c| (c < ' ' && c != '\t' && c != '\n') || c == '\u{fffe}' || c == '\u{ffff}')
}

/// Whether a key some listing says it URL-encoded really is: an encoder leaves no space,
/// control character or non-ASCII character (SeaweedFS 4.48 says it encodes the keys of
/// ListMultipartUploads and does not).
fn looks_encoded(s: &str) -> bool {
    s.bytes().all(|c| c.is_ascii_graphic())
}

/// The continuation of a listing ([`ListPage::next`] of [`SdkClient`]): `s` and the key to list
/// after, or `c` and the server's own token. Listings are URL-encoded (so that keys holding
/// characters XML 1.0 cannot carry, `\x01` or U+FFFF, come through), but SeaweedFS 4.48
/// returns its `NextContinuationToken` (the last key) unencoded, with such characters
/// replaced by U+FFFD: given back, it would skip or repeat keys. So the next page starts
/// after the page's last key, or its last common prefix, decoded, as the API allows
/// (`start-after`); the server's token is used only if that key did not decode.
fn next_token(last: Option<&str>, server: Option<&str>) -> Option<String> {
    match last {
        Some(key) => Some(format!("s{key}")),
        None => server.map(|t| format!("c{t}")),
    }
}

impl SdkClient {
    /// One page of a ListObjectsV2 (see `ObjectClient::list` and `list_after`), asked for
    /// URL-encoded and decoded (see [`next_token`]). An object or common prefix whose key does
    /// not decode is left out, with a warning.
    fn list_page(
        &self,
        prefix: &str,
        delimited: bool,
        token: Option<&str>,
        max_keys: Option<u32>,
        start_after: Option<&str>,
    ) -> ClientResult<ListPage> {
        self.lookup(
            || format!("LIST {prefix}"),
            || self.list_page_sent(prefix, delimited, token, max_keys, start_after),
        )
    }

    /// [`SdkClient::list_page`], sent.
    fn list_page_sent(
        &self,
        prefix: &str,
        delimited: bool,
        token: Option<&str>,
        max_keys: Option<u32>,
        start_after: Option<&str>,
    ) -> ClientResult<ListPage> {
        self.start("list", prefix);
        let (mut start_after, mut continuation) = (start_after.map(str::to_string), None);
        match token.map(|t| t.split_at(t.len().min(1))) {
            Some(("s", key)) => start_after = Some(key.to_string()),
            Some((_, t)) => continuation = Some(t.to_string()),
            None => {}
        }
        // After a common prefix, the page starts with it again (its keys come after the
        // prefix itself): one more key, so that a page has something new.
        let after_common = delimited && start_after.as_deref().is_some_and(|k| k.ends_with('/'));
        let max_keys = match (max_keys, after_common) {
            (Some(m), true) => Some(m.saturating_add(1).min(1000)),
            (m, _) => m,
        };
        let mut req = self
            .client()
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .encoding_type(EncodingType::Url)
            .set_continuation_token(continuation)
            .set_start_after(start_after.clone())
            .set_max_keys(max_keys.map(|m| m as i32));
        if delimited {
            req = req.delimiter("/");
        }
        let r = block(req.customize().interceptor(attempts("list")).send())
            .map_err(|e| classify("list", format!("LIST {prefix}"), e))?;
        let decoded = |raw: &str| {
            let key = url_decoded(raw);
            if key.is_none() {
                log::warn!("LIST {prefix}: left out the key {raw:?}, which does not URL-decode");
            }
            key
        };
        // The last entry of the page, in the order of keys (objects and prefixes interleave);
        // unknown if a key did not decode.
        let mut last: Option<String> = None;
        let mut undecoded = false;
        let mut see = |key: Option<&String>| match key {
            Some(k) if last.as_ref().is_none_or(|l| k > l) => last = Some(k.clone()),
            Some(_) => {}
            None => undecoded = true,
        };
        let mut objects = Vec::new();
        for o in r.contents() {
            let Some(raw) = o.key() else { continue };
            let key = decoded(raw);
            see(key.as_ref());
            if let Some(key) = key {
                objects.push(ListedObject {
                    key,
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: etag_of(o.e_tag()),
                    last_modified: time_of(o.last_modified()),
                });
            }
        }
        let mut prefixes = Vec::new();
        for p in r.common_prefixes() {
            let Some(raw) = p.prefix() else { continue };
            let key = decoded(raw);
            see(key.as_ref());
            // A page after a common prefix starts with it again.
            if let Some(key) = key
                && !(after_common && start_after.as_ref().is_some_and(|s| key <= *s))
            {
                prefixes.push(key);
            }
        }
        let next = if r.is_truncated() == Some(true) {
            let last = if undecoded { None } else { last.as_deref() };
            next_token(last, r.next_continuation_token())
        } else {
            None
        };
        Ok(ListPage {
            objects,
            prefixes,
            next,
        })
    }

    /// Connects (builds the client and checks the credentials); the error is one sentence.
    pub fn connect(c: &Connection) -> Result<SdkClient, String> {
        // The credential providers' client (instance metadata, STS) serves every thread, so it
        // keeps no connection: they are asked rarely (when credentials expire).
        let tls = c.ca_bundle.as_deref().map(tls_context).transpose()?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http_client(false, tls.as_ref()))
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(c.attempts.max(1))
                    .with_initial_backoff(Duration::from_millis(100))
                    .with_max_backoff(Duration::from_secs(2)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(c.connect_timeout)
                    .operation_attempt_timeout(c.attempt_timeout)
                    .build(),
            );
        if let Some(endpoint) = &c.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(region) = &c.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some((id, secret)) = &c.credentials {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                id, secret, None, None, "given",
            ));
        }
        let conf = block(loader.load());
        let mut builder = aws_sdk_s3::config::Builder::from(&conf);
        if conf.region().is_none() {
            builder = builder.region(aws_config::Region::new("us-east-1"));
        }
        let custom = conf.endpoint_url().map(str::to_string);
        if custom.is_some() {
            builder = builder.force_path_style(true);
        }
        let endpoint = custom.unwrap_or_else(|| "AWS S3".to_string());
        // Credentials now, so that missing ones are one clear error at start, not EIO later.
        let Some(provider) = conf.credentials_provider() else {
            return Err(no_credentials("no credentials provider"));
        };
        use aws_sdk_s3::config::ProvideCredentials;
        if let Err(e) = block(provider.provide_credentials()) {
            return Err(no_credentials(&e.to_string()));
        }
        Ok(SdkClient {
            config: builder.build(),
            alive: Arc::new(()),
            bucket: c.bucket.clone(),
            endpoint,
            tls,
            lookups_failed: std::sync::Mutex::new(None),
        })
    }

    /// This thread's client of this store.
    fn client(&self) -> Client {
        with_local(|l| {
            let me = Arc::as_ptr(&self.alive);
            if let Some((_, c)) = l.clients.iter().find(|(a, _)| a.as_ptr() == me) {
                return c.clone();
            }
            l.clients.retain(|(a, _)| a.strong_count() > 0);
            let c = self
                .config
                .to_builder()
                .http_client(http_client(true, self.tls.as_ref()));
            let c = Client::from_conf(c.build());
            l.clients.push((Arc::downgrade(&self.alive), c.clone()));
            c
        })
    }

    /// Where requests go (for messages).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Counts a request of `op` on `key` (logged at trace level: `RUST_LOG=roomfs::store::s3=trace`
    /// shows every request the store makes).
    /// Look-up `what`, sent by `send` unless the store just left one unanswered (then it
    /// fails at once: see [`LOOKUPS_FAIL_FAST`]); notes whether this one was answered.
    fn lookup<T>(
        &self,
        what: impl FnOnce() -> String,
        send: impl FnOnce() -> ClientResult<T>,
    ) -> ClientResult<T> {
        let failed = *self
            .lookups_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(ago) = failed.map(|at| at.elapsed())
            && ago < LOOKUPS_FAIL_FAST
        {
            return Err(ClientError::new(
                Failure::Unavailable,
                format!(
                    "{}: not sent, the store left a look-up unanswered {:.1} s ago (look-ups \
                     fail at once for {} s after that)",
                    what(),
                    ago.as_secs_f64(),
                    LOOKUPS_FAIL_FAST.as_secs()
                ),
            ));
        }
        let result = send();
        // An answer, even a 5xx or a throttle, says the store is there: only silence counts.
        let unanswered = matches!(&result, Err(e) if e.unanswered);
        *self
            .lookups_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = unanswered.then(Instant::now);
        result
    }

    /// `HeadObject` of `key`, sent.
    fn head_sent(&self, key: &str) -> ClientResult<ObjectInfo> {
        self.start("head", key);
        let r = block(
            self.client()
                .head_object()
                .bucket(&self.bucket)
                .key(key)
                .customize()
                .interceptor(attempts("head"))
                .send(),
        )
        .map_err(|e| classify("head", format!("HEAD {key}"), e))?;
        Ok(ObjectInfo {
            size: r.content_length().unwrap_or(0).max(0) as u64,
            etag: etag_of(r.e_tag()),
            last_modified: time_of(r.last_modified()),
            metadata: r
                .metadata()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.to_lowercase(), v.clone()))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    fn start(&self, op: &'static str, key: &str) {
        log::trace!("{op} {key}");
        crate::metrics::backend_request(op);
        crate::store::wait::announce();
    }
}

fn no_credentials(why: &str) -> String {
    format!(
        "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in \
         ~/.aws, or run where instance metadata provides them ({why})"
    )
}

/// An ETag as the store answered it, in the one form the rest of the store compares: quoted,
/// as HTTP and S3 write it. SeaweedFS, for one, quotes it in the answers to PUT, HEAD and LIST
/// but not in a copy's result, so an unnormalized copy's ETag never matched its own listing.
fn etag_of(etag: Option<&str>) -> String {
    match etag.map(|e| e.trim_matches('"')) {
        Some(e) if !e.is_empty() => format!("\"{e}\""),
        _ => String::new(),
    }
}

impl ObjectClient for SdkClient {
    fn head(&self, key: &str) -> ClientResult<ObjectInfo> {
        self.lookup(|| format!("HEAD {key}"), || self.head_sent(key))
    }

    fn get(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
        if_match: Option<&str>,
        sink: Sink<'_>,
    ) -> ClientResult<ObjectInfo> {
        self.start("get", key);
        let what = || format!("GET {key}");
        block(async {
            let mut req = self.client().get_object().bucket(&self.bucket).key(key);
            if let Some((start, end)) = range {
                req = req.range(format!("bytes={start}-{}", end.saturating_sub(1)));
            }
            if let Some(e) = if_match {
                req = req.if_match(e);
            }
            let mut r = req
                .customize()
                .interceptor(attempts("get"))
                .send()
                .await
                .map_err(|e| classify("get", what(), e))?;
            let size = match r.content_range().and_then(|c| c.rsplit('/').next()) {
                Some(total) => total.parse().unwrap_or(0),
                None => r.content_length().unwrap_or(0).max(0) as u64,
            };
            let info = ObjectInfo {
                size,
                etag: etag_of(r.e_tag()),
                last_modified: time_of(r.last_modified()),
                metadata: r
                    .metadata()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.to_lowercase(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            loop {
                match r.body.try_next().await {
                    Ok(Some(bytes)) => sink(&bytes)
                        .map_err(|e| ClientError::with_source(Failure::Other, what(), e))?,
                    Ok(None) => break,
                    Err(e) => {
                        crate::metrics::backend_error("get", "unavailable");
                        return Err(ClientError::with_source(
                            Failure::Unavailable,
                            what(),
                            e.to_string(),
                        ));
                    }
                }
            }
            Ok(info)
        })
    }

    fn put(
        &self,
        key: &str,
        body: Body,
        metadata: &Metadata,
        condition: &Condition,
    ) -> ClientResult<String> {
        self.start("put", key);
        let (if_match, if_none) = condition_headers(condition);
        let what = || format!("PUT {key}");
        let r = block(send_upload(&body, "put", what, |sent| async {
            let Upload {
                stream,
                crc32,
                _file,
            } = sent;
            self.client()
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .body(stream)
                .set_checksum_crc32(crc32)
                .set_metadata(Some(metadata.clone().into_iter().collect()))
                .set_if_match(if_match.clone())
                .set_if_none_match(if_none.clone())
                .customize()
                .disable_payload_signing()
                .interceptor(attempts("put"))
                .send()
                .await
        }))?;
        Ok(etag_of(r.e_tag()))
    }

    fn copy(
        &self,
        from: &str,
        to: &str,
        metadata: Option<&Metadata>,
        source_etag: Option<&str>,
        condition: &Condition,
    ) -> ClientResult<String> {
        self.start("copy", to);
        let (if_match, if_none) = condition_headers(condition);
        let mut req = self
            .client()
            .copy_object()
            .bucket(&self.bucket)
            .key(to)
            .copy_source(format!("{}/{}", self.bucket, encode_key(from)))
            .set_copy_source_if_match(source_etag.map(str::to_string))
            .set_if_match(if_match)
            .set_if_none_match(if_none);
        if let Some(m) = metadata {
            req = req
                .metadata_directive(MetadataDirective::Replace)
                .set_metadata(Some(m.clone().into_iter().collect()));
        }
        let r = block(req.customize().interceptor(attempts("copy")).send())
            .map_err(|e| classify("copy", format!("COPY {from} to {to}"), e))?;
        Ok(etag_of(r.copy_object_result().and_then(|c| c.e_tag())))
    }

    fn create_upload(&self, key: &str, metadata: &Metadata) -> ClientResult<String> {
        self.start("create_upload", key);
        let r = block(
            self.client()
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .set_metadata(Some(metadata.clone().into_iter().collect()))
                .customize()
                .interceptor(attempts("create_upload"))
                .send(),
        )
        .map_err(|e| classify("create_upload", format!("CreateMultipartUpload {key}"), e))?;
        r.upload_id().map(str::to_string).ok_or_else(|| {
            ClientError::new(
                Failure::Other,
                format!("CreateMultipartUpload {key}: no id"),
            )
        })
    }

    fn upload_part(&self, key: &str, upload: &str, part: u32, body: Body) -> ClientResult<String> {
        self.start("upload_part", key);
        let what = || format!("UploadPart {part} of {key}");
        let r = block(send_upload(&body, "upload_part", what, |sent| async {
            let Upload {
                stream,
                crc32,
                _file,
            } = sent;
            self.client()
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload)
                .part_number(part as i32)
                .body(stream)
                .set_checksum_crc32(crc32)
                .customize()
                .disable_payload_signing()
                .interceptor(attempts("upload_part"))
                .send()
                .await
        }))?;
        Ok(etag_of(r.e_tag()))
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
        self.start("upload_part_copy", key);
        let r = block(
            self.client()
                .upload_part_copy()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload)
                .part_number(part as i32)
                .copy_source(format!("{}/{}", self.bucket, encode_key(from)))
                .copy_source_range(format!("bytes={}-{}", range.0, range.1 - 1))
                .copy_source_if_match(source_etag)
                .customize()
                .interceptor(attempts("upload_part_copy"))
                .send(),
        )
        .map_err(|e| {
            classify(
                "upload_part_copy",
                format!("UploadPartCopy {part} of {key} from {from}"),
                e,
            )
        })?;
        Ok(etag_of(r.copy_part_result().and_then(|c| c.e_tag())))
    }

    fn complete_upload(
        &self,
        key: &str,
        upload: &str,
        parts: &[(u32, String)],
        condition: &Condition,
    ) -> ClientResult<String> {
        self.start("complete_upload", key);
        let (if_match, if_none) = condition_headers(condition);
        let parts: Vec<CompletedPart> = parts
            .iter()
            .map(|(n, e)| {
                CompletedPart::builder()
                    .part_number(*n as i32)
                    .e_tag(e)
                    .build()
            })
            .collect();
        let r = block(
            self.client()
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .set_if_match(if_match)
                .set_if_none_match(if_none)
                .customize()
                .interceptor(attempts("complete_upload"))
                .send(),
        )
        .map_err(|e| {
            classify(
                "complete_upload",
                format!("CompleteMultipartUpload {key}"),
                e,
            )
        })?;
        Ok(etag_of(r.e_tag()))
    }

    fn abort_upload(&self, key: &str, upload: &str) -> ClientResult<()> {
        self.start("abort_upload", key);
        match block(
            self.client()
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload)
                .customize()
                .interceptor(attempts("abort_upload"))
                .send(),
        ) {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = classify("abort_upload", format!("AbortMultipartUpload {key}"), e);
                if e.is(Failure::NotFound) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    fn list_uploads(&self, prefix: &str) -> ClientResult<Vec<UploadInfo>> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            self.start("list_uploads", prefix);
            let r = block(
                self.client()
                    .list_multipart_uploads()
                    .bucket(&self.bucket)
                    .prefix(prefix)
                    .encoding_type(EncodingType::Url)
                    .set_key_marker(key_marker.clone())
                    .set_upload_id_marker(id_marker.clone())
                    .customize()
                    .interceptor(attempts("list_uploads"))
                    .send(),
            )
            .map_err(|e| classify("list_uploads", format!("ListMultipartUploads {prefix}"), e))?;
            // Keys come URL-encoded (see `url_decoded`), if the store encodes them.
            let url = r.encoding_type() == Some(&EncodingType::Url);
            let decoded = |k: &str| match url && looks_encoded(k) {
                true => url_decoded(k),
                false => Some(k.to_string()),
            };
            for u in r.uploads() {
                if let (Some(key), Some(id)) = (u.key().and_then(decoded), u.upload_id()) {
                    out.push(UploadInfo {
                        key,
                        upload_id: id.to_string(),
                    });
                }
            }
            if r.is_truncated() != Some(true) {
                return Ok(out);
            }
            key_marker = r.next_key_marker().and_then(decoded);
            id_marker = r.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() {
                return Ok(out);
            }
        }
    }

    fn list(
        &self,
        prefix: &str,
        delimited: bool,
        token: Option<&str>,
        max_keys: Option<u32>,
    ) -> ClientResult<ListPage> {
        self.list_page(prefix, delimited, token, max_keys, None)
    }

    fn list_after(&self, prefix: &str, start_after: &str) -> ClientResult<ListPage> {
        self.list_page(prefix, true, None, None, Some(start_after))
    }

    fn delete(&self, key: &str) -> ClientResult<()> {
        self.start("delete", key);
        match block(
            self.client()
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .customize()
                .interceptor(attempts("delete"))
                .send(),
        ) {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = classify("delete", format!("DELETE {key}"), e);
                if e.is(Failure::NotFound) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    fn delete_many(&self, keys: &[String]) -> ClientResult<()> {
        // Its keys go in an XML body, which cannot carry every key: those are deleted alone.
        if keys.iter().any(|k| !xml_carries(k)) {
            let (carried, alone): (Vec<String>, Vec<String>) =
                keys.iter().cloned().partition(|k| xml_carries(k));
            for k in &alone {
                self.delete(k)?;
            }
            return self.delete_many(&carried);
        }
        if keys.is_empty() {
            return Ok(());
        }
        self.start("delete_many", keys.first().map_or("", |k| k.as_str()));
        let what = || format!("DeleteObjects {} keys from {}", keys.len(), keys[0]);
        let objects = keys
            .iter()
            .map(|k| ObjectIdentifier::builder().key(k).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::with_source(Failure::Other, what(), e))?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(|e| ClientError::with_source(Failure::Other, what(), e))?;
        let r = block(
            self.client()
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .customize()
                .interceptor(attempts("delete_many"))
                .send(),
        )
        .map_err(|e| classify("delete_many", what(), e))?;
        if let Some(err) = r.errors().first() {
            crate::metrics::backend_error("delete_many", "other");
            return Err(ClientError::with_source(
                Failure::Other,
                what(),
                format!(
                    "{}: {} {}",
                    err.key().unwrap_or(""),
                    err.code().unwrap_or(""),
                    err.message().unwrap_or("")
                ),
            ));
        }
        Ok(())
    }

    fn presign_get(
        &self,
        key: &str,
        expires_in: Duration,
        content_disposition: &str,
    ) -> ClientResult<String> {
        // Signed locally: no request is made.
        let config = aws_sdk_s3::presigning::PresigningConfig::expires_in(expires_in)
            .map_err(|e| ClientError::with_source(Failure::Other, "presigning", e.to_string()))?;
        let request = block(
            self.client()
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .response_content_disposition(content_disposition)
                .presigned(config),
        )
        .map_err(|e| {
            ClientError::with_source(Failure::Other, format!("presigning GET {key}"), causes(&e))
        })?;
        Ok(request.uri().to_string())
    }

    fn check_bucket(&self) -> ClientResult<()> {
        self.start("head_bucket", "");
        match block(
            self.client()
                .head_bucket()
                .bucket(&self.bucket)
                .customize()
                .interceptor(attempts("head_bucket"))
                .send(),
        ) {
            Ok(_) => Ok(()),
            Err(e) => {
                let mut e = classify("head_bucket", format!("bucket {}", self.bucket), e);
                if e.is(Failure::NotFound) {
                    e.failure = Failure::NoBucket;
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_compared_in_one_form() {
        assert_eq!(etag_of(Some("\"abc\"")), "\"abc\"");
        assert_eq!(etag_of(Some("abc")), "\"abc\"");
        assert_eq!(etag_of(Some("\"abc-3\"")), "\"abc-3\"");
        assert_eq!(etag_of(None), "");
        assert_eq!(etag_of(Some("")), "");
    }

    #[test]
    fn listed_keys_are_url_decoded_as_forms_are() {
        // As SeaweedFS 4.48 and AWS encode them (seen on SeaweedFS).
        assert_eq!(url_decoded("p/a%25b%2Bc+d").as_deref(), Some("p/a%b+c d"));
        assert_eq!(url_decoded("bad%01name").as_deref(), Some("bad\u{1}name"));
        assert_eq!(url_decoded("ff%EF%BF%BFz").as_deref(), Some("ff\u{ffff}z"));
        assert_eq!(url_decoded("%C3%A9/").as_deref(), Some("\u{e9}/"));
        assert_eq!(url_decoded("nul%00").as_deref(), Some("nul\0"));
        // Not an encoding of UTF-8, or not an encoding at all.
        assert_eq!(url_decoded("%FF"), None);
        assert_eq!(url_decoded("a%4"), None);
        assert_eq!(url_decoded("a%zz"), None);
        assert!(looks_encoded("a%25b%2Bc+d"));
        assert!(!looks_encoded("c d+e"));
        assert!(!looks_encoded("\u{e9}"));
    }

    #[test]
    fn a_listing_goes_on_after_its_last_decoded_key() {
        assert_eq!(
            next_token(Some("p/bad\u{1}x"), Some("p/bad\u{fffd}x")).as_deref(),
            Some("sp/bad\u{1}x")
        );
        assert_eq!(next_token(None, Some("opaque")).as_deref(), Some("copaque"));
        assert_eq!(next_token(None, None), None);
    }

    #[test]
    fn keys_xml_cannot_carry_are_told_apart() {
        for k in [
            "a b",
            "tab\there",
            "line\n",
            "\u{e9}",
            "\u{fffd}",
            "\u{10ffff}",
        ] {
            assert!(xml_carries(k), "{k:?}");
        }
        for k in ["\u{1}", "esc\u{1b}", "cr\r", "\u{fffe}", "\u{ffff}", "\0"] {
            assert!(!xml_carries(k), "{k:?}");
        }
    }

    #[test]
    fn copy_sources_are_percent_encoded_but_slashes_stay() {
        assert_eq!(
            encode_key("rooms/r1/a b+c%d.txt"),
            "rooms/r1/a%20b%2Bc%25d.txt"
        );
        assert_eq!(encode_key("é"), "%C3%A9");
    }

    /// A server that answers each connection's first HEAD with an object and then closes it,
    /// without saying so (as a server's idle limit does); counts connections.
    fn closing_server() -> (String, Arc<AtomicU32>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicU32::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                count.fetch_add(1, Ordering::Relaxed);
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nETag: \"e1\"\r\n\
                      Last-Modified: Sat, 05 Dec 2026 06:00:00 GMT\r\n\r\n",
                );
                // Closed once the client had time to put the connection back in its pool.
                std::thread::sleep(Duration::from_millis(50));
                drop(conn);
            }
        });
        (url, accepted)
    }

    fn connect(url: &str) -> SdkClient {
        SdkClient::connect(&Connection {
            bucket: "b".into(),
            endpoint: Some(url.to_string()),
            region: Some("us-east-1".into()),
            connect_timeout: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(2),
            // No retry: a request sent on a closed connection would fail.
            attempts: 1,
            credentials: Some(("id".into(), "secret".into())),
            ca_bundle: None,
        })
        .unwrap()
    }

    /// How many stores' clients this thread keeps.
    fn clients_here() -> usize {
        LOCAL.with(|l| l.borrow().as_ref().map_or(0, |l| l.clients.len()))
    }

    #[test]
    fn a_ca_bundle_the_tls_library_cannot_take_is_an_error_not_a_panic_later() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("ca.pem");
        // A PEM block that is not a certificate: the SDK would panic building a client.
        std::fs::write(
            &bundle,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = tls_context(&bundle).unwrap_err();
        assert!(e.contains("ca.pem: certificate 1:"), "{e}");
        std::fs::write(&bundle, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
        let e = tls_context(&bundle).unwrap_err();
        assert!(e.contains("not PEM certificates"), "{e}");
    }

    #[test]
    fn a_connection_the_server_closed_while_idle_is_not_used_again() {
        let (url, accepted) = closing_server();
        let client = connect(&url);
        for n in 1..=3 {
            let info = client.head("k").unwrap();
            assert_eq!((info.size, info.etag.as_str()), (3, "\"e1\""));
            // Idle (this thread's runtime does not run) while the server closes it.
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(accepted.load(Ordering::Relaxed), n);
        }
        // Another thread has its own connection.
        std::thread::scope(|s| {
            s.spawn(|| client.head("k").unwrap());
        });
        assert_eq!(accepted.load(Ordering::Relaxed), 4);
        // A store dropped leaves no client behind once this thread makes another.
        assert_eq!(clients_here(), 1);
        drop(client);
        let other = connect(&url);
        other.head("k").unwrap();
        assert_eq!(clients_here(), 1);
    }

    /// A request as a server received it.
    struct Received {
        headers: std::collections::HashMap<String, String>,
        body: Vec<u8>,
    }

    /// A server that records each request and answers it with the next of `answers` (the last
    /// one again when they run out); `on_request(n)` runs before the `n`th answer (from 1).
    fn recording_server(
        answers: Vec<&'static str>,
        on_request: impl Fn(usize) + Send + 'static,
    ) -> (String, Arc<std::sync::Mutex<Vec<Received>>>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = log.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                loop {
                    let mut headers = std::collections::HashMap::new();
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    loop {
                        line.clear();
                        reader.read_line(&mut line).unwrap();
                        let Some((k, v)) = line.trim_end().split_once(':') else {
                            break;
                        };
                        headers.insert(k.to_lowercase(), v.trim().to_string());
                    }
                    let len = headers
                        .get("content-length")
                        .map_or(0, |l| l.parse().unwrap());
                    let mut body = vec![0u8; len];
                    reader.read_exact(&mut body).unwrap();
                    let n = {
                        let mut l = seen.lock().unwrap();
                        l.push(Received { headers, body });
                        l.len()
                    };
                    on_request(n);
                    let answer = answers[(n - 1).min(answers.len() - 1)];
                    conn.write_all(answer.as_bytes()).unwrap();
                }
            }
        });
        (url, log)
    }

    const STORED: &str = "HTTP/1.1 200 OK\r\nETag: \"e1\"\r\nContent-Length: 0\r\n\r\n";
    fn bad_digest_answer() -> &'static str {
        let body = "<?xml version=\"1.0\"?><Error><Code>BadDigest</Code><Message>no match</Message></Error>";
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        Box::leak(answer.into_boxed_str())
    }

    fn crc32_of(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(crc32fast::hash(bytes).to_be_bytes())
    }

    /// A file of `len` bytes that are not all alike, and its path.
    fn body_file(dir: &std::path::Path, len: usize, seed: u8) -> (Arc<File>, std::path::PathBuf) {
        let path = dir.join(format!("body-{seed}"));
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ seed).collect();
        std::fs::write(&path, bytes).unwrap();
        (Arc::new(File::open(&path).unwrap()), path)
    }

    /// A store that answers look-ups with a throttle or a 5xx is there: the next look-up is
    /// sent (only a store that did not answer at all makes look-ups fail at once for a
    /// while, see `LOOKUPS_FAIL_FAST`).
    #[test]
    fn look_ups_answered_with_an_error_do_not_stop_the_next_ones() {
        const SLOW_DOWN: &str = "HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\n\r\n";
        let (url, log) = recording_server(vec![SLOW_DOWN], |_| {});
        let client = connect(&url);
        let e = client.head("k").unwrap_err();
        assert_eq!(e.failure, Failure::Unavailable, "{e}");
        let sent = log.lock().unwrap().len();
        assert!(sent >= 1);
        let e = client.head("k").unwrap_err();
        assert!(!e.to_string().contains("not sent"), "{e}");
        assert!(
            log.lock().unwrap().len() > sent,
            "the second look-up was sent"
        );
    }

    #[test]
    fn uploads_carry_their_crc32_and_no_payload_signature() {
        let (url, log) = recording_server(vec![STORED], |_| {});
        let client = connect(&url);
        let dir = tempfile::tempdir().unwrap();
        let small = Body::Bytes(Arc::new(b"hello".to_vec()));
        let (file, path) = body_file(dir.path(), 3 << 20, 7);
        let large = Body::File {
            file,
            offset: 1 << 20,
            len: 2 << 20,
        };
        client
            .put("a", small, &Metadata::new(), &Condition::None)
            .unwrap();
        client
            .put("b", large.clone(), &Metadata::new(), &Condition::None)
            .unwrap();
        client.upload_part("c", "u1", 1, large).unwrap();
        let expected = &std::fs::read(path).unwrap()[1 << 20..];
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 3);
        for (r, body) in log.iter().zip([&b"hello"[..], expected, expected]) {
            assert_eq!(r.headers["x-amz-content-sha256"], "UNSIGNED-PAYLOAD");
            assert_eq!(r.headers["x-amz-checksum-crc32"], crc32_of(body));
            // Sent as it is: no aws-chunked framing (nor the chunk signatures it carries).
            assert_eq!(r.headers.get("content-encoding"), None);
            assert!(r.body == body, "the body arrives unchanged");
        }
    }

    #[test]
    fn a_file_body_that_changed_under_its_checksum_is_sent_again_with_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let (file, path) = body_file(dir.path(), 2 << 20, 1);
        let changed = path.clone();
        // The part is written to while it uploads: the store refuses what it received.
        let (url, log) = recording_server(vec![bad_digest_answer(), STORED], move |n| {
            if n == 1 {
                std::fs::write(&changed, vec![9u8; 2 << 20]).unwrap();
            }
        });
        let client = connect(&url);
        let body = Body::File {
            file,
            offset: 0,
            len: 2 << 20,
        };
        client.upload_part("k", "u1", 1, body.clone()).unwrap();
        {
            let log = log.lock().unwrap();
            assert_eq!(log.len(), 2);
            assert_eq!(
                log[1].headers["x-amz-checksum-crc32"],
                crc32_of(&vec![9u8; 2 << 20])
            );
            assert!(log[1].body == vec![9u8; 2 << 20]);
        }

        // A store that refuses every attempt: an error after a bounded number of them.
        let (url, log) = recording_server(vec![bad_digest_answer()], |_| {});
        let client = connect(&url);
        let e = client
            .put("k", body, &Metadata::new(), &Condition::None)
            .unwrap_err();
        assert_eq!(e.failure, Failure::Refused, "{e}");
        assert!(e.to_string().contains("BadDigest"), "{e}");
        assert_eq!(log.lock().unwrap().len(), BODY_ATTEMPTS as usize);
        // A body in memory too (damaged on the way).
        let bytes = Body::Bytes(Arc::new(b"x".to_vec()));
        client
            .put("k", bytes, &Metadata::new(), &Condition::None)
            .unwrap_err();
        assert_eq!(log.lock().unwrap().len(), 2 * BODY_ATTEMPTS as usize);
    }
}
