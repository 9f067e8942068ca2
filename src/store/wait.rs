//! Waits on a remote store, announced: a thread about to wait for the network (a request to
//! an object store, or another thread's request it needs the answer of) calls [`announce`]
//! first, so that whoever hands this thread its work can have another thread take over
//! meanwhile.
//!
//! The FUSE adapter sets, on each of its request threads, a hook that has a standby thread
//! read requests in its place (`reader_gate`): one thread reads requests at a time, so without
//! it a request waiting on a slow or frozen store would hold up every other request of the
//! mount, even those the store need not answer (reads of cached files, writes to the spool).
//! Threads without a hook (tests, the store's own background threads) announce to nobody.
//!
//! The hook runs on the announcing thread, which may hold locks of the store: it must not
//! call into the store or wait.

use std::cell::RefCell;

thread_local! {
    static HOOK: RefCell<Option<Box<dyn Fn()>>> = const { RefCell::new(None) };
}

/// Whether this thread has a hook.
pub fn hooked() -> bool {
    HOOK.with(|h| h.borrow().is_some())
}

/// Sets what [`announce`] does on this thread (in place of what was set).
pub fn set_hook(hook: Box<dyn Fn()>) {
    HOOK.with(|h| *h.borrow_mut() = Some(hook));
}

/// This thread is about to wait on the store.
pub fn announce() {
    HOOK.with(|h| {
        if let Some(hook) = &*h.borrow() {
            hook();
        }
    });
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn a_hook_runs_on_its_own_thread_only() {
        super::announce(); // no hook: nothing happens
        let runs = Rc::new(Cell::new(0));
        assert!(!super::hooked());
        let r = runs.clone();
        super::set_hook(Box::new(move || r.set(r.get() + 1)));
        assert!(super::hooked());
        super::announce();
        super::announce();
        assert_eq!(runs.get(), 2);
        std::thread::spawn(|| {
            assert!(!super::hooked());
            super::announce();
        })
        .join()
        .unwrap();
        assert_eq!(runs.get(), 2);
    }
}
