//! Per-tenant settings (`[tenants.<name>]`).

use serde::Deserialize;

use crate::domain::Autofill;
use crate::policy::DestinationRules;

/// Settings of one tenant.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Whether a push stage waits for the device to confirm it showed the code. When false, a
    /// push accepted by APNs/FCM ends the chain as SENT and escalation happens only on failure.
    #[serde(default = "default_true")]
    pub push_acknowledgement: bool,
    /// The countries SMS and voice may go to.
    #[serde(default)]
    pub destinations: DestinationRules,
    /// The app name in this tenant's messages (default: `delivery.app_name`).
    #[serde(default)]
    pub app_name: Option<String>,
    /// How this tenant's SMS let phones fill the code in: `{ format = "origin_bound", domain =
    /// "example.com" }` or `{ format = "android_app_hash", hash = "FA+9qCX9VSu" }`.
    #[serde(default)]
    pub autofill: Autofill,
    /// The fraud guard for this tenant: `{ mode = "enforce", safe_accounts = [...],
    /// safe_numbers = [...] }`.
    #[serde(default)]
    pub fraud: super::TenantFraudConfig,
}

fn default_true() -> bool {
    true
}
