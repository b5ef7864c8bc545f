//! The `[fraud]` section and each tenant's `fraud` table: the fraud guard's thresholds, modes
//! and safe lists, checked here and turned into the guard's [`GuardPolicy`].

use std::collections::{BTreeMap, HashSet};

use jiff::SignedDuration;
use serde::Deserialize;

use super::{ConfigError, TenantConfig, invalid};
use crate::domain::mask_phone;
use crate::policy::{GuardMode, GuardPolicy, GuardThresholds, TenantGuard};

/// The `[fraud]` section: the fraud guard (see `config/default.toml` for what each does).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FraudConfig {
    /// Digits after the country calling code that name a number range.
    pub range_depth: u8,
    /// What the guard does for tenants without their own `tenants.<name>.fraud.mode`.
    pub mode: GuardMode,
    /// How often each replica stores its counts and judges the ranges it sent to.
    #[serde(deserialize_with = "crate::domain::positive_duration")]
    pub evaluate_every: std::time::Duration,
    /// The recent window the volume is measured over (at most 1h).
    pub window: SignedDuration,
    /// How many times its usual hourly volume a range must be sending at.
    pub volume_factor: f64,
    /// The fewest sends in the window that can be a surge.
    pub min_window_sends: u64,
    /// How far back a range's usual volume is averaged.
    pub baseline: SignedDuration,
    /// How many of the newest sends old enough to have been used are judged.
    pub sample: u64,
    /// The share of judged codes used below which a surging range is held.
    pub min_conversion: f64,
    /// How old a send must be before its unused code counts against its range (under 1h).
    pub grace: SignedDuration,
    /// How long a range is held (and a lifted one left alone).
    pub hold_for: SignedDuration,
    /// Numbers never held, for every tenant (E.164).
    #[serde(default)]
    pub safe_numbers: Vec<String>,
}

impl FraudConfig {
    /// The guard's thresholds.
    pub fn thresholds(&self) -> GuardThresholds {
        GuardThresholds {
            window: self.window,
            volume_factor: self.volume_factor,
            min_window_sends: self.min_window_sends,
            baseline: self.baseline,
            sample: self.sample,
            min_conversion: self.min_conversion,
            grace: self.grace,
            hold_for: self.hold_for,
        }
    }

    pub(super) fn validate(
        &self,
        tenants: &BTreeMap<String, TenantConfig>,
    ) -> Result<(), ConfigError> {
        let max = crate::policy::fraud::MAX_RANGE_DEPTH;
        if !(1..=max).contains(&self.range_depth) {
            return Err(invalid(
                "fraud.range_depth",
                format!("{} is not between 1 and {max} digits", self.range_depth),
            ));
        }
        let hour = SignedDuration::from_hours(1);
        for (key, value, most) in [
            ("fraud.window", self.window, hour),
            (
                "fraud.grace",
                self.grace,
                hour - SignedDuration::from_secs(1),
            ),
            (
                "fraud.baseline",
                self.baseline,
                SignedDuration::from_hours(24 * 90),
            ),
            ("fraud.hold_for", self.hold_for, SignedDuration::MAX),
        ] {
            if !value.is_positive() || value > most {
                return Err(invalid(
                    key,
                    format!("{value:#} is not a positive duration of at most {most:#}"),
                ));
            }
        }
        if !(self.volume_factor.is_finite() && self.volume_factor >= 1.0) {
            return Err(invalid("fraud.volume_factor", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.min_conversion) {
            return Err(invalid("fraud.min_conversion", "must be between 0 and 1"));
        }
        if self.sample == 0 {
            return Err(invalid("fraud.sample", "must be at least 1"));
        }
        let numbers = std::iter::once(("fraud.safe_numbers".to_owned(), &self.safe_numbers)).chain(
            tenants.iter().map(|(name, t)| {
                (
                    format!("tenants.{name}.fraud.safe_numbers"),
                    &t.fraud.safe_numbers,
                )
            }),
        );
        for (key, list) in numbers {
            if let Some(bad) = list.iter().find(|n| !crate::domain::is_e164(n)) {
                return Err(invalid(
                    key,
                    format!("{} is not an E.164 number (+ and digits)", mask_phone(bad)),
                ));
            }
        }
        Ok(())
    }
    /// The guard's policy: the thresholds, and each tenant's mode and safe list.
    pub fn policy(&self, tenants: &BTreeMap<String, TenantConfig>) -> GuardPolicy {
        GuardPolicy {
            thresholds: self.thresholds(),
            default_mode: self.mode,
            safe_numbers: self.safe_numbers.iter().cloned().collect(),
            tenants: tenants
                .iter()
                .map(|(name, tenant)| {
                    let fraud = &tenant.fraud;
                    let guard = TenantGuard {
                        mode: fraud.mode.unwrap_or(self.mode),
                        safe_accounts: fraud.safe_accounts.iter().cloned().collect::<HashSet<_>>(),
                        safe_numbers: fraud.safe_numbers.iter().cloned().collect(),
                    };
                    (name.clone(), guard)
                })
                .collect(),
        }
    }
}

/// A tenant's `[tenants.<name>.fraud]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantFraudConfig {
    /// This tenant's mode (default: `fraud.mode`).
    #[serde(default)]
    pub mode: Option<GuardMode>,
    /// Accounts whose codes are never held.
    #[serde(default)]
    pub safe_accounts: Vec<String>,
    /// Numbers never held for this tenant (E.164).
    #[serde(default)]
    pub safe_numbers: Vec<String>,
}
