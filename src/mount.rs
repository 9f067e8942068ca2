//! Running a mount: checks the mount point, mounts a space with the FUSE adapter, serves it
//! until unmounted or signalled, and unmounts cleanly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use fuser::{Config, MountOption, Session, SessionACL};
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::fs::{Fs, FsOptions};
use crate::fuse::FuseAdapter;
use crate::space::SpaceId;
use crate::store::local::{LocalStore, StagingArea};

/// The source name roomfs mounts show in `/proc/mounts` begins with this.
pub const SOURCE_PREFIX: &str = "roomfs:";

/// Everything needed to mount one space.
#[derive(Clone, Debug)]
pub struct MountSpec {
    pub data_dir: PathBuf,
    pub space: SpaceId,
    pub mountpoint: PathBuf,
    pub sync_on_close: bool,
    /// How long the kernel caches attributes and names.
    pub cache_ttl: Duration,
    /// Threads serving kernel requests.
    pub threads: usize,
    /// What the mount may touch.
    pub grant: crate::grant::Grant,
}

/// One line of `/proc/self/mountinfo` that matters here.
#[derive(Debug)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

impl MountEntry {
    /// Whether this is a roomfs mount.
    pub fn is_roomfs(&self) -> bool {
        self.fstype.starts_with("fuse") && self.source.starts_with(SOURCE_PREFIX)
    }
}

/// The current mounts of this process's namespace.
pub fn mounts() -> std::io::Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mountpoint = unescape(left.split(' ').nth(4)?);
            let mut right = right.split(' ');
            let fstype = right.next()?.to_string();
            let source = unescape(right.next()?);
            Some(MountEntry {
                mountpoint: PathBuf::from(mountpoint),
                fstype,
                source,
            })
        })
        .collect())
}

/// Decodes the octal escapes (`\040` for a space) of mountinfo fields.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount at exactly `path`, if any (the most recent one wins).
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts().ok()?.into_iter().rfind(|m| m.mountpoint == path)
}

/// Checks and canonicalises a mount point, with a message that says what is wrong.
pub fn check_mountpoint(path: &Path) -> Result<PathBuf, String> {
    let shown = path.display();
    if let Err(e) = std::fs::metadata(path)
        && e.raw_os_error() == Some(libc::ENOTCONN)
    {
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
            unmount(&m.mountpoint, true)?;
        }
    }
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("mount point {shown} does not exist"),
        _ => format!("mount point {shown} is not usable: {e}"),
    })?;
    if !meta.is_dir() {
        return Err(format!("mount point {shown} is not a directory"));
    }
    let canonical = path
        .canonicalize()
        .map_err(|e| format!("mount point {shown} is not usable: {e}"))?;
    if let Some(m) = mount_at(&canonical) {
        return Err(format!(
            "mount point {} is already in use (a {} filesystem is mounted there)",
            canonical.display(),
            m.fstype
        ));
    }
    Ok(canonical)
}

/// Unmounts `path`; with `lazy`, detaches it even while files are open.
pub fn unmount(path: &Path, lazy: bool) -> Result<(), String> {
    use nix::mount::{MntFlags, umount2};
    let flags = if lazy {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    match umount2(path, flags) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => Err(format!(
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
                _ => Err(format!(
                    "not permitted to unmount {} (run as root or as the user who mounted it)",
                    path.display()
                )),
            }
        }
        Err(e) => Err(format!("could not unmount {}: {e}", path.display())),
    }
}

/// Mounts `spec` and serves it in the foreground until it is unmounted (`roomfs unmount`,
/// `umount`) or the process gets SIGINT/SIGTERM, which commit pending writes and unmount.
pub fn run(spec: &MountSpec) -> Result<(), String> {
    let mountpoint = check_mountpoint(&spec.mountpoint)?;
    if !Path::new("/dev/fuse").exists() {
        return Err(
            "/dev/fuse is missing: load the fuse kernel module (modprobe fuse), or give \
                    the container the device (--device /dev/fuse)"
                .into(),
        );
    }
    let data_dir = &spec.data_dir;
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", data_dir.display()))?;
    let (staging, stale) = StagingArea::create(data_dir)
        .map_err(|e| format!("cannot prepare staging under {}: {e}", data_dir.display()))?;
    if stale > 0 {
        log::info!("removed {stale} uncommitted working copies left by an earlier crash");
    }
    let root = data_dir.join(spec.space.rel_dir());
    let new_space = !root.exists();
    let store = LocalStore::open(root.clone(), Arc::new(staging))
        .map_err(|e| format!("cannot open {} at {}: {e}", spec.space, root.display()))?;
    let is_root = nix::unistd::geteuid().is_root();
    if new_space && is_root {
        // A new space belongs to whoever owns the mount point, so that user can write in it.
        let owner = std::fs::metadata(&mountpoint).map_err(|e| e.to_string())?;
        use std::os::unix::fs::MetadataExt;
        std::os::unix::fs::chown(&root, Some(owner.uid()), Some(owner.gid()))
            .map_err(|e| format!("cannot set the owner of {}: {e}", root.display()))?;
    }
    let fs = Arc::new(Fs::new(
        Arc::new(store),
        FsOptions {
            sync_on_close: spec.sync_on_close,
            owner_from_caller: is_root,
            grant: spec.grant.clone(),
        },
    ));
    let adapter = FuseAdapter::new(fs.clone(), spec.cache_ttl);
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("{SOURCE_PREFIX}{}", spec.space.rel_dir().display())),
        MountOption::Subtype("roomfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    // Sandboxed agents usually run as other users than the daemon.
    config.acl = if is_root {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(spec.threads.max(1));
    config.clone_fd = true;
    let session = Session::new(adapter, &mountpoint, &config).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "not permitted to mount at {}: run as root, or install fuse3 for unprivileged mounts",
            mountpoint.display()
        ),
        _ => format!("cannot mount at {}: {e}", mountpoint.display()),
    })?;
    let background = session
        .spawn()
        .map_err(|e| format!("cannot start serving {}: {e}", mountpoint.display()))?;
    fs.set_kernel_cache(Box::new(crate::fuse::Notify(background.notifier())));
    log::info!(
        "mounted {} at {} (data in {}, grant: {})",
        spec.space,
        mountpoint.display(),
        root.display(),
        spec.grant
    );

    let (done_tx, done_rx) = mpsc::channel::<()>();
    let waiter = std::thread::spawn(move || {
        let result = background.join();
        let _ = done_tx.send(());
        result
    });
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let signal_handle = signals.handle();
    let signal_fs = fs.clone();
    let signal_mountpoint = mountpoint.clone();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            log::info!("signal {sig}: committing open files and unmounting");
            signal_fs.commit_all();
            if unmount(&signal_mountpoint, false).is_err() {
                log::warn!("files still open: detaching the mount lazily");
                let _ = unmount(&signal_mountpoint, true);
            }
        }
    });
    // Wait for the session to end (unmounted by us, `roomfs unmount` or `umount`).
    let _ = done_rx.recv();
    signal_handle.close();
    match waiter.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::warn!("session ended with an error: {e}"),
        Err(_) => return Err("the filesystem thread panicked".into()),
    }
    log::info!("unmounted {}", mountpoint.display());
    Ok(())
}
