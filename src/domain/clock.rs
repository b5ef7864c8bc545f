//! The source of "now": injected so that time-dependent logic can be tested with a fixed clock.

use jiff::Timestamp;

/// Tells the current time.
pub trait Clock: std::fmt::Debug + Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> Timestamp;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that shows what it was last set to: simulations move time on by hand.
#[derive(Debug)]
pub struct ManualClock(std::sync::atomic::AtomicI64);

impl ManualClock {
    /// A clock showing `at`.
    pub fn new(at: Timestamp) -> Self {
        ManualClock(std::sync::atomic::AtomicI64::new(at.as_microsecond()))
    }

    /// Shows `at` from now on.
    pub fn set(&self, at: Timestamp) {
        self.0
            .store(at.as_microsecond(), std::sync::atomic::Ordering::Release);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_microsecond(self.0.load(std::sync::atomic::Ordering::Acquire))
            .expect("a clock only ever holds a timestamp")
    }
}
