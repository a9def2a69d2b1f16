//! Ctrl-C: during an answer it stops that answer; at any other time it ends
//! the program as usual.
//!
//! The line editor reads keys in raw mode, where Ctrl-C is a key it reports
//! itself, so the signal only arrives while an answer streams (the terminal
//! is back in cooked mode then) or while plain stdin is being read.

use std::sync::atomic::{AtomicBool, Ordering};

/// An answer is streaming: Ctrl-C stops it instead of ending the program.
static GENERATING: AtomicBool = AtomicBool::new(false);
/// Ctrl-C was pressed during the current answer.
static CANCELLED: AtomicBool = AtomicBool::new(false);

/// Installs the handler (once; later calls do nothing).
pub fn install() {
    // Fails only when a handler is already set, e.g. in a second session.
    let _ = ctrlc::set_handler(|| {
        if GENERATING.load(Ordering::SeqCst) {
            CANCELLED.store(true, Ordering::SeqCst);
        } else {
            eprintln!();
            std::process::exit(130);
        }
    });
}

/// Marks an answer as streaming until the guard is dropped.
pub fn answering() -> AnswerGuard {
    CANCELLED.store(false, Ordering::SeqCst);
    GENERATING.store(true, Ordering::SeqCst);
    AnswerGuard
}

/// Whether Ctrl-C was pressed since [`answering`].
pub fn cancelled() -> bool {
    CANCELLED.load(Ordering::SeqCst)
}

/// See [`answering`].
pub struct AnswerGuard;

impl Drop for AnswerGuard {
    fn drop(&mut self) {
        GENERATING.store(false, Ordering::SeqCst);
        CANCELLED.store(false, Ordering::SeqCst);
    }
}
