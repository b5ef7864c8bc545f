//! Acknowledgements from devices: SHOWN or DENIED, acted on by a running engine or settling a
//! SENT delivery.

use super::changes::ChangeWatch;
use super::service::DeliveryService;
use crate::domain::{
    Acknowledgement, AttemptOutcome, Channel, DeliveryId, DeliveryStatus, FailureReason, Report,
    TargetStatus, Verification,
};
use crate::store::{DeliveryKey, StoreError, TargetUpdate};

/// How long `AcknowledgeDelivery` on a running delivery waits for its engine to act, so that
/// the answer shows the outcome the acknowledgement led to.
const ACK_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

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

impl DeliveryService {
    /// Records that device `device_id` showed the code or that its user denied the request
    /// (SHOWN also verifies the delivery, as `ReportVerification` would). A running delivery's
    /// engine acts on it (DELIVERED, or USER_DENIED with no further
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
        // A code shown on the user's own device is push's conversion: the delivery is verified
        // (push has no number range: the fraud guard's counts are not touched).
        if ack == Acknowledgement::Shown
            && self
                .ledger
                .record_verification(
                    key,
                    Verification {
                        verified: true,
                        at: now,
                    },
                    now,
                )
                .await?
        {
            self.metrics().verified(&report.tenant, true);
        }
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
}
