//! A store that fails on purpose: wraps another and makes chosen operations fail with a chosen
//! errno, or wait first, a number of times or until cleared (as mountpoint-s3's failure
//! client does). The core's tests use it to show that every backend failure reaches the
//! program as the documented errno, that a failed commit leaves the previous version, and
//! that a slow backend blocks only the operation waiting for it.

use std::any::Any;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::XattrMode;
use super::{
    Capabilities, Change, CommitRequest, Committed, Content, CopyStat, DirEntry, Kind, Meta, Owner,
    RenameMode, SetAttr, Store, StoreError, StoreResult, StoreStatfs, Usage, WorkingCopy,
};

/// The operations faults can be injected into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Stat,
    List,
    Open,
    Create,
    WorkingCopy,
    /// Writes into a working copy (`write_at`, `set_len`, `zero`, `reserve`).
    CopyWrite,
    Commit,
    Mknod,
    Mkdir,
    Rmdir,
    Unlink,
    Rename,
    Link,
    Symlink,
    Readlink,
    SetAttr,
    Sync,
    Statfs,
    Usage,
    Xattr,
}

/// One planned fault.
#[derive(Clone, Debug)]
struct Fault {
    op: Op,
    /// Fail with this errno (after the delay), or only wait.
    errno: Option<i32>,
    delay: Option<Duration>,
    /// Calls of `op` let through before this fault starts.
    skip: u32,
    /// How many calls it affects; `None`: all, until cleared.
    times: Option<u32>,
    /// As a transient error (a retry may help).
    transient: bool,
}

#[derive(Default)]
struct Plan {
    faults: Vec<Fault>,
    /// How many times each operation was called.
    calls: Vec<(Op, u64)>,
}

/// Faults shared by the store and the working copies it made.
#[derive(Default)]
struct Faults(Mutex<Plan>);

impl Faults {
    fn plan(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a call of `op` and applies the fault planned for it, if any.
    fn check(&self, op: Op) -> StoreResult<()> {
        let (delay, errno, transient) = {
            let mut plan = self.plan();
            match plan.calls.iter_mut().find(|(o, _)| *o == op) {
                Some((_, n)) => *n += 1,
                None => plan.calls.push((op, 1)),
            }
            let Some(i) = plan.faults.iter().position(|f| f.op == op) else {
                return Ok(());
            };
            let fault = &mut plan.faults[i];
            if fault.skip > 0 {
                fault.skip -= 1;
                return Ok(());
            }
            let hit = (fault.delay, fault.errno, fault.transient);
            if let Some(times) = &mut fault.times {
                *times -= 1;
                if *times == 0 {
                    plan.faults.remove(i);
                }
            }
            hit
        };
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        match errno {
            Some(errno) => {
                let e = StoreError::failed(
                    errno,
                    format!("{op:?}"),
                    io::Error::other("injected fault"),
                );
                Err(if transient { e.transient() } else { e })
            }
            None => Ok(()),
        }
    }
}

/// What runs after each `list` answered, with the directory listed.
type AfterList = Box<dyn Fn(&Path) + Send + Sync>;

/// A store whose operations fail as planned (see the module docs).
pub struct FailingStore<S: Store> {
    inner: S,
    faults: Arc<Faults>,
    /// Runs after each `list` answered (another process changing the space between a
    /// listing and what the core does with it).
    after_list: Mutex<Option<AfterList>>,
}

/// Says what a planned fault does; dropped, it plans nothing.
pub struct FaultBuilder<'a> {
    faults: &'a Faults,
    fault: Fault,
}

impl FaultBuilder<'_> {
    /// Lets `n` calls through first.
    pub fn after(mut self, n: u32) -> Self {
        self.fault.skip = n;
        self
    }

    /// Affects only the next `n` calls (after those let through).
    pub fn times(mut self, n: u32) -> Self {
        self.fault.times = Some(n);
        self
    }

    /// Waits `d` before answering.
    pub fn delay(mut self, d: Duration) -> Self {
        self.fault.delay = Some(d);
        self
    }

    /// Reports the failure as transient.
    pub fn transient(mut self) -> Self {
        self.fault.transient = true;
        self
    }

    /// Plans the fault.
    pub fn plan(self) {
        self.faults.plan().faults.push(self.fault);
    }
}

impl<S: Store> FailingStore<S> {
    pub fn new(inner: S) -> FailingStore<S> {
        FailingStore {
            inner,
            faults: Arc::new(Faults::default()),
            after_list: Mutex::new(None),
        }
    }

    /// Runs `then` after each `list` answered, with the directory listed.
    pub fn after_list(&self, then: impl Fn(&Path) + Send + Sync + 'static) {
        *self.after_list.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(then));
    }

    /// The store underneath (to look behind the faults).
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// A fault making `op` fail with `errno`; configure it, then `plan()` it.
    pub fn fail(&self, op: Op, errno: i32) -> FaultBuilder<'_> {
        FaultBuilder {
            faults: &self.faults,
            fault: Fault {
                op,
                errno: Some(errno),
                delay: None,
                skip: 0,
                times: None,
                transient: false,
            },
        }
    }

    /// A fault making `op` wait `d` and then go through.
    pub fn slow(&self, op: Op, d: Duration) -> FaultBuilder<'_> {
        FaultBuilder {
            faults: &self.faults,
            fault: Fault {
                op,
                errno: None,
                delay: Some(d),
                skip: 0,
                times: None,
                transient: false,
            },
        }
    }

    /// Removes every planned fault.
    pub fn heal(&self) {
        self.faults.plan().faults.clear();
    }

    /// How many times `op` was called.
    pub fn calls(&self, op: Op) -> u64 {
        self.faults
            .plan()
            .calls
            .iter()
            .find(|(o, _)| *o == op)
            .map_or(0, |(_, n)| *n)
    }
}

/// A working copy of the inner store, whose writes can fail.
struct FailingCopy {
    inner: Arc<dyn WorkingCopy>,
    faults: Arc<Faults>,
}

fn io_err(e: StoreError) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

impl WorkingCopy for FailingCopy {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.faults.check(Op::CopyWrite).map_err(io_err)?;
        self.inner.write_at(data, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.faults.check(Op::CopyWrite).map_err(io_err)?;
        self.inner.set_len(len)
    }
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        self.faults.check(Op::CopyWrite).map_err(io_err)?;
        self.inner.zero(offset, len)
    }
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        self.faults.check(Op::CopyWrite).map_err(io_err)?;
        self.inner.reserve(offset, len)
    }
    fn stat(&self) -> io::Result<CopyStat> {
        self.inner.stat()
    }
    fn local_file(&self) -> Option<&File> {
        self.inner.local_file()
    }
}

/// The inner store's working copy behind `copy`.
fn unwrap_copy(copy: &Arc<dyn WorkingCopy>) -> &Arc<dyn WorkingCopy> {
    match (copy.as_ref() as &dyn Any).downcast_ref::<FailingCopy>() {
        Some(failing) => &failing.inner,
        None => copy,
    }
}

impl<S: Store> Store for FailingStore<S> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn stat(&self, path: &Path) -> StoreResult<Meta> {
        self.faults.check(Op::Stat)?;
        self.inner.stat(path)
    }
    fn list(&self, path: &Path) -> StoreResult<Vec<DirEntry>> {
        self.faults.check(Op::List)?;
        let listed = self.inner.list(path);
        if let Some(then) = &*self.after_list.lock().unwrap_or_else(|e| e.into_inner()) {
            then(path);
        }
        listed
    }
    fn open(&self, path: &Path) -> StoreResult<Arc<dyn Content>> {
        self.faults.check(Op::Open)?;
        self.inner.open(path)
    }
    fn open_to_read(&self, path: &Path) -> StoreResult<Arc<dyn Content>> {
        self.faults.check(Op::Open)?;
        self.inner.open_to_read(path)
    }
    fn create(&self, path: &Path, perm: u16, owner: Owner, exclusive: bool) -> StoreResult<Meta> {
        self.faults.check(Op::Create)?;
        self.inner.create(path, perm, owner, exclusive)
    }
    fn create_held(&self, path: &Path, perm: u16, owner: Owner) -> StoreResult<Meta> {
        self.faults.check(Op::Create)?;
        self.inner.create_held(path, perm, owner)
    }
    fn working_copy(&self, path: &Path) -> StoreResult<Arc<dyn WorkingCopy>> {
        self.faults.check(Op::WorkingCopy)?;
        Ok(Arc::new(FailingCopy {
            inner: self.inner.working_copy(path)?,
            faults: self.faults.clone(),
        }))
    }
    fn commit(&self, req: CommitRequest<'_>) -> StoreResult<Committed> {
        self.faults.check(Op::Commit)?;
        let change = match req.change {
            Change::Whole(copy) => Change::Whole(unwrap_copy(copy)),
            Change::Ranges {
                copy,
                written,
                complete,
            } => Change::Ranges {
                copy: unwrap_copy(copy),
                written,
                complete,
            },
            Change::Append { tail, follow } => Change::Append { tail, follow },
        };
        self.inner.commit(CommitRequest { change, ..req })
    }
    fn mknod(&self, path: &Path, kind: Kind, perm: u16, owner: Owner) -> StoreResult<Meta> {
        self.faults.check(Op::Mknod)?;
        self.inner.mknod(path, kind, perm, owner)
    }
    fn mkdir(&self, path: &Path, perm: u16, owner: Owner) -> StoreResult<Meta> {
        self.faults.check(Op::Mkdir)?;
        self.inner.mkdir(path, perm, owner)
    }
    fn rmdir(&self, path: &Path) -> StoreResult<()> {
        self.faults.check(Op::Rmdir)?;
        self.inner.rmdir(path)
    }
    fn unlink(&self, path: &Path) -> StoreResult<()> {
        self.faults.check(Op::Unlink)?;
        self.inner.unlink(path)
    }
    fn rename(&self, from: &Path, to: &Path, mode: RenameMode) -> StoreResult<()> {
        self.faults.check(Op::Rename)?;
        self.inner.rename(from, to, mode)
    }
    fn link(&self, from: &Path, to: &Path) -> StoreResult<Meta> {
        self.faults.check(Op::Link)?;
        self.inner.link(from, to)
    }
    fn symlink(&self, target: &Path, path: &Path, owner: Owner) -> StoreResult<Meta> {
        self.faults.check(Op::Symlink)?;
        self.inner.symlink(target, path, owner)
    }
    fn readlink(&self, path: &Path) -> StoreResult<PathBuf> {
        self.faults.check(Op::Readlink)?;
        self.inner.readlink(path)
    }
    fn set_attr(&self, path: &Path, attr: &SetAttr) -> StoreResult<Meta> {
        self.faults.check(Op::SetAttr)?;
        self.inner.set_attr(path, attr)
    }
    fn sync(&self, path: &Path) -> StoreResult<()> {
        self.faults.check(Op::Sync)?;
        self.inner.sync(path)
    }
    fn statfs(&self) -> StoreResult<StoreStatfs> {
        self.faults.check(Op::Statfs)?;
        self.inner.statfs()
    }
    fn usage(&self) -> StoreResult<Usage> {
        self.faults.check(Op::Usage)?;
        self.inner.usage()
    }
    fn get_xattr(&self, path: &Path, name: &OsStr) -> StoreResult<Vec<u8>> {
        self.faults.check(Op::Xattr)?;
        self.inner.get_xattr(path, name)
    }
    fn set_xattr(
        &self,
        path: &Path,
        name: &OsStr,
        value: &[u8],
        mode: XattrMode,
    ) -> StoreResult<()> {
        self.faults.check(Op::Xattr)?;
        self.inner.set_xattr(path, name, value, mode)
    }
    fn list_xattr(&self, path: &Path) -> StoreResult<Vec<OsString>> {
        self.faults.check(Op::Xattr)?;
        self.inner.list_xattr(path)
    }
    fn remove_xattr(&self, path: &Path, name: &OsStr) -> StoreResult<()> {
        self.faults.check(Op::Xattr)?;
        self.inner.remove_xattr(path, name)
    }

    fn forget(&self, path: &Path, tree: bool) {
        self.inner.forget(path, tree)
    }

    fn forget_removed(&self, path: &Path) {
        self.inner.forget_removed(path)
    }
}
