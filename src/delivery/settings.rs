//! The engine's settings, typed from the validated configuration.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use jiff::SignedDuration;

use crate::config::{Config, DestinationRules, positive};
use crate::domain::{Autofill, MessageTemplates};

/// Timing settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// App name in messages.
    pub app_name: String,
    /// Per provider call.
    pub provider_timeout: Duration,
    /// How long a push stage waits for a device acknowledgement.
    pub push_ack_timeout: Duration,
    /// Nothing is attempted later than this before expiry.
    pub expiry_margin: SignedDuration,
    /// Longest `Retry-After` honoured.
    pub retry_after_max: Duration,
    /// How long an accepted SMS or call waits for a failure receipt before the job is let go.
    pub receipt_wait: Duration,
    /// How long a target whose every provider has its circuit open waits for one to take calls
    /// again (never past the code's expiry); zero: it fails at once.
    pub circuit_wait: Duration,
    /// Tenants whose push stage does not wait for acknowledgements.
    pub tenants_without_ack: HashSet<String>,
    /// Countries each tenant may send SMS and voice to.
    pub destinations: BTreeMap<String, DestinationRules>,
    /// Message templates (built-in plus configured).
    pub templates: MessageTemplates,
    /// Tenants' own app names.
    pub app_names: BTreeMap<String, String>,
    /// Tenants' autofill formats.
    pub autofill: BTreeMap<String, Autofill>,
}

impl EngineSettings {
    /// The settings from validated configuration.
    pub fn from_config(config: &Config) -> Self {
        let (delivery, tenants) = (&config.delivery, &config.tenants);
        let duration = |key: &str, value, fallback| positive(key, value).unwrap_or(fallback);
        EngineSettings {
            app_name: delivery.app_name.clone(),
            provider_timeout: duration(
                "delivery.provider_timeout",
                delivery.provider_timeout,
                Duration::from_secs(10),
            ),
            push_ack_timeout: duration(
                "delivery.push_ack_timeout",
                delivery.push_ack_timeout,
                Duration::from_secs(15),
            ),
            expiry_margin: delivery.expiry_margin,
            retry_after_max: duration(
                "delivery.retry_after_max",
                delivery.retry_after_max,
                Duration::from_secs(30),
            ),
            receipt_wait: delivery.receipt_wait.unsigned_abs(),
            circuit_wait: delivery.circuit_wait.unsigned_abs(),
            tenants_without_ack: tenants
                .iter()
                .filter(|(_, tenant)| !tenant.push_acknowledgement)
                .map(|(name, _)| name.clone())
                .collect(),

            destinations: tenants
                .iter()
                .map(|(name, tenant)| (name.clone(), tenant.destinations.clone()))
                .collect(),
            // `Config::validate` has refused bad templates already.
            templates: MessageTemplates::new(&config.templates).unwrap_or_default(),
            app_names: tenants
                .iter()
                .filter_map(|(name, t)| Some((name.clone(), t.app_name.clone()?)))
                .collect(),
            autofill: tenants
                .iter()
                .map(|(name, t)| (name.clone(), t.autofill.clone()))
                .collect(),
        }
    }
}
