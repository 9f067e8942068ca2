//! The inode table: kernel inode numbers ↔ entries of the space, kept as a tree of
//! (parent, name) links so renaming a directory moves everything below it at once.
//!
//! A file with hard links has one inode and several names: its first name, and its other
//! `links`. The kernel must see one inode for all of them (it keeps one page cache and one
//! set of attributes per inode, and tools tell links apart by inode number), so a name found
//! to be another link of a file the table knows (same [`FileId`]) joins that inode.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use crate::store::{FileId, Kind, Meta};

/// A kernel inode number.
pub type Ino = u64;

/// The inode number of the space root.
pub const ROOT: Ino = 1;

/// Parent value of an entry that no longer has a name (unlinked or replaced while in use).
const DETACHED: Ino = 0;

#[derive(Debug)]
struct Node {
    parent: Ino,
    name: OsString,
    kind: Kind,
    /// How many times the kernel has been told about this inode and not forgotten it.
    nlookup: u64,
    /// It took its name over from a superseded inode and has not been opened yet.
    successor: bool,
    /// The inode whose record locks it shares: the first of the inodes its name moved
    /// through (see [`InodeTable::lock_ino`]).
    lock_as: Option<Ino>,
    /// Its other names (hard links), besides `parent`/`name`.
    links: Vec<(Ino, OsString)>,
    /// A directory's attributes as last looked up (or as it went, if removed here), so that
    /// a directory removed elsewhere can still answer a process in it.
    attrs: Option<Box<Meta>>,
    /// A directory removed while the kernel still knows it (a process's working directory):
    /// it answers with `attrs` and no links, and lists nothing.
    removed: bool,
}

/// Maps inode numbers to names in the space.
#[derive(Debug)]
pub struct InodeTable {
    nodes: HashMap<Ino, Node>,
    children: HashMap<(Ino, OsString), Ino>,
    next: Ino,
    /// Superseded inodes (see [`InodeTable::supersede`]) that still carry their name (few,
    /// and only for a while).
    aliases: Vec<Ino>,
    /// The inodes of files known to have several names, by the store's identity of the file.
    linked: HashMap<FileId, Ino>,
}

impl Default for InodeTable {
    fn default() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                parent: DETACHED,
                name: OsString::new(),
                kind: Kind::Dir,
                nlookup: 1,
                successor: false,
                lock_as: None,
                links: Vec::new(),
                attrs: None,
                removed: false,
            },
        );
        InodeTable {
            nodes,
            children: HashMap::new(),
            next: ROOT + 1,
            aliases: Vec::new(),
            linked: HashMap::new(),
        }
    }
}

impl InodeTable {
    /// The path of `ino` relative to the space root, or `None` if it is unknown or detached.
    pub fn path(&self, ino: Ino) -> Option<PathBuf> {
        let mut names = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let node = self.nodes.get(&cur)?;
            if node.parent == DETACHED {
                return None;
            }
            names.push(node.name.as_os_str());
            cur = node.parent;
        }
        Some(names.iter().rev().collect())
    }

    /// The parent directory of `ino` (the root is its own parent).
    pub fn parent(&self, ino: Ino) -> Option<Ino> {
        match self.nodes.get(&ino)?.parent {
            DETACHED if ino == ROOT => Some(ROOT),
            DETACHED => None,
            parent => Some(parent),
        }
    }

    /// The kind recorded for `ino`.
    /// Keeps `meta` as the last known attributes of the directory `ino`.
    pub fn keep_dir_attrs(&mut self, ino: Ino, meta: &Meta) {
        if let Some(node) = self.nodes.get_mut(&ino)
            && node.kind == Kind::Dir
        {
            match &mut node.attrs {
                Some(attrs) => (**attrs).clone_from(meta),
                None => node.attrs = Some(Box::new(meta.clone())),
            }
        }
    }

    /// Detaches the directory `name` in `parent`, removed: while the kernel knows its inode,
    /// it answers with its attributes before (`meta`, else the last ones known) and no links,
    /// and lists nothing (a process in it lists it empty, as on ext4).
    pub fn detach_removed_dir(&mut self, parent: Ino, name: &OsStr, meta: Option<Meta>) {
        if let Some(ino) = self.child(parent, name)
            && let Some(node) = self.nodes.get_mut(&ino)
            && node.kind == Kind::Dir
        {
            if let Some(meta) = meta {
                node.attrs = Some(Box::new(meta));
            }
            node.removed = node.attrs.is_some();
        }
        self.detach(parent, name);
    }

    /// What a removed directory was (see [`InodeTable::detach_removed_dir`]).
    pub fn removed_dir(&self, ino: Ino) -> Option<&Meta> {
        let node = self.nodes.get(&ino)?;
        node.attrs.as_deref().filter(|_| node.removed)
    }

    pub fn kind(&self, ino: Ino) -> Option<Kind> {
        self.nodes.get(&ino).map(|n| n.kind)
    }

    /// The inode of `name` in `parent`, if the kernel knows it.
    pub fn child(&self, parent: Ino, name: &OsStr) -> Option<Ino> {
        self.children.get(&(parent, name.to_os_string())).copied()
    }

    /// Where the kernel knows `path` (relative to the root) from: the inode of its parent
    /// directory and the inode of the entry itself, as far as the kernel has looked them up.
    /// `None` when it knows no directory on the way (nothing of it is cached).
    pub fn resolve(&self, path: &std::path::Path) -> Option<(Ino, Option<Ino>)> {
        let mut parent = ROOT;
        let mut parts = path.iter().peekable();
        while let Some(part) = parts.next() {
            let child = self.child(parent, part);
            if parts.peek().is_none() {
                return Some((parent, child));
            }
            parent = child?;
        }
        // The empty path: the root itself.
        Some((ROOT, Some(ROOT)))
    }

    /// The inode of the directory at `path`, adding the directories on the way the table does
    /// not know yet, for a file this mount has open that moved there elsewhere (see
    /// `Fs::moved_elsewhere`). Those the kernel has not looked up (no references: a look-up
    /// of one later takes the first); the few that it never looks up stay until the process
    /// ends.
    pub fn dirs_for_move(&mut self, path: &std::path::Path) -> Ino {
        let mut parent = ROOT;
        for part in path.iter() {
            parent = match self.child(parent, part) {
                Some(ino) => ino,
                None => {
                    let ino = self.next;
                    self.next += 1;
                    self.nodes.insert(
                        ino,
                        Node {
                            parent,
                            name: part.to_os_string(),
                            kind: Kind::Dir,
                            nlookup: 0,
                            successor: false,
                            lock_as: None,
                            links: Vec::new(),
                            attrs: None,
                            removed: false,
                        },
                    );
                    self.children.insert((parent, part.to_os_string()), ino);
                    ino
                }
            };
        }
        parent
    }

    /// The inode known for the file `id` (with several names), and one of its names (`None`
    /// if it has none left).
    pub fn linked_to(&self, id: FileId) -> Option<(Ino, Option<std::path::PathBuf>)> {
        let ino = *self.linked.get(&id)?;
        self.nodes.contains_key(&ino).then(|| (ino, self.path(ino)))
    }

    /// Forgets that `ino` is the file `id` (it is not, or cannot be told to be, any more).
    pub fn forget_linked(&mut self, id: FileId, ino: Ino) {
        if self.linked.get(&id) == Some(&ino) {
            self.linked.remove(&id);
        }
    }

    /// Gives `ino`, which has no name left, the name `path` (another name of its file, found
    /// in the store), with the directories on the way. An inode the table still had under that
    /// name is not what the store has there (it changed behind this mount's back) and leaves it.
    pub fn adopt_name(&mut self, ino: Ino, path: &std::path::Path) {
        let Some(name) = path.file_name() else {
            return;
        };
        let parent = self.dirs_for_move(path.parent().unwrap_or(std::path::Path::new("")));
        if self
            .children
            .get(&(parent, name.to_os_string()))
            .is_some_and(|&other| other != ino)
        {
            self.detach(parent, name);
        }
        self.add_link(ino, parent, name);
    }

    /// Records that the kernel now holds a reference to `name` in `parent` (of `kind`),
    /// returning its inode number. An entry whose kind changed behind our back gets a new inode.
    /// `linked`: the file has several names and this is its identity: a name of a file the
    /// table knows joins its inode.
    pub fn remember(
        &mut self,
        parent: Ino,
        name: &OsStr,
        kind: Kind,
        linked: Option<FileId>,
    ) -> Ino {
        let key = (parent, name.to_os_string());
        if let Some(&ino) = self.children.get(&key) {
            let node = self
                .nodes
                .get_mut(&ino)
                .expect("child index points at a node");
            if node.kind == kind {
                node.nlookup += 1;
                if let Some(id) = linked {
                    self.linked.insert(id, ino);
                }
                return ino;
            }
            self.detach(parent, name);
        }
        if let Some(id) = linked
            && let Some(&ino) = self.linked.get(&id)
            && self.nodes.get(&ino).is_some_and(|n| n.kind == kind)
        {
            self.add_link(ino, parent, name);
            if let Some(node) = self.nodes.get_mut(&ino) {
                node.nlookup += 1;
            }
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        // The superseded inode this name was one of the names of, if any.
        let predecessor = self.aliases.iter().copied().find(|a| {
            self.nodes.get(a).is_some_and(|n| {
                n.parent == parent && n.name == name
                    || n.links.iter().any(|(p, l)| *p == parent && l == name)
            })
        });
        let successor = predecessor.is_some();
        let lock_as = predecessor.map(|p| self.lock_ino(p));
        self.nodes.insert(
            ino,
            Node {
                parent,
                name: name.to_os_string(),
                kind,
                nlookup: 1,
                successor,
                lock_as,
                links: Vec::new(),
                attrs: None,
                removed: false,
            },
        );
        self.children.insert(key, ino);
        if let Some(id) = linked {
            self.linked.insert(id, ino);
        }
        ino
    }

    /// Gives `ino` the further name `name` in `parent` (a hard link just made), with the file
    /// identity `id`.
    pub fn link(&mut self, ino: Ino, parent: Ino, name: &OsStr, id: Option<FileId>) {
        self.add_link(ino, parent, name);
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.nlookup += 1;
        }
        if let Some(id) = id {
            self.linked.insert(id, ino);
        }
    }

    fn add_link(&mut self, ino: Ino, parent: Ino, name: &OsStr) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        if node.parent == DETACHED {
            // Its last name went: this one is its name now.
            node.parent = parent;
            node.name = name.to_os_string();
        } else if !(node.links.iter().any(|(p, n)| *p == parent && n == name)
            || node.parent == parent && node.name == name)
        {
            node.links.push((parent, name.to_os_string()));
        }
        self.children.insert((parent, name.to_os_string()), ino);
    }

    /// Takes the name `name` in `parent` away from `ino`: another of its names becomes its
    /// name, or it has none left (detached).
    fn drop_name(&mut self, ino: Ino, parent: Ino, name: &OsStr) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        if node.parent == parent && node.name == name {
            match node.links.pop() {
                Some((p, n)) => (node.parent, node.name) = (p, n),
                None => node.parent = DETACHED,
            }
        } else {
            node.links.retain(|(p, n)| !(*p == parent && n == name));
        }
    }

    /// Every name of `ino` this table knows (hard links too), unless detached.
    pub fn names(&self, ino: Ino) -> Vec<(Ino, OsString)> {
        self.nodes
            .get(&ino)
            .filter(|n| n.parent != DETACHED)
            .map(|n| {
                std::iter::once((n.parent, n.name.clone()))
                    .chain(n.links.iter().cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Gives the name of `ino` up to a new inode (the next lookup of the name makes one), while
    /// `ino` keeps the name as an alias: its open handles still commit to it (and follow its
    /// renames), but the kernel is to reach the file through the new inode from now on.
    pub fn supersede(&mut self, ino: Ino) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        if node.parent == DETACHED || self.aliases.contains(&ino) {
            return;
        }
        // Its other names (hard links) move on too: the look-up that follows makes the
        // successor, which the file's names join (by its identity, which leads no more here).
        let names: Vec<_> = std::iter::once((node.parent, node.name.clone()))
            .chain(node.links.iter().cloned())
            .collect();
        for key in names {
            if self.children.get(&key) == Some(&ino) {
                self.children.remove(&key);
            }
        }
        self.linked.retain(|_, &mut i| i != ino);
        self.aliases.push(ino);
    }

    /// Whether `ino` gave its name up to another inode.
    #[cfg(test)]
    pub fn is_superseded(&self, ino: Ino) -> bool {
        self.aliases.contains(&ino)
    }

    /// Whether `ino` took its name over from a superseded inode and is opened for the first
    /// time now (the mark goes with this call).
    pub fn first_open_of_successor(&mut self, ino: Ino) -> bool {
        self.nodes
            .get_mut(&ino)
            .is_some_and(|n| std::mem::take(&mut n.successor))
    }

    /// The inode number `ino`'s record locks are kept under: a name that moved to a new inode
    /// because passthrough readers held the old one (`supersede`) names one file still, and
    /// the locks taken through either inode must meet.
    pub fn lock_ino(&self, ino: Ino) -> Ino {
        self.nodes.get(&ino).and_then(|n| n.lock_as).unwrap_or(ino)
    }

    /// Whether `ino` took its name over from a superseded inode and was not opened yet.
    pub fn is_unopened_successor(&self, ino: Ino) -> bool {
        self.nodes.get(&ino).is_some_and(|n| n.successor)
    }

    /// The aliases that carry `name` in `parent`.
    fn aliases_at(&self, parent: Ino, name: &OsStr) -> Vec<Ino> {
        self.aliases
            .iter()
            .copied()
            .filter(|a| {
                self.nodes
                    .get(a)
                    .is_some_and(|n| n.parent == parent && n.name == name)
            })
            .collect()
    }

    /// Detaches the aliases `inos` (their name went away).
    fn detach_aliases(&mut self, inos: &[Ino]) {
        for ino in inos {
            if let Some(node) = self.nodes.get_mut(ino) {
                node.parent = DETACHED;
            }
        }
        self.aliases.retain(|a| !inos.contains(a));
    }

    /// Drops `n` kernel references to `ino`; the inode is forgotten when none are left.
    pub fn forget(&mut self, ino: Ino, n: u64) {
        if ino == ROOT {
            return;
        }
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        node.nlookup = node.nlookup.saturating_sub(n);
        if node.nlookup == 0 {
            let node = self.nodes.remove(&ino).expect("present");
            let names = std::iter::once((node.parent, node.name)).chain(node.links);
            for key in names {
                if key.0 != DETACHED && self.children.get(&key) == Some(&ino) {
                    self.children.remove(&key);
                }
            }
            self.aliases.retain(|&a| a != ino);
            self.linked.retain(|_, &mut i| i != ino);
        }
    }

    /// Removes the name `name` in `parent`; its inode (if still in use) becomes detached.
    pub fn detach(&mut self, parent: Ino, name: &OsStr) {
        let aliases = self.aliases_at(parent, name);
        self.detach_aliases(&aliases);
        if let Some(ino) = self.children.remove(&(parent, name.to_os_string())) {
            self.drop_name(ino, parent, name);
        }
    }

    /// Moves the entry `name` in `parent` to `new_name` in `new_parent`, replacing (detaching)
    /// whatever was there; with `exchange`, the two entries swap places.
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
        exchange: bool,
    ) {
        let src = self.children.remove(&(parent, name.to_os_string()));
        let dst = self.children.remove(&(new_parent, new_name.to_os_string()));
        let (src_aliases, dst_aliases) = (
            self.aliases_at(parent, name),
            self.aliases_at(new_parent, new_name),
        );
        if let (Some(ino), false) = (dst, exchange) {
            self.drop_name(ino, new_parent, new_name);
        }
        if let Some(ino) = src {
            self.place(ino, (parent, name), (new_parent, new_name));
        }
        for &ino in &src_aliases {
            self.rename_node(ino, new_parent, new_name);
        }
        if exchange {
            if let Some(ino) = dst {
                self.place(ino, (new_parent, new_name), (parent, name));
            }
            for &ino in &dst_aliases {
                self.rename_node(ino, parent, name);
            }
        } else {
            self.detach_aliases(&dst_aliases);
        }
    }

    /// Moves the name `from` of `ino` (its first name or one of its links) to `to`.
    fn place(&mut self, ino: Ino, from: (Ino, &OsStr), to: (Ino, &OsStr)) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        if node.parent == from.0 && node.name == from.1 {
            node.parent = to.0;
            node.name = to.1.to_os_string();
        } else if let Some(link) = node
            .links
            .iter_mut()
            .find(|(p, n)| *p == from.0 && n == from.1)
        {
            *link = (to.0, to.1.to_os_string());
        } else {
            // Known by another name only (detached meanwhile): this is its name now.
            node.parent = to.0;
            node.name = to.1.to_os_string();
        }
        self.children.insert((to.0, to.1.to_os_string()), ino);
    }

    fn rename_node(&mut self, ino: Ino, parent: Ino, name: &OsStr) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.parent = parent;
            node.name = name.to_os_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn paths_follow_directory_renames() {
        let mut t = InodeTable::default();
        let a = t.remember(ROOT, OsStr::new("a"), Kind::Dir, None);
        let f = t.remember(a, OsStr::new("f"), Kind::File, None);
        assert_eq!(t.path(f).unwrap(), Path::new("a/f"));
        t.rename(ROOT, OsStr::new("a"), ROOT, OsStr::new("b"), false);
        assert_eq!(t.path(f).unwrap(), Path::new("b/f"));
        assert_eq!(t.child(ROOT, OsStr::new("a")), None);
    }

    #[test]
    fn replaced_and_unlinked_entries_are_detached() {
        let mut t = InodeTable::default();
        let x = t.remember(ROOT, OsStr::new("x"), Kind::File, None);
        let y = t.remember(ROOT, OsStr::new("y"), Kind::File, None);
        t.rename(ROOT, OsStr::new("x"), ROOT, OsStr::new("y"), false);
        assert_eq!(t.path(x).unwrap(), Path::new("y"));
        assert_eq!(t.path(y), None);
        t.detach(ROOT, OsStr::new("y"));
        assert_eq!(t.path(x), None);
    }

    #[test]
    fn exchange_swaps_and_forget_releases() {
        let mut t = InodeTable::default();
        let x = t.remember(ROOT, OsStr::new("x"), Kind::File, None);
        let y = t.remember(ROOT, OsStr::new("y"), Kind::Dir, None);
        t.rename(ROOT, OsStr::new("x"), ROOT, OsStr::new("y"), true);
        assert_eq!(t.path(x).unwrap(), Path::new("y"));
        assert_eq!(t.path(y).unwrap(), Path::new("x"));
        assert_eq!(t.remember(ROOT, OsStr::new("y"), Kind::File, None), x);
        t.forget(x, 2);
        assert_eq!(t.child(ROOT, OsStr::new("y")), None);
        assert_ne!(t.remember(ROOT, OsStr::new("y"), Kind::File, None), x);
    }

    #[test]
    fn a_superseded_inode_keeps_its_name_as_an_alias_until_the_name_goes() {
        let mut t = InodeTable::default();
        let d = t.remember(ROOT, OsStr::new("d"), Kind::Dir, None);
        let x = t.remember(d, OsStr::new("f"), Kind::File, None);
        t.supersede(x);
        assert!(t.is_superseded(x));
        assert_eq!(
            t.child(d, OsStr::new("f")),
            None,
            "the next lookup makes a new inode"
        );
        let y = t.remember(d, OsStr::new("f"), Kind::File, None);
        assert_ne!(x, y);
        assert!(t.is_unopened_successor(y));
        assert!(t.first_open_of_successor(y));
        assert!(!t.first_open_of_successor(y), "only the first open");
        assert_eq!(
            t.path(x).unwrap(),
            Path::new("d/f"),
            "its handles still commit there"
        );
        // Renames of the name (or its directory) carry the alias along.
        t.rename(d, OsStr::new("f"), d, OsStr::new("g"), false);
        t.rename(ROOT, OsStr::new("d"), ROOT, OsStr::new("e"), false);
        assert_eq!(t.path(x).unwrap(), Path::new("e/g"));
        assert_eq!(t.path(y).unwrap(), Path::new("e/g"));
        // Forgetting the alias leaves the name to the new inode.
        t.forget(x, 1);
        assert_eq!(t.child(d, OsStr::new("g")), Some(y));
        // An alias whose name is unlinked or replaced is detached, like its inode.
        t.supersede(y);
        t.detach(d, OsStr::new("g"));
        assert_eq!(t.path(y), None);
        let z = t.remember(d, OsStr::new("h"), Kind::File, None);
        let w = t.remember(d, OsStr::new("i"), Kind::File, None);
        t.supersede(z);
        t.rename(d, OsStr::new("i"), d, OsStr::new("h"), false);
        assert_eq!(t.path(z), None);
        assert_eq!(t.path(w).unwrap(), Path::new("e/h"));
    }
}
