//! Whose `close()` commits a handle.
//!
//! FUSE sends a `flush` for every `close()` of every copy of a descriptor, including the copy a
//! child process inherits and closes at `exec` or exit without ever using it. Committing there
//! would publish what a thread of the parent has only half written (a program writing a file in
//! one thread while another thread starts a subprocess). So a handle remembers the threads that
//! opened it or changed the file through it, and a `flush` from a thread of another process
//! that did neither does not commit: the user's own `close()` does, and the last close of all
//! (`release`) always does.
//!
//! FUSE names the caller by its thread id in the daemon's pid namespace; `/proc/<tid>/status`
//! gives the process (thread group) of a thread that is still alive.

/// A thread id as FUSE reports the caller (0 when the caller is not visible to the daemon).
pub type Tid = u32;

/// More distinct threads than this and the handle stops telling users from strangers: every
/// close commits again, as without this module.
const MAX_USERS: usize = 8;

/// The threads that opened a handle or changed the file through it.
#[derive(Debug, Default)]
pub struct Users {
    tids: Vec<Tid>,
    /// Some user was not remembered (too many, or not visible to the daemon).
    overflowed: bool,
}

impl Users {
    /// Remembers `tid` as a user of the handle.
    pub fn add(&mut self, tid: Tid) {
        if tid == 0 {
            self.overflowed = true;
        } else if !self.tids.contains(&tid) {
            if self.tids.len() < MAX_USERS {
                self.tids.push(tid);
            } else {
                self.overflowed = true;
            }
        }
    }

    /// Whether a `close()` by thread `tid` comes from a process that neither opened the handle
    /// nor changed the file through it, while a process that did is still running. When that
    /// cannot be told (a thread not visible, every user gone, `/proc` unreadable), the answer
    /// is no: the close commits.
    pub fn stranger(&self, tid: Tid, group_of: impl Fn(Tid) -> Option<u32>) -> bool {
        if tid == 0 || self.overflowed || self.tids.is_empty() || self.tids.contains(&tid) {
            return false;
        }
        let Some(group) = group_of(tid) else {
            return false;
        };
        let mut user_elsewhere = false;
        for &user in &self.tids {
            match group_of(user) {
                Some(g) if g == group => return false,
                Some(_) => user_elsewhere = true,
                None => {}
            }
        }
        user_elsewhere
    }

    /// Whether a thread of the process `pid` (a thread group id) opened the handle or changed
    /// the file through it; yes when that cannot be told (too many users to remember).
    pub fn include_process(&self, pid: u32, group_of: impl Fn(Tid) -> Option<u32>) -> bool {
        self.overflowed
            || self
                .tids
                .iter()
                .any(|&tid| tid == pid || group_of(tid) == Some(pid))
    }
}

/// The process (thread group id) of thread `tid`, read from `/proc/<tid>/status`; `None` if
/// the thread has ended or is not visible.
pub fn thread_group(tid: Tid) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn my_tid() -> Tid {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() as Tid }
    }

    #[test]
    fn the_group_of_a_thread_is_its_process() {
        let me = std::process::id();
        let other = std::thread::spawn(my_tid).join().unwrap();
        assert_ne!(other, me);
        // The spawned thread has ended: it has no group any more.
        assert_eq!(thread_group(other), None);
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(my_tid()).unwrap();
            done_rx.recv().unwrap();
        });
        let live = rx.recv().unwrap();
        assert_eq!(thread_group(live), Some(me));
        assert_eq!(thread_group(my_tid()), Some(me));
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn only_a_process_that_never_used_the_handle_is_a_stranger() {
        // Threads 10 and 11 are one process, 20 another, 30 has ended.
        let group_of = |tid: Tid| match tid {
            10 | 11 => Some(10),
            20 => Some(20),
            _ => None,
        };
        let mut users = Users::default();
        users.add(10);
        assert!(!users.stranger(10, group_of), "the opener itself");
        assert!(
            !users.stranger(11, group_of),
            "another thread of the opener"
        );
        assert!(
            users.stranger(20, group_of),
            "a child closing what it inherited"
        );
        assert!(
            !users.stranger(0, group_of),
            "a caller the daemon cannot see"
        );
        assert!(!users.stranger(30, group_of), "a caller that has ended");

        users.add(20);
        assert!(
            !users.stranger(20, group_of),
            "a process that wrote through the handle"
        );

        let mut gone = Users::default();
        gone.add(30);
        assert!(!gone.stranger(20, group_of), "no user left to commit later");

        let mut many = Users::default();
        for tid in 100..100 + MAX_USERS as Tid + 1 {
            many.add(tid);
        }
        assert!(!many.stranger(20, |_| Some(1)), "too many users to tell");
    }
}
