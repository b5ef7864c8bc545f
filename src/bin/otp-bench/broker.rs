//! Broker helpers.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use otp_gateway::config::{AmqpConfig, Config};
use otp_gateway::queue::Topology;

use crate::Bench;
use crate::provider;

/// Watches a round's events queue: counts events, and (when recording) when each job's
/// arrived.
pub(crate) struct EventWatch {
    pub(crate) channel: Channel,
    pub(crate) consumer: lapin::Consumer,
    pub(crate) seen: usize,
    pub(crate) not_sent: usize,
    /// When 5 % and 95 % of the events had arrived (the steady middle of a drain).
    pub(crate) marks: [Option<Instant>; 2],
    pub(crate) record: bool,
    pub(crate) arrivals: Vec<(usize, Instant)>,
}

impl EventWatch {
    pub(crate) async fn start(connection: &Connection, queue: &str) -> anyhow::Result<Self> {
        let channel = connection.create_channel().await?;
        channel.basic_qos(1000, BasicQosOptions::default()).await?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                "otp-bench-events".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(EventWatch {
            channel,
            consumer,
            seen: 0,
            not_sent: 0,
            marks: [None, None],
            record: false,
            arrivals: Vec::new(),
        })
    }

    /// Until `count` events have arrived (60 s at most between two).
    pub(crate) async fn wait(
        &mut self,
        count: usize,
        label: &str,
        started: Instant,
    ) -> anyhow::Result<()> {
        while self.seen < count {
            let event = tokio::time::timeout(Duration::from_secs(60), self.consumer.next())
                .await
                .map_err(|_| anyhow::anyhow!("no event for 60 s after {} jobs", self.seen))?
                .ok_or_else(|| anyhow::anyhow!("the events consumer was cancelled"))??;
            let at = Instant::now();
            if !matches!(
                event.routing_key.as_str(),
                "delivery.sent" | "delivery.delivered"
            ) {
                self.not_sent += 1;
            }
            if self.record
                && let Ok(report) = serde_json::from_slice::<serde_json::Value>(&event.data)
                && let Some(job) = report
                    .get("job_id")
                    .and_then(|id| id.as_str())
                    .and_then(provider::job_index)
            {
                self.arrivals.push((job, at));
            }
            self.seen += 1;
            if self.seen == count / 20 {
                self.marks[0] = Some(at);
            }
            if self.seen == count - count / 20 {
                self.marks[1] = Some(at);
            }
            if self.seen.is_multiple_of(500) {
                progress(label, self.seen, count, started);
            }
        }
        eprintln!();
        Ok(())
    }

    pub(crate) async fn close(&self) {
        let _ = self.channel.close(200, "done".into()).await;
    }
}

/// A classic queue bound to every `delivery.*` event of `topology`; its name.
pub(crate) async fn events_queue(channel: &Channel, topology: &Topology) -> anyhow::Result<String> {
    let queue = format!("{}.bench-events", topology.jobs_queue);
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            topology.events_exchange.as_str().into(),
            "delivery.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(queue)
}

/// A job as an upstream service would publish it: SMS to a number of its own (no rate limit
/// applies), through the sandbox provider.
pub(crate) fn job_body(label: &str, n: usize) -> Vec<u8> {
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    let round: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    serde_json::json!({
        "job_id": format!("{round}-{n:07}"), "tenant": "bench", "account": format!("user-{n}"),
        "code": "482913", "expires_at": expires.to_string(), "purpose": "sign_in",
        "locale": "en-US", "channels": ["sms"],
        "targets": [{"phone": {"number": format!("+1415555{:04}", n % 10_000)}}],
    })
    .to_string()
    .into_bytes()
}

/// Names of one round's topology (as the gateway's configuration would give them).
pub(crate) fn topology(prefix: &str) -> AmqpConfig {
    let mut amqp = Config::load(None)
        .expect("the embedded defaults are valid")
        .amqp;
    amqp.jobs_exchange = format!("{prefix}.jobs");
    amqp.jobs_queue = format!("{prefix}.send-code");
    amqp.dead_letter_exchange = format!("{prefix}.dead");
    amqp.dead_letter_queue = format!("{prefix}.send-code.dead");
    amqp.events_exchange = format!("{prefix}.events");
    amqp
}

/// Publishes `jobs` bodies to the jobs exchange of `topology`, persistent, confirmed.
pub(crate) async fn prefill(
    channel: &Channel,
    topology: &Topology,
    label: &str,
    jobs: usize,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut pending = Vec::with_capacity(1000);
    for n in 0..jobs {
        let confirm = channel
            .basic_publish(
                topology.jobs_exchange.as_str().into(),
                topology.jobs_routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &job_body(label, n),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await?;
        pending.push(confirm);
        if pending.len() == 1000 {
            for confirm in pending.drain(..) {
                confirm.await?;
            }
            progress(&format!("{label}: filling the queue"), n + 1, jobs, started);
        }
    }
    for confirm in pending {
        confirm.await?;
    }
    Ok(())
}

pub(crate) fn progress(what: &str, done: usize, total: usize, started: Instant) {
    let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
    eprint!("\r{what}: {done}/{total} ({rate:.0}/s)        ");
}

pub(crate) async fn remove(channel: &Channel, topology: &Topology, extra_queues: &[&str]) {
    for queue in [&topology.jobs_queue, &topology.dead_letter_queue]
        .into_iter()
        .map(String::as_str)
        .chain(extra_queues.iter().copied())
    {
        let _ = channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in [
        &topology.jobs_exchange,
        &topology.dead_letter_exchange,
        &topology.events_exchange,
    ] {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

/// The broker's share alone: a consumer that, per job, publishes one persistent confirmed
/// event and then acks (the gateway's broker traffic with no work in between), on its own
/// connection with a publishing and a consuming channel, as the gateway has. What it drains
/// is the most any gateway could on this broker and machine.
pub(crate) async fn floor_round(bench: &Bench, round: usize) -> anyhow::Result<f64> {
    let args = &bench.args;
    let label = format!("floor {round}/{}", args.rounds);
    let amqp = topology(&bench.prefix("floor", round));
    let topology = Topology::from(&amqp);
    topology.declare(&bench.channel).await?;
    let events = events_queue(&bench.channel, &topology).await?;
    prefill(&bench.channel, &topology, &label, args.jobs).await?;
    let connection = Connection::connect(&args.amqp, ConnectionProperties::default()).await?;
    let publish = connection.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let consume = connection.create_channel().await?;
    consume
        .basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let mut seen = EventWatch::start(&bench.connection, &events).await?;
    let started = Instant::now();
    let mut consumer = consume
        .basic_consume(
            topology.jobs_queue.as_str().into(),
            "otp-bench-floor".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let exchange = topology.events_exchange.clone();
    let jobs = args.jobs;
    // The size of the gateway's event for these jobs (its report as JSON).
    let body = vec![b'x'; 930];
    tokio::spawn(async move {
        let mut n = 0;
        while n < jobs {
            let Some(Ok(delivery)) = consumer.next().await else {
                break;
            };
            n += 1;
            let publish = publish.clone();
            let exchange = exchange.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let confirm = publish
                    .basic_publish(
                        exchange.as_str().into(),
                        "delivery.sent".into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await;
                if let Ok(confirm) = confirm {
                    let _ = confirm.await;
                }
                let _ = delivery.ack(BasicAckOptions::default()).await;
            });
        }
    });
    seen.wait(jobs, &label, started).await?;
    let elapsed = started.elapsed();
    seen.close().await;
    let _ = connection.close(200, "done".into()).await;
    remove(&bench.channel, &topology, &[&events]).await;
    Ok(jobs as f64 / elapsed.as_secs_f64())
}

/// `queue` as the broker has it now: its ready messages and its consumers.
pub(crate) async fn queue_state(channel: &Channel, queue: &str) -> anyhow::Result<lapin::Queue> {
    Ok(channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?)
}
