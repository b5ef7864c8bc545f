//! The SMS and voice stages: eligible numbers in order until one accepts, and after a carrier
//! accepted, the wait for its failure receipt (the chain goes on when one comes).

use jiff::Timestamp;
use tokio::time::Instant;

use super::decisions::{Standing, standing_after};
use super::engine::{AwaitedReceipt, Dispatcher, Run, StageEnd, TargetEnd};
use super::gate::Gate;
use super::progress::Progress;
use crate::domain::{AttemptOutcome, Channel, FailureReason, Target, TargetStatus};
use crate::store::{AttemptEnd, StoreError};

impl Dispatcher {
    /// After a provider that sends receipts accepted an SMS or call: waits up to the receipt
    /// wait (never past the deadline) for its receipt. Returns the reason when a failure receipt
    /// came (the chain goes on), `None` when it was delivered or nothing came in time (a
    /// later receipt only updates the report). A receipt reaching this process is handed
    /// straight to this wait and recorded among the engine's own writes; one applied through
    /// the ledger (before the wait began, or at another replica) is seen on the target.
    pub(super) async fn await_failure_receipt(
        &self,
        index: usize,
        channel: Channel,
        mut awaited: AwaitedReceipt,
        deadline: Timestamp,
        progress: &Progress<'_>,
    ) -> Result<Option<FailureReason>, StoreError> {
        let left = progress.time_left(deadline);
        let wait = self.settings.receipt_wait.min(left);
        if wait.is_zero() {
            return self.take_handed(awaited, index, channel, progress).await;
        }
        let until = Instant::now() + wait;
        let mut handed_open = true;
        progress.flush().await?;
        let mut changes = progress.watch();
        loop {
            // Only this target's state: a receipt applied through the ledger settles it.
            match progress
                .ledger
                .target_state(progress.key, index as u32)
                .await?
            {
                Some((TargetStatus::Delivered, _)) => return Ok(None),
                Some((TargetStatus::Failed, reason)) => {
                    return Ok(Some(reason.unwrap_or(FailureReason::Undeliverable)));
                }
                _ => {}
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {
                    return self.take_handed(awaited, index, channel, progress).await;
                }
                _ = changes.changed() => {}
                receipt = &mut awaited.wait.receipt, if handed_open => match receipt {
                    Ok(receipt) => {
                        return self
                            .record_receipt(receipt, &awaited, index, channel, progress)
                            .await;
                    }
                    Err(_) => handed_open = false,
                },
            }
        }
    }

    /// The receipt handed to this wait already, if one was (recorded), as the wait ends.
    pub(super) async fn take_handed(
        &self,
        mut awaited: AwaitedReceipt,
        index: usize,
        channel: Channel,
        progress: &Progress<'_>,
    ) -> Result<Option<FailureReason>, StoreError> {
        match awaited.wait.receipt.try_recv() {
            Ok(receipt) => {
                self.record_receipt(receipt, &awaited, index, channel, progress)
                    .await
            }
            Err(_) => Ok(None),
        }
    }

    /// Records a receipt handed to the engine on its attempt and target (among its own writes);
    /// the reason when it says the message failed.
    pub(super) async fn record_receipt(
        &self,
        receipt: crate::providers::ProviderReceipt,
        awaited: &AwaitedReceipt,
        index: usize,
        channel: Channel,
        progress: &Progress<'_>,
    ) -> Result<Option<FailureReason>, StoreError> {
        let end = AttemptEnd {
            ended_at: progress.now(),
            outcome: receipt.outcome,
            reason: receipt.reason,
            provider_code: receipt.code,
            provider_message: Some(receipt.detail),
            provider_message_id: Some(awaited.message_id.clone()),
            awaits_receipt: true,
            next_retry_at: None,
            token_invalid_since: None,
        };
        self.finish_call(awaited.attempt, &end, index, channel, progress)
            .await?;
        Ok(match receipt.outcome {
            AttemptOutcome::Failed => Some(receipt.reason.unwrap_or(FailureReason::Undeliverable)),
            _ => None,
        })
    }

    /// SMS or voice stage: eligible numbers in order until one accepts.
    pub(super) async fn phone_stage(
        &self,
        run: Run<'_>,
        channel: Channel,
        standing: &mut [Standing],
        progress: &Progress<'_>,
    ) -> Result<StageEnd, StoreError> {
        let Run {
            job,
            prior,
            deadline,
            ..
        } = run;
        for (index, target) in job.targets.iter().enumerate() {
            if !matches!(standing[index], Standing::Open | Standing::Tried)
                || !matches!(target, Target::Phone(_))
            {
                continue;
            }
            match self.gate(run, index, channel, progress).await? {
                Gate::Go => {}
                Gate::NotThisChannel => {
                    // The next channel may still reach the number.
                    standing[index] = Standing::Tried;
                    continue;
                }
                Gate::Closed => {
                    standing[index] = Standing::Closed;
                    continue;
                }
                Gate::JobLimited => return Ok(StageEnd::JobLimited),
            }
            match self
                .deliver_to_target(job, prior, index, channel, deadline, progress)
                .await?
            {
                TargetEnd::Accepted { receipt } => {
                    if let Some(awaited) = receipt
                        && let Some(reason) = self
                            .await_failure_receipt(index, channel, awaited, deadline, progress)
                            .await?
                    {
                        // The carrier could not deliver it: on to the next number, or to the
                        // next channel for this one unless the number itself is wrong.
                        tracing::info!(target = index, %reason, "failure receipt: the chain goes on");
                        standing[index] = standing_after(reason);
                        continue;
                    }
                    standing[index] = Standing::Reached;
                    return Ok(StageEnd::Reached);
                }
                TargetEnd::Recipient { reason } => standing[index] = standing_after(reason),
                TargetEnd::Providers { reason, detail } => {
                    // The next number may route elsewhere; this one may work on the next channel.
                    standing[index] = Standing::Tried;
                    self.fail(index, channel, reason, detail, progress).await?;
                }
                TargetEnd::Expired { detail } => {
                    standing[index] = Standing::Closed;
                    self.fail(index, channel, FailureReason::CodeExpired, detail, progress)
                        .await?;
                    return Ok(StageEnd::Expired);
                }
            }
        }
        Ok(StageEnd::NotReached)
    }
}
