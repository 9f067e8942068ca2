//! The mount helper: `mount -t fuse.roomfs room:r1 /srv/r1 -o data_dir=/var/lib/roomfs` and
//! `/etc/fstab` lines.
//!
//! How mount(8) gets here: for type `fuse.roomfs`, libmount runs `/sbin/mount.fuse.roomfs`
//! (installed as a link to the roomfs binary; without it, fuse3's generic `mount.fuse` would be
//! used) as `mount.fuse.roomfs SOURCE MOUNTPOINT [-sfnv] -o OPTIONS`, where OPTIONS always
//! holds `rw` or `ro` and what the user gave, minus `x-*`, `noauto` and `defaults`. It waits
//! for the helper to exit and reports its exit status. So the helper must come back once the
//! mount exists, while the mount goes on being served:
//!
//! - with `daemon` (or `socket=PATH`), the running `roomfs serve` is asked to serve the mount
//!   over its control socket, as `roomfs mount --daemon` does: one process for all mounts,
//!   with its metrics and sessions. `umount` ends the mount and the daemon forgets it.
//! - otherwise a `roomfs mount` is started in the background in its own session; it tells the
//!   helper over a pipe that the mount is up (or why it failed), and exits by itself when the
//!   mount is unmounted (`umount`, `systemctl stop`), committing open files first.
//!
//! The choice is the operator's, not guessed: a mount meant for the daemon never silently
//! runs elsewhere with other settings.
//!
//! Exit statuses follow mount(8): 1 for a bad invocation or option, 32 when mounting failed.
//! Errors are one line on stderr.

use anyhow::{Context, anyhow};
use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::control::client::Client;
use crate::control::{DEFAULT_SOCKET, MountRequest};
use crate::space::{SpaceId, SpaceKind};

/// Names the binary answers to as a mount helper (`/sbin/mount.fuse.roomfs`).
pub const HELPER_NAMES: [&str; 1] = ["mount.fuse.roomfs"];

/// The environment variable naming the pipe a background `roomfs mount` reports on.
pub const READY_FD_ENV: &str = "ROOMFS_READY_FD";

/// Exit status for a bad invocation (mount(8)'s "incorrect invocation or permissions").
const EXIT_USAGE: i32 = 1;
/// Exit status for a mount that failed.
const EXIT_MOUNT_FAILED: i32 = 32;

/// Whether the program was started as the mount helper.
pub fn is_helper(argv0: &std::ffi::OsStr) -> bool {
    let name = Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    HELPER_NAMES.contains(&name)
}

/// What mount(8) passed.
#[derive(Debug, PartialEq)]
struct Invocation {
    source: String,
    mountpoint: PathBuf,
    options: Vec<String>,
    /// `-f`: check everything, mount nothing.
    fake: bool,
    /// `-s`: ignore options roomfs does not know.
    sloppy: bool,
    verbose: bool,
}

/// Arguments are bytes: the mount point may be any; the source and options must be text.
fn parse_invocation(args: &[OsString]) -> anyhow::Result<Invocation> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let (mut fake, mut sloppy, mut verbose) = (false, false, false);
    fn text<'a>(arg: &'a OsString, what: &str) -> anyhow::Result<&'a str> {
        arg.to_str()
            .ok_or_else(|| anyhow!("{what} {arg:?} is not UTF-8 text"))
    }
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        // Only a flag's text matters here; other arguments are checked below.
        match arg.to_str().unwrap_or("") {
            "-o" => {
                let opts = it
                    .next()
                    .ok_or_else(|| anyhow!("-o needs a list of options"))?;
                let opts = text(opts, "the options")?;
                options.extend(opts.split(',').filter(|o| !o.is_empty()).map(str::to_owned));
            }
            "-t" => {
                let t = it.next().ok_or_else(|| anyhow!("-t needs a type"))?;
                let t = text(t, "the type")?;
                if t != "fuse.roomfs" {
                    return Err(anyhow!("this helper mounts fuse.roomfs, not {t}"));
                }
            }
            "-f" => fake = true,
            "-s" => sloppy = true,
            "-v" => verbose = true,
            "-n" => {} // no mtab: roomfs writes none
            "-N" => {
                return Err(anyhow!(
                    "mounting in another namespace (-N) is not supported"
                ));
            }
            _ if arg.as_encoded_bytes().starts_with(b"-") && arg.len() > 1 => {
                return Err(anyhow!("unknown flag {arg:?}"));
            }
            _ => positional.push(arg.clone()),
        }
    }
    let [source, mountpoint] = <[OsString; 2]>::try_from(positional).map_err(|p| {
        anyhow!(
            "expected SOURCE and MOUNTPOINT (as in `mount -t fuse.roomfs room:ID /mnt`), got {} \
             arguments",
            p.len()
        )
    })?;
    Ok(Invocation {
        source: text(&source, "the source")?.to_owned(),
        mountpoint: PathBuf::from(mountpoint),
        options,
        fake,
        sloppy,
        verbose,
    })
}

/// Who serves the mount.
#[derive(Debug, PartialEq)]
enum Server {
    /// A `roomfs mount` in the background, with these `roomfs mount` flags.
    Background {
        flags: Vec<OsString>,
        /// Where its log goes (else: the helper's stderr if that is the journal or a file).
        log: Option<PathBuf>,
    },
    /// The running daemon at this socket.
    Daemon { socket: PathBuf },
}

/// A mount as the options describe it.
#[derive(Debug, PartialEq)]
struct Plan {
    space: SpaceId,
    grants: Vec<String>,
    read_only: bool,
    /// `noexec`: nothing in the mount can be executed.
    no_exec: bool,
    sync_on_close: bool,
    passthrough: bool,
    /// Who the mount's changes are made by, in events.
    label: Option<String>,
    /// Where the space is stored (`local`, `s3://bucket/prefix`); default: the server's.
    store: Option<String>,
    server: Server,
}

/// Options mount(8) or the user may give that mean nothing to roomfs, and are ignored as every
/// filesystem ignores them: scheduling (`auto`, `_netdev`, `nofail`), who may mount (`user`;
/// mount(8) adds `noexec,nosuid,nodev` for it, and `noexec` is honoured) and flags roomfs
/// mounts always have or that cost nothing to accept (`nodev`, `nosuid`: every roomfs mount
/// is both, whatever `dev` or `suid` ask).
fn ignored(option: &str) -> bool {
    const IGNORED: [&str; 19] = [
        "defaults", "rw", "auto", "noauto", "user", "users", "nouser", "owner", "group", "nofail",
        "_netdev", "dev", "nodev", "suid", "nosuid", "async", "atime", "noatime", "relatime",
    ];
    IGNORED.contains(&option) || option.starts_with("x-") || option.starts_with("comment=")
}

/// Reads the source and options; `sloppy` ignores unknown options instead of refusing them.
fn plan(source: &str, options: &[String], sloppy: bool) -> anyhow::Result<Plan> {
    let space = match source.split_once(':') {
        Some(("room", id)) => SpaceId::new(SpaceKind::Room, id)?,
        Some(("session", id)) => SpaceId::new(SpaceKind::Session, id)?,
        _ => {
            return Err(anyhow!(
                "source {source:?} must be room:ID or session:ID (e.g. room:r1)"
            ));
        }
    };
    let mut grants = Vec::new();
    let (mut read_only, mut sync_on_close, mut passthrough) = (false, false, true);
    let mut no_exec = false;
    let mut daemon = false;
    let mut socket = None;
    let mut flags: Vec<OsString> = Vec::new();
    let mut standalone_only = Vec::new();
    let mut log = None;
    let mut label = None;
    let mut store = None;
    for option in options {
        let (name, value) = match option.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (option.as_str(), None),
        };
        let need = |v: Option<&str>| {
            v.filter(|v| !v.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("option {name} needs a value ({name}=...)"))
        };
        match name {
            "grant" => {
                let v = need(value)?;
                grants.extend(v.split('+').map(str::to_owned));
            }
            "ro" if value.is_none() => read_only = true,
            // The last of `exec` and `noexec` wins, as with mount(8).
            "noexec" if value.is_none() => no_exec = true,
            "exec" if value.is_none() => no_exec = false,
            "sync_on_close" if value.is_none() => sync_on_close = true,
            "no_passthrough" if value.is_none() => passthrough = false,
            "daemon" if value.is_none() => daemon = true,
            "label" => label = Some(need(value)?),
            "store" => {
                let v = need(value)?;
                crate::store::StoreConfig::parse(&v).map_err(|e| anyhow!("store: {e}"))?;
                store = Some(v);
            }
            "socket" => {
                daemon = true;
                socket = Some(PathBuf::from(need(value)?));
            }
            "data_dir" | "records_dir" | "cache_ttl" | "threads" => {
                let v = need(value)?;
                flags.push(format!("--{}", name.replace('_', "-")).into());
                flags.push(v.into());
                standalone_only.push(name);
            }
            "log" => {
                log = Some(PathBuf::from(need(value)?));
                standalone_only.push(name);
            }
            _ if value.is_none() && ignored(name) => {}
            _ if option.starts_with("x-") || option.starts_with("comment=") => {}
            _ if sloppy => log::warn!("ignoring unknown option {option}"),
            _ => {
                return Err(anyhow!(
                    "unknown option {option:?} (roomfs knows data_dir=, grant=PATH:ro|rw, ro, \
                     noexec, sync_on_close, no_passthrough, cache_ttl=, threads=, records_dir=, log=, \
                     label=, store=, daemon, socket=)"
                ));
            }
        }
    }
    crate::grant::Grant::parse_cli(&grants).context("grant")?;
    let server = if daemon {
        if let Some(name) = standalone_only.first() {
            return Err(anyhow!(
                "option {name}= is for mounts served in the background; with daemon, set it in \
                 the daemon's config"
            ));
        }
        Server::Daemon {
            socket: socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
        }
    } else {
        Server::Background { flags, log }
    };
    Ok(Plan {
        space,
        grants,
        read_only,
        no_exec,
        sync_on_close,
        passthrough,
        label,
        store,
        server,
    })
}

/// The `roomfs mount` arguments that serve `plan` at `mountpoint` in the foreground.
fn mount_args(plan: &Plan, flags: &[OsString], mountpoint: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["mount".into()];
    args.extend(flags.iter().cloned());
    args.push(format!("--{}", plan.space.kind.noun()).into());
    args.push(plan.space.id.clone().into());
    for g in &plan.grants {
        args.push("--grant".into());
        args.push(g.into());
    }
    if plan.read_only {
        args.push("--read-only".into());
    }
    if plan.no_exec {
        args.push("--noexec".into());
    }
    if plan.sync_on_close {
        args.push("--sync-on-close".into());
    }
    if !plan.passthrough {
        args.push("--no-passthrough".into());
    }
    if let Some(label) = &plan.label {
        args.push("--label".into());
        args.push(label.into());
    }
    if let Some(store) = &plan.store {
        args.push("--store".into());
        args.push(store.into());
    }
    args.push(mountpoint.into());
    args
}

/// The API request that asks the daemon for `plan` at `mountpoint`.
fn mount_request(plan: &Plan, mountpoint: &str) -> MountRequest {
    let (room, session) = match plan.space.kind {
        SpaceKind::Room => (Some(plan.space.id.clone()), None),
        SpaceKind::Session => (None, Some(plan.space.id.clone())),
    };
    MountRequest {
        mountpoint: mountpoint.to_owned(),
        room,
        session,
        grant: (!plan.grants.is_empty()).then(|| plan.grants.clone()),
        token: None,
        sync_on_close: plan.sync_on_close.then_some(true),
        passthrough: (!plan.passthrough).then_some(false),
        read_only: plan.read_only.then_some(true),
        noexec: plan.no_exec.then_some(true),
        label: plan.label.clone(),
        store: plan.store.clone(),
    }
}

/// Runs the helper with mount(8)'s arguments (without the program name); returns the exit
/// status after printing any error as one line.
pub fn main(args: &[OsString]) -> i32 {
    let invocation = match parse_invocation(args) {
        Ok(i) => i,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let plan = match plan(&invocation.source, &invocation.options, invocation.sloppy) {
        Ok(p) => p,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    // Resolved through root's own symlinks only, when root: the helper runs as root from
    // mount(8) and fstab (see `mount::path`).
    let mountpoint = match crate::mount::path::existing_as_me(&invocation.mountpoint) {
        Ok(p) => p,
        Err(e) => {
            return fail(
                EXIT_USAGE,
                format!("mount point {}: {e}", invocation.mountpoint.display()),
            );
        }
    };
    if invocation.verbose {
        eprintln!(
            "mount.fuse.roomfs: mounting {} at {} ({:?})",
            plan.space,
            mountpoint.display(),
            plan.server
        );
    }
    if invocation.fake {
        return 0;
    }
    let served = match &plan.server {
        Server::Daemon { socket } => match crate::control::api_path(&mountpoint) {
            Ok(text) => Client::new(socket)
                .add_mount(&mount_request(&plan, text))
                .map(drop)
                .map_err(anyhow::Error::from),
            Err(e) => {
                return fail(
                    EXIT_USAGE,
                    format!("mount point {e} (without daemon, any path can be one)"),
                );
            }
        },
        Server::Background { flags, log } => {
            in_background(&mount_args(&plan, flags, &mountpoint), log.as_deref())
        }
    };
    match served {
        Ok(()) => 0,
        Err(e) => fail(EXIT_MOUNT_FAILED, e),
    }
}

fn fail(status: i32, message: impl std::fmt::Display) -> i32 {
    // `{:#}`: an error's whole chain of causes, on one line.
    eprintln!("mount.fuse.roomfs: {message:#}");
    status
}

/// Whether this process's stderr is where a background server may log: the journal (the
/// stream systemd names in `JOURNAL_STREAM`) or a file, not a terminal, pipe or socket.
fn stderr_keeps_a_log() -> bool {
    use std::io::IsTerminal;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    let journal = std::env::var("JOURNAL_STREAM")
        .ok()
        .is_some_and(|stream| stream == format!("{}:{}", meta.dev(), meta.ino()));
    let file = meta.file_type().is_file()
        || (meta.file_type().is_char_device() && !std::io::stderr().is_terminal());
    journal || file
}

/// Starts `roomfs ARGS` in its own session with a pipe to report on, and waits until it says
/// the mount is up (or why not).
fn in_background(args: &[OsString], log: Option<&Path>) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    let exe = std::env::current_exe().context("cannot find the roomfs binary")?;
    let (read_end, write_end): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("cannot create a pipe")?;
    let stderr = match log {
        Some(path) => Stdio::from(
            open_log(path).with_context(|| format!("cannot open the log {}", path.display()))?,
        ),
        // Under systemd the helper's stderr is the journal, or it was sent to a file: the
        // server logs there. A person at a terminal gets the prompt back, not log lines
        // later; a pipe (`$(mount ...)`, `| head`) would hold its reader until the unmount.
        None if stderr_keeps_a_log() => Stdio::inherit(),
        None => Stdio::null(),
    };
    let ready_fd = write_end.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env(READY_FD_ENV, ready_fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    // SAFETY: between fork and exec only async-signal-safe calls: setsid (a session of its own,
    // so the server outlives the terminal and mount(8)) and fcntl (the pipe survives exec).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() == -1 || libc::fcntl(ready_fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the roomfs server")?;
    drop(write_end);
    let mut line = String::new();
    let read = std::io::BufReader::new(std::fs::File::from(read_end)).read_line(&mut line);
    match line.trim_end().split_once(' ') {
        _ if line.trim_end() == "ok" => Ok(()),
        Some(("error", message)) => {
            let _ = child.wait();
            Err(anyhow!("{message}"))
        }
        _ => {
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            Err(anyhow!(
                "the roomfs server exited before mounting ({status}{}); see its log",
                read.err().map(|e| format!(", {e}")).unwrap_or_default()
            ))
        }
    }
}

/// Opens the log `path` for appending, creating it if missing, as the helper's user (root, for
/// fstab lines). Never through a symlink anyone else could have put on its way (whoever can
/// write a directory on the path could point one at a file for root to append to, or have root
/// create one anywhere: see [`log_dir`]), never through a symlink as the log itself, and only a
/// regular file: a FIFO there would hold the mount up forever.
fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    use nix::fcntl::OFlag;
    let (dir, name) = log_dir(path)?;
    let flags = OFlag::O_WRONLY
        | OFlag::O_APPEND
        | OFlag::O_CREAT
        | OFlag::O_NOFOLLOW
        | OFlag::O_NONBLOCK
        | OFlag::O_NOCTTY
        | OFlag::O_CLOEXEC;
    let mode = nix::sys::stat::Mode::from_bits_truncate(0o666);
    let file = match nix::fcntl::openat(&dir, name.as_os_str(), flags, mode) {
        Ok(fd) => std::fs::File::from(fd),
        Err(nix::errno::Errno::ELOOP) => {
            return Err(std::io::Error::other(
                "it is a symlink (logs are not written through one)",
            ));
        }
        Err(e) => return Err(e.into()),
    };
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("it is not a regular file"));
    }
    Ok(file)
}

/// The directory the log `path` goes in, opened one component at a time from `/` (or the
/// working directory), and the log's name. A symlink on the way is followed only where no one
/// but root or this user could have made it: in a directory of theirs that no one else can
/// write, or in a sticky directory (`/tmp`) when the link is theirs — the rule the kernel's
/// `protected_symlinks` applies to sticky directories, extended to every directory. So
/// `/var/run/roomfs.log` works (`/var/run` is root's link to `/run`), while a link a user swaps
/// in for a directory of theirs on the path is refused, not followed to wherever it points.
fn log_dir(path: &Path) -> std::io::Result<(OwnedFd, PathBuf)> {
    use nix::errno::Errno;
    use nix::fcntl::OFlag;
    use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};
    use std::collections::VecDeque;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Component;

    let name = match path.components().next_back() {
        Some(Component::Normal(name)) => PathBuf::from(name),
        _ => return Err(std::io::Error::other("it does not name a file")),
    };
    let dir_flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let open_root = || nix::fcntl::open("/", dir_flags, Mode::empty());
    let mut dir = if path.is_absolute() {
        open_root()?
    } else {
        nix::fcntl::open(".", dir_flags, Mode::empty())?
    };
    let parts = |p: &Path| -> Vec<PathBuf> {
        p.components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(PathBuf::from(n)),
                Component::ParentDir => Some(PathBuf::from("..")),
                _ => None,
            })
            .collect()
    };
    let mut todo: VecDeque<PathBuf> = parts(path.parent().unwrap_or(Path::new(""))).into();
    let me = nix::unistd::geteuid().as_raw();
    let theirs = |uid: u32| uid == 0 || uid == me;
    let trusted = |dir: &FileStat, link: &FileStat| {
        if dir.st_mode & libc::S_ISVTX != 0 {
            theirs(link.st_uid)
        } else {
            theirs(dir.st_uid) && dir.st_mode & 0o022 == 0
        }
    };
    let mut walked = PathBuf::from(if path.is_absolute() { "/" } else { "" });
    let mut links = 0;
    while let Some(part) = todo.pop_front() {
        walked.push(&part);
        match nix::fcntl::openat(&dir, part.as_os_str(), dir_flags, Mode::empty()) {
            Ok(next) => dir = next,
            Err(e @ (Errno::ELOOP | Errno::ENOTDIR)) => {
                let link = fstatat(
                    &dir,
                    part.as_os_str(),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )?;
                if SFlag::from_bits_truncate(link.st_mode & libc::S_IFMT) != SFlag::S_IFLNK {
                    return Err(e.into());
                }
                links += 1;
                if links > 40 {
                    return Err(Errno::ELOOP.into());
                }
                if !trusted(&fstat(&dir)?, &link) {
                    return Err(std::io::Error::other(format!(
                        "{} is a symlink others can replace (logs are not written through one)",
                        walked.display()
                    )));
                }
                let target = nix::fcntl::readlinkat(&dir, part.as_os_str())?;
                let target = Path::new(std::ffi::OsStr::from_bytes(target.as_bytes()));
                if target.is_absolute() {
                    dir = open_root()?;
                }
                for (i, p) in parts(target).into_iter().enumerate() {
                    todo.insert(i, p);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok((dir, name))
}

/// The pipe a background `roomfs mount` reports on, from [`READY_FD_ENV`]: `ok` once the mount
/// is up, or `error MESSAGE`.
pub struct ReadyPipe(std::fs::File);

impl ReadyPipe {
    /// Takes the pipe named by the environment, if any (and removes the variable, so nothing
    /// started later inherits it).
    pub fn from_env() -> Option<ReadyPipe> {
        let fd: i32 = std::env::var(READY_FD_ENV).ok()?.parse().ok()?;
        // SAFETY: not thread-safe in general; called at start-up, before threads exist.
        unsafe { std::env::remove_var(READY_FD_ENV) };
        // Only a pipe is taken over: a stale number never closes some other descriptor.
        let stat = nix::sys::stat::fstat(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) });
        if !stat.is_ok_and(|s| s.st_mode & libc::S_IFMT == libc::S_IFIFO) {
            return None;
        }
        // SAFETY: the helper passed this descriptor for us alone; it is an open pipe.
        Some(ReadyPipe(unsafe {
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }

    /// The mount is up.
    pub fn ok(mut self) {
        let _ = self.0.write_all(b"ok\n");
    }

    /// The mount failed with `message`.
    pub fn fail(mut self, message: impl std::fmt::Display) {
        // `{:#}`: an error's whole chain of causes, on one line.
        let line = format!("{message:#}").replace('\n', " ");
        let _ = writeln!(self.0, "error {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    fn os(s: &[&str]) -> Vec<OsString> {
        s.iter().map(OsString::from).collect()
    }

    #[test]
    fn invocations_as_mount_passes_them() {
        let i = parse_invocation(&os(&[
            "room:r1",
            "/srv/r1",
            "-v",
            "-o",
            "rw,data_dir=/d,_netdev",
        ]))
        .unwrap();
        assert_eq!(i.source, "room:r1");
        assert_eq!(i.mountpoint, PathBuf::from("/srv/r1"));
        assert_eq!(i.options, strings(&["rw", "data_dir=/d", "_netdev"]));
        assert!(i.verbose && !i.fake && !i.sloppy);
        assert!(parse_invocation(&os(&["room:r1"])).is_err());
        assert!(parse_invocation(&os(&["a", "b", "-t", "fuse.other"])).is_err());
        assert!(parse_invocation(&os(&["a", "b", "-o"])).is_err());
        assert!(parse_invocation(&os(&["a", "b", "-N", "x"])).is_err());
        // The mount point may be any bytes; what must be text is refused by name.
        use std::os::unix::ffi::OsStringExt;
        let odd = OsString::from_vec(b"/srv/r\xff".to_vec());
        let i = parse_invocation(&["room:r1".into(), odd.clone()]).unwrap();
        assert_eq!(i.mountpoint, PathBuf::from(&odd));
        let e = parse_invocation(&[OsString::from_vec(b"room:\xff".to_vec()), "/m".into()]);
        let e = e.unwrap_err().to_string();
        assert_eq!(e, r#"the source "room:\xFF" is not UTF-8 text"#);
        let bad_options = OsString::from_vec(b"grant=\xff/:ro".to_vec());
        let e = parse_invocation(&["room:r1".into(), "/m".into(), "-o".into(), bad_options]);
        assert!(e.unwrap_err().to_string().starts_with("the options"));
    }

    #[test]
    fn options_map_to_a_background_mount() {
        let p = plan(
            "room:r1",
            &strings(&[
                "rw",
                "data_dir=/var/lib/roomfs",
                "grant=inputs/:ro+outputs/:rw",
                "grant=logs/:rw",
                "sync_on_close",
                "cache_ttl=5",
                "store=s3://team-a/agents",
                "_netdev",
                "nofail",
                "x-systemd.requires=roomfs.service",
            ]),
            false,
        )
        .unwrap();
        assert_eq!(
            p.grants,
            strings(&["inputs/:ro", "outputs/:rw", "logs/:rw"])
        );
        assert!(p.sync_on_close && !p.read_only && p.passthrough);
        let Server::Background { flags, log } = &p.server else {
            panic!("{p:?}")
        };
        assert_eq!(log, &None);
        let args = mount_args(&p, flags, Path::new("/srv/r1"));
        let args: Vec<_> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "mount",
                "--data-dir",
                "/var/lib/roomfs",
                "--cache-ttl",
                "5",
                "--room",
                "r1",
                "--grant",
                "inputs/:ro",
                "--grant",
                "outputs/:rw",
                "--grant",
                "logs/:rw",
                "--sync-on-close",
                "--store",
                "s3://team-a/agents",
                "/srv/r1"
            ]
        );
    }

    #[test]
    fn noexec_as_mount_passes_it_for_user_lines_reaches_the_mount() {
        // What mount(8) passes for `room:r1 /srv/r1 fuse.roomfs data_dir=/d,user 0 0`.
        let opts = strings(&["rw", "noexec", "nosuid", "nodev", "data_dir=/d", "user"]);
        let p = plan("room:r1", &opts, false).unwrap();
        assert!(p.no_exec);
        let Server::Background { flags, .. } = &p.server else {
            panic!("{p:?}")
        };
        let args = mount_args(&p, flags, Path::new("/srv/r1"));
        assert!(args.iter().any(|a| a == "--noexec"), "{args:?}");
        // Through the daemon too.
        let p = plan("room:r1", &strings(&["noexec", "users", "daemon"]), false).unwrap();
        assert_eq!(mount_request(&p, "/m").noexec, Some(true));
        // The last of exec and noexec wins; exec is the default.
        for (opts, no_exec) in [
            (&["noexec", "exec"][..], false),
            (&["exec", "noexec"], true),
            (&["exec"], false),
            (
                &["defaults", "auto", "noauto", "nouser", "nofail", "_netdev"],
                false,
            ),
        ] {
            let p = plan("room:r1", &strings(opts), false).unwrap();
            assert_eq!(p.no_exec, no_exec, "{opts:?}");
            let Server::Background { flags, .. } = &p.server else {
                panic!("{p:?}")
            };
            let args = mount_args(&p, flags, Path::new("/srv/r1"));
            assert_eq!(args.iter().any(|a| a == "--noexec"), no_exec, "{opts:?}");
            assert_eq!(mount_request(&p, "/m").noexec, no_exec.then_some(true));
        }
        // Even sloppy, noexec is honoured rather than dropped as unknown.
        assert!(
            plan("room:r1", &strings(&["noexec"]), true)
                .unwrap()
                .no_exec
        );
    }

    #[test]
    fn daemon_mounts_go_through_the_socket() {
        let p = plan(
            "session:s1",
            &strings(&["ro", "socket=/run/x.sock", "no_passthrough", "store=local"]),
            false,
        )
        .unwrap();
        assert_eq!(
            p.server,
            Server::Daemon {
                socket: PathBuf::from("/run/x.sock")
            }
        );
        let req = mount_request(&p, "/m");
        assert_eq!(req.session.as_deref(), Some("s1"));
        assert_eq!(req.read_only, Some(true));
        assert_eq!(req.passthrough, Some(false));
        assert_eq!(req.store.as_deref(), Some("local"));
        let p = plan("room:r", &strings(&["daemon"]), false).unwrap();
        assert_eq!(
            p.server,
            Server::Daemon {
                socket: PathBuf::from(DEFAULT_SOCKET)
            }
        );
    }

    #[test]
    fn the_log_is_never_opened_through_a_symlink_or_as_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "root's\n").unwrap();
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = open_log(&link).unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "root's\n");
        // A dangling one does not make a file where it points either.
        let dangling = dir.path().join("dangling.log");
        std::os::unix::fs::symlink(dir.path().join("made"), &dangling).unwrap();
        assert!(open_log(&dangling).is_err());
        assert!(!dir.path().join("made").exists());
        // A FIFO is refused at once, not waited on.
        let fifo = dir.path().join("fifo.log");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(open_log(&fifo).is_err());
        // A file is appended to, and made if missing.
        let log = dir.path().join("server.log");
        open_log(&log).unwrap().write_all(b"one\n").unwrap();
        open_log(&log).unwrap().write_all(b"two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "one\ntwo\n");
    }

    #[test]
    fn a_symlink_on_the_logs_path_is_followed_only_where_no_one_else_could_have_made_it() {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        let elsewhere = base.join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        // A directory others can write: a link there may be theirs, and is not followed.
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        symlink(&elsewhere, open.join("logs")).unwrap();
        let err = open_log(&open.join("logs/server.log"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("logs is a symlink others can replace"),
            "{err}"
        );
        assert!(!elsewhere.join("server.log").exists());
        // In a directory only its owner (us) can write, the link is followed, relative or not.
        let own = base.join("own");
        std::fs::create_dir(&own).unwrap();
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o755)).unwrap();
        symlink("../elsewhere", own.join("logs")).unwrap();
        symlink(&own, base.join("own-link")).unwrap();
        open_log(&base.join("own-link/logs/server.log"))
            .unwrap()
            .write_all(b"one\n")
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(elsewhere.join("server.log")).unwrap(),
            "one\n"
        );
        // A sticky directory (as /tmp): our own link is followed, another user's is not.
        let sticky = base.join("sticky");
        std::fs::create_dir(&sticky).unwrap();
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        symlink(&elsewhere, sticky.join("mine")).unwrap();
        open_log(&sticky.join("mine/sticky.log")).unwrap();
        assert!(elsewhere.join("sticky.log").is_file());
        if nix::unistd::geteuid().is_root() {
            symlink(&elsewhere, sticky.join("theirs")).unwrap();
            let nobody = Some(nix::unistd::Uid::from_raw(65534));
            nix::unistd::fchownat(
                std::fs::File::open(&sticky).unwrap(),
                "theirs",
                nobody,
                None,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .unwrap();
            let err = open_log(&sticky.join("theirs/theirs.log"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("symlink others can replace"), "{err}");
            assert!(!elsewhere.join("theirs.log").exists());
        }
        // A link loop ends, and a name that is not a file is refused.
        symlink("loop", own.join("loop")).unwrap();
        assert!(open_log(&own.join("loop/x.log")).is_err());
        assert!(open_log(&own.join("..")).is_err());
    }

    #[test]
    fn bad_options_are_one_clear_line() {
        let err = |source: &str, opts: &[&str]| {
            format!("{:#}", plan(source, &strings(opts), false).unwrap_err())
        };
        assert!(err("r1", &[]).contains("room:ID or session:ID"));
        assert!(err("room:../x", &[]).contains("invalid room id"));
        assert!(err("room:r", &["bogus=1"]).contains("unknown option \"bogus=1\""));
        assert!(err("room:r", &["grant"]).contains("grant needs a value"));
        assert!(err("room:r", &["daemon", "data_dir=/d"]).contains("daemon's config"));
        assert!(err("room:r", &["store=ftp://x"]).starts_with("store: "));
        for e in [err("room:r", &["bogus"]), err("x", &[])] {
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        // -s (sloppy) ignores what roomfs does not know.
        assert!(plan("room:r", &strings(&["bogus=1"]), true).is_ok());
        assert!(is_helper("/sbin/mount.fuse.roomfs".as_ref()));
        assert!(!is_helper("/usr/bin/roomfs".as_ref()));
    }
}
