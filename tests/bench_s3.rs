//! `scripts/bench --store s3` as a program: it runs end to end with tiny sizes, measures roomfs
//! on its own SeaweedFS, reports a peer that fails to mount as ABSENT (not by dying, not by
//! dropping it), and leaves nothing behind: no mount, no process, no scratch directory, no
//! socket of its SeaweedFS in /tmp, also when it is interrupted. So does its concurrent agents
//! run (`--agents`) through its delaying proxy (`--s3-latency-ms`), which it stops too.
//! Nothing here looks at a speed.
//! The peers are not needed: a peer that fails is played by /bin/false.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::BIN;

fn bench(workdir: &Path, targets: &str) -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .args(["--store", "s3", "--quick", "--rounds", "1"])
        .args(["--seq-mib", "4", "--files", "20", "--appends", "10"])
        .args(["--pwrites", "10", "--pwrite-mib", "4"])
        .args(["--s3-targets", targets, "--roomfs-bin", BIN])
        .arg("--workdir")
        .arg(workdir)
        .arg("--json")
        .arg(workdir.join("out.json"))
        // a peer that fails to mount: its mount command exits with status 1
        .env("ROOMFS_BENCH_S3FS", "/bin/false")
        .stdin(Stdio::null());
    cmd
}

/// Everything the run started is gone: mounts and processes under `workdir`, its scratch
/// directory, and the gRPC sockets its SeaweedFS put in /tmp (`(service, gRPC port)` pairs).
/// Only each service's own socket is checked: another SeaweedFS running beside (a concurrent
/// test's) puts its admin socket under admin port + 10000, a number the kernel may also have
/// given one of ours for another service.
fn assert_left_nothing(workdir: &Path, grpc: &[(String, u16)]) {
    let w = workdir.to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = mounts.lines().filter(|l| l.contains(&w)).collect();
    assert!(left.is_empty(), "mounts left behind: {left:#?}");
    let mut procs = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(&w)
        {
            procs.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
        }
    }
    assert!(procs.is_empty(), "processes left behind: {procs:#?}");
    let scratch: Vec<_> = std::fs::read_dir(workdir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("roomfs-bench"))
        .collect();
    assert!(scratch.is_empty(), "scratch dirs left behind: {scratch:?}");
    assert_eq!(grpc.len(), 5, "{grpc:?}");
    for (svc, port) in grpc {
        let sock = format!("/tmp/seaweedfs-{svc}-grpc-{port}.sock");
        assert!(!Path::new(&sock).exists(), "{sock} left behind");
    }
}

/// `(service, gRPC port)` of the run's SeaweedFS, from the JSON report.
fn seaweed_grpc_ports(json: &serde_json::Value) -> Vec<(String, u16)> {
    let ports = json["seaweedfs"]["ports"]
        .as_object()
        .expect("ports in the report");
    assert!(ports.len() >= 10, "{ports:?}");
    ports
        .iter()
        .filter_map(|(k, p)| Some((k.strip_suffix("_grpc")?.to_owned(), p.as_u64()? as u16)))
        .collect()
}

#[test]
fn a_quick_s3_run_measures_roomfs_reports_a_failing_peer_absent_and_cleans_up() {
    let tmp = tempfile::Builder::new()
        .prefix("roomfs-bench-test-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let out = bench(tmp.path(), "roomfs,s3fs").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ctx = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    // ABSENT makes the run fail, loudly, but it is still a whole run
    assert_eq!(out.status.code(), Some(1), "{ctx}");
    assert!(stderr.contains("[s3fs] ABSENT: "), "{ctx}");
    assert!(
        stdout.contains("# ABSENT s3fs: s3fs: mount command exited with status 1"),
        "{ctx}"
    );
    // the first table: every workload has a ratio for roomfs and ABSENT for s3fs
    assert!(
        stdout.contains("| workload | native | roomfs | s3fs |"),
        "{ctx}"
    );
    let rows: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("| workload | native | roomfs | s3fs |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert_eq!(rows.len(), 10, "{ctx}"); // the eight, python3 -m venv and tar -x
    for row in &rows {
        let cells: Vec<&str> = row.split(" | ").collect();
        assert!(
            cells[2].starts_with("**"),
            "no roomfs ratio in {row}\n{ctx}"
        );
        assert!(!row.contains("FAIL"), "{row}\n{ctx}");
        assert!(cells[3].starts_with("ABSENT"), "{row}\n{ctx}");
    }
    // the raw client was not asked for: no raw columns; the cold read ran on roomfs
    assert!(stdout.contains("| sequential | roomfs | s3fs |"), "{ctx}");
    assert!(!stdout.contains("FAIL"), "{ctx}");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("out.json")).unwrap()).unwrap();
    assert_eq!(json["targets"], serde_json::json!(["roomfs"]), "{json}");
    assert!(json["absent"]["s3fs"].is_string(), "{json}");
    assert_eq!(json["failures"], serde_json::json!([]), "{json}");
    let ratio = &json["workloads"]["seq-write"]["roomfs"]["ratio"];
    assert!(ratio.as_f64().is_some_and(|r| r > 0.0), "{json}");
    assert_left_nothing(tmp.path(), &seaweed_grpc_ports(&json));
}

#[test]
fn an_interrupted_s3_run_stops_its_seaweedfs_and_unmounts() {
    let tmp = tempfile::Builder::new()
        .prefix("roomfs-bench-test-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut child = bench(tmp.path(), "roomfs")
        .args(["--rounds", "50"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // interrupt it once it measures: SeaweedFS runs and roomfs is mounted by then
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !log.contains("round 1/50") {
        assert!(Instant::now() < deadline, "no round started:\n{log}");
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            panic!("the bench ended before its first round:\n{log}");
        }
        log.push_str(&line);
    }
    let w = tmp.path().to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(mounts.contains(&w), "roomfs is not mounted:\n{log}");
    // SAFETY: kill(2) on our own child's pid, which has not been waited for.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    log.push_str(&rest);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("interrupted by SIGINT; cleaning up"), "{log}");
    assert!(log.contains("[seaweedfs] stopped pid"), "{log}");
    // no JSON report after an interrupt: the gRPC ports are in the log ("gRPC ports master=N ...")
    let grpc = log
        .split("gRPC ports ")
        .nth(1)
        .expect("gRPC ports in the log");
    let ports: Vec<(String, u16)> = grpc
        .split([' ', ')'])
        .take_while(|w| w.contains('='))
        .map(|w| {
            let (svc, port) = w.split_once('=').unwrap();
            (svc.to_owned(), port.parse().unwrap())
        })
        .collect();
    assert_eq!(ports.len(), 5, "{log}");
    assert_left_nothing(tmp.path(), &ports);
}

#[test]
fn an_s3_agents_run_through_the_delaying_proxy_measures_roomfs_and_cleans_up() {
    let tmp = tempfile::Builder::new()
        .prefix("roomfs-bench-test-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench.py");
    let out = Command::new("python3")
        .arg(script)
        .args(["--store", "s3", "--agents", "1,2", "--agent-files", "5"])
        .args(["--rounds", "1", "--s3-latency-ms", "5"])
        .args(["--s3-targets", "roomfs,s3fs", "--roomfs-bin", BIN])
        .arg("--workdir")
        .arg(tmp.path())
        .arg("--json")
        .arg(tmp.path().join("out.json"))
        .env("ROOMFS_BENCH_S3FS", "/bin/false")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ctx = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(1), "s3fs is ABSENT: {ctx}");
    assert!(stdout.contains("# ABSENT s3fs: "), "{ctx}");
    assert!(stdout.contains("5 ms added to every request"), "{ctx}");
    let header = "| agents | roomfs files/s | roomfs × vs 1 agent | roomfs daemon µs/file |";
    let rows: Vec<&str> = stdout
        .lines()
        .skip_while(|l| *l != header)
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert_eq!(rows.len(), 2, "{ctx}");
    assert!(
        rows[0].starts_with("| 1 | ") && rows[1].starts_with("| 2 | "),
        "{ctx}"
    );
    assert!(!stdout.contains("FAIL"), "{ctx}");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("out.json")).unwrap()).unwrap();
    assert_eq!(json["failures"], serde_json::json!([]), "{json}");
    for n in ["1", "2"] {
        let rate = &json["results"]["roomfs"][n][0]["ops_s"];
        assert!(rate.as_f64().is_some_and(|r| r > 0.0), "{json}");
    }
    let proxy = json["proxy"]["pid"].as_u64().expect("the proxy's pid");
    assert!(
        !Path::new(&format!("/proc/{proxy}")).exists(),
        "the latency proxy (pid {proxy}) is still running"
    );
    assert_left_nothing(tmp.path(), &seaweed_grpc_ports(&json));
}
