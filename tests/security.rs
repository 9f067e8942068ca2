//! The attack list: what a participant who can write into a room or a session (a full-access
//! mount may make any symlink) tries against the root daemon's own work on disk — session
//! export, session deletion, space creation. After every attack, a snapshot check: nothing
//! outside the data dir changed, and nothing from outside was read into a space.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::is_mounted;

/// What a tree looks like: each entry's kind, size, mode, mtime, and content or link target.
type Snapshot = BTreeMap<PathBuf, String>;

fn snapshot(root: &Path) -> Snapshot {
    let mut out = Snapshot::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            // Entries may come and go while a test races the daemon: what is gone is skipped.
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            let what = if m.file_type().is_symlink() {
                format!("link {:?}", fs::read_link(&p).unwrap_or_default())
            } else if m.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if m.is_file() {
                format!("file {:?}", fs::read(&p).unwrap_or_default())
            } else {
                format!("other {:o}", m.mode())
            };
            let key = p.strip_prefix(root).unwrap().to_path_buf();
            out.insert(
                key,
                format!(
                    "{what} mode {:o} mtime {}.{}",
                    m.mode(),
                    m.mtime(),
                    m.mtime_nsec()
                ),
            );
        }
    }
    out
}

/// A host directory outside the data dir that attacks aim at, with a secret in it.
struct Host {
    dir: PathBuf,
    secret: String,
    before: Snapshot,
}

impl Host {
    fn new(d: &Daemon) -> Host {
        let dir = d.tmp.path().join("host");
        fs::create_dir_all(dir.join("etc/cron.d")).unwrap();
        let secret = format!("TOP-SECRET-{}-{}", std::process::id(), nanos());
        fs::write(dir.join("etc/shadow"), &secret).unwrap();
        fs::write(dir.join("etc/cron.d/existing"), b"* * * * * root true\n").unwrap();
        let before = snapshot(&dir);
        Host {
            dir,
            secret,
            before,
        }
    }

    /// Nothing outside the data dir changed, and the secret was read into no space.
    fn check(&self, d: &Daemon, attack: &str) {
        let after = snapshot(&self.dir);
        assert_eq!(after, self.before, "{attack}: the host directory changed");
        for (path, what) in snapshot(&d.data) {
            assert!(
                !what.contains(&self.secret)
                    && !what.contains(&format!("{:?}", self.secret.as_bytes())),
                "{attack}: the secret was read into {}",
                path.display()
            );
        }
        for name in ["cron-job", "outputs", "pwned"] {
            assert!(
                fs::symlink_metadata(Path::new("/").join(name)).is_err(),
                "{attack}: /{name} was written"
            );
        }
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Creates session `id`, mounts it and returns its mount point.
fn session(d: &Daemon, id: &str) -> PathBuf {
    d.json(&["session", "create", id, "--json"]);
    let mnt = d.dir(&format!("mnt-{id}"));
    d.mount(&["--session", id], &mnt);
    mnt
}

/// Mounts room `id` with full access and returns its mount point.
fn room(d: &Daemon, id: &str) -> PathBuf {
    let mnt = d.dir(&format!("mnt-{id}"));
    d.mount(&["--room", id], &mnt);
    mnt
}

/// `roomfs session end ID --export PATH --to-room ROOM`: (exit code, stderr).
fn end_with_export(d: &Daemon, id: &str, path: &str, room: &str) -> (i32, String) {
    let (code, _, err) = d.cli(&["session", "end", id, "--export", path, "--to-room", room]);
    (code, err)
}

#[test]
fn the_reported_attack_a_room_symlink_to_a_host_dir_is_refused() {
    let d = Daemon::start();
    let host = Host::new(&d);
    // A full-access mount of room r2 makes `outputs` a link to a host directory.
    let r2 = room(&d, "r2");
    symlink(host.dir.join("etc/cron.d"), r2.join("outputs")).unwrap();
    // Session s2 writes outputs/cron-job.
    let s2 = session(&d, "s2");
    fs::create_dir(s2.join("outputs")).unwrap();
    fs::write(s2.join("outputs/cron-job"), b"* * * * * root sh -c pwned\n").unwrap();
    let (code, err) = end_with_export(&d, "s2", "outputs/", "r2");
    assert_eq!(code, 1, "the export is refused: {err}");
    assert!(
        err.contains("outputs") && err.contains("symlink") && err.contains("nothing was exported"),
        "one clear message naming the path: {err}"
    );
    host.check(&d, "room symlink to a host dir");
    // Nothing is lost: the session and its files are still there to export elsewhere.
    assert_eq!(
        fs::read(d.data.join("sessions/s2/outputs/cron-job")).unwrap(),
        b"* * * * * root sh -c pwned\n"
    );
    let (code, err) = end_with_export(&d, "s2", "outputs/", "r3");
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        fs::read(d.data.join("rooms/r3/outputs/cron-job")).unwrap(),
        b"* * * * * root sh -c pwned\n"
    );
    host.check(&d, "export to another room");
}

#[test]
fn links_at_every_component_of_the_room_side_refuse_the_export() {
    let d = Daemon::start();
    let host = Host::new(&d);
    let r = room(&d, "r");
    fs::create_dir_all(r.join("keep/deep")).unwrap();
    // (room path, link target): directory and file links, absolute, relative, `..`, `/`.
    let attacks: Vec<(&str, PathBuf)> = vec![
        ("a", host.dir.join("etc")),
        ("keep/b", host.dir.join("etc")),
        ("keep/deep/c", host.dir.join("etc")),
        ("d", PathBuf::from("/")),
        ("e", PathBuf::from("../../../../../../../../..")),
        ("keep/f", PathBuf::from("../../../../../../../../../tmp")),
        ("keep/deep/g.txt", host.dir.join("etc/shadow")),
        ("h.txt", PathBuf::from("/etc/passwd")),
    ];
    for (i, (at, target)) in attacks.iter().enumerate() {
        symlink(target, r.join(at)).unwrap();
        let id = format!("s{i}");
        let s = session(&d, &id);
        // The session has real directories and files where the room has links: as the
        // exported path, and at each component above and below it.
        let export = if at.ends_with(".txt") {
            fs::create_dir_all(s.join(at).parent().unwrap()).unwrap();
            fs::write(s.join(at), b"payload").unwrap();
            at.to_string()
        } else {
            fs::create_dir_all(s.join(at).join("sub")).unwrap();
            fs::write(s.join(at).join("sub/cron-job"), b"payload").unwrap();
            format!("{at}/sub")
        };
        let room_before = snapshot(&d.data.join("rooms/r"));
        let (code, err) = end_with_export(&d, &id, &export, "r");
        assert_eq!(code, 1, "link at {at}: the export is refused ({err})");
        assert!(
            err.contains(at.rsplit('/').next().unwrap()) && err.contains("symlink"),
            "link at {at}: the message names the path: {err}"
        );
        assert_eq!(
            snapshot(&d.data.join("rooms/r")),
            room_before,
            "link at {at}: nothing was written into the room"
        );
        host.check(&d, &format!("room link at {at}"));
        // The session is kept, untouched.
        assert!(d.data.join("sessions").join(&id).join(at).exists());
    }
}

#[test]
fn links_in_the_session_are_exported_as_links_never_followed() {
    let d = Daemon::start();
    let host = Host::new(&d);
    let s = session(&d, "s1");
    fs::create_dir_all(s.join("outputs/real")).unwrap();
    fs::write(s.join("outputs/real/report.md"), b"# report").unwrap();
    // Directory and file links, absolute, relative, to `/`, climbing out with `..`.
    symlink(host.dir.join("etc"), s.join("outputs/dir-link")).unwrap();
    symlink(host.dir.join("etc/shadow"), s.join("outputs/file-link")).unwrap();
    symlink("/", s.join("outputs/root")).unwrap();
    symlink("../../../../../../../..", s.join("outputs/up")).unwrap();
    symlink("real/report.md", s.join("outputs/inner")).unwrap();
    let (code, err) = end_with_export(&d, "s1", "outputs", "r");
    assert_eq!(code, 0, "{err}");
    let out = d.data.join("rooms/r/outputs");
    assert_eq!(fs::read(out.join("real/report.md")).unwrap(), b"# report");
    for (name, target) in [
        ("dir-link", host.dir.join("etc")),
        ("file-link", host.dir.join("etc/shadow")),
        ("root", PathBuf::from("/")),
        ("up", PathBuf::from("../../../../../../../..")),
        ("inner", PathBuf::from("real/report.md")),
    ] {
        let m = fs::symlink_metadata(out.join(name)).unwrap();
        assert!(m.file_type().is_symlink(), "{name} exported as a link");
        assert_eq!(fs::read_link(out.join(name)).unwrap(), target);
    }
    host.check(&d, "session links");

    // A link above the exported path in the session: refused, nothing written.
    let s = session(&d, "s2");
    symlink(host.dir.join("etc"), s.join("outputs")).unwrap();
    let (code, err) = end_with_export(&d, "s2", "outputs/cron.d", "r2");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("symlink"), "{err}");
    assert!(!d.data.join("rooms/r2/outputs").exists());
    // The exported path itself a link to a host directory: exported as that link.
    let (code, err) = end_with_export(&d, "s2", "outputs", "r2");
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        fs::read_link(d.data.join("rooms/r2/outputs")).unwrap(),
        host.dir.join("etc")
    );
    host.check(&d, "session link above the exported path");
}

#[test]
fn a_fifo_in_the_exported_tree_does_not_hang_the_daemon() {
    let d = Daemon::start();
    let host = Host::new(&d);
    let s = session(&d, "s1");
    fs::create_dir(s.join("outputs")).unwrap();
    fs::write(s.join("outputs/a.txt"), b"a").unwrap();
    let fifo = common::cstr(&s.join("outputs/pipe"));
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let started = Instant::now();
    let (code, err) = end_with_export(&d, "s1", "outputs", "r");
    assert_eq!(code, 0, "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let pipe = fs::symlink_metadata(d.data.join("rooms/r/outputs/pipe")).unwrap();
    assert!(pipe.file_type().is_fifo(), "exported as a FIFO's name");
    assert_eq!(
        fs::read(d.data.join("rooms/r/outputs/a.txt")).unwrap(),
        b"a"
    );
    // The daemon still answers.
    d.json(&["status", "--json"]);
    host.check(&d, "FIFO in the exported tree");
}

#[test]
fn a_session_directory_replaced_by_a_link_is_never_followed() {
    let d = Daemon::start();
    let host = Host::new(&d);
    d.json(&["session", "create", "s1", "--json"]);
    let dir = d.data.join("sessions/s1");
    fs::write(dir.join("mine"), b"mine").unwrap();
    // Behind the daemon's back: sessions/s1 becomes a link to the host's /etc.
    fs::rename(&dir, d.data.join("sessions/.moved")).unwrap();
    symlink(host.dir.join("etc"), &dir).unwrap();
    // Mounting it is refused with a clear message.
    let mnt = d.dir("mnt");
    let (code, _, err) = d.cli(&[
        "mount",
        "--daemon",
        "--session",
        "s1",
        mnt.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a directory"), "{err}");
    assert!(!is_mounted(&mnt));
    // Exporting from it is refused before anything is written.
    let (code, err) = end_with_export(&d, "s1", "shadow", "r");
    assert_eq!(code, 1, "{err}");
    assert!(!d.data.join("rooms/r/shadow").exists());
    host.check(&d, "session dir replaced by a link, export");
    // Ending it removes the link only, not what it points at.
    let (code, _, err) = d.cli(&["session", "end", "s1"]);
    assert_eq!(code, 0, "{err}");
    assert!(fs::symlink_metadata(&dir).is_err(), "the link is gone");
    host.check(&d, "session dir replaced by a link, end");
    // The same for a room directory: refused, and the host stays as it was.
    fs::create_dir_all(d.data.join("rooms")).unwrap();
    symlink(host.dir.join("etc"), d.data.join("rooms/r")).unwrap();
    let (code, _, err) = d.cli(&["mount", "--daemon", "--room", "r", mnt.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    host.check(&d, "room dir replaced by a link");
}

#[test]
fn a_link_swapped_in_while_the_export_runs_never_leads_out() {
    let d = Daemon::start();
    let host = Host::new(&d);
    let r = room(&d, "r");
    fs::create_dir_all(r.join("outputs/deep")).unwrap();
    let room_dir = d.data.join("rooms/r/outputs");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Held by the flipper while the link is in place, and by the checks: a snapshot taken
    // while it was there would itself read the secret through it.
    let flipping = std::sync::Arc::new(std::sync::Mutex::new(()));
    // Behind the daemon's back, `outputs/deep` flips between a real directory and a link
    // to the host's /etc, over and over.
    let flipper = {
        let (stop, room_dir, target) = (stop.clone(), room_dir.clone(), host.dir.join("etc"));
        let flipping = flipping.clone();
        std::thread::spawn(move || {
            let (real, link, tmp) = (
                room_dir.join("deep"),
                room_dir.join(".link"),
                room_dir.join(".real"),
            );
            let _ = symlink(&target, &link);
            let mut flips = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // real -> .real, link -> deep; then back.
                let _flip = flipping.lock().unwrap();
                if fs::rename(&real, &tmp).is_ok() {
                    let _ = fs::rename(&link, &real);
                    std::thread::sleep(Duration::from_micros(300));
                    let _ = fs::rename(&real, &link);
                    let _ = fs::rename(&tmp, &real);
                    flips += 1;
                }
                drop(_flip);
                // Mostly a real directory, so that exports get past their checks and meet
                // the link while they write.
                std::thread::sleep(Duration::from_micros(4000 + (flips % 7) * 1000));
            }
            flips
        })
    };
    let mut outcomes = (0, 0, 0);
    for i in 0..24 {
        let id = format!("s{i}");
        let s = session(&d, &id);
        fs::create_dir_all(s.join("outputs/deep/sub")).unwrap();
        for f in 0..20 {
            fs::write(s.join(format!("outputs/deep/sub/cron-job-{f}")), b"payload").unwrap();
            fs::write(s.join(format!("outputs/deep/f{f}")), b"payload").unwrap();
        }
        let (code, err) = end_with_export(&d, &id, "outputs", "r");
        match code {
            0 => outcomes.0 += 1,
            _ if err.contains("nothing was exported") => outcomes.1 += 1,
            _ => outcomes.2 += 1, // stopped while writing
        }
        let _still = flipping.lock().unwrap();
        host.check(&d, &format!("link swapped in during export {i}"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flips = flipper.join().unwrap();
    assert!(flips > 0, "the link was swapped in while exports ran");
    eprintln!(
        "exports: {} went through, {} refused before writing, {} stopped while writing",
        outcomes.0, outcomes.1, outcomes.2
    );
    host.check(&d, "link swapped in during export");
}

#[test]
fn the_operators_links_to_the_data_and_records_dirs_are_followed_and_nothing_below_them() {
    // The operator's choice: the data dir and the records dir are links to where they live.
    let d = Daemon::with_setup(Some(r#"{"records_dir": "{tmp}/records"}"#), |tmp| {
        for (real, link) in [("real-data", "data"), ("real-records", "records")] {
            fs::create_dir(tmp.join(real)).unwrap();
            symlink(tmp.join(real), tmp.join(link)).unwrap();
        }
    });
    let host = Host::new(&d);
    let real = d.tmp.path().join("real-data");
    let r = room(&d, "r");
    fs::write(r.join("notes.txt"), b"kept").unwrap();
    assert_eq!(fs::read(real.join("rooms/r/notes.txt")).unwrap(), b"kept");
    let s = session(&d, "s1");
    fs::create_dir(s.join("outputs")).unwrap();
    fs::write(s.join("outputs/report.md"), b"done").unwrap();
    d.call(serde_json::json!({
        "method": "session.set",
        "id": "s1",
        "value": {"id": "s1", "createdAt": 1, "updatedAt": 1}
    }));
    assert!(
        d.tmp.path().join("real-records/session/s1.json").is_file(),
        "records are written through the operator's link"
    );
    // Below them, links are never followed: a room directory replaced by one is refused.
    let outside = host.dir.join("etc");
    symlink(&outside, real.join("rooms/planted")).unwrap();
    let mnt = d.dir("planted-mnt");
    let (code, _, err) = d.cli(&[
        "mount",
        "--daemon",
        "--room",
        "planted",
        mnt.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(!is_mounted(&mnt));
    // An export still goes into the real room, beneath the link.
    let (code, err) = end_with_export(&d, "s1", "outputs/", "r");
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        fs::read(real.join("rooms/r/outputs/report.md")).unwrap(),
        b"done"
    );
    assert_eq!(fs::read(r.join("outputs/report.md")).unwrap(), b"done");
    host.check(&d, "data and records dirs behind the operator's links");
}

/// Whoever owns a directory on the way to a mount point added through the API (an agent's
/// home) swaps the mount point for a symlink while the daemon is stopped: the restarted
/// daemon does not mount over the link's target, and says why.
#[test]
fn a_mount_point_swapped_for_a_symlink_is_not_restored_over_its_target() {
    let mut d = Daemon::start();
    let home = d.dir("home");
    let work = home.join("work");
    fs::create_dir(&work).unwrap();
    let victim = d.dir("victim");
    fs::write(victim.join("config"), b"operator's").unwrap();
    d.mount(&["--room", "r2"], &work);
    d.stop();
    fs::rename(&work, home.join("work.old")).unwrap();
    symlink(&victim, &work).unwrap();
    d.run();
    assert!(!is_mounted(&victim));
    assert_eq!(fs::read(victim.join("config")).unwrap(), b"operator's");
    let log = d.log();
    assert!(log.contains("a symlink in the way"), "{log}");
    assert_eq!(d.json(&["mounts", "--json"]), serde_json::json!([]));
}

/// Another user's symlink on the way to a mount point (an agent's home, where the operator
/// mounts its session) never has the root daemon mount over, or make directories in, the
/// directory it names: the API mount, and configured mounts at every start, are refused with
/// what to name instead. Root's own symlinks in root's directories are followed.
#[test]
fn an_agents_symlink_on_the_way_to_a_mount_point_is_not_followed() {
    const AGENT: u32 = 65534;
    // In the daemon's directory, so that it unmounts whatever a failure left mounted there.
    let config = r#"{"mounts": [{"mountpoint": "{tmp}/t/home/work", "room": "r1"},
                                {"mountpoint": "{tmp}/t/home/new/sub", "room": "r1"}]}"#;
    let d = Daemon::with_setup(Some(config), |tmp| {
        let t = tmp.join("t");
        for d in ["home", "victim", "victim2"] {
            fs::create_dir_all(t.join(d)).unwrap();
        }
        fs::write(t.join("victim/config"), b"operator's").unwrap();
        std::os::unix::fs::chown(t.join("home"), Some(AGENT), Some(AGENT)).unwrap();
        // The agent's links: one to a directory, one to where a configured mount makes its
        // directory.
        for (name, to) in [("work", "victim"), ("new", "victim2")] {
            symlink(t.join(to), t.join("home").join(name)).unwrap();
            std::os::unix::fs::lchown(t.join("home").join(name), Some(AGENT), Some(AGENT)).unwrap();
        }
    });
    let t = d.tmp.path().join("t");
    let (home, victim, victim2) = (t.join("home"), t.join("victim"), t.join("victim2"));
    let before = snapshot(&t);
    let (code, _, err) = d.cli(&[
        "mount",
        "--daemon",
        "--room",
        "r2",
        &format!("{}/work", home.display()),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("goes through the symlink") && err.contains("/home/work"),
        "{err}"
    );
    // And through the API, whatever the client resolved.
    let out = common::output(
        std::process::Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&d.socket)
            .args(["-X", "POST", "-d"])
            .arg(format!(
                r#"{{"mountpoint": "{}/work", "room": "r2"}}"#,
                home.display()
            ))
            .arg("http://roomfs/v1/mounts"),
    );
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(answer.ends_with("\n400"), "{answer}");
    assert!(answer.contains("goes through the symlink"), "{answer}");
    assert!(!is_mounted(&victim) && !is_mounted(&victim2.join("sub")));
    assert!(
        !victim2.join("sub").exists(),
        "no directory made through the link"
    );
    let log = d.log();
    for configured in ["work", "new/sub"] {
        let line = format!(
            "cannot create mount point {}/{configured}: it goes through the symlink",
            home.display()
        );
        assert!(log.contains(&line), "{line}\n{log}");
    }
    assert_eq!(snapshot(&t), before, "nothing changed outside");
    assert_eq!(d.json(&["mounts", "--json"]), serde_json::json!([]));
    // Root's link in a directory only root can change is followed.
    let real = d.dir("real");
    symlink(&real, d.tmp.path().join("link")).unwrap();
    d.mount(&["--room", "r2"], &d.tmp.path().join("link"));
    assert!(is_mounted(&real));
}

/// Unmounts `path` when dropped (a test's own tmpfs), whatever the test did.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
}

/// The daemon unmounts only through real directories, and only the mount it made: a symlink
/// swapped onto the path by whoever owns a directory on it (between the daemon finding where
/// its mount is and unmounting it), or another mount at the path, is never unmounted or
/// detached.
#[test]
fn an_unmount_never_goes_through_a_symlink_nor_takes_another_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let victim = tmp.path().join("victim/mnt");
    fs::create_dir_all(&victim).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "roomfs-test"])
        .arg(&victim)
        .status()
        .unwrap();
    assert!(status.success());
    let guard = Tmpfs(victim.clone());
    let dev = fs::metadata(&victim).unwrap().dev();
    symlink(tmp.path().join("victim"), tmp.path().join("home")).unwrap();
    let through_link = tmp.path().join("home/mnt");
    for lazy in [false, true] {
        let err = roomfs::mount::unmount(&through_link, dev, lazy).unwrap_err();
        assert!(
            format!("{err:#}").contains("a symlink is in the way"),
            "{err:#}"
        );
        assert!(is_mounted(&victim));
        // Another mount at a real path: not the one named.
        let err = roomfs::mount::unmount(&victim, dev ^ 1, lazy).unwrap_err();
        assert!(
            format!("{err:#}").contains("not the one to unmount"),
            "{err:#}"
        );
        assert!(is_mounted(&victim));
    }
    roomfs::mount::unmount(&victim, dev, false).unwrap();
    assert!(!is_mounted(&victim));
    drop(guard);
}

/// `roomfs unmount` and the mount helper (what mount(8) and fstab run), as root, follow only
/// root's own symlinks to a mount point: an agent's link on the way (in its home) neither has
/// root unmount another mount nor mount a space over the directory the link leads to.
#[test]
fn unmount_and_the_mount_helper_follow_no_agents_symlink() {
    const AGENT: u32 = 65534;
    let d = Daemon::start();
    let t = d.dir("t");
    let (home, victim) = (t.join("home"), t.join("victim"));
    fs::create_dir_all(victim.join("r1")).unwrap();
    fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(AGENT), Some(AGENT)).unwrap();
    // The operator's mount of another room.
    d.mount(&["--room", "r1"], &victim.join("r1"));
    // The agent's link, in its home, to where that mount is.
    symlink(&victim, home.join("D")).unwrap();
    std::os::unix::fs::lchown(home.join("D"), Some(AGENT), Some(AGENT)).unwrap();
    let through = home.join("D/r1");
    let (code, _, err) = d.cli(&["unmount", through.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("goes through the symlink"), "{err}");
    assert!(is_mounted(&victim.join("r1")));
    // The daemon's API, asked for the same path, says why too.
    let out = std::process::Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(&d.socket)
        .args(["-H", "content-type: application/json", "-d"])
        .arg(serde_json::json!({"mountpoint": through.to_str().unwrap()}).to_string())
        .arg("http://roomfs/v1/mounts/remove")
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.ends_with("\n400"), "{body}");
    assert!(body.contains("goes through the symlink"), "{body}");
    assert!(is_mounted(&victim.join("r1")));
    // The mount helper asked to mount at `home/D` (leading to root's directory): refused.
    let helper = t.join("mount.fuse.roomfs");
    symlink(common::BIN, &helper).unwrap();
    let out = std::process::Command::new(&helper)
        .arg("room:r2")
        .arg(home.join("D"))
        .arg("-o")
        .arg(format!("daemon,socket={}", d.socket.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("goes through the symlink"), "{err}");
    assert!(!is_mounted(&victim));
    // Named through root's own path, it is unmounted.
    let (code, _, err) = d.cli(&["unmount", victim.join("r1").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(!is_mounted(&victim.join("r1")));
}
