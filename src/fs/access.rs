//! Grant decisions for the core's operations (the decisions themselves are `grant`'s): every
//! refusal is logged, so operators see what a sandbox tried.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{Fs, FsResult, deny};
use crate::grant::Access;
use crate::store::Kind;

impl Fs {
    /// The grant's decision for `op` on `path`; a refusal is logged so operators see what a
    /// sandbox tried.
    pub(super) fn allow(&self, op: &str, path: &Path, access: Access) -> FsResult<()> {
        if self.options.grant.is_full() {
            return Ok(());
        }
        self.options
            .grant
            .check(path.as_os_str().as_bytes(), access)
            .map_err(|denied| deny(op, path, &denied))
    }

    /// Directories above granted prefixes may be traversed and listed (filtered), not read.
    pub(super) fn allow_traverse(&self, op: &str, path: &Path) -> FsResult<()> {
        if self.options.grant.can_traverse(path.as_os_str().as_bytes()) {
            Ok(())
        } else {
            Err(deny(op, path, &"outside the grant"))
        }
    }

    /// Under a restricted grant, the symlinks an entry at `from` brings to `to` (moved or
    /// linked there): itself, or those anywhere below a directory. The target of a relative
    /// link is read from where it is, so a link allowed where it was made may lead out from
    /// there (`d/up -> ..` moved to `up`; `a/b/c/out -> ../../..` in a directory moved up):
    /// each is checked at its new place as `symlink` checks a new one (`EACCES`).
    pub(super) fn allow_links_moved(&self, op: &str, from: &Path, to: &Path) -> FsResult<()> {
        if self.options.links_anywhere {
            return Ok(());
        }
        match self.store.stat(from)?.kind {
            Kind::Symlink => return self.allow_link_target(op, to, &self.store.readlink(from)?),
            Kind::Dir => {}
            _ => return Ok(()),
        }
        let below = |base: &Path, rel: &Path| match rel.as_os_str().is_empty() {
            true => base.to_path_buf(),
            false => base.join(rel),
        };
        let mut dirs = vec![PathBuf::new()];
        while let Some(rel) = dirs.pop() {
            for e in self.store.list(&below(from, &rel))? {
                let rel = rel.join(&e.name);
                match e.kind {
                    Kind::Dir => dirs.push(rel),
                    Kind::Symlink => {
                        let target = self.store.readlink(&from.join(&rel))?;
                        self.allow_link_target(op, &to.join(&rel), &target)?;
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Under a restricted grant, a symlink at `link` may only point at paths inside the grant:
    /// never outside the space (absolute, or climbing above the root), outside the grant, or
    /// at a directory above it, because other participants of the room would follow it with
    /// their own rights.
    pub(super) fn allow_link_target(&self, op: &str, link: &Path, target: &Path) -> FsResult<()> {
        if self.options.links_anywhere {
            return Ok(());
        }
        let mut resolved: Vec<&OsStr> = link
            .parent()
            .map(|p| p.iter().collect())
            .unwrap_or_default();
        let mut inside = !target.is_absolute();
        let mut descended = false;
        for part in target.iter() {
            match part.as_bytes() {
                b"." => {}
                // A `..` after a name climbs from wherever that name leads, which a symlink
                // (made before or after this one) puts elsewhere than its text says: `up -> ..`
                // makes `sub/up/sub/up/../../../../etc` leave the space. Only `..` before any
                // name are resolved here, and exactly (each link on the way is checked in turn).
                b".." if descended => inside = false,
                b".." => inside &= resolved.pop().is_some(),
                _ => {
                    descended = true;
                    resolved.push(part);
                }
            }
        }
        let resolved: PathBuf = resolved.iter().collect();
        // Inside the grant itself, not merely on the way to it (the root, `a/` of `a/b/`): a
        // link to a directory above the grant would let a second link made through it
        // (`up -> ..`, then `x -> up/private`) lead out, its text all names.
        if inside
            && self
                .options
                .grant
                .check(resolved.as_os_str().as_bytes(), Access::Read)
                .is_ok()
        {
            Ok(())
        } else {
            Err(deny(
                op,
                link,
                &format!("its target {target:?} leaves the grant"),
            ))
        }
    }

    /// Whether `name` in the directory `dir` is visible through the grant.
    pub(super) fn shows(&self, dir: &Path, name: &OsStr) -> bool {
        self.options
            .grant
            .shows(dir.as_os_str().as_bytes(), name.as_bytes())
    }
}
