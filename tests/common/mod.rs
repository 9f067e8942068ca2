//! Test support: a real roomfs mount run as a child process, always unmounted on drop.
#![allow(dead_code)]

pub mod daemon;
pub mod s3;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_roomfs");

/// A mounted space in a temporary directory. Dropping it unmounts, stops the daemon it started
/// (by pid) and removes the temporary directory.
pub struct Mounted {
    pub tmp: tempfile::TempDir,
    pub mnt: PathBuf,
    pub data: PathBuf,
    pub child: Option<Child>,
    pub args: Vec<String>,
    log: Arc<Mutex<Vec<String>>>,
}

pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = path.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

impl Mounted {
    /// Mounts room `r1` with default options.
    pub fn room() -> Mounted {
        Mounted::with_args(&["--room", "r1"])
    }

    /// Mounts with extra `roomfs mount` arguments (the data dir and mount point are added).
    pub fn with_args(args: &[&str]) -> Mounted {
        Mounted::with_setup(args, |_| {})
    }

    /// Like [`Mounted::with_args`], with the data dir on a tmpfs of `bytes`: a small disk to
    /// fill. It is unmounted on drop, after the daemon.
    pub fn on_small_disk(args: &[&str], bytes: u64) -> Mounted {
        Mounted::with_setup(args, |data| {
            let (dir, options) = (cstr(data), CString::new(format!("size={bytes}")).unwrap());
            // SAFETY: NUL-terminated strings that outlive the call.
            let r = unsafe {
                libc::mount(
                    c"roomfs-test".as_ptr(),
                    dir.as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    options.as_ptr().cast(),
                )
            };
            assert_eq!(r, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
        })
    }

    /// Like [`Mounted::with_args`], after `setup` has filled the data dir (given its path).
    pub fn with_setup(args: &[&str], setup: impl FnOnce(&Path)) -> Mounted {
        let tmp = tempfile::Builder::new()
            .prefix("roomfs-test-")
            .tempdir_in("/tmp")
            .unwrap();
        let mnt = tmp.path().join("mnt");
        let data = tmp.path().join("data");
        std::fs::create_dir(&mnt).unwrap();
        let mut m = Mounted {
            tmp,
            mnt,
            data,
            child: None,
            args: args.iter().map(|s| s.to_string()).collect(),
            log: Default::default(),
        };
        std::fs::create_dir_all(&m.data).unwrap();
        setup(&m.data);
        m.start();
        m
    }

    /// Starts (again) the daemon for this mount point and waits until it reports the mount.
    pub fn start(&mut self) {
        let mut cmd = Command::new(BIN);
        cmd.arg("mount")
            .arg("--data-dir")
            .arg(&self.data)
            .args(&self.args)
            .arg(&self.mnt);
        // The mount is up once the daemon says so (a dead mount left by a crash would still be
        // listed in mountinfo).
        self.child = Some(start_logged(&mut cmd, " mounted ", &self.log));
        assert!(is_mounted(&self.mnt));
    }

    /// What the daemon(s) of this mount logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// The committed file in the data dir behind `rel` (room r1 unless the args say otherwise).
    pub fn backing(&self, rel: &str) -> PathBuf {
        let (kind, id) = match self.args.iter().position(|a| a == "--session") {
            Some(i) => ("sessions", self.args[i + 1].clone()),
            None => {
                let i = self.args.iter().position(|a| a == "--room").unwrap();
                ("rooms", self.args[i + 1].clone())
            }
        };
        self.data.join(kind).join(id).join(rel)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Kills the daemon with SIGKILL (a crash) and waits for it; the dead mount stays behind.
    pub fn crash(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends `sig` to the daemon and waits for it to exit, returning its exit status and stderr.
    pub fn signal_and_wait(&mut self, sig: i32) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        (status, self.log())
    }

    /// Unmounts with `roomfs unmount`, waits for the daemon; returns its exit status.
    pub fn unmount(&mut self) -> std::process::ExitStatus {
        let out = output(Command::new(BIN).arg("unmount").arg(&self.mnt));
        assert!(
            out.status.success(),
            "unmount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.child.take().unwrap().wait().unwrap()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let c = CString::new(self.mnt.as_os_str().as_bytes()).unwrap();
            unsafe {
                if libc::umount2(c.as_ptr(), 0) != 0 {
                    libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.data) {
            // A small disk (`on_small_disk`).
            unsafe { libc::umount2(cstr(&self.data).as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Runs `cmd` to its end and returns its output.
pub fn output(cmd: &mut Command) -> std::process::Output {
    cmd.output().expect("the command runs")
}

/// Starts `cmd` with its stderr collected into `log`, and waits until a line contains `ready`;
/// panics with the log if the process exits first or takes over 20 s.
pub fn start_logged(
    cmd: &mut Command,
    ready: &'static str,
    log: &Arc<Mutex<Vec<String>>>,
) -> Child {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start roomfs");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = log.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains(ready) {
                let _ = tx.send(());
            }
            sink.lock().unwrap().push(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = |log: &Arc<Mutex<Vec<String>>>| log.lock().unwrap().join("\n");
    while rx.recv_timeout(Duration::from_millis(20)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(50));
            panic!(
                "roomfs exited ({status}) before it was ready: {}",
                text(log)
            );
        }
        assert!(
            Instant::now() < deadline,
            "roomfs was not ready in time: {}",
            text(log)
        );
    }
    child
}

/// The errno of a failed `std::io` call.
/// Writes a 2 MiB file at `path` (in a mount), reads its first bytes through a descriptor
/// opened read-only, changes them in `backing` (its committed file in the data dir) behind the
/// daemon's back, and reads them again: returns what the second read saw. The kernel's page
/// cache answers the old bytes; a passthrough read goes to the committed file itself.
pub fn second_read_after_a_change_on_disk(path: &Path, backing: &Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    std::fs::write(path, vec![b'a'; 2 << 20]).unwrap();
    let f = std::fs::File::open(path).unwrap();
    let mut first = [0u8; 4];
    f.read_exact_at(&mut first, 0).unwrap();
    assert_eq!(&first, b"aaaa");
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(backing)
        .unwrap();
    disk.write_all_at(b"DISK", 0).unwrap();
    let mut second = [0u8; 4];
    f.read_exact_at(&mut second, 0).unwrap();
    second.to_vec()
}

pub fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("expected the call to fail")
        .raw_os_error()
        .expect("an OS error")
}

/// Runs a Python 3 snippet with `MNT` in its environment; panics with its output on failure.
pub fn python(mnt: &Path, code: &str) -> String {
    let out = output(Command::new("python3").arg("-c").arg(code).env("MNT", mnt));
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}
