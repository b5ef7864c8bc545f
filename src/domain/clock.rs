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
