//! Reading the PostgreSQL ledger: row mappers and whole reports. Columns are read by position
//! in the order each `*_COLUMNS` list gives.

use std::str::FromStr;
use std::time::Duration;

use jiff::Timestamp;
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use crate::domain::{
    Attempt, FailureReason, Report, SmsEncoding, SmsShape, TargetResult, TargetStatus,
};
use crate::policy::{BlockEntry, QuietHoursRule, RateLimitRule};
use crate::store::{DeliveryKey, StoreError};

pub(super) use crate::store::shared::ALL_TENANTS;

pub(super) const DELIVERY_COLUMNS: &str =
    "tenant, job_id, account, purpose, status, reason, summary, created_at, updated_at, expires_at";
const TARGET_COLUMNS: &str = "idx, channel, label, platform, status, reason, detail, ack";
const ATTEMPT_COLUMNS: &str = "target_idx, provider, channel, masked_target, started_at, ended_at, outcome, reason, \
     provider_code, provider_message, retry, provider_message_id, next_retry_at, token_invalid_since, sms_encoding, \
     sms_segments";
pub(super) const BLOCK_COLUMNS: &str =
    "id, tenant, kind, pattern, source, note, created_at, expires_at";
pub(super) const RULE_COLUMNS: &str = "id, tenant, scope, prefix, max_sends, window_ms";
pub(super) const QUIET_COLUMNS: &str =
    "id, tenant, account, channels, start_time, end_time, days, action, default_zone";

/// A timestamp as stored: microseconds since the epoch.
pub(super) fn micros(at: Timestamp) -> i64 {
    at.as_microsecond()
}

pub(super) fn timestamp(micros: i64) -> Result<Timestamp, StoreError> {
    Timestamp::from_microsecond(micros).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn parse<T: FromStr<Err = String>>(text: &str) -> Result<T, StoreError> {
    text.parse().map_err(StoreError::Corrupt)
}

fn parse_opt<T: FromStr<Err = String>>(text: Option<String>) -> Result<Option<T>, StoreError> {
    text.as_deref().map(parse).transpose()
}

fn column<'r, T>(row: &'r PgRow, index: usize) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    Ok(row.try_get(index)?)
}

fn opt_timestamp(row: &PgRow, index: usize) -> Result<Option<Timestamp>, StoreError> {
    column::<Option<i64>>(row, index)?
        .map(timestamp)
        .transpose()
}

/// `None` for "every tenant".
fn tenant_of(row: &PgRow, index: usize) -> Result<Option<String>, StoreError> {
    let tenant: String = column(row, index)?;
    Ok((tenant != ALL_TENANTS).then_some(tenant))
}

fn attempt_from_row(row: &PgRow) -> Result<(u32, Attempt), StoreError> {
    let sms = match (
        parse_opt::<SmsEncoding>(column(row, 14)?)?,
        column::<Option<i32>>(row, 15)?,
    ) {
        (Some(encoding), Some(segments)) => Some(SmsShape {
            encoding,
            segments: segments as u32,
        }),
        _ => None,
    };
    let attempt = Attempt {
        provider: column(row, 1)?,
        channel: parse(&column::<String>(row, 2)?)?,
        target: column(row, 3)?,
        started_at: timestamp(column(row, 4)?)?,
        ended_at: opt_timestamp(row, 5)?,
        outcome: parse(&column::<String>(row, 6)?)?,
        reason: parse_opt(column(row, 7)?)?,
        provider_code: column(row, 8)?,
        provider_message: column(row, 9)?,
        retry: column::<i32>(row, 10)? as u32,
        provider_message_id: column(row, 11)?,
        next_retry_at: opt_timestamp(row, 12)?,
        token_invalid_since: opt_timestamp(row, 13)?,
        sms,
    };
    Ok((column::<i32>(row, 0)? as u32, attempt))
}

fn target_from_row(row: &PgRow) -> Result<TargetResult, StoreError> {
    let reason: Option<FailureReason> = parse_opt(column(row, 5)?)?;
    Ok(TargetResult {
        index: column::<i32>(row, 0)? as u32,
        channel: parse(&column::<String>(row, 1)?)?,
        target: column(row, 2)?,
        platform: parse_opt(column(row, 3)?)?,
        status: parse::<TargetStatus>(&column::<String>(row, 4)?)?,
        reason,
        hint: reason.map(FailureReason::hint),
        detail: column(row, 6)?,
        acknowledgement: parse_opt(column(row, 7)?)?,
        attempts: Vec::new(),
    })
}

pub(super) fn report_from_row(row: &PgRow) -> Result<Report, StoreError> {
    let tenant: String = column(row, 0)?;
    let job_id: String = column(row, 1)?;
    let reason: Option<FailureReason> = parse_opt(column(row, 5)?)?;
    Ok(Report {
        delivery_id: format!("{tenant}/{job_id}"),
        tenant,
        job_id,
        account: column(row, 2)?,
        purpose: column(row, 3)?,
        status: parse(&column::<String>(row, 4)?)?,
        reason,
        hint: reason.map(FailureReason::hint),
        summary: column(row, 6)?,
        created_at: timestamp(column(row, 7)?)?,
        updated_at: timestamp(column(row, 8)?)?,
        expires_at: timestamp(column(row, 9)?)?,
        targets: Vec::new(),
    })
}

/// The report of one delivery (its row, targets and attempts), if known. Run inside a
/// transaction when it must be consistent with a write.
pub(super) async fn load(
    conn: &mut PgConnection,
    key: DeliveryKey,
) -> Result<Option<Report>, StoreError> {
    let sql = format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = $1");
    let Some(row) = sqlx::query(AssertSqlSafe(sql))
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let mut report = report_from_row(&row)?;
    let sql = format!("SELECT {TARGET_COLUMNS} FROM targets WHERE delivery = $1 ORDER BY idx");
    for row in sqlx::query(AssertSqlSafe(sql))
        .bind(key)
        .fetch_all(&mut *conn)
        .await?
    {
        report.targets.push(target_from_row(&row)?);
    }
    let sql = format!(
        "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE delivery = $1 ORDER BY target_idx, id"
    );
    for row in sqlx::query(AssertSqlSafe(sql))
        .bind(key)
        .fetch_all(&mut *conn)
        .await?
    {
        let (index, attempt) = attempt_from_row(&row)?;
        if let Some(target) = report.targets.iter_mut().find(|t| t.index == index) {
            target.attempts.push(attempt);
        }
    }
    Ok(Some(report))
}

pub(super) fn block_from_row(row: &PgRow) -> Result<BlockEntry, StoreError> {
    Ok(BlockEntry {
        id: column(row, 0)?,
        tenant: tenant_of(row, 1)?,
        kind: parse(&column::<String>(row, 2)?)?,
        pattern: column(row, 3)?,
        source: parse(&column::<String>(row, 4)?)?,
        note: column(row, 5)?,
        created_at: timestamp(column(row, 6)?)?,
        expires_at: opt_timestamp(row, 7)?,
    })
}

pub(super) fn rule_from_row(row: &PgRow) -> Result<RateLimitRule, StoreError> {
    Ok(RateLimitRule {
        id: column(row, 0)?,
        tenant: tenant_of(row, 1)?,
        scope: parse(&column::<String>(row, 2)?)?,
        prefix: column(row, 3)?,
        limit: column::<i64>(row, 4)? as u32,
        window: Duration::from_millis(column::<i64>(row, 5)? as u64),
    })
}

pub(super) fn quiet_from_row(row: &PgRow) -> Result<QuietHoursRule, StoreError> {
    let text = |index: usize| column::<String>(row, index);
    crate::store::shared::quiet_rule(
        column(row, 0)?,
        text(1)?,
        text(2)?,
        &text(3)?,
        &text(4)?,
        &text(5)?,
        &text(6)?,
        &text(7)?,
        text(8)?,
    )
}
