//! Agent SDK storage layers on a mount, driven by Node with the npm packages users run
//! (installed by scripts/setup from tests/node/package-lock.json).

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::daemon::Daemon;
use serde_json::Value;

const NODE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node");

/// flydrive's local-disk driver, as @nhtio/adk's FlydriveSpoolStore uses it, on a session
/// mount granted `spool/:rw` and `inputs/:ro`, with the session's limits: see
/// tests/node/flydrive_spool.mjs for what it checks, memory included.
#[test]
fn flydrive_spools_onto_a_granted_session_mount_within_its_limits() {
    assert!(
        Path::new(NODE_DIR)
            .join("node_modules/flydrive/package.json")
            .exists(),
        "flydrive is not installed in {NODE_DIR}/node_modules: run scripts/setup"
    );
    let d = Daemon::start();
    d.json(&[
        "session",
        "create",
        "adk",
        "--max-file-size",
        "100Mi",
        "--max-bytes",
        "150Mi",
        "--json",
    ]);
    // The operator's mount (no grant) puts the inputs and something private in place.
    let full = d.dir("full");
    d.mount(&["--session", "adk"], &full);
    fs::create_dir(full.join("inputs")).unwrap();
    fs::write(full.join("inputs/brief.txt"), "summarise this\n").unwrap();
    fs::create_dir(full.join("private")).unwrap();
    fs::write(full.join("private/secret.txt"), "not for agents\n").unwrap();

    let agent = d.dir("agent");
    d.mount(
        &[
            "--session",
            "adk",
            "--grant",
            "spool/:rw",
            "--grant",
            "inputs/:ro",
        ],
        &agent,
    );
    let daemon_pid = d.child.as_ref().unwrap().id();
    let out = Command::new("node")
        .arg("--expose-gc")
        .arg(Path::new(NODE_DIR).join("flydrive_spool.mjs"))
        .arg(&agent)
        .arg(daemon_pid.to_string())
        .output()
        .expect("node is installed by scripts/setup");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.ends_with("flydrive spool: ok\n"),
        "{stdout}{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    let figures: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    eprintln!("growth while streaming 100 MiB (MiB): {figures}");

    // What the agent's mount did is what the operator's mount sees: one spooled file left,
    // nothing written outside the grant, the usage back to what is there.
    let names = |dir: &Path| {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&full), ["inputs", "private", "spool"]);
    assert_eq!(names(&full.join("spool")), ["call-1.txt"]);
    assert_eq!(names(&full.join("inputs")), ["brief.txt"]);
    assert_eq!(names(&full.join("private")), ["secret.txt"]);
    assert_eq!(
        fs::read_to_string(full.join("spool/call-1.txt")).unwrap(),
        "line one\nline two\n"
    );
    let info = d.json(&["session", "show", "adk", "--json"]);
    assert_eq!(info["bytes"], 18 + 15 + 15, "{info}");
    let log = d.log();
    assert!(
        log.contains(r#"denied lookup "private": outside the grant"#)
            && log.contains(r#"denied create "inputs/new.txt": path is read-only"#),
        "the refusals are logged: {log}"
    );
}
