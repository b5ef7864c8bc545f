//! The broker topology: jobs exchange → quorum jobs queue (delivery limit, dead-lettering to a
//! fanout exchange and its queue), and the events topic exchange. Declared idempotently at
//! every (re)connect.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use super::AmqpConfig;

/// Names and settings of everything the gateway declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Direct exchange for jobs.
    pub jobs_exchange: String,
    /// Routing key from the jobs exchange to the jobs queue.
    pub jobs_routing_key: String,
    /// Routing key of verification messages, bound to the jobs queue too.
    pub verifications_routing_key: String,
    /// The quorum queue the gateway consumes.
    pub jobs_queue: String,
    /// `x-delivery-limit` of the jobs queue.
    pub delivery_limit: u32,
    /// Fanout exchange receiving dead letters.
    pub dead_letter_exchange: String,
    /// Queue holding dead letters.
    pub dead_letter_queue: String,
    /// Topic exchange for delivery events.
    pub events_exchange: String,
    /// The user the gateway connects as: a message it publishes again (dead-lettered,
    /// deferred) that carried a producer's `user_id` carries this one instead (RabbitMQ refuses
    /// a `user_id` that is not the publisher's).
    pub gateway_user: String,
    /// Whether the gateway's own jobs (`SendCode`) carry its `user_id` (producers are mapped
    /// to tenants: `amqp.tenant_from_user_id`).
    pub sign_jobs: bool,
    /// How long a dead letter the gateway writes is kept (its per-message TTL); none: forever.
    pub dead_letter_ttl: Option<std::time::Duration>,
}

impl From<&AmqpConfig> for Topology {
    fn from(config: &AmqpConfig) -> Self {
        Topology {
            jobs_exchange: config.jobs_exchange.clone(),
            jobs_routing_key: config.jobs_routing_key.clone(),
            verifications_routing_key: config.verifications_routing_key.clone(),
            jobs_queue: config.jobs_queue.clone(),
            delivery_limit: config.delivery_limit,
            dead_letter_exchange: config.dead_letter_exchange.clone(),
            dead_letter_queue: config.dead_letter_queue.clone(),
            events_exchange: config.events_exchange.clone(),
            gateway_user: config.user(),
            sign_jobs: !config.tenant_from_user_id.is_empty(),
            dead_letter_ttl: Some(config.dead_letter_ttl).filter(|ttl| !ttl.is_zero()),
        }
    }
}

fn quorum_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments
}

impl Topology {
    /// Declares every exchange, queue and binding (all durable).
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                self.dead_letter_exchange.as_str().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                self.dead_letter_queue.as_str().into(),
                durable_queue,
                quorum_arguments(),
            )
            .await?;
        channel
            .queue_bind(
                self.dead_letter_queue.as_str().into(),
                self.dead_letter_exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.jobs_exchange.as_str().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        let mut arguments = quorum_arguments();
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(self.delivery_limit as i32),
        );
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dead_letter_exchange.as_str().into()),
        );
        channel
            .queue_declare(self.jobs_queue.as_str().into(), durable_queue, arguments)
            .await?;
        for routing_key in [&self.jobs_routing_key, &self.verifications_routing_key] {
            channel
                .queue_bind(
                    self.jobs_queue.as_str().into(),
                    self.jobs_exchange.as_str().into(),
                    routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        channel
            .exchange_declare(
                self.events_exchange.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }
}
