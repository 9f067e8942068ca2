//! Claims on a space's names: how operations that change the same names take turns without
//! holding a lock across their backend I/O.
//!
//! An operation that changes a name claims it for as long as it runs: one entry (a commit, an
//! unlink, a create, a change of attributes), or a whole subtree (a rename moves everything
//! below its two names). A claim waits only for claims it conflicts with — the same entry, or
//! an entry inside a claimed subtree — so everything else runs side by side, and nothing waits
//! while another operation of the same name talks to a slow backend except that operation's
//! rivals. All claims of one operation are taken at once, so two operations never wait for
//! each other.
//!
//! Invariant: while an operation holds its claims, no other operation of this process changes
//! the names it claimed, so a path resolved before claiming it, and found unchanged after, stays
//! right until the claim is released.
//!
//! Work that may wait for another operation (telling the other mounts of the space of a change:
//! they lock their open handles, whose commits wait for claims) is not done under a claim:
//! [`after_claims`] runs it once the thread holds none.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

thread_local! {
    /// Claims this thread holds.
    static HELD_HERE: Cell<usize> = const { Cell::new(0) };
    /// What runs once this thread holds no claim (see [`after_claims`]).
    static AFTER: RefCell<Vec<Box<dyn FnOnce()>>> = const { RefCell::new(Vec::new()) };
}

/// Whether this thread holds a claim.
pub fn held_here() -> bool {
    HELD_HERE.get() > 0
}

/// Runs `work` now if this thread holds no claim, else as soon as it drops its last one (in
/// the order given): for work that may wait for operations that wait for claims.
pub fn after_claims(work: impl FnOnce() + 'static) {
    if HELD_HERE.get() == 0 {
        work();
    } else {
        AFTER.with_borrow_mut(|after| after.push(Box::new(work)));
    }
}

/// How much of the namespace a claim covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Span {
    /// The entry at the path.
    Entry,
    /// The entry and everything below it.
    Tree,
}

/// The claims held in one space.
#[derive(Default)]
pub struct Claims {
    held: Mutex<Held>,
    released: Condvar,
    next: AtomicU64,
}

/// The claims held, and how many claims wait for some of them to be released: a release
/// wakes waiters only when there are any (waking nobody is still a system call, and every
/// create and commit releases a claim).
#[derive(Default)]
struct Held {
    claims: Vec<(u64, PathBuf, Span)>,
    waiting: usize,
}

/// Claims held until dropped.
pub struct Claim<'a> {
    claims: &'a Claims,
    id: u64,
}

fn conflicts((a, sa): (&Path, Span), (b, sb): (&Path, Span)) -> bool {
    a == b || (sa == Span::Tree && b.starts_with(a)) || (sb == Span::Tree && a.starts_with(b))
}

impl Claims {
    /// Claims `names` (all at once), waiting while any conflicts with a claim held.
    pub fn claim(&self, names: &[(&Path, Span)]) -> Claim<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while held.claims.iter().any(|(_, p, s)| {
            names
                .iter()
                .any(|&(n, ns)| conflicts((p.as_path(), *s), (n, ns)))
        }) {
            held.waiting += 1;
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
            held.waiting -= 1;
        }
        for &(n, s) in names {
            held.claims.push((id, n.to_path_buf(), s));
        }
        HELD_HERE.set(HELD_HERE.get() + 1);
        Claim { claims: self, id }
    }

    /// Waits while a subtree claim (a rename moving names) covers `path`; whether it waited.
    /// For an operation that does not change names but must not mix what it read of one file
    /// before a move with the name's new file (see `Fs::open`).
    pub fn wait_moves(&self, path: &Path) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mut waited = false;
        while held
            .claims
            .iter()
            .any(|(_, p, s)| *s == Span::Tree && conflicts((p, *s), (path, Span::Entry)))
        {
            waited = true;
            held.waiting += 1;
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
            held.waiting -= 1;
        }
        waited
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut held = self.claims.held.lock().unwrap_or_else(|e| e.into_inner());
        held.claims.retain(|(id, _, _)| *id != self.id);
        let waiting = held.waiting > 0;
        drop(held);
        if waiting {
            self.claims.released.notify_all();
        }
        let left = HELD_HERE.get().saturating_sub(1);
        HELD_HERE.set(left);
        if left == 0 {
            // (Work may claim again, and defer more: taken a batch at a time.)
            while let Some(batch) =
                AFTER.with_borrow_mut(|after| (!after.is_empty()).then(|| std::mem::take(after)))
            {
                for work in batch {
                    work();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn only_conflicting_claims_wait() {
        assert!(conflicts(
            (Path::new("a"), Span::Entry),
            (Path::new("a"), Span::Entry)
        ));
        assert!(!conflicts(
            (Path::new("a"), Span::Entry),
            (Path::new("a/b"), Span::Entry)
        ));
        assert!(conflicts(
            (Path::new("a"), Span::Tree),
            (Path::new("a/b/c"), Span::Entry)
        ));
        assert!(conflicts(
            (Path::new("a/b"), Span::Entry),
            (Path::new("a"), Span::Tree)
        ));
        assert!(!conflicts(
            (Path::new("ab"), Span::Entry),
            (Path::new("a"), Span::Tree)
        ));
        assert!(!conflicts(
            (Path::new("b"), Span::Tree),
            (Path::new("a"), Span::Tree)
        ));

        let claims = Arc::new(Claims::default());
        let rename = claims.claim(&[(Path::new("d"), Span::Tree), (Path::new("e"), Span::Tree)]);
        // Unrelated names go ahead at once.
        drop(claims.claim(&[(Path::new("f"), Span::Entry)]));
        let waiter = {
            let claims = claims.clone();
            std::thread::spawn(move || {
                let _c = claims.claim(&[(Path::new("d/x"), Span::Entry)]);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiter.is_finished(),
            "a claim inside the renamed tree waits"
        );
        drop(rename);
        waiter.join().unwrap();
    }

    #[test]
    fn waiting_for_moves_waits_for_renames_only() {
        let claims = Arc::new(Claims::default());
        assert!(!claims.wait_moves(Path::new("d/x")));
        let commit = claims.claim(&[(Path::new("d/x"), Span::Entry)]);
        assert!(
            !claims.wait_moves(Path::new("d/x")),
            "a commit moves nothing"
        );
        drop(commit);
        let rename = claims.claim(&[(Path::new("d"), Span::Tree), (Path::new("e"), Span::Tree)]);
        let waiter = {
            let claims = claims.clone();
            std::thread::spawn(move || claims.wait_moves(Path::new("d/x")))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "a name inside a renamed tree waits");
        drop(rename);
        assert!(waiter.join().unwrap(), "and says it waited");
    }
}
