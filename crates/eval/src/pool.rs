//! Runs jobs on `parallel` threads and hands each result to the calling
//! thread as it finishes (which writes it to disk and moves the progress bar).
//! Plain threads: each job blocks on an HTTP call or on the local engine,
//! which batches concurrent requests by itself.

use std::sync::mpsc;
use std::sync::Mutex;

/// Progress of a job list: `done` of `total`, and a line about the last one.
pub trait Progress {
    /// Called once before the first job, with the number of jobs.
    fn start(&mut self, total: usize);
    /// Called after each job with a short description of its result.
    fn advance(&mut self, msg: &str);
    /// Called when all jobs are done.
    fn finish(&mut self);
}

/// A [`Progress`] that shows nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn start(&mut self, _: usize) {}
    fn advance(&mut self, _: &str) {}
    fn finish(&mut self) {}
}

/// Runs `work` over `jobs` with `parallel` threads; `done` gets every
/// result on this thread, in the order they finish. Stops handing out new
/// jobs once `done` returns an error, and returns that error.
pub fn run<J, R, E>(
    jobs: Vec<J>,
    parallel: usize,
    work: impl Fn(J) -> R + Sync,
    mut done: impl FnMut(R) -> Result<(), E>,
) -> Result<(), E>
where
    J: Send,
    R: Send,
{
    let queue = Mutex::new(jobs.into_iter());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<R>();
    std::thread::scope(|s| {
        for _ in 0..parallel.max(1) {
            let tx = tx.clone();
            let (queue, stop, work) = (&queue, &stop, &work);
            s.spawn(move || loop {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                let Some(job) = next else { return };
                if tx.send(work(job)).is_err() {
                    return;
                }
            });
        }
        drop(tx);
        let mut result = Ok(());
        for r in rx {
            if result.is_ok() {
                if let Err(e) = done(r) {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    result = Err(e);
                }
            }
        }
        result
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_job_runs_once_in_parallel() {
        let mut got = Vec::new();
        super::run(
            (0..50).collect(),
            4,
            |i: i32| i * 2,
            |r| -> Result<(), ()> {
                got.push(r);
                Ok(())
            },
        )
        .unwrap();
        got.sort();
        assert_eq!(got, (0..50).map(|i| i * 2).collect::<Vec<_>>());
    }
}
