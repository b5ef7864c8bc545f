//! The service's own configuration sections: the gRPC and receipts listeners, the ledger's
//! location, delivery behaviour and logging.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::LogFormat;
use crate::domain::{InvalidSetting, SecretString};

/// The ops listener: health, readiness and metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsConfig {
    /// Where it listens (keys needed off loopback).
    pub listen: SocketAddr,
}

/// The HTTP listener for provider callbacks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptsConfig {
    /// Listen address; port 0 picks a free one.
    pub listen: SocketAddr,
    /// The base URL providers reach it at (signatures cover it); empty: `http://<listen>`.
    pub public_url: String,
    /// The longest request body accepted (413 beyond).
    pub max_body: usize,
    /// How long a request's headers and body may take to arrive (408 for a slow body).
    #[serde(deserialize_with = "crate::domain::positive_duration")]
    pub read_timeout: Duration,
    /// Requests per second one source address may send (429 beyond); 0: no limit.
    pub rate_per_source: u32,
}

/// The gRPC listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// Listen address; port 0 picks a free one.
    pub listen: SocketAddr,
    /// TLS on the port (none: plain text).
    #[serde(default)]
    pub tls: Option<GrpcTlsConfig>,
}

/// The gRPC port's certificate, reloaded on SIGHUP or when a file changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcTlsConfig {
    /// PEM: the server's certificate, then its chain.
    pub cert_file: PathBuf,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM: CA certificates a client certificate must chain to (mutual TLS); none: clients
    /// show no certificate.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// Who may call the gRPC API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// API keys, or none (loopback only).
    pub mode: AuthMode,
    /// A global admin key accepted besides the stored ones.
    #[serde(default)]
    pub bootstrap_admin_key: Option<SecretString>,
    /// A file holding the bootstrap admin key (a Docker secret).
    #[serde(default)]
    pub bootstrap_admin_key_file: Option<PathBuf>,
}

/// Whether calls need API keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Every call but health and reflection needs a key.
    Keys,
    /// No keys: only while every listener is on a loopback address.
    None,
}

/// The shortest bootstrap admin key accepted.
pub const BOOTSTRAP_KEY_MIN_LEN: usize = 32;

impl AuthConfig {
    /// The bootstrap admin key, from the setting or its file (`Ok(None)`: there is none).
    pub fn bootstrap_admin_key(&self) -> Result<Option<SecretString>, InvalidSetting> {
        crate::domain::secret_setting(
            (
                "auth.bootstrap_admin_key",
                self.bootstrap_admin_key.as_ref(),
            ),
            (
                "auth.bootstrap_admin_key_file",
                self.bootstrap_admin_key_file.as_deref(),
            ),
            BOOTSTRAP_KEY_MIN_LEN,
        )
    }
}

/// How long personal data is kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Deliveries are deleted this long after they were made (0: kept forever).
    #[serde(deserialize_with = "crate::domain::non_negative_duration")]
    pub deliveries: Duration,
    /// How often the purge runs.
    #[serde(deserialize_with = "crate::domain::positive_duration")]
    pub interval: Duration,
    /// Deliveries deleted per statement.
    pub batch: u32,
}

/// Delivery behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// App name in messages.
    pub app_name: String,
    /// Jobs processed at once.
    pub max_in_flight: usize,
    /// Per provider call.
    #[serde(deserialize_with = "crate::domain::positive_duration")]
    pub provider_timeout: Duration,
    /// Grace period for in-flight jobs on shutdown.
    #[serde(deserialize_with = "crate::domain::positive_duration")]
    pub shutdown_grace: Duration,
    /// How long a push stage waits for a device to confirm it showed the code.
    #[serde(deserialize_with = "crate::domain::positive_duration")]
    pub push_ack_timeout: Duration,
    /// Nothing is attempted later than this before the code expires.
    #[serde(deserialize_with = "crate::domain::non_negative_duration")]
    pub expiry_margin: Duration,
    /// The longest `Retry-After` a provider may impose.
    #[serde(deserialize_with = "crate::domain::positive_duration")]
    pub retry_after_max: Duration,
    /// How long an SMS or call accepted by a provider that sends receipts waits for a failure
    /// receipt (to go on with the next number or channel) before the job is let go; 0: never.
    #[serde(deserialize_with = "crate::domain::non_negative_duration")]
    pub receipt_wait: Duration,
    /// How long a target whose every provider has its circuit open waits for a probe to close
    /// one (or another provider to take calls), never past the code's expiry; 0: fail at once.
    #[serde(deserialize_with = "crate::domain::non_negative_duration")]
    pub circuit_wait: Duration,
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// A tracing filter directive.
    pub level: String,
}
