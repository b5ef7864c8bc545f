//! The SQLite ledger: the embedded default. WAL journal, every write fsynced before it counts
//! as durable, so every outcome is on disk before the job message is acked. Writes go through
//! one group-commit writer thread and its syncer ([`GroupWriter`]); reads run on the caller's
//! thread on reader connections ([`Readers`]). sqlx only brings the schema up to date.

use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use sqlx::ConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};

mod errors;
mod reads;
mod writer;
mod writes;

use crate::domain::{
    Acknowledgement, ApiKey, DeliveryId, DeliveryStatus, Report, TargetStatus, Verification,
};
use crate::policy::{
    BlockEntry, DestinationCount, NewBlockEntry, Quarantine, QuietHoursRule, RateKey,
    RateLimitRule, RateLimited,
};
use crate::store::block_hash::{self, BlockHasher};
use crate::store::shared::RateCounterKey;
use crate::store::{
    AttemptEnd, AttemptKey, AttemptStart, Claim, DecideOutcome, DeliveryKey, KnownReport, Ledger,
    ListPage, ListQuery, NewDelivery, PolicyStore, StoreError, TargetUpdate, as_stored,
};
use reads::Readers;
use writer::GroupWriter;
use writes::PolicyTable;

/// A ledger in one SQLite file. Writes go through one [`GroupWriter`], which commits the
/// writes of many deliveries with one fsync; reads use reader connections on the calling
/// thread (indexed lookups of a few rows; a page of reports runs on the blocking pool).
#[derive(Debug, Clone)]
pub struct SqliteLedger {
    readers: Arc<Readers>,
    writer: GroupWriter,
    /// Keys rate-limit counters (see [`RateCounterKey`]).
    counter_key: Arc<RateCounterKey>,
    /// Hashes block-list numbers and tokens (see [`BlockHasher`]).
    block_hasher: BlockHasher,
    /// Whether its ledger writes return only once on disk (else once committed: the staged
    /// view).
    durable: bool,
}

/// The ledger's rate-counter secret, made (32 random bytes) the first time.
async fn rate_counter_key(conn: &mut sqlx::SqliteConnection) -> Result<RateCounterKey, StoreError> {
    const NAME: &str = "rate_counter_key";
    let fresh = RateCounterKey::fresh_secret()?;
    sqlx::query("INSERT OR IGNORE INTO ledger_secrets (name, value) VALUES (?, ?)")
        .bind(NAME)
        .bind(&fresh[..])
        .execute(&mut *conn)
        .await?;
    let secret: Vec<u8> = sqlx::query_scalar("SELECT value FROM ledger_secrets WHERE name = ?")
        .bind(NAME)
        .fetch_one(&mut *conn)
        .await?;
    Ok(RateCounterKey::new(&secret))
}

/// The database's file, or an empty path for an in-memory database.
fn sqlite_file(url: &str, file: &Path) -> std::path::PathBuf {
    if url.contains(":memory:") || url.contains("mode=memory") {
        std::path::PathBuf::new()
    } else {
        file.to_path_buf()
    }
}

/// Hashes the block entries made before hashing, once the key is known to be the ledger's.
async fn hash_block_entries(
    conn: &mut sqlx::SqliteConnection,
    hasher: &BlockHasher,
) -> Result<usize, StoreError> {
    use sqlx::Connection;
    // What the clear patterns were on is overwritten, not just freed.
    sqlx::query("PRAGMA secure_delete = ON")
        .execute(&mut *conn)
        .await?;
    let mut tx = conn.begin().await?;
    let stored: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT value FROM ledger_secrets WHERE name = ?")
            .bind(block_hash::FINGERPRINT)
            .fetch_optional(&mut *tx)
            .await?;
    let hashed: i64 = sqlx::query_scalar(block_hash::HASHED_ENTRIES)
        .fetch_one(&mut *tx)
        .await?;
    if hasher.check(stored.as_deref(), hashed)? == block_hash::Fingerprint::Store {
        sqlx::query("INSERT OR REPLACE INTO ledger_secrets (name, value) VALUES (?, ?)")
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
        sqlx::query("UPDATE block_entries SET pattern = ?, shown = ? WHERE id = ?")
            .bind(pattern)
            .bind(shown)
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    if !rehashed.is_empty() {
        // The old pages in the write-ahead log go too.
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut *conn)
            .await?;
        tracing::info!(
            entries = rehashed.len(),
            "block-list numbers and tokens stored in clear before are now hashed"
        );
    }
    Ok(rehashed.len())
}

impl SqliteLedger {
    /// Opens (creating if needed) the database at `url` (`sqlite://PATH`) and migrates it;
    /// block-list numbers and tokens are hashed under the key in the file beside it (made the
    /// first time).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::open(&crate::store::StoreSettings::at(url)).await
    }

    /// Opens (creating if needed) the database `settings` name and migrates it.
    pub async fn open(settings: &crate::store::StoreSettings) -> Result<Self, StoreError> {
        let configured_key = settings
            .hash_key()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let options = SqliteConnectOptions::from_str(&settings.url)?;
        if let Some(parent) = options
            .get_filename()
            .parent()
            .filter(|p| p != &Path::new(""))
        {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Unavailable(format!("cannot make the ledger's directory: {e}"))
            })?;
        }
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let mut migrating = options.connect().await?;
        sqlx::migrate!("src/store/migrations/sqlite")
            .run(&mut migrating)
            .await?;
        let counter_key = rate_counter_key(&mut migrating).await?;
        let block_hasher = block_hash::key_for_sqlite(
            configured_key.as_ref(),
            &sqlite_file(&settings.url, options.get_filename()),
        )?;
        hash_block_entries(&mut migrating, &block_hasher).await?;
        sqlx::Connection::close(migrating).await?;
        let path = options.get_filename();
        let writer = GroupWriter::start(path)?;
        let readers = Arc::new(Readers::open(path)?);
        Ok(SqliteLedger {
            readers,
            writer,
            counter_key: Arc::new(counter_key),
            block_hasher,
            durable: true,
        })
    }

    /// How many group transactions the writer has committed (each carries the writes of many
    /// deliveries; one fsync makes several of them durable).
    pub fn group_commits(&self) -> u64 {
        self.writer.commits()
    }

    /// Runs a ledger write: returns once it is on disk, or for the staged view once committed.
    async fn write<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<T, StoreError> + Clone + Send + 'static,
    {
        if self.durable {
            self.writer.write(op).await
        } else {
            self.writer.stage(op).await
        }
    }

    fn load(&self, key: DeliveryKey) -> Result<Report, StoreError> {
        self.readers
            .with(|conn| reads::load(conn, key))?
            .ok_or_else(|| StoreError::NotFound(format!("#{key}")))
    }
}

#[async_trait]
impl Ledger for SqliteLedger {
    fn staged(&self) -> Arc<dyn Ledger> {
        Arc::new(SqliteLedger {
            durable: false,
            ..self.clone()
        })
    }

    fn commit_watch(&self) -> crate::store::CommitWatch {
        self.writer.watch.clone()
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.writer.flush().await
    }

    fn ack_tokens(&self) -> crate::domain::AckTokens {
        self.counter_key.ack_tokens()
    }

    async fn accept(
        &self,
        new: &NewDelivery,
        now: Timestamp,
    ) -> Result<(Report, bool), StoreError> {
        let new = new.clone();
        let (key, inserted) = self
            .write(move |conn| writes::accept(conn, &new, now))
            .await?;
        Ok((self.load(key)?, inserted))
    }

    async fn forget_accepted(&self, id: &DeliveryId) -> Result<(), StoreError> {
        let id = id.clone();
        self.write(move |conn| writes::forget_accepted(conn, &id))
            .await
    }

    async fn claim(
        &self,
        new: &NewDelivery,
        worker: &str,
        takeover: bool,
        now: Timestamp,
    ) -> Result<Claim, StoreError> {
        // The report built here must match the one stored.
        let now = as_stored(now);
        let owned = new.clone();
        let worker = worker.to_owned();
        let claimed = self
            .write(move |conn| writes::claim(conn, &owned, &worker, takeover, now))
            .await?;
        claimed
            .into_claim(new, now, |key| std::future::ready(self.load(key)))
            .await
    }

    async fn start_attempt(
        &self,
        key: DeliveryKey,
        start: &AttemptStart,
    ) -> Result<AttemptKey, StoreError> {
        let start = start.clone();
        self.write(move |conn| writes::start_attempt(conn, key, &start))
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
        self.write(move |conn| writes::finish_attempt(conn, key, attempt, &end, target, &update))
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
        self.write(move |conn| writes::set_target(conn, key, index, &update, now))
            .await
    }

    async fn apply_receipt(
        &self,
        provider: &str,
        message_id: &str,
        end: &AttemptEnd,
    ) -> Result<Option<(DeliveryKey, DeliveryId, DeliveryStatus)>, StoreError> {
        let provider = provider.to_owned();
        let message_id = message_id.to_owned();
        let end = end.clone();
        self.write(move |conn| writes::apply_receipt(conn, &provider, &message_id, &end))
            .await
    }

    async fn record_ack(
        &self,
        key: DeliveryKey,
        index: u32,
        ack: Acknowledgement,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.write(move |conn| writes::record_ack(conn, key, index, ack.as_str(), now))
            .await
    }

    async fn record_verification(
        &self,
        key: DeliveryKey,
        verification: Verification,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        self.write(move |conn| writes::record_verification(conn, key, verification, now))
            .await
    }

    async fn acknowledgements(
        &self,
        key: DeliveryKey,
    ) -> Result<Vec<(u32, Acknowledgement)>, StoreError> {
        self.readers.with(|conn| reads::acknowledgements(conn, key))
    }

    async fn sent_ranges(&self, key: DeliveryKey) -> Result<Vec<(String, Timestamp)>, StoreError> {
        self.readers.with(|conn| reads::sent_ranges(conn, key))
    }

    async fn key(&self, id: &DeliveryId) -> Result<Option<DeliveryKey>, StoreError> {
        self.readers.with(|conn| reads::key_of(conn, id))
    }

    async fn finish(
        &self,
        key: DeliveryKey,
        now: Timestamp,
        decide: DecideOutcome,
        known: Option<KnownReport>,
    ) -> Result<Report, StoreError> {
        // The report returned must match the one stored.
        let now = as_stored(now);
        // The engine's last call's end, if it left one unwritten, goes first in the same
        // transaction (every run of it).
        let pending = known.as_ref().and_then(|k| k.pending_end.clone());
        // Taken by the first run of the write (one rolled back with a neighbour and run again
        // reads the report instead).
        let known = Arc::new(Mutex::new(known));
        // Decided on the writer's connection, whose pages are warm: a reader would have to
        // fetch them again after every commit.
        self.write(move |conn| {
            if let Some(p) = &pending {
                writes::finish_attempt(conn, key, p.attempt, &p.end, p.target, &p.update)?;
            }
            let known = known.lock().unwrap_or_else(|p| p.into_inner()).take();
            writes::finish(conn, key, now, &decide, known)
        })
        .await
    }

    async fn report(&self, key: DeliveryKey) -> Result<Report, StoreError> {
        self.load(key)
    }

    async fn target_state(
        &self,
        key: DeliveryKey,
        index: u32,
    ) -> Result<Option<(TargetStatus, Option<crate::domain::FailureReason>)>, StoreError> {
        self.readers
            .with(|conn| reads::target_state(conn, key, index))
    }

    async fn get(&self, id: &DeliveryId) -> Result<Option<Report>, StoreError> {
        self.readers.with(|conn| match reads::key_of(conn, id)? {
            Some(key) => reads::load(conn, key),
            None => Ok(None),
        })
    }

    async fn purge(&self, before: Timestamp, batch: u32) -> Result<u64, StoreError> {
        self.writer
            .erase(move |conn| writes::purge(conn, before, batch))
            .await
    }

    async fn erase_account(&self, tenant: &str, account: &str) -> Result<u64, StoreError> {
        let (tenant, account) = (tenant.to_owned(), account.to_owned());
        self.writer
            .erase(move |conn| writes::erase_account(conn, &tenant, &account))
            .await
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        // Up to a hundred reports: off the async workers.
        let readers = Arc::clone(&self.readers);
        let query = query.clone();
        tokio::task::spawn_blocking(move || readers.with(|conn| reads::list(conn, &query)))
            .await
            .map_err(|e| StoreError::Corrupt(format!("the ledger read failed: {e}")))?
    }
}

#[async_trait]
impl PolicyStore for SqliteLedger {
    async fn erase_account_blocks(
        &self,
        tenant: &str,
        account: &str,
    ) -> Result<(u64, u64), StoreError> {
        let (tenant, account) = (tenant.to_owned(), account.to_owned());
        let (hashed, shown) = self.block_hasher.erased_account(&account);
        self.writer
            .erase(move |conn| {
                writes::erase_account_blocks(conn, &tenant, &account, (&hashed, shown))
            })
            .await
    }

    async fn create_api_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        let key = key.clone();
        self.writer
            .write(move |conn| writes::create_api_key(conn, &key))
            .await
    }

    async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        self.readers.with(|conn| reads::api_key(conn, id))
    }

    async fn list_api_keys(&self, tenant: Option<&str>) -> Result<Vec<ApiKey>, StoreError> {
        self.readers.with(|conn| reads::list_api_keys(conn, tenant))
    }

    async fn revoke_api_key(&self, id: &str, now: Timestamp) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.writer
            .write(move |conn| writes::revoke_api_key(conn, &id, now))
            .await
    }

    async fn set_quiet_hours(&self, rule: &QuietHoursRule) -> Result<QuietHoursRule, StoreError> {
        let owned = rule.clone();
        let stored = self
            .writer
            .write(move |conn| writes::set_quiet_hours(conn, &owned))
            .await;
        stored?.ok_or_else(|| StoreError::NotFound(format!("quiet-hours rule #{}", rule.id)))
    }

    async fn remove_quiet_hours(&self, id: i64) -> Result<bool, StoreError> {
        self.writer
            .write(move |conn| writes::remove(conn, PolicyTable::QuietRules, id))
            .await
    }

    async fn list_quiet_hours(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<QuietHoursRule>, StoreError> {
        self.readers
            .with(|conn| reads::list_quiet_hours(conn, tenant))
    }

    async fn add_destination_counts(&self, counts: &[DestinationCount]) -> Result<(), StoreError> {
        let counts = counts.to_vec();
        self.writer
            .write(move |conn| writes::add_destination_counts(conn, &counts))
            .await
    }

    async fn destination_counts(
        &self,
        tenant: &str,
        prefix: &str,
        since: Timestamp,
    ) -> Result<Vec<DestinationCount>, StoreError> {
        self.readers
            .with(|conn| reads::destination_counts(conn, tenant, prefix, since))
    }

    async fn recent_destination_counts(
        &self,
        tenant: &str,
        prefixes: &[String],
        since: Timestamp,
    ) -> Result<Vec<DestinationCount>, StoreError> {
        self.readers
            .with(|conn| reads::recent_destination_counts(conn, tenant, prefixes, since))
    }

    async fn prune_recent_counts(&self, before: Timestamp) -> Result<u64, StoreError> {
        self.writer
            .write(move |conn| writes::prune_recent_counts(conn, before))
            .await
    }

    async fn tenant_converts(&self, tenant: &str, since: Timestamp) -> Result<bool, StoreError> {
        self.readers
            .with(|conn| reads::tenant_converts(conn, tenant, since))
    }

    async fn hold_range(&self, quarantine: &Quarantine) -> Result<bool, StoreError> {
        let quarantine = quarantine.clone();
        self.writer
            .write(move |conn| writes::hold_range(conn, &quarantine))
            .await
    }

    async fn pin_range(
        &self,
        tenant: &str,
        range: &str,
        note: &str,
        now: Timestamp,
    ) -> Result<Quarantine, StoreError> {
        let (tenant, range, note) = (tenant.to_owned(), range.to_owned(), note.to_owned());
        self.writer
            .write(move |conn| writes::pin_range(conn, &tenant, &range, &note, now))
            .await
    }

    async fn lift_range(
        &self,
        tenant: &str,
        range: &str,
        note: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<Option<Quarantine>, StoreError> {
        let (tenant, range, note) = (tenant.to_owned(), range.to_owned(), note.to_owned());
        self.writer
            .write(move |conn| writes::lift_range(conn, &tenant, &range, &note, now, until))
            .await
    }

    async fn quarantines(&self, tenant: Option<&str>) -> Result<Vec<Quarantine>, StoreError> {
        self.readers.with(|conn| reads::quarantines(conn, tenant))
    }

    async fn set_rate_limit(&self, rule: &RateLimitRule) -> Result<RateLimitRule, StoreError> {
        let rule = rule.clone();
        self.writer
            .write(move |conn| writes::set_rate_limit(conn, &rule))
            .await
    }

    async fn remove_rate_limit(&self, id: i64) -> Result<bool, StoreError> {
        self.writer
            .write(move |conn| writes::remove(conn, PolicyTable::RateLimitRules, id))
            .await
    }

    async fn list_rate_limits(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<RateLimitRule>, StoreError> {
        self.readers
            .with(|conn| reads::list_rate_limits(conn, tenant))
    }

    async fn peek(
        &self,
        keys: &[RateKey<'_>],
        now: Timestamp,
    ) -> Result<Option<RateLimited>, StoreError> {
        let keys = self.counter_key.counters(keys);
        self.readers.with(|conn| reads::peek(conn, &keys, now))
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
        // Staged (see `PolicyStore::consume`).
        self.writer
            .stage(move |conn| writes::consume(conn, &keys, now))
            .await
    }

    async fn add_block(
        &self,
        entry: &NewBlockEntry,
        now: Timestamp,
    ) -> Result<(BlockEntry, bool), StoreError> {
        let (pattern, shown) = self.block_hasher.stored(entry.kind, &entry.pattern);
        let entry = NewBlockEntry {
            pattern,
            ..entry.clone()
        };
        self.writer
            .write(move |conn| writes::add_block(conn, &entry, shown.as_deref(), now))
            .await
    }

    async fn remove_block(&self, id: i64) -> Result<bool, StoreError> {
        self.writer
            .write(move |conn| writes::remove(conn, PolicyTable::BlockEntries, id))
            .await
    }

    async fn list_blocks(&self, tenant: Option<&str>) -> Result<Vec<BlockEntry>, StoreError> {
        self.readers.with(|conn| reads::list_blocks(conn, tenant))
    }

    async fn block_candidates(
        &self,
        tenant: &str,
        patterns: &[&str],
        now: Timestamp,
    ) -> Result<Vec<BlockEntry>, StoreError> {
        // On the writer's connection: its pages are warm, where a reader's cache is dropped
        // whenever the ledger changed since its last read (every read, on a busy gateway).
        let tenant = tenant.to_owned();
        let lookup = Arc::new(self.block_hasher.lookup(patterns));
        let keys = Arc::clone(&lookup);
        let found = self
            .writer
            .stage(move |conn| {
                let patterns: Vec<&str> = keys.keys.iter().map(String::as_str).collect();
                reads::block_candidates(conn, &tenant, &patterns, now)
            })
            .await?;
        Ok(lookup.reveal(found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Channel;
    use crate::store::contract::{Subject, new_delivery, store_contract};

    async fn ledger(dir: &tempfile::TempDir) -> SqliteLedger {
        SqliteLedger::connect(&format!("sqlite://{}/ledger.db", dir.path().display()))
            .await
            .unwrap()
    }

    /// A fresh ledger in a temporary directory.
    async fn open_temp() -> Option<Subject> {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ledger(&dir).await);
        Some(Subject {
            ledger: store.clone(),
            policy: store,
            _keep: Box::new(dir),
        })
    }

    store_contract!(open_temp);

    #[tokio::test]
    async fn entries_stored_in_clear_before_are_hashed_at_open_and_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let url = format!("sqlite://{}", path.display());
        drop(ledger(&dir).await);
        // As an older version left them: clear, with no masked form.
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(
                "INSERT INTO block_entries (tenant, kind, pattern, source, note, created_at)
                 VALUES ('acme', 'NUMBER', '+14155550177', 'OPT_OUT', 'twilio 21610', 0),
                        ('acme', 'PREFIX', '+882', 'ADMIN', '', 0);",
            )
            .unwrap();
        let reopened = ledger(&dir).await;
        let listed = reopened.list_blocks(Some("acme")).await.unwrap();
        let shown: Vec<&str> = listed.iter().map(|b| b.shown.as_str()).collect();
        assert_eq!(shown, ["+882", "+1415•••0177"]);
        let found = reopened
            .block_candidates("acme", &["user-1", "+14155550177"], Timestamp::now())
            .await
            .unwrap();
        assert!(found.iter().any(|b| b.pattern == "+14155550177"));
        drop(reopened);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend(std::fs::read(dir.path().join("ledger.db-wal")).unwrap_or_default());
        assert!(
            !bytes.windows(12).any(|w| w == b"+14155550177"),
            "the clear number is gone from the file"
        );
        // A key that is not the one the entries were hashed with stops the start.
        let other = crate::store::StoreSettings::at(&url).with_hash_key("another-key-".repeat(4));
        let refused = SqliteLedger::open(&other).await.unwrap_err().to_string();
        assert!(refused.contains("store.hash_key"), "{refused}");
        assert!(
            SqliteLedger::connect(&url).await.is_ok(),
            "its own key still opens it"
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
            range: None,
        };
        let orphan = ledger.start_attempt(999_999, &start);
        let (claims, orphan) = tokio::join!(claims, orphan);
        assert!(
            matches!(orphan, Err(StoreError::Conflict(_))),
            "the orphan attempt is refused: {orphan:?}"
        );
        let claimed: Vec<(DeliveryKey, Report)> = claims
            .into_iter()
            .map(|claim| match claim.unwrap() {
                Claim::Started(key, known) => (key, known.report),
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
}
