//! The simulators' fault knobs: what each does wrong, changed while it runs.

use std::collections::BTreeSet;
use std::sync::RwLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a simulator misbehaves. Every field has a default, so a partial JSON body sets only
/// what it names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Share of requests (0 to 1) answered with the provider's "unavailable" error: Twilio 503
    /// (error 20503), SMPP `ESME_RSYSERR`, APNs 503 `ServiceUnavailable`, FCM 503
    /// `UNAVAILABLE`.
    pub error_rate: f64,
    /// Median time (milliseconds) before an answer; 0 answers at once.
    pub latency_ms: u64,
    /// The 99th percentile of that time (log-normal); at or below the median: always the
    /// median.
    pub latency_p99_ms: u64,
    /// Device tokens the push services say are no longer registered (APNs 410 `Unregistered`,
    /// FCM 404 `UNREGISTERED`).
    pub dead_tokens: BTreeSet<String>,
    /// Numbers (E.164) whose user replied STOP: Twilio refuses them (21610); the SMSC accepts
    /// the submit and its receipt says `REJECTD`.
    pub opted_out: BTreeSet<String>,
    /// Numbers whose carrier filters the messages: Twilio's status callback says
    /// `undelivered` with error 30007; the SMSC's receipt says `UNDELIV`.
    pub filtered: BTreeSet<String>,
    /// Whether delivery receipts (SMPP deliver_sm, Twilio status callbacks) are sent.
    pub receipts: bool,
    /// How long after accepting a message its receipt follows (milliseconds).
    pub receipt_delay_ms: u64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            error_rate: 0.0,
            latency_ms: 0,
            latency_p99_ms: 0,
            dead_tokens: BTreeSet::new(),
            opted_out: BTreeSet::new(),
            filtered: BTreeSet::new(),
            receipts: true,
            receipt_delay_ms: 200,
        }
    }
}

impl Faults {
    /// Refuses values no simulator can act on, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(format!(
                "error_rate: {} is not between 0 and 1",
                self.error_rate
            ));
        }
        Ok(())
    }

    /// Whether this request draws the error.
    pub fn fails(&self) -> bool {
        self.error_rate > 0.0 && fastrand::f64() < self.error_rate
    }

    /// How long to take before answering this request.
    pub fn latency(&self) -> Duration {
        let median = Duration::from_millis(self.latency_ms);
        let p99 = Duration::from_millis(self.latency_p99_ms);
        if median.is_zero() || p99 <= median {
            median
        } else {
            log_normal(median, p99)
        }
    }

    /// Waits out [`Faults::latency`].
    pub async fn delay(&self) {
        let latency = self.latency();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }
}

/// The 99th percentile of the standard normal distribution.
const Z_99: f64 = 2.326_347_874;

/// A log-normal draw with `median` and `p99`: exp(mu + sigma * z), mu = ln(median),
/// sigma = ln(p99 / median) / z_0.99, z standard normal (Box-Muller from two uniforms).
pub fn log_normal(median: Duration, p99: Duration) -> Duration {
    let mu = median.as_secs_f64().ln();
    let sigma = (p99.as_secs_f64() / median.as_secs_f64()).ln() / Z_99;
    let u1 = 1.0 - fastrand::f64(); // (0, 1]: ln stays finite
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * fastrand::f64()).cos();
    Duration::from_secs_f64((mu + sigma * z).exp())
}

/// The mean of that log-normal: exp(mu + sigma^2 / 2).
pub fn log_normal_mean(median: Duration, p99: Duration) -> Duration {
    let sigma = (p99.as_secs_f64() / median.as_secs_f64()).ln() / Z_99;
    Duration::from_secs_f64(median.as_secs_f64() * (sigma * sigma / 2.0).exp())
}

/// The simulators by name, as the control routes and the inbox name them.
pub const SIMULATORS: [&str; 4] = ["twilio", "smpp", "apns", "fcm"];

/// Each simulator's faults, changeable while it runs.
#[derive(Debug, Default)]
pub struct Knobs {
    faults: [RwLock<Faults>; 4],
}

impl Knobs {
    /// Every simulator starting with `faults`.
    pub fn all(faults: Faults) -> Knobs {
        Knobs {
            faults: std::array::from_fn(|_| RwLock::new(faults.clone())),
        }
    }

    fn slot(&self, simulator: &str) -> Option<&RwLock<Faults>> {
        let index = SIMULATORS.iter().position(|s| *s == simulator)?;
        Some(&self.faults[index])
    }

    /// A copy of `simulator`'s faults (the defaults for an unknown name).
    pub fn get(&self, simulator: &str) -> Faults {
        self.slot(simulator)
            .map(|slot| slot.read().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default()
    }

    /// Replaces `simulator`'s faults; `Err` for an unknown name or a bad value.
    pub fn set(&self, simulator: &str, faults: Faults) -> Result<(), String> {
        let slot = self.slot(simulator).ok_or_else(|| {
            format!(
                "no simulator `{simulator}` (there are {})",
                SIMULATORS.join(", ")
            )
        })?;
        faults.validate()?;
        *slot.write().unwrap_or_else(|p| p.into_inner()) = faults;
        Ok(())
    }
}
