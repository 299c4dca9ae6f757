//! A thread pool whose workers spin between jobs, for the many short parallel products of a
//! decode step.
//!
//! A decode step runs four or five parallel products per layer, each taking tens of
//! microseconds. Rayon's workers go to sleep between them, and waking them through the kernel
//! cost about a tenth of a SmolLM2 step (perf: scheduler functions at 12 % of the samples).
//! These workers instead keep polling (spinning and yielding) for a short while after each job,
//! so the next job needs no wake-up through the kernel, and park only when no job came for
//! [`SPIN`].
//!
//! One job runs at a time. A thread that finds the pool busy (two models decoding at once)
//! gets `false` from [`run`] and runs its job elsewhere.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_millis(2);

/// The job state word is `id << 40 | count << 20 | next`: the job's id, its task count and the
/// index of its next unclaimed task.
const ID_BITS: u32 = 24;
const COUNT_BITS: u32 = 20;
const INDEX_MASK: u64 = (1 << COUNT_BITS) - 1;

/// The maximum number of tasks per job. [`run`] returns `false` for larger jobs.
pub const MAX_TASKS: usize = (1 << COUNT_BITS) - 1;

/// The caller's closure with its lifetime erased. [`Pool::run`] keeps it alive until every
/// claimed task has finished.
type Job = &'static (dyn Fn(usize) + Sync);

struct Shared {
    /// The job state word. Claiming a task is one compare-and-swap on it, which fails if
    /// another job has started since it was read.
    state: AtomicU64,
    /// Points to a [`Job`] on the submitting thread's stack while a job runs.
    job: AtomicPtr<Job>,
    /// Claimed or unclaimed tasks of the current job that have not finished.
    remaining: AtomicUsize,
    /// Set when a task panicked on a worker.
    panicked: AtomicBool,
    /// Workers parked on `wake`.
    parked: AtomicUsize,
    park_lock: Mutex<()>,
    wake: Condvar,
}

struct Pool {
    shared: Arc<Shared>,
    /// Held by the thread whose job is running.
    submit: Mutex<()>,
}

/// Runs `task(i)` for every `i` in `0..tasks` on the calling thread and the pool's workers, and
/// returns once all have finished. A panic in a task is raised again here once the others
/// finish. Returns `false`, running nothing, when the pool is busy with another job (two models
/// decoding at once, or a task that submits a job). It also returns `false` for a job of more
/// than [`MAX_TASKS`] tasks and when the pool has no workers (one thread). The caller then runs
/// the tasks another way.
pub fn run(tasks: usize, task: &(dyn Fn(usize) + Sync)) -> bool {
    pool().is_some_and(|pool| pool.run(tasks, task))
}

/// Returns the process's pool, with one worker fewer than rayon's thread count, because the
/// calling thread takes part.
fn pool() -> Option<&'static Pool> {
    static POOL: OnceLock<Option<Pool>> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(rayon::current_num_threads().saturating_sub(1))).as_ref()
}

impl Pool {
    fn new(workers: usize) -> Option<Self> {
        if workers == 0 {
            return None;
        }
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            remaining: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            park_lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        for index in 0..workers {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("tierd-spin-{index}"))
                .spawn(move || worker(&shared));
            if let Err(error) = spawned {
                // Workers started so far park for good, because no job is ever submitted.
                tracing::warn!(%error, "failed to start a spinning worker; parallel products use rayon only");
                return None;
            }
        }
        Some(Self { shared, submit: Mutex::new(()) })
    }

    fn run(&self, tasks: usize, task: &(dyn Fn(usize) + Sync)) -> bool {
        if tasks > MAX_TASKS {
            return false;
        }
        let _submitting = match self.submit.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::WouldBlock) => return false,
            // A panic raised from an earlier job poisoned the lock after that job was closed.
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        };
        if tasks == 0 {
            return true;
        }
        let shared = &*self.shared;

        // SAFETY: the closure outlives every call made through `job`: workers call it only for
        // a task they claimed, and `close` below returns only once every claimed task finished.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(task) };
        shared.job.store(std::ptr::from_ref(&job).cast_mut(), Ordering::Release);
        shared.remaining.store(tasks, Ordering::SeqCst);
        let id = ((shared.state.load(Ordering::SeqCst) >> (2 * COUNT_BITS)) + 1) & ((1 << ID_BITS) - 1);
        shared.state.store(id << (2 * COUNT_BITS) | (tasks as u64) << COUNT_BITS, Ordering::SeqCst);
        if shared.parked.load(Ordering::SeqCst) > 0 {
            let _parking = lock(&shared.park_lock);
            shared.wake.notify_all();
        }

        let mut panic = None;
        while let Some(index) = claim(shared) {
            let result = catch_unwind(AssertUnwindSafe(|| task(index)));
            shared.remaining.fetch_sub(1, Ordering::Release);
            if let Err(payload) = result {
                panic = Some(payload);
                break;
            }
        }
        close(shared);
        if let Some(payload) = panic {
            resume_unwind(payload);
        }
        if shared.panicked.swap(false, Ordering::AcqRel) {
            panic!("a parallel task panicked on a spinning worker");
        }
        true
    }
}

/// Takes the next task of the current job, if one is left.
fn claim(shared: &Shared) -> Option<usize> {
    let mut state = shared.state.load(Ordering::Acquire);
    loop {
        let count = (state >> COUNT_BITS) & INDEX_MASK;
        let next = state & INDEX_MASK;
        if next >= count {
            return None;
        }
        match shared.state.compare_exchange_weak(state, state + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(next as usize),
            Err(current) => state = current,
        }
    }
}

/// Ends the current job: no task can be claimed after this, the unclaimed ones (left by a
/// panic) are dropped, and the claimed ones are waited for.
fn close(shared: &Shared) {
    let mut state = shared.state.load(Ordering::Acquire);
    let unclaimed = loop {
        let count = (state >> COUNT_BITS) & INDEX_MASK;
        let next = state & INDEX_MASK;
        let closed = (state & !INDEX_MASK) | count;
        match shared.state.compare_exchange_weak(state, closed, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => break count.saturating_sub(next) as usize,
            Err(current) => state = current,
        }
    };
    shared.remaining.fetch_sub(unclaimed, Ordering::AcqRel);
    // A worker may have been preempted in the middle of its task: yielding now and then gives
    // it this core back on a machine with more runnable threads than cores.
    let mut spins = 0u32;
    while shared.remaining.load(Ordering::Acquire) > 0 {
        spins += 1;
        if spins.is_multiple_of(64) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    shared.job.store(std::ptr::null_mut(), Ordering::Release);
}

fn worker(shared: &Shared) {
    let mut idle_since = Instant::now();
    loop {
        if let Some(index) = claim(shared) {
            let job = shared.job.load(Ordering::Acquire);
            // SAFETY: this thread has claimed an unfinished task of the job, so `Pool::run` is still
            // waiting in `close` and both the `Job` it points to and the closure are alive.
            let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(index) }));
            if result.is_err() {
                shared.panicked.store(true, Ordering::Release);
            }
            shared.remaining.fetch_sub(1, Ordering::Release);
            idle_since = Instant::now();
            continue;
        }
        if idle_since.elapsed() < SPIN {
            // Yielding rather than only spinning lets rayon's threads run where they share
            // this core, as they do during a prompt.
            std::thread::yield_now();
            continue;
        }
        // Parking: `run` publishes a job before it reads `parked`, and this thread counts
        // itself in `parked` before it looks for a job, so one of the two observes the other.
        let mut parking = lock(&shared.park_lock);
        shared.parked.fetch_add(1, Ordering::SeqCst);
        while unclaimed(shared) == 0 {
            parking = shared.wake.wait(parking).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        shared.parked.fetch_sub(1, Ordering::SeqCst);
        drop(parking);
        idle_since = Instant::now();
    }
}

/// Returns how many tasks of the current job no thread has claimed yet.
fn unclaimed(shared: &Shared) -> u64 {
    let state = shared.state.load(Ordering::SeqCst);
    ((state >> COUNT_BITS) & INDEX_MASK).saturating_sub(state & INDEX_MASK)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every task runs exactly once, for jobs of many sizes in a row, including jobs submitted
    /// after the workers parked.
    #[test]
    fn runs_each_task_once() {
        let pool = Pool::new(3).expect("pool");
        for (round, tasks) in [1, 2, 7, 64, 1000, 3].into_iter().enumerate() {
            let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            assert!(pool.run(tasks, &|i| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            }));
            for (i, count) in counts.iter().enumerate() {
                assert_eq!(count.load(Ordering::Relaxed), 1, "job of {tasks} tasks, task {i}");
            }
            if round == 3 {
                std::thread::sleep(SPIN * 3);
            }
        }
    }

    /// Threads that submit at once either run their job in the pool or get `false` (busy),
    /// and no task of one job runs as part of another.
    #[test]
    fn concurrent_submitters_stay_apart() {
        let pool = Pool::new(2).expect("pool");
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let pool = &pool;
                scope.spawn(move || {
                    for round in 0..200 {
                        let tasks = 1 + (thread * 7 + round) % 40;
                        let sums: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                        let task = |i: usize| {
                            sums[i].fetch_add(thread * 1000 + i, Ordering::Relaxed);
                        };
                        if !pool.run(tasks, &task) {
                            (0..tasks).for_each(task);
                        }
                        for (i, sum) in sums.iter().enumerate() {
                            assert_eq!(sum.load(Ordering::Relaxed), thread * 1000 + i, "thread {thread}, task {i}");
                        }
                    }
                });
            }
        });
    }

    /// A panicking task is raised on the submitting thread after the other tasks finish, and
    /// the pool runs later jobs normally.
    #[test]
    fn task_panic_reaches_submitter() {
        let pool = Pool::new(1).expect("pool");
        let finished = AtomicUsize::new(0);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            pool.run(50, &|i| {
                assert!(i != 25, "task 25 fails");
                finished.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(outcome.is_err(), "the panic was lost");
        assert_eq!(pool.shared.remaining.load(Ordering::Acquire), 0);

        let counts: Vec<AtomicUsize> = (0..20).map(|_| AtomicUsize::new(0)).collect();
        assert!(pool.run(20, &|i| {
            counts[i].fetch_add(1, Ordering::Relaxed);
        }));
        assert!(counts.iter().all(|count| count.load(Ordering::Relaxed) == 1));
    }
}
