//! The delivery service: a job's claim, its policy context loaded once, the engine, and the
//! final report; what the queue consumer and the gRPC API call.

use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use tracing::instrument;

use super::changes::{ChangeNotices, ChangeWatch};
use super::circuits::ProviderHealth;
use super::decisions::decide;
use super::engine::{Dispatcher, Verdict};
use super::explain::Explanation;
use super::progress::{OwnWrites, Progress};
use super::receipt_waiters::ReceiptWaiters;
use crate::domain::{
    Channel, Clock, DeliveryId, DeliveryStatus, FailureReason, Job, Report, Target, mask_phone,
    summarize,
};
use crate::store::{
    Claim, DecideOutcome, DeliveryKey, KnownReport, Ledger, LedgerChange, NewDelivery, NewTarget,
    Outcome, StoreError,
};

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
    /// The job came back from the broker, but another replica holds the delivery under a lease
    /// until `until`: the job must come back then (its owner may have died).
    Leased {
        /// The report as it stands.
        report: Report,
        /// When the lease runs out.
        until: Timestamp,
    },
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
    pub(super) ledger: Arc<dyn Ledger>,
    /// The ledger's staged view: deliveries write through it; their writes are flushed before
    /// a retry's sleep or a wait for a device, and by [`DeliveryService::flush`] before the
    /// job is acked.
    pub(super) staged: Arc<dyn Ledger>,
    pub(super) dispatcher: Dispatcher,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) worker: String,
    /// The worker name and the host, as the status page names this replica.
    pub(super) replica: String,
    pub(super) changes: Arc<ChangeNotices>,
    pub(super) receipts: Arc<ReceiptWaiters>,
}

impl std::fmt::Debug for DeliveryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryService")
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
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
        if let Some(announced) = ledger.changes() {
            tokio::spawn(forward_changes(announced, Arc::downgrade(&changes)));
        }
        ledger
            .commit_watch()
            .set(Arc::clone(&dispatcher.metrics) as Arc<dyn crate::store::CommitObserver>);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        let replica = if host.is_empty() {
            worker.clone()
        } else {
            format!("{worker} on {host}")
        };
        DeliveryService {
            staged: ledger.staged(),
            replica,
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

    /// Who this replica is: its worker name (a delivery's owner in the ledger) and its host.
    pub fn replica(&self) -> &str {
        &self.replica
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
        // Staged, like every write of the delivery (see above). The job's policy context is read
        // meanwhile, once (the block list rides the ledger writer's next transaction).
        let now = self.clock.now();
        let (claim, context) = tokio::join!(
            self.staged.claim(&new, &self.worker, redelivered, now),
            self.dispatcher.policy_context(job, now)
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
            Claim::Leased { report, until } => {
                tracing::info!(%until, "another replica holds it under a lease: tried again when it runs out");
                return Ok(Handled::Leased { report, until });
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
                calls_in_flight: 0,
                known: prior.clone(),
                attempts: Vec::new(),
            }),
        };
        progress.changed();
        let verdict = self
            .dispatcher
            .dispatch(job, &prior.report, &context?, &progress)
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
        self.dispatcher.metrics.delivery_ended(&report);
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
    pub(super) async fn conclude(
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
        let report = self
            .close(self.ledger.as_ref(), key, Arc::new(outcome), None)
            .await?;
        self.dispatcher.metrics.delivery_settled(&report);
        Ok(report)
    }

    /// Writes the final outcome `decide` draws from the report as the ledger holds it (`known`,
    /// unless something else wrote), and returns the final report once `ledger` has it: on
    /// disk (with every write before it) through the durable ledger, committed through the
    /// staged one.
    pub(super) async fn close(
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

    /// The gateway's metrics (see [`crate::ops::metrics`]).
    pub fn metrics(&self) -> &Arc<crate::ops::Metrics> {
        &self.dispatcher.metrics
    }

    /// The fraud guard.
    pub fn fraud(&self) -> &Arc<super::FraudGuard> {
        &self.dispatcher.fraud
    }

    /// Every provider's circuit state and recent figures.
    pub fn provider_health(&self) -> Vec<ProviderHealth> {
        self.dispatcher.provider_health()
    }
}

/// Wakes the watchers of each delivery another replica changed (and every watcher when
/// announcements may have been missed), until the service is gone.
async fn forward_changes(
    mut announced: tokio::sync::broadcast::Receiver<LedgerChange>,
    changes: std::sync::Weak<ChangeNotices>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let change = announced.recv().await;
        let Some(changes) = changes.upgrade() else {
            return;
        };
        match change {
            Ok(LedgerChange::Delivery(id)) => changes.changed(&id),
            Ok(LedgerChange::Unknown) | Err(RecvError::Lagged(_)) => changes.changed_all(),
            Err(RecvError::Closed) => return,
        }
    }
}
