//! Installing and mounting the usual ways: the mount helper driven through the real mount(8)
//! (with /sbin/mount.fuse.roomfs installed by the test and removed afterwards), an fstab line,
//! the daemon serving helper mounts, scripts/install and the Debian package.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{BIN, errno, is_mounted, output};

const HELPER: &str = "/sbin/mount.fuse.roomfs";
const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// /sbin/mount.fuse.roomfs pointing at the binary under test, for as long as it lives. Holds a
/// lock so that tests (of this run, or of another checkout on this machine) take turns, and
/// puts back whatever was installed there before.
struct HelperInstalled {
    backup: Option<PathBuf>,
    _lock: fs::File,
}

impl HelperInstalled {
    fn new() -> HelperInstalled {
        let lock = fs::File::create("/run/lock/roomfs-mount-helper-test.lock")
            .or_else(|_| fs::File::create("/tmp/roomfs-mount-helper-test.lock"))
            .unwrap();
        assert_eq!(
            unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
            0
        );
        let backup = fs::symlink_metadata(HELPER).is_ok().then(|| {
            let b = PathBuf::from(format!("{HELPER}.before-test"));
            fs::rename(HELPER, &b).unwrap();
            b
        });
        std::os::unix::fs::symlink(BIN, HELPER).unwrap();
        HelperInstalled {
            backup,
            _lock: lock,
        }
    }
}

impl Drop for HelperInstalled {
    fn drop(&mut self) {
        let _ = fs::remove_file(HELPER);
        if let Some(b) = &self.backup {
            let _ = fs::rename(b, HELPER);
        }
    }
}

/// A temporary directory with a data dir and mount points; unmounts what is left mounted.
struct Scratch {
    tmp: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            tmp: tempfile::Builder::new()
                .prefix("roomfs-install-")
                .tempdir_in("/tmp")
                .unwrap(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn dir(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        fs::create_dir_all(&p).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let tmp = self.tmp.path().to_string_lossy().into_owned();
        for mp in info.lines().filter_map(|l| l.split(' ').nth(4)) {
            if mp.starts_with(&tmp) {
                let c = common::cstr(Path::new(mp));
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

/// Runs `mount ARGS` (or another tool) with stderr in a file, so that a server it leaves in the
/// background cannot hold our pipe open; returns (exit code, stderr).
fn run(tool: &str, args: &[&str], scratch: &Scratch) -> (i32, String) {
    let err_path = scratch.path("tool-stderr");
    let err = fs::File::create(&err_path).unwrap();
    let status = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .status()
        .unwrap();
    (
        status.code().unwrap_or(-1),
        fs::read_to_string(err_path).unwrap(),
    )
}

/// The pids of `roomfs mount` processes serving `mountpoint`.
fn servers_of(mountpoint: &Path) -> Vec<i32> {
    let want = mountpoint.to_string_lossy().into_owned();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .collect();
            args.len() > 2
                && args[0].ends_with(b"roomfs")
                && args[1] == b"mount"
                && args[args.len() - 1] == want.as_bytes()
        })
        .collect()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The type and options of the mount at `path` in /proc/self/mountinfo.
fn mount_entry(path: &Path) -> (String, String, String) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
        .unwrap_or_else(|| panic!("{} is not mounted", path.display()));
    let (left, right) = line.split_once(" - ").unwrap();
    let mut right = right.split(' ');
    (
        right.next().unwrap().to_owned(),
        right.next().unwrap().to_owned(),
        left.split(' ').nth(5).unwrap().to_owned(),
    )
}

#[test]
fn mount_8_mounts_in_the_background_and_umount_stops_the_server() {
    let _helper = HelperInstalled::new();
    let s = Scratch::new();
    let data = s.dir("data");
    fs::create_dir_all(data.join("rooms/r1/inputs")).unwrap();
    fs::write(data.join("rooms/r1/inputs/seed.txt"), b"seed").unwrap();
    let mnt = s.dir("srv/r1");
    let log = s.path("server.log");
    let opts = format!(
        "data_dir={},grant=outputs/:rw+inputs/:ro,log={}",
        data.display(),
        log.display()
    );
    let (code, err) = run(
        "mount",
        &[
            "-t",
            "fuse.roomfs",
            "room:r1",
            mnt.to_str().unwrap(),
            "-o",
            &opts,
        ],
        &s,
    );
    assert_eq!(code, 0, "{err}");
    // mount(8) came back with the mount in place, served by a process of its own.
    assert!(is_mounted(&mnt));
    let (fstype, source, _) = mount_entry(&mnt);
    assert_eq!(
        (fstype.as_str(), source.as_str()),
        ("fuse.roomfs", "roomfs:rooms/r1")
    );
    let servers = servers_of(&mnt);
    assert_eq!(servers.len(), 1, "one background server: {servers:?}");
    let server = servers[0];
    assert_eq!(
        unsafe { libc::getsid(server) },
        server,
        "in a session of its own"
    );
    // Files round-trip, within the grant.
    fs::create_dir(mnt.join("outputs")).unwrap();
    fs::write(mnt.join("outputs/report.md"), b"# done").unwrap();
    assert_eq!(
        fs::read(data.join("rooms/r1/outputs/report.md")).unwrap(),
        b"# done"
    );
    assert_eq!(fs::read(mnt.join("inputs/seed.txt")).unwrap(), b"seed");
    assert_eq!(errno(fs::write(mnt.join("inputs/x"), b"x")), libc::EACCES);
    // umount(8) unmounts, and the server notices and exits.
    let (code, err) = run("umount", &[mnt.to_str().unwrap()], &s);
    assert_eq!(code, 0, "{err}");
    assert!(!is_mounted(&mnt));
    wait_until("the server exits", || {
        !Path::new(&format!("/proc/{server}")).exists()
            || fs::read_to_string(format!("/proc/{server}/stat"))
                .is_ok_and(|st| st.split(' ').nth(2) == Some("Z"))
    });
    let log = fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("mounted room r1") && log.contains("unmounted"),
        "{log}"
    );
}

#[test]
fn mount_8_with_its_output_in_a_pipe_returns_while_the_mount_stays() {
    // `$(mount ...)`, `mount ... | tee`: the background server must not hold the pipe, or its
    // reader waits until the unmount. Without log=, it then logs nowhere.
    let _helper = HelperInstalled::new();
    let s = Scratch::new();
    let data = s.dir("data");
    let mnt = s.dir("srv/piped");
    let opts = format!("data_dir={}", data.display());
    let mut cmd = Command::new("mount");
    cmd.args(["-t", "fuse.roomfs", "room:r1"])
        .arg(&mnt)
        .args(["-o", &opts])
        .stdin(Stdio::null());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(cmd.output().unwrap()); // stdout and stderr are pipes, read to EOF
    });
    let out = rx.recv_timeout(Duration::from_secs(30));
    let mounted = is_mounted(&mnt);
    let (code, err) = run("umount", &[mnt.to_str().unwrap()], &s);
    let out = out.expect("mount(8) did not return: its pipe is held by the server");
    assert!(out.status.success(), "{out:?}");
    assert!(mounted, "{out:?}");
    assert_eq!(code, 0, "{err}");
}

#[test]
fn an_fstab_line_mounts_with_the_usual_options() {
    let _helper = HelperInstalled::new();
    let s = Scratch::new();
    let data = s.dir("data");
    fs::create_dir_all(data.join("rooms/r2")).unwrap();
    fs::write(data.join("rooms/r2/a.txt"), b"kept").unwrap();
    let mnt = s.dir("srv/r2");
    let fstab = s.path("fstab");
    fs::write(
        &fstab,
        format!(
            "# roomfs, served in the background, after the network and the daemon's unit\n\
             room:r2 {} fuse.roomfs ro,data_dir={},_netdev,nofail,x-systemd.requires=roomfs.service,log={} 0 0\n",
            mnt.display(),
            data.display(),
            s.path("r2.log").display()
        ),
    )
    .unwrap();
    let (code, err) = run(
        "mount",
        &["--fstab", fstab.to_str().unwrap(), mnt.to_str().unwrap()],
        &s,
    );
    assert_eq!(code, 0, "{err}");
    let (_, _, options) = mount_entry(&mnt);
    assert!(options.split(',').any(|o| o == "ro"), "{options}");
    assert_eq!(fs::read(mnt.join("a.txt")).unwrap(), b"kept");
    assert_eq!(errno(fs::write(mnt.join("b.txt"), b"x")), libc::EROFS);
    assert_eq!(
        errno(fs::OpenOptions::new().append(true).open(mnt.join("a.txt"))),
        libc::EROFS
    );
    let (code, err) = run("umount", &[mnt.to_str().unwrap()], &s);
    assert_eq!(code, 0, "{err}");
    wait_until("the server exits", || servers_of(&mnt).is_empty());
    assert_eq!(fs::read(data.join("rooms/r2/a.txt")).unwrap(), b"kept");
}

/// Writes an executable script `name` into `dir` and runs it: the errno of `execve`, or 0.
fn exec_script(dir: &Path, name: &str) -> i32 {
    let script = dir.join(name);
    fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    match Command::new(&script).status() {
        Ok(status) => {
            assert!(status.success(), "{status}");
            0
        }
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

#[test]
fn a_user_fstab_line_mounts_noexec_and_nothing_in_it_runs() {
    let _helper = HelperInstalled::new();
    let s = Scratch::new();
    let data = s.dir("data");
    let mnt = s.dir("srv/r3");
    // mount(8) passes `rw,noexec,nosuid,nodev,...,user` for a `user` line, as it does for
    // `users`; `-o noexec` is the same request made by hand.
    let fstab = s.path("fstab");
    fs::write(
        &fstab,
        format!(
            "room:r3 {} fuse.roomfs data_dir={},user,noauto,nofail,_netdev 0 0\n",
            mnt.display(),
            data.display()
        ),
    )
    .unwrap();
    let (code, err) = run(
        "mount",
        &["--fstab", fstab.to_str().unwrap(), mnt.to_str().unwrap()],
        &s,
    );
    assert_eq!(code, 0, "{err}");
    let (_, _, options) = mount_entry(&mnt);
    for want in ["noexec", "nosuid", "nodev"] {
        assert!(options.split(',').any(|o| o == want), "{want}: {options}");
    }
    assert_eq!(exec_script(&mnt, "run.sh"), libc::EACCES);
    let (code, err) = run("umount", &[mnt.to_str().unwrap()], &s);
    assert_eq!(code, 0, "{err}");
    wait_until("the server exits", || servers_of(&mnt).is_empty());
    // Without noexec (or with exec after it), scripts run; nosuid and nodev stay.
    let opts = format!("data_dir={},noexec,exec", data.display());
    let (code, err) = run(
        "mount",
        &[
            "-t",
            "fuse.roomfs",
            "room:r3",
            mnt.to_str().unwrap(),
            "-o",
            &opts,
        ],
        &s,
    );
    assert_eq!(code, 0, "{err}");
    let (_, _, options) = mount_entry(&mnt);
    assert!(!options.split(',').any(|o| o == "noexec"), "{options}");
    assert!(
        options.contains("nosuid") && options.contains("nodev"),
        "{options}"
    );
    assert_eq!(exec_script(&mnt, "run.sh"), 0);
    let (code, err) = run("umount", &[mnt.to_str().unwrap()], &s);
    assert_eq!(code, 0, "{err}");
    wait_until("the server exits", || servers_of(&mnt).is_empty());
}

#[test]
fn the_daemon_serves_helper_mounts_when_asked() {
    let _helper = HelperInstalled::new();
    let s = Scratch::new();
    let socket = s.path("control.sock");
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut serve = Command::new(BIN);
    serve
        .args(["serve", "--socket"])
        .arg(&socket)
        .arg("--data-dir")
        .arg(s.path("data"));
    let mut daemon = common::start_logged(&mut serve, "serving the control API", &log);
    let cli = |args: &[&str]| {
        let out = output(Command::new(BIN).args(args).arg("--socket").arg(&socket));
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    cli(&["session", "create", "s1"]);
    let mnt = s.dir("sandbox/data");
    let opts = format!("socket={},sync_on_close", socket.display());
    let (code, err) = run(
        "mount",
        &[
            "-t",
            "fuse.roomfs",
            "session:s1",
            mnt.to_str().unwrap(),
            "-o",
            &opts,
        ],
        &s,
    );
    assert_eq!(code, 0, "{err}");
    let mounts: serde_json::Value = serde_json::from_str(&cli(&["mounts", "--json"])).unwrap();
    assert_eq!(mounts[0]["mountpoint"], mnt.to_str().unwrap());
    assert_eq!(mounts[0]["kind"], "session");
    assert!(
        servers_of(&mnt).is_empty(),
        "no background server: the daemon serves it"
    );
    fs::write(mnt.join("notes.txt"), b"from the sandbox").unwrap();
    assert_eq!(
        fs::read(s.path("data/sessions/s1/notes.txt")).unwrap(),
        b"from the sandbox"
    );
    assert!(
        mnt.join(".meta").exists(),
        "a session mount of the daemon shows .meta"
    );
    let (code, err) = run("umount", &[mnt.to_str().unwrap()], &s);
    assert_eq!(code, 0, "{err}");
    wait_until("the daemon forgets the mount", || {
        cli(&["mounts", "--json"]).trim() == "[]"
    });
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
}

#[test]
fn bad_mount_options_are_one_line_and_a_failure() {
    let _helper = HelperInstalled::new();
    let s = Scratch::new();
    let mnt = s.dir("m");
    let m = mnt.to_str().unwrap();
    let data = format!("data_dir={}", s.path("data").display());
    for (source, opts, code, want) in [
        (
            "room:r1",
            format!("{data},bogus=1"),
            1,
            "unknown option \"bogus=1\"",
        ),
        ("room:r1", format!("{data},grant=../x:rw"), 1, "grant"),
        ("rooms/r1", data.clone(), 1, "must be room:ID or session:ID"),
        ("room:a/b", data.clone(), 1, "invalid room id"),
        ("room:r1", format!("{data},daemon"), 1, "daemon's config"),
        (
            "room:r1",
            format!("socket={}", s.path("none.sock").display()),
            32,
            "no roomfs daemon at",
        ),
    ] {
        let (got, err) = run("mount", &["-t", "fuse.roomfs", source, m, "-o", &opts], &s);
        assert_eq!(got, code, "{source} {opts}: {err}");
        assert_eq!(err.lines().count(), 1, "{source} {opts}: one line: {err:?}");
        assert!(
            err.contains(want),
            "{source} {opts}: expected {want:?} in {err:?}"
        );
        assert!(!is_mounted(&mnt), "{source} {opts} mounted something");
    }
    // -f (fake) checks the options and mounts nothing.
    let (got, err) = run(
        "mount",
        &["-f", "-t", "fuse.roomfs", "room:r1", m, "-o", &data],
        &s,
    );
    assert_eq!(got, 0, "{err}");
    assert!(!is_mounted(&mnt));
}

/// (mode, owner, path, link target) of each entry `dpkg-deb -c` lists.
fn deb_contents(deb: &Path) -> Vec<(String, String, String, Option<String>)> {
    let out = output(Command::new("dpkg-deb").arg("-c").arg(deb));
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f[5].trim_start_matches('.').to_owned();
            let target = (f.len() > 7 && f[6] == "->").then(|| f[7].to_owned());
            (f[0].to_owned(), f[1].to_owned(), path, target)
        })
        .collect()
}

#[test]
fn the_debian_package_holds_binary_helper_unit_and_config() {
    let s = Scratch::new();
    let out = output(
        Command::new(format!("{REPO}/scripts/package"))
            .args(["--binary", BIN, "--compress", "gzip", "--out"])
            .arg(s.path("out")),
    );
    assert!(out.status.success(), "{out:?}");
    let deb = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let version = env!("CARGO_PKG_VERSION");
    let arch = output(Command::new("dpkg").arg("--print-architecture")).stdout;
    let arch = String::from_utf8(arch).unwrap();
    assert_eq!(
        deb.file_name().unwrap().to_str().unwrap(),
        format!("roomfs_{version}_{}.deb", arch.trim())
    );
    assert!(deb.is_file());

    let contents = deb_contents(&deb);
    let entry = |path: &str| {
        contents
            .iter()
            .find(|(_, _, p, _)| p == path)
            .unwrap_or_else(|| panic!("{path} is not in the package: {contents:#?}"))
    };
    assert_eq!(entry("/usr/bin/roomfs").0, "-rwxr-xr-x");
    assert_eq!(entry("/lib/systemd/system/roomfs.service").0, "-rw-r--r--");
    assert_eq!(entry("/etc/roomfs/config.json").0, "-rw-r--r--");
    let helper = entry("/sbin/mount.fuse.roomfs");
    assert!(helper.0.starts_with('l'), "{helper:?}");
    assert_eq!(helper.3.as_deref(), Some("/usr/bin/roomfs"));
    assert!(
        contents.iter().all(|(_, owner, _, _)| owner == "root/root"),
        "every file belongs to root: {contents:#?}"
    );
    for (mode, _, path, _) in &contents {
        let writable_by_others = mode.as_bytes()[5] == b'w' || mode.as_bytes()[8] == b'w';
        assert!(
            mode.starts_with('l') || !writable_by_others,
            "{path} is writable by group or others: {mode}"
        );
    }
    let field = |name: &str| {
        let out = output(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(field("Package"), "roomfs");
    assert_eq!(field("Version"), version);
    assert!(field("Depends").contains("libc6"));

    // Control files: the config is a conffile; the maintainer scripts are valid sh, 0755.
    let control = s.path("control");
    assert!(
        output(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control))
            .status
            .success()
    );
    assert_eq!(
        fs::read_to_string(control.join("conffiles")).unwrap(),
        "/etc/roomfs/config.json\n"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let p = control.join(script);
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(
            output(Command::new("sh").arg("-n").arg(&p))
                .status
                .success()
        );
        let text = fs::read_to_string(&p).unwrap();
        assert!(
            !text.contains("/var/lib/roomfs"),
            "{script} leaves the data alone"
        );
    }

    // The unit runs the packaged binary and verifies; the config is one the daemon loads.
    let root = s.path("root");
    assert!(
        output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))
            .status
            .success()
    );
    let unit = fs::read_to_string(root.join("lib/systemd/system/roomfs.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/roomfs serve --config /etc/roomfs/config.json"),
        "{unit}"
    );
    let verify = s.path("roomfs.service");
    fs::write(&verify, unit.replace("/usr/bin/roomfs", BIN)).unwrap();
    let out = output(Command::new("systemd-analyze").arg("verify").arg(&verify));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("roomfs.service"),
        "{err}"
    );
    let config = roomfs::daemon::Config::load(&root.join("etc/roomfs/config.json")).unwrap();
    assert_eq!(config.data_dir, Some(PathBuf::from("/var/lib/roomfs")));
    assert_eq!(
        fs::read(root.join("usr/bin/roomfs")).unwrap(),
        fs::read(BIN).unwrap()
    );
}

#[test]
fn scripts_install_puts_everything_in_place() {
    let s = Scratch::new();
    let root = s.path("root");
    let install = |extra: &[&str]| {
        let out = output(
            Command::new(format!("{REPO}/scripts/install"))
                .args(["--binary", BIN, "--root"])
                .arg(&root)
                .args(extra),
        );
        assert!(out.status.success(), "{out:?}");
    };
    install(&[]);
    let mode = |rel: &str| {
        fs::symlink_metadata(root.join(rel))
            .unwrap_or_else(|e| panic!("{rel}: {e}"))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("usr/local/bin/roomfs"), 0o755);
    assert_eq!(
        fs::read_link(root.join("sbin/mount.fuse.roomfs")).unwrap(),
        PathBuf::from("/usr/local/bin/roomfs")
    );
    assert_eq!(mode("etc/systemd/system/roomfs.service"), 0o644);
    let unit = fs::read_to_string(root.join("etc/systemd/system/roomfs.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/roomfs serve"),
        "{unit}"
    );
    // An operator's config survives a reinstall.
    fs::write(root.join("etc/roomfs/config.json"), r#"{"threads": 8}"#).unwrap();
    install(&["--prefix", "/opt/roomfs"]);
    assert_eq!(
        fs::read_to_string(root.join("etc/roomfs/config.json")).unwrap(),
        r#"{"threads": 8}"#
    );
    assert_eq!(
        fs::read_link(root.join("sbin/mount.fuse.roomfs")).unwrap(),
        PathBuf::from("/opt/roomfs/bin/roomfs")
    );
    let out = output(Command::new(format!("{REPO}/scripts/install")).args(["--prefix", "rel"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be absolute"));
}

/// The fstab lines of doc/OPERATIONS.md, with their mount points under `dir`.
fn documented_fstab(dir: &Path) -> Vec<(String, String, String, String)> {
    let doc = fs::read_to_string(format!("{REPO}/doc/OPERATIONS.md")).unwrap();
    let block = doc
        .split("```text\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .find(|b| b.contains("fuse.roomfs"))
        .expect("doc/OPERATIONS.md shows fstab lines");
    block
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 6, "an fstab line has six fields: {l}");
            let mnt = dir.join(f[1].trim_start_matches('/'));
            fs::create_dir_all(&mnt).unwrap();
            (
                f[0].to_owned(),
                mnt.to_str().unwrap().to_owned(),
                f[2].to_owned(),
                f[3].to_owned(),
            )
        })
        .collect()
}

#[test]
fn the_documented_fstab_lines_are_understood_by_systemd_and_the_helper() {
    let s = Scratch::new();
    let lines = documented_fstab(&s.path("mnt"));
    assert!(lines.len() >= 3, "{lines:?}");
    // systemd's generator turns them into mount units: the daemon's one after roomfs.service,
    // among the remote mounts (`_netdev`), so that there is no ordering cycle.
    let fstab = s.path("fstab");
    let text: String = lines
        .iter()
        .map(|(src, mnt, t, o)| format!("{src} {mnt} {t} {o} 0 0\n"))
        .collect();
    fs::write(&fstab, text).unwrap();
    let generated = s.dir("generated");
    let out = output(
        Command::new("/lib/systemd/system-generators/systemd-fstab-generator")
            .args([&generated, &generated, &generated])
            .env("SYSTEMD_FSTAB", &fstab),
    );
    assert!(out.status.success(), "{out:?}");
    let mut daemon_units = 0;
    for (src, mnt, _, opts) in &lines {
        let escaped =
            output(Command::new("systemd-escape").args(["--path", "--suffix=mount", mnt]));
        let unit_name = String::from_utf8(escaped.stdout).unwrap().trim().to_owned();
        let unit = fs::read_to_string(generated.join(&unit_name)).unwrap();
        assert!(unit.contains("Type=fuse.roomfs"), "{unit}");
        assert!(unit.contains(&format!("What={src}")), "{unit}");
        if opts.contains("x-systemd.requires=roomfs.service") {
            daemon_units += 1;
            assert!(unit.contains("Requires=roomfs.service"), "{unit}");
            assert!(unit.contains("After=roomfs.service"), "{unit}");
            assert!(unit.contains("Before=remote-fs.target"), "_netdev: {unit}");
        }
    }
    assert_eq!(daemon_units, 1);
    // The helper accepts each line's options as mount(8) passes them (x-* removed, rw or ro
    // first); -f checks without mounting.
    let helper_dir = s.dir("sbin");
    let helper = helper_dir.join("mount.fuse.roomfs");
    std::os::unix::fs::symlink(BIN, &helper).unwrap();
    for (src, mnt, _, opts) in &lines {
        let mut passed: Vec<&str> = opts.split(',').filter(|o| !o.starts_with("x-")).collect();
        if !passed.contains(&"ro") {
            passed.insert(0, "rw");
        }
        let out = output(
            Command::new(&helper)
                .args([src, mnt, "-f", "-o", &passed.join(",")])
                .stderr(Stdio::piped()),
        );
        assert!(out.status.success(), "{src} {opts}: {out:?}");
        assert!(!is_mounted(Path::new(mnt)));
    }
}
