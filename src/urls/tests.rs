//! Signing and checking URLs; ranges, names and types of downloads.

use std::path::{Path, PathBuf};

use super::http::{RangeAnswer, content_disposition, guess_type, parse_range, valid_media_type};
use super::*;

fn grant(path: &str, expires: u64) -> Grant {
    Grant {
        space: SpaceId::new(SpaceKind::Room, "r1").unwrap(),
        path: PathBuf::from(path),
        expires,
        disposition: Disposition::Inline,
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
