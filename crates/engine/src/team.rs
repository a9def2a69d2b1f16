//! The threads that run the engine's parallel loops.
//!
//! A decode step is ~150 short parallel loops (a matrix product or an attention
//! pass each, tens of microseconds), so what a loop costs to start matters as much
//! as the loop. rayon hands each one to workers that may have gone to sleep, and
//! waking one is a system call plus a reschedule. Here the helpers stay awake,
//! spinning on a generation counter, for a while after each loop (then they park),
//! the caller works too, and tasks are claimed one at a time, so a late or
//! descheduled helper delays nothing: the caller takes what it has not claimed.
//! This is the product's hot path, hence our own small pool.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Denormal floats flushed to zero (x86 MXCSR FTZ + DAZ) while alive; the
/// previous mode comes back on drop. Each arithmetic step that meets a denormal
/// costs a microcode assist of ~100 cycles: a SiLU of a large negative gate, or a
/// Q8_K block of such values whose scale times the weight's is below f32's
/// normal range, made one 8B down projection 11x slower. Values that small
/// (< 1.2e-38) change no logit a user can see.
pub struct DenormalsOff {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

#[cfg(target_arch = "x86_64")]
const FTZ_DAZ: u32 = 0x8040;

impl DenormalsOff {
    #[allow(clippy::new_without_default)]
    pub fn new() -> DenormalsOff {
        #[cfg(target_arch = "x86_64")]
        {
            let saved = mxcsr();
            if saved & FTZ_DAZ != FTZ_DAZ {
                set_mxcsr(saved | FTZ_DAZ);
            }
            DenormalsOff { saved }
        }
        #[cfg(not(target_arch = "x86_64"))]
        DenormalsOff {}
    }
}

impl Drop for DenormalsOff {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if mxcsr() != self.saved {
            set_mxcsr(self.saved);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn mxcsr() -> u32 {
    let mut v = 0u32;
    // SAFETY: stores the 32-bit control register into `v`.
    unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut v, options(nostack)) };
    v
}

#[cfg(target_arch = "x86_64")]
fn set_mxcsr(v: u32) {
    // SAFETY: only the FTZ/DAZ bits differ from the current value (or it is the
    // value read before): no exception is unmasked.
    unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &v, options(nostack, readonly)) };
}

/// How long an idle helper keeps spinning before it parks.
const SPIN: Duration = Duration::from_micros(300);

/// A loop body: runs task `i` of the current loop.
type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// The current loop: its generation, body (lifetime erased, see `run`) and size.
    slot: Mutex<Slot>,
    wake: Condvar,
    /// Generation (high 32 bits) and next unclaimed task (low 32 bits).
    claim: AtomicU64,
    /// The generation of the newest loop, for spinning helpers.
    generation: AtomicU64,
    done: AtomicUsize,
    panicked: AtomicBool,
}

struct Slot {
    generation: u64,
    task: Option<Task<'static>>,
    tasks: usize,
    sleepers: usize,
}

/// The engine's helper threads (one fewer than the kernel threads: the caller is
/// the last one).
pub struct Team {
    shared: Arc<Shared>,
    helpers: usize,
    /// Serializes callers: one loop at a time.
    busy: Mutex<()>,
}

impl Team {
    /// The process's team, sized by rayon's thread count (`RAYON_NUM_THREADS`,
    /// which `--threads` sets).
    pub fn global() -> &'static Team {
        static TEAM: OnceLock<Team> = OnceLock::new();
        TEAM.get_or_init(|| Team::new(rayon::current_num_threads().max(1)))
    }

    fn new(threads: usize) -> Team {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot {
                generation: 0,
                task: None,
                tasks: 0,
                sleepers: 0,
            }),
            wake: Condvar::new(),
            claim: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        });
        let mut helpers = 0;
        for i in 1..threads {
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vicugna-team-{i}"))
                .spawn(move || helper(&s));
            // Without a helper the caller simply does all the work.
            if spawned.is_ok() {
                helpers += 1;
            }
        }
        Team {
            shared,
            helpers,
            busy: Mutex::new(()),
        }
    }

    /// Threads that work on a loop, the caller included.
    pub fn threads(&self) -> usize {
        self.helpers + 1
    }

    /// Runs `f(0) .. f(tasks - 1)` on the team and the calling thread; returns when
    /// all have run. A panic in a task is re-raised here.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        let _flush = DenormalsOff::new();
        if tasks == 1 || self.helpers == 0 {
            (0..tasks).for_each(f);
            return;
        }
        let _one = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        let generation = {
            let mut slot = s.slot.lock().unwrap_or_else(|e| e.into_inner());
            slot.generation += 1;
            // SAFETY: the body is only called for tasks claimed under this
            // generation (`claim_next` checks it), and this function returns only
            // after all of those have finished (`done == tasks`), so no call
            // outlives the borrow.
            slot.task = Some(unsafe { std::mem::transmute::<Task<'_>, Task<'static>>(f) });
            slot.tasks = tasks;
            s.done.store(0, Ordering::Relaxed);
            s.claim.store(slot.generation << 32, Ordering::Release);
            s.generation.store(slot.generation, Ordering::Release);
            if slot.sleepers > 0 {
                s.wake.notify_all();
            }
            slot.generation
        };
        work(s, generation, f, tasks);
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < tasks {
            // Only tasks a helper already claimed are outstanding: short waits.
            spins += 1;
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        s.slot.lock().unwrap_or_else(|e| e.into_inner()).task = None;
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a task of a parallel loop panicked");
        }
    }
}

/// Claims the next task of loop `generation`, if it is still current and has one.
fn claim_next(s: &Shared, generation: u64, tasks: usize) -> Option<usize> {
    let mut cur = s.claim.load(Ordering::Acquire);
    loop {
        let i = (cur & 0xFFFF_FFFF) as usize;
        if cur >> 32 != generation || i >= tasks {
            return None;
        }
        match s
            .claim
            .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return Some(i),
            Err(now) => cur = now,
        }
    }
}

/// Runs claimed tasks of one loop until none is left.
fn work(s: &Shared, generation: u64, f: Task<'_>, tasks: usize) {
    while let Some(i) = claim_next(s, generation, tasks) {
        if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        // Publishes this task's writes to the caller that sees `done` complete.
        s.done.fetch_add(1, Ordering::Release);
    }
}

fn helper(s: &Shared) {
    // For the thread's life: it runs nothing but the engine's loops.
    std::mem::forget(DenormalsOff::new());
    let mut seen = 0u64;
    loop {
        // Spin (then yield) while loops keep coming; park when they stop.
        let start = Instant::now();
        let mut spins = 0u32;
        while s.generation.load(Ordering::Acquire) == seen {
            spins += 1;
            if spins < 1 << 10 {
                std::hint::spin_loop();
            } else if start.elapsed() < SPIN {
                std::thread::yield_now();
            } else {
                let mut slot = s.slot.lock().unwrap_or_else(|e| e.into_inner());
                slot.sleepers += 1;
                while slot.generation == seen {
                    slot = s.wake.wait(slot).unwrap_or_else(|e| e.into_inner());
                }
                slot.sleepers -= 1;
                break;
            }
        }
        let (generation, task, tasks) = {
            let slot = s.slot.lock().unwrap_or_else(|e| e.into_inner());
            (slot.generation, slot.task, slot.tasks)
        };
        seen = generation;
        if let Some(f) = task {
            work(s, generation, f, tasks);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_across_many_loops() {
        let team = Team::new(3);
        for n in [1usize, 2, 5, 64, 1000] {
            for _ in 0..50 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                team.run(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}");
            }
        }
    }

    #[test]
    fn denormals_are_flushed_inside_a_loop_and_kept_outside() {
        let tiny = std::hint::black_box(1e-30f32);
        let scale = std::hint::black_box(1e-10f32);
        assert!(tiny * scale > 0.0, "a denormal product outside the team");
        let team = Team::new(2);
        let flushed: Vec<AtomicBool> = (0..4).map(|_| AtomicBool::new(false)).collect();
        team.run(4, &|i| {
            let v = std::hint::black_box(tiny) * std::hint::black_box(scale);
            flushed[i].store(v == 0.0, Ordering::Relaxed);
        });
        #[cfg(target_arch = "x86_64")]
        assert!(flushed.iter().all(|f| f.load(Ordering::Relaxed)));
        assert!(tiny * scale > 0.0, "the caller's mode is restored");
    }

    #[test]
    fn a_panicking_task_is_reported_to_the_caller() {
        let team = Team::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| team.run(8, &|i| assert_ne!(i, 5))));
        assert!(r.is_err());
        // The team still works afterwards.
        let count = AtomicUsize::new(0);
        team.run(8, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 8);
    }
}
