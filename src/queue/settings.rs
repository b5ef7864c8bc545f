//! The broker link's settings (`[amqp]`) and their validation.

use std::time::Duration;

use serde::Deserialize;

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
    /// The quorum queue consumed by the gateway.
    pub jobs_queue: String,
    /// Quorum-queue `x-delivery-limit`.
    pub delivery_limit: u32,
    /// Dead-letter exchange (fanout).
    pub dead_letter_exchange: String,
    /// Queue bound to the dead-letter exchange.
    pub dead_letter_queue: String,
    /// Topic exchange for `delivery.<status>` events.
    pub events_exchange: String,
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
        if uri.scheme == lapin::uri::AMQPScheme::AMQPS {
            return Err(invalid(
                "amqp.url",
                "amqps:// (TLS) is not built into this release yet: use amqp:// (or a local TLS-terminating proxy)".into(),
            ));
        }
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
        Ok(())
    }
}
