//! The server and the client against a fake [`ControlPlane`], over a real socket.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use serde_json::{Value, json};

use super::client::{Client, ClientError};
use super::server::{MAX_BODY_BYTES, bind, serve};
use super::*;
use crate::records::RecordError;

/// Keeps mounts and sessions in memory; `/busy` cannot be mounted.
#[derive(Default)]
struct Fake {
    mounts: Mutex<Vec<MountInfo>>,
    sessions: Mutex<BTreeMap<String, SessionInfo>>,
    ends: crate::events::stream::Ends,
}

impl ControlPlane for Fake {
    fn status(&self) -> Status {
        Status {
            version: "test".to_owned(),
            data_dir: "/data".to_owned(),
            socket: "/sock".to_owned(),
            mounts: self.mounts.lock().unwrap().len(),
            sessions: self.sessions.lock().unwrap().len(),
            uptime_secs: 7,
        }
    }

    fn mounts(&self) -> Vec<MountInfo> {
        self.mounts.lock().unwrap().clone()
    }

    fn add_mount(&self, req: MountRequest) -> Result<MountInfo, ApiError> {
        if req.mountpoint == "/busy" {
            return Err(ApiError::conflict("/busy is already a mount point"));
        }
        let (kind, id) = match (req.room, req.session) {
            (Some(room), None) => ("room", room),
            (None, Some(session)) => ("session", session),
            _ => {
                return Err(ApiError::bad_request(
                    "give exactly one of room and session",
                ));
            }
        };
        let info = MountInfo {
            mountpoint: req.mountpoint,
            kind: kind.to_owned(),
            id,
            grant: req.grant.clone().unwrap_or_default().join(","),
            read_only: req.read_only == Some(true),
            noexec: req.noexec == Some(true),
            from_config: false,
        };
        self.mounts.lock().unwrap().push(info.clone());
        Ok(info)
    }

    fn remove_mount(&self, req: UnmountRequest) -> Result<(), ApiError> {
        let mut mounts = self.mounts.lock().unwrap();
        let before = mounts.len();
        mounts.retain(|m| m.mountpoint != req.mountpoint);
        if mounts.len() == before {
            return Err(ApiError::not_found(format!(
                "{} is not mounted",
                req.mountpoint
            )));
        }
        Ok(())
    }

    fn sessions(&self) -> Vec<SessionInfo> {
        self.sessions.lock().unwrap().values().cloned().collect()
    }

    fn session(&self, id: &str) -> Result<SessionInfo, ApiError> {
        self.sessions
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no session {id:?}")))
    }

    fn create_session(&self, req: SessionRequest) -> Result<SessionInfo, ApiError> {
        let info = SessionInfo {
            id: req.id.clone(),
            limits: req.limits.unwrap_or_default().or(Limits::default()),
            ttl_secs: req.ttl_secs,
            created_at: 1,
            last_active: 2,
            ends_at: None,
            files: 0,
            bytes: 0,
            mounts: Vec::new(),
        };
        let mut sessions = self.sessions.lock().unwrap();
        if sessions.contains_key(&req.id) {
            return Err(ApiError::conflict(format!("session {:?} exists", req.id)));
        }
        sessions.insert(req.id, info.clone());
        Ok(info)
    }

    fn end_session(&self, id: &str, req: EndSessionRequest) -> Result<EndReport, ApiError> {
        self.sessions
            .lock()
            .unwrap()
            .remove(id)
            .ok_or_else(|| ApiError::not_found(format!("no session {id:?}")))?;
        Ok(EndReport {
            id: id.to_owned(),
            deleted_files: 3,
            deleted_records: 4,
            exported: req.export,
            unmounted: req.to_room.into_iter().collect(),
        })
    }

    /// `null` → `null`; `"panic"` panics; `{"method": m}` is an unknown method; else echoes.
    fn storage(&self, envelope: Value) -> Result<Value, ApiError> {
        match &envelope {
            Value::String(s) if s == "panic" => panic!("storage blew up"),
            Value::Object(map) if map.get("method").is_some_and(|m| m != "echo") => {
                let method = map["method"].as_str().unwrap_or_default().to_owned();
                Err(RecordError::UnknownMethod(method).into())
            }
            _ => Ok(envelope),
        }
    }

    fn metrics(&self) -> crate::metrics::Snapshot {
        crate::metrics::Snapshot {
            room_mounts: self.mounts.lock().unwrap().len() as u64,
            sessions: self.sessions.lock().unwrap().len() as u64,
            ..Default::default()
        }
    }
    /// The feed of `space` in [`fake_feed`]; the token `"shared"` grants `shared/` only.
    fn events(&self, space: &str, token: Option<&str>) -> Result<EventSource, ApiError> {
        if !space.starts_with("rooms/") {
            return Err(ApiError::not_found(format!("no {space}")));
        }
        let grant = match token {
            None => None,
            Some("shared") => Some(crate::grant::Grant::parse_cli(&["shared/".into()]).unwrap()),
            Some(_) => return Err(ApiError::new(401, "token refused")),
        };
        Ok(EventSource {
            feed: fake_feed(space),
            ended: self.ends.signal(space),
            space: space.to_owned(),
            grant,
        })
    }

    fn sign_url(&self, req: UrlRequest) -> Result<SignedUrl, ApiError> {
        Ok(SignedUrl {
            url: format!("http://fake/{}", req.path),
            expires: 7,
        })
    }
}

/// The feeds of the fake, by space (each test uses its own), keeping the last 2 events.
fn fake_feed(space: &str) -> Arc<crate::events::MemFeed> {
    use crate::events::{MemFeed, Retention};
    static FEEDS: Mutex<BTreeMap<String, Arc<MemFeed>>> = Mutex::new(BTreeMap::new());
    FEEDS
        .lock()
        .unwrap()
        .entry(space.to_owned())
        .or_insert_with(|| {
            Arc::new(MemFeed::new(Retention {
                max_events: Some(2),
                max_age_secs: None,
            }))
        })
        .clone()
}

/// A server on a socket in a temporary directory, stopped on drop.
struct Server {
    dir: tempfile::TempDir,
    plane: Arc<Fake>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let listener = bind(&dir.path().join("run/control.sock")).unwrap();
        let (stop, stopped) = mpsc::channel::<()>();
        let plane = Arc::new(Fake::default());
        let thread = spawn_server(listener, plane.clone(), stopped);
        Server {
            dir,
            plane,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("run/control.sock")
    }

    fn client(&self) -> Client {
        Client::new(self.socket())
    }

    /// Stops the server and returns what `serve` returned.
    fn stop(&mut self) -> std::io::Result<()> {
        drop(self.stop.take());
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop();
        }
    }
}

fn spawn_server(
    listener: UnixListener,
    plane: Arc<Fake>,
    stopped: mpsc::Receiver<()>,
) -> JoinHandle<std::io::Result<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    std::thread::spawn(move || {
        let shutdown = async move {
            let _ = tokio::task::spawn_blocking(move || stopped.recv()).await;
        };
        runtime.block_on(serve(listener, plane, shutdown))
    })
}

/// The status and message of a call that must fail with an API error.
fn api_error<T: std::fmt::Debug>(result: Result<T, ClientError>) -> (u16, String) {
    match result {
        Err(ClientError::Api { status, message }) => (status, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Sends `method path` with `body` as raw HTTP on the socket and returns the status line and
/// the body of the answer.
fn raw(socket: &Path, method: &str, path: &str, body: &str) -> (String, Value) {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status_line = head.lines().next().unwrap().to_owned();
    (status_line, serde_json::from_str(body).unwrap())
}

#[test]
fn status_and_mounts() {
    let server = Server::start();
    let client = server.client();
    let status = client.status().unwrap();
    assert_eq!(
        (status.version.as_str(), status.mounts, status.uptime_secs),
        ("test", 0, 7)
    );

    let req = MountRequest {
        mountpoint: "/mnt/a".to_owned(),
        room: Some("r1".to_owned()),
        grant: Some(vec!["inputs/:ro".to_owned(), "outputs/:rw".to_owned()]),
        ..MountRequest::default()
    };
    let info = client.add_mount(&req).unwrap();
    assert_eq!(info.kind, "room");
    assert_eq!(info.grant, "inputs/:ro,outputs/:rw");
    assert_eq!(client.mounts().unwrap(), vec![info]);
    assert_eq!(client.status().unwrap().mounts, 1);

    // 201 on creation, and `grant` may be left out.
    let created = client
        .request(
            "POST",
            "/v1/mounts",
            Some(&json!({"mountpoint": "/mnt/b", "session": "s"})),
        )
        .unwrap();
    assert_eq!(created["kind"], "session");
    let body = r#"{"mountpoint": "/mnt/c", "room": "r"}"#;
    let (status_line, _) = raw(&server.socket(), "POST", "/v1/mounts", body);
    assert_eq!(status_line, "HTTP/1.1 201 Created");

    let busy = MountRequest {
        mountpoint: "/busy".to_owned(),
        room: Some("r1".to_owned()),
        ..MountRequest::default()
    };
    assert_eq!(
        api_error(client.add_mount(&busy)),
        (409, "/busy is already a mount point".to_owned())
    );

    let unmount = UnmountRequest {
        mountpoint: "/mnt/a".to_owned(),
        lazy: true,
    };
    client.remove_mount(&unmount).unwrap();
    let removed = client.request(
        "POST",
        "/v1/mounts/remove",
        Some(&json!({"mountpoint": "/mnt/b"})),
    );
    assert_eq!(removed.unwrap(), json!({}));
    assert_eq!(
        api_error(client.remove_mount(&unmount)),
        (404, "/mnt/a is not mounted".to_owned())
    );
}

#[test]
fn sessions() {
    let server = Server::start();
    let client = server.client();
    assert_eq!(client.sessions().unwrap(), vec![]);

    let limits = Limits {
        max_files: Some(10),
        ..Limits::default()
    };
    let req = SessionRequest {
        id: "a b/c".to_owned(),
        limits: Some(limits.into()),
        ttl_secs: Some(60),
        owner: None,
    };
    let info = client.create_session(&req).unwrap();
    assert_eq!((info.limits, info.ttl_secs), (limits, Some(60)));
    assert_eq!(api_error(client.create_session(&req)).0, 409);
    // Ids are percent-encoded into the path.
    assert_eq!(client.session("a b/c").unwrap().id, "a b/c");
    assert_eq!(client.sessions().unwrap().len(), 1);
    assert_eq!(
        api_error(client.session("nope")),
        (404, "no session \"nope\"".to_owned())
    );

    let end = EndSessionRequest {
        export: vec!["outputs/".to_owned()],
        to_room: Some("r".to_owned()),
    };
    let report = client.end_session("a b/c", &end).unwrap();
    assert_eq!(
        (report.deleted_files, report.exported, report.unmounted),
        (3, vec!["outputs/".to_owned()], vec!["r".to_owned()])
    );
    assert_eq!(api_error(client.end_session("a b/c", &end)).0, 404);

    // An empty body ends with the defaults.
    client
        .create_session(&SessionRequest {
            id: "s2".to_owned(),
            ..SessionRequest::default()
        })
        .unwrap();
    let report = client.request("POST", "/v1/sessions/s2/end", None).unwrap();
    assert_eq!(report["exported"], json!([]));
}

#[test]
fn storage_passes_values_and_errors_through() {
    let server = Server::start();
    let client = server.client();
    assert_eq!(client.storage(&Value::Null).unwrap(), Value::Null);
    let envelope = json!({"method": "echo", "id": "x", "n": [1, 2.5, null]});
    assert_eq!(client.storage(&envelope).unwrap(), envelope);
    // A RecordError keeps its status and message.
    assert_eq!(
        api_error(client.storage(&json!({"method": "nope.get"}))),
        (400, "unknown method \"nope.get\"".to_owned())
    );
    // A panic in the plane is a 500, and the server goes on.
    let (status, message) = api_error(client.storage(&json!("panic")));
    assert_eq!(status, 500);
    assert!(
        message.contains("the request failed inside the daemon"),
        "{message}"
    );
    assert_eq!(client.storage(&json!(1)).unwrap(), json!(1));
}

#[test]
fn bad_requests_are_json_errors() {
    let server = Server::start();
    let client = server.client();

    let (status, message) = api_error(client.request("GET", "/x", None));
    assert_eq!(
        (status, message.as_str()),
        (404, "no such endpoint: GET /x")
    );
    assert_eq!(
        api_error(client.request("GET", "/v1/sessions/a/b/c", None)).0,
        404
    );

    let (status, message) = api_error(client.request("DELETE", "/v1/storage", None));
    assert_eq!(
        (status, message.as_str()),
        (405, "method DELETE is not allowed on /v1/storage")
    );
    assert_eq!(
        api_error(client.request("POST", "/v1/status", Some(&json!({})))).0,
        405
    );

    let (status, message) = api_error(client.request(
        "POST",
        "/v1/mounts",
        Some(&json!({"mountpoint": "/m", "room": "r", "bogus": 1})),
    ));
    assert_eq!(status, 400);
    assert!(
        message.starts_with("invalid request body: unknown field `bogus`"),
        "{message}"
    );

    // An array is not read by position as the request's fields.
    let (status, message) =
        api_error(client.request("POST", "/v1/mounts", Some(&json!(["/m", "r"]))));
    assert_eq!(status, 400);
    assert_eq!(
        message,
        "invalid request body: expected a JSON object, found an array"
    );

    let (status, message) = api_error(client.request(
        "POST",
        "/v1/sessions",
        Some(&json!({"id": "s", "limits": {"max_files": "ten"}})),
    ));
    assert_eq!(status, 400);
    assert!(message.contains("invalid type"), "{message}");

    let (status, message) = api_error(client.request("POST", "/v1/storage", None));
    assert_eq!(
        (status, message.as_str()),
        (400, "the request body is empty; expected JSON")
    );

    let malformed = r#"{"a": 1,"#;
    let (status_line, body) = raw(&server.socket(), "POST", "/v1/storage", malformed);
    assert_eq!(status_line, "HTTP/1.1 400 Bad Request");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.starts_with("invalid request body: EOF while parsing"),
        "{message}"
    );
    let (status_line, body) = raw(&server.socket(), "POST", "/v1/status", malformed);
    assert_eq!(
        (status_line.as_str(), body["error"].is_string()),
        ("HTTP/1.1 405 Method Not Allowed", true)
    );
}

#[test]
fn oversized_bodies_are_refused() {
    let server = Server::start();
    let client = server.client();
    let fits = Value::String("x".repeat(MAX_BODY_BYTES - 2));
    assert_eq!(
        client.storage(&fits).unwrap().as_str().unwrap().len(),
        MAX_BODY_BYTES - 2
    );
    let too_big = Value::String("x".repeat(MAX_BODY_BYTES - 1));
    assert_eq!(
        api_error(client.storage(&too_big)),
        (413, "the request body is larger than 16 MiB".to_owned())
    );
}

#[test]
fn socket_file_handling() {
    let mut server = Server::start();
    let socket = server.socket();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(socket.parent().unwrap()), 0o755);

    let err = bind(&socket).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert_eq!(
        err.to_string(),
        format!("another roomfs daemon is serving {}", socket.display())
    );
    // The failed bind left the live socket alone.
    server.client().status().unwrap();

    server.stop().unwrap();
    assert!(socket.exists(), "the socket file stays after shutdown");
    match server.client().status() {
        Err(err @ ClientError::NoDaemon { .. }) => assert_eq!(
            err.to_string(),
            format!(
                "no roomfs daemon at {} (start it with `roomfs serve`)",
                socket.display()
            )
        ),
        other => panic!("expected NoDaemon, got {other:?}"),
    }

    // The stale socket is replaced, and serving works again.
    let (stop, stopped) = mpsc::channel();
    let thread = spawn_server(bind(&socket).unwrap(), Arc::default(), stopped);
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(server.client().status().unwrap().sessions, 0);
    drop(stop);
    thread.join().unwrap().unwrap();

    // Other files are not replaced.
    let file = server.dir.path().join("file");
    std::fs::write(&file, "keep").unwrap();
    let err = bind(&file).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{} exists and is not a socket", file.display())
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
}

#[test]
fn client_errors_read_as_sentences() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("missing.sock");
    let err = Client::new(&socket).status().unwrap_err();
    assert!(matches!(err, ClientError::NoDaemon { .. }), "{err:?}");

    let api = ClientError::Api {
        status: 409,
        message: "session \"s\" exists".to_owned(),
    };
    assert_eq!(api.to_string(), "session \"s\" exists");
}

#[test]
fn record_errors_map_to_http_status_in_the_control_layer() {
    let cases: [(RecordError, u16); 4] = [
        (RecordError::BadRequest("missing param `id`".into()), 400),
        (RecordError::UnknownMethod("x.y".into()), 400),
        (
            RecordError::NotFound {
                collection: "session",
                id: "x".to_owned(),
            },
            404,
        ),
        (RecordError::Io(std::io::Error::other("disk")), 500),
    ];
    for (err, status) in cases {
        let message = err.to_string();
        assert_eq!(ApiError::from(err), ApiError::new(status, message));
    }
    let err: ApiError = RecordError::NotFound {
        collection: "session",
        id: "x".to_owned(),
    }
    .into();
    assert_eq!(err, ApiError::not_found("no session record with id \"x\""));
}

#[test]
fn events_stream_from_a_seq_with_a_gap_line_and_grant_filtering() {
    use crate::events::{ChangeFeed, Changed};
    let server = Server::start();
    let feed = fake_feed("rooms/ev1");
    let who: Arc<str> = Arc::from("agent");
    for name in ["shared/a", "secret/b", "shared/c"] {
        feed.publish(&who, &[Changed::file(Path::new(name), 1)]);
    }
    let lines = |path: &str, token: Option<&str>| {
        let mut got = Vec::new();
        server
            .client()
            .stream_lines(path, token, |l| {
                got.push(serde_json::from_slice::<Value>(l).unwrap());
                true
            })
            .map(|()| got)
    };
    // Retains 2: from 0, a gap first.
    let got = lines("/v1/events?space=rooms%2Fev1&follow=false", None).unwrap();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0]["type"], "events.gap");
    assert_eq!(
        (got[0]["oldest_seq"].as_u64(), got[0]["head_seq"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(got[1]["path"], "secret/b");
    assert_eq!(
        (got[2]["seq"].as_u64(), got[2]["space"].as_str()),
        (Some(3), Some("rooms/ev1"))
    );
    // Resuming from a retained seq: no gap.
    let got = lines("/v1/events?space=rooms/ev1&since=2&follow=false", None).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["path"], "shared/c");
    // A token sees its grant only (in the query or as a bearer).
    let got = lines(
        "/v1/events?space=rooms/ev1&since=1&follow=false&token=shared",
        None,
    )
    .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["path"], "shared/c");
    let got = lines(
        "/v1/events?space=rooms/ev1&since=1&follow=false",
        Some("shared"),
    )
    .unwrap();
    assert_eq!(got.len(), 1);
    // Following: new events arrive as they are published.
    let socket = server.socket();
    let follower = std::thread::spawn(move || {
        let mut got = Vec::new();
        Client::new(socket)
            .stream_lines("/v1/events?space=rooms/ev1&since=3", None, |l| {
                got.push(serde_json::from_slice::<Value>(l).unwrap());
                got.len() < 2
            })
            .unwrap();
        got
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    feed.publish(&who, &[Changed::folder_created(Path::new("d"))]);
    feed.publish(&who, &[Changed::file_deleted(Path::new("shared/a"))]);
    let got = follower.join().unwrap();
    assert_eq!(got[0]["type"], "folder.created");
    assert_eq!(
        (got[1]["type"].as_str(), got[1]["seq"].as_u64()),
        (Some("file.deleted"), Some(5))
    );
    // Mistakes are 4xx with a message.
    for (path, status, text) in [
        ("/v1/events", 400, "give the space"),
        ("/v1/events?space=rooms/ev1&since=x", 400, "not a seq"),
        ("/v1/events?space=rooms/ev1&follow=maybe", 400, "follow"),
        (
            "/v1/events?space=rooms/ev1&color=red",
            400,
            "unknown parameter",
        ),
        ("/v1/events?space=sessions/zz", 404, "no sessions/zz"),
        ("/v1/events?space=rooms/ev1&token=bad", 401, "token refused"),
    ] {
        let (s, m) = api_error(lines(path, None));
        assert_eq!(s, status, "{path}: {m}");
        assert!(m.contains(text), "{path}: {m}");
    }
}

#[test]
fn a_followers_stream_ends_with_a_line_saying_why_when_its_space_goes_or_the_daemon_stops() {
    use crate::events::{ChangeFeed, Changed};
    let server = Server::start();
    let feed = fake_feed("rooms/ev2");
    let who: Arc<str> = Arc::from("agent");
    let follow = |since: u64| {
        let socket = server.socket();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let path = format!("/v1/events?space=rooms/ev2&since={since}");
            Client::new(socket)
                .stream_lines(&path, None, |l| {
                    got.push(serde_json::from_slice::<Value>(l).unwrap());
                    true
                })
                .unwrap();
            got
        })
    };
    let wait_for_followers = |n: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while server.plane.ends.streams("rooms/ev2") < n {
            assert!(std::time::Instant::now() < deadline, "no follower came");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    // The space is deleted: the follower gets its events, then the end, and the stream closes.
    let first = follow(0);
    wait_for_followers(1);
    feed.publish(&who, &[Changed::file(Path::new("a"), 1)]);
    server.plane.ends.deleted("rooms/ev2");
    let got = first.join().unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0]["path"], "a");
    assert_eq!(
        got[1],
        json!({"type": "events.end", "space": "rooms/ev2", "reason": "deleted", "last_seq": 1})
    );
    // Another space's followers are not ended by it; the daemon stopping ends them all, and
    // streams asked for afterwards end at once.
    let second = follow(1);
    wait_for_followers(1);
    server.plane.ends.deleted("rooms/other");
    feed.publish(&who, &[Changed::file(Path::new("b"), 1)]);
    server.plane.ends.stopping();
    let got = second.join().unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0]["path"], "b");
    assert_eq!(
        (got[1]["reason"].as_str(), got[1]["last_seq"].as_u64()),
        (Some("stopping"), Some(2))
    );
    let got = follow(2).join().unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["reason"], "stopping");
}
