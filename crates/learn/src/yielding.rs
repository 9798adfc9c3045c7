//! Training threads at idle priority hand the CPU back every 250 µs while they compute.
//!
//! The idle scheduling policy is meant to let a waking serving thread preempt a training
//! thread at once. On a 2-core Linux VM (kernel 6.18, a 250 Hz tick) it often did not: a
//! thread woken from another core onto a core where an idle-policy thread computed waited
//! for the next tick, up to 4 ms. Two idle-policy threads spinning took the p99 of such a
//! wakeup from 13 µs to 3.2 ms; yielding every 250 µs brought it back to 17 µs. A thread
//! yields only where it enters the scheduler, and candle's kernels never do, so a timer of
//! the thread's own interrupts it every [`PERIOD`] and the signal handler yields: any
//! thread waiting for that core runs, and the training thread goes on when none is. While
//! the thread waits for work ([`waiting`]) the timer is stopped, so an idle learner is
//! never woken by it.
//!
//! The workspace denies unsafe code; this module is where it is allowed, for the three
//! calls Rust's standard library has no safe form of: a thread-directed timer, a
//! signal handler, and `sched_yield` inside it.
#![allow(unsafe_code)]

use std::time::Duration;

/// How often a computing training thread yields.
pub const PERIOD: Duration = Duration::from_micros(250);

#[cfg(target_os = "linux")]
mod imp {
    use std::cell::{Cell, RefCell};
    use std::sync::Once;

    use super::PERIOD;

    /// The calling thread's timer: created by [`start`], deleted with the thread.
    struct Ticker {
        timer: libc::timer_t,
    }

    impl Ticker {
        fn set(&self, period: libc::timespec) {
            let spec = libc::itimerspec {
                it_interval: period,
                it_value: period,
            };
            // SAFETY: the timer is this thread's own and alive; the specs are plain values.
            unsafe { libc::timer_settime(self.timer, 0, &spec, std::ptr::null_mut()) };
        }
    }

    impl Drop for Ticker {
        fn drop(&mut self) {
            // SAFETY: the timer was created by `start` and is deleted once, here.
            unsafe { libc::timer_delete(self.timer) };
        }
    }

    thread_local! {
        static TICKER: RefCell<Option<Ticker>> = const { RefCell::new(None) };
        /// The signals this thread handled (a plain cell: safe to touch in the handler).
        pub(super) static TICKS: Cell<u64> = const { Cell::new(0) };
    }

    extern "C" fn on_tick(_: libc::c_int) {
        TICKS.with(|t| t.set(t.get() + 1));
        // SAFETY: sched_yield is async-signal-safe and touches no memory of ours.
        unsafe { libc::sched_yield() };
    }

    fn signal() -> libc::c_int {
        libc::SIGRTMIN()
    }

    fn install_handler() -> std::io::Result<()> {
        static INSTALL: Once = Once::new();
        let mut result = Ok(());
        INSTALL.call_once(|| {
            // SAFETY: a zeroed sigaction is a valid empty one; the handler is a plain
            // extern "C" function, restarting interrupted system calls.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_tick as extern "C" fn(libc::c_int) as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                if libc::sigaction(signal(), &action, std::ptr::null_mut()) != 0 {
                    result = Err(std::io::Error::last_os_error());
                }
            }
        });
        result
    }

    fn running() -> libc::timespec {
        libc::timespec {
            tv_sec: 0,
            tv_nsec: PERIOD.as_nanos() as libc::c_long,
        }
    }

    const STOPPED: libc::timespec = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };

    pub fn start() -> std::io::Result<()> {
        install_handler()?;
        // SAFETY: a zeroed sigevent is valid; it names this thread and the signal whose
        // handler is installed above. The timer is stored and deleted with the thread.
        let timer = unsafe {
            let mut event: libc::sigevent = std::mem::zeroed();
            event.sigev_notify = libc::SIGEV_THREAD_ID;
            event.sigev_signo = signal();
            event.sigev_notify_thread_id = libc::gettid();
            let mut timer: libc::timer_t = std::ptr::null_mut();
            if libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            timer
        };
        let ticker = Ticker { timer };
        ticker.set(running());
        TICKER.with(|t| *t.borrow_mut() = Some(ticker));
        Ok(())
    }

    pub fn waiting<T>(wait: impl FnOnce() -> T) -> T {
        let set = |period| {
            TICKER.with(|t| {
                if let Some(ticker) = t.borrow().as_ref() {
                    ticker.set(period);
                }
            });
        };
        set(STOPPED);
        let out = wait();
        set(running());
        out
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub fn start() -> std::io::Result<()> {
        Err(std::io::Error::other("yielding by a timer is Linux-only"))
    }

    pub fn waiting<T>(wait: impl FnOnce() -> T) -> T {
        wait()
    }
}

/// Makes the calling thread yield every [`PERIOD`] from now on, except inside
/// [`waiting`]. A failure leaves the thread as it was.
pub(crate) fn start() -> std::io::Result<()> {
    imp::start()
}

/// Runs `wait`, a wait for work, without the calling thread's yields (a thread that
/// never called [`start`] just runs it).
pub fn waiting<T>(wait: impl FnOnce() -> T) -> T {
    imp::waiting(wait)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::time::Instant;

    /// The thread's own CPU time.
    fn cpu_time() -> Duration {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid out-pointer for the calling thread's clock.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    }

    fn ticks() -> u64 {
        imp::TICKS.with(std::cell::Cell::get)
    }

    #[test]
    fn a_computing_thread_is_interrupted_and_a_waiting_one_is_not() {
        std::thread::spawn(|| {
            start().unwrap();
            // Computing: the handler runs (at least once per 250 µs of wall time).
            let (before, started) = (ticks(), cpu_time());
            let mut x = 0u64;
            while cpu_time() - started < Duration::from_millis(50) {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            let computing = ticks() - before;
            assert!(computing >= 10, "{computing} yields in 50 ms of computing");
            // Waiting: the timer is stopped (a tick due as it stopped may still come).
            let before = ticks();
            let slept = Instant::now();
            waiting(|| std::thread::sleep(Duration::from_millis(50)));
            assert!(slept.elapsed() >= Duration::from_millis(50));
            let waiting_ticks = ticks() - before;
            assert!(waiting_ticks <= 1, "{waiting_ticks} yields in a 50 ms wait");
        })
        .join()
        .unwrap();
    }
}
