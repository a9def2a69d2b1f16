//! A fixed pool of scoped threads working through a list. Local requests from
//! these threads meet in the engine, which batches them; API requests overlap.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::error::{ClassifyError, Result};

/// Runs `f` on every element with `threads` threads and returns the results in
/// order. Stops taking new work when `stop` is set (then fails with
/// [`ClassifyError::Interrupted`]) or after the first error (then returns it).
pub fn par_map<T: Sync, R: Send>(
    threads: usize,
    items: &[T],
    stop: &AtomicBool,
    f: impl Fn(usize, &T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    let first_error: Mutex<Option<ClassifyError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                if stop.load(Ordering::Relaxed) || failed.load(Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { return };
                match f(i, item) {
                    Ok(r) => results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r),
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    if results.iter().any(Option::is_none) {
        return Err(ClassifyError::Interrupted);
    }
    Ok(results.into_iter().map(|r| r.expect("checked above")).collect())
}
