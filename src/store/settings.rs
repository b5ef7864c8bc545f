//! The store's settings (`[store]`) and their validation.

use std::time::Duration;

use serde::Deserialize;

use crate::domain::InvalidSetting;

/// Where the ledger lives and, for PostgreSQL, how replicas share it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// `sqlite://PATH` (one gateway) or `postgres://USER@HOST/DB` (replicas).
    pub url: String,
    /// PostgreSQL: connections kept open by this replica.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// PostgreSQL: how long a claim on a delivery holds unless its owner renews it.
    #[serde(
        default = "default_lease",
        deserialize_with = "crate::domain::positive_duration"
    )]
    pub lease: Duration,
}

fn default_pool_size() -> u32 {
    16
}

fn default_lease() -> Duration {
    Duration::from_secs(30)
}

impl StoreSettings {
    /// Settings for the store at `url`, the rest at their defaults.
    pub fn at(url: impl Into<String>) -> Self {
        StoreSettings {
            url: url.into(),
            pool_size: default_pool_size(),
            lease: default_lease(),
        }
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let scheme = self.url.split_once(':').map(|(scheme, _)| scheme);
        if !matches!(scheme, Some("sqlite" | "postgres" | "postgresql")) {
            return Err(InvalidSetting::new(
                "store.url",
                format!(
                    "must be sqlite://PATH or postgres://USER@HOST/DB, got `{}`",
                    self.url
                ),
            ));
        }
        if self.pool_size == 0 {
            return Err(InvalidSetting::new("store.pool_size", "must be at least 1"));
        }
        if self.lease < Duration::from_secs(1) {
            return Err(InvalidSetting::new("store.lease", "must be at least 1s"));
        }
        Ok(())
    }
}
