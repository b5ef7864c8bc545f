//! The SQLite ledger: the embedded default. WAL journal with `synchronous = FULL`, so every
//! committed outcome is on disk before the job message is acked.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};

use super::sqlite_writes::{self as writes, Claimed, micros, timestamp};
use super::writer::GroupWriter;
use super::{
    AttemptEnd, AttemptKey, AttemptStart, Claim, DeliveryKey, Ledger, ListPage, ListQuery,
    NewDelivery, Outcome, PolicyStore, StoreError, TargetUpdate,
};
use crate::domain::{
    Acknowledgement, Attempt, DeliveryId, DeliveryStatus, FailureReason, Report, SmsEncoding,
    SmsShape, TargetResult, TargetStatus,
};
use crate::policy::{
    BlockEntry, NewBlockEntry, QuietHoursRule, RateKey, RateLimitRule, RateLimited,
    parse_time_of_day, parse_weekday, weekday_name,
};

/// The report of a delivery just inserted as IN_PROGRESS, as [`SqliteLedger::load`] would read
/// it back: no attempts, every target pending.
fn fresh_report(new: &NewDelivery, now: Timestamp) -> Report {
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
        expires_at: Timestamp::from_microsecond(micros(new.expires_at)).unwrap_or(new.expires_at),
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

/// A ledger in one SQLite file. Reads use a small pool; writes go through one
/// [`GroupWriter`], which commits the writes of many deliveries with one fsync.
#[derive(Debug, Clone)]
pub struct SqliteLedger {
    pool: SqlitePool,
    writer: GroupWriter,
}

fn parse<T: FromStr<Err = String>>(text: &str) -> Result<T, StoreError> {
    text.parse().map_err(StoreError::Corrupt)
}

fn parse_opt<T: FromStr<Err = String>>(text: Option<String>) -> Result<Option<T>, StoreError> {
    text.as_deref().map(parse).transpose()
}

impl SqliteLedger {
    /// Opens (creating if needed) the database at `url` (`sqlite://PATH`) and migrates it.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?;
        if let Some(parent) = options
            .get_filename()
            .parent()
            .filter(|p| p != &Path::new(""))
        {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        }
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("src/store/migrations/sqlite")
            .run(&pool)
            .await?;
        let writer = GroupWriter::start(options.get_filename())?;
        Ok(SqliteLedger { pool, writer })
    }

    /// The key of a delivery, if known (the writer has its own lookup, inside its transaction).
    async fn key_of(&self, id: &DeliveryId) -> Result<Option<DeliveryKey>, StoreError> {
        let row = sqlx::query("SELECT id FROM deliveries WHERE tenant = ? AND job_id = ?")
            .bind(&id.tenant)
            .bind(&id.job_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|row| row.try_get("id")).transpose()?)
    }

    fn attempt_from_row(row: &SqliteRow) -> Result<Attempt, StoreError> {
        Ok(Attempt {
            provider: row.try_get("provider")?,
            channel: parse(&row.try_get::<String, _>("channel")?)?,
            target: row.try_get("masked_target")?,
            started_at: timestamp(row.try_get("started_at")?)?,
            ended_at: row
                .try_get::<Option<i64>, _>("ended_at")?
                .map(timestamp)
                .transpose()?,
            outcome: parse(&row.try_get::<String, _>("outcome")?)?,
            reason: parse_opt(row.try_get("reason")?)?,
            provider_code: row.try_get("provider_code")?,
            provider_message: row.try_get("provider_message")?,
            retry: row.try_get::<i64, _>("retry")? as u32,
            provider_message_id: row.try_get("provider_message_id")?,
            next_retry_at: row
                .try_get::<Option<i64>, _>("next_retry_at")?
                .map(timestamp)
                .transpose()?,
            token_invalid_since: row
                .try_get::<Option<i64>, _>("token_invalid_since")?
                .map(timestamp)
                .transpose()?,
            sms: match (
                parse_opt::<SmsEncoding>(row.try_get("sms_encoding")?)?,
                row.try_get::<Option<i64>, _>("sms_segments")?,
            ) {
                (Some(encoding), Some(segments)) => Some(SmsShape {
                    encoding,
                    segments: segments as u32,
                }),
                _ => None,
            },
        })
    }

    fn report_from_rows(
        delivery: &SqliteRow,
        targets: &[SqliteRow],
        attempts: &[SqliteRow],
    ) -> Result<Report, StoreError> {
        let tenant: String = delivery.try_get("tenant")?;
        let job_id: String = delivery.try_get("job_id")?;
        let reason: Option<FailureReason> = parse_opt(delivery.try_get("reason")?)?;
        let mut results = Vec::with_capacity(targets.len());
        for row in targets {
            let index = row.try_get::<i64, _>("idx")? as u32;
            let reason: Option<FailureReason> = parse_opt(row.try_get("reason")?)?;
            let mut target_attempts = Vec::new();
            for attempt in attempts {
                if attempt.try_get::<i64, _>("target_idx")? as u32 == index {
                    target_attempts.push(Self::attempt_from_row(attempt)?);
                }
            }
            results.push(TargetResult {
                index,
                channel: parse(&row.try_get::<String, _>("channel")?)?,
                target: row.try_get("label")?,
                platform: parse_opt(row.try_get("platform")?)?,
                status: parse::<TargetStatus>(&row.try_get::<String, _>("status")?)?,
                reason,
                hint: reason.map(FailureReason::hint),
                detail: row.try_get("detail")?,
                acknowledgement: parse_opt(row.try_get("ack")?)?,
                attempts: target_attempts,
            });
        }
        Ok(Report {
            delivery_id: format!("{tenant}/{job_id}"),
            tenant,
            job_id,
            account: delivery.try_get("account")?,
            purpose: delivery.try_get("purpose")?,
            status: parse(&delivery.try_get::<String, _>("status")?)?,
            reason,
            hint: reason.map(FailureReason::hint),
            summary: delivery.try_get("summary")?,
            created_at: timestamp(delivery.try_get("created_at")?)?,
            updated_at: timestamp(delivery.try_get("updated_at")?)?,
            expires_at: timestamp(delivery.try_get("expires_at")?)?,
            targets: results,
        })
    }

    /// How many group transactions the writer has committed (each is one fsync, however many
    /// deliveries' writes it carried).
    pub fn group_commits(&self) -> u64 {
        self.writer.commits()
    }

    async fn load(&self, key: DeliveryKey) -> Result<Option<Report>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let Some(delivery) = sqlx::query("SELECT * FROM deliveries WHERE id = ?")
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?
        else {
            return Ok(None);
        };
        let targets = sqlx::query("SELECT * FROM targets WHERE delivery = ? ORDER BY idx")
            .bind(key)
            .fetch_all(&mut *conn)
            .await?;
        let attempts = sqlx::query("SELECT * FROM attempts WHERE delivery = ? ORDER BY id")
            .bind(key)
            .fetch_all(&mut *conn)
            .await?;
        Self::report_from_rows(&delivery, &targets, &attempts).map(Some)
    }
}

#[async_trait]
impl Ledger for SqliteLedger {
    async fn accept(
        &self,
        new: &NewDelivery,
        now: Timestamp,
    ) -> Result<(Report, bool), StoreError> {
        let new = new.clone();
        let (key, inserted) = self
            .writer
            .write(move |conn| writes::accept(conn, &new, now))
            .await?;
        Ok((self.report(key).await?, inserted))
    }

    async fn forget_accepted(&self, id: &DeliveryId) -> Result<(), StoreError> {
        let id = id.clone();
        self.writer
            .write(move |conn| writes::forget_accepted(conn, &id))
            .await
    }

    async fn claim(
        &self,
        new: &NewDelivery,
        worker: &str,
        takeover: bool,
        now: Timestamp,
    ) -> Result<Claim, StoreError> {
        // The ledger keeps microseconds: the report built here must match the one stored.
        let now = timestamp(micros(now))?;
        let owned = new.clone();
        let worker = worker.to_owned();
        let claimed = self
            .writer
            .write(move |conn| writes::claim(conn, &owned, &worker, takeover, now))
            .await?;
        Ok(match claimed {
            Claimed::Inserted(key) => Claim::Started(key, fresh_report(new, now)),
            Claimed::Taken(key) => Claim::Started(key, self.report(key).await?),
            Claimed::TakenOver(key) => Claim::Resumed(key, self.report(key).await?),
            Claimed::Refused(key) => {
                let report = self.report(key).await?;
                if report.status.is_terminal() {
                    Claim::Finished(report)
                } else {
                    Claim::HeldElsewhere(report)
                }
            }
        })
    }

    async fn start_attempt(
        &self,
        key: DeliveryKey,
        start: &AttemptStart,
    ) -> Result<AttemptKey, StoreError> {
        let start = start.clone();
        self.writer
            .write(move |conn| writes::start_attempt(conn, key, &start))
            .await
    }

    async fn finish_attempt(
        &self,
        key: DeliveryKey,
        attempt: AttemptKey,
        end: &AttemptEnd,
        target: u32,
        update: &TargetUpdate,
    ) -> Result<(), StoreError> {
        let end = end.clone();
        let update = update.clone();
        self.writer
            .write(move |conn| writes::finish_attempt(conn, key, attempt, &end, target, &update))
            .await
    }

    async fn update_target(
        &self,
        key: DeliveryKey,
        index: u32,
        update: &TargetUpdate,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let update = update.clone();
        self.writer
            .write(move |conn| writes::set_target(conn, key, index, &update, now))
            .await
    }

    async fn apply_receipt(
        &self,
        provider: &str,
        message_id: &str,
        end: &AttemptEnd,
    ) -> Result<Option<DeliveryKey>, StoreError> {
        let provider = provider.to_owned();
        let message_id = message_id.to_owned();
        let end = end.clone();
        self.writer
            .write(move |conn| writes::apply_receipt(conn, &provider, &message_id, &end))
            .await
    }

    async fn record_ack(
        &self,
        key: DeliveryKey,
        index: u32,
        ack: Acknowledgement,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.writer
            .write(move |conn| writes::record_ack(conn, key, index, ack.as_str(), now))
            .await
    }

    async fn acknowledgements(
        &self,
        key: DeliveryKey,
    ) -> Result<Vec<(u32, Acknowledgement)>, StoreError> {
        let rows = sqlx::query(
            "SELECT idx, ack FROM targets WHERE delivery = ? AND ack IS NOT NULL ORDER BY idx",
        )
        .bind(key)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get::<i64, _>("idx")? as u32,
                    parse(&row.try_get::<String, _>("ack")?)?,
                ))
            })
            .collect()
    }

    async fn key(&self, id: &DeliveryId) -> Result<Option<DeliveryKey>, StoreError> {
        self.key_of(id).await
    }

    async fn finish(
        &self,
        key: DeliveryKey,
        outcome: &Outcome,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let outcome = outcome.clone();
        self.writer
            .write(move |conn| writes::finish(conn, key, &outcome, now))
            .await
    }

    async fn report(&self, key: DeliveryKey) -> Result<Report, StoreError> {
        self.load(key)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("#{key}")))
    }

    async fn get(&self, id: &DeliveryId) -> Result<Option<Report>, StoreError> {
        match self.key_of(id).await? {
            Some(key) => self.load(key).await,
            None => Ok(None),
        }
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let limit = query.limit.clamp(1, 100) as i64;
        let rows = sqlx::query(
            "SELECT id FROM deliveries
             WHERE tenant = ? AND (? IS NULL OR account = ?) AND (? IS NULL OR status = ?) AND (? IS NULL OR id < ?)
             ORDER BY id DESC LIMIT ?",
        )
        .bind(&query.tenant)
        .bind(&query.account)
        .bind(&query.account)
        .bind(query.status.map(DeliveryStatus::as_str))
        .bind(query.status.map(DeliveryStatus::as_str))
        .bind(query.before)
        .bind(query.before)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut keys: Vec<i64> = rows
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<Result<_, _>>()?;
        let next = if keys.len() as i64 > limit {
            keys.truncate(limit as usize);
            keys.last().copied()
        } else {
            None
        };
        let mut reports = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(report) = self.load(key).await? {
                reports.push(report);
            }
        }
        Ok(ListPage { reports, next })
    }
}

/// The stored form of "every tenant".
const ALL_TENANTS: &str = "*";

fn block_from_row(row: &SqliteRow) -> Result<BlockEntry, StoreError> {
    let tenant: String = row.try_get("tenant")?;
    Ok(BlockEntry {
        id: row.try_get("id")?,
        tenant: (tenant != ALL_TENANTS).then_some(tenant),
        kind: parse(&row.try_get::<String, _>("kind")?)?,
        pattern: row.try_get("pattern")?,
        source: parse(&row.try_get::<String, _>("source")?)?,
        note: row.try_get("note")?,
        created_at: timestamp(row.try_get("created_at")?)?,
        expires_at: row
            .try_get::<Option<i64>, _>("expires_at")?
            .map(timestamp)
            .transpose()?,
    })
}

fn rule_from_row(row: &SqliteRow) -> Result<RateLimitRule, StoreError> {
    let tenant: String = row.try_get("tenant")?;
    Ok(RateLimitRule {
        id: row.try_get("id")?,
        tenant: (tenant != ALL_TENANTS).then_some(tenant),
        scope: parse(&row.try_get::<String, _>("scope")?)?,
        prefix: row.try_get("prefix")?,
        limit: row.try_get::<i64, _>("max_sends")? as u32,
        window: Duration::from_millis(row.try_get::<i64, _>("window_ms")? as u64),
    })
}

fn quiet_from_row(row: &SqliteRow) -> Result<QuietHoursRule, StoreError> {
    let tenant: String = row.try_get("tenant")?;
    let account: String = row.try_get("account")?;
    let list = |column: &str| -> Result<Vec<String>, StoreError> {
        let text: String = row.try_get(column)?;
        Ok(text
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect())
    };
    let time = |column: &str| -> Result<jiff::civil::Time, StoreError> {
        let text: String = row.try_get(column)?;
        parse_time_of_day(&text).ok_or_else(|| StoreError::Corrupt(format!("{column} `{text}`")))
    };
    Ok(QuietHoursRule {
        id: row.try_get("id")?,
        tenant: (tenant != ALL_TENANTS).then_some(tenant),
        account: (!account.is_empty()).then_some(account),
        channels: list("channels")?
            .iter()
            .map(|c| parse(c))
            .collect::<Result<_, _>>()?,
        start: time("start_time")?,
        end: time("end_time")?,
        days: list("days")?
            .iter()
            .map(|d| parse_weekday(d).ok_or_else(|| StoreError::Corrupt(format!("day `{d}`"))))
            .collect::<Result<_, _>>()?,
        action: parse(&row.try_get::<String, _>("action")?)?,
        default_zone: row.try_get("default_zone")?,
    })
}

#[async_trait]
impl PolicyStore for SqliteLedger {
    async fn set_quiet_hours(&self, rule: &QuietHoursRule) -> Result<QuietHoursRule, StoreError> {
        let channels: Vec<&str> = rule.channels.iter().map(|c| c.as_str()).collect();
        let days: Vec<&str> = rule.days.iter().map(|d| weekday_name(*d)).collect();
        let sql = if rule.id == 0 {
            "INSERT INTO quiet_rules (tenant, account, channels, start_time, end_time, days, action, default_zone)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING *"
        } else {
            "UPDATE quiet_rules SET tenant = ?, account = ?, channels = ?, start_time = ?, end_time = ?, days = ?,
                                    action = ?, default_zone = ?
             WHERE id = ? RETURNING *"
        };
        let mut query = sqlx::query(sql)
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
        let row = query
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("quiet-hours rule #{}", rule.id)))?;
        quiet_from_row(&row)
    }

    async fn remove_quiet_hours(&self, id: i64) -> Result<bool, StoreError> {
        let removed = sqlx::query("DELETE FROM quiet_rules WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(removed.rows_affected() == 1)
    }

    async fn list_quiet_hours(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<QuietHoursRule>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM quiet_rules WHERE (? IS NULL OR tenant = ? OR tenant = '*') ORDER BY id",
        )
        .bind(tenant)
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(quiet_from_row).collect()
    }

    async fn set_rate_limit(&self, rule: &RateLimitRule) -> Result<RateLimitRule, StoreError> {
        let tenant = rule.tenant.as_deref().unwrap_or(ALL_TENANTS);
        let row = sqlx::query(
            "INSERT INTO rate_limit_rules (tenant, scope, prefix, max_sends, window_ms) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (tenant, scope, prefix) DO UPDATE SET max_sends = excluded.max_sends, window_ms = excluded.window_ms
             RETURNING *",
        )
        .bind(tenant)
        .bind(rule.scope.as_str())
        .bind(&rule.prefix)
        .bind(rule.limit as i64)
        .bind(rule.window.as_millis() as i64)
        .fetch_one(&self.pool)
        .await?;
        rule_from_row(&row)
    }

    async fn remove_rate_limit(&self, id: i64) -> Result<bool, StoreError> {
        let removed = sqlx::query("DELETE FROM rate_limit_rules WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(removed.rows_affected() == 1)
    }

    async fn list_rate_limits(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<RateLimitRule>, StoreError> {
        let rows = sqlx::query("SELECT * FROM rate_limit_rules WHERE (? IS NULL OR tenant = ? OR tenant = '*') ORDER BY id")
            .bind(tenant)
            .bind(tenant)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(rule_from_row).collect()
    }

    async fn peek(
        &self,
        keys: &[RateKey<'_>],
        now: Timestamp,
    ) -> Result<Option<RateLimited>, StoreError> {
        for RateKey { rule, key } in keys {
            let since = micros(now) - rule.window.as_micros() as i64;
            let row = sqlx::query(
                "SELECT count(*) AS hits, min(at) AS oldest FROM rate_hits WHERE rule = ? AND key = ? AND at > ?",
            )
            .bind(rule.id)
            .bind(key)
            .bind(since)
            .fetch_one(&self.pool)
            .await?;
            if row.try_get::<i64, _>("hits")? >= rule.limit as i64 {
                let window = jiff::SignedDuration::try_from(rule.window)
                    .unwrap_or(jiff::SignedDuration::MAX);
                let oldest = row
                    .try_get::<Option<i64>, _>("oldest")?
                    .map(timestamp)
                    .transpose()?;
                return Ok(Some(RateLimited {
                    rule: (*rule).clone(),
                    allowed_at: oldest.unwrap_or(now) + window,
                }));
            }
        }
        Ok(None)
    }

    async fn consume(
        &self,
        keys: &[RateKey<'_>],
        now: Timestamp,
    ) -> Result<Option<RateLimited>, StoreError> {
        if keys.is_empty() {
            return Ok(None);
        }
        let keys: Vec<(RateLimitRule, String)> = keys
            .iter()
            .map(|k| (k.rule.clone(), k.key.clone()))
            .collect();
        self.writer
            .write(move |conn| writes::consume(conn, &keys, now))
            .await
    }

    async fn add_block(
        &self,
        entry: &NewBlockEntry,
        now: Timestamp,
    ) -> Result<(BlockEntry, bool), StoreError> {
        let tenant = entry.tenant.as_deref().unwrap_or(ALL_TENANTS);
        let inserted = sqlx::query(
            "INSERT INTO block_entries (tenant, kind, pattern, source, note, created_at, expires_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (tenant, kind, pattern) DO NOTHING",
        )
        .bind(tenant)
        .bind(entry.kind.as_str())
        .bind(&entry.pattern)
        .bind(entry.source.as_str())
        .bind(&entry.note)
        .bind(micros(now))
        .bind(entry.expires_at.map(micros))
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1;
        let row = sqlx::query(
            "SELECT * FROM block_entries WHERE tenant = ? AND kind = ? AND pattern = ?",
        )
        .bind(tenant)
        .bind(entry.kind.as_str())
        .bind(&entry.pattern)
        .fetch_one(&self.pool)
        .await?;
        Ok((block_from_row(&row)?, inserted))
    }

    async fn remove_block(&self, id: i64) -> Result<bool, StoreError> {
        let removed = sqlx::query("DELETE FROM block_entries WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(removed.rows_affected() == 1)
    }

    async fn list_blocks(&self, tenant: Option<&str>) -> Result<Vec<BlockEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM block_entries WHERE (? IS NULL OR tenant = ? OR tenant = '*') ORDER BY id DESC",
        )
        .bind(tenant)
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(block_from_row).collect()
    }

    async fn block_candidates(
        &self,
        tenant: &str,
        patterns: &[&str],
        now: Timestamp,
    ) -> Result<Vec<BlockEntry>, StoreError> {
        let placeholders = vec!["?"; patterns.len().max(1)].join(", ");
        let sql = format!(
            "SELECT * FROM block_entries
             WHERE tenant IN (?, '*') AND (expires_at IS NULL OR expires_at > ?)
               AND (kind = 'PREFIX' OR pattern IN ({placeholders}))"
        );
        // Only placeholders are interpolated: the values are bound.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(tenant)
            .bind(micros(now));
        if patterns.is_empty() {
            query = query.bind("");
        }
        for pattern in patterns {
            query = query.bind(*pattern);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(block_from_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AttemptOutcome, Channel, Platform};
    use crate::store::sqlite_writes::INTERRUPTED;
    use crate::store::{NewTarget, TargetUpdate};

    fn new_delivery(job_id: &str) -> NewDelivery {
        NewDelivery {
            id: DeliveryId {
                tenant: "acme".into(),
                job_id: job_id.into(),
            },
            account: "user-42".into(),
            purpose: "sign_in".into(),
            expires_at: Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(1),
            targets: vec![
                NewTarget {
                    channel: Channel::Push,
                    label: "ipad-1".into(),
                    platform: Some(Platform::Apns),
                },
                NewTarget {
                    channel: Channel::Sms,
                    label: "+1415•••0101".into(),
                    platform: None,
                },
            ],
        }
    }

    async fn ledger(dir: &tempfile::TempDir) -> SqliteLedger {
        SqliteLedger::connect(&format!("sqlite://{}/ledger.db", dir.path().display()))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn claims_are_exclusive_and_finished_deliveries_stay_finished() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = ledger(&dir).await;
        let now = Timestamp::UNIX_EPOCH;
        let new = new_delivery("j1");

        let Claim::Started(key, report) = ledger.claim(&new, "w1", false, now).await.unwrap()
        else {
            panic!("first claim starts");
        };
        assert_eq!(report.status, DeliveryStatus::InProgress);
        assert_eq!(report.targets.len(), 2);
        assert!(matches!(
            ledger.claim(&new, "w2", false, now).await.unwrap(),
            Claim::HeldElsewhere(_)
        ));

        let attempt = ledger
            .start_attempt(
                key,
                &AttemptStart {
                    target: 1,
                    provider: "sandbox".into(),
                    channel: Channel::Sms,
                    masked_target: "+1415•••0101".into(),
                    started_at: now,
                    retry: 0,
                    sms: Some(SmsShape {
                        encoding: SmsEncoding::Ucs2,
                        segments: 2,
                    }),
                },
            )
            .await
            .unwrap();
        // The worker dies here; the broker redelivers to w2, which takes over.
        let Claim::Resumed(_, report) = ledger.claim(&new, "w2", true, now).await.unwrap() else {
            panic!("takeover resumes");
        };
        let interrupted = &report.targets[1].attempts[0];
        assert_eq!(interrupted.outcome, AttemptOutcome::Failed);
        assert_eq!(interrupted.provider_message.as_deref(), Some(INTERRUPTED));
        ledger
            .finish_attempt(
                key,
                attempt,
                &AttemptEnd {
                    ended_at: now,
                    outcome: AttemptOutcome::Sent,
                    reason: None,
                    provider_code: None,
                    provider_message: None,
                    provider_message_id: Some("m1".into()),
                    next_retry_at: None,
                    token_invalid_since: None,
                },
                1,
                &TargetUpdate {
                    channel: Channel::Sms,
                    status: TargetStatus::Sent,
                    reason: None,
                    detail: None,
                },
            )
            .await
            .unwrap();
        let outcome = Outcome {
            status: DeliveryStatus::Sent,
            reason: None,
            summary: "done".into(),
        };
        ledger.finish(key, &outcome, now).await.unwrap();
        assert!(
            matches!(ledger.claim(&new, "w3", true, now).await.unwrap(), Claim::Finished(r) if r.summary == "done")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_commits_and_a_failing_one_undoes_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = ledger(&dir).await;
        let now = Timestamp::from_microsecond(1_700_000_000_123_456).unwrap();
        let before = ledger.group_commits();
        // All submitted at once (as a busy consumer's jobs do), the orphan among them.
        let news: Vec<NewDelivery> = (0..300)
            .map(|i| new_delivery(&format!("job-{i}")))
            .collect();
        let claims = futures_util::future::join_all(
            news.iter().map(|new| ledger.claim(new, "w1", false, now)),
        );
        // A write that breaks a constraint (no delivery 999999).
        let start = AttemptStart {
            target: 0,
            provider: "sandbox".into(),
            channel: Channel::Sms,
            masked_target: "x".into(),
            started_at: now,
            retry: 0,
            sms: None,
        };
        let orphan = ledger.start_attempt(999_999, &start);
        let (claims, orphan) = tokio::join!(claims, orphan);
        assert!(
            matches!(orphan, Err(StoreError::Engine(_))),
            "the orphan attempt is refused: {orphan:?}"
        );
        let claimed: Vec<(DeliveryKey, Report)> = claims
            .into_iter()
            .map(|claim| match claim.unwrap() {
                Claim::Started(key, report) => (key, report),
                other => panic!("a new delivery starts: {other:?}"),
            })
            .collect();
        let commits = ledger.group_commits() - before;
        assert!(
            commits < 100,
            "300 concurrent claims took {commits} commits: they were not grouped"
        );
        drop(ledger);

        // Every claim answered is on disk, and reads back as the report the claim returned.
        let reopened = super::tests::ledger(&dir).await;
        for (key, report) in claimed {
            let stored = reopened.report(key).await.unwrap();
            assert_eq!(
                serde_json::to_value(&stored).unwrap(),
                serde_json::to_value(&report).unwrap()
            );
        }
    }

    #[tokio::test]
    async fn accepted_deliveries_are_claimed_once_and_lists_page_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = ledger(&dir).await;
        let now = Timestamp::UNIX_EPOCH;
        for i in 0..5 {
            let (_, created) = ledger
                .accept(&new_delivery(&format!("j{i}")), now)
                .await
                .unwrap();
            assert!(created);
        }
        let (report, created) = ledger.accept(&new_delivery("j0"), now).await.unwrap();
        assert!(!created);
        assert_eq!(report.status, DeliveryStatus::Accepted);
        assert!(matches!(
            ledger
                .claim(&new_delivery("j0"), "w", false, now)
                .await
                .unwrap(),
            Claim::Started(..)
        ));

        let mut query = ListQuery {
            tenant: "acme".into(),
            account: None,
            status: None,
            limit: 2,
            before: None,
        };
        let page = ledger.list(&query).await.unwrap();
        assert_eq!(
            page.reports
                .iter()
                .map(|r| r.job_id.as_str())
                .collect::<Vec<_>>(),
            ["j4", "j3"]
        );
        query.before = page.next;
        query.limit = 10;
        let page = ledger.list(&query).await.unwrap();
        assert_eq!(page.reports.len(), 3);
        assert!(page.next.is_none());
        query.before = None;
        query.status = Some(DeliveryStatus::InProgress);
        assert_eq!(ledger.list(&query).await.unwrap().reports[0].job_id, "j0");

        ledger
            .forget_accepted(&new_delivery("j1").id)
            .await
            .unwrap();
        assert!(ledger.get(&new_delivery("j1").id).await.unwrap().is_none());
        ledger
            .forget_accepted(&new_delivery("j0").id)
            .await
            .unwrap();
        assert!(
            ledger.get(&new_delivery("j0").id).await.unwrap().is_some(),
            "only ACCEPTED ones go"
        );
    }
}
