//! Conversion feedback: upstream reports whether the user entered the code (`ReportVerification`,
//! or a verification message on the jobs exchange). The fraud guard learns from it which
//! destinations' codes are used.

use jiff::{SignedDuration, Timestamp};

use super::service::DeliveryService;
use crate::domain::{DeliveryId, JobError, Report, Verification};
use crate::store::StoreError;

/// How far ahead of the gateway's clock a report's time may be (the reporter's clock may run a
/// little fast).
const CLOCK_SKEW: SignedDuration = SignedDuration::from_mins(5);

/// Why a verification report was refused.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The ledger failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No such delivery.
    #[error("no delivery {0}")]
    UnknownDelivery(String),
    /// A field of the report is wrong.
    #[error("{0}")]
    Invalid(JobError),
}

impl DeliveryService {
    /// Records that the user of delivery `id` entered the code (`verified`) or failed to, at
    /// `at` (default: now): the report as it stands after, and whether the report changed it (a
    /// verified delivery stays verified).
    pub async fn report_verification(
        &self,
        id: &DeliveryId,
        verified: bool,
        at: Option<Timestamp>,
    ) -> Result<(Report, bool), VerifyError> {
        let now = self.clock().now();
        let ledger = self.ledger();
        let key = ledger
            .key(id)
            .await?
            .ok_or_else(|| VerifyError::UnknownDelivery(id.to_string()))?;
        let at = at.unwrap_or(now);
        if at > now + CLOCK_SKEW {
            return Err(VerifyError::Invalid(JobError::new(
                "at",
                format!("{at} is in the future (the gateway's clock says {now})"),
            )));
        }
        let before = ledger.report(key).await?;
        // The ledger keeps whole microseconds; a report in the delivery's first microsecond
        // is not before it.
        if at < before.created_at - SignedDuration::from_micros(1) {
            return Err(VerifyError::Invalid(JobError::new(
                "at",
                format!(
                    "{at} is before the delivery was made ({})",
                    before.created_at
                ),
            )));
        }
        let changed = ledger
            .record_verification(key, Verification { verified, at }, now)
            .await?;
        let report = if changed {
            ledger.report(key).await?
        } else {
            before
        };
        if changed {
            self.metrics().verified(&report.tenant, verified);
            // A conversion for each range the delivery's code went to, in the hour it was sent.
            if verified {
                for (range, sent_at) in ledger.sent_ranges(key).await? {
                    self.fraud()
                        .counter()
                        .converted(&report.tenant, &range, sent_at);
                }
            }
        }
        Ok((report, changed))
    }
}
