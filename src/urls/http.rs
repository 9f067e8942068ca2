//! The daemon's optional HTTP listener (`http_listen`): serves signed download URLs.
//!
//! `GET` and `HEAD /v1/files/<rooms|sessions>/<id>/<path>?expires=…&disposition=…&signature=…`:
//!
//! - The signature and expiry are checked before anything is opened: a bad or expired link is
//!   403 with nothing read. A path that is not a regular file (any more) is 404. A session's
//!   link whose session is not the one this daemon records under its id (ended, and maybe
//!   started again: the creation time differs) is 410, with nothing read.
//! - The committed version at the time of the request is served: opened once, so a commit
//!   during the download does not mix versions. It is read in chunks of [`CHUNK`] bytes
//!   through the store (`Content::read_at`) on a blocking thread, at most [`IN_FLIGHT`] chunks
//!   ahead of the client, so memory stays flat whatever the size of the file.
//! - One byte range (`Range: bytes=a-b`, `a-`, `-n`) gives 206 with `Content-Range`; a range
//!   that starts past the end gives 416; several ranges, or one that does not parse, are
//!   ignored (the whole file, 200), as HTTP allows. `If-Range` with another ETag ignores the
//!   range; `If-None-Match` with the current ETag gives 304.
//! - `Content-Type` is the file's `user.mime_type` extended attribute when it holds a valid
//!   media type, else guessed from the extension; `Content-Disposition` is inline or
//!   attachment with the file's name; `ETag` renders the store's version of the file without
//!   saying anything of the backend; `Last-Modified` is its mtime. Every file is sent with
//!   `Content-Security-Policy: sandbox` and `X-Content-Type-Options: nosniff`, whatever its
//!   type: the type is the agent's to choose, and a list of types that can run script (HTML,
//!   SVG, XML, but also XSLT, `multipart/x-mixed-replace`, whatever a browser adds) is never
//!   complete, so what an agent wrote runs no script in the listener's origin.
//!
//! Connections are bounded, since anyone who can reach the port can open them, and each costs
//! the daemon a descriptor its mounts need too ([`Limits`]):
//!
//! - A client has [`HEADER_TIMEOUT`] to send a request's headers, on a new connection and
//!   between requests on a kept-alive one (hyper's header read timeout runs from when it waits
//!   for a request), else the connection is closed.
//! - Sending a response may make no progress for at most [`WRITE_TIMEOUT`] (a client that reads
//!   it very slowly or not at all keeps the socket full), else the connection is closed
//!   ([`WriteDeadline`]), and with it the thread reading the file for it. Only stalls count: a
//!   download takes as long as it takes while the client keeps taking bytes, and a response
//!   waiting on the store has nothing to write, so it is not the client's stall.
//! - At most [`CONNECTIONS`] are served at once. Over the cap, the listener accepts no more
//!   until one ends: the others wait in the kernel's accept queue, which costs the daemon no
//!   descriptor, and are served in turn rather than refused (a burst of downloads is slowed,
//!   not broken).

use std::io;
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{Disposition, Refused, verify};
use crate::space::{Hub, SpaceKind};
use crate::store::{Content, Kind, StoreError};

/// Bytes read from the store at a time.
pub const CHUNK: usize = 256 << 10;
/// Chunks read ahead of the client at most.
pub const IN_FLIGHT: usize = 4;

/// What the listener needs: the secret URLs are signed with, and the spaces.
pub struct Downloads {
    pub secret: Vec<u8>,
    pub hub: Arc<Hub>,
}

/// How long a client has to send a request's headers (see the module docs).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(20);
/// How long sending a response may make no progress (see the module docs).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once.
pub const CONNECTIONS: usize = 256;

/// Bounds on the listener's connections (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long a client has to send a request's headers.
    pub header_timeout: Duration,
    /// How long sending a response may make no progress.
    pub write_timeout: Duration,
    /// Connections served at once.
    pub connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_timeout: HEADER_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            connections: CONNECTIONS,
        }
    }
}

/// Serves downloads on `listener` until `shutdown` completes. Must run inside a tokio runtime.
pub async fn serve(
    listener: TcpListener,
    downloads: Arc<Downloads>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_router(listener, router(downloads), Limits::default(), shutdown).await
}

/// Serves `router` on `listener` over HTTP/1 within `limits` until `shutdown` completes (then
/// accepts nothing more; connections under way end with the runtime).
pub async fn serve_router(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let service = hyper_util::service::TowerToHyperService::new(router);
    tokio::pin!(shutdown);
    loop {
        // A slot before the connection: over the cap, clients wait in the accept queue.
        let slot = tokio::select! {
            () = &mut shutdown => return Ok(()),
            slot = slots.clone().acquire_owned() => slot.map_err(io::Error::other)?,
        };
        let stream = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or memory: wait rather than spin; a connection that
                    // failed while queued is just gone.
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EINTR)
                    ) {
                        log::warn!("the download listener could not accept a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
        };
        let stream = WriteDeadline::new(stream, limits.write_timeout);
        let conn = http.serve_connection(TokioIo::new(stream), service.clone());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                log::debug!("download connection: {e}");
            }
            drop(slot);
        });
    }
}

/// A connection whose writes fail with [`io::ErrorKind::TimedOut`] once they have made no
/// progress for `timeout`: the deadline is armed when a write (or flush) finds the socket full,
/// and disarmed by any write that goes through, so it never bounds a whole transfer.
pub struct WriteDeadline<S> {
    inner: S,
    timeout: Duration,
    /// Fires `timeout` after the socket was first found full, while `armed`.
    stall: std::pin::Pin<Box<tokio::time::Sleep>>,
    armed: bool,
}

impl<S> WriteDeadline<S> {
    pub fn new(inner: S, timeout: Duration) -> WriteDeadline<S> {
        WriteDeadline {
            inner,
            timeout,
            stall: Box::pin(tokio::time::sleep(timeout)),
            armed: false,
        }
    }

    /// Runs a write operation: its result if it has one, else pending until it has one or
    /// the deadline passes.
    fn progress<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        op: impl FnOnce(&mut S, &mut std::task::Context<'_>) -> std::task::Poll<io::Result<T>>,
    ) -> std::task::Poll<io::Result<T>> {
        use std::future::Future;
        use std::task::Poll;
        if let Poll::Ready(r) = op(&mut self.inner, cx) {
            self.armed = false;
            return Poll::Ready(r);
        }
        if !self.armed {
            self.armed = true;
            let deadline = tokio::time::Instant::now() + self.timeout;
            self.stall.as_mut().reset(deadline);
        }
        match self.stall.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client took no data for {:?}: closing the connection",
                    self.timeout
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        self.progress(cx, |s, cx| std::pin::Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        self.progress(cx, |s, cx| {
            std::pin::Pin::new(s).poll_write_vectored(cx, bufs)
        })
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.progress(cx, |s, cx| std::pin::Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.progress(cx, |s, cx| std::pin::Pin::new(s).poll_shutdown(cx))
    }
}

/// The listener's routes.
pub fn router(downloads: Arc<Downloads>) -> Router {
    Router::new()
        .route("/v1/files/{*rest}", axum::routing::get(download))
        .fallback(|| async { refuse(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .with_state(downloads)
}

fn refuse(status: StatusCode, message: String) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

/// What was found at the URL's path, read before anything is sent.
enum Found {
    File(File),
    NotAFile,
    /// The link's session is not the session the daemon records under its id.
    SessionGone,
}

struct File {
    content: Arc<dyn Content>,
    mime: Option<String>,
}

async fn download(
    State(d): State<Arc<Downloads>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let rest = uri.path().strip_prefix("/v1/files/").unwrap_or("");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let grant = match verify(&d.secret, rest, uri.query().unwrap_or(""), now) {
        Ok(g) => g,
        Err(e) => {
            if !matches!(e, Refused::Expired) {
                log::info!("download refused: {e}");
            }
            return refuse(StatusCode::FORBIDDEN, e.to_string());
        }
    };
    let (hub, space, path) = (d.hub.clone(), grant.space.clone(), grant.path.clone());
    let session = grant.session;
    let found = tokio::task::spawn_blocking(move || -> Result<Found, StoreError> {
        if space.kind == SpaceKind::Session {
            let recorded = crate::space::state::load(hub.local().data_dir(), &space.id)?;
            if recorded.map(|s| s.created_at) != session {
                return Ok(Found::SessionGone);
            }
        }
        let store = hub.download_store(&space)?;
        let meta = store.stat(&path)?;
        if meta.kind != Kind::File {
            return Ok(Found::NotAFile);
        }
        let content = store.open(&path)?;
        let mime = match store.get_xattr(&path, std::ffi::OsStr::new("user.mime_type")) {
            Ok(v) => String::from_utf8(v).ok().filter(|m| valid_media_type(m)),
            Err(_) => None,
        };
        Ok(Found::File(File { content, mime }))
    })
    .await;
    let found = match found {
        Ok(Ok(Found::File(f))) => f,
        Ok(Ok(Found::NotAFile)) => {
            return refuse(
                StatusCode::NOT_FOUND,
                format!("{} is not a file", grant.path.display()),
            );
        }
        Ok(Ok(Found::SessionGone)) => {
            return refuse(
                StatusCode::GONE,
                format!("the {} this link was made for has ended", grant.space),
            );
        }
        Ok(Err(e)) if matches!(e.raw_os_error(), libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => {
            return refuse(
                StatusCode::NOT_FOUND,
                format!("no file at {} in {}", grant.path.display(), grant.space),
            );
        }
        Ok(Err(e)) => {
            log::warn!(
                "download of {} in {}: {e}",
                grant.path.display(),
                grant.space
            );
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the file failed: {e}"),
            );
        }
        Err(e) => {
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the download failed: {e}"),
            );
        }
    };
    respond(&method, &headers, &grant.path, grant.disposition, found)
}

fn respond(
    method: &Method,
    req: &HeaderMap,
    path: &Path,
    disposition: Disposition,
    found: File,
) -> Response {
    let meta = found.content.meta();
    let size = meta.size;
    let etag = format!("\"{}\"", meta.version.fingerprint());
    let mime = found.mime.unwrap_or_else(|| guess_type(path).to_string());
    let mut headers = HeaderMap::new();
    let mut put = |name: header::HeaderName, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    put(header::ETAG, &etag);
    put(header::LAST_MODIFIED, &httpdate::fmt_http_date(meta.mtime));
    put(header::ACCEPT_RANGES, "bytes");
    put(header::CACHE_CONTROL, "private");
    put(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    put(header::CONTENT_SECURITY_POLICY, "sandbox");
    put(header::CONTENT_TYPE, &mime);
    put(
        header::CONTENT_DISPOSITION,
        &content_disposition(disposition, path),
    );
    let header_str = |name: header::HeaderName| req.get(name).and_then(|v| v.to_str().ok());
    if header_str(header::IF_NONE_MATCH)
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    // A range applies only to the version it was asked of.
    let range_applies = header_str(header::IF_RANGE).is_none_or(|v| v.trim() == etag);
    let range = header_str(header::RANGE)
        .filter(|_| range_applies)
        .map(|r| parse_range(r, size));
    let (status, start, len) = match range {
        Some(RangeAnswer::Satisfiable(start, end)) => {
            put(
                header::CONTENT_RANGE,
                &format!("bytes {start}-{}/{size}", end - 1),
            );
            (StatusCode::PARTIAL_CONTENT, start, end - start)
        }
        Some(RangeAnswer::Unsatisfiable) => {
            put(header::CONTENT_RANGE, &format!("bytes */{size}"));
            headers.remove(header::CONTENT_TYPE);
            return (StatusCode::RANGE_NOT_SATISFIABLE, headers).into_response();
        }
        Some(RangeAnswer::Ignored) | None => (StatusCode::OK, 0, size),
    };
    put(header::CONTENT_LENGTH, &len.to_string());
    if method == Method::HEAD {
        return (status, headers).into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel(IN_FLIGHT);
    let content = found.content;
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; CHUNK];
        let (mut off, end) = (start, start + len);
        while off < end {
            let want = CHUNK.min((end - off) as usize);
            let chunk = match content.read_at(&mut buf[..want], off) {
                Ok(0) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file ended before its size",
                )),
                Ok(n) => Ok(Bytes::copy_from_slice(&buf[..n])),
                Err(e) => Err(e),
            };
            let failed = chunk.is_err();
            if let Ok(c) = &chunk {
                off += c.len() as u64;
            }
            // The client went away: stop reading.
            if tx.blocking_send(chunk).is_err() || failed {
                return;
            }
        }
    });
    (status, headers, Body::new(Chunks(rx))).into_response()
}

/// A response body of chunks read on another thread; an error aborts the response.
struct Chunks(tokio::sync::mpsc::Receiver<io::Result<Bytes>>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|c| c.map(|r| r.map(hyper::body::Frame::data)))
    }
}

/// What a `Range` header asks of a file of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// Bytes `start..end`.
    Satisfiable(u64, u64),
    /// It starts at or past the end (416).
    Unsatisfiable,
    /// Not one byte range this listener serves (several, or malformed): the whole file.
    Ignored,
}

/// Parses `Range: bytes=a-b` (also `a-` and `-n`) for a file of `size` bytes.
pub fn parse_range(value: &str, size: u64) -> RangeAnswer {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Ignored;
    };
    if spec.contains(',') {
        return RangeAnswer::Ignored;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAnswer::Ignored;
    };
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.trim().is_empty(), num(first), num(last)) {
        // `-n`: the last n bytes.
        (true, _, Some(n)) => {
            if n == 0 || size == 0 {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Satisfiable(size.saturating_sub(n), size)
            }
        }
        (false, Some(start), end) if last.trim().is_empty() || end.is_some() => {
            if let Some(end) = end
                && end < start
            {
                return RangeAnswer::Ignored;
            }
            if start >= size {
                return RangeAnswer::Unsatisfiable;
            }
            let end = end.map_or(size, |e| e.saturating_add(1).min(size));
            RangeAnswer::Satisfiable(start, end)
        }
        _ => RangeAnswer::Ignored,
    }
}

/// `inline; filename="…"; filename*=UTF-8''…` with the last component of `path`.
pub fn content_disposition(disposition: Disposition, path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.as_bytes())
        .unwrap_or(b"download");
    let name = String::from_utf8_lossy(name);
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for b in name.as_bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(b) {
            encoded.push(*b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!(
        "{}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}",
        disposition.as_str()
    )
}

/// Whether `m` is a media type fit for a header: `type/subtype`, optional parameters, visible
/// ASCII, at most 255 bytes.
pub fn valid_media_type(m: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    let essence = m.split(';').next().unwrap_or("").trim();
    m.len() <= 255
        && m.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
        && essence
            .split_once('/')
            .is_some_and(|(t, s)| token(t) && token(s))
}

/// The media type for a file name's extension (`application/octet-stream` when unknown).
pub fn guess_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .map(|e| String::from_utf8_lossy(e.as_bytes()).to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "txt" | "log" | "text" => "text/plain; charset=utf-8",
        "md" | "markdown" => "text/markdown; charset=utf-8",
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "tsv" => "text/tab-separated-values; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "py" => "text/x-python; charset=utf-8",
        "sh" => "text/x-shellscript; charset=utf-8",
        "yaml" | "yml" => "application/yaml",
        "toml" => "application/toml",
        "json" => "application/json",
        "jsonl" | "ndjson" => "application/x-ndjson",
        "ipynb" => "application/x-ipynb+json",
        "xml" => "application/xml",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "tar" => "application/x-tar",
        "wasm" => "application/wasm",
        "parquet" => "application/vnd.apache.parquet",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "pptx" => "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "ico" => "image/x-icon",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "ogg" => "audio/ogg",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        _ => "application/octet-stream",
    }
}
