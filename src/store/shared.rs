//! What every backend shares: the key rate-limit counters are stored under, and the report of
//! a delivery just claimed.

use jiff::Timestamp;

use crate::domain::{DeliveryStatus, Report, TargetResult, TargetStatus};
use crate::store::{NewDelivery, StoreError, as_stored};

/// The key rate-limit counters are stored under: an HMAC-SHA256 of the counter's key (a
/// number, token, account, …) under a random secret kept in the ledger, so the counters hold no
/// send history of a person in clear.
pub(crate) struct RateCounterKey(ring::hmac::Key);

impl std::fmt::Debug for RateCounterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RateCounterKey(redacted)")
    }
}

impl RateCounterKey {
    /// The key under the ledger's secret.
    pub(crate) fn new(secret: &[u8]) -> Self {
        RateCounterKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }

    /// 32 random bytes, for a ledger's first secret.
    pub(crate) fn fresh_secret() -> Result<[u8; 32], StoreError> {
        let mut fresh = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut fresh).map_err(
            |_| StoreError::Corrupt("no randomness for the rate-counter key".to_owned()),
        )?;
        Ok(fresh)
    }

    /// The stored form of `key` (128 bits of the HMAC, hex).
    pub(crate) fn of(&self, key: &str) -> String {
        let tag = ring::hmac::sign(&self.0, key.as_bytes());
        tag.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The report of a delivery just inserted as IN_PROGRESS, as the ledger reads it back: no
/// attempts, every target pending.
pub(crate) fn fresh_report(new: &NewDelivery, now: Timestamp) -> Report {
    Report {
        delivery_id: new.id.to_string(),
        tenant: new.id.tenant.clone(),
        job_id: new.id.job_id.clone(),
        account: new.account.clone(),
        purpose: new.purpose.clone(),
        status: DeliveryStatus::InProgress,
        reason: None,
        hint: None,
        summary: String::new(),
        created_at: now,
        updated_at: now,
        expires_at: as_stored(new.expires_at),
        targets: new
            .targets
            .iter()
            .enumerate()
            .map(|(index, target)| TargetResult {
                index: index as u32,
                channel: target.channel,
                target: target.label.clone(),
                platform: target.platform,
                status: TargetStatus::Pending,
                reason: None,
                hint: None,
                detail: None,
                acknowledgement: None,
                attempts: Vec::new(),
            })
            .collect(),
    }
}
