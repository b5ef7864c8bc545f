//! The PostgreSQL ledger's fraud-guard tables: the counts every replica adds to once a second
//! (recent 10-second buckets and hours, in one statement), and the quarantines.

use jiff::Timestamp;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Row};

use super::rows::micros;
use crate::policy::{DestinationCount, Quarantine, bucket_of, recent_bucket_of};
use crate::store::StoreError;
use crate::store::rows::{
    QUARANTINE_COLUMNS, evidence_json, quarantine_from_row, timestamp as stored_time,
};

/// Adds `counts` to their recent buckets and their hours. Each table gets one row per key, in
/// key order: replicas adding at once lock rows in the same order.
pub(super) async fn add_counts(
    pool: &PgPool,
    counts: &[DestinationCount],
) -> Result<(), StoreError> {
    if counts.is_empty() {
        return Ok(());
    }
    let tenants: Vec<&str> = counts.iter().map(|c| c.tenant.as_str()).collect();
    let ranges: Vec<&str> = counts.iter().map(|c| c.range.as_str()).collect();
    let recent: Vec<i64> = counts
        .iter()
        .map(|c| micros(recent_bucket_of(c.bucket)))
        .collect();
    let hours: Vec<i64> = counts.iter().map(|c| micros(bucket_of(c.bucket))).collect();
    let sends: Vec<i64> = counts.iter().map(|c| c.sends as i64).collect();
    let conversions: Vec<i64> = counts.iter().map(|c| c.conversions as i64).collect();
    sqlx::query(
        "WITH x AS (
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[],
                                  $5::bigint[], $6::bigint[])
                 AS x (tenant, dest_range, recent, hour, sends, conversions)
         ), recent AS (
             INSERT INTO destination_recent (tenant, dest_range, bucket, sends, conversions)
             SELECT tenant, dest_range, recent, sum(sends)::bigint, sum(conversions)::bigint
             FROM x GROUP BY tenant, dest_range, recent ORDER BY tenant, dest_range, recent
             ON CONFLICT (tenant, dest_range, bucket) DO UPDATE
             SET sends = destination_recent.sends + EXCLUDED.sends,
                 conversions = destination_recent.conversions + EXCLUDED.conversions
         )
         INSERT INTO destination_counts (tenant, dest_range, bucket, sends, conversions)
         SELECT tenant, dest_range, hour, sum(sends)::bigint, sum(conversions)::bigint
         FROM x GROUP BY tenant, dest_range, hour ORDER BY tenant, dest_range, hour
         ON CONFLICT (tenant, dest_range, bucket) DO UPDATE
         SET sends = destination_counts.sends + EXCLUDED.sends,
             conversions = destination_counts.conversions + EXCLUDED.conversions",
    )
    .bind(&tenants)
    .bind(&ranges)
    .bind(&recent)
    .bind(&hours)
    .bind(&sends)
    .bind(&conversions)
    .execute(pool)
    .await?;
    Ok(())
}

/// Counts of one tenant from `table`: the ranges starting with one of `prefixes`, from bucket
/// `since` on.
async fn counts(
    pool: &PgPool,
    table: &str,
    tenant: &str,
    prefixes: &[&str],
    since: i64,
) -> Result<Vec<DestinationCount>, StoreError> {
    let sql = format!(
        "SELECT tenant, dest_range, bucket, sends, conversions FROM {table}
         WHERE tenant = $1 AND dest_range ^@ ANY($2::text[]) AND bucket >= $3
         ORDER BY dest_range, bucket"
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(tenant)
        .bind(prefixes)
        .bind(since)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|row| {
            Ok(DestinationCount {
                tenant: row.try_get(0)?,
                range: row.try_get(1)?,
                bucket: stored_time(row.try_get(2)?)?,
                sends: row.try_get::<i64, _>(3)? as u64,
                conversions: row.try_get::<i64, _>(4)? as u64,
            })
        })
        .collect()
}

/// A tenant's hourly counts for the ranges starting with `prefix`, from `since`'s hour.
pub(super) async fn hourly_counts(
    pool: &PgPool,
    tenant: &str,
    prefix: &str,
    since: Timestamp,
) -> Result<Vec<DestinationCount>, StoreError> {
    let since = micros(bucket_of(since));
    counts(pool, "destination_counts", tenant, &[prefix], since).await
}

/// A tenant's recent counts for the ranges starting with one of `prefixes`, from `since`'s
/// 10-second bucket.
pub(super) async fn recent_counts(
    pool: &PgPool,
    tenant: &str,
    prefixes: &[String],
    since: Timestamp,
) -> Result<Vec<DestinationCount>, StoreError> {
    let since = micros(recent_bucket_of(since));
    let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
    counts(pool, "destination_recent", tenant, &prefixes, since).await
}

/// Forgets recent counts older than `before`.
pub(super) async fn prune_recent(pool: &PgPool, before: Timestamp) -> Result<u64, StoreError> {
    Ok(
        sqlx::query("DELETE FROM destination_recent WHERE bucket < $1")
            .bind(micros(before))
            .execute(pool)
            .await?
            .rows_affected(),
    )
}

/// Whether the tenant has a conversion counted from `since`'s hour on.
pub(super) async fn tenant_converts(
    pool: &PgPool,
    tenant: &str,
    since: Timestamp,
) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar::<_, i32>(
        "SELECT 1 FROM destination_counts WHERE tenant = $1 AND bucket >= $2 AND conversions > 0
         LIMIT 1",
    )
    .bind(tenant)
    .bind(micros(bucket_of(since)))
    .fetch_optional(pool)
    .await?
    .is_some())
}

/// Holds a range unless its row is settled; whether it was held now.
pub(super) async fn hold(pool: &PgPool, quarantine: &Quarantine) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "INSERT INTO quarantines (tenant, dest_range, state, since, until, mode, evidence, note, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $4)
         ON CONFLICT (tenant, dest_range) DO UPDATE
         SET state = EXCLUDED.state, since = EXCLUDED.since, until = EXCLUDED.until,
             mode = EXCLUDED.mode, evidence = EXCLUDED.evidence, note = EXCLUDED.note,
             updated_at = EXCLUDED.updated_at
         WHERE quarantines.until IS NOT NULL AND quarantines.until <= EXCLUDED.since",
    )
    .bind(&quarantine.tenant)
    .bind(&quarantine.range)
    .bind(quarantine.state.as_str())
    .bind(micros(quarantine.since))
    .bind(quarantine.until.map(micros))
    .bind(quarantine.mode.as_str())
    .bind(evidence_json(quarantine))
    .bind(&quarantine.note)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Pins a range (held until lifted).
pub(super) async fn pin(
    pool: &PgPool,
    tenant: &str,
    range: &str,
    note: &str,
    now: Timestamp,
) -> Result<Quarantine, StoreError> {
    let sql = format!(
        "INSERT INTO quarantines (tenant, dest_range, state, since, until, mode, evidence, note, updated_at)
         VALUES ($1, $2, 'held', $3, NULL, 'enforce', NULL, $4, $3)
         ON CONFLICT (tenant, dest_range) DO UPDATE
         SET since = CASE WHEN quarantines.state = 'held'
                           AND (quarantines.until IS NULL OR quarantines.until > EXCLUDED.since)
                          THEN quarantines.since ELSE EXCLUDED.since END,
             state = 'held', until = NULL, note = EXCLUDED.note, updated_at = EXCLUDED.updated_at
         RETURNING {QUARANTINE_COLUMNS}"
    );
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(tenant)
        .bind(range)
        .bind(micros(now))
        .bind(note)
        .fetch_one(pool)
        .await?;
    quarantine_from_row(&row)
}

/// Lifts a held range; the guard leaves it alone until `until`.
pub(super) async fn lift(
    pool: &PgPool,
    tenant: &str,
    range: &str,
    note: &str,
    now: Timestamp,
    until: Timestamp,
) -> Result<Option<Quarantine>, StoreError> {
    let sql = format!(
        "UPDATE quarantines SET state = 'lifted', until = $4, note = $5, updated_at = $3
         WHERE tenant = $1 AND dest_range = $2 AND state = 'held'
           AND (until IS NULL OR until > $3)
         RETURNING {QUARANTINE_COLUMNS}"
    );
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(tenant)
        .bind(range)
        .bind(micros(now))
        .bind(micros(until))
        .bind(note)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(|row| quarantine_from_row(row)).transpose()
}

/// Quarantines, of one tenant or all, newest first.
pub(super) async fn list(
    pool: &PgPool,
    tenant: Option<&str>,
) -> Result<Vec<Quarantine>, StoreError> {
    let sql = format!(
        "SELECT {QUARANTINE_COLUMNS} FROM quarantines WHERE $1::text IS NULL OR tenant = $1
         ORDER BY updated_at DESC, tenant, dest_range"
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(tenant)
        .fetch_all(pool)
        .await?;
    rows.iter().map(|row| quarantine_from_row(row)).collect()
}
