//! Writing the PostgreSQL ledger one write at a time: each write is one statement
//! (data-modifying CTEs keep a delivery's row, its target and its attempt in step) or one short
//! transaction. The engine's hot writes (a new delivery's claim, an attempt's start and end, a
//! delivery's end) run grouped instead, many deliveries per statement (see [`super::groups`]).

use jiff::Timestamp;
use sqlx::AssertSqlSafe;
use sqlx::{PgConnection, Row};

use super::rows::{
    ALL_TENANTS, BLOCK_COLUMNS, QUIET_COLUMNS, RULE_COLUMNS, block_from_row, load, micros,
    quiet_from_row, rule_from_row, timestamp,
};
use crate::domain::{
    DeliveryId, DeliveryStatus, FailureReason, Report, TargetStatus, Verification,
};
use crate::policy::{
    BlockEntry, NewBlockEntry, QuietHoursRule, RateLimitRule, RateLimited, weekday_name,
};
use crate::store::shared::{Claimed, at_limit};
use crate::store::{
    AttemptEnd, DecideOutcome, DeliveryKey, INTERRUPTED, KnownReport, NewDelivery, Revision,
    StoreError, TargetUpdate,
};

/// Inserts a delivery and its targets unless `(tenant, job_id)` is known; its key when new.
pub(super) async fn insert(
    conn: &mut PgConnection,
    new: &NewDelivery,
    status: DeliveryStatus,
    owner: Option<(&str, i64)>,
    now: Timestamp,
) -> Result<Option<DeliveryKey>, StoreError> {
    let count = new.targets.len();
    let mut indexes = Vec::with_capacity(count);
    let mut channels = Vec::with_capacity(count);
    let mut labels = Vec::with_capacity(count);
    let mut platforms: Vec<Option<String>> = Vec::with_capacity(count);
    for (index, target) in new.targets.iter().enumerate() {
        indexes.push(index as i32);
        channels.push(target.channel.as_str().to_owned());
        labels.push(target.label.clone());
        platforms.push(target.platform.map(|p| p.as_str().to_owned()));
    }
    let row = sqlx::query(
        "WITH d AS (
             INSERT INTO deliveries (tenant, job_id, account, purpose, status, owner, lease_until,
                                     expires_at, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)
             ON CONFLICT (tenant, job_id) DO NOTHING RETURNING id
         ), t AS (
             INSERT INTO targets (delivery, idx, channel, label, platform, status)
             SELECT d.id, x.idx, x.channel, x.label, x.platform, $14
             FROM d, UNNEST($10::int[], $11::text[], $12::text[], $13::text[])
                     AS x (idx, channel, label, platform)
         )
         SELECT id FROM d",
    )
    .bind(&new.id.tenant)
    .bind(&new.id.job_id)
    .bind(&new.account)
    .bind(&new.purpose)
    .bind(status.as_str())
    .bind(owner.map(|(worker, _)| worker))
    .bind(owner.map(|(_, lease_until)| lease_until))
    .bind(micros(new.expires_at))
    .bind(micros(now))
    .bind(&indexes)
    .bind(&channels)
    .bind(&labels)
    .bind(&platforms)
    .bind(TargetStatus::Pending.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|row| row.get::<i64, _>(0)))
}

/// Records a delivery as ACCEPTED unless known: its key, and whether it is new.
pub(super) async fn accept(
    conn: &mut PgConnection,
    new: &NewDelivery,
    now: Timestamp,
) -> Result<(DeliveryKey, bool), StoreError> {
    if let Some(key) = insert(conn, new, DeliveryStatus::Accepted, None, now).await? {
        return Ok((key, true));
    }
    let key: Option<i64> =
        sqlx::query_scalar("SELECT id FROM deliveries WHERE tenant = $1 AND job_id = $2")
            .bind(&new.id.tenant)
            .bind(&new.id.job_id)
            .fetch_optional(&mut *conn)
            .await?;
    key.map(|key| (key, false))
        .ok_or_else(|| StoreError::NotFound(new.id.to_string()))
}

/// The end of a statement whose data-modifying part `changed` changed deliveries' revisions
/// and returns their `tenant` and `job_id`: announces them once to every replica listening
/// (migration 0009). It follows `changed`, and the statement then reads `FROM changed,
/// announced`.
pub(super) const ANNOUNCED: &str = ", announced AS MATERIALIZED (
         SELECT otp_announce(array_agg(tenant || '/' || job_id)) FROM changed
     )";

/// The claim of a delivery already known (its insert found it), inside a transaction: take it
/// over when it is not started, not finished and not held under a live lease.
pub(super) async fn claim(
    conn: &mut PgConnection,
    new: &NewDelivery,
    worker: &str,
    takeover: bool,
    now: Timestamp,
    lease_until: i64,
) -> Result<Claimed, StoreError> {
    // Only one worker's UPDATE matches: the row is locked while it decides.
    let taken = sqlx::query(AssertSqlSafe(format!(
        "WITH old AS (
                 SELECT id, status, owner FROM deliveries
                 WHERE tenant = $1 AND job_id = $2 FOR UPDATE
             ), changed AS (
                 UPDATE deliveries d
                 SET status = 'IN_PROGRESS', owner = $3, lease_until = $4, updated_at = $5,
                     revision = d.revision + 1
                 FROM old
                 WHERE d.id = old.id
                   AND (old.status IN ('ACCEPTED', 'DEFERRED')
                        OR (old.status = 'IN_PROGRESS'
                            AND (old.owner = $3 OR old.owner IS NULL OR d.lease_until IS NULL
                                 OR d.lease_until <= $5)))
                 RETURNING d.id, d.revision, old.status AS old_status, old.owner AS old_owner,
                           d.tenant, d.job_id
             ) {ANNOUNCED}
             SELECT id, revision, old_status, old_owner FROM changed, announced"
    )))
    .bind(&new.id.tenant)
    .bind(&new.id.job_id)
    .bind(worker)
    .bind(lease_until)
    .bind(micros(now))
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = taken {
        let key: i64 = row.try_get(0)?;
        let revision = row.try_get::<i64, _>(1)? as Revision;
        let status: String = row.try_get(2)?;
        if status != DeliveryStatus::InProgress.as_str() {
            return Ok(Claimed::Taken(key, revision));
        }
        let previous: Option<String> = row.try_get(3)?;
        tracing::info!(
            delivery_id = %new.id,
            previous_worker = previous.as_deref().unwrap_or("-"),
            worker,
            "taking over an interrupted delivery"
        );
        sqlx::query(
            "UPDATE attempts SET ended_at = $1, outcome = 'INTERRUPTED', reason = NULL, provider_message = $2
             WHERE delivery = $3 AND outcome = 'IN_FLIGHT'",
        )
        .bind(micros(now))
        .bind(INTERRUPTED)
        .bind(key)
        .execute(&mut *conn)
        .await?;
        return Ok(Claimed::TakenOver(key, revision));
    }
    let row = sqlx::query(
        "SELECT id, status, lease_until FROM deliveries WHERE tenant = $1 AND job_id = $2",
    )
    .bind(&new.id.tenant)
    .bind(&new.id.job_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| StoreError::NotFound(new.id.to_string()))?;
    let key: i64 = row.try_get(0)?;
    let status: String = row.try_get(1)?;
    let lease: Option<i64> = row.try_get(2)?;
    match lease {
        Some(lease) if takeover && status == DeliveryStatus::InProgress.as_str() => {
            Ok(Claimed::Leased(key, timestamp(lease)?))
        }
        _ => Ok(Claimed::Refused(key)),
    }
}

/// The error of a write by a replica whose claim another replica took over (its lease ran out
/// while it was cut off): nothing was written.
pub(super) fn taken_over(key: DeliveryKey) -> StoreError {
    StoreError::Conflict(format!(
        "delivery #{key} was taken over by another replica (this one's lease ran out): nothing written"
    ))
}

/// Updates one target and marks the delivery as changed, in one statement.
pub(super) async fn set_target(
    conn: &mut PgConnection,
    key: DeliveryKey,
    index: u32,
    update: &TargetUpdate,
    now: Timestamp,
    owners: &[String],
) -> Result<(), StoreError> {
    let done = sqlx::query(AssertSqlSafe(format!(
        "WITH own AS (
                 SELECT id FROM deliveries
                 WHERE id = $5 AND (status <> 'IN_PROGRESS' OR owner = ANY($8)) FOR UPDATE
             ), t AS (
                 UPDATE targets SET channel = $1, status = $2, reason = $3, detail = $4
                 WHERE delivery = $5 AND idx = $6 AND EXISTS (SELECT 1 FROM own)
             ), changed AS (
                 UPDATE deliveries SET updated_at = $7, revision = revision + 1
                 WHERE id IN (SELECT id FROM own)
                 RETURNING tenant, job_id
             ) {ANNOUNCED} SELECT 1 FROM changed, announced"
    )))
    .bind(update.channel.as_str())
    .bind(update.status.as_str())
    .bind(update.reason.map(FailureReason::as_str))
    .bind(&update.detail)
    .bind(key)
    .bind(index as i32)
    .bind(micros(now))
    .bind(owners)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Err(taken_over(key));
    }
    Ok(())
}

/// Applies a delivery receipt to the newest attempt `provider` sent as `message_id` that awaits
/// one and still waits for its fate (outcome SENT), with its target, in one statement.
pub(super) async fn apply_receipt(
    conn: &mut PgConnection,
    provider: &str,
    message_id: &str,
    end: &AttemptEnd,
) -> Result<Option<(DeliveryKey, DeliveryId, DeliveryStatus)>, StoreError> {
    let status = TargetUpdate::after(crate::domain::Channel::Sms, end).status;
    let row = sqlx::query(AssertSqlSafe(format!(
        "WITH a AS (
             SELECT id, delivery, target_idx, channel FROM attempts
             WHERE provider = $1 AND receipt_key = $2 AND outcome = 'SENT'
             ORDER BY id DESC LIMIT 1 FOR UPDATE
         ), u AS (
             UPDATE attempts SET outcome = $3, reason = $4,
                                 provider_code = COALESCE($5, attempts.provider_code),
                                 provider_message = COALESCE($6, attempts.provider_message)
             FROM a WHERE attempts.id = a.id
         ), t AS (
             UPDATE targets SET channel = a.channel, status = $7, reason = $4, detail = NULL
             FROM a WHERE targets.delivery = a.delivery AND targets.idx = a.target_idx
         ), changed AS (
             UPDATE deliveries d SET updated_at = $8, revision = d.revision + 1
             FROM a WHERE d.id = a.delivery
             RETURNING d.id, d.status, d.tenant, d.job_id
         ) {ANNOUNCED} SELECT id, status, tenant, job_id FROM changed, announced"
    )))
    .bind(provider)
    .bind(message_id)
    .bind(end.outcome.as_str())
    .bind(end.reason.map(FailureReason::as_str))
    .bind(&end.provider_code)
    .bind(&end.provider_message)
    .bind(status.as_str())
    .bind(micros(end.ended_at))
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let status: String = row.try_get(1)?;
    Ok(Some((
        row.try_get(0)?,
        DeliveryId {
            tenant: row.try_get(2)?,
            job_id: row.try_get(3)?,
        },
        status.parse().map_err(StoreError::Corrupt)?,
    )))
}

/// Records a device's acknowledgement on target `index`.
pub(super) async fn record_ack(
    conn: &mut PgConnection,
    key: DeliveryKey,
    index: u32,
    ack: &str,
    now: Timestamp,
) -> Result<(), StoreError> {
    sqlx::query(AssertSqlSafe(format!(
        "WITH t AS (UPDATE targets SET ack = $1, ack_at = $2 WHERE delivery = $3 AND idx = $4),
             changed AS (
                 UPDATE deliveries SET updated_at = $2, revision = revision + 1 WHERE id = $3
                 RETURNING tenant, job_id
             ) {ANNOUNCED} SELECT 1 FROM changed, announced"
    )))
    .bind(ack)
    .bind(micros(now))
    .bind(key)
    .bind(index as i32)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records upstream's verification report unless the delivery is verified already.
pub(super) async fn record_verification(
    conn: &mut PgConnection,
    key: DeliveryKey,
    verification: Verification,
    now: Timestamp,
) -> Result<bool, StoreError> {
    let changed: Option<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
        "WITH changed AS (
             UPDATE deliveries SET verified = $1, verification_at = $2, updated_at = $3,
                 revision = revision + 1
             WHERE id = $4 AND verified IS DISTINCT FROM 1
             RETURNING tenant, job_id
         ) {ANNOUNCED} SELECT 1 FROM changed, announced"
    )))
    .bind(i16::from(verification.verified))
    .bind(micros(verification.at))
    .bind(micros(now))
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(changed.is_some())
}

/// Marks the delivery terminal (inside a transaction) with the outcome `decide` draws from its
/// report as it stands; the final report.
pub(super) async fn finish(
    conn: &mut PgConnection,
    key: DeliveryKey,
    now: Timestamp,
    decide: &DecideOutcome,
    known: Option<KnownReport>,
    owners: &[String],
) -> Result<Report, StoreError> {
    let row =
        sqlx::query("SELECT revision, status, owner FROM deliveries WHERE id = $1 FOR UPDATE")
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("delivery #{key}")))?;
    let revision = row.try_get::<i64, _>(0)? as Revision;
    let status: String = row.try_get(1)?;
    let owner: Option<String> = row.try_get(2)?;
    if status == DeliveryStatus::InProgress.as_str()
        && !owner.is_some_and(|owner| owners.contains(&owner))
    {
        return Err(taken_over(key));
    }
    let report = match known {
        Some(known) if known.revision == revision => known.report,
        _ => load(conn, key)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("delivery #{key}")))?,
    };
    let outcome = decide(&report);
    sqlx::query(AssertSqlSafe(format!(
        "WITH changed AS (
                 UPDATE deliveries SET status = $1, reason = $2, summary = $3, updated_at = $4,
                                       revision = revision + 1, lease_until = NULL
                 WHERE id = $5
                 RETURNING tenant, job_id
             ) {ANNOUNCED} SELECT 1 FROM changed, announced"
    )))
    .bind(outcome.status.as_str())
    .bind(outcome.reason.map(FailureReason::as_str))
    .bind(&outcome.summary)
    .bind(micros(now))
    .bind(key)
    .execute(&mut *conn)
    .await?;
    Ok(outcome.conclude(report, now))
}

/// Counts one send under every key (inside a transaction) unless one is at its limit. Each
/// counter is locked for the transaction (an advisory lock on its rule and key, taken in a
/// fixed order), so replicas counting the same key at once queue up instead of overshooting.
pub(super) async fn consume(
    conn: &mut PgConnection,
    keys: &[(RateLimitRule, String)],
    now: Timestamp,
) -> Result<Option<RateLimited>, StoreError> {
    let mut locks: Vec<(i64, &str)> = keys.iter().map(|(r, k)| (r.id, k.as_str())).collect();
    locks.sort_unstable();
    locks.dedup();
    for (rule, key) in &locks {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, $2))")
            .bind(*key)
            .bind(*rule)
            .execute(&mut *conn)
            .await?;
    }
    for (rule, key) in keys {
        let since = micros(now) - rule.window.as_micros() as i64;
        let row = sqlx::query(
            "WITH gone AS (DELETE FROM rate_hits WHERE rule = $1 AND key = $2 AND at <= $3)
             SELECT count(*), min(at) FROM rate_hits WHERE rule = $1 AND key = $2 AND at > $3",
        )
        .bind(rule.id)
        .bind(key)
        .bind(since)
        .fetch_one(&mut *conn)
        .await?;
        if let Some(limited) = at_limit(rule, row.try_get(0)?, row.try_get(1)?, now)? {
            // Nothing counted; the pruning only dropped hits out of the window anyway.
            return Ok(Some(limited));
        }
    }
    let rules: Vec<i64> = keys.iter().map(|(rule, _)| rule.id).collect();
    let counters: Vec<&str> = keys.iter().map(|(_, key)| key.as_str()).collect();
    sqlx::query("INSERT INTO rate_hits (rule, key, at) SELECT r, k, $3 FROM UNNEST($1::bigint[], $2::text[]) AS x (r, k)")
        .bind(&rules)
        .bind(&counters)
        .bind(micros(now))
        .execute(&mut *conn)
        .await?;
    Ok(None)
}

/// Stores a quiet-hours rule: a new one when its id is 0, else it replaces that rule (`None`
/// when there is none).
pub(super) async fn set_quiet_hours(
    conn: &mut PgConnection,
    rule: &QuietHoursRule,
) -> Result<Option<QuietHoursRule>, StoreError> {
    let channels: Vec<&str> = rule.channels.iter().map(|c| c.as_str()).collect();
    let days: Vec<&str> = rule.days.iter().map(|d| weekday_name(*d)).collect();
    let sql = if rule.id == 0 {
        format!(
            "INSERT INTO quiet_rules (tenant, account, channels, start_time, end_time, days, action, default_zone)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {QUIET_COLUMNS}"
        )
    } else {
        format!(
            "UPDATE quiet_rules SET tenant = $1, account = $2, channels = $3, start_time = $4, end_time = $5,
                                    days = $6, action = $7, default_zone = $8
             WHERE id = $9 RETURNING {QUIET_COLUMNS}"
        )
    };
    let mut query = sqlx::query(AssertSqlSafe(sql))
        .bind(rule.tenant.as_deref().unwrap_or(ALL_TENANTS))
        .bind(rule.account.as_deref().unwrap_or_default())
        .bind(channels.join(","))
        .bind(rule.start.strftime("%H:%M").to_string())
        .bind(rule.end.strftime("%H:%M").to_string())
        .bind(days.join(","))
        .bind(rule.action.as_str())
        .bind(&rule.default_zone);
    if rule.id != 0 {
        query = query.bind(rule.id);
    }
    query
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(|row| quiet_from_row(row))
        .transpose()
}

/// Sets the rate limit for its (tenant, scope, prefix), replacing one that was there.
pub(super) async fn set_rate_limit(
    conn: &mut PgConnection,
    rule: &RateLimitRule,
) -> Result<RateLimitRule, StoreError> {
    let sql = format!(
        "INSERT INTO rate_limit_rules (tenant, scope, prefix, max_sends, window_ms) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tenant, scope, prefix) DO UPDATE SET max_sends = excluded.max_sends, window_ms = excluded.window_ms
         RETURNING {RULE_COLUMNS}"
    );
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(rule.tenant.as_deref().unwrap_or(ALL_TENANTS))
        .bind(rule.scope.as_str())
        .bind(&rule.prefix)
        .bind(rule.limit as i64)
        .bind(rule.window.as_millis() as i64)
        .fetch_one(&mut *conn)
        .await?;
    rule_from_row(&row)
}

/// Adds a block entry unless one with the same tenant, kind and pattern is there; the entry,
/// and whether it is new.
/// `entry.pattern` is as stored (hashed where it must be), `shown` as listed.
pub(super) async fn add_block(
    conn: &mut PgConnection,
    entry: &NewBlockEntry,
    shown: Option<&str>,
    now: Timestamp,
) -> Result<(BlockEntry, bool), StoreError> {
    let tenant = entry.tenant.as_deref().unwrap_or(ALL_TENANTS);
    let sql = format!(
        "WITH i AS (
             INSERT INTO block_entries (tenant, kind, pattern, source, note, created_at, expires_at,
                                        shown)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (tenant, kind, pattern) DO NOTHING RETURNING {BLOCK_COLUMNS}
         )
         SELECT {BLOCK_COLUMNS}, true FROM i
         UNION ALL
         SELECT {BLOCK_COLUMNS}, false FROM block_entries
         WHERE tenant = $1 AND kind = $2 AND pattern = $3 AND NOT EXISTS (SELECT 1 FROM i)"
    );
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(tenant)
        .bind(entry.kind.as_str())
        .bind(&entry.pattern)
        .bind(entry.source.as_str())
        .bind(&entry.note)
        .bind(micros(now))
        .bind(entry.expires_at.map(micros))
        .bind(shown)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::Conflict("a block entry vanished as it was added".into()))?;
    Ok((block_from_row(&row)?, row.try_get(9)?))
}
