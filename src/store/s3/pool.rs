//! A fixed set of threads that run the store's background and parallel requests (part
//! uploads, aborts): their number bounds the requests in flight, and with it the memory that
//! part bodies take (one part each).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

type Job = Box<dyn FnOnce() + Send>;

struct Queue {
    jobs: VecDeque<Job>,
    stopped: bool,
}

/// The threads and their queue. Dropping the last handle lets the threads finish the queue
/// and end.
pub struct Pool {
    shared: Arc<(Mutex<Queue>, Condvar)>,
    threads: usize,
}

impl Pool {
    /// Starts `threads` threads named `name`.
    pub fn new(threads: usize, name: &str) -> std::io::Result<Pool> {
        let shared = Arc::new((
            Mutex::new(Queue {
                jobs: VecDeque::new(),
                stopped: false,
            }),
            Condvar::new(),
        ));
        for _ in 0..threads.max(1) {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || {
                    loop {
                        let job = {
                            let (lock, cv) = &*shared;
                            let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
                            loop {
                                if let Some(job) = q.jobs.pop_front() {
                                    break job;
                                }
                                if q.stopped {
                                    return;
                                }
                                q = cv.wait(q).unwrap_or_else(|e| e.into_inner());
                            }
                        };
                        // A job that panics (a bug, or a thread that cannot get what a
                        // request needs) does not take the thread with it: the pool keeps
                        // its size. (The job's own waiters see it fail: see `run_all` and
                        // `spool`.)
                        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                            log::error!("a job of the pool panicked (see above); the pool goes on");
                        }
                    }
                })?;
        }
        Ok(Pool {
            shared,
            threads: threads.max(1),
        })
    }

    /// How many jobs run at once, at most.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Queues `job`.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let (lock, cv) = &*self.shared;
        lock.lock()
            .unwrap_or_else(|e| e.into_inner())
            .jobs
            .push_back(Box::new(job));
        cv.notify_one();
    }

    /// Runs every job of `jobs` on the pool and returns their results in order, once all are
    /// done.
    pub fn run_all<T: Send + 'static>(&self, jobs: Vec<Box<dyn FnOnce() -> T + Send>>) -> Vec<T> {
        let n = jobs.len();
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, job) in jobs.into_iter().enumerate() {
            let tx = tx.clone();
            self.run(move || {
                let _ = tx.send((i, job()));
            });
        }
        drop(tx);
        let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
        for (i, r) in rx {
            out[i] = Some(r);
        }
        out.into_iter()
            .map(|r| r.expect("every job of the pool ran"))
            .collect()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stopped = true;
        cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_in_parallel_and_results_come_back_in_order() {
        let pool = Pool::new(3, "test-pool").unwrap();
        let jobs: Vec<Box<dyn FnOnce() -> usize + Send>> = (0..10usize)
            .map(|i| {
                Box::new(move || {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    i * 2
                }) as Box<dyn FnOnce() -> usize + Send>
            })
            .collect();
        assert_eq!(
            pool.run_all(jobs),
            (0..10).map(|i| i * 2).collect::<Vec<_>>()
        );
    }
}
