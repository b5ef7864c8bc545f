//! The engine's hot statements as multi-row statements, one per kind, each over many
//! deliveries (see [`super::batch`]): the claim of new deliveries together with the block
//! entries that could apply to the jobs starting (one statement for both: a job reads its block
//! list while it claims), an attempt's start, its end with its target's state, and a
//! delivery's end.
//! Each write fences the owner as the single writes do (a delivery in progress is written only
//! by a worker that still owns it) and locks the deliveries it changes in key order.
//!
//! Every table a statement changes or joins is also narrowed by its keys as an array
//! (`id = ANY($n)`), besides the join on the unnested rows: the planner then reaches the rows
//! through the key's index whatever its statistics say, instead of hashing a whole table that
//! grew since autovacuum last analyzed it (see the staged pool's settings in `mod.rs`). Those
//! arrays are bound sorted and without repeats ([`in_key_order`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgPool, Row};

use super::batch::{BatchResult, Batcher, RunBatch};
use super::rows::{ALL_TENANTS, block_from_row};
use super::writes::{ANNOUNCED, taken_over};
use crate::domain::{DeliveryStatus, FailureReason, TargetStatus};
use crate::policy::BlockEntry;
use crate::store::{
    AttemptEnd, AttemptKey, AttemptStart, DeliveryKey, NewDelivery, Outcome, PendingEnd, Revision,
    StoreError, TargetUpdate,
};

/// A statement being bound, whose columns the `*Columns` structs below add in their order.
type Query<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// A new delivery claimed by `owner` (inserted unless its `(tenant, job_id)` is known).
pub(super) struct NewClaim {
    pub(super) new: NewDelivery,
    pub(super) owner: String,
    pub(super) lease_until: i64,
    pub(super) now: i64,
}

/// A provider call starting.
pub(super) struct Start {
    pub(super) key: DeliveryKey,
    pub(super) start: AttemptStart,
}

/// A provider call's end and its target's new state.
pub(super) struct End {
    pub(super) key: DeliveryKey,
    pub(super) attempt: AttemptKey,
    pub(super) end: AttemptEnd,
    pub(super) target: u32,
    pub(super) update: TargetUpdate,
}

/// A delivery's end, written only if the delivery is still at `revision`; with the engine's
/// last provider call's end (`end`) when that was not written yet.
pub(super) struct Finish {
    pub(super) key: DeliveryKey,
    pub(super) outcome: Outcome,
    pub(super) now: i64,
    pub(super) revision: Revision,
    pub(super) end: Option<PendingEnd>,
}

/// The block entries in force at `now` that could apply to a job of `tenant` whose account,
/// numbers and tokens are `patterns` (every prefix entry of the tenant, exact entries only for
/// those patterns).
pub(super) struct BlockQuery {
    /// Tells queries apart (each goes in a batch of its own kind once).
    pub(super) seq: u64,
    pub(super) tenant: String,
    pub(super) patterns: Vec<String>,
    pub(super) now: i64,
}

/// What a job starting asks of the ledger, both in one statement ([`open`]): its delivery's
/// claim, and the block entries that could apply to it (a read also made alone, by Explain).
pub(super) enum Opening {
    Claim(NewClaim),
    Blocks(BlockQuery),
}

/// The answer to an [`Opening`]: the new delivery's key (`None`: it was known), or the block
/// entries found.
pub(super) enum Opened {
    Claim(Option<DeliveryKey>),
    Blocks(Vec<BlockEntry>),
}

impl Opened {
    /// A claim's answer.
    pub(super) fn claim(self) -> Result<Option<DeliveryKey>, StoreError> {
        match self {
            Opened::Claim(inserted) => Ok(inserted),
            Opened::Blocks(_) => Err(mismatched()),
        }
    }

    /// A block read's answer.
    pub(super) fn blocks(self) -> Result<Vec<BlockEntry>, StoreError> {
        match self {
            Opened::Blocks(found) => Ok(found),
            Opened::Claim(_) => Err(mismatched()),
        }
    }
}

fn mismatched() -> StoreError {
    StoreError::Corrupt("an opening got the answer of another kind".into())
}

/// What tells openings apart in a batch: a delivery (claimed once per statement), or a query.
#[derive(PartialEq, Eq, Hash)]
pub(super) enum OpeningKey {
    Claim(String, String),
    Blocks(u64),
}

impl Opening {
    fn key(&self) -> OpeningKey {
        match self {
            Opening::Claim(c) => {
                OpeningKey::Claim(c.new.id.tenant.clone(), c.new.id.job_id.clone())
            }
            Opening::Blocks(q) => OpeningKey::Blocks(q.seq),
        }
    }
}

/// The batchers of the hot statements.
pub(super) struct Groups {
    pub(super) openings: Batcher<Opening, Opened>,
    pub(super) starts: Batcher<Start, AttemptKey>,
    pub(super) ends: Batcher<End, ()>,
    pub(super) finishes: Batcher<Finish, bool>,
}

/// The workers this process claims as (their writes to deliveries in progress hold).
pub(super) type Workers = Arc<Mutex<HashSet<String>>>;

fn owners(workers: &Workers) -> Vec<String> {
    workers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .cloned()
        .collect()
}

impl Groups {
    /// Starts the batchers, on `pool` (the staged pool: asynchronous commits).
    pub(super) fn start(
        pool: &PgPool,
        workers: &Workers,
        stop: &tokio_util::sync::CancellationToken,
        watch: &crate::store::CommitWatch,
    ) -> Self {
        let told = |name: &'static str| Some((name, watch.clone()));
        let run_openings: RunBatch<Opening, Opened> =
            Arc::new(|pool, items| Box::pin(open(pool, items)));
        let fenced = Arc::clone(workers);
        let run_starts: RunBatch<Start, AttemptKey> = Arc::new(move |pool, items| {
            let owners = owners(&fenced);
            Box::pin(async move { start_attempts(pool, items, &owners).await })
        });
        let fenced = Arc::clone(workers);
        let run_ends: RunBatch<End, ()> = Arc::new(move |pool, items| {
            let owners = owners(&fenced);
            Box::pin(async move { finish_attempts(pool, items, &owners).await })
        });
        let fenced = Arc::clone(workers);
        let run_finishes: RunBatch<Finish, bool> = Arc::new(move |pool, items| {
            let owners = owners(&fenced);
            Box::pin(async move { finish_deliveries(pool, items, &owners).await })
        });
        Groups {
            openings: Batcher::start(
                pool.clone(),
                stop.clone(),
                Opening::key,
                run_openings,
                told("claims"),
            ),
            starts: Batcher::start(
                pool.clone(),
                stop.clone(),
                |s: &Start| s.key,
                run_starts,
                told("attempt_starts"),
            ),
            ends: Batcher::start(
                pool.clone(),
                stop.clone(),
                |e: &End| e.key,
                run_ends,
                told("attempt_ends"),
            ),
            finishes: Batcher::start(
                pool.clone(),
                stop.clone(),
                |f: &Finish| f.key,
                run_finishes,
                told("finishes"),
            ),
        }
    }
}

impl Groups {
    /// The statements run so far, every kind together.
    pub(super) fn statements(&self) -> u64 {
        self.openings.statements()
            + self.starts.statements()
            + self.ends.statements()
            + self.finishes.statements()
    }
}

/// Claims the new deliveries among `items` (inserted, with their targets, unless their
/// `(tenant, job_id)` is known; owned by their claimers) and reads the block entries in force
/// that could apply to the jobs of its block queries, in one statement: per item, the new key
/// (`None` when the delivery was there) or the entries found.
///
/// The statement returns the claims' rows (`id, tenant, job_id`, then NULLs, query -1) and the
/// block entries' ([`super::rows::BLOCK_COLUMNS`], then the query's number) together.
async fn open(pool: &PgPool, items: &[Opening]) -> BatchResult<Opened> {
    let mut claims = ClaimColumns::default();
    let mut queries = BlockColumns::default();
    for item in items {
        match item {
            Opening::Claim(claim) => claims.push(claim),
            Opening::Blocks(query) => queries.push(query),
        }
    }
    let query = sqlx::query(
        "WITH d AS (
             INSERT INTO deliveries (tenant, job_id, account, purpose, status, owner, lease_until,
                                     expires_at, created_at, updated_at)
             SELECT x.tenant, x.job_id, x.account, x.purpose, $9, x.owner, x.lease_until,
                    x.expires_at, x.now, x.now
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                         $7::bigint[], $8::bigint[])
                  AS x (tenant, job_id, account, purpose, owner, lease_until, expires_at, now)
             ON CONFLICT (tenant, job_id) DO NOTHING RETURNING id, tenant, job_id
         ), t AS (
             INSERT INTO targets (delivery, idx, channel, label, platform, status)
             SELECT d.id, y.idx, y.channel, y.label, y.platform, $16
             FROM d JOIN UNNEST($10::text[], $11::text[], $12::int[], $13::text[], $14::text[],
                                $15::text[]) AS y (tenant, job_id, idx, channel, label, platform)
                  ON y.tenant = d.tenant AND y.job_id = d.job_id
         )
         SELECT id, tenant, job_id, NULL::text, NULL::text, NULL::text, NULL::bigint,
                NULL::bigint, NULL::text, -1
         FROM d
         UNION ALL
         SELECT b.id, b.tenant, b.kind, b.pattern, b.source, b.note, b.created_at, b.expires_at,
                b.shown, q.query
         FROM UNNEST($17::int[], $18::text[], $19::bigint[]) AS q (query, tenant, now)
         JOIN block_entries b ON b.tenant IN (q.tenant, $23) AND b.kind = 'PREFIX'
         WHERE b.expires_at IS NULL OR b.expires_at > q.now
         UNION ALL
         SELECT b.id, b.tenant, b.kind, b.pattern, b.source, b.note, b.created_at, b.expires_at,
                b.shown, q.query
         FROM UNNEST($20::int[], $21::text[], $22::bigint[], $24::text[])
              AS q (query, tenant, now, pattern)
         JOIN block_entries b ON b.pattern = q.pattern AND b.pattern = ANY($25)
                              AND b.kind <> 'PREFIX'
                              AND b.tenant IN (q.tenant, $23)
         WHERE b.expires_at IS NULL OR b.expires_at > q.now",
    );
    let rows = queries.bind(claims.bind(query)).fetch_all(pool).await?;
    let mut inserted = HashMap::with_capacity(claims.tenants.len());
    let mut found: Vec<Vec<BlockEntry>> = vec![Vec::new(); queries.queries.len()];
    for row in &rows {
        match usize::try_from(row.try_get::<i32, _>(9)?) {
            Ok(query) => {
                if let Some(entries) = found.get_mut(query) {
                    entries.push(block_from_row(row)?);
                }
            }
            Err(_) => {
                let tenant: String = row.try_get(1)?;
                let job_id: String = row.try_get(2)?;
                inserted.insert((tenant, job_id), row.try_get::<i64, _>(0)?);
            }
        }
    }
    let mut found = found.into_iter();
    Ok(items
        .iter()
        .map(|item| match item {
            Opening::Claim(claim) => {
                let id = &claim.new.id;
                Ok(Opened::Claim(
                    inserted
                        .get(&(id.tenant.clone(), id.job_id.clone()))
                        .copied(),
                ))
            }
            Opening::Blocks(_) => Ok(Opened::Blocks(found.next().unwrap_or_default())),
        })
        .collect())
}

/// The new deliveries of an [`open`] statement, column by column (parameters `$1` to `$16`).
#[derive(Default)]
struct ClaimColumns<'a> {
    tenants: Vec<&'a str>,
    job_ids: Vec<&'a str>,
    accounts: Vec<&'a str>,
    purposes: Vec<&'a str>,
    owners: Vec<&'a str>,
    leases: Vec<i64>,
    expiries: Vec<i64>,
    nows: Vec<i64>,
    t_tenants: Vec<&'a str>,
    t_jobs: Vec<&'a str>,
    t_indexes: Vec<i32>,
    t_channels: Vec<&'a str>,
    t_labels: Vec<&'a str>,
    t_platforms: Vec<Option<&'a str>>,
}

impl<'a> ClaimColumns<'a> {
    fn push(&mut self, claim: &'a NewClaim) {
        let new = &claim.new;
        self.tenants.push(new.id.tenant.as_str());
        self.job_ids.push(new.id.job_id.as_str());
        self.accounts.push(new.account.as_str());
        self.purposes.push(new.purpose.as_str());
        self.owners.push(claim.owner.as_str());
        self.leases.push(claim.lease_until);
        self.expiries.push(super::rows::micros(new.expires_at));
        self.nows.push(claim.now);
        for (index, target) in new.targets.iter().enumerate() {
            self.t_tenants.push(new.id.tenant.as_str());
            self.t_jobs.push(new.id.job_id.as_str());
            self.t_indexes.push(index as i32);
            self.t_channels.push(target.channel.as_str());
            self.t_labels.push(target.label.as_str());
            self.t_platforms.push(target.platform.map(|p| p.as_str()));
        }
    }

    fn bind<'q>(&'q self, query: Query<'q>) -> Query<'q> {
        query
            .bind(&self.tenants)
            .bind(&self.job_ids)
            .bind(&self.accounts)
            .bind(&self.purposes)
            .bind(&self.owners)
            .bind(&self.leases)
            .bind(&self.expiries)
            .bind(&self.nows)
            .bind(DeliveryStatus::InProgress.as_str())
            .bind(&self.t_tenants)
            .bind(&self.t_jobs)
            .bind(&self.t_indexes)
            .bind(&self.t_channels)
            .bind(&self.t_labels)
            .bind(&self.t_platforms)
            .bind(TargetStatus::Pending.as_str())
    }
}

/// The block queries of an [`open`] statement, column by column (parameters `$17` to `$25`):
/// one row per query for its tenant's prefix entries, one per pattern for the exact entries.
#[derive(Default)]
struct BlockColumns<'a> {
    queries: Vec<i32>,
    tenants: Vec<&'a str>,
    nows: Vec<i64>,
    p_queries: Vec<i32>,
    p_tenants: Vec<&'a str>,
    p_nows: Vec<i64>,
    patterns: Vec<&'a str>,
}

impl<'a> BlockColumns<'a> {
    fn push(&mut self, item: &'a BlockQuery) {
        let query = self.queries.len() as i32;
        self.queries.push(query);
        self.tenants.push(item.tenant.as_str());
        self.nows.push(item.now);
        for pattern in &item.patterns {
            self.p_queries.push(query);
            self.p_tenants.push(item.tenant.as_str());
            self.p_nows.push(item.now);
            self.patterns.push(pattern.as_str());
        }
    }

    fn bind<'q>(&'q self, query: Query<'q>) -> Query<'q> {
        query
            .bind(&self.queries)
            .bind(&self.tenants)
            .bind(&self.nows)
            .bind(&self.p_queries)
            .bind(&self.p_tenants)
            .bind(&self.p_nows)
            .bind(ALL_TENANTS)
            .bind(&self.patterns)
            .bind(in_key_order(self.patterns.iter().copied()))
    }
}

/// Records the provider calls starting; per start, the attempt's key (a Conflict where the
/// delivery was taken over by another replica).
async fn start_attempts(
    pool: &PgPool,
    items: &[Start],
    owners: &[String],
) -> BatchResult<AttemptKey> {
    let count = items.len();
    let mut keys = Vec::with_capacity(count);
    let mut targets = Vec::with_capacity(count);
    let mut providers = Vec::with_capacity(count);
    let mut channels = Vec::with_capacity(count);
    let mut masked = Vec::with_capacity(count);
    let mut started = Vec::with_capacity(count);
    let mut retries = Vec::with_capacity(count);
    let mut encodings: Vec<Option<&str>> = Vec::with_capacity(count);
    let mut segments: Vec<Option<i32>> = Vec::with_capacity(count);
    let mut ranges: Vec<Option<&str>> = Vec::with_capacity(count);
    for Start { key, start } in items {
        keys.push(*key);
        targets.push(start.target as i32);
        providers.push(start.provider.as_str());
        channels.push(start.channel.as_str());
        masked.push(start.masked_target.as_str());
        started.push(super::rows::micros(start.started_at));
        retries.push(start.retry as i32);
        encodings.push(start.sms.map(|s| s.encoding.as_str()));
        segments.push(start.sms.map(|s| s.segments as i32));
        ranges.push(start.range.as_deref());
    }
    let rows = sqlx::query(
        "INSERT INTO attempts (delivery, target_idx, provider, channel, masked_target, started_at,
                               outcome, retry, sms_encoding, sms_segments, dest_range)
         SELECT x.delivery, x.target_idx, x.provider, x.channel, x.masked_target, x.started_at,
                'IN_FLIGHT', x.retry, x.sms_encoding, x.sms_segments, x.dest_range
         FROM UNNEST($1::bigint[], $2::int[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                     $7::int[], $8::text[], $9::int[], $12::text[])
              AS x (delivery, target_idx, provider, channel, masked_target, started_at, retry,
                    sms_encoding, sms_segments, dest_range)
         JOIN deliveries d ON d.id = x.delivery
         WHERE d.id = ANY($11) AND (d.status <> 'IN_PROGRESS' OR d.owner = ANY($10))
         RETURNING delivery, id",
    )
    .bind(&keys)
    .bind(&targets)
    .bind(&providers)
    .bind(&channels)
    .bind(&masked)
    .bind(&started)
    .bind(&retries)
    .bind(&encodings)
    .bind(&segments)
    .bind(owners)
    .bind(in_key_order(keys.iter().copied()))
    .bind(&ranges)
    .fetch_all(pool)
    .await?;
    let started = keyed(&rows)?;
    Ok(keys
        .iter()
        .map(|key| started.get(key).copied().ok_or_else(|| taken_over(*key)))
        .collect())
}

/// The columns of provider calls' ends and their targets' new states, one row per write (all
/// NULL for a write that carries no end), bound in this order after the statement's earlier
/// parameters, and unnested as [`END_COLUMNS`] names them.
#[derive(Default)]
struct EndColumns<'a> {
    attempts: Vec<Option<i64>>,
    ended: Vec<Option<i64>>,
    outcomes: Vec<Option<&'a str>>,
    reasons: Vec<Option<&'a str>>,
    codes: Vec<Option<&'a str>>,
    messages: Vec<Option<&'a str>>,
    message_ids: Vec<Option<&'a str>>,
    receipt_keys: Vec<Option<&'a str>>,
    next_retries: Vec<Option<i64>>,
    invalid_since: Vec<Option<i64>>,
    indexes: Vec<Option<i32>>,
    channels: Vec<Option<&'a str>>,
    statuses: Vec<Option<&'a str>>,
    target_reasons: Vec<Option<&'a str>>,
    details: Vec<Option<&'a str>>,
}

impl<'a> EndColumns<'a> {
    fn push(&mut self, end: Option<(AttemptKey, &'a AttemptEnd, u32, &'a TargetUpdate)>) {
        let attempt = end.map(|(attempt, ..)| attempt);
        let update = end.map(|(.., update)| update);
        let (end, target) = (end.map(|(_, end, ..)| end), end.map(|(_, _, t, _)| t));
        self.attempts.push(attempt);
        self.ended
            .push(end.map(|e| super::rows::micros(e.ended_at)));
        self.outcomes.push(end.map(|e| e.outcome.as_str()));
        self.reasons
            .push(end.and_then(|e| e.reason.map(FailureReason::as_str)));
        self.codes
            .push(end.and_then(|e| e.provider_code.as_deref()));
        self.messages
            .push(end.and_then(|e| e.provider_message.as_deref()));
        self.message_ids
            .push(end.and_then(|e| e.provider_message_id.as_deref()));
        self.receipt_keys
            .push(end.and_then(AttemptEnd::receipt_key));
        self.next_retries
            .push(end.and_then(|e| e.next_retry_at.map(super::rows::micros)));
        self.invalid_since
            .push(end.and_then(|e| e.token_invalid_since.map(super::rows::micros)));
        self.indexes.push(target.map(|t| t as i32));
        self.channels.push(update.map(|u| u.channel.as_str()));
        self.statuses.push(update.map(|u| u.status.as_str()));
        self.target_reasons
            .push(update.and_then(|u| u.reason.map(FailureReason::as_str)));
        self.details.push(update.and_then(|u| u.detail.as_deref()));
    }

    fn bind<'q>(&'q self, query: Query<'q>) -> Query<'q> {
        query
            .bind(&self.attempts)
            .bind(&self.ended)
            .bind(&self.outcomes)
            .bind(&self.reasons)
            .bind(&self.codes)
            .bind(&self.messages)
            .bind(&self.message_ids)
            .bind(&self.receipt_keys)
            .bind(&self.next_retries)
            .bind(&self.invalid_since)
            .bind(&self.indexes)
            .bind(&self.channels)
            .bind(&self.statuses)
            .bind(&self.target_reasons)
            .bind(&self.details)
    }
}

/// The names [`EndColumns`] are unnested as, in their order.
const END_COLUMNS: &str = "attempt, ended_at, outcome, end_reason, provider_code, provider_message,
     provider_message_id, receipt_key, next_retry_at, token_invalid_since, idx, channel, target_status,
     target_reason, detail";

/// The statement parts that write the ends of `x` (unnested with [`END_COLUMNS`]) for the
/// deliveries in `own`: `a`, the attempts (whose keys in key order are parameter `$attempts`),
/// and `t`, their targets (the deliveries' keys in key order are `$keys`).
macro_rules! end_writes {
    ($attempts:literal, $keys:literal) => {
        concat!(
            "a AS (
             UPDATE attempts SET ended_at = x.ended_at, outcome = x.outcome, reason = x.end_reason,
                                 provider_code = x.provider_code,
                                 provider_message = x.provider_message,
                                 provider_message_id = x.provider_message_id,
                                 receipt_key = COALESCE(x.receipt_key, attempts.receipt_key),
                                 next_retry_at = x.next_retry_at,
                                 token_invalid_since = x.token_invalid_since
             FROM x JOIN own ON own.id = x.delivery
             WHERE attempts.id = x.attempt AND attempts.id = ANY(",
            $attempts,
            ")
         ), t AS (
             UPDATE targets SET channel = x.channel, status = x.target_status,
                                reason = x.target_reason, detail = x.detail
             FROM x JOIN own ON own.id = x.delivery
             WHERE x.attempt IS NOT NULL AND targets.delivery = x.delivery AND targets.idx = x.idx
                   AND targets.delivery = ANY(",
            $keys,
            ")
         )"
        )
    };
}

/// The types of [`EndColumns`]' parameters, in their order.
const END_TYPES: [&str; 15] = [
    "bigint", "bigint", "text", "text", "text", "text", "text", "text", "bigint", "bigint", "int",
    "text", "text", "text", "text",
];

/// [`EndColumns`]' parameters from `$first` on, typed, for an `UNNEST`.
fn end_parameters(first: usize) -> String {
    let typed: Vec<String> = END_TYPES
        .iter()
        .enumerate()
        .map(|(i, kind)| format!("${}::{kind}[]", first + i))
        .collect();
    typed.join(", ")
}

/// Records how the provider calls ended with their targets' new states; per end, a Conflict
/// where the delivery was taken over by another replica.
async fn finish_attempts(pool: &PgPool, items: &[End], owners: &[String]) -> BatchResult<()> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH x AS (
                 SELECT * FROM UNNEST($1::bigint[], {})
                     AS x (delivery, {END_COLUMNS})
             ), own AS (
                 SELECT id FROM deliveries
                 WHERE id = ANY($18) AND (status <> 'IN_PROGRESS' OR owner = ANY($17))
                 ORDER BY id FOR UPDATE
             ), {}, changed AS (
             UPDATE deliveries d SET updated_at = x.ended_at, revision = d.revision + 1
             FROM x JOIN own ON own.id = x.delivery
             WHERE d.id = x.delivery AND d.id = ANY($18)
             RETURNING d.id, d.tenant, d.job_id
             ) {ANNOUNCED} SELECT id FROM changed, announced",
            end_parameters(2),
            end_writes!("$19", "$18")
        )
    });
    let mut keys = Vec::with_capacity(items.len());
    let mut ends = EndColumns::default();
    for item in items {
        keys.push(item.key);
        ends.push(Some((item.attempt, &item.end, item.target, &item.update)));
    }
    let query = ends.bind(sqlx::query(AssertSqlSafe(SQL.as_str())).bind(&keys));
    let rows = query
        .bind(owners)
        .bind(in_key_order(keys.iter().copied()))
        .bind(in_key_order(items.iter().map(|item| item.attempt)))
        .fetch_all(pool)
        .await?;
    fenced(&keys, &rows)
}

/// Marks the deliveries terminal with their outcomes where each is still at the revision its
/// engine knows, writing first the provider call's end a finish carries (its attempt and its
/// target, as [`finish_attempts`] does); per finish, whether it was written (with its end, or
/// not at all).
async fn finish_deliveries(
    pool: &PgPool,
    items: &[Finish],
    owners: &[String],
) -> BatchResult<bool> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH x AS (
                 SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[],
                                      $5::bigint[], $6::bigint[], $7::bigint[], {})
                     AS x (delivery, status, reason, summary, now, revision, steps, {END_COLUMNS})
             ), own AS (
                 SELECT d.id FROM deliveries d JOIN x ON x.delivery = d.id
                 WHERE d.id = ANY($24) AND d.revision = x.revision
                       AND (d.status <> 'IN_PROGRESS' OR d.owner = ANY($8))
                 ORDER BY d.id FOR UPDATE OF d
             ), {}, changed AS (
             UPDATE deliveries d SET status = x.status, reason = x.reason, summary = x.summary,
                                     updated_at = x.now, revision = d.revision + x.steps,
                                     lease_until = NULL
             FROM x JOIN own ON own.id = x.delivery
             WHERE d.id = x.delivery AND d.id = ANY($24) AND d.revision = x.revision
             RETURNING d.id, d.tenant, d.job_id
             ) {ANNOUNCED} SELECT id FROM changed, announced",
            end_parameters(9),
            end_writes!("$25", "$24")
        )
    });
    let count = items.len();
    let mut keys = Vec::with_capacity(count);
    let mut statuses = Vec::with_capacity(count);
    let mut reasons: Vec<Option<&str>> = Vec::with_capacity(count);
    let mut summaries = Vec::with_capacity(count);
    let mut nows = Vec::with_capacity(count);
    let mut revisions = Vec::with_capacity(count);
    let mut steps = Vec::with_capacity(count);
    let mut ends = EndColumns::default();
    for item in items {
        keys.push(item.key);
        statuses.push(item.outcome.status.as_str());
        reasons.push(item.outcome.reason.map(FailureReason::as_str));
        summaries.push(item.outcome.summary.as_str());
        nows.push(item.now);
        revisions.push(item.revision as i64);
        steps.push(if item.end.is_some() { 2_i64 } else { 1 });
        ends.push(
            item.end
                .as_ref()
                .map(|p| (p.attempt, &p.end, p.target, &p.update)),
        );
    }
    let query = sqlx::query(AssertSqlSafe(SQL.as_str()))
        .bind(&keys)
        .bind(&statuses)
        .bind(&reasons)
        .bind(&summaries)
        .bind(&nows)
        .bind(&revisions)
        .bind(&steps)
        .bind(owners);
    let rows = ends
        .bind(query)
        .bind(in_key_order(keys.iter().copied()))
        .bind(in_key_order(ends.attempts.iter().flatten().copied()))
        .fetch_all(pool)
        .await?;
    let written = returned(&rows)?;
    Ok(keys.iter().map(|key| Ok(written.contains(key))).collect())
}

/// The first column of each row (a delivery's key).
fn returned(rows: &[PgRow]) -> Result<HashSet<DeliveryKey>, StoreError> {
    rows.iter()
        .map(|row| row.try_get::<i64, _>(0).map_err(StoreError::from))
        .collect()
}

/// The second column of each row by its first (an attempt's key by its delivery's).
/// `keys` sorted and without repeats, for a statement's `= ANY(..)` narrowing. A B-tree scan
/// sorts its array each time it is rescanned (once per row on the outer side of a nested loop,
/// which is how the grouped statements probe a table), and PostgreSQL's sort returns after one
/// pass over input that is already in order; unordered, the sorting took a tenth of the
/// database's time (BENCHMARKS.md, replicas). Text is ordered by bytes, as the C collations
/// order it; in any other collation the array is still correct, only sorted again.
fn in_key_order<T: Ord>(keys: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut keys: Vec<T> = keys.into_iter().collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

fn keyed(rows: &[PgRow]) -> Result<HashMap<DeliveryKey, i64>, StoreError> {
    rows.iter()
        .map(|row| Ok((row.try_get::<i64, _>(0)?, row.try_get::<i64, _>(1)?)))
        .collect()
}

/// Per write, done where its delivery's row came back, else refused: another replica took the
/// delivery over.
fn fenced(keys: &[DeliveryKey], rows: &[PgRow]) -> BatchResult<()> {
    let written = returned(rows)?;
    Ok(keys
        .iter()
        .map(|key| {
            if written.contains(key) {
                Ok(())
            } else {
                Err(taken_over(*key))
            }
        })
        .collect())
}
