//! A model-based test of the core without FUSE: seeded random operations (create, write,
//! truncate, rename, unlink, mkdir, rmdir, readdir, close with its commit, reopen, appends,
//! readers holding old versions) run against the core on the in-memory store and on the local
//! store, and against a reference model of the promised semantics; after every step the
//! results, and then every committed file and directory, must match the model.
//!
//! The model: committed files are whole values; a writer's handle has a private view (its
//! base at open, or nothing with `O_TRUNC`) that becomes the file's value when it closes, if
//! the file still has a name; an appender's bytes go at the end of the file as it is at its
//! close; a reader keeps the value it opened; renames move open files with their names.
//!
//! `ROOMFS_MODEL_SEED` and `ROOMFS_MODEL_OPS` explore further.

use std::collections::BTreeMap;

use super::*;

const CALLER: Tid = 0;

/// A tiny PRNG (xorshift), so a seed replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len() as u64) as usize])
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Entry {
    Dir,
    File(Vec<u8>),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind2 {
    Reader,
    Writer,
    Appender,
}

/// An open handle in the model.
struct Handle {
    fh: u64,
    ino: Ino,
    /// The model's identity of the file (follows renames).
    file: u64,
    kind: Kind2,
    /// What it sees: a reader its version, a writer its view, an appender its base.
    view: Vec<u8>,
    /// An appender's bytes not yet committed.
    tail: Vec<u8>,
    dirty: bool,
}

struct Model {
    entries: BTreeMap<PathBuf, Entry>,
    /// The file identity behind each file path.
    ids: BTreeMap<PathBuf, u64>,
    next_id: u64,
    handles: Vec<Handle>,
}

impl Model {
    fn new() -> Model {
        Model {
            entries: BTreeMap::new(),
            ids: BTreeMap::new(),
            next_id: 1,
            handles: Vec::new(),
        }
    }

    fn path_of(&self, file: u64) -> Option<PathBuf> {
        self.ids
            .iter()
            .find(|(_, id)| **id == file)
            .map(|(p, _)| p.clone())
    }

    fn parent_ok(&self, path: &Path) -> Result<(), Errno> {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => match self.entries.get(p) {
                Some(Entry::Dir) => Ok(()),
                Some(Entry::File(_)) => Err(Errno::ENOTDIR),
                None => Err(Errno::ENOENT),
            },
            _ => Ok(()),
        }
    }

    fn children(&self, dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = self
            .entries
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Commits handle `i` (its close), as the core must.
    fn commit(&mut self, i: usize) {
        let h = &self.handles[i];
        if !h.dirty {
            return;
        }
        let Some(path) = self.path_of(h.file) else {
            // Unlinked while open: the changes go with it.
            self.handles[i].dirty = false;
            self.handles[i].tail.clear();
            return;
        };
        let value = match h.kind {
            Kind2::Appender => {
                let Some(Entry::File(now)) = self.entries.get(&path) else {
                    unreachable!()
                };
                let mut v = now.clone();
                v.extend_from_slice(&h.tail);
                v
            }
            _ => h.view.clone(),
        };
        self.entries.insert(path, Entry::File(value.clone()));
        let h = &mut self.handles[i];
        h.dirty = false;
        h.tail.clear();
        h.view = value;
    }
}

/// The core on one backend, and how to reach its names.
struct Core {
    fs: Fs,
}

impl Core {
    fn ino(&self, path: &Path) -> Result<Ino, Errno> {
        let mut ino = ROOT;
        for part in path.iter() {
            ino = self.fs.lookup(ino, part)?.ino;
        }
        Ok(ino)
    }

    fn parent<'p>(&self, path: &'p Path) -> Result<(Ino, &'p OsStr), Errno> {
        let parent = self.ino(path.parent().unwrap_or(Path::new("")))?;
        Ok((parent, path.file_name().unwrap()))
    }

    fn read_all(&self, fh: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let chunk = self.fs.read(fh, out.len() as u64, 1 << 16).unwrap();
            if chunk.is_empty() {
                return out;
            }
            out.extend_from_slice(&chunk);
        }
    }

    fn list(&self, path: &Path) -> Vec<String> {
        let ino = self.ino(path).unwrap();
        let fh = self.fs.opendir(ino).unwrap();
        let mut names = Vec::new();
        self.fs
            .readdir(fh, 0, |e| {
                let n = e.name.to_string_lossy().into_owned();
                if n != "." && n != ".." {
                    names.push(n);
                }
                true
            })
            .unwrap();
        self.fs.releasedir(fh);
        names.sort();
        names
    }
}

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

fn random_path(rng: &mut Rng, model: &Model) -> PathBuf {
    // Mostly under existing directories, sometimes somewhere missing.
    let dirs: Vec<PathBuf> = model
        .entries
        .iter()
        .filter(|(_, e)| **e == Entry::Dir)
        .map(|(p, _)| p.clone())
        .collect();
    let base = match rng.below(3) {
        0 => PathBuf::new(),
        _ => rng.pick(&dirs).cloned().unwrap_or_default(),
    };
    base.join(NAMES[rng.below(NAMES.len() as u64) as usize])
}

fn bytes(rng: &mut Rng, max: u64) -> Vec<u8> {
    let len = 1 + rng.below(max);
    let fill = b'a' + rng.below(26) as u8;
    (0..len).map(|i| fill.wrapping_add((i % 7) as u8)).collect()
}

/// Runs `ops` random operations from `seed` on `fs`, checking against the model.
fn run(fs: Fs, seed: u64, ops: u32) {
    let core = Core { fs };
    let mut model = Model::new();
    let mut rng = Rng(seed | 1);
    let c = Caller::default();
    for step in 0..ops {
        let what = rng.below(16);
        let ctx = format!("seed {seed} step {step} op {what}");
        if std::env::var_os("ROOMFS_MODEL_TRACE").is_some() {
            eprintln!("{ctx} {:?}", model.entries);
        }
        match what {
            // Create a file (and leave it open as a writer, or closed).
            0 | 1 => {
                let path = random_path(&mut rng, &model);
                let expect = model
                    .parent_ok(&path)
                    .and_then(|()| match model.entries.get(&path) {
                        Some(_) => Err(Errno::EEXIST),
                        None => Ok(()),
                    });
                let got = core.parent(&path).and_then(|(p, n)| {
                    core.fs
                        .create(p, n, 0o644, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, &c)
                });
                assert_eq!(
                    got.as_ref().err().copied(),
                    expect.err(),
                    "{ctx}: create {path:?}"
                );
                if let Ok((attr, opened)) = got {
                    let id = model.next_id;
                    model.next_id += 1;
                    model.entries.insert(path.clone(), Entry::File(Vec::new()));
                    model.ids.insert(path, id);
                    model.handles.push(Handle {
                        fh: opened.fh,
                        ino: attr.ino,
                        file: id,
                        kind: Kind2::Writer,
                        view: Vec::new(),
                        tail: Vec::new(),
                        dirty: false,
                    });
                }
            }
            // Open an existing file: reader, writer (maybe truncating), appender.
            2 | 3 => {
                let files: Vec<PathBuf> = model.ids.keys().cloned().collect();
                let Some(path) = rng.pick(&files).cloned() else {
                    continue;
                };
                let Some(Entry::File(value)) = model.entries.get(&path).cloned() else {
                    unreachable!()
                };
                let (kind, flags) = match rng.below(4) {
                    0 => (Kind2::Reader, libc::O_RDONLY),
                    1 => (Kind2::Writer, libc::O_WRONLY),
                    2 => (Kind2::Writer, libc::O_RDWR | libc::O_TRUNC),
                    _ => (Kind2::Appender, libc::O_WRONLY | libc::O_APPEND),
                };
                let ino = core.ino(&path).unwrap();
                let opened = core.fs.open(ino, flags, CALLER).unwrap();
                let truncated = flags & libc::O_TRUNC != 0;
                model.handles.push(Handle {
                    fh: opened.fh,
                    ino,
                    file: model.ids[&path],
                    kind,
                    view: if truncated { Vec::new() } else { value },
                    tail: Vec::new(),
                    dirty: truncated,
                });
            }
            // Write through a writer or appender.
            4..=6 => {
                let writers: Vec<usize> = (0..model.handles.len())
                    .filter(|&i| model.handles[i].kind != Kind2::Reader)
                    .collect();
                let Some(&i) = rng.pick(&writers) else {
                    continue;
                };
                let data = bytes(&mut rng, 300);
                let h = &mut model.handles[i];
                let offset = rng.below(h.view.len() as u64 + 200);
                let n = core.fs.write(h.fh, offset, &data, CALLER).unwrap();
                assert_eq!(n as usize, data.len(), "{ctx}");
                if h.kind == Kind2::Appender {
                    h.tail.extend_from_slice(&data);
                } else {
                    let end = offset as usize + data.len();
                    if h.view.len() < end {
                        h.view.resize(end, 0);
                    }
                    h.view[offset as usize..end].copy_from_slice(&data);
                }
                h.dirty = true;
            }
            // Truncate through a writer.
            7 => {
                let writers: Vec<usize> = (0..model.handles.len())
                    .filter(|&i| model.handles[i].kind == Kind2::Writer)
                    .collect();
                let Some(&i) = rng.pick(&writers) else {
                    continue;
                };
                let h = &mut model.handles[i];
                let size = rng.below(h.view.len() as u64 + 100);
                let ino = h.ino;
                let cut = AttrChanges {
                    size: Some(size),
                    ..Default::default()
                };
                core.fs.setattr(ino, Some(h.fh), &cut).unwrap();
                h.view.resize(size as usize, 0);
                h.dirty = true;
            }
            // Close a handle (its commit), or reopen it.
            8 | 9 => {
                let Some(i) = (!model.handles.is_empty())
                    .then(|| rng.below(model.handles.len() as u64) as usize)
                else {
                    continue;
                };
                let fh = model.handles[i].fh;
                core.fs.flush(fh, CALLER, None).unwrap();
                core.fs.release(fh).unwrap();
                model.commit(i);
                model.handles.remove(i);
            }
            // Read through a handle: what it sees.
            10 => {
                let Some(i) = (!model.handles.is_empty())
                    .then(|| rng.below(model.handles.len() as u64) as usize)
                else {
                    continue;
                };
                let h = &model.handles[i];
                let mut expect = h.view.clone();
                expect.extend_from_slice(&h.tail);
                let got = core.read_all(h.fh);
                if h.kind == Kind2::Reader {
                    // A reader reads on into appends committed in place since it opened.
                    assert!(got.starts_with(&expect), "{ctx}: reader view");
                } else {
                    assert!(
                        got == expect,
                        "{ctx}: writer view {} vs {}",
                        got.len(),
                        expect.len()
                    );
                }
            }
            // Rename (files or directories, replacing files).
            11 => {
                let all: Vec<PathBuf> = model.entries.keys().cloned().collect();
                let Some(from) = rng.pick(&all).cloned() else {
                    continue;
                };
                let to = random_path(&mut rng, &model);
                let expect = model.parent_ok(&to).and_then(|()| {
                    if to.starts_with(&from) && to != from {
                        return Err(Errno::EINVAL);
                    }
                    if from.starts_with(&to) && to != from {
                        return Err(Errno::ENOTEMPTY); // onto its own ancestor, as Linux says
                    }
                    match (model.entries.get(&from), model.entries.get(&to)) {
                        (_, _) if from == to => Ok(()),
                        (Some(Entry::Dir), Some(Entry::File(_))) => Err(Errno::ENOTDIR),
                        (Some(Entry::File(_)), Some(Entry::Dir)) => Err(Errno::EISDIR),
                        (Some(Entry::Dir), Some(Entry::Dir)) if !model.children(&to).is_empty() => {
                            Err(Errno::ENOTEMPTY)
                        }
                        _ => Ok(()),
                    }
                });
                let got = core.parent(&from).and_then(|(fp, fnm)| {
                    let (tp, tn) = core.parent(&to)?;
                    core.fs.rename(fp, fnm, tp, tn, 0)
                });
                assert_eq!(got.err(), expect.err(), "{ctx}: rename {from:?} -> {to:?}");
                if expect.is_ok() && from != to {
                    // Replaced file: gone (open handles keep it, nameless).
                    if let Some(Entry::File(_)) = model.entries.get(&to) {
                        model.ids.remove(&to);
                    }
                    model.entries.remove(&to);
                    let moved: Vec<(PathBuf, Entry)> = model
                        .entries
                        .iter()
                        .filter(|(p, _)| p.starts_with(&from))
                        .map(|(p, e)| (p.clone(), e.clone()))
                        .collect();
                    for (p, e) in moved {
                        model.entries.remove(&p);
                        let rel = p.strip_prefix(&from).unwrap();
                        let np = if rel.as_os_str().is_empty() {
                            to.clone()
                        } else {
                            to.join(rel)
                        };
                        if let Some(id) = model.ids.remove(&p) {
                            model.ids.insert(np.clone(), id);
                        }
                        model.entries.insert(np, e);
                    }
                }
            }
            // Unlink a file.
            12 => {
                let path = random_path(&mut rng, &model);
                let expect = match model.entries.get(&path) {
                    Some(Entry::File(_)) => Ok(()),
                    Some(Entry::Dir) => Err(Errno::EISDIR),
                    None => model.parent_ok(&path).and(Err(Errno::ENOENT)),
                };
                let got = core.parent(&path).and_then(|(p, n)| core.fs.unlink(p, n));
                assert_eq!(got.err(), expect.err(), "{ctx}: unlink {path:?}");
                if expect.is_ok() {
                    model.entries.remove(&path);
                    model.ids.remove(&path);
                }
            }
            // mkdir / rmdir.
            13 | 14 => {
                let path = random_path(&mut rng, &model);
                if what == 13 {
                    let expect =
                        model
                            .parent_ok(&path)
                            .and_then(|()| match model.entries.get(&path) {
                                Some(_) => Err(Errno::EEXIST),
                                None => Ok(()),
                            });
                    let got = core
                        .parent(&path)
                        .and_then(|(p, n)| core.fs.mkdir(p, n, 0o755, &c));
                    assert_eq!(got.err(), expect.err(), "{ctx}: mkdir {path:?}");
                    if expect.is_ok() {
                        model.entries.insert(path, Entry::Dir);
                    }
                } else {
                    let expect = match model.entries.get(&path) {
                        Some(Entry::Dir) if model.children(&path).is_empty() => Ok(()),
                        Some(Entry::Dir) => Err(Errno::ENOTEMPTY),
                        Some(Entry::File(_)) => Err(Errno::ENOTDIR),
                        None => model.parent_ok(&path).and(Err(Errno::ENOENT)),
                    };
                    let got = core.parent(&path).and_then(|(p, n)| core.fs.rmdir(p, n));
                    assert_eq!(got.err(), expect.err(), "{ctx}: rmdir {path:?}");
                    if expect.is_ok() {
                        model.entries.remove(&path);
                    }
                }
            }
            // Truncate by path (committed at once).
            _ => {
                let files: Vec<PathBuf> = model.ids.keys().cloned().collect();
                let Some(path) = rng.pick(&files).cloned() else {
                    continue;
                };
                let Some(Entry::File(mut value)) = model.entries.get(&path).cloned() else {
                    unreachable!()
                };
                let size = rng.below(value.len() as u64 + 50);
                let ino = core.ino(&path).unwrap();
                let cut = AttrChanges {
                    size: Some(size),
                    ..Default::default()
                };
                core.fs.setattr(ino, None, &cut).unwrap();
                value.resize(size as usize, 0);
                model.entries.insert(path, Entry::File(value));
            }
        }
        check(&core, &model, &ctx);
    }
    // Closing everything commits the rest.
    for i in (0..model.handles.len()).rev() {
        core.fs.release(model.handles[i].fh).unwrap();
        model.commit(i);
    }
    model.handles.clear();
    check(&core, &model, &format!("seed {seed} at the end"));
}

/// Every directory lists as in the model, every file reads as its committed value.
fn check(core: &Core, model: &Model, ctx: &str) {
    let mut dirs = vec![PathBuf::new()];
    dirs.extend(
        model
            .entries
            .iter()
            .filter(|(_, e)| **e == Entry::Dir)
            .map(|(p, _)| p.clone()),
    );
    for dir in dirs {
        assert_eq!(
            core.list(&dir),
            model.children(&dir),
            "{ctx}: listing of {dir:?}"
        );
    }
    for (path, entry) in &model.entries {
        if let Entry::File(value) = entry {
            let ino = core.ino(path).unwrap();
            let r = core.fs.open(ino, libc::O_RDONLY, CALLER).unwrap();
            let got = core.read_all(r.fh);
            core.fs.release(r.fh).unwrap();
            assert!(
                got == *value,
                "{ctx}: content of {path:?}: {} bytes, expected {}",
                got.len(),
                value.len()
            );
        }
    }
}

fn seeds() -> (Vec<u64>, u32) {
    let ops = std::env::var("ROOMFS_MODEL_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let seeds = match std::env::var("ROOMFS_MODEL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(seed) => vec![seed],
        None => vec![1, 2, 3, 0x5eed, 0xdecaf],
    };
    (seeds, ops)
}

fn fs_on(store: Arc<dyn Store>) -> Fs {
    let id = crate::space::SpaceId::new(crate::space::SpaceKind::Room, "r").unwrap();
    Fs::new(
        Arc::new(Space::new(id, store, None)),
        FsOptions {
            links_anywhere: true,
            ..Default::default()
        },
    )
}

#[test]
fn the_core_on_the_in_memory_store_follows_the_model() {
    let (seeds, ops) = seeds();
    for seed in seeds {
        run(
            fs_on(Arc::new(crate::store::mem::MemStore::new())),
            seed,
            ops,
        );
    }
}

#[test]
fn the_core_on_the_local_store_follows_the_model() {
    let (seeds, ops) = seeds();
    for seed in seeds {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::local::test_store(dir.path());
        run(fs_on(Arc::new(store)), seed, ops);
    }
}

#[test]
fn the_core_on_the_s3_store_follows_the_model() {
    let (seeds, ops) = seeds();
    for seed in seeds {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = crate::store::s3::test_store(dir.path());
        run(fs_on(store), seed, ops);
    }
}
