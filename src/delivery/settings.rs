//! The engine's settings, typed (made from the validated configuration by
//! `EngineSettings::from_config` in `config`).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use jiff::SignedDuration;

use crate::domain::{Autofill, MessageTemplates};
use crate::policy::{DestinationRules, GuardPolicy};

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
    /// Digits after the country calling code that name a number range (`fraud.range_depth`).
    pub range_depth: u8,
    /// The fraud guard's thresholds, modes and safe lists.
    pub fraud: GuardPolicy,
    /// How often the fraud guard stores its counts and judges ranges.
    pub fraud_evaluate_every: Duration,
}
