//! Test support: an S3 endpoint of the test's own, SeaweedFS's `weed mini` (installed by
//! `scripts/setup`), bound to 127.0.0.1 on free ports, with its data in a temporary directory.
//!
//! - Requests must be signed: the process starts with `AWS_ACCESS_KEY_ID` and
//!   `AWS_SECRET_ACCESS_KEY` in its environment, which `weed mini` makes its one (admin)
//!   identity. Without an identity it would take any request, signed or not, with any key.
//! - [`SeaweedFs::start`] returns once the bucket exists and stored data reads back: a canary
//!   file written through the filer at the first start (outside the buckets, so S3 listings never
//!   show it) is read again after every start. After a restart the S3 port can answer before
//!   stored data is served (the master learns the volumes from the volume server's heartbeat;
//!   until then a GET of a stored object is a 500: seen for over 4 s on a loaded machine), so "the
//!   port is open" is not ready.
//! - [`SeaweedFs::stop`] kills the process as a crash would (SIGKILL, in the middle of whatever
//!   upload is under way); [`SeaweedFs::restart`] starts it again on the same ports and data.
//!   [`SeaweedFs::pause`] freezes it (SIGSTOP): connections are accepted by the kernel but
//!   nothing answers, as with a store that hangs; [`SeaweedFs::resume`] thaws it.
//! - Dropping it kills the process (by pid) and removes its data, also when the test panics.
//!   The gRPC sockets `weed` puts in /tmp under its port numbers are removed too.
//!
//! [`SeaweedFs::boto3`] runs a Python snippet with a boto3 client `s3` on this endpoint (boto3
//! comes with `weed` in the test tools' virtualenv): an S3 client independent of roomfs, to put
//! objects behind roomfs's back and check what it stored.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "roomfs-test-access-key";
pub const SECRET_KEY: &str = "roomfs-test-secret-key-5d41402abc4b2a76";
/// SeaweedFS accepts any region in signatures; this is what the clients sign with.
pub const REGION: &str = "us-east-1";
const BUCKET: &str = "roomfs-test";
/// Written through the filer outside `/buckets`, read back to know that stored data is served.
const CANARY_PATH: &str = "/roomfs-harness/canary";
/// How long a start may take before the test fails (a restart takes ~4 s on an idle machine).
const START_TIMEOUT: Duration = Duration::from_secs(60);
const LOG_LINES: usize = 2000;

/// The virtualenv where `scripts/setup` installs the Python-packaged test tools (`weed`, boto3,
/// and with `--bench-peers` `juicefs` and `rclone`): `$ROOMFS_TEST_CACHE/venv`, by default
/// `~/.cache/roomfs-test/venv` (the same rule as in `scripts/setup`).
pub fn tools_venv() -> PathBuf {
    let env = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let cache = env("ROOMFS_TEST_CACHE").unwrap_or_else(|| {
        env("XDG_CACHE_HOME")
            .unwrap_or_else(|| env("HOME").expect("HOME is set").join(".cache"))
            .join("roomfs-test")
    });
    cache.join("venv")
}

/// The `weed` binary: `$ROOMFS_WEED`, or the one `scripts/setup` installed.
pub fn weed_bin() -> PathBuf {
    std::env::var_os("ROOMFS_WEED")
        .map(PathBuf::from)
        .unwrap_or_else(|| tools_venv().join("bin/weed"))
}

/// The ports of one `weed mini`: every listener it opens, chosen by us, so none is a default
/// that another instance (or anything else on the machine) could hold.
#[derive(Clone, Copy, Debug)]
struct Ports {
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    s3: u16,
    s3_grpc: u16,
    /// S3 over TLS, for an instance started with [`SeaweedFs::start_https`].
    s3_https: u16,
    admin: u16,
    /// Must be `admin + 10000`: the maintenance worker inside `weed mini` dials the admin
    /// server there whatever `-admin.port.grpc` says (4.48), and retries forever otherwise.
    admin_grpc: u16,
}

impl Ports {
    /// Free ports from the kernel, all held open together so that they differ, and released
    /// just before `weed` binds them (a race with other processes that a retry covers).
    fn pick() -> Ports {
        let mut held = Vec::new();
        let [
            master,
            master_grpc,
            volume,
            volume_grpc,
            filer,
            filer_grpc,
            s3,
            s3_grpc,
            s3_https,
        ] = std::array::from_fn(|_| hold_free_port(&mut held));
        let (admin, admin_grpc) = loop {
            let port = hold_free_port(&mut held);
            if let Some(grpc) = port.checked_add(10000)
                && let Ok(l) = TcpListener::bind(("127.0.0.1", grpc))
            {
                held.push(l);
                break (port, grpc);
            }
        };
        Ports {
            master,
            master_grpc,
            volume,
            volume_grpc,
            filer,
            filer_grpc,
            s3,
            s3_grpc,
            s3_https,
            admin,
            admin_grpc,
        }
    }

    fn grpc(&self) -> [(&'static str, u16); 5] {
        [
            ("master", self.master_grpc),
            ("volume", self.volume_grpc),
            ("filer", self.filer_grpc),
            ("s3", self.s3_grpc),
            ("admin", self.admin_grpc),
        ]
    }
}

/// Makes in `dir` a CA (`ca.pem`) and, signed by it, a server certificate for 127.0.0.1
/// (`cert.pem`, `key.pem`), with `openssl`.
fn make_certificates(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: [&[&str]; 3] = [
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
            &["-subj", "/CN=roomfs test CA"],
        ]
        .concat(),
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "key.pem",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl (scripts/setup installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A free loopback port, kept bound (in `held`) until the caller drops `held`.
fn hold_free_port(held: &mut Vec<TcpListener>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    let port = l.local_addr().unwrap().port();
    held.push(l);
    port
}

/// A running (or stopped) `weed mini` with one bucket. See the module doc.
pub struct SeaweedFs {
    tmp: tempfile::TempDir,
    ports: Ports,
    child: Option<Child>,
    log: Arc<Mutex<VecDeque<String>>>,
    /// Killed with the test process (`PR_SET_PDEATHSIG`), for the shared instance.
    tied: bool,
    /// S3 is (also) served over TLS, with a certificate of a CA of the test's own.
    https: bool,
}

/// The instance the whole test binary shares (see [`SeaweedFs::shared`]).
static SHARED: std::sync::OnceLock<SeaweedFs> = std::sync::OnceLock::new();

/// Runs at the test binary's exit: stops the shared instance and removes its data.
extern "C" fn stop_shared() {
    if let Some(s) = SHARED.get() {
        if let Some(child) = &s.child {
            let _ = kill(child, libc::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(s.tmp.path());
        for (name, port) in s.ports.grpc() {
            let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{name}-grpc-{port}.sock"));
        }
    }
}

impl SeaweedFs {
    /// One instance for the whole test binary, started at the first call: tests that only
    /// need a bucket share it (each under a prefix of its own, see [`unique_prefix`]) instead
    /// of paying for a start each. It is killed when the test process exits (also if it is
    /// killed: `PR_SET_PDEATHSIG`, set from a thread that lives as long as the process) and its
    /// data removed at a normal exit.
    pub fn shared() -> &'static SeaweedFs {
        SHARED.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("seaweedfs-shared".into())
                .spawn(move || {
                    let started = std::panic::catch_unwind(|| SeaweedFs::start_inner(true, false));
                    let _ = tx.send(started);
                    // The death signal is tied to this thread: it must never end.
                    loop {
                        std::thread::park();
                    }
                })
                .unwrap();
            match rx.recv().unwrap() {
                Ok(s) => {
                    // SAFETY: registering a plain extern "C" function without arguments.
                    unsafe { libc::atexit(stop_shared) };
                    s
                }
                Err(e) => std::panic::resume_unwind(e),
            }
        })
    }

    /// Starts a fresh instance and waits until its bucket is there and stored data reads back.
    pub fn start() -> SeaweedFs {
        SeaweedFs::start_inner(false, false)
    }

    /// [`SeaweedFs::start`], with S3 at an `https` endpoint whose certificate (for 127.0.0.1)
    /// a CA made for this instance signed: no system trusts it. [`SeaweedFs::env`] names that
    /// CA's certificate in `AWS_CA_BUNDLE` (which boto3 and roomfs read); `openssl` makes them.
    pub fn start_https() -> SeaweedFs {
        SeaweedFs::start_inner(false, true)
    }

    fn start_inner(tied: bool, https: bool) -> SeaweedFs {
        let weed = weed_bin();
        assert!(
            weed.exists(),
            "{} is missing: run scripts/setup (or set ROOMFS_WEED)",
            weed.display()
        );
        let tmp = tempfile::Builder::new()
            .prefix("roomfs-s3-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::create_dir(tmp.path().join("data")).unwrap();
        let mut s = SeaweedFs {
            tmp,
            ports: Ports::pick(),
            child: None,
            log: Default::default(),
            tied,
            https,
        };
        if https {
            make_certificates(&s.tls_dir());
        }
        // Another process may take one of the ports between `Ports::pick` and `weed`'s bind;
        // `weed` then exits at once ("not available" from its own check, or the bind's
        // "address already in use" from a later component's listener), and new ports are tried.
        for attempt in 1.. {
            s.spawn();
            match s.wait_ready(true) {
                Ok(()) => return s,
                Err(status)
                    if attempt < 3
                        && ["not available", "address already in use"]
                            .iter()
                            .any(|taken| s.log().contains(taken)) =>
                {
                    eprintln!("weed mini exited ({status}), a port was taken: new ports");
                    s.child = None;
                    s.ports = Ports::pick();
                }
                Err(status) => panic!("weed mini exited ({status}) while starting:\n{}", s.log()),
            }
        }
        unreachable!()
    }

    /// `http://127.0.0.1:<port>` (`https://` for [`SeaweedFs::start_https`]), the S3
    /// endpoint (path-style requests).
    pub fn endpoint(&self) -> String {
        if self.https {
            format!("https://127.0.0.1:{}", self.ports.s3_https)
        } else {
            format!("http://127.0.0.1:{}", self.ports.s3)
        }
    }

    /// The CA certificate an `https` instance's certificate is signed by.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.https.then(|| self.tls_dir().join("ca.pem"))
    }

    /// Where the TLS files of [`SeaweedFs::start_https`] are: `ca.pem` (the CA's certificate),
    /// `cert.pem` and `key.pem` (the endpoint's).
    pub fn tls_dir(&self) -> PathBuf {
        self.tmp.path().join("tls")
    }

    pub fn bucket(&self) -> &str {
        BUCKET
    }

    pub fn access_key(&self) -> &str {
        ACCESS_KEY
    }

    pub fn secret_key(&self) -> &str {
        SECRET_KEY
    }

    /// The environment by which AWS tools (roomfs, boto3, the AWS CLI) find this endpoint and
    /// its credentials, and nothing of the user's own AWS configuration.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", REGION.into()),
            ("AWS_DEFAULT_REGION", REGION.into()),
            ("AWS_CONFIG_FILE", "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ];
        if let Some(ca) = self.ca_file() {
            env.push(("AWS_CA_BUNDLE", ca.display().to_string()));
        }
        env
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The data directory (`weed mini -dir`).
    pub fn data_dir(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    /// What `weed` printed so far (its last lines), across restarts.
    pub fn log(&self) -> String {
        let log = self.log.lock().unwrap();
        log.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Kills the process with SIGKILL, as a crash would, and waits for it. The data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&child, libc::SIGKILL).expect("kill weed mini");
            child.wait().unwrap();
        }
    }

    /// Kills the process if it runs, starts it again on the same ports and data, and waits
    /// until the data reads back.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        if let Err(status) = self.wait_ready(false) {
            panic!(
                "weed mini exited ({status}) while restarting:\n{}",
                self.log()
            );
        }
    }

    /// Freezes the process (SIGSTOP): requests get connected and then no answer.
    pub fn pause(&mut self) {
        let child = self.child.as_ref().expect("weed mini is running");
        kill(child, libc::SIGSTOP).expect("stop weed mini");
    }

    /// Thaws a [`SeaweedFs::pause`]d process.
    pub fn resume(&mut self) {
        let child = self.child.as_ref().expect("weed mini is running");
        kill(child, libc::SIGCONT).expect("continue weed mini");
    }

    /// Runs `code` with the venv's Python and a boto3 client `s3` on this endpoint (path-style,
    /// no retries (one attempt per call), checksums only where S3 requires them) and `BUCKET` in scope; panics with its
    /// output if it fails. Returns its stdout.
    pub fn boto3(&self, code: &str) -> String {
        let prelude = "import os, boto3, botocore\n\
             from botocore.config import Config\n\
             BUCKET = os.environ['S3_BUCKET']\n\
             s3 = boto3.client('s3', config=Config(s3={'addressing_style': 'path'},\n\
                 retries={'total_max_attempts': 1}, connect_timeout=5, read_timeout=30,\n\
                 request_checksum_calculation='when_required',\n\
                 response_checksum_validation='when_required'))\n";
        let out = Command::new(tools_venv().join("bin/python"))
            .arg("-c")
            .arg(format!("{prelude}{code}"))
            .envs(self.env())
            .env("S3_BUCKET", BUCKET)
            .output()
            .expect("run the test tools' python (scripts/setup installs it)");
        assert!(
            out.status.success(),
            "boto3 snippet failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn spawn(&mut self) {
        let p = self.ports;
        let dir = self.tmp.path();
        let mut cmd = Command::new(weed_bin());
        // Only what it needs from the environment: no WEED_* or S3_* settings of the user, and
        // HOME and the working directory (where it looks for its .toml files) are ours.
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir)
            .current_dir(dir)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            // Log to stderr (ours) only, not to files in /tmp.
            .arg("-logtostderr")
            .arg("mini")
            .arg(format!("-dir={}", self.data_dir().display()))
            .arg(format!("-bucket={BUCKET}"))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={}", p.master))
            .arg(format!("-master.port.grpc={}", p.master_grpc))
            .arg(format!("-volume.port={}", p.volume))
            .arg(format!("-volume.port.grpc={}", p.volume_grpc))
            .arg(format!("-filer.port={}", p.filer))
            .arg(format!("-filer.port.grpc={}", p.filer_grpc))
            .arg(format!("-s3.port={}", p.s3))
            .arg(format!("-s3.port.grpc={}", p.s3_grpc))
            .arg(format!("-admin.port={}", p.admin))
            .arg(format!("-admin.port.grpc={}", p.admin_grpc))
            .arg(format!(
                "-filer.localSocket={}",
                dir.join("filer.sock").display()
            ))
            .arg(format!("-s3.localSocket={}", dir.join("s3.sock").display()))
            // What the tests do not use listens nowhere; no statistics sent out.
            .args(["-webdav=false", "-admin.ui=false"])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg("-master.telemetry=false")
            .args(if self.https {
                let tls = self.tls_dir();
                vec![
                    format!("-s3.port.https={}", p.s3_https),
                    format!("-s3.cert.file={}", tls.join("cert.pem").display()),
                    format!("-s3.key.file={}", tls.join("key.pem").display()),
                ]
            } else {
                vec![]
            })
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if self.tied {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", weed_bin().display()));
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for stream in [out, err] {
            let log = self.log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut log = log.lock().unwrap();
                    if log.len() == LOG_LINES {
                        log.pop_front();
                    }
                    log.push_back(line);
                }
            });
        }
        self.child = Some(child);
    }

    /// Waits until S3 answers, the bucket exists and the canary reads back (written first when
    /// `first`). Err(exit status) if the process ended; panics after [`START_TIMEOUT`].
    fn wait_ready(&mut self, first: bool) -> Result<(), std::process::ExitStatus> {
        let canary = format!("roomfs canary {}", self.tmp.path().display());
        let filer = self.ports.filer;
        let deadline = Instant::now() + START_TIMEOUT;
        let mut wrote = !first;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50)); // the last log lines
                return Err(status);
            }
            let step = (|| -> Result<(), String> {
                http(self.ports.s3, "GET", "/", b"").map_err(|e| format!("S3: {e}"))?;
                let (status, _) = http(filer, "GET", &format!("/buckets/{BUCKET}/"), b"")
                    .map_err(|e| format!("filer: {e}"))?;
                if status != 200 {
                    return Err(format!("bucket {BUCKET}: HTTP {status}"));
                }
                if !wrote {
                    let (status, body) = http(filer, "PUT", CANARY_PATH, canary.as_bytes())
                        .map_err(|e| format!("canary PUT: {e}"))?;
                    if status != 201 {
                        return Err(format!("canary PUT: HTTP {status} {}", lossy(&body)));
                    }
                    wrote = true;
                }
                let (status, body) =
                    http(filer, "GET", CANARY_PATH, b"").map_err(|e| format!("canary: {e}"))?;
                if status != 200 || body != canary.as_bytes() {
                    return Err(format!("canary GET: HTTP {status} {}", lossy(&body)));
                }
                Ok(())
            })();
            let Err(last) = step else { return Ok(()) };
            assert!(
                Instant::now() < deadline,
                "weed mini not ready after {START_TIMEOUT:?} ({last}):\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(&child, libc::SIGKILL);
            let _ = child.wait();
        }
        // `weed` puts its gRPC sockets in /tmp under their port numbers and leaves them after a
        // kill; these are ours (the ports were ours), the rest goes with the temporary directory.
        for (name, port) in self.ports.grpc() {
            let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{name}-grpc-{port}.sock"));
        }
    }
}

/// Sends `sig` to our child by its pid, which is still its own: it has not been waited for.
fn kill(child: &Child, sig: libc::c_int) -> std::io::Result<()> {
    // SAFETY: kill(2) with a pid and a signal number; no memory is passed.
    if unsafe { libc::kill(child.id() as libc::pid_t, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A key prefix no other test of this run uses (`t<pid>-<n>`), so tests can share a bucket.
pub fn unique_prefix() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "t{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One HTTP/1.1 request to 127.0.0.1:`port` (unsigned, so only for the filer's own API and for
/// "does it answer"); returns the status and the body. Bounded by short timeouts.
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    let head_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = String::from_utf8_lossy(&resp[..head_end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let body = &resp[head_end + 4..];
    // Chunked bodies are not decoded (the filer sends small ones with a Content-Length).
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok((status, Vec::new()));
    }
    Ok((status, body.to_vec()))
}
