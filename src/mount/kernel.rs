//! Mounting a FUSE file system, and unmounting it only while the mount at its path is still
//! the one we made.
//!
//! fuser 0.18 unmounts a session's mount point *by path* when the session ends, after asking
//! `is_mounted`, which takes the device's `POLLERR` (the connection is gone) for "still
//! mounted". So a mount that ends — unmounted by `umount` or `roomfs unmount`, or lazily
//! detached and then released by its last open file — unmounts whatever is mounted at its path
//! by then: the next mount there. Hence roomfs mounts with its own mount(2) (through the setuid
//! `fusermount3` when not root) and gives fuser only the device (`Session::from_fd`), so that
//! fuser never unmounts anything.
//!
//! The invariant: roomfs unmounts a mount point only when [`Mounted::is_ours`] holds, that is
//! while our FUSE connection is up (the device does not poll `POLLERR`) *and* the mount at the
//! path has our superblock's device number. While the connection is up our superblock exists,
//! and no other mount can have its device number; once it is down, our mount is gone (or dead,
//! which `check_mountpoint` clears at the next mount there) and nothing is unmounted. The check
//! and the unmount are two calls, so a mount made at the path in between could still be hit:
//! that needs an unmount and a new mount within microseconds, not a process that ends later.
//! The path itself cannot be swapped between them: as root, `super::unmount` reaches the mount
//! point through a descriptor of its directory, opened without following any symlink, and
//! checks the device of the name there before unmounting that name.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::MsFlags;

/// How to mount.
pub struct Options {
    /// The source the mount shows in `/proc/mounts` (`roomfs:rooms/r1`).
    pub source: String,
    /// The subtype: the type reads `fuse.<subtype>`.
    pub subtype: &'static str,
    pub read_only: bool,
    /// No file in the mount can be executed (`noexec`): `execve` fails with EACCES.
    pub no_exec: bool,
    /// Let every user in (`allow_other`); otherwise only the user who mounted.
    pub allow_other: bool,
}

/// A FUSE mount we made: its device, for fuser, and what tells it apart from other mounts at
/// the same path.
pub struct Mounted {
    mountpoint: PathBuf,
    /// Our own descriptor of the connection (a duplicate of the session's).
    device: OwnedFd,
    /// The device number of our superblock.
    dev: libc::dev_t,
}

/// Mounts a FUSE file system at `mountpoint` (a canonical directory path); returns the mount
/// and the device descriptor to serve it with.
pub fn mount(mountpoint: &Path, options: &Options) -> io::Result<(Mounted, OwnedFd)> {
    let device = if nix::unistd::geteuid().is_root() {
        mount_directly(mountpoint, options)?
    } else {
        mount_with_fusermount(mountpoint, options)?
    };
    // The mount just made at the path is the last one listed there.
    let dev = super::mount_at(mountpoint)
        .filter(|m| m.source == options.source)
        .map(|m| m.dev)
        .ok_or_else(|| {
            io::Error::other(format!(
                "the new mount is not listed at {} in /proc/self/mountinfo",
                mountpoint.display()
            ))
        })?;
    let mounted = Mounted {
        mountpoint: mountpoint.to_path_buf(),
        device: device.try_clone()?,
        dev,
    };
    Ok((mounted, device))
}

/// Mounts at `mountpoint` (canonical) as root. The directory is opened without following any
/// symlink on the way and mounted on through its descriptor, so a symlink swapped into the
/// path since it was resolved (by whoever owns a directory on it) cannot make the daemon mount
/// over another directory: the mount fails with `ELOOP` instead.
fn mount_directly(mountpoint: &Path, options: &Options) -> io::Result<OwnedFd> {
    use crate::store::local::at::Dir;
    let rel = mountpoint
        .strip_prefix("/")
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let held = Dir::open_trusted(Path::new("/"), false)?
        .open(rel)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::other(format!(
                "a symlink is in the way to {} (mount points are resolved once, when asked \
                 for, and then not followed through links)",
                mountpoint.display()
            )),
            _ => e,
        })?;
    let target = format!("/proc/self/fd/{}", held.as_raw_fd());
    let device = OwnedFd::from(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")?,
    );
    let rootmode = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&target)?.mode() & libc::S_IFMT
    };
    let mut data = format!(
        "fd={},rootmode={rootmode:o},user_id={},group_id={},default_permissions,subtype={}",
        device.as_raw_fd(),
        nix::unistd::getuid(),
        nix::unistd::getgid(),
        options.subtype,
    );
    if options.allow_other {
        data.push_str(",allow_other");
    }
    // Always nodev and nosuid: what agents write never becomes a device or a setuid program.
    let mut flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    if options.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    if options.no_exec {
        flags |= MsFlags::MS_NOEXEC;
    }
    nix::mount::mount(
        Some(options.source.as_str()),
        target.as_str(),
        Some("fuse"),
        flags,
        Some(data.as_str()),
    )?;
    Ok(device)
}

/// Mounts through the setuid `fusermount3` of the fuse3 package, which mounts and passes the
/// device back over a socket (`_FUSE_COMMFD`).
fn mount_with_fusermount(mountpoint: &Path, options: &Options) -> io::Result<OwnedFd> {
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::CommandExt;
    let (ours, theirs) = UnixStream::pair()?;
    let mut opts = format!(
        "fsname={},subtype={},default_permissions,nodev,nosuid",
        options.source, options.subtype
    );
    if options.read_only {
        opts.push_str(",ro");
    }
    if options.no_exec {
        opts.push_str(",noexec");
    }
    if options.allow_other {
        opts.push_str(",allow_other");
    }
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = Command::new("fusermount3");
    cmd.arg("-o")
        .arg(opts)
        .arg("--")
        .arg(mountpoint)
        .env("_FUSE_COMMFD", theirs_fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only fcntl runs, which is async-signal-safe; it lets the
    // child inherit its end of the socket (made close-on-exec, so no other child gets it).
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(theirs_fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot run fusermount3 (install the fuse3 package): {e}"),
        )
    })?;
    drop(theirs);
    let received = receive_fd(&ours);
    let output = child.wait_with_output()?;
    match received {
        Ok(Some(fd)) if output.status.success() => Ok(fd),
        _ => {
            let said = String::from_utf8_lossy(&output.stderr).trim().to_string();
            let said = if said.is_empty() {
                format!("fusermount3 failed ({})", output.status)
            } else {
                said
            };
            let kind = if said.contains("ermission") || said.contains("not allowed") {
                io::ErrorKind::PermissionDenied
            } else {
                io::ErrorKind::Other
            };
            Err(io::Error::new(kind, said))
        }
    }
}

/// The descriptor passed over `socket` (`SCM_RIGHTS`); `None` if the peer closed it unsent.
fn receive_fd(socket: &std::os::unix::net::UnixStream) -> io::Result<Option<OwnedFd>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(libc::c_int);
    let msg = loop {
        match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other?,
        }
    };
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg
            && let Some(&fd) = fds.first()
        {
            // SAFETY: the kernel just installed this descriptor for us; nothing else owns it.
            return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    Ok(None)
}

impl Mounted {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The device number of our superblock.
    pub fn dev(&self) -> libc::dev_t {
        self.dev
    }

    /// Whether the mount at our mount point is still ours (see the module docs).
    pub fn is_ours(&self) -> bool {
        self.connected()
            && super::mount_at(&self.mountpoint).is_some_and(|m| m.dev == self.dev && m.is_fuse())
    }

    /// Where our mount is now, if it is still ours (see `is_ours`): its mount point, or where
    /// a rename of a directory above it took it (mountinfo shows it there); `None` if gone,
    /// or if it shows at several paths other than its own (bind mounts: which to unmount?).
    pub fn current_path(&self) -> Option<PathBuf> {
        if !self.connected() {
            return None;
        }
        let at: Vec<PathBuf> = super::mounts()
            .ok()?
            .into_iter()
            .filter(|m| m.dev == self.dev && m.is_fuse())
            .map(|m| m.mountpoint)
            .collect();
        if at.contains(&self.mountpoint) {
            return Some(self.mountpoint.clone());
        }
        match <[PathBuf; 1]>::try_from(at) {
            Ok([only]) => Some(only),
            Err(_) => None,
        }
    }

    /// Whether our FUSE connection is up: the device polls `POLLERR` once it is aborted or its
    /// superblock is gone.
    fn connected(&self) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        loop {
            let mut fds = [PollFd::new(self.device.as_fd(), PollFlags::empty())];
            match poll(&mut fds, PollTimeout::ZERO) {
                Ok(0) => return true,
                Ok(_) => {
                    return !fds[0]
                        .revents()
                        .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL));
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
    }
}

pub use crate::fs::closers::parse_dev;
