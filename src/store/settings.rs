//! The store's settings (`[store]`) and their validation.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::domain::{InvalidSetting, SecretString};
use crate::store::block_hash::HASH_KEY_MIN_LEN;

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
    /// The secret block-list numbers and tokens are hashed under (SQLite: a key file beside
    /// the database when unset; PostgreSQL: required, the same at every replica).
    #[serde(default)]
    pub hash_key: Option<SecretString>,
    /// A file holding `hash_key` (a Docker secret).
    #[serde(default)]
    pub hash_key_file: Option<PathBuf>,
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
            hash_key: None,
            hash_key_file: None,
        }
    }

    /// The same settings with `key` as `hash_key`.
    pub fn with_hash_key(mut self, key: impl Into<String>) -> Self {
        self.hash_key = Some(SecretString::new(key));
        self.hash_key_file = None;
        self
    }

    /// The configured block-list hash key, from the setting or its file (`Ok(None)`: neither).
    pub fn hash_key(&self) -> Result<Option<SecretString>, InvalidSetting> {
        crate::domain::secret_setting(
            ("store.hash_key", self.hash_key.as_ref()),
            ("store.hash_key_file", self.hash_key_file.as_deref()),
            HASH_KEY_MIN_LEN,
        )
    }

    /// Whether the ledger is PostgreSQL (shared by replicas).
    pub fn is_postgres(&self) -> bool {
        matches!(
            self.url.split_once(':').map(|(scheme, _)| scheme),
            Some("postgres" | "postgresql")
        )
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
        if self.hash_key()?.is_none() && self.is_postgres() {
            return Err(InvalidSetting::new(
                "store.hash_key",
                "is required with PostgreSQL (or store.hash_key_file): every replica hashes \
                 block-list numbers and tokens with it, so all must have the same one, kept \
                 apart from the database (make one with `openssl rand -hex 32`)",
            ));
        }
        Ok(())
    }
}
