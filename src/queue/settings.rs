//! The broker link's settings (`[amqp]`) and their validation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use serde::Deserialize;

use super::ProducerTenants;
use crate::domain::{InvalidSetting, SecretUrl};

/// The broker connection and topology names.
/// The broker, its topology and the reconnect schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// The AMQP URL, password included (redacted when shown).
    pub url: SecretUrl,
    /// Unacknowledged deliveries the broker may push at once.
    pub prefetch: u16,
    /// The connection name shown by the broker.
    pub connection_name: String,
    /// First reconnect delay.
    #[serde(deserialize_with = "crate::domain::positive_duration")]
    pub reconnect_initial: Duration,
    /// Longest reconnect delay.
    #[serde(deserialize_with = "crate::domain::positive_duration")]
    pub reconnect_max: Duration,
    /// Direct exchange that send-code jobs are published to.
    pub jobs_exchange: String,
    /// Routing key binding the jobs queue to the jobs exchange.
    pub jobs_routing_key: String,
    /// Routing key of verification messages (the user entered the code, or not) on the jobs
    /// exchange; the jobs queue is bound with it too.
    pub verifications_routing_key: String,
    /// The quorum queue consumed by the gateway.
    pub jobs_queue: String,
    /// Quorum-queue `x-delivery-limit`.
    pub delivery_limit: u32,
    /// Dead-letter exchange (fanout).
    pub dead_letter_exchange: String,
    /// Queue bound to the dead-letter exchange.
    pub dead_letter_queue: String,
    /// How long a dead letter the gateway writes is kept (0: forever).
    #[serde(deserialize_with = "crate::domain::non_negative_duration")]
    pub dead_letter_ttl: Duration,
    /// Topic exchange for `delivery.<status>` events.
    pub events_exchange: String,
    /// amqps://: PEM CA certificates the broker's certificate chains to (none: the system's).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// amqps://: this client's certificate (PEM), for a broker that verifies clients.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// amqps://: the private key of `client_cert_file` (PKCS#8 PEM).
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// RabbitMQ user → the tenants its jobs may be for (empty: any producer, any tenant).
    #[serde(default)]
    pub tenant_from_user_id: BTreeMap<String, Vec<String>>,
}

/// A PEM file's text, if it holds at least one block of `label`s (the error names `key`).
fn pem_file(key: &str, path: &Path, label: &str) -> Result<String, InvalidSetting> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        InvalidSetting::new(key, format!("{}: cannot be read: {e}", path.display()))
    })?;
    let blocks = pem::parse_many(&text)
        .map_err(|e| InvalidSetting::new(key, format!("{}: is not PEM: {e}", path.display())))?;
    if !blocks.iter().any(|b| b.tag().ends_with(label)) {
        return Err(InvalidSetting::new(
            key,
            format!("{}: holds no PEM {label}", path.display()),
        ));
    }
    Ok(text)
}

impl AmqpConfig {
    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let invalid = |key: &str, problem: String| InvalidSetting::new(key, problem);
        let uri = self
            .url
            .expose()
            .parse::<lapin::uri::AMQPUri>()
            .map_err(|e| invalid("amqp.url", format!("not an AMQP URL ({e}): {}", self.url)))?;
        if uri.scheme != lapin::uri::AMQPScheme::AMQPS {
            for (key, set) in [
                ("amqp.ca_file", self.ca_file.is_some()),
                ("amqp.client_cert_file", self.client_cert_file.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        key,
                        "is set, but amqp.url is amqp:// (plain text): use amqps:// for TLS".into(),
                    ));
                }
            }
        }
        self.tls()?;
        self.producer_tenants()?;
        if self.prefetch == 0 {
            return Err(invalid("amqp.prefetch", "must be at least 1".into()));
        }
        if self.reconnect_max < self.reconnect_initial {
            return Err(invalid(
                "amqp.reconnect_max",
                "must not be shorter than amqp.reconnect_initial".into(),
            ));
        }
        for (key, name) in [
            ("amqp.jobs_exchange", &self.jobs_exchange),
            ("amqp.jobs_queue", &self.jobs_queue),
            ("amqp.dead_letter_exchange", &self.dead_letter_exchange),
            ("amqp.dead_letter_queue", &self.dead_letter_queue),
            ("amqp.events_exchange", &self.events_exchange),
        ] {
            if name.is_empty() || name.len() > 255 || name.starts_with("amq.") {
                return Err(invalid(
                    key,
                    "must be 1 to 255 bytes and not start with `amq.`".into(),
                ));
            }
        }
        if self.delivery_limit == 0 {
            return Err(invalid("amqp.delivery_limit", "must be at least 1".into()));
        }
        if self.verifications_routing_key == self.jobs_routing_key
            || self.verifications_routing_key.is_empty()
            || self.verifications_routing_key.len() > 255
        {
            return Err(invalid(
                "amqp.verifications_routing_key",
                "must be 1 to 255 bytes and differ from amqp.jobs_routing_key".into(),
            ));
        }
        Ok(())
    }

    /// The user the gateway connects as (from amqp.url; RabbitMQ's default `guest` without one).
    pub fn user(&self) -> String {
        self.url
            .expose()
            .parse::<lapin::uri::AMQPUri>()
            .map(|uri| uri.authority.userinfo.username)
            .unwrap_or_else(|_| "guest".into())
    }

    /// Which tenants producers may send for (`None`: the mapping is off).
    pub fn producer_tenants(&self) -> Result<Option<ProducerTenants>, InvalidSetting> {
        ProducerTenants::new(&self.tenant_from_user_id, &self.user())
    }

    /// The TLS settings of an amqps:// link, read from the files (the error names the key).
    pub fn tls(&self) -> Result<OwnedTLSConfig, InvalidSetting> {
        let cert_chain = self
            .ca_file
            .as_deref()
            .map(|path| pem_file("amqp.ca_file", path, "CERTIFICATE"))
            .transpose()?;
        let identity = match (&self.client_cert_file, &self.client_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
                pem: pem_file("amqp.client_cert_file", cert, "CERTIFICATE")?.into_bytes(),
                key: pem_file("amqp.client_key_file", key, "PRIVATE KEY")?.into_bytes(),
            }),
            (Some(_), None) => {
                return Err(InvalidSetting::new(
                    "amqp.client_key_file",
                    "is needed with amqp.client_cert_file",
                ));
            }
            (None, Some(_)) => {
                return Err(InvalidSetting::new(
                    "amqp.client_cert_file",
                    "is needed with amqp.client_key_file",
                ));
            }
        };
        Ok(OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }

    /// What to check when the broker's certificate (or ours) is refused.
    pub fn tls_advice(&self) -> String {
        let roots = match &self.ca_file {
            Some(path) => format!("a CA in amqp.ca_file ({})", path.display()),
            None => "the system's roots (set amqp.ca_file for a private CA)".to_owned(),
        };
        let host = self
            .url
            .expose()
            .parse::<lapin::uri::AMQPUri>()
            .map(|u| u.authority.host)
            .unwrap_or_default();
        let client = match &self.client_cert_file {
            Some(path) => format!(
                "; the broker must trust our client certificate ({})",
                path.display()
            ),
            None => String::new(),
        };
        format!(
            "the broker's certificate must chain to {roots} and name the host `{host}` of amqp.url{client}"
        )
    }
}
