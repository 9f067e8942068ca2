//! A `roomfs serve` run as a child process for tests, stopped and cleaned up on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{BIN, cstr, is_mounted};

/// A `roomfs serve` in a temporary directory; dropping it stops it and unmounts what it left.
pub struct Daemon {
    pub tmp: tempfile::TempDir,
    pub socket: PathBuf,
    pub data: PathBuf,
    pub config: Option<PathBuf>,
    pub child: Option<Child>,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::with_config(None)
    }

    /// Starts a daemon; `config` is the JSON config (its `mounts` paths may use `{tmp}`).
    pub fn with_config(config: Option<&str>) -> Daemon {
        Daemon::with_setup(config, |_| {})
    }

    /// Starts a daemon after `setup` prepared its temporary directory (given as argument: the
    /// data dir will be `data` in it).
    pub fn with_setup(config: Option<&str>, setup: impl FnOnce(&Path)) -> Daemon {
        let tmp = tempfile::Builder::new()
            .prefix("roomfs-daemon-")
            .tempdir_in("/tmp")
            .unwrap();
        let config = config.map(|text| {
            let p = tmp.path().join("config.json");
            fs::write(&p, text.replace("{tmp}", tmp.path().to_str().unwrap())).unwrap();
            p
        });
        setup(tmp.path());
        let mut d = Daemon {
            socket: tmp.path().join("control.sock"),
            data: tmp.path().join("data"),
            tmp,
            config,
            child: None,
            log: Default::default(),
        };
        d.run();
        d
    }

    pub fn run(&mut self) {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--data-dir")
            .arg(&self.data);
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        self.child = Some(super::start_logged(
            &mut cmd,
            "serving the control API",
            &self.log,
        ));
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// A fresh directory to mount on.
    pub fn dir(&self, name: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }

    /// Runs `roomfs ARGS --socket SOCKET`; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs a CLI command that must succeed and prints JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let (code, out, err) = self.cli(args);
        assert_eq!(code, 0, "roomfs {args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed {out:?}: {e}"))
    }

    /// One storage call through `roomfs records call`.
    pub fn call(&self, envelope: Value) -> Value {
        self.json(&["records", "call", &envelope.to_string()])
    }

    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }

    pub fn mount(&self, args: &[&str], mnt: &Path) {
        let mut all = vec!["mount", "--daemon"];
        all.extend_from_slice(args);
        all.push(mnt.to_str().unwrap());
        let (code, _, err) = self.cli(&all);
        assert_eq!(code, 0, "mount {args:?}: {err}");
        assert!(is_mounted(&mnt.canonicalize().unwrap()));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let tmp = self.tmp.path().to_string_lossy().into_owned();
        for line in info.lines() {
            if let Some(mp) = line.split(' ').nth(4).filter(|m| m.starts_with(&tmp)) {
                let c = cstr(Path::new(mp));
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}
