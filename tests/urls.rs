//! Signed download URLs through a real daemon: `roomfs url`, then `curl` (ranges, HEAD,
//! expiry, tampering, a path outside the token's grant, a path that changed kind) and a Python
//! `urllib` client downloading 100 MiB while the daemon's memory stays flat.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::daemon::Daemon;
use common::python;

/// A daemon serving downloads on a free port, with a secret; and the secret file.
fn daemon() -> (Daemon, tempfile::TempDir) {
    let keys = tempfile::tempdir().unwrap();
    let secret = keys.path().join("secret");
    fs::write(&secret, "url-test-secret-of-32-bytes-or-more\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        r#"{{"secret_file": "{}", "http_listen": "127.0.0.1:{port}"}}"#,
        secret.display()
    );
    let d = Daemon::with_config(Some(&config));
    assert!(d.log().contains("serving download URLs"), "{}", d.log());
    (d, keys)
}

/// `roomfs url ARGS`: the URL, or the error.
fn url(d: &Daemon, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["url"];
    all.extend_from_slice(args);
    let (code, out, err) = d.cli(&all);
    if code == 0 {
        Ok(out.trim().to_string())
    } else {
        Err(err)
    }
}

/// `curl -s ARGS URL`: (status, headers, body).
fn curl(args: &[&str], url: &str) -> (u16, String, Vec<u8>) {
    let tmp = tempfile::tempdir().unwrap();
    let (headers, body) = (tmp.path().join("h"), tmp.path().join("b"));
    let out = Command::new("curl")
        .args(["-s", "-o"])
        .arg(&body)
        .arg("-D")
        .arg(&headers)
        .args(["-w", "%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    let status = String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0);
    (
        status,
        fs::read_to_string(&headers)
            .unwrap_or_default()
            .to_ascii_lowercase(),
        fs::read(&body).unwrap_or_default(),
    )
}

fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(str::trim)
}

#[test]
fn signed_urls_serve_the_file_with_ranges_and_refuse_what_they_do_not_grant() {
    let (d, keys) = daemon();
    let a = d.dir("a");
    d.mount(&["--room", "r1"], &a);
    fs::create_dir(a.join("outputs")).unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(a.join("outputs/report.pdf"), &data).unwrap();
    let u = url(&d, &["--room", "r1", "outputs/report.pdf"]).unwrap();
    assert!(
        u.contains("/v1/files/rooms/r1/outputs/report.pdf?expires="),
        "{u}"
    );
    // The whole file, with its type, name, ETag and date.
    let (status, h, body) = curl(&[], &u);
    assert_eq!(status, 200, "{h}");
    assert_eq!(body, data);
    assert_eq!(header(&h, "content-type"), Some("application/pdf"));
    assert_eq!(
        header(&h, "content-disposition"),
        Some("inline; filename=\"report.pdf\"; filename*=utf-8''report.pdf")
    );
    assert_eq!(header(&h, "accept-ranges"), Some("bytes"));
    let etag = header(&h, "etag").unwrap().to_string();
    assert!(etag.starts_with('"') && etag.len() == 34, "{etag}");
    assert!(header(&h, "last-modified").unwrap().ends_with("gmt"));
    // Whatever the type, nothing served runs script in the listener's origin.
    assert_eq!(header(&h, "content-security-policy"), Some("sandbox"));
    assert_eq!(header(&h, "x-content-type-options"), Some("nosniff"));
    // Ranges.
    let (status, h, body) = curl(&["-H", "Range: bytes=10-19"], &u);
    assert_eq!(status, 206);
    assert_eq!(body, &data[10..20]);
    assert_eq!(header(&h, "content-range"), Some("bytes 10-19/100000"));
    let (status, _, body) = curl(&["-H", "Range: bytes=-5"], &u);
    assert_eq!((status, body), (206, data[99_995..].to_vec()));
    let (status, _, body) = curl(&["-H", "Range: bytes=99990-"], &u);
    assert_eq!((status, body.len()), (206, 10));
    let (status, h, _) = curl(&["-H", "Range: bytes=100000-"], &u);
    assert_eq!(status, 416);
    assert_eq!(header(&h, "content-range"), Some("bytes */100000"));
    // A range of another version is ignored; the current one revalidates.
    let (status, _, body) = curl(&["-H", "Range: bytes=0-9", "-H", "If-Range: \"old\""], &u);
    assert_eq!((status, body.len()), (200, 100_000));
    let (status, _, body) = curl(&["-H", &format!("If-None-Match: {etag}")], &u);
    assert_eq!((status, body.len()), (304, 0));
    // HEAD: the headers only (curl -I writes them where the body would go).
    let (status, h, body) = curl(&["-I"], &u);
    assert_eq!(status, 200);
    assert_eq!(header(&h, "content-length"), Some("100000"));
    assert!(
        body.len() < 2000 && body.starts_with(b"HTTP/1.1 200"),
        "{body:?}"
    );
    // A new version: served at request time, with another ETag.
    fs::write(a.join("outputs/report.pdf"), b"v2").unwrap();
    let (status, h, body) = curl(&[], &u);
    assert_eq!((status, body.as_slice()), (200, &b"v2"[..]));
    assert_ne!(header(&h, "etag").unwrap(), etag);
    // The type from user.mime_type; a download by its name.
    fs::write(a.join("outputs/data.bin"), b"{}").unwrap();
    python(
        &a,
        "import os; os.setxattr(os.environ['MNT'] + '/outputs/data.bin', 'user.mime_type', b'application/json')",
    );
    let u2 = url(&d, &["--room", "r1", "outputs/data.bin", "--attachment"]).unwrap();
    let (status, h, _) = curl(&[], &u2);
    assert_eq!(status, 200);
    assert_eq!(header(&h, "content-type"), Some("application/json"));
    assert!(
        header(&h, "content-disposition")
            .unwrap()
            .starts_with("attachment;")
    );
    // Types an agent picks that a browser renders (XSLT, a multipart stream of HTML) are
    // sandboxed like any other.
    for mime in ["text/xsl", "multipart/x-mixed-replace; boundary=x"] {
        python(
            &a,
            &format!(
                "import os; os.setxattr(os.environ['MNT'] + '/outputs/data.bin', 'user.mime_type', b'{mime}')"
            ),
        );
        let (status, h, _) = curl(&[], &u2);
        assert_eq!(status, 200);
        assert_eq!(header(&h, "content-type"), Some(mime));
        assert_eq!(
            header(&h, "content-security-policy"),
            Some("sandbox"),
            "{mime}"
        );
        assert_eq!(header(&h, "x-content-type-options"), Some("nosniff"));
    }
    // Tampering: another path, a later expiry, another disposition.
    let tampered = [
        u.replace("report.pdf", "data.bin"),
        u.replace("expires=", "expires=9"),
        u.replace("inline", "attachment"),
        u.replace("signature=", "signature=A"),
    ];
    for t in tampered {
        let (status, _, body) = curl(&[], &t);
        assert_eq!(status, 403, "{t}");
        assert!(String::from_utf8_lossy(&body).contains("error"));
    }
    // A path that changed kind: 404, nothing read.
    fs::remove_file(a.join("outputs/data.bin")).unwrap();
    fs::create_dir(a.join("outputs/data.bin")).unwrap();
    let (status, _, body) = curl(&[], &u2);
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    // Expiry.
    let short = url(&d, &["--room", "r1", "outputs/report.pdf", "--ttl", "2s"]).unwrap();
    assert_eq!(curl(&[], &short).0, 200);
    std::thread::sleep(std::time::Duration::from_millis(3100));
    let (status, _, body) = curl(&[], &short);
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&body).contains("expired"));
    // With a token, only paths inside its grant.
    let token = issue(keys.path(), &["--room", "r1", "--path", "outputs/:ro"]);
    assert!(
        url(
            &d,
            &["--room", "r1", "outputs/report.pdf", "--token", &token]
        )
        .is_ok()
    );
    fs::write(a.join("secret.txt"), b"s").unwrap();
    let err = url(&d, &["--room", "r1", "secret.txt", "--token", &token]).unwrap_err();
    assert!(err.contains("outside the token's grant"), "{err}");
    // A URL lives no longer than the token it was checked against: the default TTL (15 min)
    // is cut to the token's 60 s; a longer one asked for is refused.
    let brief = issue(
        keys.path(),
        &["--room", "r1", "--path", "outputs/:ro", "--ttl", "60s"],
    );
    let signed = url(
        &d,
        &["--room", "r1", "outputs/report.pdf", "--token", &brief],
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expires: u64 = signed
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("expires="))
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("no expiry in {signed}"));
    assert!(expires <= now + 62 && expires + 5 >= now + 60, "{signed}");
    assert_eq!(curl(&[], &signed).0, 200);
    let err = url(
        &d,
        &[
            "--room",
            "r1",
            "outputs/report.pdf",
            "--token",
            &brief,
            "--ttl",
            "7d",
        ],
    )
    .unwrap_err();
    assert!(err.contains("may not outlive the token"), "{err}");
    // Clear refusals at issue time.
    let err = url(&d, &["--room", "r1", "missing.txt"]).unwrap_err();
    assert!(err.contains("no file at missing.txt"), "{err}");
    let err = url(&d, &["--room", "r1", "../etc/passwd"]).unwrap_err();
    assert!(err.contains(".."), "{err}");
    let err = url(&d, &["--room", "r1", "secret.txt", "--direct"]).unwrap_err();
    assert!(
        err.contains("direct URLs come from an object store"),
        "{err}"
    );
    let err = url(&d, &["--room", "r1", "secret.txt", "--ttl", "30d"]).unwrap_err();
    assert!(err.contains("ttl"), "{err}");
}

#[test]
fn a_session_link_does_not_serve_a_later_session_of_the_same_id() {
    let (d, _keys) = daemon();
    let s = d.dir("s");
    d.json(&["session", "create", "s1", "--json"]);
    d.mount(&["--session", "s1"], &s);
    fs::write(s.join("out.txt"), b"the first session's").unwrap();
    let first = url(&d, &["--session", "s1", "out.txt"]).unwrap();
    assert!(first.contains("&session="), "{first}");
    assert_eq!(curl(&[], &first).2, b"the first session's");
    let (code, _, err) = d.cli(&["session", "end", "s1"]);
    assert_eq!(code, 0, "{err}");
    let (status, _, body) = curl(&[], &first);
    assert_eq!(status, 410, "{}", String::from_utf8_lossy(&body));
    // The id is taken again, and the new session has a file of the same name.
    d.json(&["session", "create", "s1", "--json"]);
    d.mount(&["--session", "s1"], &s);
    fs::write(s.join("out.txt"), b"the second session's").unwrap();
    let (status, _, body) = curl(&[], &first);
    assert_eq!(status, 410, "{}", String::from_utf8_lossy(&body));
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("session s1") && body.contains("has ended"),
        "{body}"
    );
    let (status, _, body) = curl(&["-I"], &first);
    assert_eq!(status, 410, "{}", String::from_utf8_lossy(&body));
    let second = url(&d, &["--session", "s1", "out.txt"]).unwrap();
    assert_eq!(curl(&[], &second).2, b"the second session's");
}

fn issue(keys: &Path, args: &[&str]) -> String {
    common::issue_token(&keys.join("secret"), args)
}

/// The daemon's resident memory, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_100_mib_download_streams_with_flat_daemon_memory() {
    let (d, _keys) = daemon();
    let a = d.dir("a");
    d.mount(&["--room", "r1"], &a);
    // 100 MiB of varied bytes, written through the mount.
    python(
        &a,
        "import os, hashlib\n\
         block = hashlib.sha256(b'roomfs').digest() * 32768\n\
         with open(os.environ['MNT'] + '/big.bin', 'wb') as f:\n\
         \x20   for i in range(100):\n\
         \x20       f.write(bytes([i]) + block[1:])\n",
    );
    let u = url(&d, &["--room", "r1", "big.bin"]).unwrap();
    let pid = d.child.as_ref().unwrap().id();
    let before = rss_kib(pid);
    // A slow reader: the daemon must not read ahead into memory.
    let code = format!(
        "import hashlib, os, sys, time, urllib.request\n\
         peak = 0\n\
         h = hashlib.sha256()\n\
         with urllib.request.urlopen({u:?}) as r:\n\
         \x20   assert r.status == 200 and r.headers['Content-Length'] == str(100 << 20)\n\
         \x20   n = 0\n\
         \x20   while True:\n\
         \x20       b = r.read(1 << 20)\n\
         \x20       if not b: break\n\
         \x20       h.update(b); n += len(b)\n\
         \x20       if n % (10 << 20) == 0:\n\
         \x20           time.sleep(0.05)\n\
         \x20           rss = int([l for l in open('/proc/{pid}/status') if l.startswith('VmRSS')][0].split()[1])\n\
         \x20           peak = max(peak, rss)\n\
         print(n, h.hexdigest(), peak)\n"
    );
    let out = python(&a, &code);
    let mut parts = out.split_whitespace();
    let n: u64 = parts.next().unwrap().parse().unwrap();
    let digest = parts.next().unwrap().to_string();
    let peak: u64 = parts.next().unwrap().parse().unwrap();
    assert_eq!(n, 100 << 20);
    let expected = python(
        &a,
        "import os, hashlib\n\
         print(hashlib.sha256(open(os.environ['MNT'] + '/big.bin', 'rb').read()).hexdigest())\n",
    );
    assert_eq!(digest, expected.trim());
    let after = rss_kib(pid);
    let grown = peak.max(after).saturating_sub(before);
    eprintln!("daemon RSS: {before} KiB before, peak {peak} KiB, {after} KiB after");
    assert!(
        grown < 32 << 10,
        "the daemon grew by {grown} KiB serving 100 MiB"
    );
}
