//! Copying paths of one space into another (`roomfs session end ID --export outputs/ --to-room
//! R`), through the two spaces' stores, like any other write:
//!
//! - Every file is committed the way a close commits it: a working copy in the store's
//!   staging area, swapped in atomically (no temporary name ever shows in the room), made
//!   durable (the session is deleted right after), counted against the room's limits, and
//!   announced to the room's mounts and its events ([`Space::changed`]) so their caches drop what they knew.
//! - Nothing is followed: the source is read through its store (resolved beneath the session's
//!   directory, never through a symlink); a symlink inside the exported tree is exported as a
//!   symlink, a FIFO or socket as a name (never opened); device nodes are left out.
//! - Each entry is written under a claim of its name in the room ([`Space::claim`]), as a
//!   mount's change is, so the room's mounts in this process do not change it meanwhile.
//! - Nothing is written unless all of it can be: the whole source tree and every destination
//!   path are checked first. A symlink or a non-directory anywhere on the room's side of a
//!   destination path, a kind that cannot replace what the room has, or the room's limits
//!   refuse the export with a message naming the path, and the room is left as it was.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use super::Space;
use super::claims::Span;
use crate::events::Changed;
use crate::store::{
    Change, CommitRequest, Kind, Meta, SetAttr, StoreError, StoreResult, TimeSpec, copy_range,
};

/// Why an export did not happen, or stopped.
#[derive(Debug)]
pub enum ExportError {
    /// A path to export does not exist; nothing was written.
    Missing(String),
    /// Refused before anything was written.
    Refused(String),
    /// Writing failed part way: `done` entries had been written into the destination.
    Failed {
        what: String,
        source: StoreError,
        done: u64,
    },
}

impl fmt::Display for ExportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExportError::Missing(why) | ExportError::Refused(why) => {
                write!(f, "{why}; nothing was exported")
            }
            ExportError::Failed { what, source, done } => write!(
                f,
                "{what}: {source} (after {done} entries had been exported)"
            ),
        }
    }
}

impl std::error::Error for ExportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ExportError::Missing(_) | ExportError::Refused(_) => None,
            ExportError::Failed { source, .. } => Some(source),
        }
    }
}

/// One entry to copy.
struct Item {
    path: PathBuf,
    meta: Meta,
    /// What the destination has there now.
    existing: Option<Meta>,
}

/// What an export wrote.
#[derive(Debug, Default)]
pub struct Exported {
    /// Entries written (files, directories, links, names).
    pub entries: u64,
    /// Bytes of the files written.
    pub bytes: u64,
}

fn errno(e: &StoreError) -> Option<i32> {
    Some(e.raw_os_error())
}

/// Copies each of `paths` (relative, no `..`) of `from` to the same path in `to`; `progress`
/// hears of each entry written. See the module docs for the rules.
pub fn export(
    from: &Space,
    to: &Space,
    paths: &[PathBuf],
    mut progress: impl FnMut(&Path),
) -> Result<Exported, ExportError> {
    let items = plan(from, to, paths)?;
    check_limits(to, &items)?;
    // Made on behalf of the session: `sessions/<id>` in the room's events.
    let participant: std::sync::Arc<str> = from.id().rel_dir().to_string_lossy().into();
    let mut done = Exported::default();
    for item in &items {
        write_item(from, to, item).map_err(|(what, source)| ExportError::Failed {
            what,
            source,
            done: done.entries,
        })?;
        done.entries += 1;
        if item.meta.kind == Kind::File {
            done.bytes += item.meta.size;
        }
        to.changed(&[exported(item)], &participant, None);
        progress(&item.path);
    }
    Ok(done)
}

/// What writing `item` changed in the destination.
fn exported(item: &Item) -> Changed {
    match (item.meta.kind, &item.existing) {
        (Kind::Dir, Some(m)) if m.kind == Kind::Dir => Changed::attributes(&item.path),
        (Kind::Dir, _) => Changed::folder_created(&item.path),
        (_, _) => Changed::file(&item.path, item.meta.size),
    }
}

/// Checks that `export` of these paths would go through, writing nothing.
pub fn check(from: &Space, to: &Space, paths: &[PathBuf]) -> Result<(), ExportError> {
    check_limits(to, &plan(from, to, paths)?)
}

/// Every entry of the source trees, parents first, with what the destination has there;
/// refuses what the destination cannot take.
fn plan(from: &Space, to: &Space, paths: &[PathBuf]) -> Result<Vec<Item>, ExportError> {
    let (from_name, to_name) = (from.id().to_string(), to.id().to_string());
    let mut items = Vec::new();
    let mut seen = HashSet::new();
    for root in paths {
        // The room's side above the exported path: directories, or nothing yet (made like
        // the session's, first).
        let mut above = PathBuf::new();
        let mut missing = false;
        for part in root.parent().into_iter().flat_map(Path::iter) {
            above.push(part);
            if !missing {
                match to.store().stat(&above) {
                    Ok(m) if m.kind == Kind::Dir => continue,
                    Ok(m) => {
                        return Err(ExportError::Refused(format!(
                            "{to_name} has {} at {}, where {} needs a directory",
                            kind_name(m.kind),
                            above.display(),
                            root.display()
                        )));
                    }
                    Err(e) if errno(&e) == Some(libc::ENOENT) => missing = true,
                    Err(e) => return Err(refused_at(&to_name, &above, &e)),
                }
            }
            if seen.insert(above.clone()) {
                let meta = from
                    .store()
                    .stat(&above)
                    .map_err(|e| refused_at(&from_name, &above, &e))?;
                items.push(Item {
                    path: above.clone(),
                    meta,
                    existing: None,
                });
            }
        }
        let meta = from.store().stat(root).map_err(|e| match errno(&e) {
            Some(libc::ENOENT) => ExportError::Missing(format!(
                "{from_name} has nothing at {} to export",
                root.display()
            )),
            _ => refused_at(&from_name, root, &e),
        })?;
        let mut stack = vec![(root.clone(), meta)];
        while let Some((path, meta)) = stack.pop() {
            if !seen.insert(path.clone()) {
                continue;
            }
            if matches!(meta.kind, Kind::BlockDevice | Kind::CharDevice) {
                log::warn!(
                    "export from {from_name}: leaving out the device node {}",
                    path.display()
                );
                continue;
            }
            let existing = match to.store().stat(&path) {
                Ok(m) => Some(m),
                Err(e) if errno(&e) == Some(libc::ENOENT) => None,
                Err(e) => return Err(refused_at(&to_name, &path, &e)),
            };
            if let Some(have) = &existing {
                let fits = matches!(
                    (meta.kind, have.kind),
                    (Kind::Dir, Kind::Dir) | (Kind::File, Kind::File)
                );
                if !fits {
                    return Err(ExportError::Refused(format!(
                        "{to_name} has {} at {}, which {} from {from_name} cannot replace",
                        kind_name(have.kind),
                        path.display(),
                        kind_name(meta.kind)
                    )));
                }
            }
            if meta.kind == Kind::Dir {
                let mut children = from
                    .store()
                    .list(&path)
                    .map_err(|e| refused_at(&from_name, &path, &e))?;
                children.sort_by(|a, b| b.name.cmp(&a.name));
                for child in children {
                    let child_path = path.join(&child.name);
                    let child_meta = match from.store().stat(&child_path) {
                        Ok(m) => m,
                        Err(e) if errno(&e) == Some(libc::ENOENT) => continue,
                        Err(e) => return Err(refused_at(&from_name, &child_path, &e)),
                    };
                    stack.push((child_path, child_meta));
                }
            }
            items.push(Item {
                path,
                meta,
                existing,
            });
        }
    }
    Ok(items)
}

/// Refuses the export when the destination's limits could not take it all.
fn check_limits(to: &Space, items: &[Item]) -> Result<(), ExportError> {
    let Some(q) = to.quota() else {
        return Ok(());
    };
    let (limits, usage) = (q.limits(), q.usage());
    let mut entries = 0u64;
    let (mut grown, mut shrunk) = (0u64, 0u64);
    for item in items {
        if item.existing.is_none() {
            entries += 1;
        }
        if item.meta.kind == Kind::File {
            if let Some(max) = limits.max_file_bytes
                && item.meta.size > max
            {
                return Err(ExportError::Refused(format!(
                    "{} is {} bytes, over {}'s file size limit of {max} (EFBIG)",
                    item.path.display(),
                    item.meta.size,
                    to.id()
                )));
            }
            grown += item.meta.size;
            shrunk += item.existing.as_ref().map_or(0, |m| m.size);
        }
    }
    if let Some(max) = limits.max_files
        && usage.files + entries > max
    {
        return Err(ExportError::Refused(format!(
            "{} new entries would take {} over its limit of {max} entries (EDQUOT)",
            entries,
            to.id()
        )));
    }
    if let Some(max) = limits.max_bytes
        && (usage.bytes + grown).saturating_sub(shrunk) > max
    {
        return Err(ExportError::Refused(format!(
            "{} bytes would take {} over its limit of {max} bytes (EDQUOT)",
            grown,
            to.id()
        )));
    }
    Ok(())
}

/// Writes one planned entry into `to` (its parent is there already).
fn write_item(from: &Space, to: &Space, item: &Item) -> Result<(), (String, StoreError)> {
    let store = to.store();
    let path = &item.path;
    // As a mount's change of the name claims it: no rename, unlink or commit through the
    // room's mounts in this process runs between the steps below (a name swapped for a
    // directory or a link between a commit's check and its exchange, or a mkdir and its chmod).
    let _claim = to.claim(&[(path.as_path(), Span::Entry)]);
    let at = |what: &str| format!("{what} {} in {}", path.display(), to.id());
    let owner = Some((item.meta.uid, item.meta.gid));
    let new_entry = item.existing.is_none();
    if new_entry && let Some(q) = to.quota() {
        q.add_entry()
            .map_err(|e| (at("counting"), StoreError::errno(e.0)))?;
    }
    let written = (|| -> Result<(), (String, StoreError)> {
        match item.meta.kind {
            Kind::Dir => {
                if new_entry {
                    store
                        .mkdir(path, item.meta.perm, owner)
                        .map_err(|e| (at("creating directory"), e))?;
                }
            }
            Kind::Symlink => {
                let target = from
                    .store()
                    .readlink(path)
                    .map_err(|e| (format!("reading link {}", path.display()), e))?;
                store
                    .symlink(&target, path, owner)
                    .map_err(|e| (at("creating link"), e))?;
                store.sync(path.parent().unwrap_or(Path::new(""))).ok();
            }
            Kind::Fifo | Kind::Socket => {
                store
                    .mknod(path, item.meta.kind, item.meta.perm, owner)
                    .map_err(|e| (at("creating"), e))?;
            }
            Kind::File => put_file(from, to, item).map_err(|e| (at("writing"), e))?,
            Kind::BlockDevice | Kind::CharDevice => {}
        }
        Ok(())
    })();
    if written.is_err()
        && new_entry
        && let Some(q) = to.quota()
    {
        q.remove_entry(0);
    }
    written
}

/// Commits the source file's content at the item's path, durably, keeping its mode, owner and
/// modification time where the file is new (a file replaced keeps the room's mode and owner,
/// as a close would).
fn put_file(from: &Space, to: &Space, item: &Item) -> StoreResult<()> {
    let store = to.store();
    let path = &item.path;
    let content = from.store().open(path)?;
    let size = content.meta().size;
    if item.existing.is_none() {
        store.create(
            path,
            item.meta.perm,
            Some((item.meta.uid, item.meta.gid)),
            true,
        )?;
    }
    let base = store.open(path)?;
    let old = base.meta().size;
    if let Some(q) = to.quota() {
        q.resize(old, size).map_err(|e| StoreError::errno(e.0))?;
    }
    let committed = (|| {
        let copy = store.working_copy(path)?;
        copy_range(content.as_ref(), copy.as_ref(), 0, size)?;
        copy.set_len(size)?;
        store.commit(CommitRequest {
            path,
            base: &base,
            change: Change::Whole(&copy),
            durable: true,
            attrs: None,
        })
    })();
    match committed {
        Ok(done) => {
            if let Some(q) = to.quota() {
                q.settle((old, size), (done.replaced_size, done.content.meta().size));
            }
        }
        Err(e) => {
            if let Some(q) = to.quota() {
                let _ = q.resize(size, old);
            }
            return Err(e);
        }
    }
    let times = SetAttr {
        mtime: Some(TimeSpec::At(item.meta.mtime)),
        ..Default::default()
    };
    store.set_attr(path, &times)?;
    Ok(())
}

fn refused_at(space: &str, path: &Path, e: &StoreError) -> ExportError {
    let why = match errno(e) {
        Some(libc::ELOOP) => "a symlink is in the way".to_string(),
        Some(libc::ENOTDIR) => "a file is where a directory should be".to_string(),
        _ => e.to_string(),
    };
    ExportError::Refused(format!("{space}: cannot use {}: {why}", path.display()))
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::File => "a file",
        Kind::Dir => "a directory",
        Kind::Symlink => "a symlink",
        Kind::Fifo => "a FIFO",
        Kind::Socket => "a socket",
        Kind::BlockDevice | Kind::CharDevice => "a device node",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::{SpaceId, SpaceKind};
    use crate::store::mem::MemStore;
    use std::sync::Arc;
    use std::time::Duration;

    fn space(kind: SpaceKind, id: &str) -> Space {
        Space::new(
            SpaceId::new(kind, id).unwrap(),
            Arc::new(MemStore::new()),
            None,
        )
    }

    /// An entry is written under a claim of its name in the room, as a mount's change is.
    #[test]
    fn each_entry_is_written_under_a_claim_of_its_name() {
        let (session, room) = (space(SpaceKind::Session, "s"), space(SpaceKind::Room, "r"));
        session
            .store()
            .create(Path::new("out"), 0o644, None, true)
            .unwrap();
        let paths = [PathBuf::from("out")];
        check(&session, &room, &paths).unwrap();
        let held = room.claim(&[(Path::new("out"), Span::Entry)]);
        std::thread::scope(|s| {
            let exporting = s.spawn(|| export(&session, &room, &paths, |_| {}));
            std::thread::sleep(Duration::from_millis(200));
            // Not written while a change of the name holds it.
            assert!(room.store().stat(Path::new("out")).is_err());
            assert!(!exporting.is_finished());
            drop(held);
            exporting.join().unwrap().unwrap();
        });
        assert!(room.store().stat(Path::new("out")).is_ok());
    }
}
