//! The daemon's life: start-up errors, clean unmounts, signals, and crashes.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use common::{BIN, Mounted, is_mounted};

fn roomfs(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_mount_arguments_give_one_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data = data.to_str().unwrap();
    let file = tmp.path().join("file");
    fs::write(&file, b"").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["mount", "--data-dir", data, "--room", "r", "/nonexistent/x"],
            "does not exist",
        ),
        (
            vec![
                "mount",
                "--data-dir",
                data,
                "--room",
                "r",
                file.to_str().unwrap(),
            ],
            "is not a directory",
        ),
        (
            vec!["mount", "--data-dir", data, "--room", "../x", "/tmp"],
            "invalid room id",
        ),
        (vec!["mount", "--data-dir", data, "/tmp"], "--room"),
        (
            vec![
                "mount",
                "--data-dir",
                data,
                "--room",
                "a",
                "--session",
                "b",
                "/tmp",
            ],
            "cannot be used with",
        ),
        (vec!["mount", "--bogus", "/tmp"], "unexpected argument"),
        (
            vec![
                "mount",
                "--data-dir",
                data,
                "--room",
                "r",
                "--threads",
                "0",
                "/tmp",
            ],
            "--threads",
        ),
        (vec!["unmount", "/tmp"], "not a mount point"),
        (
            vec![
                "mount",
                "--data-dir",
                data,
                "--room",
                "r",
                tmp.path().to_str().unwrap(),
            ],
            "must not contain each other",
        ),
        (vec!["unmount", "/proc"], "not a roomfs mount"),
    ];
    for (args, want) in cases {
        let (code, err) = roomfs(&args);
        assert_ne!(code, 0, "{args:?} should fail");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err:?}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
    }
}

#[test]
fn a_mount_point_in_use_is_refused() {
    let m = Mounted::room();
    let (code, err) = roomfs(&[
        "mount",
        "--data-dir",
        m.data.to_str().unwrap(),
        "--room",
        "other",
        m.mnt.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("already in use"), "{err}");
    // The first mount is unaffected.
    fs::write(m.p("still"), b"works").unwrap();
}

#[test]
fn a_data_dir_inside_a_roomfs_mount_is_refused() {
    let m = Mounted::room();
    let other = tempfile::tempdir().unwrap();
    let inside = m.mnt.join("nested/data");
    let outside = other.path().join("mnt");
    fs::create_dir(&outside).unwrap();
    for args in [
        vec!["mount", "--room", "r2", outside.to_str().unwrap()],
        vec![
            "serve",
            "--socket",
            other.path().join("sock").to_str().unwrap(),
        ],
    ] {
        let mut all = vec![args[0], "--data-dir", inside.to_str().unwrap()];
        all.extend_from_slice(&args[1..]);
        let (code, err) = roomfs(&all);
        assert_eq!(code, 1, "{all:?}: {err}");
        assert!(
            err.contains(&format!(
                "the data dir {} is inside the roomfs mount {}",
                inside.display(),
                m.mnt.display()
            )),
            "{all:?}: {err}"
        );
        assert!(!m.p("nested").exists(), "nothing made in the mount");
        assert!(!is_mounted(&outside));
    }
}

#[test]
fn roomfs_unmount_ends_the_daemon_cleanly() {
    let mut m = Mounted::room();
    fs::write(m.p("kept"), b"data").unwrap();
    let status = m.unmount();
    assert!(status.success());
    assert!(!is_mounted(&m.mnt));
    assert_eq!(fs::read(m.backing("kept")).unwrap(), b"data");
    // The data is plain files; the next mount shows it again.
    m.start();
    assert_eq!(fs::read(m.p("kept")).unwrap(), b"data");
}

#[test]
fn sigterm_and_sigint_commit_and_unmount() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut m = Mounted::room();
        fs::write(m.p("f"), b"committed").unwrap();
        let (status, stderr) = m.signal_and_wait(sig);
        assert!(
            status.success(),
            "exit after signal {sig}: {status} {stderr}"
        );
        assert!(!is_mounted(&m.mnt), "nothing stays mounted");
        assert_eq!(fs::read(m.backing("f")).unwrap(), b"committed");
    }
}

#[test]
fn sigterm_with_open_files_commits_them_and_detaches() {
    let m = Mounted::room();
    let mut f = File::create(m.p("open")).unwrap();
    f.write_all(b"pending data").unwrap();
    let pid = m.pid();
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    // The mount goes away even though a file is open, and the pending write is committed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while is_mounted(&m.mnt) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!is_mounted(&m.mnt));
    assert_eq!(fs::read(m.backing("open")).unwrap(), b"pending data");
    drop(f);
}

#[test]
fn kill_9_never_leaves_a_partial_file_and_the_next_mount_recovers() {
    let mut m = Mounted::room();
    fs::write(m.p("doc"), b"version one").unwrap();
    let mut f = File::create(m.p("doc")).unwrap();
    f.write_all(&vec![b'x'; 3 << 20]).unwrap();
    m.crash();
    drop(f); // the dead mount answers ENOTCONN; nothing is committed
    assert_eq!(fs::read(m.backing("doc")).unwrap(), b"version one");
    let staging = m.data.join(".staging");
    // Files in each instance directory (its `spread-N` subdirectories hold nothing by name).
    let files = |dir: &Path| {
        fs::read_dir(dir)
            .unwrap()
            .filter(|e| !e.as_ref().unwrap().file_type().unwrap().is_dir())
            .count()
    };
    let leftovers: usize = fs::read_dir(&staging)
        .unwrap()
        .map(|d| files(&d.unwrap().path()))
        .sum();
    assert!(
        leftovers >= 2,
        "the crash left its working copy (and lock) behind"
    );
    // The next mount clears the dead mount point and the stale working copies by itself.
    m.start();
    assert_eq!(fs::read(m.p("doc")).unwrap(), b"version one");
    let dirs: Vec<_> = fs::read_dir(&staging).unwrap().collect();
    assert_eq!(dirs.len(), 1, "only the live daemon's staging remains");
    let live = dirs.into_iter().next().unwrap().unwrap().path();
    assert_eq!(files(&live), 1, "just its lock file");
}

/// Runs the Python loop `code` against the mount (its path in `$MNT`), kills the daemon with
/// SIGKILL while the loop runs, and waits for the loop to fail and exit. The loop calls
/// `going()` after its first pass; the kill comes 300 ms after that, so it always hits a loop
/// that is under way, however slow the machine is.
fn crash_while_running(m: &mut Mounted, code: &str) {
    use std::io::BufRead;
    let code = format!("def going():\n    print('going', flush=True)\n{code}");
    let mut writer = Command::new("python3")
        .arg("-c")
        .arg(code)
        .env("MNT", &m.mnt)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = writer.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let first = rx.recv_timeout(std::time::Duration::from_secs(60));
    if first.as_deref().map(str::trim) != Ok("going") {
        let _ = writer.kill();
        let _ = writer.wait();
        panic!("the loop never completed a pass: {first:?}");
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    m.crash();
    let _ = writer.wait();
}

#[test]
fn kill_9_during_many_commits_leaves_only_whole_versions() {
    let mut m = Mounted::room();
    let code = r#"
import os
p = os.environ['MNT'] + '/f'
i = 0
while True:
    with open(p, 'wb') as f:
        f.write(str(i).encode() * 10000)
    if i == 0:
        going()
    i += 1
"#;
    crash_while_running(&mut m, code);
    let data = fs::read(m.backing("f")).unwrap();
    assert!(!data.is_empty(), "a committed version exists");
    let text = String::from_utf8(data).unwrap();
    let unit_len = text.len() / 10000;
    let unit = &text[..unit_len];
    assert_eq!(
        text,
        unit.repeat(10000),
        "the committed file is one whole version"
    );
}

#[test]
fn kill_9_during_many_appends_leaves_only_whole_appends() {
    let mut m = Mounted::room();
    let code = r#"
import os
p = os.environ['MNT'] + '/log'
i = 0
while True:
    with open(p, 'a') as f:
        f.write(f'line {i:08d} ' + 'x' * (i % 3000) + '\n')
    if i == 0:
        going()
    i += 1
"#;
    crash_while_running(&mut m, code);
    // The next start undoes an append the crash interrupted (if it hit one), then every line
    // of the file is a whole append, in order.
    m.start();
    let text = String::from_utf8(fs::read(m.p("log")).unwrap()).unwrap();
    assert!(text.ends_with('\n'), "no partial last line");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() > 10,
        "the writer got going ({} lines)",
        lines.len()
    );
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(*line, format!("line {i:08} {}", "x".repeat(i % 3000)));
    }
}

#[test]
fn kill_9_during_many_new_files_leaves_each_empty_or_whole() {
    // New files written once (`open(path, 'wb')`) are committed by adding their bytes to the
    // empty file in place (up to 128 KiB; larger ones through a working copy; up to a page,
    // without a crash marker): a crash in the middle leaves each file as created (empty) or
    // whole, in the data dir after the next start and through the mount.
    let mut m = Mounted::room();
    let units = |i: usize| 1 + (i * 7919) % if i.is_multiple_of(2) { 512 } else { 19000 };
    let code = r#"
import os
d = os.environ['MNT']
i = 0
while True:
    data = (b'%08d' % i) * (1 + (i * 7919) % (512 if i % 2 == 0 else 19000))
    with open(f'{d}/f{i}', 'wb') as f:
        f.write(data)
    if i == 0:
        going()
    i += 1
"#;
    crash_while_running(&mut m, code);
    m.start();
    let mut whole = 0;
    for entry in fs::read_dir(m.backing("")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let i: usize = name[1..].parse().unwrap();
        let expected = format!("{i:08}").repeat(units(i));
        for data in [
            fs::read(m.backing(&name)).unwrap(),
            fs::read(m.p(&name)).unwrap(),
        ] {
            assert!(
                data.is_empty() || data == expected.as_bytes(),
                "{name} is neither empty nor whole ({} bytes)",
                data.len()
            );
        }
        whole += usize::from(fs::metadata(m.p(&name)).unwrap().len() > 0);
    }
    assert!(whole > 10, "the writer got going ({whole} files)");
}

#[test]
fn an_append_cut_short_by_a_crash_is_undone_at_the_next_start() {
    // What a daemon killed in the middle of an in-place append leaves: its staging directory
    // (lock not held) with a marker linked to the file, and part of the tail written.
    let m = Mounted::with_setup(&["--room", "r1"], |data| {
        let room = data.join("rooms/r1");
        fs::create_dir_all(&room).unwrap();
        fs::write(room.join("log"), b"kept\n").unwrap();
        let meta = fs::metadata(room.join("log")).unwrap();
        let stale = data.join(".staging/4000000-1");
        fs::create_dir_all(&stale).unwrap();
        fs::write(stale.join("lock"), b"").unwrap();
        let marker = format!("append-5-17-{}.{}-0", meta.mtime(), meta.mtime_nsec());
        fs::hard_link(room.join("log"), stale.join(marker)).unwrap();
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(room.join("log"))
            .unwrap();
        f.write_all(b"half a").unwrap();
    });
    assert_eq!(fs::read(m.p("log")).unwrap(), b"kept\n");
    let meta = fs::metadata(m.backing("log")).unwrap();
    assert_eq!(meta.nlink(), 1, "the marker went with the stale staging");
    // And appending works again, in place.
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.p("log"))
        .unwrap();
    f.write_all(b"next\n").unwrap();
    drop(f);
    assert_eq!(fs::read(m.backing("log")).unwrap(), b"kept\nnext\n");
    assert_eq!(fs::metadata(m.backing("log")).unwrap().ino(), meta.ino());
}

#[test]
fn kill_9_during_many_patches_leaves_only_whole_versions() {
    let mut m = Mounted::room();
    fs::write(m.p("db"), vec![b'-'; 4608 << 10]).unwrap();
    let code = r#"
import os
p = os.environ['MNT'] + '/db'
i = 0
while True:
    fd = os.open(p, os.O_RDWR)
    for k in range(8):
        os.pwrite(fd, b'%08d' % i * 512, (k * 140 + 3) * 4096)
    os.close(fd)
    if i == 0:
        going()
    i += 1
"#;
    crash_while_running(&mut m, code);
    // The next start finishes a patch the crash interrupted (if it hit one): all eight blocks
    // are then of one version, the rest of the file is untouched.
    m.start();
    let data = fs::read(m.p("db")).unwrap();
    assert_eq!(data.len(), 4608 << 10);
    let block = |k: usize| &data[(k * 140 + 3) * 4096..(k * 140 + 4) * 4096];
    let version = block(0)[..8].to_vec();
    assert!(version != b"--------", "the writer got going");
    let whole = version.repeat(512);
    for k in 0..8 {
        assert!(block(k) == whole, "block {k} is of the same version");
    }
    let dashes = data
        .iter()
        .enumerate()
        .filter(|&(at, _)| !(0..8).any(|k| (at / 4096) == k * 140 + 3))
        .all(|(_, &b)| b == b'-');
    assert!(dashes, "the bytes nobody wrote are untouched");
}

#[test]
fn a_patch_cut_short_by_a_crash_is_finished_at_the_next_start() {
    // What a daemon killed in the middle of a patch commit leaves: its staging directory (lock
    // not held) with the working copy and the file linked as markers, and part of the patch
    // written.
    let len: usize = 4 << 20;
    let m = Mounted::with_setup(&["--room", "r1"], |data| {
        let room = data.join("rooms/r1");
        fs::create_dir_all(&room).unwrap();
        fs::write(room.join("db"), vec![b'o'; len]).unwrap();
        let stale = data.join(".staging/4000000-2");
        fs::create_dir_all(&stale).unwrap();
        fs::write(stale.join("lock"), b"").unwrap();
        // The working copy: sparse, with the two blocks written and a tail.
        let work = fs::File::create(stale.join("w0")).unwrap();
        work.set_len(len as u64).unwrap();
        work.write_all_at(&[b'n'; 4096], 8192).unwrap();
        work.write_all_at(&[b'n'; 4096], 3 << 20).unwrap();
        work.write_all_at(b"tail", len as u64).unwrap();
        let marker = stale.join(format!("patch-{len}-{}-0", len + 4));
        fs::hard_link(
            stale.join("w0"),
            stale.join(format!("patch-{len}-{}-0.data", len + 4)),
        )
        .unwrap();
        fs::hard_link(room.join("db"), marker).unwrap();
        // The crash came after the first block.
        let f = fs::OpenOptions::new()
            .write(true)
            .open(room.join("db"))
            .unwrap();
        f.write_all_at(&[b'n'; 4096], 8192).unwrap();
    });
    let data = fs::read(m.p("db")).unwrap();
    let mut expect = vec![b'o'; len];
    expect[8192..12288].fill(b'n');
    expect[3 << 20..(3 << 20) + 4096].fill(b'n');
    expect.extend_from_slice(b"tail");
    assert!(data == expect, "the interrupted patch was finished");
    assert_eq!(fs::metadata(m.backing("db")).unwrap().nlink(), 1);
}

#[test]
fn kill_9_during_commits_of_a_linked_file_keeps_every_name_one_whole_version() {
    let mut m = Mounted::room();
    fs::write(m.p("a"), b"x").unwrap();
    fs::hard_link(m.p("a"), m.p("b")).unwrap();
    let code = r#"
import os
names = [os.environ['MNT'] + '/a', os.environ['MNT'] + '/b']
i = 0
while True:
    with open(names[i % 2], 'wb') as f:
        f.write(str(i).encode() * (1000 + 37 * (i % 50)))
    if i == 0:
        going()
    i += 1
"#;
    crash_while_running(&mut m, code);
    // The next start finishes a rewrite the crash cut short.
    m.start();
    let (a, b) = (
        fs::metadata(m.backing("a")).unwrap(),
        fs::metadata(m.backing("b")).unwrap(),
    );
    assert_eq!(
        (a.ino(), a.nlink()),
        (b.ino(), 2),
        "still one file under both names"
    );
    let text = String::from_utf8(fs::read(m.p("b")).unwrap()).unwrap();
    // One whole version: version i is str(i) repeated 1000 + 37 * (i % 50) times.
    let whole = (1..=7).any(|k| {
        let Some(Ok(i)) = text.get(..k).map(str::parse::<usize>) else {
            return false;
        };
        text == i.to_string().repeat(1000 + 37 * (i % 50))
    });
    assert!(whole, "a torn version of {} bytes", text.len());
    assert_eq!(fs::read(m.p("a")).unwrap(), text.as_bytes());
}

#[test]
fn a_rewrite_of_a_linked_file_cut_short_by_a_crash_is_finished_at_the_next_start() {
    // What a daemon killed in the middle of rewriting a file with two names leaves: its
    // staging directory (lock not held) with the working copy and the file linked as markers,
    // and part of the new content written over the old.
    let m = Mounted::with_setup(&["--room", "r1"], |data| {
        let room = data.join("rooms/r1");
        fs::create_dir_all(&room).unwrap();
        fs::write(room.join("a"), vec![b'o'; 20000]).unwrap();
        fs::hard_link(room.join("a"), room.join("b")).unwrap();
        let stale = data.join(".staging/4000000-3");
        fs::create_dir_all(&stale).unwrap();
        fs::write(stale.join("lock"), b"").unwrap();
        fs::write(stale.join("w0"), vec![b'n'; 12000]).unwrap();
        fs::hard_link(stale.join("w0"), stale.join("rewrite-12000-0.data")).unwrap();
        fs::hard_link(room.join("a"), stale.join("rewrite-12000-0")).unwrap();
        // The crash came after the first 8 KiB.
        let f = fs::OpenOptions::new()
            .write(true)
            .open(room.join("a"))
            .unwrap();
        f.write_all_at(&[b'n'; 8192], 0).unwrap();
    });
    assert_eq!(fs::read(m.p("b")).unwrap(), vec![b'n'; 12000]);
    assert_eq!(fs::read(m.p("a")).unwrap(), vec![b'n'; 12000]);
    assert_eq!(
        fs::metadata(m.backing("a")).unwrap().nlink(),
        2,
        "markers gone"
    );
}

#[test]
fn sync_on_close_mounts_work() {
    let m = Mounted::with_args(&["--room", "durable", "--sync-on-close"]);
    fs::write(m.p("f"), b"durable").unwrap();
    assert_eq!(fs::read(m.backing("f")).unwrap(), b"durable");
}

#[test]
fn sessions_live_under_sessions() {
    let m = Mounted::with_args(&["--session", "s-1"]);
    fs::write(m.p("out.txt"), b"x").unwrap();
    assert!(m.data.join("sessions/s-1/out.txt").exists());
}

#[test]
fn unmount_of_a_busy_mount_says_so_and_lazy_detaches() {
    let mut m = Mounted::room();
    let f = File::create(m.p("held")).unwrap();
    let (code, err) = roomfs(&["unmount", m.mnt.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("busy"), "{err}");
    assert!(is_mounted(&m.mnt), "still mounted after a refused unmount");
    let (code, err) = roomfs(&["unmount", "--lazy", m.mnt.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(!is_mounted(&m.mnt));
    drop(f);
    let status = m.child.take().unwrap().wait().unwrap();
    assert!(status.success());
    assert!(m.backing("held").exists());
}

/// A directory above the mount point renamed (by whoever owns it) takes the mount along:
/// SIGTERM still commits and unmounts it where it is now, rather than finding nothing at the
/// old path and serving on.
#[test]
fn sigterm_unmounts_a_mount_whose_parent_directory_was_renamed() {
    use std::time::{Duration, Instant};
    let tmp = tempfile::Builder::new()
        .prefix("roomfs-test-")
        .tempdir_in("/tmp")
        .unwrap();
    let (data, work) = (tmp.path().join("data"), tmp.path().join("work"));
    fs::create_dir_all(work.join("mnt")).unwrap();
    let mut child = Command::new(BIN)
        .args(["mount", "--data-dir"])
        .arg(&data)
        .args(["--room", "r1"])
        .arg(work.join("mnt"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let until = |what: &str, check: &mut dyn FnMut() -> bool| {
        let start = Instant::now();
        while !check() {
            if start.elapsed() > Duration::from_secs(10) {
                return Err(format!("{what}: not after 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    let moved = tmp.path().join("work2/mnt");
    let result = until("mounted", &mut || is_mounted(&work.join("mnt"))).and_then(|()| {
        fs::write(work.join("mnt/f"), b"committed").unwrap();
        fs::rename(&work, tmp.path().join("work2")).unwrap();
        if !is_mounted(&moved) {
            return Err(format!(
                "not mounted at {} after the rename",
                moved.display()
            ));
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        until("exited", &mut || child.try_wait().unwrap().is_some())
    });
    let left = is_mounted(&moved);
    if result.is_err() || left {
        let _ = Command::new("umount").arg("-l").arg(&moved).status();
        let _ = child.kill();
        let _ = child.wait();
    }
    result.unwrap();
    assert!(!left, "still mounted at {}", moved.display());
    assert_eq!(fs::read(data.join("rooms/r1/f")).unwrap(), b"committed");
}
