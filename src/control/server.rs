//! The control API's HTTP server (axum on tokio) on a Unix socket.

use std::fs::{self, DirBuilder, Permissions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path as UrlPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{
    ApiError, ControlPlane, EndSessionRequest, MountRequest, SessionRequest, UnmountRequest,
};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 16 << 20;

type Plane = Arc<dyn ControlPlane>;

/// Fails with an `AddrInUse` error naming the path if a daemon answers on the socket `path`.
pub fn check_not_served(path: &Path) -> io::Result<()> {
    let socket = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if socket && UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another roomfs daemon is serving {}", path.display()),
        ));
    }
    Ok(())
}

/// Binds the control socket at `path` with mode 0600, creating its parent directory (mode
/// 0755) if missing. A socket file nothing answers on is replaced; a live one is an
/// `AddrInUse` error naming the path, and any other kind of file there is left alone.
///
/// The socket is bound in a private directory (mode 0700, made beside `path`), restricted to
/// 0600, then renamed into place: bind(2) makes the socket `0777 & ~umask`, and before the
/// chmod only its owner can get through that directory, whatever the umask. So it is never
/// reachable by others with looser permissions, under any name.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|err| annotate(err, format!("cannot create {}", parent.display())))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another roomfs daemon is serving {}", path.display()),
                ));
            }
            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("replacing the stale control socket {}", path.display());
            }
            Err(err) => {
                return Err(annotate(err, format!("cannot check {}", path.display())));
            }
        },
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(annotate(err, format!("cannot check {}", path.display()))),
    }

    let private = private_dir(path)?;
    let tmp = private.join("control.sock");
    let bound = UnixListener::bind(&tmp)
        .map_err(|err| annotate(err, format!("cannot bind {}", tmp.display())))
        .and_then(|listener| {
            fs::set_permissions(&tmp, Permissions::from_mode(0o600))
                .and_then(|()| fs::rename(&tmp, path))
                .map_err(|err| annotate(err, format!("cannot install {}", path.display())))
                .map(|()| listener)
        });
    if bound.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    let _ = fs::remove_dir(&private);
    bound
}

/// A new directory `<path>.XXXXXX` beside `path` that only its owner can enter (mode 0700, set
/// after mkdtemp(3) in case the umask took owner bits away).
fn private_dir(path: &Path) -> io::Result<PathBuf> {
    let mut template = path.as_os_str().to_owned();
    template.push(".XXXXXX");
    let dir = nix::unistd::mkdtemp(Path::new(&template)).map_err(|err| {
        annotate(
            err.into(),
            format!("cannot create a directory beside {}", path.display()),
        )
    })?;
    if let Err(err) = fs::set_permissions(&dir, Permissions::from_mode(0o700)) {
        let _ = fs::remove_dir(&dir);
        return Err(annotate(err, format!("cannot restrict {}", dir.display())));
    }
    Ok(dir)
}

fn annotate(err: io::Error, context: String) -> io::Error {
    io::Error::new(err.kind(), format!("{context}: {err}"))
}

/// Serves the control API on `listener` (from [`bind`]) until `shutdown` completes, then
/// finishes the requests under way and returns. Must run inside a tokio runtime.
///
/// The socket file is left in place; the next [`bind`] replaces it.
pub async fn serve(
    listener: UnixListener,
    plane: Arc<dyn ControlPlane>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    axum::serve(listener, router(plane))
        .with_graceful_shutdown(shutdown)
        .await
}

fn router(plane: Plane) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/mounts", get(mounts).post(add_mount))
        .route("/v1/mounts/remove", post(remove_mount))
        .route("/v1/sessions", get(sessions).post(create_session))
        .route("/v1/sessions/{id}", get(session))
        .route("/v1/sessions/{id}/end", post(end_session))
        .route("/v1/storage", post(storage))
        .merge(events_router())
        .merge(metrics_router())
        .fallback(no_such_endpoint)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(plane)
}

/// `GET /metrics` (Prometheus text), on its own so that another listener (an HTTP port) can
/// serve it too: `metrics_router().with_state(plane)`.
pub fn metrics_router() -> Router<Plane> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(plane): State<Plane>) -> ApiResult<Response> {
    let text = blocking(move || crate::metrics::render(Some(&plane.metrics()))).await?;
    Ok(([(CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status >= 500 {
            log::warn!("control API: {}", self.message);
        }
        let status = StatusCode::from_u16(self.status)
            .ok()
            .filter(|s| s.is_client_error() || s.is_server_error())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(json!({ "error": self.message }))).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Runs a [`ControlPlane`] call on tokio's blocking pool.
async fn blocking<T: Send + 'static>(call: impl FnOnce() -> T + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|err| ApiError::internal(format!("the request failed inside the daemon: {err}")))
}

/// A request body, read within [`MAX_BODY_BYTES`], with errors as JSON. JSON is parsed by the
/// handlers, whatever the `Content-Type`.
struct Body(Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> ApiResult<Body> {
        let bytes = Bytes::from_request(req, state).await.map_err(|err| {
            if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
                let limit = MAX_BODY_BYTES >> 20;
                ApiError::new(413, format!("the request body is larger than {limit} MiB"))
            } else {
                ApiError::new(err.status().as_u16(), err.body_text())
            }
        })?;
        Ok(Body(bytes))
    }
}

impl Body {
    /// The body as a request (a JSON object).
    fn parse<T: DeserializeOwned>(&self) -> ApiResult<T> {
        self.parse_json(true)
    }

    /// The body as any JSON value (the storage envelope, passed through).
    fn parse_value(&self) -> ApiResult<Value> {
        self.parse_json(false)
    }

    fn parse_json<T: DeserializeOwned>(&self, object: bool) -> ApiResult<T> {
        if self.0.is_empty() {
            return Err(ApiError::bad_request(
                "the request body is empty; expected JSON",
            ));
        }
        parse_json(&self.0, object)
    }

    /// Like [`Body::parse`], but an empty body is `{}`.
    fn parse_or_empty<T: DeserializeOwned>(&self) -> ApiResult<T> {
        parse_json(if self.0.is_empty() { b"{}" } else { &self.0 }, true)
    }
}

/// Parses a request body; with `object`, only a JSON object (a request that is a struct:
/// serde would read one from an array by position).
fn parse_json<T: DeserializeOwned>(bytes: &[u8], object: bool) -> ApiResult<T> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if object
        && first != Some(&b'{')
        && let Ok(value) = serde_json::from_slice::<Value>(bytes)
    {
        let kind = match value {
            Value::Array(_) => "an array",
            Value::String(_) => "a string",
            Value::Number(_) => "a number",
            Value::Bool(_) => "a boolean",
            Value::Null => "null",
            Value::Object(_) => "an object",
        };
        return Err(ApiError::bad_request(format!(
            "invalid request body: expected a JSON object, found {kind}"
        )));
    }
    serde_json::from_slice(bytes)
        .map_err(|err| ApiError::bad_request(format!("invalid request body: {err}")))
}

/// The `{id}` of a route, with errors as JSON.
fn path_id(id: Result<UrlPath<String>, PathRejection>) -> ApiResult<String> {
    id.map(|UrlPath(id)| id)
        .map_err(|err| ApiError::new(err.status().as_u16(), err.body_text()))
}

fn created<T: Serialize>(value: T) -> Response {
    (StatusCode::CREATED, Json(value)).into_response()
}

async fn status(State(plane): State<Plane>) -> ApiResult<Response> {
    Ok(Json(blocking(move || plane.status()).await?).into_response())
}

async fn mounts(State(plane): State<Plane>) -> ApiResult<Response> {
    Ok(Json(blocking(move || plane.mounts()).await?).into_response())
}

async fn add_mount(State(plane): State<Plane>, body: Body) -> ApiResult<Response> {
    let req: MountRequest = body.parse()?;
    Ok(created(blocking(move || plane.add_mount(req)).await??))
}

async fn remove_mount(State(plane): State<Plane>, body: Body) -> ApiResult<Response> {
    let req: UnmountRequest = body.parse()?;
    blocking(move || plane.remove_mount(req)).await??;
    Ok(Json(json!({})).into_response())
}

async fn sessions(State(plane): State<Plane>) -> ApiResult<Response> {
    Ok(Json(blocking(move || plane.sessions()).await?).into_response())
}

async fn session(
    State(plane): State<Plane>,
    id: Result<UrlPath<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = path_id(id)?;
    Ok(Json(blocking(move || plane.session(&id)).await??).into_response())
}

async fn create_session(State(plane): State<Plane>, body: Body) -> ApiResult<Response> {
    let req: SessionRequest = body.parse()?;
    Ok(created(blocking(move || plane.create_session(req)).await??))
}

async fn end_session(
    State(plane): State<Plane>,
    id: Result<UrlPath<String>, PathRejection>,
    body: Body,
) -> ApiResult<Response> {
    let id = path_id(id)?;
    let req: EndSessionRequest = body.parse_or_empty()?;
    Ok(Json(blocking(move || plane.end_session(&id, req)).await??).into_response())
}

async fn storage(State(plane): State<Plane>, body: Body) -> ApiResult<Response> {
    let envelope = body.parse_value()?;
    Ok(Json(blocking(move || plane.storage(envelope)).await??).into_response())
}

async fn no_such_endpoint(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        405,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

/// `GET /v1/events` and `POST /v1/urls`, on their own.
fn events_router() -> Router<Plane> {
    Router::new()
        .route("/v1/events", get(events))
        .route("/v1/urls", post(sign_url))
}

/// A response body of lines sent as they come; dropping it (the client went away) closes the
/// channel, which stops whoever sends them.
pub struct Lines(pub tokio::sync::mpsc::Receiver<String>);

impl hyper::body::Body for Lines {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(hyper::body::Frame::data(Bytes::from(l)))))
    }
}

/// The decoded `key=value` pairs of a query string.
pub fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let pair = bytes
                        .get(i + 1)
                        .copied()
                        .and_then(hex)
                        .zip(bytes.get(i + 2).copied().and_then(hex));
                    match pair {
                        Some((hi, lo)) => {
                            out.push(hi << 4 | lo);
                            i += 3;
                            continue;
                        }
                        None => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

async fn events(
    State(plane): State<Plane>,
    uri: Uri,
    headers: axum::http::HeaderMap,
) -> ApiResult<Response> {
    let (mut space, mut since, mut follow, mut token) = (None, 0u64, true, None);
    for (key, value) in query_pairs(&uri) {
        match key.as_str() {
            "space" => space = Some(value),
            "since" => {
                since = value.parse().map_err(|_| {
                    ApiError::bad_request(format!("since={value:?} is not a seq (0 or more)"))
                })?
            }
            "follow" => {
                follow = match value.as_str() {
                    "true" | "1" | "" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "follow={value:?}: use true or false"
                        )));
                    }
                }
            }
            "token" => token = Some(value),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {other:?} (use space, since, follow, token)"
                )));
            }
        }
    }
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let token = token.or(bearer);
    let space = space.ok_or_else(|| {
        ApiError::bad_request("give the space: /v1/events?space=rooms/ID (or sessions/ID)")
    })?;
    let source = blocking(move || plane.events(&space, token.as_deref())).await??;
    let watch = crate::events::stream::Watch {
        space: source.space,
        since,
        follow,
        grant: source.grant,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(crate::events::stream::run(
        source.feed,
        watch,
        tx,
        source.ended,
    ));
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::new(Lines(rx)),
    )
        .into_response())
}

async fn sign_url(State(plane): State<Plane>, body: Body) -> ApiResult<Response> {
    let req: super::UrlRequest = body.parse()?;
    Ok(Json(blocking(move || plane.sign_url(req)).await??).into_response())
}
