//! The SQLite ledger's reads: plain functions of a reader connection (rusqlite, cached
//! statements); its rows are read as [`StoredRow`]s by the store's mappers (shared with
//! PostgreSQL, and with the writes for `RETURNING`). A reader connection is
//! used on the calling thread: these are indexed lookups of a few rows, cheaper than handing
//! them to another thread and back (which is what bounded the gateway before).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};

use crate::domain::{
    Acknowledgement, ApiKey, DeliveryId, DeliveryStatus, FailureReason, Report, TargetStatus,
};
use crate::policy::{
    BlockEntry, DestinationCount, Quarantine, QuietHoursRule, RateLimitRule, RateLimited,
    bucket_of, recent_bucket_of,
};
use crate::store::rows::{
    API_KEY_COLUMNS, QUARANTINE_COLUMNS, StoredRow, api_key_from_row, attempt_from_row, parse,
    parse_opt, quarantine_from_row, report_from_row, target_from_row, timestamp,
};
use crate::store::{DeliveryKey, ListPage, ListQuery, StoreError};

pub(super) use crate::store::rows::{block_from_row, micros, quiet_from_row, rule_from_row};

/// The columns each mapper below reads, in its order (rows are read by position: looking
/// columns up by name costs a walk through the names for every value).
macro_rules! delivery_columns {
    () => {
        "tenant, job_id, account, purpose, status, reason, summary, created_at, updated_at, expires_at, verified, verification_at"
    };
}
macro_rules! target_columns {
    () => {
        "idx, channel, label, platform, status, reason, detail, ack"
    };
}
macro_rules! attempt_columns {
    () => {
        "target_idx, provider, channel, masked_target, started_at, ended_at, outcome, reason, provider_code,
         provider_message, retry, provider_message_id, next_retry_at, token_invalid_since, sms_encoding,
         sms_segments"
    };
}
macro_rules! block_columns {
    () => {
        "id, tenant, kind, pattern, source, note, created_at, expires_at, shown"
    };
}
macro_rules! rule_columns {
    () => {
        "id, tenant, scope, prefix, max_sends, window_ms"
    };
}
macro_rules! quiet_columns {
    () => {
        "id, tenant, account, channels, start_time, end_time, days, action, default_zone"
    };
}
pub(super) use {block_columns, quiet_columns, rule_columns};

pub(super) use crate::store::shared::ALL_TENANTS;

/// Idle reader connections kept for reuse (more are opened while more readers run at once).
const MAX_IDLE_READERS: usize = 4;

/// Read-only connections to the ledger, reused.
#[derive(Debug)]
pub(super) struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    /// Readers of the (migrated) database at `path`; one connection is opened now, so a bad
    /// path fails here rather than at the first read.
    pub(super) fn open(path: &Path) -> Result<Self, StoreError> {
        let first = open_reader(path)?;
        Ok(Readers {
            path: path.to_path_buf(),
            idle: Mutex::new(vec![first]),
        })
    }

    /// Runs `read` on an idle connection (or a new one) on this thread.
    pub(super) fn with<T>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let taken = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let connection = match taken {
            Some(connection) => connection,
            None => open_reader(&self.path)?,
        };
        let result = read(&connection);
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_READERS {
            idle.push(connection);
        }
        result
    }
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.busy_timeout(Duration::from_secs(10))?;
    connection.set_prepared_statement_cache_capacity(32);
    Ok(connection)
}

impl StoredRow for Row<'_> {
    fn opt_text(&self, index: usize) -> Result<Option<String>, StoreError> {
        Ok(self.get(index)?)
    }

    fn opt_int(&self, index: usize) -> Result<Option<i64>, StoreError> {
        Ok(self.get(index)?)
    }
}

/// The key of a delivery, if known.
pub(super) fn key_of(
    conn: &Connection,
    id: &DeliveryId,
) -> Result<Option<DeliveryKey>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT id FROM deliveries WHERE tenant = ? AND job_id = ?")?
        .query_row(params![id.tenant, id.job_id], |row| row.get(0))
        .optional()?)
}

/// The report of one delivery: its row, its targets and every attempt, if known.
/// One target's status and reason.
pub(super) fn target_state(
    conn: &Connection,
    key: DeliveryKey,
    index: u32,
) -> Result<Option<(TargetStatus, Option<FailureReason>)>, StoreError> {
    let row: Option<(String, Option<String>)> = conn
        .prepare_cached("SELECT status, reason FROM targets WHERE delivery = ? AND idx = ?")?
        .query_row(params![key, index as i64], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .optional()?;
    row.map(|(status, reason)| Ok((parse(&status)?, parse_opt(reason)?)))
        .transpose()
}

pub(super) fn load(conn: &Connection, key: DeliveryKey) -> Result<Option<Report>, StoreError> {
    let mut statement = conn.prepare_cached(concat!(
        "SELECT ",
        delivery_columns!(),
        " FROM deliveries WHERE id = ?"
    ))?;
    let mut rows = statement.query([key])?;
    let Some(row) = rows.next()? else {
        return Ok(None);
    };
    let mut report = report_from_row(row)?;
    drop(rows);
    let mut statement = conn.prepare_cached(concat!(
        "SELECT ",
        target_columns!(),
        " FROM targets WHERE delivery = ? ORDER BY idx"
    ))?;
    let mut rows = statement.query([key])?;
    while let Some(row) = rows.next()? {
        report.targets.push(target_from_row(row)?);
    }
    let mut statement = conn.prepare_cached(concat!(
        "SELECT ",
        attempt_columns!(),
        " FROM attempts WHERE delivery = ? ORDER BY target_idx, id"
    ))?;
    let mut rows = statement.query([key])?;
    while let Some(row) = rows.next()? {
        let (index, attempt) = attempt_from_row(row)?;
        if let Some(target) = report.targets.iter_mut().find(|t| t.index == index) {
            target.attempts.push(attempt);
        }
    }
    Ok(Some(report))
}

/// The ranges of a delivery's accepted SMS and calls, with their start.
pub(super) fn sent_ranges(
    conn: &Connection,
    key: DeliveryKey,
) -> Result<Vec<(String, Timestamp)>, StoreError> {
    let mut statement = conn.prepare_cached(
        "SELECT dest_range, started_at FROM attempts
         WHERE delivery = ? AND dest_range IS NOT NULL AND outcome IN ('SENT', 'DELIVERED')
         ORDER BY id",
    )?;
    let mut rows = statement.query([key])?;
    let mut ranges = Vec::new();
    while let Some(row) = rows.next()? {
        ranges.push((row.get::<_, String>(0)?, timestamp(row.get(1)?)?));
    }
    Ok(ranges)
}

/// A tenant's hourly fraud-guard counts for the ranges starting with `prefix`, from `since`'s
/// hour.
pub(super) fn destination_counts(
    conn: &Connection,
    tenant: &str,
    prefix: &str,
    since: Timestamp,
) -> Result<Vec<DestinationCount>, StoreError> {
    counts(
        conn,
        "destination_counts",
        tenant,
        &[prefix],
        bucket_of(since),
    )
}

/// One tenant's recent counts for the ranges starting with one of `prefixes`, from the
/// 10-second bucket holding `since`.
pub(super) fn recent_destination_counts(
    conn: &Connection,
    tenant: &str,
    prefixes: &[String],
    since: Timestamp,
) -> Result<Vec<DestinationCount>, StoreError> {
    let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
    counts(
        conn,
        "destination_recent",
        tenant,
        &prefixes,
        recent_bucket_of(since),
    )
}

/// A tenant's counts in `table` for the ranges starting with one of `prefixes`, from bucket
/// `since` on.
fn counts(
    conn: &Connection,
    table: &str,
    tenant: &str,
    prefixes: &[&str],
    since: Timestamp,
) -> Result<Vec<DestinationCount>, StoreError> {
    let mut statement = conn.prepare_cached(&format!(
        "SELECT tenant, dest_range, bucket, sends, conversions FROM {table}
         WHERE tenant = ?1 AND substr(dest_range, 1, length(?2)) = ?2 AND bucket >= ?3
         ORDER BY dest_range, bucket"
    ))?;
    let mut counts = Vec::new();
    for prefix in prefixes {
        let mut rows = statement.query(params![tenant, prefix, micros(since)])?;
        while let Some(row) = rows.next()? {
            counts.push(count_from_row(row)?);
        }
    }
    Ok(counts)
}

/// A `tenant, dest_range, bucket, sends, conversions` row.
fn count_from_row(row: &Row<'_>) -> Result<DestinationCount, StoreError> {
    Ok(DestinationCount {
        tenant: row.get(0)?,
        range: row.get(1)?,
        bucket: timestamp(row.get(2)?)?,
        sends: row.get::<_, i64>(3)? as u64,
        conversions: row.get::<_, i64>(4)? as u64,
    })
}

/// Whether `tenant` has a conversion counted in an hour from `since`'s on.
pub(super) fn tenant_converts(
    conn: &Connection,
    tenant: &str,
    since: Timestamp,
) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM destination_counts WHERE tenant = ?1 AND bucket >= ?2 AND conversions > 0
             LIMIT 1",
        )?
        .query_row(params![tenant, micros(bucket_of(since))], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Quarantines, of one tenant or all, newest first.
pub(super) fn quarantines(
    conn: &Connection,
    tenant: Option<&str>,
) -> Result<Vec<Quarantine>, StoreError> {
    let sql = format!(
        "SELECT {QUARANTINE_COLUMNS} FROM quarantines WHERE ?1 IS NULL OR tenant = ?1
         ORDER BY updated_at DESC, tenant, dest_range"
    );
    all(conn, &sql, [tenant], quarantine_from_row)
}

/// The acknowledgements recorded on a delivery's targets, by target index.
pub(super) fn acknowledgements(
    conn: &Connection,
    key: DeliveryKey,
) -> Result<Vec<(u32, Acknowledgement)>, StoreError> {
    let mut statement = conn.prepare_cached(
        "SELECT idx, ack FROM targets WHERE delivery = ? AND ack IS NOT NULL ORDER BY idx",
    )?;
    let mut rows = statement.query([key])?;
    let mut acks = Vec::new();
    while let Some(row) = rows.next()? {
        acks.push((
            row.get::<_, i64>(0)? as u32,
            parse(&row.get::<_, String>(1)?)?,
        ));
    }
    Ok(acks)
}

/// One page of reports, newest first.
pub(super) fn list(conn: &Connection, query: &ListQuery) -> Result<ListPage, StoreError> {
    let limit = query.limit.clamp(1, 100) as i64;
    let status = query.status.map(DeliveryStatus::as_str);
    let mut statement = conn.prepare_cached(
        "SELECT id FROM deliveries
         WHERE tenant = ?1 AND (?2 IS NULL OR account = ?2) AND (?3 IS NULL OR status = ?3)
           AND (?4 IS NULL OR id < ?4)
         ORDER BY id DESC LIMIT ?5",
    )?;
    let keys = statement
        .query_map(
            params![query.tenant, query.account, status, query.before, limit + 1],
            |row| row.get::<_, i64>(0),
        )?
        .collect::<Result<Vec<_>, _>>()?;
    let (keys, next) = crate::store::shared::page(keys, limit);
    let mut reports = Vec::with_capacity(keys.len());
    for key in keys {
        if let Some(report) = load(conn, key)? {
            reports.push(report);
        }
    }
    Ok(ListPage { reports, next })
}

/// Every row of `sql` (bound to `values`) through `map`.
fn all<T>(
    conn: &Connection,
    sql: &str,
    values: impl rusqlite::Params,
    map: fn(&dyn StoredRow) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut statement = conn.prepare_cached(sql)?;
    let mut rows = statement.query(values)?;
    let mut found = Vec::new();
    while let Some(row) = rows.next()? {
        found.push(map(row)?);
    }
    Ok(found)
}

/// Quiet-hours rules, optionally of one tenant (global ones included).
pub(super) fn list_quiet_hours(
    conn: &Connection,
    tenant: Option<&str>,
) -> Result<Vec<QuietHoursRule>, StoreError> {
    all(
        conn,
        concat!(
            "SELECT ",
            quiet_columns!(),
            " FROM quiet_rules WHERE (?1 IS NULL OR tenant = ?1 OR tenant = '*') ORDER BY id"
        ),
        [tenant],
        quiet_from_row,
    )
}

/// Rate limits, optionally of one tenant (global ones included).
pub(super) fn list_rate_limits(
    conn: &Connection,
    tenant: Option<&str>,
) -> Result<Vec<RateLimitRule>, StoreError> {
    all(
        conn,
        concat!(
            "SELECT ",
            rule_columns!(),
            " FROM rate_limit_rules WHERE (?1 IS NULL OR tenant = ?1 OR tenant = '*') ORDER BY id"
        ),
        [tenant],
        rule_from_row,
    )
}

/// Block entries, optionally of one tenant (global ones included), newest first.
pub(super) fn list_blocks(
    conn: &Connection,
    tenant: Option<&str>,
) -> Result<Vec<BlockEntry>, StoreError> {
    all(
        conn,
        concat!(
            "SELECT ",
            block_columns!(),
            " FROM block_entries WHERE (?1 IS NULL OR tenant = ?1 OR tenant = '*') ORDER BY id DESC"
        ),
        [tenant],
        block_from_row,
    )
}

/// The entries in force at `now` that could block a job of `tenant`: those naming one of
/// `patterns`, and every prefix entry.
pub(super) fn block_candidates(
    conn: &Connection,
    tenant: &str,
    patterns: &[&str],
    now: Timestamp,
) -> Result<Vec<BlockEntry>, StoreError> {
    let placeholders = vec!["?"; patterns.len().max(1)].join(", ");
    // Two indexed lookups: the tenant's prefix entries, and the entries naming a pattern (one
    // `OR` would have SQLite walk every entry of the tenant). Only placeholders are
    // interpolated: the values are bound. The statement is cached per number of patterns.
    let sql = format!(
        "SELECT {columns} FROM block_entries
         WHERE tenant IN (?1, '*') AND kind = 'PREFIX' AND (expires_at IS NULL OR expires_at > ?2)
         UNION ALL
         SELECT {columns} FROM block_entries
         WHERE pattern IN ({placeholders}) AND kind <> 'PREFIX' AND tenant IN (?1, '*')
           AND (expires_at IS NULL OR expires_at > ?2)",
        columns = block_columns!()
    );
    let now = micros(now);
    let mut values: Vec<&dyn rusqlite::ToSql> = vec![&tenant, &now];
    if patterns.is_empty() {
        values.push(&"");
    }
    for pattern in patterns {
        values.push(pattern);
    }
    all(conn, &sql, values.as_slice(), block_from_row)
}

/// Whether a send under these keys would be limited at `now`, without counting it.
pub(super) fn peek(
    conn: &Connection,
    keys: &[(RateLimitRule, String)],
    now: Timestamp,
) -> Result<Option<RateLimited>, StoreError> {
    let mut statement = conn.prepare_cached(
        "SELECT count(*), min(at) FROM rate_hits WHERE rule = ? AND key = ? AND at > ?",
    )?;
    for (rule, key) in keys {
        let since = micros(now) - rule.window.as_micros() as i64;
        let (hits, oldest): (i64, Option<i64>) = statement
            .query_row(params![rule.id, key, since], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?;
        if let Some(limited) = crate::store::shared::at_limit(rule, hits, oldest, now)? {
            return Ok(Some(limited));
        }
    }
    Ok(None)
}

/// The API key `id`, revoked or not.
pub(super) fn api_key(conn: &Connection, id: &str) -> Result<Option<ApiKey>, StoreError> {
    let sql = format!("SELECT {API_KEY_COLUMNS} FROM api_keys WHERE id = ?1");
    Ok(all(conn, &sql, [id], api_key_from_row)?.pop())
}

/// API keys, of one tenant (its own only) or all, oldest first.
pub(super) fn list_api_keys(
    conn: &Connection,
    tenant: Option<&str>,
) -> Result<Vec<ApiKey>, StoreError> {
    let sql = format!(
        "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE ?1 IS NULL OR tenant = ?1
         ORDER BY created_at, id"
    );
    all(conn, &sql, [tenant], api_key_from_row)
}
