//! The publisher: every message the gateway sends to the broker goes through one confirm-mode
//! channel per connection (no channel per message) and waits for the broker's confirm.

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::watch;

use super::decode::{CONTENT_TYPE_JSON, without_code};
use super::topology::Topology;
use crate::domain::{DeviceInvalidated, JobError, Report};

/// Header naming why a job was dead-lettered.
pub const HEADER_ERROR: &str = "x-otp-error";
/// Header naming the offending field of a dead-lettered job.
pub const HEADER_ERROR_FIELD: &str = "x-otp-error-field";

/// AMQP delivery mode 2: written to disk by the broker.
const PERSISTENT: u8 = 2;

/// How long a publish may wait for the broker's confirm (a broker under a resource alarm
/// blocks publishers; callers get an error instead of a hang).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// A publish that the broker did not confirm.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// There is no connection to the broker right now.
    #[error("the broker is not connected")]
    Unavailable,
    /// The broker refused or the connection failed mid-publish.
    #[error("publish failed: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker negatively acknowledged the message.
    #[error("the broker did not accept the message (nack)")]
    Nacked,
    /// The broker did not confirm in time (it may be blocking publishers).
    #[error("the broker did not confirm within {0:?} (is it blocking publishers?)")]
    Timeout(Duration),
    /// A mandatory message matched no queue.
    #[error("no queue is bound to exchange `{exchange}` with routing key `{routing_key}`")]
    Unroutable {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
}

impl PublishError {
    /// Whether the broker certainly did not take the message: nothing reached it (no
    /// connection), or it returned the message as unroutable. After any other failure (the
    /// connection lost while the confirm was awaited, a timeout, a nack) it may have queued it.
    pub fn surely_not_queued(&self) -> bool {
        matches!(
            self,
            PublishError::Unavailable | PublishError::Unroutable { .. }
        )
    }
}

/// Publishes jobs, events, replies and dead letters with publisher confirms.
#[derive(Debug, Clone)]
pub struct Publisher {
    channel: watch::Receiver<Option<Channel>>,
    topology: Arc<Topology>,
}

impl Publisher {
    /// A publisher using whatever channel the broker link currently provides.
    pub fn new(channel: watch::Receiver<Option<Channel>>, topology: Arc<Topology>) -> Self {
        Publisher { channel, topology }
    }

    fn channel(&self) -> Result<Channel, PublishError> {
        self.channel
            .borrow()
            .clone()
            .filter(|c| c.status().connected())
            .ok_or(PublishError::Unavailable)
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let channel = self.channel()?;
        let publish = async {
            channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory,
                        ..Default::default()
                    },
                    body,
                    properties,
                )
                .await?
                .await
        };
        let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, publish)
            .await
            .map_err(|_| PublishError::Timeout(CONFIRM_TIMEOUT))??;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            }),
            Confirmation::Nack(_) => Err(PublishError::Nacked),
        }
    }

    /// Publishes a job to the jobs exchange (the path queue producers use too). Mandatory: a job
    /// that would reach no queue is an error, never a silent drop.
    pub async fn publish_job(
        &self,
        body: &[u8],
        content_type: &str,
        message_id: &str,
    ) -> Result<(), PublishError> {
        let mut properties = BasicProperties::default()
            .with_content_type(content_type.into())
            .with_delivery_mode(PERSISTENT)
            .with_message_id(short(message_id));
        if self.topology.sign_jobs {
            // RabbitMQ checks it is the user this link connected as.
            properties = properties.with_user_id(short(&self.topology.gateway_user));
        }
        // A producer span (messaging conventions), whose context the job carries on to the
        // consumer in W3C headers when traces are on.
        let exchange = &self.topology.jobs_exchange;
        let span = tracing::info_span!(
            "publish",
            otel.name = tracing::field::Empty,
            otel.kind = tracing::field::Empty,
        );
        crate::telemetry::describe(
            &span,
            "producer",
            || format!("{exchange} publish"),
            || {
                vec![
                    ("messaging.system", "rabbitmq".into()),
                    ("messaging.operation.type", "send".into()),
                    ("messaging.destination.name", exchange.clone()),
                    ("messaging.message.id", message_id.to_owned()),
                ]
            },
        );
        let headers = crate::telemetry::trace_headers(&span);
        if !headers.is_empty() {
            let mut table = FieldTable::default();
            for (name, value) in headers {
                table.insert(ShortString::from(name), AMQPValue::LongString(value.into()));
            }
            properties = properties.with_headers(table);
        }
        use tracing::Instrument;
        self.publish(
            exchange,
            &self.topology.jobs_routing_key,
            body,
            properties,
            true,
        )
        .instrument(span)
        .await
    }

    /// The queue jobs are consumed from.
    pub fn jobs_queue(&self) -> &str {
        &self.topology.jobs_queue
    }

    /// Publishes the report as `delivery.<status>` on the events exchange.
    pub async fn publish_event(&self, report: &Report) -> Result<(), PublishError> {
        let routing_key = format!("delivery.{}", report.status.as_str().to_ascii_lowercase());
        self.publish_report(report, &routing_key).await
    }

    /// Publishes the report as `delivery.verified` on the events exchange: upstream reported
    /// that the user entered the code.
    pub async fn publish_verified(&self, report: &Report) -> Result<(), PublishError> {
        self.publish_report(report, "delivery.verified").await
    }

    async fn publish_report(&self, report: &Report, routing_key: &str) -> Result<(), PublishError> {
        let body = serde_json::to_vec(report).expect("a report always serializes");
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE_JSON.into())
            .with_delivery_mode(PERSISTENT)
            .with_message_id(short(&report.delivery_id))
            .with_type(routing_key.into());
        self.publish(
            &self.topology.events_exchange,
            routing_key,
            &body,
            properties,
            false,
        )
        .await
    }

    /// Publishes `device.invalidated` on the events exchange: a provider called a device's push
    /// token dead, so upstream can remove the device.
    pub async fn publish_device_invalidated(
        &self,
        event: &DeviceInvalidated,
    ) -> Result<(), PublishError> {
        const ROUTING_KEY: &str = "device.invalidated";
        let body = serde_json::to_vec(event).expect("an event always serializes");
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE_JSON.into())
            .with_delivery_mode(PERSISTENT)
            .with_message_id(short(&format!("{}#{}", event.delivery_id, event.device_id)))
            .with_type(ROUTING_KEY.into());
        self.publish(
            &self.topology.events_exchange,
            ROUTING_KEY,
            &body,
            properties,
            false,
        )
        .await
    }

    /// Publishes `fraud.suspected` on the events exchange: the fraud guard held a range.
    pub async fn publish_fraud_suspected(
        &self,
        suspicion: &crate::delivery::Suspicion,
    ) -> Result<(), PublishError> {
        const ROUTING_KEY: &str = "fraud.suspected";
        let body = serde_json::to_vec(suspicion).expect("an event always serializes");
        let id = format!(
            "{}/{}@{}",
            suspicion.tenant, suspicion.range, suspicion.since
        );
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE_JSON.into())
            .with_delivery_mode(PERSISTENT)
            .with_message_id(short(&id))
            .with_type(ROUTING_KEY.into());
        self.publish(
            &self.topology.events_exchange,
            ROUTING_KEY,
            &body,
            properties,
            false,
        )
        .await
    }

    /// Publishes the report to a job's `reply_to` queue with its `correlation_id`.
    pub async fn publish_reply(
        &self,
        reply_to: &ShortString,
        correlation_id: &ShortString,
        report: &Report,
    ) -> Result<(), PublishError> {
        let body = serde_json::to_vec(report).expect("a report always serializes");
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE_JSON.into())
            .with_correlation_id(correlation_id.clone())
            .with_message_id(short(&report.delivery_id));
        self.publish("", reply_to.as_str(), &body, properties, false)
            .await
    }

    /// Holds a job message in the broker for at least `delay`, after which it returns to the
    /// jobs exchange by itself. Each delay bucket (rounded up to 5 s) is a durable queue whose
    /// messages share one TTL, so they expire in order, and dead-letter back to the jobs
    /// exchange. The code never leaves the broker, and the hold survives restarts.
    pub async fn defer(
        &self,
        delivery: &Delivery,
        delay: Duration,
        until: &str,
    ) -> Result<(), PublishError> {
        const BUCKET_SECS: u64 = 5;
        let secs = delay.as_secs().div_ceil(BUCKET_SECS).max(1) * BUCKET_SECS;
        let queue = format!("{}.delay.{secs}s", self.topology.jobs_queue);
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(secs as i64 * 1000),
        );
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt((secs as i64 + 300) * 1000),
        );
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.topology.jobs_exchange.as_str().into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.topology.jobs_routing_key.as_str().into()),
        );
        let channel = self.channel()?;
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            )
            .await?;
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            "x-otp-deferred-until".into(),
            AMQPValue::LongString(until.into()),
        );
        let properties = self
            .republished(delivery, headers)
            .with_delivery_mode(PERSISTENT);
        self.publish("", &queue, &delivery.data, properties, true)
            .await
    }

    /// The jobs queue's delivery limit (`amqp.delivery_limit`).
    pub fn delivery_limit(&self) -> u32 {
        self.topology.delivery_limit
    }

    /// The routing key of verification messages on the jobs exchange.
    pub fn verifications_routing_key(&self) -> &str {
        &self.topology.verifications_routing_key
    }

    /// Copies a job message to the dead-letter exchange with the reason in `x-otp-error` (and
    /// the field in `x-otp-error-field`), keeping its body, properties and headers.
    pub async fn dead_letter(
        &self,
        delivery: &Delivery,
        error: &JobError,
    ) -> Result<(), PublishError> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            HEADER_ERROR.into(),
            AMQPValue::LongString(error.to_string().into()),
        );
        headers.insert(
            HEADER_ERROR_FIELD.into(),
            AMQPValue::LongString(error.field.clone().into()),
        );
        headers.insert(
            "x-otp-original-exchange".into(),
            AMQPValue::LongString(delivery.exchange.as_str().into()),
        );
        headers.insert(
            "x-otp-original-routing-key".into(),
            AMQPValue::LongString(delivery.routing_key.as_str().into()),
        );
        let mut properties = self.republished(delivery, headers);
        if let Some(ttl) = self.topology.dead_letter_ttl {
            properties = properties.with_expiration(ttl.as_millis().to_string().into());
        }
        let content_type = delivery
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str());
        let body = without_code(content_type, &delivery.data);
        self.publish(
            &self.topology.dead_letter_exchange,
            delivery.routing_key.as_str(),
            &body,
            properties,
            true,
        )
        .await
    }
}

impl Publisher {
    /// A consumed message's properties with `headers`, to publish it again as the gateway: a
    /// producer's `user_id` moves to the `x-otp-original-user-id` header and the gateway's own
    /// takes its place (RabbitMQ refuses a message whose `user_id` is not its publisher's).
    fn republished(&self, delivery: &Delivery, mut headers: FieldTable) -> BasicProperties {
        let properties = delivery.properties.clone();
        match delivery.properties.user_id() {
            Some(user) if user.as_str() != self.topology.gateway_user => {
                headers.insert(
                    "x-otp-original-user-id".into(),
                    AMQPValue::LongString(user.as_str().into()),
                );
                properties
                    .with_headers(headers)
                    .with_user_id(short(&self.topology.gateway_user))
            }
            _ => properties.with_headers(headers),
        }
    }
}

/// An AMQP short string, cut to its 255-byte limit at a character boundary.
fn short(text: &str) -> ShortString {
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].into()
}
