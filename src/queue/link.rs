//! The broker link: connects, declares the topology, opens the consumer and publisher
//! channels, and keeps doing so with back-off whenever the broker is unreachable or the
//! connection drops, saying plainly what is wrong and how to fix it. Owns the orderly
//! shutdown of consumption: stop taking jobs, let in-flight ones finish within the grace
//! period, leave the rest unacked for redelivery. An amqps:// link whose certificates are
//! refused before it ever connected stops the start, saying which certificate and why (that is
//! a setting to fix, not an outage to wait out); once it has run, it keeps retrying instead.

use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer, DefaultConnectionBuilder, Event};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::AmqpConfig;
use super::consumer::{ConsumeEnd, JobConsumer};
use super::publisher::Publisher;
use super::topology::Topology;
use crate::domain::reconnect_backoff;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What to tell an operator when the broker cannot be reached.
const BROKER_HINT: &str = "start a local broker with `rabbitmq-server -detached` (or `docker compose up -d rabbitmq`), or point amqp.url / OTP_GATEWAY_AMQP__URL at yours";

/// The state of the link, for health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Not connected (yet, or any more).
    Down,
    /// Connected, topology declared, consuming.
    Up,
}

/// Why the link gave up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The TLS handshake with the broker failed on a certificate before the link ever worked.
    #[error(
        "the TLS connection to RabbitMQ at {url} was refused over a certificate ({error}): {advice}"
    )]
    Certificate {
        /// The broker URL, without password.
        url: String,
        /// What the handshake said.
        error: String,
        /// What to check.
        advice: String,
    },
}

/// Whether a connection error is a certificate the handshake refused (ours or the broker's).
fn certificate_refused(error: &str) -> bool {
    let error = error.to_ascii_lowercase();
    error.contains("certificate") || error.contains("unknownca") || error.contains("unknown ca")
}

/// One live connection and its channels.
struct Session {
    connection: Connection,
    consume_channel: Channel,
    publish_channel: Channel,
    consumer: Consumer,
}

/// Keeps the gateway connected to RabbitMQ.
#[derive(Debug)]
pub struct BrokerLink {
    config: AmqpConfig,
    topology: Arc<Topology>,
    consumer_tag: String,
    publish_channel: watch::Sender<Option<Channel>>,
    state: watch::Sender<LinkState>,
}

impl BrokerLink {
    /// A link for `config`, the publisher that uses it, and its state.
    pub fn new(config: AmqpConfig, worker: &str) -> (Self, Publisher, watch::Receiver<LinkState>) {
        let topology = Arc::new(Topology::from(&config));
        let (publish_channel, channel_rx) = watch::channel(None);
        let (state, state_rx) = watch::channel(LinkState::Down);
        let publisher = Publisher::new(channel_rx, Arc::clone(&topology));
        let link = BrokerLink {
            config,
            topology,
            consumer_tag: format!("otp-gateway-{worker}"),
            publish_channel,
            state,
        };
        (link, publisher, state_rx)
    }

    async fn open(&self) -> Result<Session, lapin::Error> {
        let properties = ConnectionProperties::default()
            .with_connection_name(self.config.connection_name.as_str().into());
        let tls = self.config.tls().map_err(|e| {
            lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                e.to_string(),
            ))
        })?;
        let builder = DefaultConnectionBuilder::new()?
            .with_uri_str(self.config.url.expose().to_owned())
            .with_properties(properties)
            .with_tls_config(tls);
        let connect = builder.connect();
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| {
                lapin::Error::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {CONNECT_TIMEOUT:?}"),
                ))
            })??;
        let setup = connection.create_channel().await?;
        self.topology.declare(&setup).await?;
        let _ = setup.close(200, "topology declared".into()).await;
        let publish_channel = connection.create_channel().await?;
        publish_channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let consume_channel = connection.create_channel().await?;
        consume_channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = consume_channel
            .basic_consume(
                self.topology.jobs_queue.as_str().into(),
                self.consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Session {
            connection,
            consume_channel,
            publish_channel,
            consumer,
        })
    }

    /// Runs until `stop` is cancelled, then drains in-flight jobs for at most `grace`; gives
    /// up only on certificates refused before the first connection.
    pub async fn run(
        self,
        consumer: JobConsumer,
        stop: CancellationToken,
        grace: Duration,
    ) -> Result<(), LinkError> {
        let (mut backoff, max) =
            reconnect_backoff(self.config.reconnect_initial, self.config.reconnect_max);
        let tracker = TaskTracker::new();
        let abandon = CancellationToken::new();
        let url = self.config.url.redacted();
        let mut failures = 0u32;
        let mut ever_connected = false;
        while !stop.is_cancelled() {
            let opened = tokio::select! {
                _ = stop.cancelled() => break,
                opened = self.open() => opened,
            };
            let session = match opened {
                Ok(session) => session,
                Err(error) if !ever_connected && certificate_refused(&error.to_string()) => {
                    return Err(LinkError::Certificate {
                        url,
                        error: error.to_string(),
                        advice: self.config.tls_advice(),
                    });
                }
                Err(error) => {
                    failures += 1;
                    let delay = backoff.next_backoff().unwrap_or(max);
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::error!(%url, %error, attempt = failures, retry_in = ?delay,
                            "cannot reach RabbitMQ: {BROKER_HINT}; retrying");
                    } else {
                        tracing::warn!(%url, %error, attempt = failures, retry_in = ?delay, "RabbitMQ still unreachable; retrying");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            backoff.reset();
            failures = 0;
            ever_connected = true;
            tracing::info!(%url, queue = %self.topology.jobs_queue, prefetch = self.config.prefetch, "connected to RabbitMQ; consuming jobs");
            let _ = self
                .publish_channel
                .send(Some(session.publish_channel.clone()));
            let _ = self.state.send(LinkState::Up);

            let mut events = session.connection.events_listener();
            let connection_failed = async {
                while let Some(event) = events.next().await {
                    if let Event::Error(error) = event {
                        return error.to_string();
                    }
                }
                "the connection closed".to_owned()
            };
            let end = tokio::select! {
                end = consumer.consume(session.consumer, &stop, &abandon, &tracker) => end,
                why = connection_failed => ConsumeEnd::Lost(why),
            };
            match end {
                ConsumeEnd::Shutdown => {
                    let _ = session
                        .consume_channel
                        .basic_cancel(
                            self.consumer_tag.as_str().into(),
                            BasicCancelOptions::default(),
                        )
                        .await;
                    drain(&tracker, &abandon, grace).await;
                    let _ = self.state.send(LinkState::Down);
                    let _ = self.publish_channel.send(None);
                    let _ = session
                        .connection
                        .close(200, "otp-gateway shutting down".into())
                        .await;
                    tracing::info!("disconnected from RabbitMQ");
                    return Ok(());
                }
                ConsumeEnd::Lost(why) => {
                    let _ = self.state.send(LinkState::Down);
                    let _ = self.publish_channel.send(None);
                    tracing::error!(%url, error = %why,
                        "lost the connection to RabbitMQ; unacked jobs will be redelivered; reconnecting");
                    let _ = session.connection.close(320, "reconnecting".into()).await;
                }
            }
        }
        drain(&tracker, &abandon, grace).await;
        let _ = self.state.send(LinkState::Down);
        let _ = self.publish_channel.send(None);
        Ok(())
    }
}

/// Waits for in-flight jobs for at most `grace`, then abandons the rest.
async fn drain(tracker: &TaskTracker, abandon: &CancellationToken, grace: Duration) {
    tracker.close();
    let in_flight = tracker.len();
    if in_flight > 0 {
        tracing::info!(in_flight, ?grace, "waiting for in-flight jobs to finish");
    }
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            left = tracker.len(),
            "grace period over: unfinished jobs stay unacked for redelivery"
        );
        abandon.cancel();
        tracker.wait().await;
    }
}
