//! Delivery: takes a validated job through idempotency (the ledger claim), the engine
//! ([`Dispatcher`]: stages, retries, failover, breakers, acknowledgements) and the final report.
//! [`DeliveryService::handle`] is what the queue consumer calls per job;
//! [`DeliveryService::acknowledge`] records what a device said.

mod breaker;
mod changes;
mod dispatch;
mod explain;
mod receipt_waiters;
mod retry;

use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use tracing::instrument;

use crate::domain::{
    Acknowledgement, Attempt, AttemptOutcome, Channel, Clock, DeliveryId, DeliveryStatus,
    FailureReason, Job, Report, Target, TargetStatus, headline_reason, mask_phone, summarize,
};
use crate::providers::ProviderReceipt;
use crate::store::{
    AttemptEnd, AttemptKey, AttemptStart, Claim, DecideOutcome, DeliveryKey, KnownReport, Ledger,
    NewDelivery, NewTarget, Outcome, StoreError, TargetUpdate, as_stored,
};

pub use breaker::{BreakerSnapshot, CircuitState};
pub use changes::{ChangeNotices, ChangeWatch};
pub use dispatch::{Dispatcher, EngineSettings, ProviderHealth, Verdict};
pub use explain::{ChannelPlan, Explanation, ProviderChoice, TargetPlan};
use receipt_waiters::ReceiptWaiters;
pub use retry::RetryPolicy;

/// How long `AcknowledgeDelivery` on a running delivery waits for its engine to act, so that
/// the answer shows the outcome the acknowledgement led to.
const ACK_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What became of a job handed to [`DeliveryService::handle`].
#[derive(Debug, Clone)]
pub enum Handled {
    /// The delivery is terminal. `fresh` is true when this call decided the outcome (false for
    /// a job whose outcome was already in the ledger: a duplicate or a redelivery).
    Finished {
        /// The final report.
        report: Report,
        /// Whether this call decided it.
        fresh: bool,
    },
    /// Another worker is delivering it right now.
    HeldElsewhere(Report),
    /// Quiet hours hold it (DEFERRED) until `until`: the job must come back then.
    Deferred {
        /// The report, status DEFERRED.
        report: Report,
        /// When to try again.
        until: Timestamp,
    },
}

/// Runs deliveries and tells watchers when a report changed.
pub struct DeliveryService {
    ledger: Arc<dyn Ledger>,
    /// The ledger's staged view: deliveries write through it; their writes are flushed before
    /// a retry's sleep or a wait for a device, and by [`DeliveryService::flush`] before the
    /// job is acked.
    staged: Arc<dyn Ledger>,
    dispatcher: Dispatcher,
    clock: Arc<dyn Clock>,
    worker: String,
    changes: Arc<ChangeNotices>,
    receipts: Arc<ReceiptWaiters>,
}

impl std::fmt::Debug for DeliveryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryService")
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

/// The ledger row being written by one delivery, and the channel that announces its changes.
pub(crate) struct Progress<'a> {
    pub(crate) key: DeliveryKey,
    pub(crate) id: String,
    /// The staged view: writes return once committed; see [`Progress::flush`].
    pub(crate) ledger: &'a dyn Ledger,
    own: Mutex<OwnWrites>,
    pub(crate) clock: &'a dyn Clock,
    changes: &'a Arc<ChangeNotices>,
    /// Receipts handed to this delivery's engine while it waits for them.
    pub(crate) receipts: &'a Arc<ReceiptWaiters>,
}

/// What a delivery's own writes made of its report.
struct OwnWrites {
    /// The report as they left it, and the revision they brought it to.
    known: KnownReport,
    /// Where each attempt they started sits in `known`: its key, target and position.
    attempts: Vec<(AttemptKey, usize, usize)>,
}

impl Progress<'_> {
    /// Tells this delivery's watchers that its report changed.
    pub(crate) fn changed(&self) {
        self.changes.changed(&self.id);
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Records that a provider call is starting (and tells watchers): committed (visible, and kept if the process
    /// dies) when this returns, on disk with the next flush. Not fsynced before the call: a
    /// power cut could forget an attempt that was made, but it could not stop a second send
    /// either way (a taken-over attempt that was in flight is tried again), and an fsync
    /// before every call would add its latency to every code.
    pub(crate) async fn start_attempt(
        &self,
        start: &AttemptStart,
    ) -> Result<AttemptKey, StoreError> {
        let attempt = self.ledger.start_attempt(self.key, start).await?;
        let mut own = lock(&self.own);
        let OwnWrites { known, attempts } = &mut *own;
        let index = start.target as usize;
        if let Some(target) = known.report.targets.get_mut(index) {
            target.attempts.push(Attempt {
                provider: start.provider.clone(),
                channel: start.channel,
                target: start.masked_target.clone(),
                started_at: as_stored(start.started_at),
                ended_at: None,
                outcome: AttemptOutcome::InFlight,
                reason: None,
                provider_code: None,
                provider_message: None,
                retry: start.retry,
                provider_message_id: None,
                next_retry_at: None,
                token_invalid_since: None,
                sms: start.sms,
            });
            attempts.push((attempt, index, target.attempts.len() - 1));
        }
        drop(own);
        self.changed();
        Ok(attempt)
    }

    /// Records how a provider call ended and its target's new state, and tells watchers.
    pub(crate) async fn finish_attempt(
        &self,
        attempt: AttemptKey,
        end: &AttemptEnd,
        index: usize,
        update: &TargetUpdate,
    ) -> Result<(), StoreError> {
        self.ledger
            .finish_attempt(self.key, attempt, end, index as u32, update)
            .await?;
        let mut own = lock(&self.own);
        let OwnWrites { known, attempts } = &mut *own;
        known.revision += 1;
        if let Some(&(_, target, position)) = attempts.iter().find(|(key, _, _)| *key == attempt)
            && let Some(started) = known.report.targets[target].attempts.get_mut(position)
        {
            started.ended_at = Some(as_stored(end.ended_at));
            started.outcome = end.outcome;
            started.reason = end.reason;
            started.provider_code = end.provider_code.clone();
            started.provider_message = end.provider_message.clone();
            started.provider_message_id = end.provider_message_id.clone();
            started.next_retry_at = end.next_retry_at.map(as_stored);
            started.token_invalid_since = end.token_invalid_since.map(as_stored);
        }
        apply_update(&mut known.report, index, update);
        drop(own);
        self.changed();
        Ok(())
    }

    /// Updates one target, and tells watchers.
    pub(crate) async fn update_target(
        &self,
        index: usize,
        update: &TargetUpdate,
    ) -> Result<(), StoreError> {
        self.ledger
            .update_target(self.key, index as u32, update, self.now())
            .await?;
        let mut own = lock(&self.own);
        own.known.revision += 1;
        apply_update(&mut own.known.report, index, update);
        drop(own);
        self.changed();
        Ok(())
    }

    /// Waits until everything written so far is on disk: before a retry's back-off and before
    /// waiting for a device, so a worker that takes over after a power cut finds what was sent.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        self.ledger.flush().await
    }

    /// Watches this delivery's changes, for waiting on what another task writes
    /// (acknowledgements, receipts).
    pub(crate) fn watch(&self) -> ChangeWatch {
        self.changes.watch(&self.id)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A target as the ledger has it after `update`.
fn apply_update(report: &mut Report, index: usize, update: &TargetUpdate) {
    if let Some(target) = report.targets.get_mut(index) {
        target.channel = update.channel;
        target.status = update.status;
        target.reason = update.reason;
        target.hint = update.reason.map(FailureReason::hint);
        target.detail = update.detail.clone();
    }
}

/// Why an acknowledgement was refused.
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    /// The ledger failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No such delivery.
    #[error("no delivery {0}")]
    UnknownDelivery(String),
    /// The device is not one of the delivery's targets.
    #[error("device `{device}` is not a target of delivery {delivery}")]
    UnknownDevice {
        /// The delivery.
        delivery: String,
        /// The device id given.
        device: String,
    },
    /// The device got no push to show: SHOWN cannot be true.
    #[error(
        "device `{device}` got no push in delivery {delivery} ({why}): it cannot have shown the code"
    )]
    NotPushed {
        /// The delivery.
        delivery: String,
        /// The device id given.
        device: String,
        /// Why no push reached it (the target's reason).
        why: String,
    },
    /// The delivery cannot take an acknowledgement now.
    #[error("delivery {delivery} is {status}: {why}")]
    NotAwaiting {
        /// The delivery.
        delivery: String,
        /// Its status.
        status: DeliveryStatus,
        /// Why that rules out an acknowledgement.
        why: &'static str,
    },
}

/// What an acknowledgement did.
#[derive(Debug, Clone)]
pub enum AckOutcome {
    /// Recorded on a running delivery; its engine acts on it.
    Recorded(Report),
    /// It changed a SENT delivery to its final state (DELIVERED, or FAILED / USER_DENIED).
    Finished(Report),
}

/// The ledger's view of a job: its identity and its targets, masked.
pub fn new_delivery(job: &Job) -> NewDelivery {
    let channels = job.channel_order();
    let phone_channel = channels
        .iter()
        .copied()
        .find(|c| matches!(c, Channel::Sms | Channel::Voice))
        .unwrap_or(Channel::Sms);
    NewDelivery {
        id: job.delivery_id(),
        account: job.account.clone(),
        purpose: job.purpose.clone(),
        expires_at: job.expires_at,
        targets: job
            .targets
            .iter()
            .map(|target| match target {
                Target::Device(device) => NewTarget {
                    channel: Channel::Push,
                    label: device.id.clone(),
                    platform: Some(device.platform),
                },
                Target::Phone(phone) => NewTarget {
                    channel: phone_channel,
                    label: mask_phone(&phone.number),
                    platform: None,
                },
            })
            .collect(),
    }
}

impl DeliveryService {
    /// A service writing to `ledger` as `worker` (a name unique to this process).
    pub fn new(
        ledger: Arc<dyn Ledger>,
        dispatcher: Dispatcher,
        clock: Arc<dyn Clock>,
        worker: String,
    ) -> Self {
        let changes = ChangeNotices::new();
        let receipts = Arc::new(ReceiptWaiters::default());
        DeliveryService {
            staged: ledger.staged(),
            ledger,
            dispatcher,
            clock,
            worker,
            changes,
            receipts,
        }
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Watches delivery `id`: its watch wakes at each change of its report made here.
    pub fn watch(&self, id: &str) -> ChangeWatch {
        self.changes.watch(id)
    }

    /// Waits until every ledger write committed so far (the deliveries' staged ones included)
    /// is on disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.ledger.flush().await
    }

    /// Records a job submitted over gRPC as ACCEPTED (or finds it); true when it is new.
    pub async fn accept(&self, job: &Job) -> Result<(Report, bool), StoreError> {
        let accepted = self
            .ledger
            .accept(&new_delivery(job), self.clock.now())
            .await?;
        self.changes.changed(&accepted.0.delivery_id);
        Ok(accepted)
    }

    /// Removes a gRPC-submitted delivery whose job could not be queued.
    pub async fn forget_accepted(&self, id: &DeliveryId) -> Result<(), StoreError> {
        self.ledger.forget_accepted(id).await
    }

    /// Delivers `job` unless the ledger says it is done or held by another worker.
    /// `redelivered` (the broker's flag) lets this worker take over an interrupted delivery.
    ///
    /// What it returns is committed (readers see it, a crash of the process keeps it) but may
    /// not be on disk yet: [`DeliveryService::flush`] before the job is acked, so the broker
    /// never forgets a job whose outcome a power cut could undo. (The outcome's event can go
    /// out meanwhile: events are at least once, a redelivered job announces its outcome again.)
    #[instrument(skip_all, fields(delivery_id = %job.delivery_id()))]
    pub async fn handle(&self, job: &Job, redelivered: bool) -> Result<Handled, StoreError> {
        let new = new_delivery(job);
        // Staged, like every write of the delivery (see above). The block list is read meanwhile
        // (both ride the ledger writer's next transaction).
        let now = self.clock.now();
        let (claim, blocks) = tokio::join!(
            self.staged.claim(&new, &self.worker, redelivered, now),
            self.dispatcher.block_candidates_at(job, now)
        );
        let claim = claim?;
        let (key, prior) = match claim {
            Claim::Finished(report) => {
                tracing::info!(status = %report.status, "already finished: nothing sent again");
                return Ok(Handled::Finished {
                    report,
                    fresh: false,
                });
            }
            Claim::HeldElsewhere(report) => {
                tracing::info!("another worker is delivering it: nothing sent");
                return Ok(Handled::HeldElsewhere(report));
            }
            Claim::Started(key, known) | Claim::Resumed(key, known) => (key, known),
        };
        let progress = Progress {
            key,
            id: new.id.to_string(),
            ledger: self.staged.as_ref(),
            clock: self.clock.as_ref(),
            changes: &self.changes,
            receipts: &self.receipts,
            own: Mutex::new(OwnWrites {
                known: prior.clone(),
                attempts: Vec::new(),
            }),
        };
        progress.changed();
        let verdict = self
            .dispatcher
            .dispatch(job, &prior.report, &blocks?, &progress)
            .await?;
        let known = progress
            .own
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .known;
        let report = self
            .close(
                self.staged.as_ref(),
                key,
                Arc::new(move |report: &Report| decide(report, verdict)),
                Some(known),
            )
            .await?;
        if let Verdict::Deferred(until) = verdict
            && report.status == DeliveryStatus::Deferred
        {
            return Ok(Handled::Deferred { report, until });
        }
        tracing::info!(status = %report.status, reason = report.reason.map(FailureReason::as_str), "delivery finished");
        Ok(Handled::Finished {
            report,
            fresh: true,
        })
    }
}

impl DeliveryService {
    /// Ends a delivery with `status` and `reason`, summarizing its targets.
    async fn conclude(
        &self,
        key: DeliveryKey,
        status: DeliveryStatus,
        reason: Option<FailureReason>,
    ) -> Result<Report, StoreError> {
        let outcome = move |report: &Report| Outcome {
            status,
            reason,
            summary: summarize(status, reason, report.expires_at, &report.targets),
        };
        self.close(self.ledger.as_ref(), key, Arc::new(outcome), None)
            .await
    }

    /// Writes the final outcome `decide` draws from the report as the ledger holds it (`known`,
    /// unless something else wrote), and returns the final report once `ledger` has it: on
    /// disk (with every write before it) through the durable ledger, committed through the
    /// staged one.
    async fn close(
        &self,
        ledger: &dyn Ledger,
        key: DeliveryKey,
        decide: DecideOutcome,
        known: Option<KnownReport>,
    ) -> Result<Report, StoreError> {
        let report = ledger.finish(key, self.clock.now(), decide, known).await?;
        self.changes.changed(&report.delivery_id);
        Ok(report)
    }

    /// Records that device `device_id` showed the code or that its user denied the request.
    /// A running delivery's engine acts on it (DELIVERED, or USER_DENIED with no further
    /// stage); a SENT delivery becomes DELIVERED or FAILED / USER_DENIED here.
    pub async fn acknowledge(
        &self,
        id: &DeliveryId,
        device_id: &str,
        ack: Acknowledgement,
    ) -> Result<AckOutcome, AckError> {
        let key = self
            .ledger
            .key(id)
            .await?
            .ok_or_else(|| AckError::UnknownDelivery(id.to_string()))?;
        let report = self.ledger.report(key).await?;
        let index = report
            .targets
            .iter()
            .position(|t| t.platform.is_some() && t.target == device_id)
            .ok_or_else(|| AckError::UnknownDevice {
                delivery: id.to_string(),
                device: device_id.to_owned(),
            })?;
        let refuse = |why| AckError::NotAwaiting {
            delivery: id.to_string(),
            status: report.status,
            why,
        };
        match report.status {
            DeliveryStatus::Accepted => return Err(refuse("its delivery has not started")),
            DeliveryStatus::Delivered | DeliveryStatus::Failed => {
                return Err(refuse("its outcome is final"));
            }
            DeliveryStatus::InProgress | DeliveryStatus::Deferred | DeliveryStatus::Sent => {}
        }
        // SHOWN only from a device a push was handed to (one still in flight counts: the device
        // can show it before the provider's answer is written down). DENIED from any device of
        // the delivery stops the chain: it is a security signal.
        let target = &report.targets[index];
        let pushed = target
            .attempts
            .iter()
            .any(|a| a.outcome != AttemptOutcome::Failed);
        if ack == Acknowledgement::Shown && !pushed {
            let why = match target.reason {
                Some(reason) => format!("its push ended {reason}"),
                None => "no push was sent to it".to_owned(),
            };
            return Err(AckError::NotPushed {
                delivery: id.to_string(),
                device: device_id.to_owned(),
                why,
            });
        }
        let now = self.clock.now();
        let mut changes = self.changes.watch(&id.to_string());
        self.ledger.record_ack(key, index as u32, ack, now).await?;
        tracing::info!(delivery_id = %id, device = device_id, acknowledgement = %ack, "device acknowledgement");
        if report.status != DeliveryStatus::Sent {
            self.changes.changed(&id.to_string());
            return Ok(AckOutcome::Recorded(
                self.after_engine_acted(key, &mut changes).await?,
            ));
        }
        let (target_status, reason, detail) = match ack {
            Acknowledgement::Shown => (
                TargetStatus::Delivered,
                None,
                "the device confirmed it showed the code",
            ),
            Acknowledgement::Denied => (
                TargetStatus::Failed,
                Some(FailureReason::UserDenied),
                "the user tapped \"Don't Allow\" on this device",
            ),
        };
        let update = TargetUpdate {
            channel: Channel::Push,
            status: target_status,
            reason,
            detail: Some(detail.into()),
        };
        self.ledger
            .update_target(key, index as u32, &update, now)
            .await?;
        let status = if ack == Acknowledgement::Shown {
            DeliveryStatus::Delivered
        } else {
            DeliveryStatus::Failed
        };
        let report = self.conclude(key, status, reason).await?;
        Ok(AckOutcome::Finished(report))
    }

    /// The report once the running engine has acted on an acknowledgement (its status left
    /// IN_PROGRESS), or as it stands after [`ACK_ANSWER_WAIT`] (an engine past its push stage
    /// decides at the end of the stage it is in).
    async fn after_engine_acted(
        &self,
        key: DeliveryKey,
        changes: &mut ChangeWatch,
    ) -> Result<Report, StoreError> {
        let waited = tokio::time::timeout(ACK_ANSWER_WAIT, async {
            loop {
                changes.changed().await;
                match self.ledger.report(key).await {
                    Ok(report) if report.status == DeliveryStatus::InProgress => {}
                    _ => return,
                }
            }
        });
        let _ = waited.await;
        self.ledger.report(key).await
    }

    /// The plan for `job` at `at` (default now): nothing sent, written or counted.
    pub async fn explain(
        &self,
        job: &Job,
        at: Option<Timestamp>,
    ) -> Result<Explanation, StoreError> {
        self.dispatcher
            .explain(job, at.unwrap_or_else(|| self.clock.now()))
            .await
    }

    /// Applies a provider's delivery receipt to the attempt it sent under the receipt's message
    /// id. While the engine still holds the job (it waits for receipts after an SMS or call was
    /// accepted), a failure receipt makes it go on with the next number or stage. After that, a
    /// SENT delivery becomes DELIVERED on a delivered receipt, or FAILED when a failed receipt
    /// leaves no target reached; that final report comes back for publishing (and is on disk).
    /// The receipt itself is committed, not yet synced: [`DeliveryService::flush`] for that.
    pub async fn apply_receipt(
        &self,
        receipt: &ProviderReceipt,
    ) -> Result<ReceiptApplied, StoreError> {
        let end = AttemptEnd {
            ended_at: self.clock.now(),
            outcome: receipt.outcome,
            reason: receipt.reason,
            provider_code: receipt.code.clone(),
            provider_message: Some(receipt.detail.clone()),
            provider_message_id: None,
            next_retry_at: None,
            token_invalid_since: None,
        };
        // The engine holding the job here waits for it: it records the receipt itself.
        let receipt = match self.receipts.hand_over(receipt.clone()) {
            Ok(()) => return Ok(ReceiptApplied::Recorded),
            Err(receipt) => receipt,
        };
        // Staged like the engine's own writes: the caller that must know it is on disk before
        // it answers the provider (an HTTP callback) calls `flush`; an SMPP receipt was
        // answered on its session already, so waiting would change nothing.
        let Some((key, id, status)) = self
            .staged
            .apply_receipt(&receipt.provider, &receipt.message_id, &end)
            .await?
        else {
            return Ok(ReceiptApplied::UnknownMessage);
        };
        self.changes.changed(&id.to_string());
        if status != DeliveryStatus::Sent {
            // Still running (its engine, just woken, decides with it) or already final.
            return Ok(ReceiptApplied::Recorded);
        }
        let report = self.ledger.report(key).await?;
        let delivered = report
            .targets
            .iter()
            .any(|t| t.status == TargetStatus::Delivered);
        let still_sent = report
            .targets
            .iter()
            .any(|t| t.status == TargetStatus::Sent);
        let (status, reason) = match (delivered, still_sent) {
            (true, _) => (DeliveryStatus::Delivered, None),
            (false, true) => return Ok(ReceiptApplied::Recorded),
            (false, false) => (
                DeliveryStatus::Failed,
                Some(headline_reason(&report.targets).unwrap_or(FailureReason::Undeliverable)),
            ),
        };
        Ok(ReceiptApplied::Concluded(Box::new(
            self.conclude(key, status, reason).await?,
        )))
    }

    /// Every provider's circuit state and recent figures.
    pub fn provider_health(&self) -> Vec<ProviderHealth> {
        self.dispatcher.provider_health()
    }
}

/// What a receipt did.
#[derive(Debug)]
pub enum ReceiptApplied {
    /// No attempt has this message id (yet: the receipt may have overtaken the provider's
    /// answer being recorded).
    UnknownMessage,
    /// Recorded on the attempt and its target; the delivery's status stands (or the engine,
    /// still holding the job, decides what follows).
    Recorded,
    /// It settled a SENT delivery: the final report, to publish.
    Concluded(Box<Report>),
}

/// The final status, headline reason and summary from the targets' results.
fn decide(report: &Report, verdict: Verdict) -> Outcome {
    // A "Don't Allow" is a security signal: it decides the outcome even when it came in while
    // the engine was already escalating.
    let denied = report
        .targets
        .iter()
        .any(|t| t.acknowledgement == Some(Acknowledgement::Denied));
    let verdict = if denied {
        Verdict::Failed(Some(FailureReason::UserDenied))
    } else {
        verdict
    };
    let (status, reason) = match verdict {
        Verdict::Reached => (DeliveryStatus::Sent, None),
        Verdict::Failed(Some(reason)) => (DeliveryStatus::Failed, Some(reason)),
        Verdict::Failed(None) => {
            let reason =
                headline_reason(&report.targets).unwrap_or(FailureReason::NoEligibleTarget);
            (DeliveryStatus::Failed, Some(reason))
        }
        Verdict::Deferred(_) => (DeliveryStatus::Deferred, Some(FailureReason::QuietHours)),
    };
    let status = if status == DeliveryStatus::Sent
        && report
            .targets
            .iter()
            .any(|t| t.status == TargetStatus::Delivered)
    {
        DeliveryStatus::Delivered
    } else {
        status
    };
    let summary = summarize(status, reason, report.expires_at, &report.targets);
    Outcome {
        status,
        reason,
        summary,
    }
}
