//! A `roomfs serve` run as a child process for tests, stopped and cleaned up on drop. With
//! `ROOMFS_TEST_STORE=s3` its rooms and sessions are in the test binary's SeaweedFS bucket (the
//! configuration's `store` and `session_store`); tests look at what it stored through
//! [`Daemon::stored`] and its siblings, whichever the store.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{BIN, Bucket, cstr, is_mounted, store_is_s3};

/// A `roomfs serve` in a temporary directory; dropping it stops it and unmounts what it left.
pub struct Daemon {
    pub tmp: tempfile::TempDir,
    pub socket: PathBuf,
    pub data: PathBuf,
    pub config: Option<PathBuf>,
    pub child: Option<Child>,
    pub log: Arc<Mutex<Vec<String>>>,
    /// The bucket rooms and sessions are in, when the test run uses S3.
    pub s3: Option<Bucket>,
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
        Daemon::build(config, setup, store_is_s3().then(Bucket::shared))
    }

    /// Starts a daemon keeping its rooms and sessions in `s3` (unless `config` names other
    /// stores).
    pub fn on(config: Option<&str>, s3: Option<Bucket>) -> Daemon {
        Daemon::build(config, |_| {}, s3)
    }

    fn build(config: Option<&str>, setup: impl FnOnce(&Path), s3: Option<Bucket>) -> Daemon {
        let tmp = tempfile::Builder::new()
            .prefix("roomfs-daemon-")
            .tempdir_in("/tmp")
            .unwrap();
        // On S3 the stores go into the configuration (unless it names its own).
        let config = match (&s3, config) {
            (Some(b), config) => {
                let mut value: Value = serde_json::from_str(config.unwrap_or("{}"))
                    .unwrap_or_else(|_| Value::String(config.unwrap_or_default().into()));
                if let Some(map) = value.as_object_mut() {
                    for field in ["store", "session_store"] {
                        map.entry(field).or_insert(Value::String(b.url("")));
                    }
                }
                Some(match value {
                    Value::String(broken) => broken,
                    v => v.to_string(),
                })
            }
            (None, config) => config.map(str::to_string),
        };
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
            s3,
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
        if let Some(b) = &self.s3 {
            cmd.envs(b.env.iter().map(|(k, v)| (*k, v.as_str())));
        }
        self.child = Some(super::start_logged(
            &mut cmd,
            "serving the control API",
            &self.log,
        ));
    }

    /// What is stored at `rel` (`rooms/<id>/<path>`, `sessions/<id>/<path>`): in the data dir
    /// or the bucket.
    pub fn stored(&self, rel: &str) -> Option<Vec<u8>> {
        match &self.s3 {
            Some(b) => b.get(&format!("{}/{rel}", b.prefix)),
            None => fs::read(self.data.join(rel)).ok(),
        }
    }

    /// Whether anything is stored at or below `rel` (a space, a directory, a file).
    pub fn stored_exists(&self, rel: &str) -> bool {
        match &self.s3 {
            Some(b) => {
                let key = format!("{}/{rel}", b.prefix);
                b.head(&key).is_some() || !b.keys(&format!("{key}/")).is_empty()
            }
            None => self.data.join(rel).exists(),
        }
    }

    /// Stores `bytes` at `rel` behind the daemon's back (another tool).
    pub fn store_behind(&self, rel: &str, bytes: &[u8]) {
        match &self.s3 {
            Some(b) => b.put(&format!("{}/{rel}", b.prefix), bytes),
            None => fs::write(self.data.join(rel), bytes).unwrap(),
        }
    }

    /// Makes the directory `rel` behind the daemon's back.
    pub fn make_dir_behind(&self, rel: &str) {
        match &self.s3 {
            Some(b) => b.put(&format!("{}/{rel}/", b.prefix), b""),
            None => fs::create_dir_all(self.data.join(rel)).unwrap(),
        }
    }

    /// The file the kernel reads for a 2 MiB `big` of room `room` if the mount passes it
    /// through: the committed file, or on S3 this host's cached copy of the object.
    pub fn committed_file(&self, room: &str) -> PathBuf {
        if self.s3.is_none() {
            return self.data.join("rooms").join(room).join("big");
        }
        let mut found = Vec::new();
        let mut dirs = vec![self.data.join("s3")];
        while let Some(d) = dirs.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    dirs.push(e.path());
                } else if e.path().parent().is_some_and(|p| p.ends_with("cache"))
                    && e.metadata().unwrap().len() == 2 << 20
                {
                    found.push((e.metadata().unwrap().modified().unwrap(), e.path()));
                }
            }
        }
        // The newest: the one just written.
        found.sort();
        found.pop().expect("a cached file").1
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
        let info = String::from_utf8_lossy(&fs::read("/proc/self/mountinfo").unwrap_or_default())
            .into_owned();
        let tmp = self.tmp.path().to_string_lossy().into_owned();
        for line in info.lines() {
            if let Some(mp) = line.split(' ').nth(4).filter(|m| m.starts_with(&tmp)) {
                let c = cstr(Path::new(mp));
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}
