//! Signing and checking URLs; ranges, names and types of downloads.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::http::{
    Limits, RangeAnswer, content_disposition, guess_type, parse_range, serve_router,
    valid_media_type,
};
use super::*;

fn grant(path: &str, expires: u64) -> Grant {
    Grant {
        space: SpaceId::new(SpaceKind::Room, "r1").unwrap(),
        path: PathBuf::from(path),
        expires,
        disposition: Disposition::Inline,
        session: None,
    }
}

/// The `/v1/files/` part and the query of a URL.
fn split(url: &str) -> (String, String) {
    let rest = url.split_once("/v1/files/").unwrap().1;
    let (path, query) = rest.split_once('?').unwrap();
    (path.to_string(), query.to_string())
}

#[test]
fn a_signed_url_grants_exactly_its_file_until_it_expires() {
    let secret = b"s3cret";
    let g = grant("outputs/the report (v2).pdf", 1000);
    let url = sign(secret, "http://127.0.0.1:8080/", &g);
    assert!(
        url.starts_with("http://127.0.0.1:8080/v1/files/rooms/r1/outputs/the%20report%20%28v2%29.pdf?expires=1000&disposition=inline&signature="),
        "{url}"
    );
    let (path, query) = split(&url);
    assert_eq!(verify(secret, &path, &query, 999), Ok(g.clone()));
    assert_eq!(verify(secret, &path, &query, 1000), Err(Refused::Expired));
    assert_eq!(
        verify(b"other", &path, &query, 0),
        Err(Refused::BadSignature)
    );
    // Any change to what it says breaks the signature.
    let tampered = [
        (path.replace("outputs", "inputs"), query.clone()),
        (path.replace("rooms/r1", "rooms/r2"), query.clone()),
        (path.replace("rooms/r1", "sessions/r1"), query.clone()),
        (path.clone(), query.replace("expires=1000", "expires=99999")),
        (path.clone(), query.replace("inline", "attachment")),
    ];
    for (p, q) in tampered {
        assert_eq!(
            verify(secret, &p, &q, 0),
            Err(Refused::BadSignature),
            "{p}?{q}"
        );
    }
    for (p, q) in [
        (path.clone(), query.replace("signature=", "x=")),
        (path.replace("outputs/", "outputs/../"), query.clone()),
        ("rooms/r1/".to_string(), query.clone()),
        ("volumes/r1/a".to_string(), query.clone()),
        (path.clone(), query.replace("expires=1000", "expires=soon")),
    ] {
        assert!(
            matches!(verify(secret, &p, &q, 0), Err(Refused::Malformed(_))),
            "{p}?{q}"
        );
    }
    // Names that are not UTF-8 survive the trip.
    use std::os::unix::ffi::OsStrExt;
    let odd = Grant {
        path: PathBuf::from(std::ffi::OsStr::from_bytes(b"a/\xff\n.bin")),
        ..g
    };
    let (path, query) = split(&sign(secret, "http://h", &odd));
    assert_eq!(verify(secret, &path, &query, 0).unwrap().path, odd.path);
}

#[test]
fn a_session_url_names_the_session_it_was_made_for() {
    let secret = b"s3cret";
    let g = Grant {
        space: SpaceId::new(SpaceKind::Session, "s1").unwrap(),
        session: Some(1_700_000_000_123),
        ..grant("out.txt", 1000)
    };
    let url = sign(secret, "http://h", &g);
    assert!(url.contains("&session=1700000000123&"), "{url}");
    let (path, query) = split(&url);
    assert_eq!(verify(secret, &path, &query, 0), Ok(g.clone()));
    // Another session's time, or none, breaks the signature; so does one added to a room's.
    for q in [
        query.replace("session=1700000000123", "session=1700000000124"),
        query.replace("&session=1700000000123", ""),
    ] {
        assert_eq!(
            verify(secret, &path, &q, 0),
            Err(Refused::BadSignature),
            "{q}"
        );
    }
    let (room_path, room_query) = split(&sign(secret, "http://h", &grant("out.txt", 1000)));
    let q = room_query.replace("&signature", "&session=1700000000123&signature");
    assert_eq!(
        verify(secret, &room_path, &q, 0),
        Err(Refused::BadSignature)
    );
    assert_eq!(
        verify(
            secret,
            &path,
            &query.replace("session=1700000000123", "session=x"),
            0
        ),
        Err(Refused::Malformed("bad session time"))
    );
}

#[test]
fn ranges() {
    use RangeAnswer::*;
    assert_eq!(parse_range("bytes=0-99", 1000), Satisfiable(0, 100));
    assert_eq!(parse_range("bytes=900-", 1000), Satisfiable(900, 1000));
    assert_eq!(parse_range("bytes=900-5000", 1000), Satisfiable(900, 1000));
    assert_eq!(parse_range("bytes=-100", 1000), Satisfiable(900, 1000));
    assert_eq!(parse_range("bytes=-5000", 1000), Satisfiable(0, 1000));
    assert_eq!(parse_range("bytes=1000-", 1000), Unsatisfiable);
    assert_eq!(parse_range("bytes=-0", 1000), Unsatisfiable);
    assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
    assert_eq!(parse_range("bytes=0-1,5-6", 1000), Ignored);
    assert_eq!(parse_range("bytes=5-1", 1000), Ignored);
    assert_eq!(parse_range("bytes=x-1", 1000), Ignored);
    assert_eq!(parse_range("items=0-1", 1000), Ignored);
}

#[test]
fn names_and_types_of_downloads() {
    assert_eq!(
        content_disposition(
            Disposition::Attachment,
            Path::new("out/r\u{e9}sum\u{e9} \"1\".pdf")
        ),
        "attachment; filename=\"r_sum_ _1_.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%221%22.pdf"
    );
    assert_eq!(
        content_disposition(Disposition::Inline, Path::new("a.txt")),
        "inline; filename=\"a.txt\"; filename*=UTF-8''a.txt"
    );
    assert_eq!(guess_type(Path::new("x/Report.PDF")), "application/pdf");
    assert_eq!(guess_type(Path::new("noext")), "application/octet-stream");
    assert!(valid_media_type(
        "application/vnd.custom+json; charset=utf-8"
    ));
    for bad in ["text", "text/", "/x", "text/plain\r\nX-Evil: 1", "a b/c"] {
        assert!(!valid_media_type(bad), "{bad:?}");
    }
}

/// A listener within `limits` answering 404 to everything, on a runtime of its own (the
/// listener stops with it); its address.
fn listener(limits: Limits) -> (tokio::runtime::Runtime, SocketAddr) {
    listener_with(limits, axum::Router::new())
}

/// A listener within `limits` serving `router`, as [`listener`].
fn listener_with(limits: Limits, router: axum::Router) -> (tokio::runtime::Runtime, SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = std_listener.local_addr().unwrap();
    runtime.spawn(serve_router(
        std_listener,
        router,
        limits,
        std::future::pending(),
    ));
    (runtime, addr)
}

/// Reads until the server closes `c` (or `wait` passes): what it sent, and when it closed.
fn until_closed(c: &mut TcpStream, wait: Duration) -> (Vec<u8>, Option<Duration>) {
    let start = Instant::now();
    c.set_read_timeout(Some(wait)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return (got, Some(start.elapsed())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (got, Some(start.elapsed()));
            }
            Err(_) => return (got, None),
        }
    }
}

#[test]
fn a_client_slow_to_send_its_headers_is_cut_off() {
    let (_runtime, addr) = listener(Limits {
        header_timeout: Duration::from_millis(300),
        connections: 8,
        ..Limits::default()
    });
    // Half a header, then nothing.
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n").unwrap();
    let (got, closed) = until_closed(&mut c, Duration::from_secs(5));
    let closed = closed.expect("the connection is closed");
    assert!(closed < Duration::from_secs(3), "{closed:?}");
    assert!(!got.starts_with(b"HTTP/1.1 404"), "no request was read");
    // Kept alive after a request, then idle: cut off as well.
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let (got, closed) = until_closed(&mut c, Duration::from_secs(5));
    assert!(got.starts_with(b"HTTP/1.1 404"), "{got:?}");
    assert!(closed.expect("closed") < Duration::from_secs(3));
}

#[test]
fn connections_over_the_cap_wait_for_a_free_one() {
    let (_runtime, addr) = listener(Limits {
        header_timeout: Duration::from_secs(30),
        connections: 2,
        ..Limits::default()
    });
    let mut held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // The third is queued by the kernel, and not served while both slots are taken.
    let mut third = TcpStream::connect(addr).unwrap();
    third
        .write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (got, closed) = until_closed(&mut third, Duration::from_millis(700));
    assert!(got.is_empty() && closed.is_none(), "{got:?} {closed:?}");
    // One leaves: the third is served.
    drop(held.pop());
    let (got, closed) = until_closed(&mut third, Duration::from_secs(5));
    assert!(got.starts_with(b"HTTP/1.1 404"), "{got:?}");
    assert!(closed.is_some());
    drop(held);
}

/// Bytes of the body `/big` answers with: more than both ends' socket buffers hold.
const BIG: usize = 64 << 20;

/// A body of `BIG` zero bytes, made as it is sent.
struct Zeros(usize);

impl hyper::body::Body for Zeros {
    type Data = axum::body::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
        let n = self.0.min(ZEROS.len());
        self.0 -= n;
        std::task::Poll::Ready((n > 0).then(|| {
            Ok(hyper::body::Frame::data(axum::body::Bytes::from_static(
                &ZEROS[..n],
            )))
        }))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.0 as u64)
    }
}

/// A listener whose `/big` is `BIG` bytes, with a write timeout of `write_timeout` and one
/// connection at a time.
fn big_listener(write_timeout: Duration) -> (tokio::runtime::Runtime, SocketAddr) {
    let router = axum::Router::new().route(
        "/big",
        axum::routing::get(|| async { axum::body::Body::new(Zeros(BIG)) }),
    );
    let limits = Limits {
        write_timeout,
        connections: 1,
        ..Limits::default()
    };
    listener_with(limits, router)
}

#[test]
fn a_client_that_takes_no_data_is_cut_off_and_frees_its_slot() {
    let (_runtime, addr) = big_listener(Duration::from_millis(500));
    // Asks for a large body, then reads nothing: it holds the only connection slot.
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled
        .write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(100));
    // The next client is served once the stalled one is cut off.
    let mut next = TcpStream::connect(addr).unwrap();
    next.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (got, closed) = until_closed(&mut next, Duration::from_secs(10));
    assert!(
        got.starts_with(b"HTTP/1.1 404"),
        "the next client is not served: {:?}",
        String::from_utf8_lossy(&got[..got.len().min(100)])
    );
    assert!(closed.is_some());
    let waited = start.elapsed();
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    // The stalled one got what the socket buffers held, then the connection's end.
    let (got, closed) = until_closed(&mut stalled, Duration::from_secs(5));
    assert!(closed.is_some(), "the stalled connection is closed");
    assert!(got.starts_with(b"HTTP/1.1 200"));
    assert!(got.len() < BIG, "{} bytes", got.len());
}

#[test]
fn a_slow_download_that_keeps_reading_is_not_cut_off() {
    let (_runtime, addr) = big_listener(Duration::from_millis(500));
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    // 2 MiB every 100 ms: 3 s in all, many times the write timeout, never stalled that long.
    let start = Instant::now();
    let mut buf = vec![0u8; 2 << 20];
    let mut got = Vec::new();
    loop {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut filled = 0;
        while filled < buf.len() {
            match c.read(&mut buf[filled..]).unwrap() {
                0 => break,
                n => filled += n,
            }
        }
        got.extend_from_slice(&buf[..filled]);
        if filled < buf.len() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(got.starts_with(b"HTTP/1.1 200"));
    assert_eq!(got.len() - head_end, BIG, "the whole body");
    assert!(start.elapsed() > Duration::from_secs(2));
}
