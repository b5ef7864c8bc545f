//! The job consumer: decodes each message, hands the job to the delivery service, publishes
//! the outcome (event, and reply when asked) and only then acks. Malformed messages are copied
//! to the dead-letter exchange with the reason and acked (as are jobs whose producer may not
//! send for their tenant, when `amqp.tenant_from_user_id` maps producers to tenants, and jobs
//! handed out `amqp.delivery_limit` times without finishing); a ledger failure is retried with
//! back-off while the job stays unacked. Nothing is dropped silently.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::ProducerTenants;
use super::decode::{decode_job, decode_verification, identify};
use super::publisher::{PublishError, Publisher};
use crate::delivery::{DeliveryService, Handled, VerifyError};
use crate::domain::{Job, JobError, Report};

/// How long to wait before handing a job back to the broker when its outcome could not be
/// published, so a failing broker is not hammered.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// Back-off between ledger retries for one job. The job stays unacked meanwhile, so a database
/// outage pauses consumption (through the in-flight limit) instead of spending the queue's
/// delivery limit and dead-lettering good jobs.
const LEDGER_RETRY_INITIAL: Duration = Duration::from_millis(200);
const LEDGER_RETRY_MAX: Duration = Duration::from_secs(30);

/// Why consuming stopped.
#[derive(Debug)]
pub enum ConsumeEnd {
    /// Shutdown was requested.
    Shutdown,
    /// The connection or channel failed, or the broker cancelled the consumer.
    Lost(String),
}

/// Consumes send-code jobs.
#[derive(Debug, Clone)]
pub struct JobConsumer {
    service: Arc<DeliveryService>,
    publisher: Publisher,
    slots: Arc<Semaphore>,
    in_flight: Arc<Mutex<HashMap<String, watch::Receiver<bool>>>>,
    /// Which tenants each producer may send for (none: any).
    producers: Option<Arc<ProducerTenants>>,
}

/// Removes a delivery from the in-flight map and wakes whoever waits for it.
struct InFlightGuard {
    map: Arc<Mutex<HashMap<String, watch::Receiver<bool>>>>,
    id: String,
    done: watch::Sender<bool>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        let _ = self.done.send(true);
    }
}

impl JobConsumer {
    /// A consumer running at most `max_in_flight` jobs at once.
    pub fn new(service: Arc<DeliveryService>, publisher: Publisher, max_in_flight: usize) -> Self {
        JobConsumer {
            service,
            publisher,
            slots: Arc::new(Semaphore::new(max_in_flight)),
            in_flight: Arc::default(),
            producers: None,
        }
    }

    /// Dead-letters jobs whose tenant their producer (the `user_id` property) may not send for.
    pub fn with_producers(mut self, producers: Option<ProducerTenants>) -> Self {
        self.producers = producers.map(Arc::new);
        self
    }

    /// Takes deliveries from `consumer` until shutdown or until the link fails. Each job runs
    /// as its own task in `tracker`; `abandon` stops unfinished jobs once the grace period is
    /// over (they stay unacked, so the broker redelivers them).
    pub async fn consume(
        &self,
        mut consumer: Consumer,
        stop: &CancellationToken,
        abandon: &CancellationToken,
        tracker: &TaskTracker,
    ) -> ConsumeEnd {
        loop {
            let permit = tokio::select! {
                biased;
                _ = stop.cancelled() => return ConsumeEnd::Shutdown,
                permit = Arc::clone(&self.slots).acquire_owned() => permit.expect("the semaphore is never closed"),
            };
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => return ConsumeEnd::Shutdown,
                next = consumer.next() => next,
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => return ConsumeEnd::Lost(error.to_string()),
                None => return ConsumeEnd::Lost("the broker cancelled the consumer".into()),
            };
            let this = self.clone();
            let abandon = abandon.clone();
            // A consumer span (messaging conventions), continuing the trace the job's producer
            // started when its headers carry one.
            let span = tracing::info_span!(
                "job",
                otel.name = tracing::field::Empty,
                otel.kind = tracing::field::Empty,
                delivery_tag = delivery.delivery_tag,
                redelivered = delivery.redelivered
            );
            let queue = self.publisher.jobs_queue();
            crate::telemetry::describe(
                &span,
                "consumer",
                || format!("{queue} process"),
                || {
                    vec![
                        ("messaging.system", "rabbitmq".into()),
                        ("messaging.operation.type", "process".into()),
                        ("messaging.destination.name", queue.to_owned()),
                    ]
                },
            );
            crate::telemetry::continue_trace(&span, |name| {
                let headers = delivery.properties.headers().as_ref()?;
                match headers.inner().get(name)? {
                    lapin::types::AMQPValue::LongString(value) => Some(value.to_string()),
                    lapin::types::AMQPValue::ShortString(value) => Some(value.to_string()),
                    _ => None,
                }
            });
            let metrics = Arc::clone(self.service.metrics());
            metrics.in_flight(1);
            if let Some(stamped) = delivery.properties.timestamp()
                && !delivery.redelivered
            {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                metrics.queue_waited(now.saturating_sub(Duration::from_secs(*stamped)));
            }
            tracker.spawn(
                async move {
                    tokio::select! {
                        _ = this.handle(delivery) => {}
                        _ = abandon.cancelled() => {
                            tracing::warn!("shutdown grace period over: job left unacked for redelivery");
                        }
                    }
                    metrics.in_flight(-1);
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }

    async fn handle(&self, delivery: Delivery) {
        let content_type = delivery
            .properties
            .content_type()
            .as_ref()
            .map(|ct| ct.as_str());
        // The broker's last hand-out of a job that never finished (it may be what stops the
        // gateway): dead-lettered by the gateway, with the code taken out, rather than by the
        // broker with the body as published.
        let limit = self.publisher.delivery_limit();
        if let Some(count) = delivery_count(&delivery)
            && count >= u64::from(limit)
        {
            let (tenant, job_id) = identify(content_type, &delivery.data);
            tracing::error!(
                tenant,
                job_id,
                handed_out = count + 1,
                "job handed out amqp.delivery_limit times without finishing: dead-lettered"
            );
            let error = crate::domain::JobError::new(
                "x-delivery-count",
                format!(
                    "the job was handed out {} times without finishing (amqp.delivery_limit = \
                     {limit}): each time the gateway holding it stopped or lost the broker \
                     before it finished; look at the gateway's logs for this job id",
                    count + 1
                ),
            );
            self.dead_letter(&delivery, &error).await;
            return;
        }
        if delivery.routing_key.as_str() == self.publisher.verifications_routing_key() {
            Box::pin(self.verification(&delivery)).await;
            return;
        }
        let user_id = delivery.properties.user_id().as_ref().map(|u| u.as_str());
        let decoded =
            decode_job(content_type, &delivery.data).and_then(|job| match &self.producers {
                Some(producers) => producers.check(user_id, &job.tenant).map(|()| job),
                None => Ok(job),
            });
        let job = match decoded {
            Ok(job) => job,
            Err(error) => {
                let (tenant, job_id) = identify(content_type, &delivery.data);
                tracing::warn!(tenant, job_id, field = %error.field, problem = %error.problem,
                    "malformed job: dead-lettered");
                self.dead_letter(&delivery, &error).await;
                return;
            }
        };
        let id = job.delivery_id().to_string();
        let _guard = self.enter(&id).await;
        // The big steps are boxed: a job's task then holds only the step it is in (thousands of
        // jobs may be in flight, most of them waiting on a provider).
        let report = match Box::pin(self.deliver(&job, delivery.redelivered)).await {
            Handled::Finished { report, fresh } => {
                // A redelivered job may have been finished without its event going out. The
                // event goes out while the outcome is synced to disk; the ack waits for both.
                let publish = async {
                    if fresh || delivery.redelivered {
                        Box::pin(self.publish_outcome(&report)).await
                    } else {
                        Ok(())
                    }
                };
                let Some(published) = self.while_syncing(publish, &delivery).await else {
                    return;
                };
                if let Err(error) = published {
                    tracing::warn!(%error, "event not confirmed: job requeued to publish it again");
                    requeue(&delivery).await;
                    return;
                }
                report
            }
            Handled::HeldElsewhere(_) => {
                ack(&delivery).await;
                return;
            }
            Handled::Leased { until, .. } => {
                // Put back until the lease runs out (its owner may have died): then a replica
                // takes the delivery over, or finds it finished.
                let now = self.service.clock().now();
                let delay = until
                    .duration_since(now)
                    .max(jiff::SignedDuration::ZERO)
                    .unsigned_abs()
                    + std::time::Duration::from_secs(1);
                match Box::pin(self.publisher.defer(&delivery, delay, &until.to_string())).await {
                    Ok(()) => ack(&delivery).await,
                    Err(error) => {
                        tracing::warn!(%error, "could not hold the job until the lease ends: requeued");
                        requeue(&delivery).await;
                    }
                }
                return;
            }
            Handled::Deferred { report, until } => {
                let publish = Box::pin(self.publisher.publish_event(&report));
                let Some(published) = self.while_syncing(publish, &delivery).await else {
                    return;
                };
                if let Err(error) = published {
                    tracing::warn!(%error, "deferral event not confirmed");
                }
                let now = self.service.clock().now();
                let delay = until
                    .duration_since(now)
                    .max(jiff::SignedDuration::ZERO)
                    .unsigned_abs();
                match Box::pin(self.publisher.defer(&delivery, delay, &until.to_string())).await {
                    Ok(()) => {
                        tracing::info!(%until, ?delay, "job held in the broker until quiet hours end");
                        ack(&delivery).await;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "could not hold the job for later: requeued");
                        requeue(&delivery).await;
                    }
                }
                return;
            }
        };
        if let (Some(reply_to), Some(correlation_id)) = (
            delivery.properties.reply_to(),
            delivery.properties.correlation_id(),
        ) && let Err(error) = Box::pin(self.publisher.publish_reply(
            reply_to,
            correlation_id,
            &report,
        ))
        .await
        {
            tracing::warn!(%error, "reply not confirmed: job requeued to reply again");
            requeue(&delivery).await;
            return;
        }
        ack(&delivery).await;
    }

    /// A verification message: recorded on its delivery (and `delivery.verified` published),
    /// or dead-lettered naming the field that is wrong (an unknown delivery: `delivery_id`).
    async fn verification(&self, delivery: &Delivery) {
        let content_type = delivery
            .properties
            .content_type()
            .as_ref()
            .map(|ct| ct.as_str());
        let user_id = delivery.properties.user_id().as_ref().map(|u| u.as_str());
        let decoded = decode_verification(content_type, &delivery.data).and_then(|report| {
            match &self.producers {
                Some(producers) => producers.check(user_id, &report.id.tenant).map(|()| report),
                None => Ok(report),
            }
        });
        let report = match decoded {
            Ok(report) => report,
            Err(error) => {
                tracing::warn!(field = %error.field, problem = %error.problem,
                    "malformed verification message: dead-lettered");
                self.dead_letter(delivery, &error).await;
                return;
            }
        };
        let recorded = self
            .service
            .report_verification(&report.id, report.verified, report.at)
            .await;
        let refused = |field: &str, problem: String| JobError::new(field, problem);
        match recorded {
            Ok((stored, changed)) => {
                // Published again when the broker hands the message out again: the event of a
                // verification recorded before a lost ack may not have gone out.
                let verified = stored.verification.is_some_and(|v| v.verified);
                if verified
                    && (changed || delivery.redelivered)
                    && let Err(error) = self.publisher.publish_verified(&stored).await
                {
                    tracing::warn!(%error, "verification recorded, but its event was not confirmed: requeued");
                    requeue(delivery).await;
                    return;
                }
                ack(delivery).await;
            }
            Err(VerifyError::UnknownDelivery(id)) => {
                let error = refused("delivery_id", format!("no delivery {id}"));
                tracing::warn!(delivery_id = %report.id, "verification of an unknown delivery: dead-lettered");
                self.dead_letter(delivery, &error).await;
            }
            Err(VerifyError::Invalid(error)) => self.dead_letter(delivery, &error).await,
            Err(VerifyError::Store(error)) => {
                tracing::warn!(%error, "verification not recorded: requeued");
                requeue(delivery).await;
            }
        }
    }

    /// Copies the job to the dead-letter exchange with `error` and acks it (requeued when the
    /// copy was not confirmed).
    async fn dead_letter(&self, delivery: &Delivery, error: &crate::domain::JobError) {
        match Box::pin(self.publisher.dead_letter(delivery, error)).await {
            Ok(()) => {
                self.service
                    .metrics()
                    .dead_lettered(&error.field, &error.problem);
                ack(delivery).await;
            }
            Err(publish) => {
                tracing::error!(error = %publish, "could not dead-letter a job: requeued");
                requeue(delivery).await;
            }
        }
    }

    /// Runs `publish` while the job's ledger writes are synced to disk, and gives its result
    /// once both are done. If they could not be synced, the job is requeued and nothing is
    /// given: it is acked only once its outcome could survive a power cut.
    async fn while_syncing<T>(
        &self,
        publish: impl Future<Output = T>,
        delivery: &Delivery,
    ) -> Option<T> {
        let (published, synced) = tokio::join!(publish, self.service.flush());
        if let Err(error) = synced {
            tracing::error!(%error, "the outcome is not on disk: job requeued");
            requeue(delivery).await;
            return None;
        }
        Some(published)
    }

    /// The delivery's event, then `device.invalidated` for each device whose token a provider
    /// called dead.
    async fn publish_outcome(&self, report: &Report) -> Result<(), PublishError> {
        self.publisher.publish_event(report).await?;
        for device in report.invalidated_devices() {
            tracing::info!(device = %device.device_id, platform = %device.platform, reason = %device.reason, "push token invalidated: device.invalidated published");
            self.publisher.publish_device_invalidated(&device).await?;
        }
        Ok(())
    }

    /// Hands the job to the delivery service, retrying with back-off while the ledger fails.
    /// (A retry claims the delivery again as its owner and resumes where the failure left it.)
    async fn deliver(&self, job: &Job, redelivered: bool) -> Handled {
        let mut delay = LEDGER_RETRY_INITIAL;
        loop {
            match self.service.handle(job, redelivered).await {
                Ok(handled) => return handled,
                Err(error) => {
                    tracing::error!(%error, retry_in = ?delay, "ledger failure: the job stays unacked and is retried");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(LEDGER_RETRY_MAX);
                }
            }
        }
    }

    /// Waits until no other task of this process works on `id`, then marks it as ours.
    async fn enter(&self, id: &str) -> InFlightGuard {
        loop {
            let busy = {
                let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
                match map.get(id) {
                    Some(done) => Some(done.clone()),
                    None => {
                        let (done, receiver) = watch::channel(false);
                        map.insert(id.to_owned(), receiver);
                        return InFlightGuard {
                            map: Arc::clone(&self.in_flight),
                            id: id.to_owned(),
                            done,
                        };
                    }
                }
            };
            if let Some(mut done) = busy {
                let _ = done.wait_for(|finished| *finished).await;
            }
        }
    }
}

async fn ack(delivery: &Delivery) {
    if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
        tracing::warn!(%error, "ack failed (the broker will redeliver; the ledger prevents a second send)");
    }
}

async fn requeue(delivery: &Delivery) {
    tokio::time::sleep(REQUEUE_PAUSE).await;
    if let Err(error) = delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
    {
        tracing::warn!(%error, "nack failed (the broker will redeliver)");
    }
}

/// How many times the broker handed the job out before without it being acked (quorum queues'
/// `x-delivery-count`); `None` on a first delivery.
fn delivery_count(delivery: &Delivery) -> Option<u64> {
    use lapin::types::AMQPValue;
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get("x-delivery-count")? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        _ => None,
    }
}
