//! Whose `close()` commits a handle.
//!
//! FUSE sends a `flush` for every `close()` of every copy of a descriptor, including the copy a
//! child process inherits and closes at `exec` or exit without ever using it. Committing there
//! would publish what a thread of the parent has only half written (a program writing a file in
//! one thread while another thread starts a subprocess). So a handle remembers the threads that
//! opened it or changed the file through it, and a `flush` from a thread of another process
//! that did neither does not commit: the user's own `close()` does, and the last close of all
//! (`release`) always does.
//!
//! FUSE names the caller by its thread id in the daemon's pid namespace; `/proc/<tid>/status`
//! gives the process (thread group) of a thread that is still alive.
//!
//! A handle whose only change is emptying the file (the `O_TRUNC` of its open, or a cut to
//! nothing, with nothing written since) is what a shell's redirect (`cmd > f`) holds when it
//! closes the descriptor it opened, having `dup2`ed it onto the command's stdout: that close is
//! not the end of the writing, and committing there would publish the emptied file for the
//! whole run of the command (and leave it empty if the command never writes). So for such a
//! handle, and only there (it costs a look at `/proc`), a user's close does not commit while
//! its process still has the file open for writing on another descriptor ([`Processes`]: the
//! fds in `/proc/<tid>/fdinfo` with the inode number, write access and `O_APPEND` of the
//! handle, on a roomfs mount), nor when the close is the exit of a process killed by a signal
//! (`/proc/<tid>/stat`): the command killed before it wrote anything leaves the previous
//! version, and the handle remembers it (`FileHandle::abandoned`), so that its last close
//! (`release`) drops the emptying instead of committing it. A `: > f` (open, close) still
//! commits the empty file at its close, and so does a command that ends normally without
//! output. What cannot be told (`/proc` unreadable, a caller not visible) commits, as before.

/// A thread id as FUSE reports the caller (0 when the caller is not visible to the daemon).
pub type Tid = u32;

/// More distinct threads than this and the handle stops telling users from strangers: every
/// close commits again, as without this module.
const MAX_USERS: usize = 8;

/// The threads that opened a handle or changed the file through it.
#[derive(Debug, Default)]
pub struct Users {
    tids: Vec<Tid>,
    /// Some user was not remembered (too many, or not visible to the daemon).
    overflowed: bool,
}

impl Users {
    /// Remembers `tid` as a user of the handle.
    pub fn add(&mut self, tid: Tid) {
        if tid == 0 {
            self.overflowed = true;
        } else if !self.tids.contains(&tid) {
            if self.tids.len() < MAX_USERS {
                self.tids.push(tid);
            } else {
                self.overflowed = true;
            }
        }
    }

    /// Whether a `close()` by thread `tid` comes from a process that neither opened the handle
    /// nor changed the file through it, while a process that did is still running. When that
    /// cannot be told (a thread not visible, every user gone, `/proc` unreadable), the answer
    /// is no: the close commits.
    pub fn stranger(&self, tid: Tid, group_of: impl Fn(Tid) -> Option<u32>) -> bool {
        if tid == 0 || self.overflowed || self.tids.is_empty() || self.tids.contains(&tid) {
            return false;
        }
        let Some(group) = group_of(tid) else {
            return false;
        };
        let mut user_elsewhere = false;
        for &user in &self.tids {
            match group_of(user) {
                Some(g) if g == group => return false,
                Some(_) => user_elsewhere = true,
                None => {}
            }
        }
        user_elsewhere
    }

    /// Whether a thread of the process `pid` (a thread group id) is known to have opened the
    /// handle or changed the file through it (no when that cannot be told).
    pub fn known_process(&self, pid: u32, group_of: impl Fn(Tid) -> Option<u32>) -> bool {
        self.tids
            .iter()
            .any(|&tid| tid == pid || group_of(tid) == Some(pid))
    }

    /// Whether a thread of the process `pid` (a thread group id) opened the handle or changed
    /// the file through it; yes when that cannot be told (too many users to remember).
    pub fn include_process(&self, pid: u32, group_of: impl Fn(Tid) -> Option<u32>) -> bool {
        self.overflowed || self.known_process(pid, group_of)
    }
}

/// The process (thread group id) of thread `tid`, read from `/proc/<tid>/status`; `None` if
/// the thread has ended or is not visible.
pub fn thread_group(tid: Tid) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// What the core asks of the processes closing its handles (see the module docs): the real
/// answers read `/proc`; tests of the core put in their own.
#[derive(Clone, Copy, Debug)]
pub struct Processes {
    /// Whether the process of thread `tid` still has the inode `ino` of the roomfs mount whose
    /// device is `dev` (when known) open for writing (appending, with `true`) on some
    /// descriptor.
    pub holds_writer: fn(tid: Tid, dev: Option<libc::dev_t>, ino: u64, append: bool) -> bool,
    /// Whether thread `tid` is ending because a signal killed its process.
    pub killed: fn(tid: Tid) -> bool,
}

impl Default for Processes {
    fn default() -> Self {
        Processes {
            holds_writer,
            killed,
        }
    }
}

/// The type of filesystem of a roomfs mount, as `/proc/<pid>/mountinfo` lists it.
const MOUNT_TYPE: &str = "fuse.roomfs";

/// Whether the process of thread `tid` has the inode `ino` of the roomfs mount whose device is
/// `dev` open for writing (with `O_APPEND` or without, as `append` says) on a descriptor, as
/// `/proc/<tid>/fdinfo` shows it. The descriptor whose `close()` is being served is already
/// gone from there, and an exiting process shows none (they are all being closed). False when
/// that cannot be read.
///
/// The inode numbers are those of one mount: the descriptor's mount must be this one (its
/// device, which every bind mount of it shares), not another roomfs mount's file with the same
/// number (a process with files open on two mounts; the commit would wait for the last close,
/// `release`, and a `stat` right after the `close()` could show the old size). Without the
/// device (a core not mounted), any roomfs mount counts.
pub fn holds_writer(tid: Tid, dev: Option<libc::dev_t>, ino: u64, append: bool) -> bool {
    holds_writer_on(tid, dev, ino, append, MOUNT_TYPE)
}

/// [`holds_writer`] on a mount of type `fs_type`.
fn holds_writer_on(
    tid: Tid,
    dev: Option<libc::dev_t>,
    ino: u64,
    append: bool,
    fs_type: &str,
) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{tid}/fdinfo")) else {
        return false;
    };
    let mut mounts = Vec::new();
    for fd in fds.flatten() {
        let Ok(info) = std::fs::read_to_string(fd.path()) else {
            continue;
        };
        if let Some(mount) = FdInfo::parse(&info).filter(|f| f.writes(ino, append)) {
            mounts.push(mount.mnt_id);
        }
    }
    if mounts.is_empty() {
        return false;
    }
    // (Bytes: a mount point need not be UTF-8; the ids and types read here are.)
    let Ok(mountinfo) = std::fs::read(format!("/proc/{tid}/mountinfo")) else {
        return false;
    };
    let mountinfo = String::from_utf8_lossy(&mountinfo);
    mounts.iter().any(|&id| match dev {
        Some(dev) => {
            mount_dev(&mountinfo, id) == Some(dev) && mount_type(&mountinfo, id) == Some(fs_type)
        }
        None => mount_type(&mountinfo, id) == Some(fs_type),
    })
}

/// What `/proc/<pid>/fdinfo/<fd>` says of a descriptor.
#[derive(Debug, PartialEq, Eq)]
struct FdInfo {
    flags: i32,
    mnt_id: u64,
    ino: u64,
}

impl FdInfo {
    fn parse(text: &str) -> Option<FdInfo> {
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        Some(FdInfo {
            flags: i32::from_str_radix(field("flags")?, 8).ok()?,
            mnt_id: field("mnt_id")?.parse().ok()?,
            ino: field("ino")?.parse().ok()?,
        })
    }

    /// Whether the descriptor is open for writing on inode `ino`, appending as `append` says.
    fn writes(&self, ino: u64, append: bool) -> bool {
        self.ino == ino
            && self.flags & libc::O_ACCMODE != libc::O_RDONLY
            && (self.flags & libc::O_APPEND != 0) == append
    }
}

/// The type of the mount `id` in the mount table `mountinfo` (`/proc/<pid>/mountinfo`).
fn mount_type(mountinfo: &str, id: u64) -> Option<&str> {
    mountinfo.lines().find_map(|line| {
        let first = line.split_whitespace().next()?;
        if first.parse::<u64>().ok()? != id {
            return None;
        }
        let (_, after) = line.split_once(" - ")?;
        after.split_whitespace().next()
    })
}

/// The device of the mount `id` in the mount table `mountinfo` (its `major:minor`).
fn mount_dev(mountinfo: &str, id: u64) -> Option<libc::dev_t> {
    mountinfo.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        if fields.next()?.parse::<u64>().ok()? != id {
            return None;
        }
        parse_dev(fields.nth(1)?)
    })
}

/// `major:minor` of mountinfo as a device number.
pub fn parse_dev(field: &str) -> Option<libc::dev_t> {
    let (major, minor) = field.split_once(':')?;
    Some(libc::makedev(major.parse().ok()?, minor.parse().ok()?))
}

/// The kernel's flag of a task that is exiting (`PF_EXITING`, include/linux/sched.h).
const PF_EXITING: u64 = 0x4;

/// Whether thread `tid` is exiting because a signal killed its process, from its flags and
/// exit code in `/proc/<tid>/stat` (the code is set before the exit closes the descriptors).
/// False when that cannot be read (the code reads 0 without the right to trace the process).
pub fn killed(tid: Tid) -> bool {
    std::fs::read_to_string(format!("/proc/{tid}/stat"))
        .ok()
        .is_some_and(|stat| killed_by_signal(&stat))
}

/// [`killed`] of the text of a `/proc/<tid>/stat`.
fn killed_by_signal(stat: &str) -> bool {
    // The command name, in parentheses, may hold spaces and parentheses: fields are counted
    // after its last `)`, which is followed by field 3 (the state).
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let (Some(flags), Some(code)) = (field(9), field(52)) else {
        return false;
    };
    flags & PF_EXITING != 0 && code & 0x7f != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn my_tid() -> Tid {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() as Tid }
    }

    #[test]
    fn the_group_of_a_thread_is_its_process() {
        let me = std::process::id();
        let other = std::thread::spawn(my_tid).join().unwrap();
        assert_ne!(other, me);
        // The spawned thread has ended: it has no group any more.
        assert_eq!(thread_group(other), None);
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(my_tid()).unwrap();
            done_rx.recv().unwrap();
        });
        let live = rx.recv().unwrap();
        assert_eq!(thread_group(live), Some(me));
        assert_eq!(thread_group(my_tid()), Some(me));
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn only_a_process_that_never_used_the_handle_is_a_stranger() {
        // Threads 10 and 11 are one process, 20 another, 30 has ended.
        let group_of = |tid: Tid| match tid {
            10 | 11 => Some(10),
            20 => Some(20),
            _ => None,
        };
        let mut users = Users::default();
        users.add(10);
        assert!(!users.stranger(10, group_of), "the opener itself");
        assert!(
            !users.stranger(11, group_of),
            "another thread of the opener"
        );
        assert!(
            users.stranger(20, group_of),
            "a child closing what it inherited"
        );
        assert!(
            !users.stranger(0, group_of),
            "a caller the daemon cannot see"
        );
        assert!(!users.stranger(30, group_of), "a caller that has ended");

        users.add(20);
        assert!(
            !users.stranger(20, group_of),
            "a process that wrote through the handle"
        );

        let mut gone = Users::default();
        gone.add(30);
        assert!(!gone.stranger(20, group_of), "no user left to commit later");

        let mut many = Users::default();
        for tid in 100..100 + MAX_USERS as Tid + 1 {
            many.add(tid);
        }
        assert!(!many.stranger(20, |_| Some(1)), "too many users to tell");
    }

    #[test]
    fn fdinfo_and_mountinfo_are_read_as_the_kernel_writes_them() {
        let info = "pos:\t6\nflags:\t0102001\nmnt_id:\t97\nino:\t42\n";
        let parsed = FdInfo::parse(info).unwrap();
        assert_eq!(
            parsed,
            FdInfo {
                // O_LARGEFILE (0o100000 on x86-64) with write and append.
                flags: 0o100000 | libc::O_WRONLY | libc::O_APPEND,
                mnt_id: 97,
                ino: 42
            }
        );
        assert!(parsed.writes(42, true));
        assert!(!parsed.writes(42, false), "another open, without O_APPEND");
        assert!(!parsed.writes(43, true));
        assert!(FdInfo::parse("pos:\t0\nflags:\t02\n").is_none(), "no inode");
        let table = "24 1 0:22 / /proc rw,nosuid - proc proc rw\n\
                     97 30 0:61 / /mnt/a\\040b rw,nodev shared:5 - fuse.roomfs room rw,user_id=0\n";
        assert_eq!(mount_type(table, 97), Some("fuse.roomfs"));
        assert_eq!(mount_type(table, 24), Some("proc"));
        assert_eq!(mount_type(table, 9), None);
        assert_eq!(mount_dev(table, 97), Some(libc::makedev(0, 61)));
        assert_eq!(mount_dev(table, 24), Some(libc::makedev(0, 22)));
        assert_eq!(mount_dev(table, 9), None);
    }

    #[test]
    fn a_process_holds_a_writer_while_a_descriptor_of_it_is_open() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        let ino = file.metadata().unwrap().ino();
        let fd = file.as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        let mnt_id = FdInfo::parse(&info).unwrap().mnt_id;
        let mountinfo = std::fs::read("/proc/self/mountinfo").unwrap();
        let mountinfo = String::from_utf8_lossy(&mountinfo);
        let fs_type = mount_type(&mountinfo, mnt_id).unwrap().to_string();
        let dev = file.metadata().unwrap().dev();
        let me = my_tid();
        let holds = |dev: Option<libc::dev_t>, append: bool, fs_type: &str| {
            holds_writer_on(me, dev, ino, append, fs_type)
        };
        assert!(holds(None, false, &fs_type));
        assert!(holds(Some(dev), false, &fs_type), "on this mount");
        assert!(!holds(Some(dev + 1), false, &fs_type), "another mount's");
        assert!(!holds(None, true, &fs_type), "not appending");
        assert!(!holds(None, false, "fuse.other"), "another mount");
        assert!(!holds_writer(me, None, ino, false), "not a roomfs mount");
        // A dup of it is the same open file, still held once the first descriptor is closed.
        let dup = file.try_clone().unwrap();
        drop(file);
        assert!(holds(Some(dev), false, &fs_type));
        drop(dup);
        assert!(!holds(Some(dev), false, &fs_type));
        let _reader = std::fs::File::open(&path).unwrap();
        assert!(!holds(Some(dev), false, &fs_type), "a reader");
    }

    /// A child that has ended (`sh -c script`), not yet reaped: its `/proc` entry stays.
    fn ended(script: &str, kill: bool) -> std::process::Child {
        let mut child = std::process::Command::new("sh")
            .args(["-c", script])
            .spawn()
            .unwrap();
        if kill {
            child.kill().unwrap();
        }
        let stat = format!("/proc/{}/stat", child.id());
        for _ in 0..500 {
            let state = std::fs::read_to_string(&stat).unwrap();
            if state
                .rsplit_once(')')
                .unwrap()
                .1
                .trim_start()
                .starts_with('Z')
            {
                return child;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the child did not end");
    }

    #[test]
    fn a_process_killed_by_a_signal_is_told_from_one_that_exits() {
        let mut killed_child = ended("sleep 30", true);
        let mut exited = ended("exit 3", false);
        let mut running = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert!(killed(killed_child.id()));
        assert!(!killed(exited.id()), "a normal exit, even a failing one");
        assert!(!killed(running.id()), "alive");
        assert!(!killed(my_tid()));
        running.kill().unwrap();
        for child in [&mut killed_child, &mut exited, &mut running] {
            child.wait().unwrap();
        }
        assert!(!killed(exited.id()), "gone");
        // Fields 3 to 52 after the name; flags (9) 0x400104 have PF_EXITING, the exit code (52)
        // is SIGKILL's.
        let mut fields = vec!["0"; 50];
        fields[0] = "R";
        fields[9 - 3] = "4194564";
        fields[52 - 3] = "9";
        let stat = format!("12 (a) b) c) {}\n", fields.join(" "));
        assert!(killed_by_signal(&stat));
        fields[52 - 3] = "256";
        assert!(!killed_by_signal(&format!("12 (a) {}\n", fields.join(" "))));
    }
}
