//! Keeping the kernel's caches of this mount right when others change the space: another
//! mount of the same space in this process, or the daemon itself (a session exported into a
//! room). The space tells every mount but the one that made a change ([`Space::changed`]); a
//! mount then tells its kernel what it cached of that path is stale.
//!
//! Nothing here waits for the kernel: notifications are queued for the FUSE adapter's notifier
//! thread (see [`KernelCache`]). A file open in this mount gets its attributes invalidated
//! only: its readers keep the version they opened, and its pages stay theirs.
//!
//! [`Space::changed`]: crate::space::Space::changed

use std::path::Path;

use super::{Fs, KernelCache, lock, read_lock};
use crate::space::SpaceWatcher;

impl SpaceWatcher for Fs {
    fn changed_elsewhere(&self, path: &Path) {
        let Some(kernel) = self.kernel.get() else {
            return;
        };
        let Some((parent, ino)) = read_lock(&self.table).resolve(path) else {
            return; // the kernel knows nothing on the way to it
        };
        notify(kernel.as_ref(), parent, path, ino, |ino| {
            let mut opens = lock(&self.opens);
            match opens.get_mut(&ino) {
                Some(state) => {
                    // Its cached pages are of another version now.
                    state.cached_version = None;
                    !state.handles.is_empty()
                }
                None => false,
            }
        });
    }
}

/// Queues the notifications for `path` (in the directory `parent`, itself `ino` where known);
/// `open(ino)` says whether the inode is open in this mount (and forgets its cached version).
fn notify(
    kernel: &dyn KernelCache,
    parent: super::Ino,
    path: &Path,
    ino: Option<super::Ino>,
    open: impl FnOnce(super::Ino) -> bool,
) {
    kernel.attributes_changed(parent);
    if let Some(name) = path.file_name() {
        kernel.entry_changed(parent, name);
    }
    if let Some(ino) = ino {
        if open(ino) {
            kernel.attributes_changed(ino);
        } else {
            kernel.data_changed(ino);
        }
    }
}
