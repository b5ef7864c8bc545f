//! The SQLite ledger's writes, as the group-commit writer thread runs them: plain functions of
//! the writer's connection (inside its open transaction) and owned inputs. Reads stay in
//! `reads.rs`, which this module builds on (never the other way).

use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, params};

use super::reads::{
    ALL_TENANTS, block_columns, block_from_row, load, micros, quiet_columns, quiet_from_row,
    rule_columns, rule_from_row,
};
use crate::domain::{
    ApiKey, DeliveryId, DeliveryStatus, FailureReason, Report, TargetStatus, Verification,
    scopes_text,
};
use crate::policy::{
    BlockEntry, DestinationCount, NewBlockEntry, Quarantine, QuietHoursRule, RateLimitRule,
    RateLimited, bucket_of, recent_bucket_of, weekday_name,
};
use crate::store::rows::{QUARANTINE_COLUMNS, evidence_json, quarantine_from_row};
use crate::store::shared::Claimed;
use crate::store::{
    AttemptEnd, AttemptKey, AttemptStart, DecideOutcome, DeliveryKey, INTERRUPTED, KnownReport,
    NewDelivery, Revision, StoreError, TargetUpdate,
};

/// Inserts a delivery and its targets unless `(tenant, job_id)` is known; its key when new.
pub(super) fn insert(
    conn: &Connection,
    new: &NewDelivery,
    status: DeliveryStatus,
    worker: Option<&str>,
    now: Timestamp,
) -> Result<Option<DeliveryKey>, StoreError> {
    // No RETURNING: SQLite would collect its rows in a temporary table first.
    let inserted = conn
        .prepare_cached(
            "INSERT INTO deliveries (tenant, job_id, account, purpose, status, owner, expires_at, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (tenant, job_id) DO NOTHING",
        )?
        .execute(params![
            new.id.tenant,
            new.id.job_id,
            new.account,
            new.purpose,
            status.as_str(),
            worker,
            micros(new.expires_at),
            micros(now),
            micros(now),
        ])?;
    if inserted == 0 {
        return Ok(None);
    }
    let key = conn.last_insert_rowid();
    let mut target = conn.prepare_cached(
        "INSERT INTO targets (delivery, idx, channel, label, platform, status) VALUES (?, ?, ?, ?, ?, ?)",
    )?;
    for (index, new_target) in new.targets.iter().enumerate() {
        target.execute(params![
            key,
            index as i64,
            new_target.channel.as_str(),
            new_target.label,
            new_target.platform.map(|p| p.as_str()),
            TargetStatus::Pending.as_str(),
        ])?;
    }
    Ok(Some(key))
}

/// The key, status and owner of a delivery.
fn key_of(
    conn: &Connection,
    id: &DeliveryId,
) -> Result<Option<(DeliveryKey, DeliveryStatus, Option<String>)>, StoreError> {
    let row: Option<(i64, String, Option<String>)> = conn
        .prepare_cached("SELECT id, status, owner FROM deliveries WHERE tenant = ? AND job_id = ?")?
        .query_row(params![id.tenant, id.job_id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    row.map(|(key, status, owner)| Ok((key, status.parse().map_err(StoreError::Corrupt)?, owner)))
        .transpose()
}

/// Records a delivery as ACCEPTED unless known: its key, and whether it is new.
pub(super) fn accept(
    conn: &Connection,
    new: &NewDelivery,
    now: Timestamp,
) -> Result<(DeliveryKey, bool), StoreError> {
    match insert(conn, new, DeliveryStatus::Accepted, None, now)? {
        Some(key) => Ok((key, true)),
        None => key_of(conn, &new.id)?
            .map(|(key, _, _)| (key, false))
            .ok_or_else(|| StoreError::NotFound(new.id.to_string())),
    }
}

/// Removes a delivery that is still only ACCEPTED.
pub(super) fn forget_accepted(conn: &Connection, id: &DeliveryId) -> Result<(), StoreError> {
    conn.prepare_cached(
        "DELETE FROM deliveries WHERE tenant = ? AND job_id = ? AND status = 'ACCEPTED'",
    )?
    .execute(params![id.tenant, id.job_id])?;
    Ok(())
}

/// The claim: insert the delivery as this worker's, or take it over when the rules allow.
pub(super) fn claim(
    conn: &Connection,
    new: &NewDelivery,
    worker: &str,
    takeover: bool,
    now: Timestamp,
) -> Result<Claimed, StoreError> {
    if let Some(key) = insert(conn, new, DeliveryStatus::InProgress, Some(worker), now)? {
        return Ok(Claimed::Inserted(key));
    }
    let (key, status, owner) =
        key_of(conn, &new.id)?.ok_or_else(|| StoreError::NotFound(new.id.to_string()))?;
    if status.is_terminal() {
        return Ok(Claimed::Refused(key));
    }
    // Only one worker's UPDATE matches.
    let claimed = conn
        .prepare_cached(
            "UPDATE deliveries SET status = 'IN_PROGRESS', owner = ?, updated_at = ?, revision = revision + 1
             WHERE id = ? AND (status IN ('ACCEPTED', 'DEFERRED')
                               OR (status = 'IN_PROGRESS' AND (? OR owner = ? OR owner IS NULL)))",
        )?
        .execute(params![worker, micros(now), key, takeover, worker])?
        == 1;
    if !claimed {
        return Ok(Claimed::Refused(key));
    }
    let revision = revision(conn, key)?;
    if status != DeliveryStatus::InProgress {
        return Ok(Claimed::Taken(key, revision));
    }
    // Logged on the writer's thread, outside the job's span: it names the delivery itself.
    tracing::info!(
        delivery_id = %new.id,
        previous_worker = owner.as_deref().unwrap_or("-"),
        worker,
        "taking over an interrupted delivery"
    );
    conn.prepare_cached(
        "UPDATE attempts SET ended_at = ?, outcome = 'INTERRUPTED', reason = NULL, provider_message = ?
         WHERE delivery = ? AND outcome = 'IN_FLIGHT'",
    )?
    .execute(params![micros(now), INTERRUPTED, key])?;
    Ok(Claimed::TakenOver(key, revision))
}

/// A delivery's revision.
fn revision(conn: &Connection, key: DeliveryKey) -> Result<Revision, StoreError> {
    let revision: i64 = conn
        .prepare_cached("SELECT revision FROM deliveries WHERE id = ?")?
        .query_row([key], |row| row.get(0))?;
    Ok(revision as Revision)
}

/// Records that a provider call is starting.
pub(super) fn start_attempt(
    conn: &Connection,
    key: DeliveryKey,
    start: &AttemptStart,
) -> Result<AttemptKey, StoreError> {
    conn.prepare_cached(
        "INSERT INTO attempts (delivery, target_idx, provider, channel, masked_target, started_at, outcome, retry,
                               sms_encoding, sms_segments, dest_range)
         VALUES (?, ?, ?, ?, ?, ?, 'IN_FLIGHT', ?, ?, ?, ?)",
    )?
    .execute(params![
        key,
        start.target as i64,
        start.provider,
        start.channel.as_str(),
        start.masked_target,
        micros(start.started_at),
        start.retry as i64,
        start.sms.map(|s| s.encoding.as_str()),
        start.sms.map(|s| s.segments as i64),
        start.range,
    ])?;
    Ok(conn.last_insert_rowid())
}

/// Records how a provider call ended, and its target's new state.
pub(super) fn finish_attempt(
    conn: &Connection,
    key: DeliveryKey,
    attempt: AttemptKey,
    end: &AttemptEnd,
    target: u32,
    update: &TargetUpdate,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE attempts SET ended_at = ?, outcome = ?, reason = ?, provider_code = ?, provider_message = ?,
                             provider_message_id = ?, next_retry_at = ?, token_invalid_since = ?,
                             receipt_key = COALESCE(?, receipt_key)
         WHERE id = ?",
    )?
    .execute(params![
        micros(end.ended_at),
        end.outcome.as_str(),
        end.reason.map(FailureReason::as_str),
        end.provider_code,
        end.provider_message,
        end.provider_message_id,
        end.next_retry_at.map(micros),
        end.token_invalid_since.map(micros),
        end.receipt_key(),
        attempt,
    ])?;
    set_target(conn, key, target, update, end.ended_at)
}

/// Updates one target and marks the delivery as changed.
pub(super) fn set_target(
    conn: &Connection,
    key: DeliveryKey,
    index: u32,
    update: &TargetUpdate,
    now: Timestamp,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE targets SET channel = ?, status = ?, reason = ?, detail = ? WHERE delivery = ? AND idx = ?",
    )?
    .execute(params![
        update.channel.as_str(),
        update.status.as_str(),
        update.reason.map(FailureReason::as_str),
        update.detail,
        key,
        index as i64,
    ])?;
    touch(conn, key, now)
}

/// Marks the delivery as changed at `now` (watchers and lists order by it), counting one
/// revision.
fn touch(conn: &Connection, key: DeliveryKey, now: Timestamp) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE deliveries SET updated_at = ?, revision = revision + 1 WHERE id = ?",
    )?
    .execute(params![micros(now), key])?;
    Ok(())
}

/// Applies a delivery receipt to the newest attempt `provider` sent as `message_id` that awaits
/// one and still waits for its fate (outcome SENT); the delivery's key when found. Providers
/// reuse message ids (an SMSC after a restart), so an attempt already final is never matched.
pub(super) fn apply_receipt(
    conn: &Connection,
    provider: &str,
    message_id: &str,
    end: &AttemptEnd,
) -> Result<Option<(DeliveryKey, DeliveryId, DeliveryStatus)>, StoreError> {
    // The attempt and its delivery's identity and status, in one lookup.
    type Found = (i64, i64, i64, String, String, String, String);
    let found: Option<Found> = conn
        .prepare_cached(
            "SELECT a.id, a.delivery, a.target_idx, a.channel, d.status, d.tenant, d.job_id
             FROM attempts a JOIN deliveries d ON d.id = a.delivery
             WHERE a.provider = ? AND a.receipt_key = ? AND a.outcome = 'SENT'
             ORDER BY a.id DESC LIMIT 1",
        )?
        .query_row(params![provider, message_id], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
                row.get(6)?,
            ))
        })
        .optional()?;
    let Some((attempt, key, index, channel, status, tenant, job_id)) = found else {
        return Ok(None);
    };
    conn.prepare_cached(
        "UPDATE attempts SET outcome = ?, reason = ?, provider_code = COALESCE(?, provider_code),
                             provider_message = COALESCE(?, provider_message)
         WHERE id = ?",
    )?
    .execute(params![
        end.outcome.as_str(),
        end.reason.map(FailureReason::as_str),
        end.provider_code,
        end.provider_message,
        attempt,
    ])?;
    let channel = channel.parse().map_err(StoreError::Corrupt)?;
    let update = TargetUpdate::after(channel, end);
    set_target(conn, key, index as u32, &update, end.ended_at)?;
    let id = DeliveryId { tenant, job_id };
    Ok(Some((
        key,
        id,
        status.parse().map_err(StoreError::Corrupt)?,
    )))
}

/// Records a device's acknowledgement on target `index`.
pub(super) fn record_ack(
    conn: &Connection,
    key: DeliveryKey,
    index: u32,
    ack: &str,
    now: Timestamp,
) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE targets SET ack = ?, ack_at = ? WHERE delivery = ? AND idx = ?")?
        .execute(params![ack, micros(now), key, index as i64])?;
    touch(conn, key, now)
}

/// Adds to the fraud guard's counts: each to its recent bucket and to its hour.
pub(super) fn add_destination_counts(
    conn: &Connection,
    counts: &[DestinationCount],
) -> Result<(), StoreError> {
    for (table, hourly) in [("destination_recent", false), ("destination_counts", true)] {
        let mut statement = conn.prepare_cached(&format!(
            "INSERT INTO {table} (tenant, dest_range, bucket, sends, conversions)
             VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (tenant, dest_range, bucket) DO UPDATE
             SET sends = sends + excluded.sends, conversions = conversions + excluded.conversions"
        ))?;
        for count in counts {
            let bucket = if hourly {
                bucket_of(count.bucket)
            } else {
                recent_bucket_of(count.bucket)
            };
            statement.execute(params![
                count.tenant,
                count.range,
                micros(bucket),
                count.sends as i64,
                count.conversions as i64
            ])?;
        }
    }
    Ok(())
}

/// Forgets recent counts older than `before`.
pub(super) fn prune_recent_counts(conn: &Connection, before: Timestamp) -> Result<u64, StoreError> {
    Ok(conn
        .prepare_cached("DELETE FROM destination_recent WHERE bucket < ?1")?
        .execute([micros(before)])? as u64)
}

/// Holds a range unless its row is settled; whether it was held now.
pub(super) fn hold_range(conn: &Connection, quarantine: &Quarantine) -> Result<bool, StoreError> {
    let changed = conn
        .prepare_cached(
            "INSERT INTO quarantines (tenant, dest_range, state, since, until, mode, evidence, note, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?4)
             ON CONFLICT (tenant, dest_range) DO UPDATE
             SET state = excluded.state, since = excluded.since, until = excluded.until,
                 mode = excluded.mode, evidence = excluded.evidence, note = excluded.note,
                 updated_at = excluded.updated_at
             WHERE quarantines.until IS NOT NULL AND quarantines.until <= excluded.since",
        )?
        .execute(params![
            quarantine.tenant,
            quarantine.range,
            quarantine.state.as_str(),
            micros(quarantine.since),
            quarantine.until.map(micros),
            quarantine.mode.as_str(),
            evidence_json(quarantine),
            quarantine.note,
        ])?;
    Ok(changed == 1)
}

/// Pins a range (held until lifted).
pub(super) fn pin_range(
    conn: &Connection,
    tenant: &str,
    range: &str,
    note: &str,
    now: Timestamp,
) -> Result<Quarantine, StoreError> {
    let sql = format!(
        "INSERT INTO quarantines (tenant, dest_range, state, since, until, mode, evidence, note, updated_at)
         VALUES (?1, ?2, 'held', ?3, NULL, 'enforce', NULL, ?4, ?3)
         ON CONFLICT (tenant, dest_range) DO UPDATE
         SET since = CASE WHEN quarantines.state = 'held'
                           AND (quarantines.until IS NULL OR quarantines.until > excluded.since)
                          THEN quarantines.since ELSE excluded.since END,
             state = 'held', until = NULL, note = excluded.note, updated_at = excluded.updated_at
         RETURNING {QUARANTINE_COLUMNS}"
    );
    conn.prepare_cached(&sql)?
        .query_row(params![tenant, range, micros(now), note], |row| {
            Ok(quarantine_from_row(row))
        })?
}

/// Lifts a held range; the guard leaves it alone until `until`.
pub(super) fn lift_range(
    conn: &Connection,
    tenant: &str,
    range: &str,
    note: &str,
    now: Timestamp,
    until: Timestamp,
) -> Result<Option<Quarantine>, StoreError> {
    let sql = format!(
        "UPDATE quarantines SET state = 'lifted', until = ?4, note = ?5, updated_at = ?3
         WHERE tenant = ?1 AND dest_range = ?2 AND state = 'held'
           AND (until IS NULL OR until > ?3)
         RETURNING {QUARANTINE_COLUMNS}"
    );
    conn.prepare_cached(&sql)?
        .query_row(
            params![tenant, range, micros(now), micros(until), note],
            |row| Ok(quarantine_from_row(row)),
        )
        .optional()?
        .transpose()
}

/// Records upstream's verification report unless the delivery is verified already.
pub(super) fn record_verification(
    conn: &Connection,
    key: DeliveryKey,
    verification: Verification,
    now: Timestamp,
) -> Result<bool, StoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE deliveries SET verified = ?, verification_at = ?, updated_at = ?,
                 revision = revision + 1
             WHERE id = ? AND verified IS NOT 1",
        )?
        .execute(params![
            i64::from(verification.verified),
            micros(verification.at),
            micros(now),
            key
        ])?;
    Ok(changed == 1)
}

/// Marks the delivery terminal with the outcome `decide` draws from its report as it stands
/// in this transaction; the final report.
pub(super) fn finish(
    conn: &Connection,
    key: DeliveryKey,
    now: Timestamp,
    decide: &DecideOutcome,
    known: Option<KnownReport>,
) -> Result<Report, StoreError> {
    let report = match known {
        Some(known) if known.revision == revision(conn, key)? => known.report,
        _ => load(conn, key)?.ok_or_else(|| StoreError::NotFound(format!("delivery #{key}")))?,
    };
    let outcome = decide(&report);
    conn.prepare_cached(
        "UPDATE deliveries SET status = ?, reason = ?, summary = ?, updated_at = ?, revision = revision + 1
         WHERE id = ?",
    )?
    .execute(params![
        outcome.status.as_str(),
        outcome.reason.map(FailureReason::as_str),
        outcome.summary,
        micros(now),
        key,
    ])?;
    Ok(outcome.conclude(report, now))
}

/// Counts one send under every key unless one of them is at its limit (then nothing is
/// counted and the limit is returned). The writer runs one write at a time, so two checks of
/// one counter cannot both pass.
pub(super) fn consume(
    conn: &Connection,
    keys: &[(RateLimitRule, String)],
    now: Timestamp,
) -> Result<Option<RateLimited>, StoreError> {
    for (rule, key) in keys {
        let since = micros(now) - rule.window.as_micros() as i64;
        conn.prepare_cached("DELETE FROM rate_hits WHERE rule = ? AND key = ? AND at <= ?")?
            .execute(params![rule.id, key, since])?;
        let (hits, oldest): (i64, Option<i64>) = conn
            .prepare_cached("SELECT count(*), min(at) FROM rate_hits WHERE rule = ? AND key = ?")?
            .query_row(params![rule.id, key], |row| Ok((row.get(0)?, row.get(1)?)))?;
        if let Some(limited) = crate::store::shared::at_limit(rule, hits, oldest, now)? {
            // Nothing counted; the pruning above only dropped hits out of the window anyway.
            return Ok(Some(limited));
        }
    }
    let mut insert =
        conn.prepare_cached("INSERT INTO rate_hits (rule, key, at) VALUES (?, ?, ?)")?;
    for (rule, key) in keys {
        insert.execute(params![rule.id, key, micros(now)])?;
    }
    Ok(None)
}

/// Stores a quiet-hours rule: a new one when its id is 0, else it replaces that rule (`None`
/// when there is none: nothing was written, so the group need not be undone).
pub(super) fn set_quiet_hours(
    conn: &Connection,
    rule: &QuietHoursRule,
) -> Result<Option<QuietHoursRule>, StoreError> {
    let channels: Vec<&str> = rule.channels.iter().map(|c| c.as_str()).collect();
    let days: Vec<&str> = rule.days.iter().map(|d| weekday_name(*d)).collect();
    let sql = if rule.id == 0 {
        concat!(
            "INSERT INTO quiet_rules (tenant, account, channels, start_time, end_time, days, action, default_zone)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING ",
            quiet_columns!()
        )
    } else {
        concat!(
            "UPDATE quiet_rules SET tenant = ?1, account = ?2, channels = ?3, start_time = ?4, end_time = ?5,
                                    days = ?6, action = ?7, default_zone = ?8
             WHERE id = ?9 RETURNING ",
            quiet_columns!()
        )
    };
    let tenant = rule.tenant.as_deref().unwrap_or(ALL_TENANTS);
    let account = rule.account.as_deref().unwrap_or_default();
    let (channels, days, action) = (channels.join(","), days.join(","), rule.action.as_str());
    let (start, end) = (
        rule.start.strftime("%H:%M").to_string(),
        rule.end.strftime("%H:%M").to_string(),
    );
    let mut values: Vec<&dyn rusqlite::ToSql> = vec![
        &tenant,
        &account,
        &channels,
        &start,
        &end,
        &days,
        &action,
        &rule.default_zone,
    ];
    if rule.id != 0 {
        values.push(&rule.id);
    }
    returning(conn, sql, values.as_slice(), quiet_from_row)
}

/// The row a `RETURNING` statement gave, mapped.
fn returning<T>(
    conn: &Connection,
    sql: &str,
    values: impl rusqlite::Params,
    map: fn(&dyn crate::store::rows::StoredRow) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let mut statement = conn.prepare_cached(sql)?;
    let mut rows = statement.query(values)?;
    rows.next()?.map(|row| map(row)).transpose()
}

/// Deletes the row `id` of `table` (one of the policy tables); whether there was one.
pub(super) fn remove(conn: &Connection, table: PolicyTable, id: i64) -> Result<bool, StoreError> {
    let sql = match table {
        PolicyTable::QuietRules => "DELETE FROM quiet_rules WHERE id = ?",
        PolicyTable::RateLimitRules => "DELETE FROM rate_limit_rules WHERE id = ?",
        PolicyTable::BlockEntries => "DELETE FROM block_entries WHERE id = ?",
    };
    Ok(conn.prepare_cached(sql)?.execute([id])? == 1)
}

/// The tables of policy rules.
#[derive(Debug, Clone, Copy)]
pub(super) enum PolicyTable {
    QuietRules,
    RateLimitRules,
    BlockEntries,
}

/// Sets the rate limit for its (tenant, scope, prefix), replacing one that was there.
pub(super) fn set_rate_limit(
    conn: &Connection,
    rule: &RateLimitRule,
) -> Result<RateLimitRule, StoreError> {
    returning(
        conn,
        concat!(
            "INSERT INTO rate_limit_rules (tenant, scope, prefix, max_sends, window_ms) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (tenant, scope, prefix) DO UPDATE SET max_sends = excluded.max_sends, window_ms = excluded.window_ms
             RETURNING ",
            rule_columns!()
        ),
        params![
            rule.tenant.as_deref().unwrap_or(ALL_TENANTS),
            rule.scope.as_str(),
            rule.prefix,
            rule.limit as i64,
            rule.window.as_millis() as i64,
        ],
        rule_from_row,
    )?
    .ok_or_else(|| StoreError::Corrupt("an upsert returned no row".into()))
}

/// Adds a block entry unless one with the same tenant, kind and pattern is there; the entry,
/// and whether it is new.
/// `entry.pattern` is as stored (hashed where it must be), `shown` as listed.
pub(super) fn add_block(
    conn: &Connection,
    entry: &NewBlockEntry,
    shown: Option<&str>,
    now: Timestamp,
) -> Result<(BlockEntry, bool), StoreError> {
    let tenant = entry.tenant.as_deref().unwrap_or(ALL_TENANTS);
    let inserted = conn
        .prepare_cached(
            "INSERT INTO block_entries (tenant, kind, pattern, source, note, created_at, expires_at,
                                        shown)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (tenant, kind, pattern) DO NOTHING",
        )?
        .execute(params![
            tenant,
            entry.kind.as_str(),
            entry.pattern,
            entry.source.as_str(),
            entry.note,
            micros(now),
            entry.expires_at.map(micros),
            shown,
        ])?
        == 1;
    let mut statement = conn.prepare_cached(concat!(
        "SELECT ",
        block_columns!(),
        " FROM block_entries WHERE tenant = ? AND kind = ? AND pattern = ?"
    ))?;
    let mut rows = statement.query(params![tenant, entry.kind.as_str(), entry.pattern])?;
    let row = rows
        .next()?
        .ok_or_else(|| StoreError::Corrupt("a block entry vanished as it was added".into()))?;
    Ok((block_from_row(row)?, inserted))
}

/// Stores a new API key.
pub(super) fn create_api_key(conn: &Connection, key: &ApiKey) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO api_keys (id, tenant, scopes, label, secret_hash, created_at)
         VALUES (?, ?, ?, ?, ?, ?)",
    )?
    .execute(params![
        key.id,
        key.tenant.as_deref().unwrap_or(ALL_TENANTS),
        scopes_text(&key.scopes),
        key.label,
        key.secret_hash,
        micros(key.created_at),
    ])?;
    Ok(())
}

/// Revokes the API key `id`; false when there is none that is still valid.
pub(super) fn revoke_api_key(
    conn: &Connection,
    id: &str,
    now: Timestamp,
) -> Result<bool, StoreError> {
    let revoked = conn
        .prepare_cached("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")?
        .execute(params![micros(now), id])?;
    Ok(revoked == 1)
}

/// Deletes up to `batch` deliveries made before `before` and not in progress (targets and
/// attempts go with them); how many.
pub(super) fn purge(conn: &Connection, before: Timestamp, batch: u32) -> Result<u64, StoreError> {
    // The fraud guard's counts are kept as long as the deliveries they count.
    conn.prepare_cached("DELETE FROM destination_counts WHERE bucket < ?1")?
        .execute(params![micros(bucket_of(before))])?;
    // Holds that ended before then go too (pins stay until lifted).
    conn.prepare_cached("DELETE FROM quarantines WHERE until < ?1")?
        .execute(params![micros(before)])?;
    let deleted = conn
        .prepare_cached(
            "DELETE FROM deliveries WHERE id IN (
                 SELECT id FROM deliveries WHERE created_at < ?1 AND status <> 'IN_PROGRESS'
                 ORDER BY created_at LIMIT ?2)",
        )?
        .execute(params![micros(before), batch])?;
    Ok(deleted as u64)
}

/// Deletes the deliveries of `account` of `tenant` that are not in progress; how many.
pub(super) fn erase_account(
    conn: &Connection,
    tenant: &str,
    account: &str,
) -> Result<u64, StoreError> {
    let deleted = conn
        .prepare_cached(
            "DELETE FROM deliveries WHERE tenant = ?1 AND account = ?2 AND status <> 'IN_PROGRESS'",
        )?
        .execute(params![tenant, account])?;
    Ok(deleted as u64)
}

/// Removes the account block entries of `account` of `tenant` but its opt-outs: how many were
/// removed, how many opt-outs stay.
/// The opt-outs kept are hashed (`erased`: the account's hash and how it is listed).
pub(super) fn erase_account_blocks(
    conn: &Connection,
    tenant: &str,
    account: &str,
    (hashed, shown): (&str, &str),
) -> Result<(u64, u64), StoreError> {
    let removed = conn
        .prepare_cached(
            "DELETE FROM block_entries WHERE tenant = ?1 AND kind = 'ACCOUNT'
             AND pattern IN (?2, ?3) AND source <> 'OPT_OUT'",
        )?
        .execute(params![tenant, account, hashed])?;
    for statement in ERASE_KEEPING_OPT_OUTS {
        conn.prepare_cached(statement)?
            .execute(params![tenant, account, hashed, shown])?;
    }
    let kept: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM block_entries WHERE tenant = ?1 AND kind = 'ACCOUNT'
             AND pattern = ?2",
        )?
        .query_row(params![tenant, hashed], |row| row.get(0))?;
    Ok((removed as u64, kept as u64))
}

/// An erased account's opt-outs in clear (`?2`) become hashed (`?3`, listed as `?4`): one
/// already hashed (an earlier erasure) makes the clear one go.
const ERASE_KEEPING_OPT_OUTS: [&str; 2] = [
    "DELETE FROM block_entries WHERE tenant = ?1 AND kind = 'ACCOUNT' AND pattern = ?2
     AND EXISTS (SELECT 1 FROM block_entries h WHERE h.tenant = ?1 AND h.kind = 'ACCOUNT'
                 AND h.pattern = ?3) AND ?4 IS NOT NULL",
    "UPDATE block_entries SET pattern = ?3, shown = ?4
     WHERE tenant = ?1 AND kind = 'ACCOUNT' AND pattern = ?2",
];
