//! Test support: a real roomfs mount run as a child process, always unmounted on drop.
//!
//! The store the mounts use is the test run's: the local data dir, or, with
//! `ROOMFS_TEST_STORE=s3` (scripts/test runs the POSIX, grants, daemon and fsx suites a second
//! time so), a SeaweedFS bucket the test binary shares, each mount under a prefix of its own.
//! Tests look at what was committed through [`Mounted::committed`] and its siblings, which read
//! the data dir or the bucket; a test that checks something only one store has says so with
//! [`Mounted::is_s3`].
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
    /// The bucket the space is in, when the test run uses S3.
    pub s3: Option<Bucket>,
    log: Arc<Mutex<Vec<String>>>,
}

/// Whether this test run's mounts keep their spaces in S3 (`ROOMFS_TEST_STORE=s3`).
pub fn store_is_s3() -> bool {
    match std::env::var("ROOMFS_TEST_STORE").as_deref() {
        Ok("s3") => true,
        Ok("local") | Err(_) => false,
        Ok(other) => panic!("ROOMFS_TEST_STORE={other:?}: expected local or s3"),
    }
}

/// A prefix of a SeaweedFS bucket: where a mount's spaces are, read directly (with roomfs's
/// own S3 client, so the tests need no other).
pub struct Bucket {
    pub endpoint: String,
    pub bucket: String,
    pub prefix: String,
    pub env: Vec<(&'static str, String)>,
    client: roomfs::store::s3::sdk::SdkClient,
}

impl Bucket {
    /// A fresh prefix of the test binary's shared SeaweedFS.
    pub fn shared() -> Bucket {
        Bucket::on(s3::SeaweedFs::shared(), &s3::unique_prefix())
    }

    /// `prefix` of `s3`'s bucket.
    pub fn on(s3: &s3::SeaweedFs, prefix: &str) -> Bucket {
        let client =
            roomfs::store::s3::sdk::SdkClient::connect(&roomfs::store::s3::sdk::Connection {
                bucket: s3.bucket().into(),
                endpoint: Some(s3.endpoint()),
                region: Some(s3::REGION.into()),
                connect_timeout: Duration::from_secs(5),
                attempt_timeout: Duration::from_secs(30),
                attempts: 3,
                credentials: Some((s3.access_key().into(), s3.secret_key().into())),
                ca_bundle: s3.ca_file(),
            })
            .expect("connect to SeaweedFS");
        Bucket {
            endpoint: s3.endpoint(),
            bucket: s3.bucket().into(),
            prefix: prefix.into(),
            env: s3.env(),
            client,
        }
    }

    /// The `--store` of a mount: this prefix, with requests failing fast enough for tests
    /// (`options` adds more, `name=value&...`).
    pub fn url(&self, options: &str) -> String {
        let mut url = format!(
            "s3://{}/{}?timeout_secs=10&connect_timeout_secs=2&attempts=3",
            self.bucket, self.prefix
        );
        if !options.is_empty() {
            url.push('&');
            url.push_str(options);
        }
        url
    }

    /// The object key of `rel` in space `<kind>/<id>`.
    pub fn key(&self, kind: &str, id: &str, rel: &str) -> String {
        format!("{}/{kind}/{id}/{rel}", self.prefix)
    }

    /// The bytes of `key`, if it exists.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        use roomfs::store::s3::client::{Failure, ObjectClient};
        let mut out = Vec::new();
        match self.client.get(key, None, None, &mut |b| {
            out.extend_from_slice(b);
            Ok(())
        }) {
            Ok(_) => Some(out),
            Err(e) if e.is(Failure::NotFound) => None,
            Err(e) => panic!("GET {key}: {e}"),
        }
    }

    /// The head of `key` (size, ETag, time, metadata), if it exists.
    pub fn head(&self, key: &str) -> Option<roomfs::store::s3::client::ObjectInfo> {
        use roomfs::store::s3::client::{Failure, ObjectClient};
        match self.client.head(key) {
            Ok(info) => Some(info),
            Err(e) if e.is(Failure::NotFound) => None,
            Err(e) => panic!("HEAD {key}: {e}"),
        }
    }

    /// The user metadata of `key`, if it exists.
    pub fn metadata(&self, key: &str) -> Option<std::collections::BTreeMap<String, String>> {
        use roomfs::store::s3::client::{Failure, ObjectClient};
        match self.client.head(key) {
            Ok(info) => Some(info.metadata),
            Err(e) if e.is(Failure::NotFound) => None,
            Err(e) => panic!("HEAD {key}: {e}"),
        }
    }

    /// Every key under `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        use roomfs::store::s3::client::ObjectClient;
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list(prefix, false, token.as_deref(), None)
                .unwrap_or_else(|e| panic!("LIST {prefix}: {e}"));
            keys.extend(page.objects.into_iter().map(|o| o.key));
            match page.next {
                Some(t) => token = Some(t),
                None => return keys,
            }
        }
    }

    /// The names under `prefix` (keys, and common prefixes if `delimited`), listed in pages
    /// of `max_keys`.
    pub fn names_paged(&self, prefix: &str, delimited: bool, max_keys: u32) -> Vec<String> {
        use roomfs::store::s3::client::ObjectClient;
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list(prefix, delimited, token.as_deref(), Some(max_keys))
                .unwrap_or_else(|e| panic!("LIST {prefix}: {e}"));
            names.extend(page.objects.into_iter().map(|o| o.key));
            names.extend(page.prefixes);
            match page.next {
                Some(t) => token = Some(t),
                None => {
                    names.sort();
                    return names;
                }
            }
        }
    }

    /// The multipart uploads in progress under this prefix.
    pub fn uploads(&self) -> Vec<String> {
        use roomfs::store::s3::client::ObjectClient;
        self.client
            .list_uploads(&format!("{}/", self.prefix))
            .unwrap_or_else(|e| panic!("ListMultipartUploads: {e}"))
            .into_iter()
            .map(|u| u.key)
            .collect()
    }

    /// Puts `bytes` at `key` behind the mounts' back (another tool).
    pub fn put(&self, key: &str, bytes: &[u8]) {
        self.put_with(key, bytes, &[]);
    }

    /// Puts `bytes` at `key` with user `metadata`.
    pub fn put_with(&self, key: &str, bytes: &[u8], metadata: &[(&str, &str)]) {
        use roomfs::store::s3::client::{Body, Condition, ObjectClient};
        let metadata = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.client
            .put(
                key,
                Body::Bytes(Arc::new(bytes.to_vec())),
                &metadata,
                &Condition::None,
            )
            .unwrap_or_else(|e| panic!("PUT {key}: {e}"));
    }

    /// Deletes every object under `prefix` behind the mounts' back.
    pub fn delete_all(&self, prefix: &str) {
        use roomfs::store::s3::client::ObjectClient;
        for key in self.keys(prefix) {
            self.client
                .delete(&key)
                .unwrap_or_else(|e| panic!("DELETE {key}: {e}"));
        }
    }
}

/// Mounts a tmpfs with `options` (`size=1m,mode=0700`) at `dir`: a small disk to fill. Whoever
/// made `dir` unmounts it.
pub fn mount_tmpfs(dir: &Path, options: &str) {
    let (dir, options) = (cstr(dir), CString::new(options).unwrap());
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
}

pub fn is_mounted(path: &Path) -> bool {
    // Lossy: a mount point that is not UTF-8 (anywhere) must not hide the others.
    let info = String::from_utf8_lossy(&std::fs::read("/proc/self/mountinfo").unwrap_or_default())
        .into_owned();
    let want = path.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Aborts the FUSE connection of the mount at `path` (through fusectl, mounted if need be):
/// every request waiting on it fails, so that a test finding its mount deadlocked can fail
/// instead of leaving its threads waiting for good (which would keep the test binary from
/// exiting).
pub fn abort_fuse(path: &Path) {
    let info = String::from_utf8_lossy(&std::fs::read("/proc/self/mountinfo").unwrap_or_default())
        .into_owned();
    let want = path.to_string_lossy().replace(' ', "\\040");
    let Some(minor) = info
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.get(4) == Some(&want.as_str()))
        .and_then(|f| f.get(2)?.split(':').nth(1).map(str::to_string))
    else {
        return;
    };
    let ctl = Path::new("/sys/fs/fuse/connections");
    if !is_mounted(ctl) {
        // SAFETY: NUL-terminated strings that outlive the call.
        unsafe {
            libc::mount(
                c"fusectl".as_ptr(),
                c"/sys/fs/fuse/connections".as_ptr(),
                c"fusectl".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
    }
    let _ = std::fs::write(ctl.join(minor).join("abort"), "1");
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

    /// Like [`Mounted::with_args`]; on S3 with store `options` (`name=value&...`) as well.
    pub fn with_store_options(args: &[&str], options: &str) -> Mounted {
        if !store_is_s3() {
            return Mounted::with_args(args);
        }
        let bucket = Bucket::shared();
        let url = bucket.url(options);
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--store", url.as_str()]);
        Mounted::on(&all, |_| {}, Some(bucket))
    }

    /// Like [`Mounted::with_args`], with the data dir on a tmpfs of `bytes`: a small disk to
    /// fill. It is unmounted on drop, after the daemon.
    pub fn on_small_disk(args: &[&str], bytes: u64) -> Mounted {
        Mounted::with_setup(args, |data| mount_tmpfs(data, &format!("size={bytes}")))
    }

    /// Like [`Mounted::with_args`], after `setup` has filled the data dir (given its path).
    pub fn with_setup(args: &[&str], setup: impl FnOnce(&Path)) -> Mounted {
        Mounted::on(args, setup, store_is_s3().then(Bucket::shared))
    }

    /// Mounts with `args` on `s3` (if given, and `args` name no store, its prefix is the
    /// store), after `setup` has filled the data dir.
    pub fn on(args: &[&str], setup: impl FnOnce(&Path), s3: Option<Bucket>) -> Mounted {
        let tmp = tempfile::Builder::new()
            .prefix("roomfs-test-")
            .tempdir_in("/tmp")
            .unwrap();
        let mnt = tmp.path().join("mnt");
        let data = tmp.path().join("data");
        std::fs::create_dir(&mnt).unwrap();
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if let Some(bucket) = &s3
            && !args.iter().any(|a| a == "--store")
        {
            args.push("--store".into());
            args.push(bucket.url(""));
        }
        let mut m = Mounted {
            tmp,
            mnt,
            data,
            child: None,
            args,
            s3,
            log: Default::default(),
        };
        std::fs::create_dir_all(&m.data).unwrap();
        setup(&m.data);
        if m.is_s3() {
            m.seed_bucket();
        }
        m.start();
        m
    }

    /// On S3, what `setup` put into the data dir for the space goes into the bucket instead:
    /// copied in (`cp`, keeping modes, times and symlinks) through a mount of the space with
    /// full access, before the test's own mount.
    fn seed_bucket(&self) {
        let (kind, id) = self.space();
        let src = self.data.join(kind).join(&id);
        if !src.exists() {
            return;
        }
        let seed = self.tmp.path().join("seed");
        std::fs::rename(&src, &seed).unwrap();
        let mnt = self.tmp.path().join("seed-mnt");
        let data = self.tmp.path().join("seed-data");
        std::fs::create_dir_all(&mnt).unwrap();
        let store = self.args[self.args.iter().position(|a| a == "--store").unwrap() + 1].clone();
        let flag = if kind == "rooms" {
            "--room"
        } else {
            "--session"
        };
        let mut cmd = Command::new(BIN);
        cmd.arg("mount")
            .arg("--data-dir")
            .arg(&data)
            .args([flag, &id, "--store", &store])
            .arg(&mnt)
            .envs(
                self.s3
                    .as_ref()
                    .unwrap()
                    .env
                    .iter()
                    .map(|(k, v)| (*k, v.as_str())),
            );
        let log = Default::default();
        let mut child = start_logged(&mut cmd, " mounted ", &log);
        let copied = output(
            Command::new("cp")
                .args(["-R", "-P", "--preserve=mode,timestamps"])
                .arg(format!("{}/.", seed.display()))
                .arg(&mnt),
        );
        let unmounted = output(Command::new(BIN).arg("unmount").arg(&mnt));
        let _ = child.wait();
        assert!(
            copied.status.success() && unmounted.status.success(),
            "seeding the bucket: {copied:?} {unmounted:?}: {}",
            log.lock().unwrap().join("\n")
        );
    }

    /// Every entry of the space as committed (path → mode bits and content; a symlink's
    /// content is its target, a directory's empty), to prove something did not change it.
    pub fn committed_snapshot(&self) -> std::collections::BTreeMap<String, (u32, Vec<u8>)> {
        let mut out = std::collections::BTreeMap::new();
        match &self.s3 {
            Some(b) => {
                let root = self.key("");
                for key in b.keys(&root) {
                    let rel = key[root.len()..].to_string();
                    if rel.ends_with(".roomfs-attrs") {
                        // The store's own index: what it holds shows in the modes below.
                        continue;
                    }
                    let mode = b
                        .metadata(&key)
                        .and_then(|m| m.get("mode").and_then(|v| v.parse().ok()))
                        .unwrap_or(0);
                    let body = if rel.ends_with('/') || rel.is_empty() {
                        Vec::new()
                    } else {
                        b.get(&key).unwrap_or_default()
                    };
                    out.insert(rel, (mode, body));
                }
            }
            None => {
                use std::os::unix::ffi::OsStrExt;
                use std::os::unix::fs::PermissionsExt;
                let root = self.backing("");
                let mut stack = vec![root.clone()];
                while let Some(dir) = stack.pop() {
                    for e in std::fs::read_dir(&dir).unwrap() {
                        let e = e.unwrap();
                        let meta = std::fs::symlink_metadata(e.path()).unwrap();
                        let rel = e.path().strip_prefix(&root).unwrap().to_path_buf();
                        let rel = String::from_utf8_lossy(rel.as_os_str().as_bytes()).into_owned();
                        let mode = meta.permissions().mode();
                        let body = if meta.is_dir() {
                            stack.push(e.path());
                            Vec::new()
                        } else if meta.file_type().is_symlink() {
                            std::fs::read_link(e.path())
                                .unwrap()
                                .into_os_string()
                                .into_encoded_bytes()
                        } else {
                            std::fs::read(e.path()).unwrap()
                        };
                        out.insert(rel, (mode, body));
                    }
                }
            }
        }
        out
    }

    /// Starts (again) the daemon for this mount point and waits until it reports the mount.
    pub fn start(&mut self) {
        self.start_with(|_| {});
    }

    /// Unmounts, then starts the daemon again with at most `n` open files (soft and hard
    /// limit: it cannot raise them).
    pub fn restart_with_open_files(&mut self, n: u64) {
        use std::os::unix::process::CommandExt;
        self.unmount();
        self.start_with(|cmd| {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        });
    }

    fn start_with(&mut self, setup: impl FnOnce(&mut Command)) {
        let mut cmd = Command::new(BIN);
        cmd.arg("mount")
            .arg("--data-dir")
            .arg(&self.data)
            .args(&self.args)
            .arg(&self.mnt);
        if let Some(b) = &self.s3 {
            cmd.envs(b.env.iter().map(|(k, v)| (*k, v.as_str())));
        }
        setup(&mut cmd);
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

    /// Whether the space is in S3 (else in the data dir).
    pub fn is_s3(&self) -> bool {
        self.s3.is_some()
    }

    /// The space's kind directory and id (room r1 unless the args say otherwise).
    fn space(&self) -> (&'static str, String) {
        match self.args.iter().position(|a| a == "--session") {
            Some(i) => ("sessions", self.args[i + 1].clone()),
            None => {
                let i = self.args.iter().position(|a| a == "--room").unwrap();
                ("rooms", self.args[i + 1].clone())
            }
        }
    }

    /// The committed file in the data dir behind `rel`: only the local store has one (a test
    /// of what only the local store does says so; others use [`Mounted::committed`]).
    pub fn backing(&self, rel: &str) -> PathBuf {
        assert!(
            !self.is_s3(),
            "the S3 store has no backing file for {rel}: use committed()"
        );
        let (kind, id) = self.space();
        self.data.join(kind).join(id).join(rel)
    }

    /// The one file of `len` bytes in the S3 store's cache (of objects this host wrote or
    /// read), under the data dir.
    pub fn cached_file(&self, len: u64) -> PathBuf {
        let mut found = Vec::new();
        let mut dirs = vec![self.data.join("s3")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let t = e.file_type().unwrap();
                if t.is_dir() {
                    dirs.push(e.path());
                } else if e.path().parent().is_some_and(|p| p.ends_with("cache"))
                    && e.metadata().unwrap().len() == len
                {
                    found.push(e.path());
                }
            }
        }
        assert_eq!(found.len(), 1, "cached files of {len} bytes: {found:?}");
        found.pop().unwrap()
    }

    /// The object key behind `rel` (on S3).
    pub fn key(&self, rel: &str) -> String {
        let (kind, id) = self.space();
        self.s3.as_ref().expect("an S3 mount").key(kind, &id, rel)
    }

    /// What is committed at `rel` (in the data dir or the bucket), if anything.
    pub fn committed_opt(&self, rel: &str) -> Option<Vec<u8>> {
        match &self.s3 {
            Some(b) => b.get(&self.key(rel)),
            None => match std::fs::read(self.backing(rel)) {
                Ok(bytes) => Some(bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => panic!("read {rel}: {e}"),
            },
        }
    }

    /// What is committed at `rel` (it must exist).
    pub fn committed(&self, rel: &str) -> Vec<u8> {
        self.committed_opt(rel)
            .unwrap_or_else(|| panic!("nothing committed at {rel}"))
    }

    /// The size of what is committed at `rel`.
    pub fn committed_len(&self, rel: &str) -> u64 {
        self.committed(rel).len() as u64
    }

    /// Whether anything (a file, a directory) is committed at `rel`.
    pub fn committed_exists(&self, rel: &str) -> bool {
        match &self.s3 {
            Some(b) => {
                let key = self.key(rel);
                b.metadata(&key).is_some() || !b.keys(&format!("{key}/")).is_empty()
            }
            None => std::fs::symlink_metadata(self.backing(rel)).is_ok(),
        }
    }

    /// What is committed at `rel`: `'f'` a file, `'d'` a directory, `'l'` a symlink, `'p'` a
    /// FIFO, `'s'` a socket's name, `'b'`/`'c'` a device; `None`: nothing.
    pub fn committed_kind(&self, rel: &str) -> Option<char> {
        let kind = |mode: u32| match mode & libc::S_IFMT {
            libc::S_IFDIR => 'd',
            libc::S_IFLNK => 'l',
            libc::S_IFIFO => 'p',
            libc::S_IFSOCK => 's',
            libc::S_IFBLK => 'b',
            libc::S_IFCHR => 'c',
            _ => 'f',
        };
        match &self.s3 {
            Some(b) => {
                let key = self.key(rel);
                match b.metadata(&key) {
                    Some(m) => Some(kind(
                        m.get("mode").and_then(|v| v.parse().ok()).unwrap_or(0),
                    )),
                    None => (!b.keys(&format!("{key}/")).is_empty()).then_some('d'),
                }
            }
            None => {
                use std::os::unix::fs::MetadataExt;
                std::fs::symlink_metadata(self.backing(rel))
                    .ok()
                    .map(|m| kind(m.mode()))
            }
        }
    }

    /// Which version is committed at `rel` (equal strings: the same version).
    pub fn committed_version(&self, rel: &str) -> String {
        use std::os::unix::fs::MetadataExt;
        match &self.s3 {
            Some(b) => {
                let info = b.head(&self.key(rel)).expect("the object exists");
                format!("{} {:?}", info.etag, info.last_modified)
            }
            None => {
                let m = std::fs::metadata(self.backing(rel)).unwrap();
                format!("{} {} {}", m.ino(), m.mtime(), m.mtime_nsec())
            }
        }
    }

    /// The modification time committed for the file at `rel`.
    pub fn committed_mtime(&self, rel: &str) -> std::time::SystemTime {
        match &self.s3 {
            Some(b) => {
                let info = b.head(&self.key(rel)).expect("the object exists");
                match info.metadata.get("mtime") {
                    Some(t) => roomfs::store::s3::attrs::parse_time(t).expect("an mtime"),
                    None => info.last_modified,
                }
            }
            None => std::fs::metadata(self.backing(rel))
                .unwrap()
                .modified()
                .unwrap(),
        }
    }

    /// The permission bits committed for the file at `rel`.
    pub fn committed_mode(&self, rel: &str) -> u32 {
        use std::os::unix::fs::MetadataExt;
        match &self.s3 {
            Some(b) => {
                let m = b.metadata(&self.key(rel)).expect("the object exists");
                m["mode"].parse::<u32>().unwrap() & 0o7777
            }
            None => std::fs::symlink_metadata(self.backing(rel)).unwrap().mode() & 0o7777,
        }
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
pub fn second_read_after_a_change_on_disk(path: &Path, backing: impl Fn() -> PathBuf) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    std::fs::write(path, vec![b'a'; 2 << 20]).unwrap();
    let backing = backing();
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

/// [`second_read_after_a_change_on_disk`] where the page cache should answer (no passthrough):
/// tried up to three times while it reads the disk. The kernel sends a writer's RELEASE after
/// `close()` returns, without waiting; a reader whose open reaches the daemon first opens
/// beside a writer and reads directly, which reads the disk too (a loaded machine, a test
/// suite running beside, makes that likelier). Three races in a row are not a plausible
/// outcome; a mount that reads the disk does it every time.
pub fn cached_second_read(path: &Path, backing: impl Fn() -> PathBuf) -> Vec<u8> {
    let mut read = Vec::new();
    for _ in 0..3 {
        read = second_read_after_a_change_on_disk(path, &backing);
        if read == b"aaaa" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    read
}

pub fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("expected the call to fail")
        .raw_os_error()
        .expect("an OS error")
}

/// A grant token from `roomfs token issue --secret-file SECRET ARGS...` (it must succeed).
pub fn issue_token(secret: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["token", "issue", "--secret-file"])
        .arg(secret)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "token issue {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
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

/// Appends 120 lines to the log at `written` (one open file, each line `fsync`ed, 10-100 ms
/// apart) while three readers of `read` (the same log through another mount or host) poll it
/// at its end: each must read exactly the log, every line and never a byte that is not the
/// log's (the zeros of a page the kernel cached cut at an earlier end), within 60 s.
pub fn append_beside_polling_readers(written: &Path, read: &Path) {
    use std::io::Write;
    const LINES: usize = 120;
    let reader = r#"
import os, sys, time
path, lines = sys.argv[1], int(sys.argv[2])
want = ''.join(f'line {i:04} ' + 'y' * (i % 53) + '\n' for i in range(lines)).encode()
got = b''
deadline = time.time() + 60
fd = os.open(path, os.O_RDONLY)
while len(got) < len(want) and time.time() < deadline:
    chunk = os.read(fd, 1 << 16)
    if chunk:
        got += chunk
        if got != want[:len(got)]:
            bad = next(i for i in range(len(got)) if got[i:i+1] != want[i:i+1])
            sys.exit(f'at byte {bad}: read {got[bad:bad+48]!r}, the log has {want[bad:bad+48]!r}')
if got != want:
    sys.exit(f'read {len(got)} of {len(want)} bytes in 60 s')
"#;
    let readers: Vec<_> = (0..3)
        .map(|_| {
            Command::new("python3")
                .arg("-c")
                .arg(reader)
                .arg(read)
                .arg(LINES.to_string())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(written)
        .unwrap();
    for i in 0..LINES {
        writeln!(log, "line {i:04} {}", "y".repeat(i % 53)).unwrap();
        log.sync_all().unwrap();
        std::thread::sleep(Duration::from_millis(10 + (i as u64 * 37) % 91));
    }
    drop(log);
    for r in readers {
        let out = r.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "a reader: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs `tail -n +1 -f NAME` in `dir` and returns its first `n` lines (each within 10 s,
/// else panics naming `what`); the `tail` is stopped before returning.
pub fn tail_f(dir: &Path, name: &str, n: usize, what: &str) -> Vec<String> {
    use std::io::BufRead;
    let mut tail = Command::new("tail")
        .args(["-n", "+1", "-f", name])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = tail.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let followed: Result<Vec<String>, _> = (0..n)
        .map(|_| rx.recv_timeout(Duration::from_secs(10)))
        .collect();
    tail.kill().unwrap();
    tail.wait().unwrap();
    followed.unwrap_or_else(|_| panic!("{what}: tail -f showed no new line within 10 s"))
}
