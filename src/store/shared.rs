//! What every backend shares: the key rate-limit counters are stored under, what a claim did
//! and the [`Claim`] it makes, and the decoding of stored rules.

use jiff::Timestamp;

use crate::domain::{DeliveryStatus, Report, TargetResult, TargetStatus};
use crate::policy::{
    QuietHoursRule, RateKey, RateLimitRule, RateLimited, parse_time_of_day, parse_weekday,
};
use crate::store::{Claim, DeliveryKey, KnownReport, NewDelivery, Revision, StoreError, as_stored};

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

    /// The acknowledgement tokens' key, derived from the same secret (so every replica of a
    /// shared ledger makes and checks the same tokens).
    pub(crate) fn ack_tokens(&self) -> crate::domain::AckTokens {
        let derived = ring::hmac::sign(&self.0, b"otp-gateway acknowledgement tokens v1");
        crate::domain::AckTokens::new(derived.as_ref())
    }

    /// The counters a send under `keys` touches, as stored: each rule, and its key's HMAC.
    pub(crate) fn counters(&self, keys: &[RateKey<'_>]) -> Vec<(RateLimitRule, String)> {
        keys.iter()
            .map(|k| (k.rule.clone(), self.of(&k.key)))
            .collect()
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
        verification: None,
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

/// What a claim did in a backend (the report is read after the commit).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Claimed {
    /// A new delivery, inserted as this worker's (at revision 0).
    Inserted(DeliveryKey),
    /// An ACCEPTED or DEFERRED delivery, now this worker's, at this revision.
    Taken(DeliveryKey, Revision),
    /// An IN_PROGRESS delivery taken over from a worker that is gone, at this revision.
    TakenOver(DeliveryKey, Revision),
    /// A redelivered job whose delivery another worker holds under a live lease, until then
    /// (a store replicas share).
    Leased(DeliveryKey, Timestamp),
    /// Finished, or held by another worker.
    Refused(DeliveryKey),
}

impl Claimed {
    /// The claim's result, reading the stored report with `load` where the claim did not make
    /// it (`new` was inserted at `now`).
    pub(crate) async fn into_claim<F, Fut>(
        self,
        new: &NewDelivery,
        now: Timestamp,
        load: F,
    ) -> Result<Claim, StoreError>
    where
        F: FnOnce(DeliveryKey) -> Fut,
        Fut: Future<Output = Result<Report, StoreError>>,
    {
        let known = |report, revision| KnownReport {
            report,
            revision,
            pending_end: None,
        };
        Ok(match self {
            Claimed::Inserted(key) => Claim::Started(key, known(fresh_report(new, now), 0)),
            Claimed::Taken(key, revision) => Claim::Started(key, known(load(key).await?, revision)),
            Claimed::TakenOver(key, revision) => {
                Claim::Resumed(key, known(load(key).await?, revision))
            }
            Claimed::Leased(key, until) => Claim::Leased {
                report: load(key).await?,
                until,
            },
            Claimed::Refused(key) => {
                let report = load(key).await?;
                if report.status.is_terminal() {
                    Claim::Finished(report)
                } else {
                    Claim::HeldElsewhere(report)
                }
            }
        })
    }
}

/// A stored quiet-hours rule from its columns: lists are comma-separated (`''` for all), times
/// local `HH:MM`, the tenant `*` for every tenant and the account `''` for every account.
#[allow(clippy::too_many_arguments)]
pub(crate) fn quiet_rule(
    id: i64,
    tenant: String,
    account: String,
    channels: &str,
    start: &str,
    end: &str,
    days: &str,
    action: &str,
    default_zone: String,
) -> Result<QuietHoursRule, StoreError> {
    let list = |text: &str| -> Vec<String> {
        text.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let time = |text: &str, name: &str| -> Result<jiff::civil::Time, StoreError> {
        parse_time_of_day(text).ok_or_else(|| StoreError::Corrupt(format!("{name} `{text}`")))
    };
    Ok(QuietHoursRule {
        id,
        tenant: (tenant != ALL_TENANTS).then_some(tenant),
        account: (!account.is_empty()).then_some(account),
        channels: list(channels)
            .iter()
            .map(|c| c.parse().map_err(StoreError::Corrupt))
            .collect::<Result<_, _>>()?,
        start: time(start, "start_time")?,
        end: time(end, "end_time")?,
        days: list(days)
            .iter()
            .map(|d| parse_weekday(d).ok_or_else(|| StoreError::Corrupt(format!("day `{d}`"))))
            .collect::<Result<_, _>>()?,
        action: action.parse().map_err(StoreError::Corrupt)?,
        default_zone,
    })
}

/// The stored form of "every tenant".
pub(crate) const ALL_TENANTS: &str = "*";

/// Whether a counter of `rule` holding `hits` sends in its window (the oldest at `oldest`,
/// microseconds since the epoch) is at the rule's limit at `now`; if so, when it frees up.
pub(crate) fn at_limit(
    rule: &RateLimitRule,
    hits: i64,
    oldest: Option<i64>,
    now: Timestamp,
) -> Result<Option<RateLimited>, StoreError> {
    if hits < rule.limit as i64 {
        return Ok(None);
    }
    let window = jiff::SignedDuration::try_from(rule.window).unwrap_or(jiff::SignedDuration::MAX);
    let oldest = oldest
        .map(|micros| {
            Timestamp::from_microsecond(micros).map_err(|e| StoreError::Corrupt(e.to_string()))
        })
        .transpose()?;
    Ok(Some(RateLimited {
        rule: rule.clone(),
        allowed_at: oldest.unwrap_or(now) + window,
    }))
}

/// One page of `keys` (fetched one beyond `limit`): the page, and the key to continue before.
pub(crate) fn page(
    mut keys: Vec<DeliveryKey>,
    limit: i64,
) -> (Vec<DeliveryKey>, Option<DeliveryKey>) {
    if keys.len() as i64 > limit {
        keys.truncate(limit as usize);
        let next = keys.last().copied();
        (keys, next)
    } else {
        (keys, None)
    }
}
