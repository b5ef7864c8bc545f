//! The retry schedule of one provider: exponential delay bounds (the `backoff` crate, without
//! its own randomisation), full jitter on top, and `Retry-After` honoured but clamped.

use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::{ExponentialBackoff, ExponentialBackoffBuilder};

use crate::providers::RetryConfig;

/// When to call a provider again after a transient failure.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Delay bound before each retry: `bounds[0]` before the second call, and so on.
    bounds: Vec<Duration>,
    /// Calls per target, the first one included.
    max_attempts: u32,
}

impl RetryPolicy {
    /// The policy for validated settings.
    pub fn new(config: &RetryConfig) -> Self {
        let (initial, max) = (config.initial_interval, config.max_interval);
        let mut schedule: ExponentialBackoff = ExponentialBackoffBuilder::new()
            .with_initial_interval(initial)
            .with_multiplier(config.multiplier)
            .with_max_interval(max)
            .with_randomization_factor(0.0)
            .with_max_elapsed_time(None)
            .build();
        let retries = config.max_attempts.saturating_sub(1) as usize;
        let bounds = (0..retries)
            .map(|_| schedule.next_backoff().unwrap_or(max))
            .collect();
        RetryPolicy {
            bounds,
            max_attempts: config.max_attempts.max(1),
        }
    }

    /// Calls per target, the first one included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay bound before retry number `retry` (1 for the second call); `None` when no
    /// retry is left.
    pub fn bound(&self, retry: u32) -> Option<Duration> {
        self.bounds.get((retry as usize).checked_sub(1)?).copied()
    }

    /// The delay before retry number `retry`: uniformly random up to its bound (full jitter),
    /// but never shorter than the provider's `Retry-After`, itself clamped to `retry_after_max`.
    pub fn delay(
        &self,
        retry: u32,
        retry_after: Option<Duration>,
        retry_after_max: Duration,
    ) -> Option<Duration> {
        let bound = self.bound(retry)?;
        let jittered = Duration::from_nanos(fastrand::u64(0..=bound.as_nanos() as u64));
        Some(match retry_after {
            Some(asked) => jittered.max(asked.min(retry_after_max)),
            None => jittered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(attempts: u32) -> RetryPolicy {
        RetryPolicy::new(&RetryConfig {
            initial_interval: Duration::from_millis(100),
            multiplier: 2.0,
            max_interval: Duration::from_millis(300),
            max_attempts: attempts,
        })
    }

    #[test]
    fn bounds_grow_exponentially_up_to_the_maximum() {
        let policy = policy(5);
        let bounds: Vec<_> = (1..=4)
            .map(|r| policy.bound(r).unwrap().as_millis())
            .collect();
        assert_eq!(bounds, [100, 200, 300, 300]);
        assert_eq!(policy.bound(5), None, "five calls means four retries");
        assert_eq!(policy.bound(0), None);
    }

    #[test]
    fn delays_are_jittered_within_the_bound_and_respect_retry_after() {
        let policy = policy(3);
        let max = Duration::from_secs(1);
        let delays: Vec<_> = (0..200)
            .map(|_| policy.delay(2, None, max).unwrap())
            .collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(200)));
        assert!(
            delays.iter().any(|d| *d < Duration::from_millis(100)),
            "full jitter reaches below half the bound"
        );
        let asked = policy
            .delay(1, Some(Duration::from_millis(700)), max)
            .unwrap();
        assert_eq!(asked, Duration::from_millis(700));
        let clamped = policy.delay(1, Some(Duration::from_secs(60)), max).unwrap();
        assert_eq!(clamped, max);
        assert_eq!(policy.delay(3, None, max), None);
    }
}
