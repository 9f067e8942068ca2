//! The CLI's blocking client of the control API (hyper over the Unix socket).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::UnixStream;

use super::{
    EndReport, EndSessionRequest, MountInfo, MountRequest, SessionInfo, SessionRequest, SignedUrl,
    Status, UnmountRequest, UrlRequest,
};

/// Why a control API call failed. Display is one sentence for the user.
#[derive(Debug)]
pub enum ClientError {
    /// Nothing listens on the socket (missing, or a stale file).
    NoDaemon { socket: PathBuf },
    /// Something else than a socket is at the path: `what` says what (`a regular file`).
    NotASocket { socket: PathBuf, what: &'static str },
    /// The socket exists but this user may not connect to it.
    NotPermitted { socket: PathBuf },
    /// The daemon answered with an error.
    Api { status: u16, message: String },
    /// Any other failure talking to the daemon.
    Io { socket: PathBuf, error: io::Error },
    /// The daemon's answer was not what the API promises.
    Protocol { message: String },
    /// The daemon closed the connection before it answered (it stopped or crashed meanwhile).
    Gone { socket: PathBuf },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::NoDaemon { socket } => write!(
                f,
                "no roomfs daemon at {} (start it with `roomfs serve`)",
                socket.display()
            ),
            ClientError::NotASocket { socket, what } => write!(
                f,
                "{} is not a socket ({what}): no roomfs daemon listens there (give the socket \
                 `roomfs serve` made)",
                socket.display()
            ),
            ClientError::NotPermitted { socket } => write!(
                f,
                "not permitted to use the daemon socket {}: run as root",
                socket.display()
            ),
            ClientError::Api { message, .. } => f.write_str(message),
            ClientError::Io { socket, error } => {
                write!(
                    f,
                    "cannot talk to the roomfs daemon at {}: {error}",
                    socket.display()
                )
            }
            ClientError::Protocol { message } => {
                write!(f, "unexpected answer from the roomfs daemon: {message}")
            }
            ClientError::Gone { socket } => write!(
                f,
                "the roomfs daemon at {} went away before it answered (it stopped or crashed): \
                 the request may be done in part, or not at all; once it is back, run the \
                 command again",
                socket.display()
            ),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Io { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl ClientError {
    fn connect(socket: &Path, error: io::Error) -> ClientError {
        let socket = socket.to_owned();
        match error.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                match std::fs::metadata(&socket).map(|m| file_kind(m.file_type())) {
                    Ok(Some(what)) => ClientError::NotASocket { socket, what },
                    _ => ClientError::NoDaemon { socket },
                }
            }
            io::ErrorKind::PermissionDenied => ClientError::NotPermitted { socket },
            _ => ClientError::Io { socket, error },
        }
    }

    fn protocol(message: impl fmt::Display) -> ClientError {
        ClientError::Protocol {
            message: message.to_string(),
        }
    }
}

/// What a file that is not a socket is, in words; `None` for a socket.
fn file_kind(t: std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    Some(if t.is_socket() {
        return None;
    } else if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a socket"
    })
}

/// A client of the daemon at a socket path. Each call opens one connection.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    /// Sends one request (`path` like `/v1/status`, already percent-encoded) and returns the
    /// JSON answer of a 2xx response; other statuses are [`ClientError::Api`]. Blocks; must not
    /// be called from inside a tokio runtime.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let method = Method::from_bytes(method.as_bytes()).map_err(ClientError::protocol)?;
        let body = match body {
            Some(value) => Some(serde_json::to_vec(value).map_err(ClientError::protocol)?),
            None => None,
        };
        let runtime = self.runtime()?;
        let (status, bytes) = runtime.block_on(self.send(method, path, body))?;
        decode(status, &bytes)
    }

    /// A runtime for one blocking call.
    fn runtime(&self) -> Result<tokio::runtime::Runtime, ClientError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|error| ClientError::Io {
                socket: self.socket.clone(),
                error,
            })
    }

    /// `GET /metrics`: the Prometheus text, as served.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let runtime = self.runtime()?;
        let (status, bytes) = runtime.block_on(self.send(Method::GET, "/metrics", None))?;
        if !status.is_success() {
            return decode(status, &bytes).map(|_| String::new());
        }
        String::from_utf8(bytes.to_vec()).map_err(ClientError::protocol)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|err| ClientError::connect(&self.socket, err))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| self.hyper_error(err))?;
        tokio::spawn(connection);

        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "localhost");
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(ClientError::protocol)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|err| self.hyper_error(err))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|err| self.hyper_error(err))?
            .to_bytes();
        Ok((status, bytes))
    }

    /// A hyper failure: an I/O error underneath is reported as such.
    fn hyper_error(&self, err: hyper::Error) -> ClientError {
        if err.is_incomplete_message() || err.is_closed() {
            return ClientError::Gone {
                socket: self.socket.clone(),
            };
        }
        let io_kind = std::error::Error::source(&err)
            .and_then(|source| source.downcast_ref::<io::Error>())
            .map(io::Error::kind);
        match io_kind {
            Some(kind) => ClientError::Io {
                socket: self.socket.clone(),
                error: io::Error::new(kind, err.to_string()),
            },
            None => ClientError::protocol(err),
        }
    }

    /// [`Client::request`] with typed JSON in and out.
    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body.map(to_value).transpose()?;
        let value = self.request(method, path, body.as_ref())?;
        serde_json::from_value(value).map_err(ClientError::protocol)
    }

    pub fn status(&self) -> Result<Status, ClientError> {
        self.call("GET", "/v1/status", None::<&()>)
    }

    pub fn mounts(&self) -> Result<Vec<MountInfo>, ClientError> {
        self.call("GET", "/v1/mounts", None::<&()>)
    }

    pub fn add_mount(&self, req: &MountRequest) -> Result<MountInfo, ClientError> {
        self.call("POST", "/v1/mounts", Some(req))
    }

    pub fn remove_mount(&self, req: &UnmountRequest) -> Result<(), ClientError> {
        self.call::<Value>("POST", "/v1/mounts/remove", Some(req))
            .map(drop)
    }

    pub fn sessions(&self) -> Result<Vec<SessionInfo>, ClientError> {
        self.call("GET", "/v1/sessions", None::<&()>)
    }

    pub fn session(&self, id: &str) -> Result<SessionInfo, ClientError> {
        self.call(
            "GET",
            &format!("/v1/sessions/{}", encode_segment(id)),
            None::<&()>,
        )
    }

    pub fn create_session(&self, req: &SessionRequest) -> Result<SessionInfo, ClientError> {
        self.call("POST", "/v1/sessions", Some(req))
    }

    pub fn end_session(&self, id: &str, req: &EndSessionRequest) -> Result<EndReport, ClientError> {
        let path = format!("/v1/sessions/{}/end", encode_segment(id));
        self.call("POST", &path, Some(req))
    }

    /// A signed download URL.
    pub fn sign_url(&self, req: &UrlRequest) -> Result<SignedUrl, ClientError> {
        self.call("POST", "/v1/urls", Some(req))
    }

    /// GETs `path` (with `bearer` as its `Authorization`) and hands each line of the answer
    /// to `line` as it arrives, until the answer ends or `line` returns false. An error status
    /// is [`ClientError::Api`]. Blocks; must not be called from inside a tokio runtime.
    pub fn stream_lines(
        &self,
        path: &str,
        bearer: Option<&str>,
        mut line: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|error| ClientError::Io {
                socket: self.socket.clone(),
                error,
            })?;
        runtime.block_on(async {
            let stream = UnixStream::connect(&self.socket)
                .await
                .map_err(|err| ClientError::connect(&self.socket, err))?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|err| self.hyper_error(err))?;
            tokio::spawn(connection);
            let mut request = hyper::Request::builder()
                .method(Method::GET)
                .uri(path)
                .header(HOST, "localhost");
            if let Some(token) = bearer {
                request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
            }
            let request = request
                .body(Full::new(Bytes::new()))
                .map_err(ClientError::protocol)?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|err| self.hyper_error(err))?;
            let status = response.status();
            let mut body = response.into_body();
            if !status.is_success() {
                let bytes = body
                    .collect()
                    .await
                    .map_err(|err| self.hyper_error(err))?
                    .to_bytes();
                return decode(status, &bytes).map(drop);
            }
            let mut pending: Vec<u8> = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|err| self.hyper_error(err))?;
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                pending.extend_from_slice(data);
                while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                    let keep_going = line(&pending[..nl]);
                    pending.drain(..=nl);
                    if !keep_going {
                        return Ok(());
                    }
                }
            }
            if !pending.is_empty() {
                line(&pending);
            }
            Ok(())
        })
    }

    /// Sends an agent SDK storage envelope; the result may be `null`.
    pub fn storage(&self, envelope: &Value) -> Result<Value, ClientError> {
        self.request("POST", "/v1/storage", Some(envelope))
    }
}

fn to_value(value: &impl Serialize) -> Result<Value, ClientError> {
    serde_json::to_value(value).map_err(ClientError::protocol)
}

/// The JSON of a 2xx answer (an empty body is `null`), or the error the daemon reported.
fn decode(status: StatusCode, body: &[u8]) -> Result<Value, ClientError> {
    if status.is_success() {
        if body.is_empty() {
            return Ok(Value::Null);
        }
        return serde_json::from_slice(body)
            .map_err(|err| ClientError::protocol(format!("invalid JSON ({err})")));
    }
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|value| value.get("error")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            format!("the daemon answered {status}: {}", text.trim())
        });
    Err(ClientError::Api {
        status: status.as_u16(),
        message,
    })
}

/// Percent-encodes `segment` for use as one path segment (every byte but ASCII letters, digits, `-_~`).
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors() {
        let socket = Path::new("/run/roomfs/control.sock");
        let kind = |kind: io::ErrorKind| ClientError::connect(socket, io::Error::from(kind));
        assert!(matches!(
            kind(io::ErrorKind::NotFound),
            ClientError::NoDaemon { .. }
        ));
        assert!(matches!(
            kind(io::ErrorKind::ConnectionRefused),
            ClientError::NoDaemon { .. }
        ));
        // Something else at the path is named.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        for (path, what) in [
            (file.as_path(), "a regular file"),
            (dir.path(), "a directory"),
            (fifo.as_path(), "a FIFO"),
        ] {
            let err = Client::new(path).status().unwrap_err().to_string();
            assert_eq!(
                err,
                format!(
                    "{} is not a socket ({what}): no roomfs daemon listens there (give the \
                     socket `roomfs serve` made)",
                    path.display()
                )
            );
        }
        assert_eq!(
            kind(io::ErrorKind::PermissionDenied).to_string(),
            "not permitted to use the daemon socket /run/roomfs/control.sock: run as root"
        );
        assert!(matches!(
            kind(io::ErrorKind::TimedOut),
            ClientError::Io { .. }
        ));
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode_segment("a-b_c~9"), "a-b_c~9");
        assert_eq!(encode_segment("a b/../é"), "a%20b%2F%2E%2E%2F%C3%A9");
    }

    #[test]
    fn error_answers() {
        let err = decode(StatusCode::CONFLICT, br#"{"error": "taken"}"#).unwrap_err();
        assert!(matches!(err, ClientError::Api { status: 409, ref message } if message == "taken"));
        let err = decode(StatusCode::BAD_GATEWAY, b"upstream down\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the daemon answered 502 Bad Gateway: upstream down"
        );
        assert_eq!(decode(StatusCode::OK, b"").unwrap(), Value::Null);
    }
}
