//! The local backend: the spaces of a data dir, `<data-dir>/rooms/<id>` and
//! `<data-dir>/sessions/<id>`, made, opened, counted and removed through a descriptor held on
//! the data dir, never through a symlink (see `at`). The data dir itself may be a symlink the
//! operator made; nothing below it is followed: a space directory replaced by a symlink is
//! refused when opened, and only the link itself is removed when the space is deleted.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::LocalStore;
use super::at::{Dir, Tally};
use super::staging::StagingArea;
use crate::space::SpaceId;
use crate::store::Owner;

/// The spaces of one data dir, and its staging area.
pub struct LocalBackend {
    /// The data dir as the operator named it (for messages).
    path: PathBuf,
    data: Dir,
    staging: Arc<StagingArea>,
}

impl LocalBackend {
    /// Opens the data dir `path` (created if missing) and its staging area, recovering what
    /// crashed processes left there; returns it and how many of their working copies went.
    pub fn open(path: &Path) -> io::Result<(LocalBackend, usize)> {
        let data = Dir::open_trusted(path, true)?;
        let (staging, removed) = StagingArea::create(&data)?;
        Ok((
            LocalBackend {
                path: path.to_path_buf(),
                data,
                staging: Arc::new(staging),
            },
            removed,
        ))
    }

    /// The data dir, held open (daemon state lives beneath it too).
    pub fn data_dir(&self) -> &Dir {
        &self.data
    }

    /// Where `space` lives, for messages.
    pub fn describe(&self, space: &SpaceId) -> PathBuf {
        self.path.join(space.rel_dir())
    }

    /// The directory holding spaces of `space`'s kind (`rooms` or `sessions`), made if missing.
    fn kind_dir(&self, space: &SpaceId) -> io::Result<Dir> {
        Ok(self.data.create_dirs(Path::new(space.kind.dir()), 0o755)?.0)
    }

    /// Opens the store of `space`. With `create`, a missing space is made first, owned by
    /// the given owner (or the daemon's own user); without, a missing one is `ENOENT`. A space
    /// whose directory is not a directory (a symlink put there behind our back) is refused.
    pub fn open_space(&self, space: &SpaceId, create: Option<Owner>) -> io::Result<LocalStore> {
        let kind = self.kind_dir(space)?;
        let name = OsStr::new(&space.id);
        if let Some(owner) = create {
            let c = std::ffi::CString::new(space.id.as_bytes())
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: a valid descriptor and a NUL-terminated name.
            let made = unsafe { libc::mkdirat(kind.as_raw_fd(), c.as_ptr(), 0o755) } == 0;
            if !made {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(e);
                }
            }
            let root = open_space_dir(&kind, name)?;
            // Its top directories spread over the disk (see `spread_subdirs`); spaces made
            // before this get it at their next open too.
            super::at::spread_subdirs(root.as_fd());
            if made && let Some((uid, gid)) = owner {
                // On the descriptor: nothing can be swapped in between.
                nix::unistd::fchown(&root, Some(uid.into()), Some(gid.into()))
                    .map_err(io::Error::from)?;
            }
            return Ok(LocalStore::new(root, self.staging.clone()));
        }
        let root = open_space_dir(&kind, name)?;
        super::at::spread_subdirs(root.as_fd());
        Ok(LocalStore::new(root, self.staging.clone()))
    }

    /// Whether `space` exists.
    pub fn space_exists(&self, space: &SpaceId) -> io::Result<bool> {
        match self.open_existing(space) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// What `space` holds (entries of every kind, bytes of files); `None` if it does not exist.
    pub fn space_usage(&self, space: &SpaceId) -> io::Result<Option<Tally>> {
        match self.open_existing(space) {
            Ok(dir) => dir.tally().map(Some),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes `space` and everything in it (never following a symlink: a space directory
    /// replaced by one loses only the link). Returns what was removed, the space directory
    /// itself not counted.
    pub fn delete_space(&self, space: &SpaceId) -> io::Result<Tally> {
        let kind = match self.data.open(Path::new(space.kind.dir())) {
            Ok(kind) => kind,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Tally::default()),
            Err(e) => return Err(e),
        };
        let mut removed = kind.remove_all(OsStr::new(&space.id))?;
        removed.entries = removed.entries.saturating_sub(1);
        Ok(removed)
    }

    fn open_existing(&self, space: &SpaceId) -> io::Result<Dir> {
        let kind = self.data.open(Path::new(space.kind.dir()))?;
        open_space_dir(&kind, OsStr::new(&space.id))
    }
}

/// Opens the space directory `name` in `kind`, refusing anything but a directory.
fn open_space_dir(kind: &Dir, name: &OsStr) -> io::Result<Dir> {
    kind.open(Path::new(name))
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP | libc::ENOTDIR) => io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is not a directory (a symlink or a file is in its place); remove it",
                    name.to_string_lossy()
                ),
            ),
            _ => e,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::SpaceKind;
    use std::fs;

    #[test]
    fn a_new_data_dir_is_its_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("var/lib/roomfs");
        LocalBackend::open(&data).unwrap();
        let mode = fs::metadata(&data).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn spaces_are_made_counted_and_removed_without_following_links() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), b"keep").unwrap();
        let data = tmp.path().join("data");
        let (backend, _) = LocalBackend::open(&data).unwrap();
        let room = SpaceId::new(SpaceKind::Room, "r1").unwrap();
        assert!(!backend.space_exists(&room).unwrap());
        assert!(backend.space_usage(&room).unwrap().is_none());
        let err = backend.open_space(&room, None).err().unwrap();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        backend.open_space(&room, Some(None)).unwrap();
        fs::write(data.join("rooms/r1/a"), b"12345").unwrap();
        fs::create_dir(data.join("rooms/r1/d")).unwrap();
        std::os::unix::fs::symlink(&outside, data.join("rooms/r1/d/out")).unwrap();
        let usage = backend.space_usage(&room).unwrap().unwrap();
        assert_eq!((usage.entries, usage.bytes), (3, 5));
        let removed = backend.delete_space(&room).unwrap();
        assert_eq!((removed.entries, removed.bytes), (3, 5));
        assert!(!data.join("rooms/r1").exists());
        assert_eq!(fs::read(outside.join("keep")).unwrap(), b"keep");

        // A session directory replaced by a symlink behind the daemon's back.
        let session = SpaceId::new(SpaceKind::Session, "s1").unwrap();
        backend.open_space(&session, Some(None)).unwrap();
        fs::remove_dir(data.join("sessions/s1")).unwrap();
        std::os::unix::fs::symlink(&outside, data.join("sessions/s1")).unwrap();
        let err = backend.open_space(&session, Some(None)).err().unwrap();
        assert!(err.to_string().contains("not a directory"), "{err}");
        assert!(backend.space_usage(&session).is_err());
        let removed = backend.delete_space(&session).unwrap();
        assert_eq!(removed.entries, 0, "only the link went");
        assert!(fs::symlink_metadata(data.join("sessions/s1")).is_err());
        assert_eq!(fs::read(outside.join("keep")).unwrap(), b"keep");

        // `rooms` itself a link: nothing is made or read through it.
        fs::remove_dir_all(data.join("rooms")).unwrap();
        std::os::unix::fs::symlink(&outside, data.join("rooms")).unwrap();
        assert!(backend.open_space(&room, Some(None)).is_err());
        assert!(!outside.join("r1").exists());
    }

    #[test]
    fn a_space_and_its_top_directories_spread_their_directories_over_ext4() {
        use crate::store::Store;
        // On the disk of /var/tmp (ext4 here and in CI); elsewhere the hint does nothing.
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let mut fs_info: libc::statfs = unsafe { std::mem::zeroed() };
        let path = std::ffi::CString::new(tmp.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path and a struct to fill.
        assert_eq!(unsafe { libc::statfs(path.as_ptr(), &mut fs_info) }, 0);
        if fs_info.f_type != libc::EXT4_SUPER_MAGIC {
            eprintln!(
                "skipped: /var/tmp is not ext4 (f_type {:#x})",
                fs_info.f_type
            );
            return;
        }
        let data = tmp.path().join("data");
        let (backend, _) = LocalBackend::open(&data).unwrap();
        let room = SpaceId::new(SpaceKind::Room, "r1").unwrap();
        let store = backend.open_space(&room, Some(None)).unwrap();
        let spreads = |rel: &str| {
            let dir = fs::File::open(data.join("rooms/r1").join(rel)).unwrap();
            super::super::at::spreads_subdirs(dir.as_fd())
        };
        assert!(spreads(""), "the space root");
        store.mkdir(Path::new("agent1"), 0o755, None).unwrap();
        store.mkdir(Path::new("agent1/src"), 0o755, None).unwrap();
        assert!(spreads("agent1"), "a directory at the top");
        assert!(!spreads("agent1/src"), "one deeper stays near its parent");
        // A space made before is marked at its next open.
        fs::create_dir(data.join("rooms/old")).unwrap();
        let old = SpaceId::new(SpaceKind::Room, "old").unwrap();
        backend.open_space(&old, None).unwrap();
        let dir = fs::File::open(data.join("rooms/old")).unwrap();
        assert!(super::super::at::spreads_subdirs(dir.as_fd()));
    }
}
