//! Running a mount: checks the mount point, mounts a space with the FUSE adapter, serves it
//! until unmounted or signalled, and unmounts cleanly.

use anyhow::{Context, anyhow};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use fuser::{Config, Session, SessionACL};
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::fs::{Fs, FsOptions, Limits};
use crate::fuse::FuseAdapter;
use crate::grant::Grant;
use crate::helper::ReadyPipe;
use crate::poll::Poller;
use crate::reader_gate::ReaderGate;
use crate::records::RecordStore;
use crate::space::{Hub, SpaceId, SpaceKind};
use crate::store::local::LocalBackend;
use crate::store::meta::META_DIR;

mod kernel;
pub mod path;

/// The source name roomfs mounts show in `/proc/mounts` begins with this.
pub const SOURCE_PREFIX: &str = "roomfs:";

/// Everything needed to mount one space.
#[derive(Clone, Debug)]
pub struct MountSpec {
    pub data_dir: PathBuf,
    pub space: SpaceId,
    pub mountpoint: PathBuf,
    pub sync_on_close: bool,
    /// Let the kernel read large files from the disk directly (see `fs::passthrough`).
    pub passthrough: bool,
    /// How long the kernel caches attributes and names.
    pub cache_ttl: Duration,
    /// Threads serving kernel requests.
    pub threads: usize,
    /// How long CPUs are kept from idling after a request (zero: never); see [`crate::poll`].
    pub poll_window: Duration,
    /// What the mount may touch.
    pub grant: Grant,
    /// Where agent records live (sessions show them under `.meta`).
    pub records_dir: PathBuf,
    /// Limits of the space; `None` reads those recorded for a session by the daemon.
    pub limits: Option<Limits>,
    /// Who the mount's changes are made by, in events (the token's name or the mount's
    /// label); `None`: the mount point.
    pub participant: Option<String>,
    /// A read-only mount (the kernel refuses every change with EROFS).
    pub read_only: bool,
    /// A `noexec` mount: no file in it can be executed (`execve` fails with EACCES).
    pub no_exec: bool,
    /// Where the space is stored (a standalone mount; the daemon has its own).
    pub store: crate::store::StoreConfig,
}

impl MountSpec {
    /// The limits of a standalone mount: the given ones, or the session's recorded ones.
    fn limits(&self, hub: &Hub) -> Limits {
        match (self.limits, self.space.kind) {
            (Some(limits), _) => limits,
            (None, SpaceKind::Session) => {
                crate::space::state::recorded_limits(hub.local().data_dir(), &self.space.id)
                    .unwrap_or_default()
            }
            (None, SpaceKind::Room) => Limits::default(),
        }
    }
}

/// One line of `/proc/self/mountinfo` that matters here.
#[derive(Debug)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
    /// The device number of the mounted superblock.
    pub dev: libc::dev_t,
}

impl MountEntry {
    /// Whether this is a FUSE mount.
    pub fn is_fuse(&self) -> bool {
        self.fstype == "fuse" || self.fstype.starts_with("fuse.")
    }

    /// Whether this is a roomfs mount.
    pub fn is_roomfs(&self) -> bool {
        self.is_fuse() && self.source.starts_with(SOURCE_PREFIX)
    }
}

/// The current mounts of this process's namespace. Mount points are bytes (one that is not
/// UTF-8 anywhere in the namespace must not hide the others).
pub fn mounts() -> std::io::Result<Vec<MountEntry>> {
    use std::os::unix::ffi::OsStringExt;
    let bytes = std::fs::read("/proc/self/mountinfo")?;
    Ok(bytes
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let split = line.windows(3).position(|w| w == b" - ")?;
            let (left, right) = (&line[..split], &line[split + 3..]);
            let left: Vec<&[u8]> = left.split(|&b| b == b' ').collect();
            let dev = kernel::parse_dev(std::str::from_utf8(left.get(2)?).ok()?)?;
            let mountpoint = unescape(left.get(4)?);
            let mut right = right.split(|&b| b == b' ');
            let fstype = String::from_utf8_lossy(right.next()?).into_owned();
            let source = String::from_utf8_lossy(&unescape(right.next()?)).into_owned();
            Some(MountEntry {
                mountpoint: PathBuf::from(std::ffi::OsString::from_vec(mountpoint)),
                fstype,
                source,
                dev,
            })
        })
        .collect())
}

/// Decodes the octal escapes (`\040` for a space) of mountinfo fields.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && let Some(digits) = field.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let v = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// The mount at exactly `path`, if any (the most recent one wins).
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts().ok()?.into_iter().rfind(|m| m.mountpoint == path)
}

/// What is wrong with a mount point the user named (the control API answers 409 for one in
/// use, 400 for the others).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadMountPointKind {
    Missing,
    NotADirectory,
    InUse,
    /// Through a symlink someone other than root could have made (see `path`).
    Untrusted,
}

/// A mount point refused, with the message for the user.
#[derive(Debug)]
pub struct BadMountPoint {
    pub kind: BadMountPointKind,
    message: String,
}

impl std::fmt::Display for BadMountPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BadMountPoint {}

/// Checks and canonicalises a mount point, with a message that says what is wrong (a
/// [`BadMountPoint`] when the user named a path that cannot be one).
pub fn check_mountpoint(path: &Path) -> anyhow::Result<PathBuf> {
    let shown = path.display();
    // Absolute, as mount tables list them (a dead mount is found there by its path).
    let absolute =
        std::path::absolute(path).with_context(|| format!("mount point {shown} is not usable"))?;
    let path = absolute.as_path();
    // statfs, not stat: the kernel may answer a stat of a dead mount from its attribute cache,
    // a statfs always asks the server.
    if let Err(nix::errno::Errno::ENOTCONN) = nix::sys::statfs::statfs(path) {
        // A roomfs daemon died (crash, kill -9) and left its mount behind: clear it, so the
        // next mount works without manual steps. Other dead FUSE mounts are not ours to touch.
        let stale = mounts()
            .unwrap_or_default()
            .into_iter()
            .rfind(|m| m.mountpoint.as_os_str() == path.as_os_str() && m.is_roomfs());
        if let Some(m) = stale {
            log::warn!(
                "clearing the dead roomfs mount left at {}",
                m.mountpoint.display()
            );
            unmount(&m.mountpoint, m.dev, true)?;
        }
    }
    let refused = |kind, message| anyhow::Error::new(BadMountPoint { kind, message });
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let message = format!("mount point {shown} does not exist");
            return Err(refused(BadMountPointKind::Missing, message));
        }
        Err(e) => return Err(e).with_context(|| format!("mount point {shown} is not usable")),
    };
    if !meta.is_dir() {
        let message = format!("mount point {shown} is not a directory");
        return Err(refused(BadMountPointKind::NotADirectory, message));
    }
    // Resolved through root's own symlinks only, when root (see `path`).
    let canonical = match path::resolve_as_me(path) {
        Ok(r) if r.missing.is_empty() => r.existing,
        Ok(_) => {
            let message = format!("mount point {shown} does not exist");
            return Err(refused(BadMountPointKind::Missing, message));
        }
        Err(e @ path::Refused::Untrusted { .. }) => {
            let message = format!("mount point {shown} is refused: {e}");
            return Err(refused(BadMountPointKind::Untrusted, message));
        }
        Err(path::Refused::Io(e)) => {
            return Err(e).with_context(|| format!("mount point {shown} is not usable"));
        }
    };
    if let Some(m) = mount_at(&canonical) {
        let message = format!(
            "mount point {} is already in use (a {} filesystem is mounted there)",
            canonical.display(),
            m.fstype
        );
        return Err(refused(BadMountPointKind::InUse, message));
    }
    Ok(canonical)
}

/// Unmounts the mount of device `dev` at `path` (absolute, as mountinfo lists it); with
/// `lazy`, detaches it even while files are open.
///
/// As root, the directory holding the mount point is opened without following any symlink
/// (`at::Dir`), the name in it is checked to be the mount of `dev`, and that name is unmounted
/// through the descriptor (`/proc/self/fd/N/NAME`, `UMOUNT_NOFOLLOW`). A mount point's name
/// cannot be renamed or removed while it is mounted on, so the check holds until the
/// unmount: whoever owns a directory on the path (an agent's home) cannot swap in a symlink
/// between the two and have the root daemon unmount or detach another mount.
///
/// Without `lazy`, a mount still busy is asked again for a second (each time checked anew)
/// before it is reported busy: files closed just before can hold it for a moment.
pub fn unmount(path: &Path, dev: libc::dev_t, lazy: bool) -> anyhow::Result<()> {
    use nix::mount::MntFlags;
    let flags = if lazy {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    // Busy for a moment after its files were closed: a child forked while one was open holds
    // it until its exec. Asked again for up to `BUSY_GRACE` before it is reported busy.
    const BUSY_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
    let deadline = std::time::Instant::now() + BUSY_GRACE;
    let result = loop {
        let result = unmount_once(path, dev, flags)?;
        match result {
            Err(nix::errno::Errno::EBUSY) if !lazy && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            result => break result,
        }
    };
    match result {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => Err(anyhow!(
            "{} is busy: a process still has files open there (close them, or use --lazy)",
            path.display()
        )),
        Err(nix::errno::Errno::EPERM) => {
            // Not root: the setuid helper of the fuse3 package may unmount our own mounts.
            let mut cmd = std::process::Command::new("fusermount3");
            cmd.arg("-u");
            if lazy {
                cmd.arg("-z");
            }
            match cmd.arg(path).status() {
                Ok(s) if s.success() => Ok(()),
                _ => Err(anyhow!(
                    "not permitted to unmount {} (run as root or as the user who mounted it)",
                    path.display()
                )),
            }
        }
        Err(e) => Err(anyhow!("could not unmount {}: {e}", path.display())),
    }
}

/// One try of [`unmount`]: the checks' errors, or what `umount2` answered.
fn unmount_once(
    path: &Path,
    dev: libc::dev_t,
    flags: nix::mount::MntFlags,
) -> anyhow::Result<nix::Result<()>> {
    use nix::mount::{MntFlags, umount2};
    Ok(if nix::unistd::geteuid().is_root() {
        let (parent, name) = match (path.parent(), path.file_name()) {
            (Some(parent), Some(name)) if path.is_absolute() => (parent, name),
            _ => {
                return Err(anyhow!(
                    "cannot unmount {}: not a mount point",
                    path.display()
                ));
            }
        };
        let parent = crate::store::local::at::Dir::open_trusted(Path::new("/"), false)
            .and_then(|root| match parent.strip_prefix("/") {
                Ok(rel) if rel.as_os_str().is_empty() => Ok(root),
                Ok(rel) => root.open(rel),
                Err(_) => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
            })
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => anyhow!(
                    "not unmounting {}: a symlink is in the way to it now (it is unmounted \
                     only through real directories)",
                    path.display()
                ),
                _ => anyhow!("cannot unmount {}: {e}", path.display()),
            })?;
        match mounted_dev(&parent, name) {
            Ok(found) if found == dev => {}
            Ok(_) => {
                return Err(anyhow!(
                    "not unmounting {}: the mount there is not the one to unmount any more",
                    path.display()
                ));
            }
            Err(e) => return Err(anyhow!("cannot unmount {}: {e}", path.display())),
        }
        let mut through = std::ffi::OsString::from(format!(
            "/proc/self/fd/{}/",
            std::os::fd::AsRawFd::as_raw_fd(&parent)
        ));
        through.push(name);
        umount2(Path::new(&through), flags | MntFlags::UMOUNT_NOFOLLOW)
    } else {
        umount2(path, flags)
    })
}

/// The device of the file system mounted at `name` in `dir` (the mount's own, not the
/// directory's beneath it), not followed if a symlink. Asked with `AT_STATX_DONT_SYNC`, so a
/// FUSE mount's server (perhaps this process, perhaps dead or stopped) is not asked: the
/// device number is the superblock's, and known without it.
fn mounted_dev(
    dir: &crate::store::local::at::Dir,
    name: &std::ffi::OsStr,
) -> std::io::Result<libc::dev_t> {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(name.as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut stx = std::mem::MaybeUninit::<libc::statx>::uninit();
    // SAFETY: a valid descriptor, a NUL-terminated name and room for the result.
    let ret = unsafe {
        libc::statx(
            std::os::fd::AsRawFd::as_raw_fd(dir),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT | libc::AT_STATX_DONT_SYNC,
            libc::STATX_TYPE,
            stx.as_mut_ptr(),
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statx succeeded, so it filled the structure.
    let stx = unsafe { stx.assume_init() };
    Ok(libc::makedev(stx.stx_dev_major, stx.stx_dev_minor))
}

/// What a mount shares with other mounts of the same process: the spaces (one object per
/// space, see [`Hub`]), the space's limits, and the process's polling.
#[derive(Clone)]
pub struct Resources {
    pub hub: Arc<Hub>,
    /// The limits of the space, applied when it is opened first in this process.
    pub limits: Limits,
    /// The process's adaptive polling, if enabled.
    pub poller: Option<Arc<Poller>>,
}

/// A space mounted and being served.
pub struct ActiveMount {
    pub mountpoint: PathBuf,
    pub space: SpaceId,
    pub grant: Grant,
    /// Mounted read-only (whatever the grant says).
    pub read_only: bool,
    /// Mounted `noexec`.
    pub no_exec: bool,
    pub fs: Arc<Fs>,
    /// Releases the session's standby threads when we unmount.
    gate: Arc<ReaderGate>,
    /// The kernel's mount, to unmount it only while it is ours.
    mounted: Arc<kernel::Mounted>,
    ended: Arc<AtomicBool>,
    waiter: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl ActiveMount {
    /// Mounts `spec`; `on_end` runs (on another thread) when the mount goes away, whoever
    /// unmounted it.
    pub fn start(
        spec: &MountSpec,
        resources: Resources,
        on_end: impl FnOnce() + Send + 'static,
    ) -> anyhow::Result<ActiveMount> {
        let mountpoint = check_mountpoint(&spec.mountpoint)?;
        // Serving a mount from inside itself would make the daemon wait on its own requests.
        if let Ok(data_dir) = spec.data_dir.canonicalize()
            && (mountpoint.starts_with(&data_dir) || data_dir.starts_with(&mountpoint))
        {
            return Err(anyhow!(
                "mount point {} and data dir {} must not contain each other",
                mountpoint.display(),
                data_dir.display()
            ));
        }
        if !Path::new("/dev/fuse").exists() {
            return Err(anyhow!(
                "/dev/fuse is missing: load the fuse kernel module (modprobe fuse), or \
                 give the container the device (--device /dev/fuse)"
            ));
        }
        let rw = nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK;
        if nix::unistd::access("/dev/fuse", rw).is_err() {
            return Err(anyhow!(
                "not permitted to use /dev/fuse: run as root, or make the device usable \
                 by this user (most distributions ship it with mode 0666)"
            ));
        }
        let is_root = nix::unistd::geteuid().is_root();
        // A new space belongs to whoever owns the mount point, so that user can write in it.
        let owner = if is_root {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(&mountpoint)
                .with_context(|| format!("mount point {}", mountpoint.display()))?;
            Some((m.uid(), m.gid()))
        } else {
            None
        };
        let space = resources
            .hub
            .open(&spec.space, resources.limits, Some(owner))
            .with_context(|| {
                format!(
                    "cannot open {} at {}",
                    spec.space,
                    resources.hub.describe(&spec.space)
                )
            })?;
        // Sessions show their agent records under .meta, which is never writable.
        let grant = match spec.space.kind {
            SpaceKind::Session => spec.grant.with_read_only(META_DIR),
            SpaceKind::Room => spec.grant.clone(),
        };
        let fs = Arc::new(Fs::new(
            space,
            FsOptions {
                sync_on_close: spec.sync_on_close,
                owner_from_caller: is_root,
                grant,
                links_anywhere: spec.grant.is_full(),
                passthrough: spec.passthrough,
                participant: match &spec.participant {
                    Some(p) => p.as_str().into(),
                    None => mountpoint.to_string_lossy().into(),
                },
                listings_held: Some(resources.hub.listings_held()),
            },
        ));
        fs.watch_space();
        let threads = spec.threads.max(1);
        let gate = Arc::new(ReaderGate::new(
            threads,
            ReaderGate::spin_window(resources.poller.is_some()),
        ));
        if let Some(poller) = &resources.poller {
            gate.set_poller(poller.clone());
        }
        let adapter = FuseAdapter::new(
            fs.clone(),
            spec.cache_ttl,
            resources.poller.clone(),
            gate.clone(),
        );
        let mut config = Config::default();
        // Sandboxed agents usually run as other users than the daemon.
        let acl = if is_root {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        config.acl = acl;
        config.n_threads = Some(threads);
        config.clone_fd = true;
        let options = kernel::Options {
            source: format!("{SOURCE_PREFIX}{}", spec.space.rel_dir().display()),
            // So the type reads `fuse.roomfs` (what `mount -t`, fstab and findmnt use).
            subtype: "roomfs",
            read_only: spec.read_only,
            no_exec: spec.no_exec,
            allow_other: acl == SessionACL::All,
        };
        let (mounted, device) =
            kernel::mount(&mountpoint, &options).map_err(|e| match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => anyhow::Error::new(e).context(format!(
                    "not permitted to mount at {} (run as root, or install fuse3 for \
                     unprivileged mounts)",
                    mountpoint.display()
                )),
                _ if e.kind() == std::io::ErrorKind::PermissionDenied => anyhow::Error::new(e)
                    .context(format!(
                        "not permitted to mount at {}",
                        mountpoint.display()
                    )),
                _ => anyhow::Error::new(e)
                    .context(format!("cannot mount at {}", mountpoint.display())),
            })?;
        // From here on, a failure takes the new mount down again.
        let undo = |e: anyhow::Error| {
            if mounted.is_ours()
                && let Err(u) = unmount(mounted.mountpoint(), mounted.dev(), true)
            {
                log::error!("{u:#}");
            }
            e
        };
        // fuser gets the device only, so it never unmounts a path (see `kernel`).
        let session = Session::from_fd(adapter, device, acl, config).map_err(|e| {
            undo(anyhow::Error::new(e).context(format!("cannot mount at {}", mountpoint.display())))
        })?;
        gate.set_device(&session);
        fs.set_mount_dev(mounted.dev());
        if fs.wants_passthrough() {
            match std::os::fd::AsFd::as_fd(&session).try_clone_to_owned() {
                Ok(device) => fs.set_backing(Box::new(crate::fuse::Backings(device))),
                Err(e) => log::warn!("no passthrough: cannot duplicate the FUSE device: {e}"),
            }
        }
        let background = session.spawn().map_err(|e| {
            undo(
                anyhow::Error::new(e)
                    .context(format!("cannot start serving {}", mountpoint.display())),
            )
        })?;
        let notify = crate::fuse::Notify::start(background.notifier())
            .map_err(|e| undo(anyhow::Error::new(e).context("cannot start the notifier thread")))?;
        fs.set_kernel_cache(Box::new(notify));
        log::info!(
            "mounted {} at {} (data in {}, grant: {}, {threads} threads)",
            spec.space,
            mountpoint.display(),
            resources.hub.describe(&spec.space),
            spec.grant
        );
        let mounted = Arc::new(mounted);
        let ended = Arc::new(AtomicBool::new(false));
        let ended_flag = ended.clone();
        spawn_publisher(Arc::downgrade(&fs));
        let ended_fs = fs.clone();
        let ended_mount = mounted.clone();
        let waiter = std::thread::spawn(move || {
            let result = background.join();
            // The kernel ended the session once the mount was gone; a session that failed
            // otherwise leaves it up, unserved: take it down while it is still ours.
            // A connection the kernel aborted as the mount went (ECONNABORTED after an
            // unmount) is such an end too: only a failure that leaves our mount up is an error.
            if let Err(e) = &result {
                let shown = ended_mount.mountpoint().display();
                if ended_mount.is_ours() {
                    log::error!("serving {shown} failed: {e}");
                    if let Err(e) = unmount(ended_mount.mountpoint(), ended_mount.dev(), true) {
                        log::error!("{e:#}");
                    }
                } else {
                    log::info!("{shown}: the kernel ended the connection as the mount went ({e})");
                }
            }
            ended_flag.store(true, Ordering::SeqCst);
            ended_fs.unwatch_space();
            on_end();
            result
        });
        Ok(ActiveMount {
            mountpoint,
            space: spec.space.clone(),
            grant: spec.grant.clone(),
            read_only: spec.read_only,
            no_exec: spec.no_exec,
            fs,
            gate,
            mounted,
            ended,
            waiter: Some(waiter),
        })
    }

    /// Whether the mount is gone (unmounted by anyone).
    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Commits open files and unmounts; with files still open, detaches the mount lazily
    /// (they keep working until closed) unless `lazy` is false and then reports EBUSY.
    pub fn unmount(&self, lazy: bool) -> anyhow::Result<()> {
        if self.has_ended() {
            return Ok(());
        }
        self.fs.commit_all();
        let Some(at) = self.mounted.current_path() else {
            // Unmounted or detached by someone else (its last files may still be open): the
            // path now holds another mount, or none, which is not ours to touch.
            log::info!(
                "{} is no longer mounted here: nothing to unmount",
                self.mountpoint.display()
            );
            return Ok(());
        };
        if at != self.mountpoint {
            log::info!(
                "{} is mounted at {} now (a directory above it was renamed): unmounting it there",
                self.mountpoint.display(),
                at.display()
            );
        }
        match unmount(&at, self.mounted.dev(), false) {
            Ok(()) => {
                self.gate.close();
                let (caught, ran_out) = self.gate.spins();
                log::debug!(
                    "{}: {caught} requests caught by spinning, {ran_out} spins ran out",
                    self.mountpoint.display()
                );
                Ok(())
            }
            Err(_) if lazy => {
                log::warn!("files still open under {}: detaching lazily", at.display());
                unmount(&at, self.mounted.dev(), true)
            }
            Err(e) => Err(e),
        }
    }

    /// Waits until the mount has ended.
    pub fn wait(mut self) -> anyhow::Result<()> {
        match self.waiter.take().map(|w| w.join()) {
            Some(Ok(Err(e))) => log::warn!("session ended with an error: {e}"),
            Some(Err(_)) => return Err(anyhow!("the filesystem thread panicked")),
            _ => {}
        }
        log::info!("unmounted {}", self.mountpoint.display());
        Ok(())
    }
}

/// How often a mount looks for running writers' output to publish (see `fs::stream`).
const PUBLISH_ROUND: Duration = Duration::from_millis(250);

/// Starts the thread that publishes running writers' output for the mount whose core is
/// `fs`; it ends with the mount.
fn spawn_publisher(fs: std::sync::Weak<Fs>) {
    let spawned = std::thread::Builder::new()
        .name("roomfs-publish".into())
        .spawn(move || {
            loop {
                std::thread::sleep(PUBLISH_ROUND);
                let Some(fs) = fs.upgrade() else { return };
                fs.publish_streams();
            }
        });
    if let Err(e) = spawned {
        log::warn!("running writers' output is shown at close only: no publisher thread ({e})");
    }
}

/// Refuses a data dir inside a roomfs mount (its own daemon's would wait on its own requests,
/// another's keeps the files through another grant and commit protocol, and lost writes in
/// practice). Checks the data dir, or the nearest directory above it that exists.
fn check_data_dir_place(data_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut probe = data_dir;
    let dev = loop {
        match std::fs::metadata(probe) {
            Ok(meta) => break meta.dev(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match probe.parent() {
                Some(parent) if parent.as_os_str().is_empty() => probe = Path::new("."),
                Some(parent) => probe = parent,
                None => return Ok(()),
            },
            // Opening it says what is wrong.
            Err(_) => return Ok(()),
        }
    };
    if let Some(m) = mounts()
        .unwrap_or_default()
        .into_iter()
        .find(|m| m.dev == dev && m.is_roomfs())
    {
        return Err(anyhow!(
            "the data dir {} is inside the roomfs mount {}: keep it on a local filesystem",
            data_dir.display(),
            m.mountpoint.display()
        ));
    }
    Ok(())
}

/// Opens the data dir of a process: creates it and its staging area (recovering and removing
/// what crashed processes left).
pub fn open_data_dir(data_dir: &Path) -> anyhow::Result<LocalBackend> {
    check_data_dir_place(data_dir)?;
    let (backend, stale) = LocalBackend::open(data_dir).with_context(|| {
        format!(
            "cannot prepare the data dir {} and its staging area",
            data_dir.display()
        )
    })?;
    if stale > 0 {
        log::info!("removed {stale} uncommitted working copies left by an earlier crash");
    }
    warn_if_open_to_others(data_dir);
    Ok(backend)
}

/// Warns when a root process's data dir lets other users in: the roots of the spaces in it
/// belong to their owners (agents), who could then reach their files on the disk, beside the
/// mounts, the grants and the daemon's choreography (SECURITY.md).
fn warn_if_open_to_others(data_dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    if let Ok(meta) = std::fs::metadata(data_dir)
        && meta.mode() & 0o077 != 0
    {
        log::warn!(
            "the data dir {} has mode {:o}: other users can reach the spaces' files on the disk, \
             outside the mounts and their grants; make it 0700 (chmod 700)",
            data_dir.display(),
            meta.mode() & 0o7777
        );
    }
}

/// Mounts `spec` and serves it in the foreground until it is unmounted (`roomfs unmount`,
/// `umount`) or the process gets SIGINT/SIGTERM, which commit pending writes and unmount.
///
/// `ready` (a mount helper waiting for this process in the background) hears once the mount is
/// up, or why it failed.
pub fn run(spec: &MountSpec, ready: Option<ReadyPipe>) -> anyhow::Result<()> {
    let mut ready = ready;
    let result = serve(spec, &mut ready);
    if let (Err(e), Some(ready)) = (&result, ready.take()) {
        ready.fail(e);
    }
    result
}

fn serve(spec: &MountSpec, ready: &mut Option<ReadyPipe>) -> anyhow::Result<()> {
    check_mountpoint(&spec.mountpoint)?;
    let local = open_data_dir(&spec.data_dir)?;
    let stored = spec
        .store
        .open(&spec.data_dir)
        .map_err(anyhow::Error::msg)?;
    let records = match spec.space.kind {
        SpaceKind::Session => Some(Arc::new(
            RecordStore::open(&spec.records_dir).with_context(|| {
                format!("cannot open records at {}", spec.records_dir.display())
            })?,
        )),
        SpaceKind::Room => None,
    };
    let (rooms, sessions) = match spec.space.kind {
        SpaceKind::Room => (stored, None),
        SpaceKind::Session => (None, stored),
    };
    let hub = Arc::new(Hub::with_stores(
        local,
        records,
        crate::events::Retention::default(),
        rooms,
        sessions,
    ));
    let resources = Resources {
        limits: spec.limits(&hub),
        hub,
        poller: Poller::start(spec.poll_window),
    };
    // Signals are caught before mounting, so one arriving early still unmounts cleanly.
    enum Event {
        Signal(i32),
        /// The session was ended (by the daemon: `session end`, its idle TTL).
        SessionEnded,
        Ended,
    }
    let (tx, rx) = mpsc::channel::<Event>();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("cannot install signal handlers")?;
    let signal_handle = signals.handle();
    let signal_tx = tx.clone();
    std::thread::spawn(move || {
        for sig in signals.forever() {
            let _ = signal_tx.send(Event::Signal(sig));
        }
    });
    let hub = resources.hub.clone();
    let end_tx = tx.clone();
    let mount = ActiveMount::start(spec, resources, move || {
        let _ = tx.send(Event::Ended);
    })?;
    let served = Arc::new(AtomicBool::new(true));
    if spec.space.kind == SpaceKind::Session {
        watch_session(hub, spec, served.clone(), move || {
            let _ = end_tx.send(Event::SessionEnded);
        });
    }
    if let Some(ready) = ready.take() {
        ready.ok();
    }
    for event in rx {
        match event {
            Event::Signal(sig) => {
                log::info!("signal {sig}: committing open files and unmounting");
                if let Err(e) = mount.unmount(true) {
                    log::error!("{e:#}");
                }
            }
            Event::SessionEnded => {
                log::warn!(
                    "{} was ended (its files are deleted): unmounting {}",
                    spec.space,
                    spec.mountpoint.display()
                );
                if let Err(e) = mount.unmount(true) {
                    log::error!("{e:#}");
                }
            }
            Event::Ended => break,
        }
    }
    served.store(false, Ordering::Relaxed);
    signal_handle.close();
    mount.wait()
}

/// Calls `ended` once, if the session `spec` mounts no longer exists while `served` holds:
/// the daemon ended it (and unmounts its own mounts of it). A standalone mount of it would
/// otherwise stay on a deleted directory, every call failing with `ENOENT`. Looks once a
/// second on the local disk (one `fstatat`), every 10 s on other stores (a request).
fn watch_session(
    hub: Arc<Hub>,
    spec: &MountSpec,
    served: Arc<AtomicBool>,
    ended: impl FnOnce() + Send + 'static,
) {
    let space = spec.space.clone();
    let every = match spec.store {
        crate::store::StoreConfig::Local => Duration::from_secs(1),
        _ => Duration::from_secs(10),
    };
    let watch = move || {
        let spaces = hub.spaces(space.kind);
        while served.load(Ordering::Relaxed) {
            std::thread::sleep(every);
            match spaces.space_exists(&space) {
                Ok(true) => {}
                Ok(false) => {
                    if served.load(Ordering::Relaxed) {
                        ended();
                    }
                    return;
                }
                // (Looked at again next time.)
                Err(e) => log::debug!("cannot tell whether {space} still exists: {e}"),
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("roomfs-session".into())
        .spawn(watch)
    {
        log::warn!("cannot watch for the end of {}: {e}", spec.space);
    }
}
