//! An SMPP bind's settings (`kind = "smpp"`) and their validation.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use super::SmppProvider;
use crate::domain::{Channel, InvalidSetting, SecretString};
use crate::providers::Provider;
use crate::providers::settings::{BuildContext, ProviderKind};

/// An SMPP 3.4 bind to a carrier's SMSC (`kind = "smpp"`): one transceiver session that submits
/// messages and receives their delivery receipts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmppSettings {
    /// The SMSC, `host:port`.
    pub address: String,
    /// The ESME's system_id (at most 15 characters).
    pub system_id: String,
    /// The bind password (at most 8 characters; redacted when shown).
    pub password: SecretString,
    /// The system_type the carrier asks for, often empty.
    #[serde(default)]
    pub system_type: String,
    /// The sender: an E.164 number, a short code, or an alphanumeric id (at most 11 characters).
    pub source_addr: String,
    /// Submits waiting for their response at once on the bind.
    #[serde(default = "default_smpp_window")]
    pub window: u32,
    /// Submits per second on the bind.
    #[serde(default = "default_smpp_throughput")]
    pub throughput: f64,
    /// How often the bind is checked with enquire_link.
    #[serde(default = "default_enquire_link")]
    #[serde(deserialize_with = "crate::domain::positive_duration")]
    pub enquire_link_interval: Duration,
    /// How long a submit_sm (or bind) may wait for its response.
    #[serde(default = "default_smpp_response_timeout")]
    #[serde(deserialize_with = "crate::domain::positive_duration")]
    pub response_timeout: Duration,
    /// Re-bind back-off after the bind is lost or refused.
    #[serde(default = "default_smpp_reconnect_initial")]
    #[serde(deserialize_with = "crate::domain::positive_duration")]
    pub reconnect_initial: Duration,
    /// The longest wait between re-bind attempts.
    #[serde(default = "default_smpp_reconnect_max")]
    #[serde(deserialize_with = "crate::domain::positive_duration")]
    pub reconnect_max: Duration,
}

fn default_smpp_window() -> u32 {
    10
}

fn default_smpp_throughput() -> f64 {
    50.0
}

fn default_enquire_link() -> Duration {
    Duration::from_secs(30)
}

fn default_smpp_response_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_smpp_reconnect_initial() -> Duration {
    Duration::from_secs(1)
}

fn default_smpp_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

#[async_trait]
impl ProviderKind for SmppSettings {
    fn carries(&self, channel: Channel) -> bool {
        channel == Channel::Sms
    }

    fn carries_only(&self) -> &'static str {
        "an SMPP bind, which carries SMS only"
    }

    fn validate(&self, name: &str) -> Result<(), InvalidSetting> {
        let smpp = self;
        let key = |field: &str| format!("providers.{name}.{field}");
        let (host, port) = smpp.address.rsplit_once(':').unwrap_or_default();
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(InvalidSetting::new(
                key("address"),
                format!("`{}` is not host:port", smpp.address),
            ));
        }
        // SMPP 3.4 field sizes (C-octet strings, without the terminating NUL).
        for (field, value, max) in [
            ("system_id", smpp.system_id.as_str(), 15),
            ("password", smpp.password.expose(), 8),
            ("system_type", smpp.system_type.as_str(), 12),
            ("source_addr", smpp.source_addr.as_str(), 20),
        ] {
            if value.len() > max || !value.is_ascii() {
                return Err(InvalidSetting::new(
                    key(field),
                    format!("must be at most {max} ASCII characters (SMPP 3.4)"),
                ));
            }
        }
        if smpp.system_id.is_empty() {
            return Err(InvalidSetting::new(key("system_id"), "is empty"));
        }
        if smpp.source_addr.is_empty() {
            return Err(InvalidSetting::new(key("source_addr"), "is empty"));
        }
        if smpp.window == 0 {
            return Err(InvalidSetting::new(key("window"), "must be at least 1"));
        }
        if !(smpp.throughput.is_finite() && smpp.throughput > 0.0) {
            return Err(InvalidSetting::new(
                key("throughput"),
                "must be a positive number of submits per second",
            ));
        }
        if smpp.reconnect_max < smpp.reconnect_initial {
            return Err(InvalidSetting::new(
                key("reconnect_max"),
                "must not be shorter than reconnect_initial",
            ));
        }
        Ok(())
    }

    async fn build(
        &self,
        name: &str,
        context: &BuildContext<'_>,
    ) -> Result<Arc<dyn Provider>, String> {
        Ok(Arc::new(SmppProvider::start(
            name,
            self.clone(),
            context.receipts.clone(),
        )))
    }
}
