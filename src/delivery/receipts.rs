//! Delivery receipts from providers: handed to the engine that waits for them, or applied
//! through the ledger (and settling a SENT delivery).

use super::service::DeliveryService;
use crate::domain::{DeliveryStatus, FailureReason, Report, TargetStatus, headline_reason};
use crate::providers::ProviderReceipt;
use crate::store::{AttemptEnd, StoreError};

impl DeliveryService {
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
            awaits_receipt: false,
            next_retry_at: None,
            token_invalid_since: None,
        };
        let metrics = self.metrics();
        // The engine holding the job here waits for it: it records the receipt itself.
        let receipt = match self.receipts.hand_over(receipt.clone()) {
            Ok(()) => {
                metrics.receipt(&receipt.provider, Some(receipt.outcome));
                return Ok(ReceiptApplied::Recorded);
            }
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
            metrics.receipt(&receipt.provider, None);
            return Ok(ReceiptApplied::UnknownMessage);
        };
        metrics.receipt(&receipt.provider, Some(receipt.outcome));
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
