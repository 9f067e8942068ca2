//! Grants through a real mount: every way around them is tried, and each attempt must fail with
//! the exact errno and leave the data dir unchanged.

mod common;

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{Mounted, cstr, errno, python};

const GRANT: &[&str] = &[
    "--room",
    "r1",
    "--grant",
    "inputs/:ro",
    "--grant",
    "outputs/:rw",
    "--grant",
    "shared/deep/:rw",
    "--grant",
    "outputs/frozen/:ro",
];

fn populate(data: &Path) {
    let root = data.join("rooms/r1");
    for dir in [
        "inputs/sub",
        "outputs/frozen",
        "Inputs",
        "outputs-private",
        "shared/deep",
        "shared/other",
    ] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    for (file, body) in [
        ("inputs/a.csv", "region,sales\n"),
        ("inputs/sub/b.txt", "b"),
        ("outputs/frozen/f.txt", "frozen"),
        ("secret.txt", "top secret"),
        ("Inputs/x", "case"),
        ("outputs-private/y", "private"),
        ("shared/deep/z", "z"),
        ("shared/other/w", "w"),
    ] {
        fs::write(root.join(file), body).unwrap();
    }
}

fn mounted() -> Mounted {
    Mounted::with_setup(GRANT, populate)
}

/// Asserts that `attempt` fails with `want` and that the space is unchanged afterwards.
fn refused<T: std::fmt::Debug>(
    m: &Mounted,
    what: &str,
    want: i32,
    attempt: impl FnOnce() -> std::io::Result<T>,
) {
    let before = m.committed_snapshot();
    let got = errno(attempt());
    assert_eq!(got, want, "{what}: expected errno {want}, got {got}");
    assert_eq!(before, m.committed_snapshot(), "{what}: the space changed");
}

fn last_errno(ret: libc::c_int) -> std::io::Result<libc::c_int> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[test]
fn listings_show_only_what_leads_to_granted_paths() {
    let m = mounted();
    let names = |rel: &str| {
        let mut v: Vec<String> = fs::read_dir(m.p(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(""), ["inputs", "outputs", "shared"]);
    assert_eq!(names("shared"), ["deep"]);
    assert_eq!(names("inputs"), ["a.csv", "sub"]);
    let walked = python(
        &m.mnt,
        "import os\nfor d, ds, fs in sorted(os.walk(os.environ['MNT'])):\n  \
         [print(os.path.relpath(os.path.join(d, f), os.environ['MNT'])) for f in sorted(fs)]",
    );
    assert_eq!(
        walked.lines().collect::<Vec<_>>(),
        [
            "inputs/a.csv",
            "inputs/sub/b.txt",
            "outputs/frozen/f.txt",
            "shared/deep/z"
        ]
    );
    let found = std::process::Command::new("find")
        .arg(".")
        .current_dir(&m.mnt)
        .output()
        .unwrap();
    let found = String::from_utf8_lossy(&found.stdout);
    assert!(
        !found.contains("secret") && !found.contains("other") && !found.contains("private"),
        "{found}"
    );
}

#[test]
fn paths_outside_the_grant_are_eacces() {
    let m = mounted();
    refused(&m, "stat", libc::EACCES, || fs::metadata(m.p("secret.txt")));
    refused(&m, "read", libc::EACCES, || fs::read(m.p("secret.txt")));
    refused(&m, "stat missing", libc::EACCES, || {
        fs::metadata(m.p("nothing-here"))
    });
    refused(&m, "create at root", libc::EACCES, || {
        fs::write(m.p("new.txt"), b"x")
    });
    refused(&m, "mkdir at root", libc::EACCES, || {
        fs::create_dir(m.p("newdir"))
    });
    refused(&m, "unlink outside", libc::EACCES, || {
        fs::remove_file(m.p("secret.txt"))
    });
    refused(&m, "segment prefix", libc::EACCES, || {
        fs::read(m.p("outputs-private/y"))
    });
    refused(&m, "case trick", libc::EACCES, || fs::read(m.p("Inputs/x")));
    refused(&m, "sibling of deep grant", libc::EACCES, || {
        fs::read_dir(m.p("shared/other"))
    });
    refused(&m, "dotdot", libc::EACCES, || {
        fs::read(m.p("inputs/../secret.txt"))
    });
    refused(&m, "dotdot from deep", libc::EACCES, || {
        fs::read(m.p("shared/deep/../other/w"))
    });
    // Ancestors of a grant are traversable but have no content to write.
    refused(&m, "rmdir ancestor", libc::EACCES, || {
        fs::remove_dir(m.p("shared"))
    });
    refused(&m, "chmod ancestor", libc::EACCES, || {
        fs::set_permissions(m.p("shared"), fs::Permissions::from_mode(0o777))
    });
    refused(&m, "create in ancestor", libc::EACCES, || {
        fs::write(m.p("shared/x"), b"x")
    });
    // The log is read from the daemon's stderr by another thread: give it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !m.log().contains("denied") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        m.log().contains("denied"),
        "refusals are logged: {}",
        m.log()
    );
}

#[test]
fn read_only_prefixes_refuse_every_write() {
    let m = mounted();
    assert_eq!(fs::read(m.p("inputs/a.csv")).unwrap(), b"region,sales\n");
    let a = m.p("inputs/a.csv");
    refused(&m, "open for write", libc::EACCES, || {
        OpenOptions::new().write(true).open(&a)
    });
    refused(&m, "O_TRUNC", libc::EACCES, || File::create(&a));
    refused(&m, "append", libc::EACCES, || {
        OpenOptions::new().append(true).open(&a)
    });
    refused(&m, "create", libc::EACCES, || {
        fs::write(m.p("inputs/new"), b"x")
    });
    refused(&m, "mkdir", libc::EACCES, || {
        fs::create_dir(m.p("inputs/newdir"))
    });
    refused(&m, "mkdir trailing slash", libc::EACCES, || {
        fs::create_dir(m.p("inputs/new2/"))
    });
    refused(&m, "unlink", libc::EACCES, || fs::remove_file(&a));
    refused(&m, "rmdir", libc::EACCES, || {
        fs::remove_dir(m.p("inputs/sub"))
    });
    refused(&m, "truncate by path", libc::EACCES, || {
        last_errno(unsafe { libc::truncate(cstr(&a).as_ptr(), 0) })
    });
    refused(&m, "chmod", libc::EACCES, || {
        fs::set_permissions(&a, fs::Permissions::from_mode(0o777))
    });
    refused(&m, "utimens", libc::EACCES, || {
        last_errno(unsafe {
            libc::utimensat(libc::AT_FDCWD, cstr(&a).as_ptr(), std::ptr::null(), 0)
        })
    });
    refused(&m, "symlink", libc::EACCES, || {
        std::os::unix::fs::symlink("a.csv", m.p("inputs/l"))
    });
    refused(&m, "setxattr", libc::EACCES, || {
        last_errno(unsafe {
            libc::setxattr(
                cstr(&a).as_ptr(),
                c"user.x".as_ptr(),
                b"1".as_ptr().cast(),
                1,
                0,
            )
        })
    });
    // A read-only prefix nested in a writable one wins for its subtree.
    refused(&m, "nested ro", libc::EACCES, || {
        fs::write(m.p("outputs/frozen/f.txt"), b"x")
    });
    refused(&m, "nested ro create", libc::EACCES, || {
        fs::write(m.p("outputs/frozen/g"), b"x")
    });
}

#[test]
fn writable_prefixes_work_fully() {
    let m = mounted();
    fs::create_dir(m.p("outputs/run1")).unwrap();
    fs::write(m.p("outputs/run1/report.md"), b"# report").unwrap();
    fs::rename(m.p("outputs/run1/report.md"), m.p("outputs/report.md")).unwrap();
    std::os::unix::fs::symlink("report.md", m.p("outputs/latest")).unwrap();
    assert_eq!(fs::read(m.p("outputs/latest")).unwrap(), b"# report");
    fs::write(m.p("shared/deep/new"), b"ok").unwrap();
    assert_eq!(m.committed("outputs/report.md"), b"# report");
    let p = cstr(&m.p("outputs/report.md"));
    let r = unsafe { libc::setxattr(p.as_ptr(), c"user.x".as_ptr(), b"1".as_ptr().cast(), 1, 0) };
    if m.is_s3() {
        // The S3 store keeps no extended attributes (by design): refused, not denied.
        assert_eq!(r, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EOPNOTSUPP)
        );
    } else {
        assert_eq!(r, 0, "extended attributes under a read-write prefix");
    }
}

#[test]
fn renames_and_links_cannot_move_data_across_the_grant() {
    let m = mounted();
    fs::write(m.p("outputs/mine"), b"mine").unwrap();
    refused(&m, "rename out of ro", libc::EACCES, || {
        fs::rename(m.p("inputs/a.csv"), m.p("outputs/a.csv"))
    });
    refused(&m, "rename into ro", libc::EACCES, || {
        fs::rename(m.p("outputs/mine"), m.p("inputs/mine"))
    });
    refused(&m, "rename over ro file", libc::EACCES, || {
        fs::rename(m.p("outputs/mine"), m.p("inputs/a.csv"))
    });
    refused(&m, "rename to outside", libc::EACCES, || {
        fs::rename(m.p("outputs/mine"), m.p("stolen"))
    });
    refused(&m, "rename granted dir away", libc::EACCES, || {
        fs::rename(m.p("outputs"), m.p("o2"))
    });
    refused(&m, "replace granted dir", libc::EACCES, || {
        fs::create_dir(m.p("outputs/fake")).and_then(|_| fs::remove_dir(m.p("outputs/fake")))?;
        fs::rename(m.p("outputs/frozen"), m.p("outputs/thawed"))
    });
    // Moving a writable directory that holds a read-only grant would carry it along.
    refused(&m, "move dir holding a ro grant", libc::EACCES, || {
        fs::rename(m.p("outputs"), m.p("shared/deep/o"))
    });
    refused(&m, "link across prefixes", libc::EACCES, || {
        fs::hard_link(m.p("inputs/a.csv"), m.p("outputs/a"))
    });
    refused(&m, "link out", libc::EACCES, || {
        fs::hard_link(m.p("outputs/mine"), m.p("inputs/m"))
    });
    // A link between two writable prefixes would carry the file across the grant (on S3 no
    // link is ever made: EPERM, by design).
    let across = if m.is_s3() { libc::EPERM } else { libc::EXDEV };
    refused(&m, "link across rw prefixes", across, || {
        fs::hard_link(m.p("outputs/mine"), m.p("shared/deep/m"))
    });
    refused(&m, "link into a ro sub-prefix", libc::EACCES, || {
        fs::hard_link(m.p("outputs/mine"), m.p("outputs/frozen/m"))
    });
    let (a, b) = (cstr(&m.p("outputs/mine")), cstr(&m.p("inputs/a.csv")));
    refused(&m, "exchange with ro", libc::EACCES, || {
        last_errno(unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        })
    });
}

#[test]
fn symlinks_cannot_point_out_of_the_grant() {
    let m = mounted();
    let link = |target: &str, at: &str| std::os::unix::fs::symlink(target, m.p(at));
    refused(&m, "absolute target", libc::EACCES, || {
        link("/etc/passwd", "outputs/l1")
    });
    refused(&m, "escaping the space", libc::EACCES, || {
        link("../../../etc/passwd", "outputs/l2")
    });
    refused(&m, "into a secret", libc::EACCES, || {
        link("../secret.txt", "outputs/l3")
    });
    link("../inputs/a.csv", "outputs/ok").unwrap();
    assert_eq!(fs::read(m.p("outputs/ok")).unwrap(), b"region,sales\n");
    // A `..` after a name: a link on the way (`up -> ..`) climbs higher than the text says.
    fs::create_dir(m.p("outputs/sub")).unwrap();
    link("..", "outputs/sub/up").unwrap();
    refused(&m, "climbing through a link", libc::EACCES, || {
        link("sub/up/sub/up/../../../../etc/hostname", "outputs/esc")
    });
    refused(&m, "a .. after a name", libc::EACCES, || {
        link("sub/../ok", "outputs/l4")
    });
    // A link to a directory above the grant (the root), through which a second link, all
    // names, would lead out (`up2/secret.txt`).
    refused(&m, "above the grant", libc::EACCES, || {
        link("..", "outputs/up2")
    });
    // A link planted in the store behind the mount's back is not followed out of the grant.
    match &m.s3 {
        Some(b) => {
            let mode = (libc::S_IFLNK | 0o777).to_string();
            b.put_with(
                &m.key("outputs/planted"),
                b"/etc/hostname",
                &[("mode", &mode)],
            );
            b.put_with(
                &m.key("outputs/planted2"),
                b"../secret.txt",
                &[("mode", &mode)],
            );
            b.put_with(
                &m.key("outputs/planted3"),
                b"sub/up/sub/up/../../../../etc/hostname",
                &[("mode", &mode)],
            );
            // By design, a store shared by hosts shows what others wrote once what the mount
            // learnt of the directory is older than its TTL (1 s): close-to-open.
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
        None => {
            std::os::unix::fs::symlink("/etc/hostname", m.backing("outputs/planted")).unwrap();
            std::os::unix::fs::symlink("../secret.txt", m.backing("outputs/planted2")).unwrap();
            std::os::unix::fs::symlink(
                "sub/up/sub/up/../../../../etc/hostname",
                m.backing("outputs/planted3"),
            )
            .unwrap();
        }
    }
    assert_eq!(errno(fs::read(m.p("outputs/planted"))), libc::EACCES);
    assert_eq!(errno(fs::read_link(m.p("outputs/planted"))), libc::EACCES);
    assert_eq!(errno(fs::read(m.p("outputs/planted2"))), libc::EACCES);
    assert_eq!(errno(fs::read(m.p("outputs/planted3"))), libc::EACCES);
}

/// A relative symlink is read from where it is: moved (itself, or in a directory moved) or
/// hard-linked elsewhere, a link allowed where it was made could lead out of the grant. Each
/// such move is refused as making the link there would be.
#[test]
fn moving_or_linking_a_symlink_cannot_make_it_lead_out_of_the_grant() {
    let m = mounted();
    let link = |target: &str, at: &str| std::os::unix::fs::symlink(target, m.p(at));
    fs::create_dir_all(m.p("outputs/sub/deeper")).unwrap();
    fs::create_dir_all(m.p("outputs/d/e/f")).unwrap();
    // Allowed where made: each leads to `outputs`.
    link("..", "outputs/sub/up").unwrap();
    link("../../..", "outputs/d/e/f/out").unwrap();
    refused(&m, "a link moved up", libc::EACCES, || {
        fs::rename(m.p("outputs/sub/up"), m.p("outputs/up"))
    });
    refused(
        &m,
        "a directory moved up with its link",
        libc::EACCES,
        || fs::rename(m.p("outputs/d/e/f"), m.p("outputs/f")),
    );
    // Hard links: where the store keeps them, checked as a new link at the new name.
    let want = if m.is_s3() { libc::EPERM } else { libc::EACCES };
    refused(&m, "a link hard-linked higher", want, || {
        fs::hard_link(m.p("outputs/sub/up"), m.p("outputs/up"))
    });
    // Moves that keep each link inside the grant go through.
    fs::rename(m.p("outputs/sub/up"), m.p("outputs/sub/deeper/up")).unwrap();
    assert_eq!(
        fs::read_link(m.p("outputs/sub/deeper/up")).unwrap(),
        Path::new("..")
    );
    fs::rename(m.p("outputs/d"), m.p("outputs/sub/d")).unwrap();
    assert!(m.p("outputs/sub/d/e/f/out").symlink_metadata().is_ok());
}

#[test]
fn directory_fds_and_openat_stay_inside() {
    let m = mounted();
    let root = File::open(&m.mnt).unwrap();
    let inputs = File::open(m.p("inputs")).unwrap();
    use std::os::fd::AsRawFd;
    let openat = |dir: &File, name: &std::ffi::CStr, flags: i32| {
        last_errno(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, 0o644) })
    };
    refused(&m, "openat secret", libc::EACCES, || {
        openat(&root, c"secret.txt", libc::O_RDONLY)
    });
    refused(&m, "openat dotdot", libc::EACCES, || {
        openat(&inputs, c"../secret.txt", libc::O_RDONLY)
    });
    refused(&m, "openat create", libc::EACCES, || {
        openat(&inputs, c"x", libc::O_CREAT | libc::O_WRONLY)
    });
    refused(&m, "openat dir write", libc::EACCES, || {
        openat(&root, c"new", libc::O_CREAT | libc::O_WRONLY | libc::O_EXCL)
    });
    let fd = openat(&inputs, c"a.csv", libc::O_RDONLY).unwrap();
    unsafe { libc::close(fd) };
}

#[test]
fn odd_names_are_judged_by_their_bytes() {
    let m = mounted();
    let odd = OsStr::from_bytes(b"bad\xffname\n");
    if m.is_s3() {
        // S3 keys are UTF-8: the S3 store refuses other names (EINVAL).
        assert_eq!(
            errno(fs::write(m.p("outputs").join(odd), b"bytes")),
            libc::EINVAL
        );
    } else {
        fs::write(m.p("outputs").join(odd), b"bytes").unwrap();
        assert_eq!(fs::read(m.backing("outputs").join(odd)).unwrap(), b"bytes");
    }
    refused(&m, "odd name in ro", libc::EACCES, || {
        fs::write(m.p("inputs").join(odd), b"x")
    });
    refused(&m, "odd name outside", libc::EACCES, || {
        fs::write(m.mnt.join(odd), b"x")
    });
    let long = "l".repeat(300);
    refused(&m, "very long name", libc::ENAMETOOLONG, || {
        fs::write(m.p("outputs").join(&long), b"x")
    });
    refused(&m, "trailing slash on file", libc::ENOTDIR, || {
        fs::read(m.p("inputs/a.csv/"))
    });
}

#[test]
fn no_storage_grant_sees_nothing() {
    let m = Mounted::with_setup(
        &["--room", "r1", "--grant", "nothing-granted/:ro"],
        populate,
    );
    assert_eq!(fs::read_dir(&m.mnt).unwrap().count(), 0);
    refused(&m, "read", libc::EACCES, || fs::read(m.p("secret.txt")));
    refused(&m, "write", libc::EACCES, || fs::write(m.p("x"), b"x"));
    // statfs of the mount point still answers (df works).
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(cstr(&m.mnt).as_ptr(), &mut s) }, 0);
}

#[test]
fn bad_grant_specs_are_refused_before_mounting() {
    for (spec, want) in [("inputs/:rx", "ro"), ("../up:ro", ".."), ("a/../b", "..")] {
        let tmp = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(common::BIN)
            .args(["mount", "--data-dir"])
            .arg(tmp.path())
            .args(["--room", "r1", "--grant", spec])
            .arg(tmp.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{spec}: {err}");
        assert!(
            err.contains("--grant") && err.contains(want),
            "{spec}: {err}"
        );
        assert!(!common::is_mounted(tmp.path()));
    }
    let _ = Write::flush(&mut std::io::stdout());
}
