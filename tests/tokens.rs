//! Grant tokens: issued by `roomfs token issue` or by another tool, honoured by `mount --token`.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{BIN, Mounted, errno, is_mounted};

const SECRET: &str = "correct horse battery staple, and more of it";

fn secret_file(dir: &Path, secret: &str) -> String {
    let p = dir.join("secret");
    fs::write(&p, format!("{secret}\n")).unwrap();
    p.to_string_lossy().into_owned()
}

/// Signs fixture claims with HS256 the way any JWT library would, without roomfs.
fn sign_with_python(claims_file: &str, secret: &str, exp_override: Option<i64>) -> String {
    let code = r#"
import base64, hashlib, hmac, json, sys
claims = json.load(open(sys.argv[1]))
if sys.argv[3] != 'keep':
    claims['exp'] = int(sys.argv[3])
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b'=').decode()
head = b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())
body = b64(json.dumps(claims).encode())
sig = hmac.new(sys.argv[2].encode(), f'{head}.{body}'.encode(), hashlib.sha256).digest()
print(f'{head}.{body}.{b64(sig)}')
"#;
    let path = format!(
        "{}/tests/fixtures/grants/{claims_file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let exp = exp_override.map_or("keep".to_string(), |e| e.to_string());
    let out = Command::new("python3")
        .args(["-c", code, &path, secret, &exp])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn populate(data: &Path) {
    let root = data.join("rooms/r1");
    fs::create_dir_all(root.join("inputs")).unwrap();
    fs::create_dir_all(root.join("outputs")).unwrap();
    fs::write(root.join("inputs/data.csv"), b"a,b\n").unwrap();
    fs::write(root.join("private.txt"), b"p").unwrap();
}

#[test]
fn issued_token_mounts_its_room_with_its_grant() {
    let keys = tempfile::tempdir().unwrap();
    let sf = secret_file(keys.path(), SECRET);
    let token = common::issue_token(
        Path::new(&sf),
        &[
            "--room",
            "r1",
            "--path",
            "inputs/:ro",
            "--path",
            "outputs/:rw",
            "--ttl",
            "1h",
        ],
    );
    let m = Mounted::with_setup(&["--token", &token, "--secret-file", &sf], populate);
    assert_eq!(fs::read(m.p("inputs/data.csv")).unwrap(), b"a,b\n");
    fs::write(m.p("outputs/result"), b"r").unwrap();
    assert_eq!(
        fs::read(m.data.join("rooms/r1/outputs/result")).unwrap(),
        b"r"
    );
    assert_eq!(errno(fs::write(m.p("inputs/x"), b"x")), libc::EACCES);
    assert_eq!(errno(fs::read(m.p("private.txt"))), libc::EACCES);
    // `token verify` shows what the token carries.
    let out = Command::new(BIN)
        .args(["token", "verify", "--secret-file", &sf, &token])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("room: r1") && text.contains("inputs/:ro") && text.contains("outputs/:rw"),
        "{text}"
    );
}

#[test]
fn tokens_minted_by_other_tools_are_accepted() {
    let keys = tempfile::tempdir().unwrap();
    let sf = secret_file(keys.path(), SECRET);
    let token = sign_with_python("agent-inputs-ro-outputs-rw.json", SECRET, None);
    let m = Mounted::with_setup(
        &["--token", &token, "--secret-file", &sf, "--room", "r1"],
        populate,
    );
    assert_eq!(fs::read(m.p("inputs/data.csv")).unwrap(), b"a,b\n");
    assert_eq!(errno(fs::write(m.p("inputs/y"), b"y")), libc::EACCES);
    fs::write(m.p("outputs/y"), b"y").unwrap();
    drop(m);
    let full = sign_with_python("full-access.json", SECRET, None);
    let m = Mounted::with_setup(&["--token", &full, "--secret-file", &sf], populate);
    fs::write(m.p("anywhere"), b"ok").unwrap();
    assert_eq!(fs::read(m.p("private.txt")).unwrap(), b"p");
    drop(m);
    let none = sign_with_python("no-storage.json", SECRET, None);
    let m = Mounted::with_setup(&["--token", &none, "--secret-file", &sf], populate);
    assert_eq!(fs::read_dir(&m.mnt).unwrap().count(), 0);
    assert_eq!(errno(fs::read(m.p("private.txt"))), libc::EACCES);
}

#[test]
fn bad_tokens_are_refused_with_the_reason_and_nothing_is_mounted() {
    let keys = tempfile::tempdir().unwrap();
    let sf = secret_file(keys.path(), SECRET);
    let other = keys.path().join("other");
    fs::create_dir(&other).unwrap();
    let wrong_sf = secret_file(&other, "another secret, as long as the first one");
    let good = sign_with_python("agent-inputs-ro-outputs-rw.json", SECRET, None);
    let expired = sign_with_python(
        "agent-inputs-ro-outputs-rw.json",
        SECRET,
        Some(1_000_000_000),
    );
    let mut tampered = good.clone();
    tampered.insert(tampered.len() / 2, 'x');
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--token", &good, "--secret-file", &wrong_sf],
            "signature",
        ),
        (vec!["--token", &expired, "--secret-file", &sf], "expired"),
        (
            vec!["--token", "not-a-token", "--secret-file", &sf],
            "token refused",
        ),
        (
            vec!["--token", &tampered, "--secret-file", &sf],
            "token refused",
        ),
        (
            vec!["--token", &good, "--secret-file", &sf, "--room", "r2"],
            "for room \"r1\"",
        ),
        (vec!["--token", &good], "--secret-file"),
        (
            vec!["--token", &good, "--secret-file", "/nonexistent/secret"],
            "/nonexistent/secret",
        ),
    ];
    for (args, want) in cases {
        let mnt = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .args(["mount", "--data-dir"])
            .arg(mnt.path().join("data"))
            .args(&args)
            .arg(mnt.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
        assert!(!is_mounted(mnt.path()), "{args:?} mounted something");
    }
}

#[test]
fn token_issue_rejects_bad_input() {
    let keys = tempfile::tempdir().unwrap();
    let sf = secret_file(keys.path(), SECRET);
    let empty = keys.path().join("empty");
    fs::write(&empty, b"").unwrap();
    for (args, want) in [
        (
            vec![
                "--secret-file",
                sf.as_str(),
                "--room",
                "r1",
                "--path",
                "a:xx",
            ],
            "--path",
        ),
        (
            vec![
                "--secret-file",
                sf.as_str(),
                "--room",
                "r1",
                "--ttl",
                "soon",
            ],
            "--ttl",
        ),
        (
            vec!["--secret-file", sf.as_str(), "--room", "../r"],
            "invalid room id",
        ),
        (
            vec!["--secret-file", empty.to_str().unwrap(), "--room", "r1"],
            "empty",
        ),
    ] {
        let out = Command::new(BIN)
            .args(["token", "issue"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
    }
}
