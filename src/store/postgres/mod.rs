//! The PostgreSQL ledger: several gateway replicas share one database. A claim carries its
//! owner and a lease that the owner renews while it works; a replica that dies loses its
//! deliveries to the others when the lease runs out (and the broker hands the job out again),
//! and a replica that comes back after that has its writes to them refused. Rate-limit
//! counters are counted under a lock per counter, so replicas never overshoot; every change of
//! a delivery is announced on `otp_delivery_changed` (by the statement that makes it), so a
//! replica waiting for an acknowledgement or a receipt that another replica recorded wakes at
//! once. The durable view
//! commits synchronously; the staged view (the engine's writes) asynchronously, made durable by
//! [`Ledger::flush`], whose concurrent calls share one synchronous commit.

mod batch;
mod fraud;
mod groups;
mod rows;
mod writes;

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Connection, Row};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use self::groups::{BlockQuery, End, Finish, Groups, NewClaim, Opening, Start, Workers};
use self::rows::{
    ALL_TENANTS, BLOCK_COLUMNS, QUIET_COLUMNS, RULE_COLUMNS, block_from_row, load, micros,
    quiet_from_row, rule_from_row,
};
use crate::domain::{
    Acknowledgement, ApiKey, DeliveryId, DeliveryStatus, FailureReason, Report, TargetStatus,
    Verification, scopes_text,
};
use crate::policy::{
    BlockEntry, DestinationCount, NewBlockEntry, Quarantine, QuietHoursRule, RateKey,
    RateLimitRule, RateLimited,
};
use crate::store::block_hash::{self, BlockHasher};
use crate::store::rows::{API_KEY_COLUMNS, StoredRow, api_key_from_row};
use crate::store::shared::{Claimed, RateCounterKey, at_limit, page};
use crate::store::{
    AttemptEnd, AttemptKey, AttemptStart, Claim, DecideOutcome, DeliveryKey, KnownReport, Ledger,
    LedgerChange, ListPage, ListQuery, NewDelivery, PolicyStore, StoreError, StoreSettings,
    TargetUpdate, as_stored,
};

/// The channel deliveries' changes are announced on (see the migration's trigger).
const CHANGES_CHANNEL: &str = "otp_delivery_changed";

/// A ledger in a PostgreSQL database, shared by replicas.
#[derive(Clone)]
pub struct PostgresLedger {
    /// Reads, and writes that return once on disk (synchronous commits).
    pool: PgPool,
    /// Writes of the staged view: committed (visible to every replica) when they return, on
    /// disk with the next [`Ledger::flush`] (asynchronous commits, which PostgreSQL writes out
    /// together).
    staged_pool: PgPool,
    /// Whether this view's writes return only once on disk.
    durable: bool,
    counter_key: Arc<RateCounterKey>,
    /// Hashes block-list numbers and tokens (see [`BlockHasher`]).
    block_hasher: BlockHasher,
    lease: Duration,
    /// The workers (one per process) that claimed through this ledger: their leases are renewed.
    workers: Workers,
    /// The deliveries this process claimed and has not finished: their leases are renewed
    /// (by key: no index on the owner or the status, so a delivery's end stays heap-only).
    held: Held,
    /// The engine's hot statements, many deliveries per statement.
    groups: Arc<Groups>,
    /// Told of each of those statements.
    commit_watch: crate::store::CommitWatch,
    /// Numbers the block-list reads.
    block_queries: Arc<std::sync::atomic::AtomicU64>,
    changes: broadcast::Sender<LedgerChange>,
    /// Flushes asked for and done, so that concurrent flushes share one synchronous commit.
    flushes: Arc<Flushes>,
    /// Stops the lease and notification tasks when the last clone is dropped.
    _tasks: Arc<StopOnDrop>,
}

/// Concurrent flushes coalesced: a flush waits its turn, and runs a synchronous commit only if
/// none that started after it was asked for has finished meanwhile (one commit answers every
/// flush asked for before it started).
#[derive(Default)]
struct Flushes {
    /// Flushes asked for so far.
    asked: std::sync::atomic::AtomicU64,
    /// Runs one synchronous commit at a time.
    running: tokio::sync::Mutex<()>,
    /// The number of flushes asked for before the last finished commit started.
    done: std::sync::atomic::AtomicU64,
}

/// Cancels its token when dropped.
struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl std::fmt::Debug for PostgresLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresLedger")
            .field("pool_size", &self.pool.options().get_max_connections())
            .field("lease", &self.lease)
            .field("grouped_statements", &self.groups.statements())
            .finish_non_exhaustive()
    }
}

impl PostgresLedger {
    /// Connects to the database at `settings.url`, brings its schema up to date, and starts
    /// renewing this process's leases and listening for other replicas' changes.
    pub async fn connect(settings: &StoreSettings) -> Result<Self, StoreError> {
        let block_hasher = match settings.hash_key() {
            Ok(Some(key)) => BlockHasher::new(key.expose().as_bytes()),
            Ok(None) => {
                return Err(StoreError::Unavailable(
                    "store.hash_key (or store.hash_key_file) is required with PostgreSQL".into(),
                ));
            }
            Err(error) => return Err(StoreError::Unavailable(error.to_string())),
        };
        let options: PgConnectOptions = settings.url.parse()?;
        // Most writes are staged (the engine's); reads and the few durable writes share the
        // rest of the budget.
        let durable_size = (settings.pool_size / 4).max(3);
        let pool = PgPoolOptions::new()
            .max_connections(durable_size)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        let options_for_listener = options.clone();
        let staged_pool = PgPoolOptions::new()
            .max_connections(settings.pool_size.saturating_sub(durable_size).max(2))
            .acquire_timeout(Duration::from_secs(10))
            // Its statements are keyed writes. While a table grows faster than autovacuum's
            // statistics follow it (a new database under load), the planner priced a scan of
            // the whole of `attempts` and `targets` below a few hundred index probes and ran one
            // for every grouped statement (BENCHMARKS.md, replicas). With the keys given as an
            // array (groups.rs) and a sequential scan only a last resort, each statement reads
            // just its rows through the key's index. Its statements are planned once per
            // connection: a plan by keys does not depend on how many rows a statement carries,
            // and planning each grouped statement again cost about 4 % of the database's time.
            .connect_with(options.options([
                ("synchronous_commit", "off"),
                ("enable_seqscan", "off"),
                ("plan_cache_mode", "force_generic_plan"),
            ]))
            .await?;
        sqlx::migrate!("src/store/migrations/postgres")
            .run(&pool)
            .await?;
        let counter_key = Arc::new(rate_counter_key(&pool).await?);
        hash_block_entries(&pool, &block_hasher).await?;
        let (changes, _) = broadcast::channel(4096);
        let stop = CancellationToken::new();
        let workers = Workers::default();
        let held = Held::default();
        let commit_watch = crate::store::CommitWatch::default();
        let groups = Arc::new(Groups::start(&staged_pool, &workers, &stop, &commit_watch));
        let ledger = PostgresLedger {
            pool,
            staged_pool,
            durable: true,
            counter_key,
            block_hasher,
            lease: settings.lease,
            workers,
            held,
            groups,
            commit_watch,
            block_queries: Arc::default(),
            flushes: Arc::default(),
            changes,
            _tasks: Arc::new(StopOnDrop(stop.clone())),
        };
        // Its own connection (a listener keeps the one it holds).
        let listening = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options_for_listener)
            .await?;
        let mut listener = PgListener::connect_with(&listening).await?;
        listener.listen(CHANGES_CHANNEL).await?;
        tokio::spawn(
            stop.clone()
                .run_until_cancelled_owned(listen(listener, ledger.changes.clone())),
        );
        tokio::spawn(stop.run_until_cancelled_owned(renew_leases(
            Arc::clone(&ledger.workers),
            Arc::clone(&ledger.held),
            ledger.pool.clone(),
            ledger.lease,
        )));
        Ok(ledger)
    }

    /// After a grouped write (committed asynchronously): for the durable view, waits until it
    /// is on disk.
    async fn settle(&self) -> Result<(), StoreError> {
        if self.durable {
            self.flush().await
        } else {
            Ok(())
        }
    }

    /// Deletes row `id` of `table` (a rule or an entry); whether there was one.
    async fn remove_row(&self, table: &'static str, id: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(AssertSqlSafe(format!("DELETE FROM {table} WHERE id = $1")))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// `table`'s rows for `tenant` and for every tenant (all rows when `None`), by `order`,
    /// read (`columns`) through `map`.
    async fn tenant_rows<T>(
        &self,
        table: &'static str,
        columns: &'static str,
        tenant: Option<&str>,
        order: &'static str,
        map: fn(&dyn StoredRow) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let sql = format!(
            "SELECT {columns} FROM {table}
             WHERE ($1::text IS NULL OR tenant = $1 OR tenant = '{ALL_TENANTS}') ORDER BY {order}"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(tenant)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|row| map(row)).collect()
    }

    /// Forgets a delivery this process finished (its lease is no longer renewed).
    fn let_go(&self, key: DeliveryKey) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }

    /// Where this view's writes go.
    fn writer(&self) -> &PgPool {
        if self.durable {
            &self.pool
        } else {
            &self.staged_pool
        }
    }

    /// The workers (owners) this process claims as: its writes to a delivery in progress hold
    /// only while it is still the owner.
    fn owners(&self) -> Vec<String> {
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn lease_until(&self, now: Timestamp) -> i64 {
        micros(now) + self.lease.as_micros() as i64
    }

    async fn load(&self, key: DeliveryKey) -> Result<Report, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let report = load(&mut tx, key).await?;
        tx.commit().await?;
        report.ok_or_else(|| StoreError::NotFound(format!("#{key}")))
    }
}

/// The ledger's rate-counter secret, made (32 random bytes) by the first replica.
/// Hashes the block entries made before hashing, once the key is known to be the ledger's;
/// replicas starting together take turns.
/// A statement that deletes the deliveries `selection` picks (a `WHERE` condition on
/// `deliveries`) with their targets and attempts, and returns how many deliveries it deleted.
/// Nothing else deletes them: the tables have no foreign keys (migration 0008).
fn deleting(selection: &str) -> String {
    format!(
        "WITH gone AS (DELETE FROM deliveries WHERE {selection} RETURNING id),
              gone_targets AS (DELETE FROM targets WHERE delivery IN (SELECT id FROM gone)),
              gone_attempts AS (DELETE FROM attempts WHERE delivery IN (SELECT id FROM gone))
         SELECT count(*) FROM gone"
    )
}

async fn hash_block_entries(pool: &PgPool, hasher: &BlockHasher) -> Result<usize, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE block_entries IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let stored: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT value FROM ledger_secrets WHERE name = $1")
            .bind(block_hash::FINGERPRINT)
            .fetch_optional(&mut *tx)
            .await?;
    let hashed: i64 = sqlx::query_scalar(block_hash::HASHED_ENTRIES)
        .fetch_one(&mut *tx)
        .await?;
    if hasher.check(stored.as_deref(), hashed)? == block_hash::Fingerprint::Store {
        sqlx::query(
            "INSERT INTO ledger_secrets (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
        )
        .bind(block_hash::FINGERPRINT)
        .bind(hasher.fingerprint())
        .execute(&mut *tx)
        .await?;
    }
    let legacy = sqlx::query_as(block_hash::LEGACY_ENTRIES)
        .fetch_all(&mut *tx)
        .await?;
    let rehashed = hasher.rehash(legacy)?;
    for (id, pattern, shown) in &rehashed {
        sqlx::query("UPDATE block_entries SET pattern = $1, shown = $2 WHERE id = $3")
            .bind(pattern)
            .bind(shown)
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    if !rehashed.is_empty() {
        tracing::info!(
            entries = rehashed.len(),
            "block-list numbers and tokens stored in clear before are now hashed"
        );
    }
    Ok(rehashed.len())
}

async fn rate_counter_key(pool: &PgPool) -> Result<RateCounterKey, StoreError> {
    const NAME: &str = "rate_counter_key";
    let fresh = RateCounterKey::fresh_secret()?;
    sqlx::query(
        "INSERT INTO ledger_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
    )
    .bind(NAME)
    .bind(&fresh[..])
    .execute(pool)
    .await?;
    let secret: Vec<u8> = sqlx::query_scalar("SELECT value FROM ledger_secrets WHERE name = $1")
        .bind(NAME)
        .fetch_one(pool)
        .await?;
    Ok(RateCounterKey::new(&secret))
}

/// Forwards the change announcements (other replicas' and this one's); after the listening
/// connection was lost and came back, says that any change may have been missed.
async fn listen(mut listener: PgListener, changes: broadcast::Sender<LedgerChange>) {
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => {
                // One notification names every delivery a statement changed, a line each.
                for id in notification.payload().lines() {
                    let _ = changes.send(LedgerChange::Delivery(id.to_owned()));
                }
            }
            // The connection was lost (the next call connects and listens again).
            Ok(None) => {
                tracing::warn!(
                    "the ledger's change notifications were interrupted: waiting deliveries look again"
                );
                let _ = changes.send(LedgerChange::Unknown);
            }
            Err(error) => {
                tracing::warn!(%error, "ledger change notifications: retrying");
                let _ = changes.send(LedgerChange::Unknown);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The deliveries a process holds (claimed, not finished yet).
type Held = Arc<Mutex<HashSet<DeliveryKey>>>;

/// Renews the leases of the deliveries this process holds three times per lease; forgets the
/// ones that are no longer in progress under its workers (finished, or taken over).
async fn renew_leases(workers: Workers, held: Held, pool: PgPool, lease: Duration) {
    let every = lease / 3;
    loop {
        tokio::time::sleep(every).await;
        let names: Vec<String> = workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        let keys: Vec<DeliveryKey> = held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        if names.is_empty() || keys.is_empty() {
            continue;
        }
        let until = micros(Timestamp::now()) + lease.as_micros() as i64;
        // Rows locked in key order, as the grouped writes lock them (no deadlock with them).
        let renewed: Result<Vec<i64>, _> = sqlx::query_scalar(
            "UPDATE deliveries d SET lease_until = $1
             FROM (SELECT id FROM deliveries
                   WHERE id = ANY($3) AND status = 'IN_PROGRESS' AND owner = ANY($2)
                   ORDER BY id FOR UPDATE) own
             WHERE d.id = own.id
             RETURNING d.id",
        )
        .bind(until)
        .bind(&names)
        .bind(&keys)
        .fetch_all(&pool)
        .await;
        match renewed {
            Ok(renewed) => {
                let renewed: HashSet<DeliveryKey> = renewed.into_iter().collect();
                let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
                for key in keys.iter().filter(|key| !renewed.contains(key)) {
                    held.remove(key);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "could not renew this replica's leases: another replica may take its deliveries over once they run out");
            }
        }
    }
}

#[async_trait]
impl Ledger for PostgresLedger {
    fn staged(&self) -> Arc<dyn Ledger> {
        Arc::new(PostgresLedger {
            durable: false,
            ..self.clone()
        })
    }

    fn commit_watch(&self) -> crate::store::CommitWatch {
        self.commit_watch.clone()
    }

    fn ack_tokens(&self) -> crate::domain::AckTokens {
        self.counter_key.ack_tokens()
    }

    async fn flush(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let flushes = &self.flushes;
        let mine = flushes.asked.fetch_add(1, Ordering::AcqRel) + 1;
        let _running = flushes.running.lock().await;
        if flushes.done.load(Ordering::Acquire) >= mine {
            // A commit that started after this flush was asked for has finished.
            return Ok(());
        }
        let covers = flushes.asked.load(Ordering::Acquire);
        // A synchronous commit returns once the WAL is on disk up to its own commit record,
        // which follows every asynchronous commit made before it.
        sqlx::query("SELECT txid_current()")
            .execute(&self.pool)
            .await?;
        flushes.done.fetch_max(covers, Ordering::AcqRel);
        Ok(())
    }

    fn changes(&self) -> Option<broadcast::Receiver<LedgerChange>> {
        Some(self.changes.subscribe())
    }

    async fn accept(
        &self,
        new: &NewDelivery,
        now: Timestamp,
    ) -> Result<(Report, bool), StoreError> {
        let now = as_stored(now);
        let mut conn = self.writer().acquire().await?;
        let (key, created) = writes::accept(&mut conn, new, now).await?;
        drop(conn);
        Ok((self.load(key).await?, created))
    }

    async fn purge(&self, before: Timestamp, batch: u32) -> Result<u64, StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            deleting(
                "id IN (SELECT id FROM deliveries WHERE created_at < $1 AND status <> 'IN_PROGRESS'
                        ORDER BY created_at LIMIT $2)",
            )
        });
        // The fraud guard's counts are kept as long as the deliveries they count.
        sqlx::query("DELETE FROM destination_counts WHERE bucket < $1")
            .bind(micros(crate::policy::bucket_of(before)))
            .execute(&self.pool)
            .await?;
        // Holds that ended before then go too (pins stay until lifted).
        sqlx::query("DELETE FROM quarantines WHERE until < $1")
            .bind(micros(before))
            .execute(&self.pool)
            .await?;
        let deleted: i64 = sqlx::query_scalar(AssertSqlSafe(SQL.as_str()))
            .bind(micros(before))
            .bind(i64::from(batch))
            .fetch_one(&self.pool)
            .await?;
        Ok(deleted as u64)
    }

    async fn erase_account(&self, tenant: &str, account: &str) -> Result<u64, StoreError> {
        static SQL: LazyLock<String> =
            LazyLock::new(|| deleting("tenant = $1 AND account = $2 AND status <> 'IN_PROGRESS'"));
        let deleted: i64 = sqlx::query_scalar(AssertSqlSafe(SQL.as_str()))
            .bind(tenant)
            .bind(account)
            .fetch_one(&self.pool)
            .await?;
        Ok(deleted as u64)
    }

    async fn forget_accepted(&self, id: &DeliveryId) -> Result<(), StoreError> {
        static SQL: LazyLock<String> =
            LazyLock::new(|| deleting("tenant = $1 AND job_id = $2 AND status = 'ACCEPTED'"));
        sqlx::query_scalar::<_, i64>(AssertSqlSafe(SQL.as_str()))
            .bind(&id.tenant)
            .bind(&id.job_id)
            .fetch_one(self.writer())
            .await?;
        Ok(())
    }

    async fn claim(
        &self,
        new: &NewDelivery,
        worker: &str,
        takeover: bool,
        now: Timestamp,
    ) -> Result<Claim, StoreError> {
        let now = as_stored(now);
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(worker.to_owned());
        let lease_until = self.lease_until(now);
        // A new delivery (the common case) is inserted with the other new ones; a known one is
        // decided in a transaction that locks its row.
        let inserted = self
            .groups
            .openings
            .call(Opening::Claim(NewClaim {
                new: new.clone(),
                owner: worker.to_owned(),
                lease_until,
                now: micros(now),
            }))
            .await?
            .claim()?;
        let claimed = match inserted {
            Some(key) => {
                self.settle().await?;
                Claimed::Inserted(key)
            }
            None => {
                let mut conn = self.writer().acquire().await?;
                let mut tx = conn.begin().await?;
                let claimed =
                    writes::claim(&mut tx, new, worker, takeover, now, lease_until).await?;
                tx.commit().await?;
                claimed
            }
        };
        let claim = claimed.into_claim(new, now, |key| self.load(key)).await?;
        if let Claim::Started(key, _) | Claim::Resumed(key, _) = &claim {
            self.held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(*key);
        }
        Ok(claim)
    }

    async fn start_attempt(
        &self,
        key: DeliveryKey,
        start: &AttemptStart,
    ) -> Result<AttemptKey, StoreError> {
        let attempt = self
            .groups
            .starts
            .call(Start {
                key,
                start: start.clone(),
            })
            .await?;
        self.settle().await?;
        Ok(attempt)
    }

    async fn finish_attempt(
        &self,
        key: DeliveryKey,
        attempt: AttemptKey,
        end: &AttemptEnd,
        target: u32,
        update: &TargetUpdate,
    ) -> Result<(), StoreError> {
        self.groups
            .ends
            .call(End {
                key,
                attempt,
                end: end.clone(),
                target,
                update: update.clone(),
            })
            .await?;
        self.settle().await
    }

    async fn update_target(
        &self,
        key: DeliveryKey,
        index: u32,
        update: &TargetUpdate,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let mut conn = self.writer().acquire().await?;
        writes::set_target(&mut conn, key, index, update, now, &self.owners()).await
    }

    async fn apply_receipt(
        &self,
        provider: &str,
        message_id: &str,
        end: &AttemptEnd,
    ) -> Result<Option<(DeliveryKey, DeliveryId, DeliveryStatus)>, StoreError> {
        let mut conn = self.writer().acquire().await?;
        writes::apply_receipt(&mut conn, provider, message_id, end).await
    }

    async fn record_ack(
        &self,
        key: DeliveryKey,
        index: u32,
        ack: Acknowledgement,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let mut conn = self.writer().acquire().await?;
        writes::record_ack(&mut conn, key, index, ack.as_str(), now).await
    }

    async fn record_verification(
        &self,
        key: DeliveryKey,
        verification: Verification,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let mut conn = self.writer().acquire().await?;
        writes::record_verification(&mut conn, key, verification, now).await
    }

    async fn sent_ranges(&self, key: DeliveryKey) -> Result<Vec<(String, Timestamp)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT dest_range, started_at FROM attempts
             WHERE delivery = $1 AND dest_range IS NOT NULL AND outcome IN ('SENT', 'DELIVERED')
             ORDER BY id",
        )
        .bind(key)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(range, started)| Ok((range, rows::timestamp(started)?)))
            .collect()
    }

    async fn acknowledgements(
        &self,
        key: DeliveryKey,
    ) -> Result<Vec<(u32, Acknowledgement)>, StoreError> {
        let rows = sqlx::query(
            "SELECT idx, ack FROM targets WHERE delivery = $1 AND ack IS NOT NULL ORDER BY idx",
        )
        .bind(key)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let ack: String = row.try_get(1)?;
                Ok((
                    row.try_get::<i32, _>(0)? as u32,
                    ack.parse().map_err(StoreError::Corrupt)?,
                ))
            })
            .collect()
    }

    async fn key(&self, id: &DeliveryId) -> Result<Option<DeliveryKey>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT id FROM deliveries WHERE tenant = $1 AND job_id = $2")
                .bind(&id.tenant)
                .bind(&id.job_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn finish(
        &self,
        key: DeliveryKey,
        now: Timestamp,
        decide: DecideOutcome,
        known: Option<KnownReport>,
    ) -> Result<Report, StoreError> {
        let now = as_stored(now);
        // The engine's own copy, while nothing else wrote: decided here and written (with the
        // other deliveries ending, and the engine's last call's end if it left that unwritten)
        // only if the revision is still the copy's.
        if let Some(known) = known {
            let outcome = decide(&known.report);
            let pending = known.pending_end.clone();
            let stored = known.revision - u64::from(pending.is_some());
            let written = self
                .groups
                .finishes
                .call(Finish {
                    key,
                    outcome: outcome.clone(),
                    now: micros(now),
                    revision: stored,
                    end: pending.clone(),
                })
                .await?;
            if written {
                self.let_go(key);
                self.settle().await?;
                return Ok(outcome.conclude(known.report, now));
            }
            // Something else wrote meanwhile (a receipt, an acknowledgement): the call's end
            // goes in on its own, and the outcome is decided from the ledger's report.
            if let Some(p) = pending {
                self.groups
                    .ends
                    .call(End {
                        key,
                        attempt: p.attempt,
                        end: p.end,
                        target: p.target,
                        update: p.update,
                    })
                    .await?;
            }
        }
        let mut conn = self.writer().acquire().await?;
        let mut tx = conn.begin().await?;
        let report = writes::finish(&mut tx, key, now, &decide, None, &self.owners()).await?;
        tx.commit().await?;
        self.let_go(key);
        Ok(report)
    }

    async fn report(&self, key: DeliveryKey) -> Result<Report, StoreError> {
        self.load(key).await
    }

    async fn target_state(
        &self,
        key: DeliveryKey,
        index: u32,
    ) -> Result<Option<(TargetStatus, Option<FailureReason>)>, StoreError> {
        let row =
            sqlx::query("SELECT status, reason FROM targets WHERE delivery = $1 AND idx = $2")
                .bind(key)
                .bind(index as i32)
                .fetch_optional(&self.pool)
                .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let status: String = row.try_get(0)?;
        let reason: Option<String> = row.try_get(1)?;
        Ok(Some((
            status.parse().map_err(StoreError::Corrupt)?,
            reason
                .map(|r| r.parse().map_err(StoreError::Corrupt))
                .transpose()?,
        )))
    }

    async fn get(&self, id: &DeliveryId) -> Result<Option<Report>, StoreError> {
        match self.key(id).await? {
            Some(key) => Ok(Some(self.load(key).await?)),
            None => Ok(None),
        }
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let limit = query.limit.clamp(1, 100) as i64;
        let keys: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM deliveries
             WHERE tenant = $1 AND ($2::text IS NULL OR account = $2) AND ($3::text IS NULL OR status = $3)
               AND ($4::bigint IS NULL OR id < $4)
             ORDER BY id DESC LIMIT $5",
        )
        .bind(&query.tenant)
        .bind(&query.account)
        .bind(query.status.map(DeliveryStatus::as_str))
        .bind(query.before)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let (keys, next) = page(keys, limit);
        let mut reports = Vec::with_capacity(keys.len());
        for key in keys {
            reports.push(self.load(key).await?);
        }
        Ok(ListPage { reports, next })
    }
}

#[async_trait]
impl PolicyStore for PostgresLedger {
    async fn erase_account_blocks(
        &self,
        tenant: &str,
        account: &str,
    ) -> Result<(u64, u64), StoreError> {
        // The opt-outs kept are hashed: they still block the account, which is no longer in
        // clear anywhere (one hashed by an earlier erasure makes the clear one go).
        let (hashed, shown) = self.block_hasher.erased_account(account);
        let mut tx = self.pool.begin().await?;
        let removed = sqlx::query(
            "DELETE FROM block_entries WHERE tenant = $1 AND kind = 'ACCOUNT'
             AND pattern IN ($2, $3) AND source <> 'OPT_OUT'",
        )
        .bind(tenant)
        .bind(account)
        .bind(&hashed)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        for statement in [
            "DELETE FROM block_entries WHERE tenant = $1 AND kind = 'ACCOUNT' AND pattern = $2
             AND EXISTS (SELECT 1 FROM block_entries h WHERE h.tenant = $1 AND h.kind = 'ACCOUNT'
                         AND h.pattern = $3) AND $4::text IS NOT NULL",
            "UPDATE block_entries SET pattern = $3, shown = $4
             WHERE tenant = $1 AND kind = 'ACCOUNT' AND pattern = $2",
        ] {
            sqlx::query(statement)
                .bind(tenant)
                .bind(account)
                .bind(&hashed)
                .bind(shown)
                .execute(&mut *tx)
                .await?;
        }
        let kept: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM block_entries WHERE tenant = $1 AND kind = 'ACCOUNT'
             AND pattern = $2",
        )
        .bind(tenant)
        .bind(&hashed)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((removed, kept as u64))
    }

    async fn create_api_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_keys (id, tenant, scopes, label, secret_hash, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&key.id)
        .bind(key.tenant.as_deref().unwrap_or(ALL_TENANTS))
        .bind(scopes_text(&key.scopes))
        .bind(&key.label)
        .bind(&key.secret_hash)
        .bind(micros(key.created_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        let sql = format!("SELECT {API_KEY_COLUMNS} FROM api_keys WHERE id = $1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(|row| api_key_from_row(row)).transpose()
    }

    async fn list_api_keys(&self, tenant: Option<&str>) -> Result<Vec<ApiKey>, StoreError> {
        let sql = format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE $1::text IS NULL OR tenant = $1
             ORDER BY created_at, id"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(tenant)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|row| api_key_from_row(row)).collect()
    }

    async fn revoke_api_key(&self, id: &str, now: Timestamp) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(micros(now))
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn add_block(
        &self,
        entry: &NewBlockEntry,
        now: Timestamp,
    ) -> Result<(BlockEntry, bool), StoreError> {
        let (pattern, shown) = self.block_hasher.stored(entry.kind, &entry.pattern);
        let entry = &NewBlockEntry {
            pattern,
            ..entry.clone()
        };
        let mut conn = self.pool.acquire().await?;
        // A replica adding the same entry at the same moment makes the first try see neither
        // its insert nor the other's row: once more sees the other's.
        let shown = shown.as_deref();
        match writes::add_block(&mut conn, entry, shown, now).await {
            Err(StoreError::Conflict(_)) => writes::add_block(&mut conn, entry, shown, now).await,
            other => other,
        }
    }

    async fn remove_block(&self, id: i64) -> Result<bool, StoreError> {
        self.remove_row("block_entries", id).await
    }

    async fn list_blocks(&self, tenant: Option<&str>) -> Result<Vec<BlockEntry>, StoreError> {
        self.tenant_rows(
            "block_entries",
            BLOCK_COLUMNS,
            tenant,
            "id DESC",
            block_from_row,
        )
        .await
    }

    async fn set_rate_limit(&self, rule: &RateLimitRule) -> Result<RateLimitRule, StoreError> {
        let mut conn = self.pool.acquire().await?;
        writes::set_rate_limit(&mut conn, rule).await
    }

    async fn remove_rate_limit(&self, id: i64) -> Result<bool, StoreError> {
        self.remove_row("rate_limit_rules", id).await
    }

    async fn list_rate_limits(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<RateLimitRule>, StoreError> {
        self.tenant_rows(
            "rate_limit_rules",
            RULE_COLUMNS,
            tenant,
            "id",
            rule_from_row,
        )
        .await
    }

    async fn consume(
        &self,
        keys: &[RateKey<'_>],
        now: Timestamp,
    ) -> Result<Option<RateLimited>, StoreError> {
        if keys.is_empty() {
            return Ok(None);
        }
        let keys = self.counter_key.counters(keys);
        let mut conn = self.staged_pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let limited = writes::consume(&mut tx, &keys, now).await?;
        tx.commit().await?;
        Ok(limited)
    }

    async fn set_quiet_hours(&self, rule: &QuietHoursRule) -> Result<QuietHoursRule, StoreError> {
        let mut conn = self.pool.acquire().await?;
        writes::set_quiet_hours(&mut conn, rule)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("quiet-hours rule #{}", rule.id)))
    }

    async fn remove_quiet_hours(&self, id: i64) -> Result<bool, StoreError> {
        self.remove_row("quiet_rules", id).await
    }

    async fn list_quiet_hours(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<QuietHoursRule>, StoreError> {
        self.tenant_rows("quiet_rules", QUIET_COLUMNS, tenant, "id", quiet_from_row)
            .await
    }

    async fn add_destination_counts(&self, counts: &[DestinationCount]) -> Result<(), StoreError> {
        fraud::add_counts(self.writer(), counts).await
    }

    async fn destination_counts(
        &self,
        tenant: &str,
        prefix: &str,
        since: Timestamp,
    ) -> Result<Vec<DestinationCount>, StoreError> {
        fraud::hourly_counts(&self.pool, tenant, prefix, since).await
    }

    async fn recent_destination_counts(
        &self,
        tenant: &str,
        prefixes: &[String],
        since: Timestamp,
    ) -> Result<Vec<DestinationCount>, StoreError> {
        fraud::recent_counts(&self.pool, tenant, prefixes, since).await
    }

    async fn prune_recent_counts(&self, before: Timestamp) -> Result<u64, StoreError> {
        fraud::prune_recent(&self.pool, before).await
    }

    async fn tenant_converts(&self, tenant: &str, since: Timestamp) -> Result<bool, StoreError> {
        fraud::tenant_converts(&self.pool, tenant, since).await
    }

    async fn hold_range(&self, quarantine: &Quarantine) -> Result<bool, StoreError> {
        fraud::hold(&self.pool, quarantine).await
    }

    async fn pin_range(
        &self,
        tenant: &str,
        range: &str,
        note: &str,
        now: Timestamp,
    ) -> Result<Quarantine, StoreError> {
        fraud::pin(&self.pool, tenant, range, note, now).await
    }

    async fn lift_range(
        &self,
        tenant: &str,
        range: &str,
        note: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<Option<Quarantine>, StoreError> {
        fraud::lift(&self.pool, tenant, range, note, now, until).await
    }

    async fn quarantines(&self, tenant: Option<&str>) -> Result<Vec<Quarantine>, StoreError> {
        fraud::list(&self.pool, tenant).await
    }

    async fn peek(
        &self,
        keys: &[RateKey<'_>],
        now: Timestamp,
    ) -> Result<Option<RateLimited>, StoreError> {
        for (rule, key) in self.counter_key.counters(keys) {
            let since = micros(now) - rule.window.as_micros() as i64;
            let row = sqlx::query(
                "SELECT count(*), min(at) FROM rate_hits WHERE rule = $1 AND key = $2 AND at > $3",
            )
            .bind(rule.id)
            .bind(key)
            .bind(since)
            .fetch_one(&self.pool)
            .await?;
            if let Some(limited) = at_limit(&rule, row.try_get(0)?, row.try_get(1)?, now)? {
                return Ok(Some(limited));
            }
        }
        Ok(None)
    }

    async fn block_candidates(
        &self,
        tenant: &str,
        patterns: &[&str],
        now: Timestamp,
    ) -> Result<Vec<BlockEntry>, StoreError> {
        // Read with the other jobs' claims and reads (one statement for every job starting at
        // the time).
        let seq = self
            .block_queries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let lookup = self.block_hasher.lookup(patterns);
        let found = self
            .groups
            .openings
            .call(Opening::Blocks(BlockQuery {
                seq,
                tenant: tenant.to_owned(),
                patterns: lookup.keys.clone(),
                now: micros(now),
            }))
            .await?
            .blocks()?;
        Ok(lookup.reveal(found))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::contract::{
        Subject, recorded_call, sent_end, sent_outcome, sms_start, started, store_contract,
    };

    /// The machine's PostgreSQL (trust auth), as tests reach it.
    const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

    /// A database made for one test, dropped (with its connections) when this is.
    pub(crate) struct TempDatabase {
        /// Its URL.
        pub(crate) url: String,
        name: String,
    }

    impl TempDatabase {
        /// A fresh database, or `None` when PostgreSQL is not there (a failure when CI=true).
        pub(crate) async fn create() -> Option<Self> {
            let mut admin = match sqlx::PgConnection::connect(ADMIN_URL).await {
                Ok(admin) => admin,
                Err(error) if std::env::var("CI").as_deref() != Ok("true") => {
                    eprintln!("skipped: no PostgreSQL at 127.0.0.1:5432 ({error})");
                    return None;
                }
                Err(error) => panic!("no PostgreSQL at 127.0.0.1:5432 (CI=true): {error}"),
            };
            let name = format!("otp_test_{}", uuid::Uuid::new_v4().simple());
            sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut admin)
                .await
                .unwrap();
            Some(TempDatabase {
                url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
                name,
            })
        }
    }

    impl TempDatabase {
        /// Settings for a replica of this database (every one with the same hash key).
        pub(crate) fn settings(&self) -> StoreSettings {
            StoreSettings::at(&self.url).with_hash_key("test-block-list-hash-key-0123456789")
        }
    }

    impl Drop for TempDatabase {
        fn drop(&mut self) {
            let name = self.name.clone();
            // On a thread of its own: the test's runtime may be shutting down.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    if let Ok(mut admin) = sqlx::PgConnection::connect(ADMIN_URL).await {
                        let _ = sqlx::query(AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&mut admin)
                        .await;
                    }
                });
            })
            .join();
        }
    }

    async fn open_temp() -> Option<Subject> {
        let database = TempDatabase::create().await?;
        let store = Arc::new(PostgresLedger::connect(&database.settings()).await.unwrap());
        Some(Subject {
            ledger: store.clone(),
            policy: store,
            _keep: Box::new(database),
        })
    }

    store_contract!(open_temp);

    #[tokio::test]
    async fn entries_stored_in_clear_before_are_hashed_at_open_and_another_key_is_refused() {
        let Some(database) = TempDatabase::create().await else {
            return;
        };
        let first = PostgresLedger::connect(&database.settings()).await.unwrap();
        // As an older version left them: clear, with no masked form.
        sqlx::query(
            "INSERT INTO block_entries (tenant, kind, pattern, source, note, created_at)
             VALUES ('acme', 'DEVICE_TOKEN', 'f00dfeedcafe0123456789abcdef', 'PROVIDER_FEEDBACK',
                     '', 0)",
        )
        .execute(&first.pool)
        .await
        .unwrap();
        drop(first);
        let reopened = PostgresLedger::connect(&database.settings()).await.unwrap();
        let stored: Vec<(String, String)> =
            sqlx::query_as("SELECT pattern, shown FROM block_entries")
                .fetch_all(&reopened.pool)
                .await
                .unwrap();
        assert_eq!(stored.len(), 1);
        assert!(!stored[0].0.contains("cafe0123"), "{stored:?}");
        assert_eq!(stored[0].1, "f00d•••cdef");
        let found = reopened
            .block_candidates("acme", &["f00dfeedcafe0123456789abcdef"], Timestamp::now())
            .await
            .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].pattern, "f00dfeedcafe0123456789abcdef");
        // A replica with another key refuses to start; one without a key too.
        let other = StoreSettings::at(&database.url).with_hash_key("another-key-".repeat(4));
        let refused = PostgresLedger::connect(&other)
            .await
            .unwrap_err()
            .to_string();
        assert!(refused.contains("store.hash_key"), "{refused}");
        let keyless = PostgresLedger::connect(&StoreSettings::at(&database.url))
            .await
            .unwrap_err()
            .to_string();
        assert!(keyless.contains("store.hash_key"), "{keyless}");
    }

    #[tokio::test]
    async fn a_change_at_one_replica_is_announced_to_the_others_at_once() {
        let Some(database) = TempDatabase::create().await else {
            return;
        };
        let settings = database.settings();
        let a = PostgresLedger::connect(&settings).await.unwrap();
        let b = PostgresLedger::connect(&settings).await.unwrap();
        let mut announced = a.changes().unwrap();
        let new = crate::store::contract::new_delivery("announced");
        let now = Timestamp::UNIX_EPOCH;
        let (key, _) = started(&*a.staged(), &new, "a", now).await;
        a.staged().flush().await.unwrap();
        let recorded = std::time::Instant::now();
        b.record_ack(key, 0, Acknowledgement::Shown, now)
            .await
            .unwrap();
        let change = tokio::time::timeout(Duration::from_secs(1), announced.recv())
            .await
            .expect("announced within a second")
            .unwrap();
        assert_eq!(change, LedgerChange::Delivery("acme/announced".into()));
        assert!(
            recorded.elapsed() < Duration::from_millis(100),
            "{:?}",
            recorded.elapsed()
        );
    }

    /// Every statement that changes a delivery announces it (migration 0009 left that to the
    /// statements): a call's end, a target's update, a receipt, an acknowledgement, a delivery's
    /// end (grouped, and read afresh) and a takeover, each heard by another replica.
    #[tokio::test]
    async fn every_change_of_a_delivery_is_announced_to_the_other_replicas() {
        let Some(database) = TempDatabase::create().await else {
            return;
        };
        let settings = database.settings();
        let a = PostgresLedger::connect(&settings).await.unwrap();
        let b = PostgresLedger::connect(&settings).await.unwrap();
        let mut heard = b.changes().unwrap();
        let mut heard_at_a = a.changes().unwrap();
        async fn hears(heard: &mut broadcast::Receiver<LedgerChange>, job: &str, what: &str) {
            let wanted = LedgerChange::Delivery(format!("acme/{job}"));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            loop {
                let change = tokio::time::timeout_at(deadline, heard.recv())
                    .await
                    .unwrap_or_else(|_| panic!("{what} of {job} was not announced"))
                    .unwrap();
                if change == wanted {
                    return;
                }
            }
        }
        let now = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(1);
        let sent = sent_outcome;
        let staged = a.staged();
        let mut keys = Vec::new();
        for job in ["one-by-one", "grouped-end"] {
            let (key, mut known) = started(
                &*staged,
                &crate::store::contract::new_delivery(job),
                "a",
                now,
            )
            .await;
            recorded_call(&*staged, key, &sent_end(now, job)).await;
            hears(&mut heard, job, "a call's end").await;
            known.revision += 1;
            keys.push((key, known));
        }
        let (key, _) = keys[0].clone();
        let update = TargetUpdate {
            channel: crate::domain::Channel::Sms,
            status: TargetStatus::Sent,
            reason: None,
            detail: None,
        };
        a.update_target(key, 1, &update, now).await.unwrap();
        hears(&mut heard, "one-by-one", "a target's update").await;
        let delivered = AttemptEnd {
            outcome: crate::domain::AttemptOutcome::Delivered,
            ..sent_end(now, "one-by-one")
        };
        a.apply_receipt("sandbox", "one-by-one", &delivered)
            .await
            .unwrap()
            .expect("the receipt matches");
        hears(&mut heard, "one-by-one", "a receipt").await;
        a.record_ack(key, 0, Acknowledgement::Shown, now)
            .await
            .unwrap();
        hears(&mut heard, "one-by-one", "an acknowledgement").await;
        staged.finish(key, now, Arc::new(sent), None).await.unwrap();
        hears(&mut heard, "one-by-one", "a delivery's end read afresh").await;
        let (key, known) = keys[1].clone();
        staged
            .finish(key, now, Arc::new(sent), Some(known))
            .await
            .unwrap();
        hears(&mut heard, "grouped-end", "a grouped delivery's end").await;

        let stalled = crate::store::contract::new_delivery("taken-over");
        started(&*staged, &stalled, "a", now).await;
        staged.flush().await.unwrap();
        let later = now + jiff::SignedDuration::from_hours(1);
        assert!(matches!(
            b.claim(&stalled, "b", true, later).await.unwrap(),
            Claim::Resumed(..)
        ));
        hears(&mut heard_at_a, "taken-over", "a takeover").await;
    }

    /// The group commits a ledger told of: backend, statement, writes.
    #[derive(Default)]
    struct Told(std::sync::Mutex<Vec<(&'static str, &'static str, usize)>>);

    impl crate::store::CommitObserver for Told {
        fn committed(
            &self,
            backend: &'static str,
            statement: &'static str,
            writes: usize,
            _took: Duration,
        ) {
            self.0.lock().unwrap().push((backend, statement, writes));
        }
    }

    #[tokio::test]
    async fn a_job_claims_and_reads_its_block_list_in_one_statement() {
        use crate::policy::{BlockKind, BlockSource, NewBlockEntry};
        let Some(database) = TempDatabase::create().await else {
            return;
        };
        let ledger = PostgresLedger::connect(&database.settings()).await.unwrap();
        let now = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(1);
        let block = |tenant: &str, kind, pattern: &str| NewBlockEntry {
            tenant: Some(tenant.into()),
            kind,
            pattern: pattern.into(),
            source: BlockSource::Admin,
            note: "test".into(),
            expires_at: None,
        };
        for entry in [
            block("acme", BlockKind::Account, "user-42"),
            block("acme", BlockKind::Prefix, "+7"),
            block("other", BlockKind::Account, "user-43"),
        ] {
            ledger.add_block(&entry, now).await.unwrap();
        }
        let before = ledger.groups.statements();
        let staged = ledger.staged();
        let fresh = crate::store::contract::new_delivery("opening-1");
        let (claimed, blocks, other) = tokio::join!(
            staged.claim(&fresh, "a", false, now),
            ledger.block_candidates("acme", &["user-42", "+14155550101"], now),
            ledger.block_candidates("other", &["user-42"], now),
        );
        assert!(matches!(claimed.unwrap(), Claim::Started(..)));
        let mut found: Vec<String> = blocks.unwrap().into_iter().map(|b| b.pattern).collect();
        found.sort();
        assert_eq!(found, ["+7", "user-42"]);
        assert!(
            other.unwrap().is_empty(),
            "another tenant's entries stay its own"
        );
        assert_eq!(
            ledger.groups.statements() - before,
            1,
            "the claim and both reads went in one statement"
        );
        // A known delivery's claim in the same statement as a read: no key, and the read still
        // answers.
        let (again, blocks) = tokio::join!(
            ledger.claim(&fresh, "b", false, now),
            ledger.block_candidates("acme", &["user-42"], now),
        );
        assert!(matches!(again.unwrap(), Claim::HeldElsewhere(_)));
        assert_eq!(blocks.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn deliveries_written_at_once_share_statements_and_a_fenced_one_fails_alone() {
        let Some(database) = TempDatabase::create().await else {
            return;
        };
        let settings = database.settings();
        let (a, b) = (
            PostgresLedger::connect(&settings).await.unwrap(),
            PostgresLedger::connect(&settings).await.unwrap(),
        );
        let mut announced = b.changes().unwrap();
        let told = Arc::new(Told::default());
        a.commit_watch().set(Arc::clone(&told) as _);
        let staged = a.staged();
        let now = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(1);
        let news: Vec<_> = (0..40)
            .map(|i| crate::store::contract::new_delivery(&format!("grouped-{i}")))
            .collect();
        let claims = futures_util::future::join_all(
            news.iter().map(|new| staged.claim(new, "a", false, now)),
        )
        .await;
        let keys: Vec<DeliveryKey> = claims
            .into_iter()
            .map(|claim| match claim.unwrap() {
                Claim::Started(key, _) => key,
                other => panic!("a new delivery starts: {other:?}"),
            })
            .collect();
        assert!(
            a.groups.openings.statements() <= 4,
            "40 claims at once took {} statements",
            a.groups.openings.statements()
        );
        // Each of those statements was told, with the writes it carried.
        let claims: Vec<usize> = told
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(backend, statement, _)| (*backend, *statement) == ("postgres", "claims"))
            .map(|(_, _, writes)| *writes)
            .collect();
        assert_eq!(claims.iter().sum::<usize>(), 40, "{claims:?}");
        assert_eq!(claims.len() as u64, a.groups.openings.statements());
        // `a` is cut off from one delivery past its lease: `b` takes it over.
        let later = now + jiff::SignedDuration::from_hours(1);
        assert!(matches!(
            b.claim(&news[7], "b", true, later).await.unwrap(),
            Claim::Resumed(..)
        ));
        let start = sms_start(1, later);
        let started = futures_util::future::join_all(
            keys.iter().map(|key| staged.start_attempt(*key, &start)),
        )
        .await;
        for (i, result) in started.iter().enumerate() {
            if i == 7 {
                assert!(matches!(result, Err(StoreError::Conflict(_))), "{result:?}");
            } else {
                assert!(result.is_ok(), "delivery {i}: {result:?}");
            }
        }
        let ends = sent_end(later, "m");
        let update = TargetUpdate::after(crate::domain::Channel::Sms, &ends);
        let finished = futures_util::future::join_all(
            keys.iter()
                .zip(&started)
                .filter_map(|(key, attempt)| Some((*key, *attempt.as_ref().ok()?)))
                .map(|(key, attempt)| staged.finish_attempt(key, attempt, &ends, 1, &update)),
        )
        .await;
        assert!(finished.iter().all(Result::is_ok), "{finished:?}");
        // Every change reaches the other replica, though one notification names many.
        let mut unheard: std::collections::HashSet<String> = (0..40)
            .filter(|i| *i != 7)
            .map(|i| format!("acme/grouped-{i}"))
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !unheard.is_empty() {
            match tokio::time::timeout_at(deadline, announced.recv()).await {
                Ok(Ok(LedgerChange::Delivery(id))) => {
                    unheard.remove(&id);
                }
                Ok(other) => panic!("{other:?}"),
                Err(_) => panic!("never announced: {unheard:?}"),
            }
        }
        let report = b.report(keys[3]).await.unwrap();
        assert_eq!(report.targets[1].status, TargetStatus::Sent);
        let taken = b.report(keys[7]).await.unwrap();
        assert_eq!(
            taken.targets[1].status,
            TargetStatus::Pending,
            "nothing of `a`'s"
        );
    }

    /// A new database under load: its tables grow faster than autovacuum analyzes them. The
    /// grouped statements still reach each delivery's rows through the keys' indexes: a
    /// whole-table scan per statement would make every batch cost as much as the table.
    #[tokio::test]
    async fn grouped_writes_reach_their_rows_by_key_while_the_tables_are_unanalyzed() {
        let Some(database) = TempDatabase::create().await else {
            return;
        };
        let ledger = PostgresLedger::connect(&database.settings()).await.unwrap();
        let staged = ledger.staged();
        let now = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(1);
        // Analyzed once while small (as autovacuum did early in a bench round), then grown.
        for (round, count) in [50, 300, 300, 300].into_iter().enumerate() {
            if round == 1 {
                sqlx::query("ANALYZE attempts, targets, deliveries")
                    .execute(&ledger.pool)
                    .await
                    .unwrap();
            }
            let news: Vec<_> = (0..count)
                .map(|i| crate::store::contract::new_delivery(&format!("scan-{round}-{i}")))
                .collect();
            let keys: Vec<DeliveryKey> = futures_util::future::join_all(
                news.iter().map(|new| staged.claim(new, "a", false, now)),
            )
            .await
            .into_iter()
            .map(|claim| match claim.unwrap() {
                Claim::Started(key, _) => key,
                other => panic!("a new delivery starts: {other:?}"),
            })
            .collect();
            let start = sms_start(1, now);
            let attempts = futures_util::future::join_all(
                keys.iter().map(|key| staged.start_attempt(*key, &start)),
            )
            .await;
            let end = sent_end(now, "m");
            let update = TargetUpdate::after(crate::domain::Channel::Sms, &end);
            let ended =
                futures_util::future::join_all(keys.iter().zip(attempts).map(|(key, attempt)| {
                    staged.finish_attempt(*key, attempt.unwrap(), &end, 1, &update)
                }))
                .await;
            assert!(ended.iter().all(Result::is_ok), "{ended:?}");
        }
        drop(staged);
        let rows: Vec<(String, i64, i64)> = statistics_after(
            ledger,
            &database.url,
            // Rows read by whole-table scans (PostgreSQL 15 counts a bitmap heap scan in
            // `seq_scan` too, but it reads no rows that way).
            "SELECT relname::text, seq_tup_read, COALESCE(idx_scan, 0) FROM pg_stat_user_tables
             WHERE relname IN ('attempts', 'targets') ORDER BY relname",
            |rows: &Vec<(String, i64, i64)>| rows.iter().all(|(_, _, by_index)| *by_index > 0),
        )
        .await;
        for (table, scanned, by_index) in &rows {
            assert_eq!(
                *scanned, 0,
                "{table}: {scanned} rows read by whole-table scans ({by_index} index scans)"
            );
            assert!(*by_index > 0, "{table}: no index scan was reported");
        }
    }

    /// Closes `ledger`'s connections (their backends then report what they did) and reads
    /// `query` from the statistics views until `reported` holds, or for 10 s.
    async fn statistics_after<T>(
        ledger: PostgresLedger,
        url: &str,
        query: &'static str,
        reported: impl Fn(&Vec<T>) -> bool,
    ) -> Vec<T>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        ledger.staged_pool.close().await;
        ledger.pool.close().await;
        drop(ledger);
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let rows: Vec<T> = sqlx::query_as(query).fetch_all(&mut conn).await.unwrap();
            if reported(&rows) || tokio::time::Instant::now() > deadline {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            sqlx::query("SELECT pg_stat_clear_snapshot()")
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }

    /// A delivery's end (its status, with its last call's end) stays on the row's page without
    /// a new entry in any of the delivery's indexes (a heap-only update), and so does the end of
    /// a call that awaits no receipt (a push, a provider without receipts).
    #[tokio::test]
    async fn a_delivery_s_end_and_its_call_s_are_heap_only_updates() {
        let Some(database) = TempDatabase::create().await else {
            return;
        };
        let ledger = PostgresLedger::connect(&database.settings()).await.unwrap();
        let staged = ledger.staged();
        let now = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(1);
        let news: Vec<_> = (0..60)
            .map(|i| crate::store::contract::new_delivery(&format!("hot-{i}")))
            .collect();
        let ends = news.iter().map(|new| {
            let staged = Arc::clone(&staged);
            async move {
                let (key, mut known) = started(&*staged, new, "a", now).await;
                let attempt = staged.start_attempt(key, &sms_start(1, now)).await.unwrap();
                let end = AttemptEnd {
                    awaits_receipt: false,
                    ..sent_end(now, "m")
                };
                known.revision += 1;
                known.pending_end = Some(crate::store::PendingEnd {
                    attempt,
                    update: TargetUpdate::after(crate::domain::Channel::Sms, &end),
                    end,
                    target: 1,
                });
                let outcome = sent_outcome;
                let report = staged
                    .finish(key, now, Arc::new(outcome), Some(known))
                    .await
                    .unwrap();
                assert_eq!(report.status, crate::domain::DeliveryStatus::Sent);
            }
        });
        futures_util::future::join_all(ends).await;
        drop(staged);
        let counts: Vec<(String, i64, i64)> = statistics_after(
            ledger,
            &database.url,
            "SELECT relname::text, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
             WHERE relname IN ('attempts', 'deliveries') ORDER BY relname",
            |rows: &Vec<(String, i64, i64)>| {
                rows.len() == 2 && rows.iter().all(|(_, updates, _)| *updates >= 60)
            },
        )
        .await;
        for (table, updates, heap_only) in counts {
            assert!(updates >= 60, "{updates} updates of 60 {table} reported");
            assert!(
                heap_only * 10 >= updates * 9,
                "only {heap_only} of {updates} updates of {table} were heap-only"
            );
        }
    }

    /// The tables have no foreign keys: every statement that deletes deliveries deletes their
    /// targets and attempts with them.
    #[tokio::test]
    async fn deleted_deliveries_leave_no_targets_or_attempts_behind() {
        let Some(database) = TempDatabase::create().await else {
            return;
        };
        let ledger = PostgresLedger::connect(&database.settings()).await.unwrap();
        let now = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(1);
        let sent = sent_outcome;
        // Two sent deliveries with a call each, one of another account; one accepted.
        for (job, account) in [("old", "user-a"), ("erased", "user-b")] {
            let mut new = crate::store::contract::new_delivery(job);
            new.account = account.into();
            let (key, _) = started(&ledger, &new, "w", now).await;
            recorded_call(&ledger, key, &sent_end(now, job)).await;
            ledger.finish(key, now, Arc::new(sent), None).await.unwrap();
        }
        let accepted = crate::store::contract::new_delivery("accepted");
        ledger.accept(&accepted, now).await.unwrap();
        let rows = |table: &'static str| {
            let pool = ledger.pool.clone();
            async move {
                let all: i64 =
                    sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                let orphans: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                    "SELECT count(*) FROM {table} t
                     WHERE NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id = t.delivery)"
                )))
                .fetch_one(&pool)
                .await
                .unwrap();
                (all, orphans)
            }
        };
        assert_eq!(rows("attempts").await, (2, 0));
        let targets = rows("targets").await.0;
        assert!(targets >= 3, "{targets} targets of 3 deliveries");

        let later = now + jiff::SignedDuration::from_hours(1);
        ledger.forget_accepted(&accepted.id).await.unwrap();
        assert_eq!(ledger.erase_account("acme", "user-b").await.unwrap(), 1);
        assert_eq!(ledger.purge(later, 10).await.unwrap(), 1);
        assert_eq!(rows("attempts").await, (0, 0));
        assert_eq!(rows("targets").await, (0, 0));
    }

    #[tokio::test]
    async fn a_replica_whose_delivery_was_taken_over_writes_nothing_to_it() {
        let Some(database) = TempDatabase::create().await else {
            return;
        };
        let settings = database.settings();
        let (a, b) = (
            PostgresLedger::connect(&settings).await.unwrap(),
            PostgresLedger::connect(&settings).await.unwrap(),
        );
        let new = crate::store::contract::new_delivery("fenced");
        let now = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(1);
        let (key, known) = started(&a, &new, "a", now).await;
        let start = sms_start(1, now);
        let attempt = a.start_attempt(key, &start).await.unwrap();
        // `a` is cut off past its lease; `b` takes the delivery over.
        let later = now + jiff::SignedDuration::from_hours(1);
        assert!(matches!(
            b.claim(&new, "b", true, later).await.unwrap(),
            Claim::Resumed(..)
        ));
        // `a` comes back: none of its writes to the delivery holds.
        let update = TargetUpdate {
            channel: crate::domain::Channel::Sms,
            status: TargetStatus::Sent,
            reason: None,
            detail: None,
        };
        let end = sent_end(later, "m1");
        let refused = |result: Result<(), StoreError>| {
            assert!(matches!(result, Err(StoreError::Conflict(_))), "{result:?}");
        };
        refused(a.start_attempt(key, &start).await.map(drop));
        refused(a.finish_attempt(key, attempt, &end, 1, &update).await);
        refused(a.update_target(key, 1, &update, later).await);
        let sent = |_: &Report| crate::store::Outcome {
            status: DeliveryStatus::Sent,
            reason: None,
            summary: "sent by a".into(),
        };
        refused(
            a.finish(key, later, Arc::new(sent), Some(known))
                .await
                .map(drop),
        );
        let report = b.report(key).await.unwrap();
        assert_eq!(report.status, DeliveryStatus::InProgress);
        assert_eq!(
            report.targets[1].attempts[0].outcome,
            crate::domain::AttemptOutcome::Interrupted,
            "the attempt `a` had open stays as `b` found it"
        );
        // `b`, the owner now, writes.
        b.update_target(key, 1, &update, later).await.unwrap();
    }

    #[tokio::test]
    async fn a_live_lease_holds_a_delivery_until_it_runs_out_unless_renewed() {
        let Some(database) = TempDatabase::create().await else {
            return;
        };
        let mut settings = database.settings();
        settings.lease = Duration::from_secs(30);
        let ledger = PostgresLedger::connect(&settings).await.unwrap();
        let new = crate::store::contract::new_delivery("leased");
        let now = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(1);
        assert!(matches!(
            ledger.claim(&new, "a", false, now).await.unwrap(),
            Claim::Started(..)
        ));
        // A duplicate publish while `a` works: nothing to do.
        assert!(matches!(
            ledger.claim(&new, "b", false, now).await.unwrap(),
            Claim::HeldElsewhere(_)
        ));
        // The job redelivered while `a`'s lease holds: to be tried again when it runs out.
        let Claim::Leased { until, .. } = ledger.claim(&new, "b", true, now).await.unwrap() else {
            panic!("a live lease holds it");
        };
        assert_eq!(until, now + jiff::SignedDuration::from_secs(30));
        // Once it ran out, `b` takes it over, whether or not the job came back redelivered.
        let after = until + jiff::SignedDuration::from_secs(1);
        let Claim::Resumed(key, _) = ledger.claim(&new, "b", false, after).await.unwrap() else {
            panic!("an expired lease is taken over");
        };
        let held = |ledger: &PostgresLedger| ledger.held.lock().unwrap().contains(&key);
        assert!(held(&ledger), "the replica renews what it holds");
        // `b`'s lease is renewed while it works: `c` still finds it held later on.
        ledger.workers.lock().unwrap().insert("b".into());
        sqlx::query("UPDATE deliveries SET lease_until = 0")
            .execute(&ledger.pool)
            .await
            .unwrap();
        let renewing = tokio::spawn(renew_leases(
            Arc::clone(&ledger.workers),
            Arc::clone(&ledger.held),
            ledger.pool.clone(),
            Duration::from_secs(3),
        ));
        // Renewed within a third of the lease (a busy machine may take longer: wait up to 5 s).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let renewed: i64 = sqlx::query_scalar("SELECT lease_until FROM deliveries")
                .fetch_one(&ledger.pool)
                .await
                .unwrap();
            if renewed > micros(Timestamp::now()) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the lease was not renewed into the future"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Taken over by another replica meanwhile: no longer renewed, and forgotten.
        sqlx::query("UPDATE deliveries SET owner = 'z'")
            .execute(&ledger.pool)
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while held(&ledger) {
            assert!(
                std::time::Instant::now() < deadline,
                "a delivery another replica took over is still renewed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        renewing.abort();

        // A delivery this replica finishes is let go at once.
        let (key, _) = started(
            &ledger,
            &crate::store::contract::new_delivery("let-go"),
            "b",
            now,
        )
        .await;
        assert!(ledger.held.lock().unwrap().contains(&key));
        let outcome = sent_outcome;
        ledger
            .finish(key, now, Arc::new(outcome), None)
            .await
            .unwrap();
        assert!(!ledger.held.lock().unwrap().contains(&key));
    }
}
