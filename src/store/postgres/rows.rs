//! Reading the PostgreSQL ledger: whole reports, and its rows read as [`StoredRow`]s (the
//! mappers are the store's, shared with SQLite). Columns are read by position in the order
//! each `*_COLUMNS` list gives.

use sqlx::AssertSqlSafe;
use sqlx::postgres::PgRow;
use sqlx::{Column, PgConnection, Row, TypeInfo};

use crate::domain::Report;
use crate::store::rows::{StoredRow, attempt_from_row, report_from_row, target_from_row};
use crate::store::{DeliveryKey, StoreError};

pub(super) use crate::store::rows::{
    block_from_row, micros, quiet_from_row, rule_from_row, timestamp,
};
pub(super) use crate::store::shared::ALL_TENANTS;

pub(super) const DELIVERY_COLUMNS: &str = "tenant, job_id, account, purpose, status, reason, summary, created_at, updated_at, expires_at, \
     verified, verification_at";
const TARGET_COLUMNS: &str = "idx, channel, label, platform, status, reason, detail, ack";
const ATTEMPT_COLUMNS: &str = "target_idx, provider, channel, masked_target, started_at, ended_at, outcome, reason, \
     provider_code, provider_message, retry, provider_message_id, next_retry_at, token_invalid_since, sms_encoding, \
     sms_segments";
pub(super) const BLOCK_COLUMNS: &str =
    "id, tenant, kind, pattern, source, note, created_at, expires_at, shown";
pub(super) const RULE_COLUMNS: &str = "id, tenant, scope, prefix, max_sends, window_ms";
pub(super) const QUIET_COLUMNS: &str =
    "id, tenant, account, channels, start_time, end_time, days, action, default_zone";

impl StoredRow for PgRow {
    fn opt_text(&self, index: usize) -> Result<Option<String>, StoreError> {
        Ok(self.try_get(index)?)
    }

    fn opt_int(&self, index: usize) -> Result<Option<i64>, StoreError> {
        // Indexes, retries and segment counts are INTEGER; a verification SMALLINT; keys, times
        // and limits BIGINT.
        match self.try_column(index)?.type_info().name() {
            "INT4" => Ok(self.try_get::<Option<i32>, _>(index)?.map(i64::from)),
            "INT2" => Ok(self.try_get::<Option<i16>, _>(index)?.map(i64::from)),
            _ => Ok(self.try_get(index)?),
        }
    }
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
