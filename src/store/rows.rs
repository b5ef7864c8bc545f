//! Reading stored rows back into the domain, for either backend: each backend's row type says
//! how to read a text or an integer column ([`StoredRow`]); what a delivery, target, attempt,
//! block entry or rule row holds (and in which column, by each backend's `*_COLUMNS` lists) is
//! written here once.

use std::str::FromStr;
use std::time::Duration;

use jiff::Timestamp;

use crate::domain::{
    ApiKey, Attempt, FailureReason, Report, SmsEncoding, SmsShape, TargetResult, Verification,
    parse_scopes,
};
use crate::policy::{BlockEntry, BlockKind, Quarantine, QuietHoursRule, RateLimitRule};
use crate::store::StoreError;
use crate::store::shared::{ALL_TENANTS, quiet_rule};

/// A row of a ledger query, read by column position.
pub(crate) trait StoredRow {
    /// A text column.
    fn opt_text(&self, index: usize) -> Result<Option<String>, StoreError>;
    /// An integer column (whatever its width).
    fn opt_int(&self, index: usize) -> Result<Option<i64>, StoreError>;

    /// A text column that is never NULL.
    fn text(&self, index: usize) -> Result<String, StoreError> {
        self.opt_text(index)?
            .ok_or_else(|| StoreError::Corrupt(format!("column {index} is NULL")))
    }

    /// An integer column that is never NULL.
    fn int(&self, index: usize) -> Result<i64, StoreError> {
        self.opt_int(index)?
            .ok_or_else(|| StoreError::Corrupt(format!("column {index} is NULL")))
    }
}

/// A timestamp as stored: microseconds since the epoch.
pub(crate) fn micros(at: Timestamp) -> i64 {
    at.as_microsecond()
}

/// A stored timestamp.
pub(crate) fn timestamp(micros: i64) -> Result<Timestamp, StoreError> {
    Timestamp::from_microsecond(micros).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A stored name of a status, reason, channel...
pub(crate) fn parse<T: FromStr<Err = String>>(text: &str) -> Result<T, StoreError> {
    text.parse().map_err(StoreError::Corrupt)
}

pub(crate) fn parse_opt<T: FromStr<Err = String>>(
    text: Option<String>,
) -> Result<Option<T>, StoreError> {
    text.as_deref().map(parse).transpose()
}

fn parsed<T: FromStr<Err = String>>(row: &dyn StoredRow, index: usize) -> Result<T, StoreError> {
    parse(&row.text(index)?)
}

fn opt_timestamp(row: &dyn StoredRow, index: usize) -> Result<Option<Timestamp>, StoreError> {
    row.opt_int(index)?.map(timestamp).transpose()
}

/// `None` for "every tenant".
fn tenant_of(row: &dyn StoredRow, index: usize) -> Result<Option<String>, StoreError> {
    let tenant = row.text(index)?;
    Ok((tenant != ALL_TENANTS).then_some(tenant))
}

/// A delivery row (`tenant, job_id, account, purpose, status, reason, summary, created_at,
/// updated_at, expires_at, verified, verification_at`), without its targets.
pub(crate) fn report_from_row(row: &dyn StoredRow) -> Result<Report, StoreError> {
    let tenant = row.text(0)?;
    let job_id = row.text(1)?;
    let reason: Option<FailureReason> = parse_opt(row.opt_text(5)?)?;
    Ok(Report {
        delivery_id: format!("{tenant}/{job_id}"),
        tenant,
        job_id,
        account: row.text(2)?,
        purpose: row.text(3)?,
        status: parsed(row, 4)?,
        reason,
        hint: reason.map(FailureReason::hint),
        summary: row.text(6)?,
        created_at: timestamp(row.int(7)?)?,
        updated_at: timestamp(row.int(8)?)?,
        expires_at: timestamp(row.int(9)?)?,
        targets: Vec::new(),
        verification: match (row.opt_int(10)?, opt_timestamp(row, 11)?) {
            (Some(verified), Some(at)) => Some(Verification {
                verified: verified != 0,
                at,
            }),
            _ => None,
        },
    })
}

/// A target row (`idx, channel, label, platform, status, reason, detail, ack`), without its
/// attempts.
pub(crate) fn target_from_row(row: &dyn StoredRow) -> Result<TargetResult, StoreError> {
    let reason: Option<FailureReason> = parse_opt(row.opt_text(5)?)?;
    Ok(TargetResult {
        index: row.int(0)? as u32,
        channel: parsed(row, 1)?,
        target: row.text(2)?,
        platform: parse_opt(row.opt_text(3)?)?,
        status: parsed(row, 4)?,
        reason,
        hint: reason.map(FailureReason::hint),
        detail: row.opt_text(6)?,
        acknowledgement: parse_opt(row.opt_text(7)?)?,
        attempts: Vec::new(),
    })
}

/// An attempt row (`target_idx, provider, channel, masked_target, started_at, ended_at,
/// outcome, reason, provider_code, provider_message, retry, provider_message_id,
/// next_retry_at, token_invalid_since, sms_encoding, sms_segments`) and the index of its
/// target.
pub(crate) fn attempt_from_row(row: &dyn StoredRow) -> Result<(u32, Attempt), StoreError> {
    let sms = match (
        parse_opt::<SmsEncoding>(row.opt_text(14)?)?,
        row.opt_int(15)?,
    ) {
        (Some(encoding), Some(segments)) => Some(SmsShape {
            encoding,
            segments: segments as u32,
        }),
        _ => None,
    };
    let attempt = Attempt {
        provider: row.text(1)?,
        channel: parsed(row, 2)?,
        target: row.text(3)?,
        started_at: timestamp(row.int(4)?)?,
        ended_at: opt_timestamp(row, 5)?,
        outcome: parsed(row, 6)?,
        reason: parse_opt(row.opt_text(7)?)?,
        provider_code: row.opt_text(8)?,
        provider_message: row.opt_text(9)?,
        retry: row.int(10)? as u32,
        provider_message_id: row.opt_text(11)?,
        next_retry_at: opt_timestamp(row, 12)?,
        token_invalid_since: opt_timestamp(row, 13)?,
        sms,
    };
    Ok((row.int(0)? as u32, attempt))
}

/// A block entry row (`id, tenant, kind, pattern, source, note, created_at, expires_at,
/// shown`).
pub(crate) fn block_from_row(row: &dyn StoredRow) -> Result<BlockEntry, StoreError> {
    let kind: BlockKind = parsed(row, 2)?;
    let pattern = row.text(3)?;
    Ok(BlockEntry {
        id: row.int(0)?,
        tenant: tenant_of(row, 1)?,
        kind,
        // Prefixes and accounts have none (they are shown as they are).
        shown: row.opt_text(8)?.unwrap_or_else(|| kind.shown(&pattern)),
        pattern,
        source: parsed(row, 4)?,
        note: row.text(5)?,
        created_at: timestamp(row.int(6)?)?,
        expires_at: opt_timestamp(row, 7)?,
    })
}

/// A rate-limit rule row (`id, tenant, scope, prefix, max_sends, window_ms`).
pub(crate) fn rule_from_row(row: &dyn StoredRow) -> Result<RateLimitRule, StoreError> {
    Ok(RateLimitRule {
        id: row.int(0)?,
        tenant: tenant_of(row, 1)?,
        scope: parsed(row, 2)?,
        prefix: row.text(3)?,
        limit: row.int(4)? as u32,
        window: Duration::from_millis(row.int(5)? as u64),
    })
}

/// A quiet-hours rule row (`id, tenant, account, channels, start_time, end_time, days, action,
/// default_zone`).
pub(crate) fn quiet_from_row(row: &dyn StoredRow) -> Result<QuietHoursRule, StoreError> {
    quiet_rule(
        row.int(0)?,
        row.text(1)?,
        row.text(2)?,
        &row.text(3)?,
        &row.text(4)?,
        &row.text(5)?,
        &row.text(6)?,
        &row.text(7)?,
        row.text(8)?,
    )
}

/// The columns of an API key row, in [`api_key_from_row`]'s order (the same in both backends).
pub(crate) const API_KEY_COLUMNS: &str =
    "id, tenant, scopes, label, secret_hash, created_at, revoked_at";

/// An API key row ([`API_KEY_COLUMNS`]).
pub(crate) fn api_key_from_row(row: &dyn StoredRow) -> Result<ApiKey, StoreError> {
    Ok(ApiKey {
        id: row.text(0)?,
        tenant: tenant_of(row, 1)?,
        scopes: parse_scopes(&row.text(2)?).map_err(StoreError::Corrupt)?,
        label: row.text(3)?,
        secret_hash: row.text(4)?,
        created_at: timestamp(row.int(5)?)?,
        revoked_at: opt_timestamp(row, 6)?,
    })
}

/// The columns of a quarantine row, in the order [`quarantine_from_row`] reads them.
pub(crate) const QUARANTINE_COLUMNS: &str =
    "tenant, dest_range, state, since, until, mode, evidence, note, updated_at";

/// A quarantine row ([`QUARANTINE_COLUMNS`]).
pub(crate) fn quarantine_from_row(row: &dyn StoredRow) -> Result<Quarantine, StoreError> {
    Ok(Quarantine {
        tenant: row.text(0)?,
        range: row.text(1)?,
        state: parsed(row, 2)?,
        since: timestamp(row.int(3)?)?,
        until: opt_timestamp(row, 4)?,
        mode: parsed(row, 5)?,
        evidence: row
            .opt_text(6)?
            .map(|json| serde_json::from_str(&json))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("quarantine evidence: {e}")))?,
        note: row.text(7)?,
        updated_at: timestamp(row.int(8)?)?,
    })
}

/// A quarantine's evidence as stored (JSON).
pub(crate) fn evidence_json(quarantine: &Quarantine) -> Option<String> {
    quarantine
        .evidence
        .as_ref()
        .map(|e| serde_json::to_string(e).expect("evidence is plain numbers"))
}
