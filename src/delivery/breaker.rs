//! Circuit breakers, one per provider and one per provider × destination route. A breaker
//! opens after N failures in a row or when the error rate over the last calls is too high,
//! rejects calls during its cool-down, then lets one probe through (half-open): success closes
//! it, failure opens it again. It also keeps the recent figures that `ListProviders` shows.
//! State sits behind a plain mutex that is never held across an await.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;
use tokio::time::Instant;

use crate::providers::BreakerConfig;

/// How many latencies are kept for the percentiles.
const LATENCY_SAMPLES: usize = 256;

/// The state of a circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// Calls are rejected until the cool-down ends.
    Open,
    /// One probe call is allowed to test the provider.
    HalfOpen,
}

impl CircuitState {
    /// `CLOSED`, `OPEN` or `HALF_OPEN`.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "CLOSED",
            CircuitState::Open => "OPEN",
            CircuitState::HalfOpen => "HALF_OPEN",
        }
    }
}

/// Whether a call may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The circuit is closed.
    Allowed,
    /// The circuit is half-open and this call is its probe.
    Probe,
    /// The circuit is open (or its probe is under way).
    Rejected,
}

/// What a call told the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallResult {
    /// The provider worked (including a refusal that is about the recipient).
    Success,
    /// The provider failed (unavailable, timeout, throttled, misconfigured, rejected).
    Failure,
}

#[derive(Debug)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct Figures {
    phase: Phase,
    consecutive_failures: u32,
    window: VecDeque<bool>,
    latencies: VecDeque<Duration>,
    last_error: Option<(String, Timestamp)>,
}

/// A snapshot for status pages.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSnapshot {
    /// The state now.
    pub state: CircuitState,
    /// While open: how long until a probe is allowed.
    pub reopens_in: Option<Duration>,
    /// Failures / calls over the window.
    pub error_rate: f64,
    /// Calls in the window.
    pub calls: u32,
    /// Latency percentiles (p50, p90, p99) over recent calls.
    pub latency: Option<(Duration, Duration, Duration)>,
    /// The last failure and when it happened.
    pub last_error: Option<(String, Timestamp)>,
}

/// One circuit breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    settings: BreakerConfig,
    cool_down: Duration,
    figures: Mutex<Figures>,
    /// Woken when the circuit opens, closes, or gives back an unused probe: jobs waiting for
    /// a route to take calls again look once more.
    changed: tokio::sync::Notify,
}

impl CircuitBreaker {
    /// A closed breaker with validated settings.
    pub fn new(settings: &BreakerConfig) -> Self {
        CircuitBreaker {
            cool_down: settings.cool_down,
            settings: settings.clone(),
            figures: Mutex::new(Figures {
                phase: Phase::Closed,
                consecutive_failures: 0,
                window: VecDeque::new(),
                latencies: VecDeque::new(),
                last_error: None,
            }),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Whether a call would be admitted now (without taking a probe).
    pub fn takes_calls(&self, now: Instant) -> bool {
        match self.lock().phase {
            Phase::Closed | Phase::HalfOpen { probing: false } => true,
            Phase::Open { until } => now >= until,
            Phase::HalfOpen { probing: true } => false,
        }
    }

    /// While open: how long until a probe is let through (`None` while a probe is under way:
    /// only its result changes anything).
    pub fn next_chance(&self, now: Instant) -> Option<Duration> {
        match self.lock().phase {
            Phase::Open { until } => Some(until.saturating_duration_since(now)),
            Phase::HalfOpen { probing: true } => None,
            Phase::Closed | Phase::HalfOpen { probing: false } => Some(Duration::ZERO),
        }
    }

    /// Resolves at the next change of state (opened, closed, probe given back).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Figures> {
        self.figures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Asks whether a call may go ahead at `now`.
    pub fn admit(&self, now: Instant) -> Admission {
        let mut figures = self.lock();
        match figures.phase {
            Phase::Closed => Admission::Allowed,
            Phase::Open { until } if now >= until => {
                figures.phase = Phase::HalfOpen { probing: true };
                Admission::Probe
            }
            Phase::Open { .. } | Phase::HalfOpen { probing: true } => Admission::Rejected,
            Phase::HalfOpen { probing: false } => {
                figures.phase = Phase::HalfOpen { probing: true };
                Admission::Probe
            }
        }
    }

    /// Gives back a probe that was admitted but not used (another breaker refused the call).
    pub fn release_probe(&self) {
        let mut figures = self.lock();
        if let Phase::HalfOpen { probing: true } = figures.phase {
            figures.phase = Phase::HalfOpen { probing: false };
            drop(figures);
            self.changed.notify_waiters();
        }
    }

    /// Records how a call went. Returns true when this call opened the circuit.
    pub fn record(
        &self,
        now: Instant,
        result: CallResult,
        latency: Duration,
        error: Option<&str>,
    ) -> bool {
        let mut figures = self.lock();
        let failed = result == CallResult::Failure;
        figures.window.push_back(failed);
        while figures.window.len() > self.settings.window as usize {
            figures.window.pop_front();
        }
        figures.latencies.push_back(latency);
        if figures.latencies.len() > LATENCY_SAMPLES {
            figures.latencies.pop_front();
        }
        if !failed {
            figures.consecutive_failures = 0;
            if matches!(figures.phase, Phase::HalfOpen { .. }) {
                figures.phase = Phase::Closed;
                figures.window.clear();
                drop(figures);
                // The probe worked: the jobs waiting for this route go now.
                self.changed.notify_waiters();
            }
            return false;
        }
        figures.consecutive_failures += 1;
        figures.last_error = Some((error.unwrap_or("failure").to_owned(), Timestamp::now()));
        let open_now = match figures.phase {
            Phase::HalfOpen { .. } => true,
            Phase::Open { .. } => false,
            Phase::Closed => {
                let calls = figures.window.len() as u32;
                let failures = figures.window.iter().filter(|f| **f).count() as f64;
                figures.consecutive_failures >= self.settings.consecutive_failures
                    || (calls >= self.settings.min_calls
                        && failures / calls as f64 >= self.settings.error_rate)
            }
        };
        if open_now {
            figures.phase = Phase::Open {
                until: now + self.cool_down,
            };
            drop(figures);
            self.changed.notify_waiters();
        }
        open_now
    }

    /// The figures now.
    pub fn snapshot(&self, now: Instant) -> BreakerSnapshot {
        let figures = self.lock();
        let (state, reopens_in) = match figures.phase {
            Phase::Closed => (CircuitState::Closed, None),
            Phase::Open { until } if now >= until => (CircuitState::HalfOpen, None),
            Phase::Open { until } => (CircuitState::Open, Some(until - now)),
            Phase::HalfOpen { .. } => (CircuitState::HalfOpen, None),
        };
        let calls = figures.window.len() as u32;
        let failures = figures.window.iter().filter(|f| **f).count() as f64;
        let latency = (!figures.latencies.is_empty()).then(|| {
            let mut sorted: Vec<Duration> = figures.latencies.iter().copied().collect();
            sorted.sort();
            let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
            (at(0.5), at(0.9), at(0.99))
        });
        BreakerSnapshot {
            state,
            reopens_in,
            error_rate: if calls == 0 {
                0.0
            } else {
                failures / calls as f64
            },
            calls,
            latency,
            last_error: figures.last_error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(&BreakerConfig {
            consecutive_failures: 3,
            error_rate: 0.5,
            window: 10,
            min_calls: 6,
            cool_down: Duration::from_secs(10),
        })
    }

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_probes_after_the_cool_down() {
        let breaker = breaker();
        let now = Instant::now();
        assert_eq!(breaker.admit(now), Admission::Allowed);
        assert!(!breaker.record(now, CallResult::Failure, MS, Some("503")));
        assert!(!breaker.record(now, CallResult::Failure, MS, Some("503")));
        assert!(
            breaker.record(now, CallResult::Failure, MS, Some("503")),
            "the third failure opens it"
        );
        assert_eq!(breaker.admit(now), Admission::Rejected);
        assert_eq!(breaker.snapshot(now).state, CircuitState::Open);
        assert_eq!(
            breaker.snapshot(now).reopens_in,
            Some(Duration::from_secs(10))
        );

        tokio::time::advance(Duration::from_secs(10)).await;
        let later = Instant::now();
        assert_eq!(breaker.admit(later), Admission::Probe);
        assert_eq!(
            breaker.admit(later),
            Admission::Rejected,
            "one probe at a time"
        );
        breaker.record(later, CallResult::Failure, MS, Some("503 again"));
        assert_eq!(
            breaker.snapshot(later).state,
            CircuitState::Open,
            "a failed probe reopens it"
        );
        assert_eq!(breaker.snapshot(later).last_error.unwrap().0, "503 again");

        tokio::time::advance(Duration::from_secs(10)).await;
        let later = Instant::now();
        assert_eq!(breaker.admit(later), Admission::Probe);
        breaker.record(later, CallResult::Success, MS, None);
        assert_eq!(breaker.snapshot(later).state, CircuitState::Closed);
        assert_eq!(breaker.admit(later), Admission::Allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_the_error_rate_over_the_window() {
        let breaker = breaker();
        let now = Instant::now();
        for result in [
            CallResult::Failure,
            CallResult::Success,
            CallResult::Failure,
            CallResult::Success,
            CallResult::Failure,
        ] {
            assert!(!breaker.record(now, result, MS, None));
        }
        assert_eq!(breaker.snapshot(now).error_rate, 0.6);
        assert!(
            !breaker.record(now, CallResult::Success, MS, None),
            "successes never open it"
        );
        assert!(
            breaker.record(now, CallResult::Failure, MS, None),
            "4 of 7 failed, over min_calls"
        );
        breaker.release_probe();
        assert_eq!(breaker.admit(now), Admission::Rejected);
    }

    #[test]
    fn latency_percentiles() {
        let breaker = breaker();
        let now = Instant::now();
        for ms in 1..=100 {
            breaker.record(now, CallResult::Success, Duration::from_millis(ms), None);
        }
        let (p50, p90, p99) = breaker.snapshot(now).latency.unwrap();
        assert_eq!(
            (p50.as_millis(), p90.as_millis(), p99.as_millis()),
            (51, 90, 99)
        );
    }
}
