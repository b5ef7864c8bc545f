//! Persistence: the delivery ledger behind the [`Ledger`] trait and the policy rules behind
//! [`PolicyStore`], with SQLite as the embedded default. Callers hold `Arc<dyn Ledger>` and
//! `Arc<dyn PolicyStore>` from [`open`], the one place that names a backend; errors are
//! [`StoreError`]s whatever the backend. The code is never stored.
//!
//! - `sqlite/`: the SQLite backend (its group-commit writer, reads, writes, error sorting): one
//!   gateway.
//! - `postgres/`: the PostgreSQL backend: replicas sharing one database (leases on claims,
//!   atomic counters, change notifications).
//! - `rules_cache`: the one-second rules cache, around any [`PolicyStore`].
//! - `contract` (tests): the rules every backend keeps, written against the traits.

mod block_hash;
#[cfg(test)]
pub(crate) mod contract;
mod postgres;
mod retention;
mod rows;
mod rules_cache;
mod settings;
mod shared;
mod sqlite;
mod sqlx_errors;

use crate::policy::{
    BlockEntry, DestinationCount, NewBlockEntry, Quarantine, QuietHoursRule, RateKey,
    RateLimitRule, RateLimited,
};

use async_trait::async_trait;
use jiff::Timestamp;

use crate::domain::{
    Acknowledgement, ApiKey, AttemptOutcome, Channel, DeliveryId, DeliveryStatus, FailureReason,
    Platform, Report, SmsShape, TargetStatus, Verification,
};

pub use postgres::PostgresLedger;
pub use retention::purge_old_deliveries;
pub use rules_cache::{CachedRules, RULES_TTL};
pub use settings::StoreSettings;
pub use sqlite::SqliteLedger;

/// The configured store: the delivery ledger and the policy rules (with its rules cache).
#[derive(Clone)]
pub struct Stores {
    /// The delivery ledger.
    pub ledger: std::sync::Arc<dyn Ledger>,
    /// Block entries, rate limits and quiet hours, rules served through the rules cache.
    pub policy: std::sync::Arc<dyn PolicyStore>,
}

/// Opens the configured store, bringing its schema up to date: the one place that picks a
/// backend, by the URL's scheme.
pub async fn open(settings: &StoreSettings) -> Result<Stores, StoreError> {
    let url = settings.url.as_str();
    let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
    /// The ledger, and the same store's policy behind the rules cache.
    fn stores<S: Ledger + PolicyStore>(store: std::sync::Arc<S>) -> Stores {
        Stores {
            ledger: store.clone(),
            policy: std::sync::Arc::new(CachedRules::new(store)),
        }
    }
    match scheme {
        "sqlite" => Ok(stores(std::sync::Arc::new(
            SqliteLedger::open(settings).await?,
        ))),
        "postgres" | "postgresql" => Ok(stores(std::sync::Arc::new(
            PostgresLedger::connect(settings).await?,
        ))),
        other => Err(StoreError::Unavailable(format!(
            "no ledger backend for `{other}:` URLs (store.url takes sqlite://PATH or postgres://…)"
        ))),
    }
}

/// What an attempt left unanswered by a worker that went away is recorded as (by every
/// backend, when another worker takes the delivery over).
pub const INTERRUPTED: &str = "interrupted: the gateway stopped while the call was open, \
     so whether the provider took the message is not known (it may have been sent)";

/// The ledger's internal key of a delivery.
pub type DeliveryKey = i64;
/// The ledger's key of one attempt.
pub type AttemptKey = i64;

/// A storage failure, told apart as a caller needs it; no backend's own types show through
/// (each backend sorts its errors into these).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// What was asked for is not in the store (a delivery, a rule).
    #[error("delivery {0} is not in the ledger")]
    NotFound(String),
    /// The write collides with what is stored (a constraint the write breaks).
    #[error("ledger conflict: {0}")]
    Conflict(String),
    /// The store cannot serve the request now (unreachable, out of disk, a commit that failed,
    /// the writer stopped): the same request may succeed later.
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
    /// A stored value could not be read back, or the schema is not one this build knows.
    #[error("ledger holds an unreadable value: {0}")]
    Corrupt(String),
}

/// A delivery about to enter the ledger.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    /// `(tenant, job_id)`.
    pub id: DeliveryId,
    /// The account.
    pub account: String,
    /// The job's purpose.
    pub purpose: String,
    /// When the code expires.
    pub expires_at: Timestamp,
    /// Its targets, in job order.
    pub targets: Vec<NewTarget>,
}

/// A target as first recorded.
#[derive(Debug, Clone)]
pub struct NewTarget {
    /// The channel it is reached by first.
    pub channel: Channel,
    /// Device id, or masked number.
    pub label: String,
    /// The platform, for devices.
    pub platform: Option<Platform>,
}

/// How many writes have changed a delivery's row or its targets: every write of this ledger
/// that does counts one (the claim, [`Ledger::update_target`], [`Ledger::finish_attempt`],
/// [`Ledger::apply_receipt`], [`Ledger::record_ack`], [`Ledger::finish`]); an attempt's start
/// does not.
pub type Revision = u64;

/// `at` as the ledger keeps it: to the microsecond. A report built in memory uses it to match
/// the one stored.
pub fn as_stored(at: Timestamp) -> Timestamp {
    Timestamp::from_microsecond(at.as_microsecond()).unwrap_or(at)
}

/// A delivery's report as the writes of its engine left it, and the revision they brought it
/// to: when the ledger's revision is still that, nothing else wrote and the report is exact.
#[derive(Debug, Clone)]
pub struct KnownReport {
    /// The report.
    pub report: Report,
    /// The delivery's revision after the engine's last write (counting `pending_end`).
    pub revision: Revision,
    /// The engine's last provider call's end when nothing came after it but the delivery's
    /// end: not written yet, and written by [`Ledger::finish`] before (or with) the outcome.
    pub pending_end: Option<PendingEnd>,
}

/// A provider call's end and its target's new state, as [`Ledger::finish_attempt`] takes them.
#[derive(Debug, Clone)]
pub struct PendingEnd {
    /// The attempt that ended.
    pub attempt: AttemptKey,
    /// How it ended.
    pub end: AttemptEnd,
    /// Its target's index.
    pub target: u32,
    /// Its target's new state.
    pub update: TargetUpdate,
}

/// The result of [`Ledger::claim`].
#[derive(Debug, Clone)]
pub enum Claim {
    /// This worker now owns the delivery, which had not started.
    Started(DeliveryKey, KnownReport),
    /// This worker took over a delivery whose previous worker went away; attempts it left
    /// unanswered are closed as interrupted.
    Resumed(DeliveryKey, KnownReport),
    /// The delivery is finished: nothing more to do.
    Finished(Report),
    /// Another worker is on it (a duplicate publish arrived while it runs).
    HeldElsewhere(Report),
    /// The broker handed the job out again, but another worker holds the delivery under a
    /// lease that has not run out (it may still be working, or it died moments ago): the job
    /// is to be tried again once the lease ends.
    Leased {
        /// The report as it stands.
        report: Report,
        /// When the lease runs out unless renewed.
        until: Timestamp,
    },
}

/// A change to the ledger made by another process (or this one), as a backend shared by
/// replicas announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerChange {
    /// Delivery `tenant/job_id` changed.
    Delivery(String),
    /// Announcements may have been missed: any delivery may have changed.
    Unknown,
}

/// A provider call that is starting.
#[derive(Debug, Clone)]
pub struct AttemptStart {
    /// Index of the target in the job.
    pub target: u32,
    /// The provider's configured name.
    pub provider: String,
    /// The channel.
    pub channel: Channel,
    /// Masked number or token.
    pub masked_target: String,
    /// When it started.
    pub started_at: Timestamp,
    /// Retry number for this provider and target.
    pub retry: u32,
    /// For SMS: the text's encoding and segment count.
    pub sms: Option<SmsShape>,
    /// For SMS and calls: the number's range (`policy::destination_range`), never the number.
    pub range: Option<String>,
}

/// How a provider call ended.
#[derive(Debug, Clone)]
pub struct AttemptEnd {
    /// When it ended.
    pub ended_at: Timestamp,
    /// How.
    pub outcome: AttemptOutcome,
    /// Why it failed.
    pub reason: Option<FailureReason>,
    /// The provider's code.
    pub provider_code: Option<String>,
    /// The provider's message.
    pub provider_message: Option<String>,
    /// The provider's message id.
    pub provider_message_id: Option<String>,
    /// Whether the provider may report the message's fate (a delivery receipt) under that
    /// message id: receipts are matched only to attempts that await one. Once an attempt awaits a
    /// receipt, a later end (the receipt's) leaves it matchable; an attempt's end that awaits
    /// none writes no index entry (on PostgreSQL, a heap-only update).
    pub awaits_receipt: bool,
    /// When the same provider will be called again for this target, if it will.
    pub next_retry_at: Option<Timestamp>,
    /// For a dead push token: since when the push service has known it is invalid.
    pub token_invalid_since: Option<Timestamp>,
}

impl AttemptEnd {
    /// The key a receipt for this call is matched on, where the end makes it await one.
    pub(crate) fn receipt_key(&self) -> Option<&str> {
        self.provider_message_id
            .as_deref()
            .filter(|_| self.awaits_receipt)
    }
}

/// A change to one target.
#[derive(Debug, Clone)]
pub struct TargetUpdate {
    /// The channel it was last tried on.
    pub channel: Channel,
    /// Its new status.
    pub status: TargetStatus,
    /// Why it failed.
    pub reason: Option<FailureReason>,
    /// Why, in words.
    pub detail: Option<String>,
}

impl TargetUpdate {
    /// A target's new state from how its latest call ended (no detail).
    pub fn after(channel: Channel, end: &AttemptEnd) -> Self {
        let status = match end.outcome {
            AttemptOutcome::Sent => TargetStatus::Sent,
            AttemptOutcome::Delivered => TargetStatus::Delivered,
            AttemptOutcome::Failed => TargetStatus::Failed,
            AttemptOutcome::InFlight | AttemptOutcome::Interrupted => TargetStatus::Pending,
        };
        TargetUpdate {
            channel,
            status,
            reason: end.reason,
            detail: None,
        }
    }
}

/// The end of a delivery.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// A terminal status.
    pub status: DeliveryStatus,
    /// The headline reason.
    pub reason: Option<FailureReason>,
    /// The human summary.
    pub summary: String,
}

impl Outcome {
    /// `report` ended with this outcome at `now` (as the ledger has just written it).
    pub fn conclude(self, mut report: Report, now: Timestamp) -> Report {
        report.status = self.status;
        report.reason = self.reason;
        report.hint = self.reason.map(FailureReason::hint);
        report.summary = self.summary;
        report.updated_at = now;
        report
    }
}

/// Draws a delivery's final outcome from its report as the ledger holds it (see
/// [`Ledger::finish`]).
pub type DecideOutcome = std::sync::Arc<dyn Fn(&Report) -> Outcome + Send + Sync>;

/// Filters and paging for [`Ledger::list`].
#[derive(Debug, Clone)]
pub struct ListQuery {
    /// Required.
    pub tenant: String,
    /// Only this account.
    pub account: Option<String>,
    /// Only this status.
    pub status: Option<DeliveryStatus>,
    /// Page size (1..=100).
    pub limit: u32,
    /// Only deliveries older than this cursor (from a previous page).
    pub before: Option<i64>,
}

/// One page of reports, newest first.
#[derive(Debug, Clone)]
pub struct ListPage {
    /// The reports.
    pub reports: Vec<Report>,
    /// The cursor for the next page, when there is one.
    pub next: Option<i64>,
}

/// Hears of the ledger's group commits (the ops metrics do).
pub trait CommitObserver: Send + Sync {
    /// `backend` (`sqlite`, `postgres`) committed `writes` writes of `statement` (its kind of
    /// grouped write) in one commit that took `took`.
    fn committed(
        &self,
        backend: &'static str,
        statement: &'static str,
        writes: usize,
        took: std::time::Duration,
    );
}

/// Where a ledger reports its group commits: to nobody until [`CommitWatch::set`].
#[derive(Clone, Default)]
pub struct CommitWatch(std::sync::Arc<std::sync::OnceLock<std::sync::Arc<dyn CommitObserver>>>);

impl CommitWatch {
    /// Reports to `observer` from now on (a second call changes nothing).
    pub fn set(&self, observer: std::sync::Arc<dyn CommitObserver>) {
        let _ = self.0.set(observer);
    }

    /// A group commit, told to the observer if there is one.
    pub(crate) fn committed(
        &self,
        backend: &'static str,
        statement: &'static str,
        writes: usize,
        took: std::time::Duration,
    ) {
        if let Some(observer) = self.0.get() {
            observer.committed(backend, statement, writes, took);
        }
    }
}

impl std::fmt::Debug for CommitWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitWatch")
            .field("observed", &self.0.get().is_some())
            .finish()
    }
}

/// The delivery ledger. Its writes return once they are on disk, except through
/// [`Ledger::staged`].
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// A view of this ledger whose writes return once committed (later reads see them, a
    /// crash of the process keeps them) but maybe before they are on disk; [`Ledger::flush`]
    /// makes them durable. The delivery engine writes through it and flushes before it waits
    /// (a retry's back-off, a device's acknowledgement) and before its job is acked, so a power
    /// cut can only undo the writes of a job the broker still holds and hands out again.
    fn staged(&self) -> std::sync::Arc<dyn Ledger>;

    /// Waits until every write committed so far is on disk.
    async fn flush(&self) -> Result<(), StoreError>;

    /// Where this ledger reports its group commits (a ledger without any: a watch nobody
    /// hears).
    fn commit_watch(&self) -> CommitWatch {
        CommitWatch::default()
    }

    /// Makes and checks the acknowledgement tokens pushes carry (the same at every replica
    /// sharing this ledger).
    fn ack_tokens(&self) -> crate::domain::AckTokens;

    /// Records a delivery as ACCEPTED unless `(tenant, job_id)` is known; returns the report
    /// and whether it was new.
    async fn accept(&self, new: &NewDelivery, now: Timestamp)
    -> Result<(Report, bool), StoreError>;

    /// Removes a delivery that is still only ACCEPTED (its job could not be queued).
    async fn forget_accepted(&self, id: &DeliveryId) -> Result<(), StoreError>;

    /// Changes other processes make, for a backend that several replicas share (`None`: every
    /// change goes through this process).
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<LedgerChange>> {
        None
    }

    /// Takes ownership of a delivery for `worker`, inserting it if new. An IN_PROGRESS one is
    /// taken over, its unanswered attempts closed as interrupted, when its worker is gone: in a
    /// store only this process uses, `takeover` (the broker redelivered the job) says so; in a
    /// store replicas share, the owner's lease has run out (a redelivered job whose owner's
    /// lease still holds gets [`Claim::Leased`], to be tried again when it ends).
    async fn claim(
        &self,
        new: &NewDelivery,
        worker: &str,
        takeover: bool,
        now: Timestamp,
    ) -> Result<Claim, StoreError>;

    /// Records that a provider call is starting.
    async fn start_attempt(
        &self,
        key: DeliveryKey,
        start: &AttemptStart,
    ) -> Result<AttemptKey, StoreError>;

    /// Records how a provider call ended and, in the same transaction, its target's new
    /// state: a crash can never leave an accepted attempt on a target still marked pending.
    async fn finish_attempt(
        &self,
        key: DeliveryKey,
        attempt: AttemptKey,
        end: &AttemptEnd,
        target: u32,
        update: &TargetUpdate,
    ) -> Result<(), StoreError>;

    /// Updates one target.
    async fn update_target(
        &self,
        key: DeliveryKey,
        index: u32,
        update: &TargetUpdate,
        now: Timestamp,
    ) -> Result<(), StoreError>;

    /// Applies a provider's delivery receipt to the newest attempt it sent as `message_id` that
    /// awaits one ([`AttemptEnd::awaits_receipt`]) and still waits for its fate (outcome SENT):
    /// the attempt's outcome and the target's status.
    /// Returns the delivery's key, id and status (as the receipt left it) when found; an attempt
    /// already final is never matched (providers reuse message ids).
    async fn apply_receipt(
        &self,
        provider: &str,
        message_id: &str,
        end: &AttemptEnd,
    ) -> Result<Option<(DeliveryKey, DeliveryId, DeliveryStatus)>, StoreError>;

    /// Records a device's acknowledgement on target `index`.
    async fn record_ack(
        &self,
        key: DeliveryKey,
        index: u32,
        ack: Acknowledgement,
        now: Timestamp,
    ) -> Result<(), StoreError>;

    /// Records upstream's report of the user entering the code (or not) at `verification.at`;
    /// `false` when it changes nothing: a delivery once verified stays verified (the first
    /// verification's time stands), while a failure is replaced by a later report.
    async fn record_verification(
        &self,
        key: DeliveryKey,
        verification: Verification,
        now: Timestamp,
    ) -> Result<bool, StoreError>;

    /// The ranges a delivery's SMS and calls went to that a provider accepted, with when each
    /// call started: what a verification of the delivery is counted for.
    async fn sent_ranges(&self, key: DeliveryKey) -> Result<Vec<(String, Timestamp)>, StoreError>;

    /// The acknowledgements recorded on a delivery's targets, by target index.
    async fn acknowledgements(
        &self,
        key: DeliveryKey,
    ) -> Result<Vec<(u32, Acknowledgement)>, StoreError>;

    /// The internal key of a delivery, if known.
    async fn key(&self, id: &DeliveryId) -> Result<Option<DeliveryKey>, StoreError>;

    /// Marks the delivery terminal with the outcome `decide` draws from its report as it stands
    /// in the same transaction (an acknowledgement or receipt recorded meanwhile is not
    /// missed), and returns the final report. `known` spares reading the report when the
    /// delivery is still at its revision.
    async fn finish(
        &self,
        key: DeliveryKey,
        now: Timestamp,
        decide: DecideOutcome,
        known: Option<KnownReport>,
    ) -> Result<Report, StoreError>;

    /// The report of one delivery by its internal key.
    async fn report(&self, key: DeliveryKey) -> Result<Report, StoreError>;

    /// One target's status and reason (a waiting engine's cheap look, instead of the whole
    /// report); `None` when there is no such target.
    async fn target_state(
        &self,
        key: DeliveryKey,
        index: u32,
    ) -> Result<Option<(TargetStatus, Option<FailureReason>)>, StoreError>;

    /// The report of one delivery, if known.
    async fn get(&self, id: &DeliveryId) -> Result<Option<Report>, StoreError>;

    /// Reports, newest first.
    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError>;

    /// Deletes up to `batch` deliveries made before `before` and not in progress, with their
    /// targets and attempts, for good; how many.
    async fn purge(&self, before: Timestamp, batch: u32) -> Result<u64, StoreError>;

    /// Deletes every delivery of `account` of `tenant` that is not in progress, with its
    /// targets and attempts, for good; how many.
    async fn erase_account(&self, tenant: &str, account: &str) -> Result<u64, StoreError>;
}

/// Policy rules (block lists so far).
#[async_trait]
pub trait PolicyStore: std::fmt::Debug + Send + Sync + 'static {
    /// Adds a block entry; an entry with the same tenant, kind and pattern is returned as it is
    /// (`false`: nothing new was added).
    async fn add_block(
        &self,
        entry: &NewBlockEntry,
        now: Timestamp,
    ) -> Result<(BlockEntry, bool), StoreError>;

    /// Removes a block entry; false when there was none with that id.
    async fn remove_block(&self, id: i64) -> Result<bool, StoreError>;

    /// Block entries, optionally of one tenant (global ones included), newest first.
    async fn list_blocks(&self, tenant: Option<&str>) -> Result<Vec<BlockEntry>, StoreError>;

    /// Sets the rate limit for its (tenant, scope, prefix), replacing one that was there.
    async fn set_rate_limit(&self, rule: &RateLimitRule) -> Result<RateLimitRule, StoreError>;

    /// Removes a rate limit; false when there was none with that id.
    async fn remove_rate_limit(&self, id: i64) -> Result<bool, StoreError>;

    /// Rate limits, optionally of one tenant (global ones included).
    async fn list_rate_limits(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<RateLimitRule>, StoreError>;

    /// Counts one send under every key, atomically, unless one of them is at its limit: then
    /// nothing is counted and the limit (with when it frees up) is returned. The count is
    /// committed on return and on disk with the ledger's next [`Ledger::flush`], made before
    /// the job is acked (a power cut before then undoes it with the job's other writes, and
    /// the broker hands the job out again).
    async fn consume(
        &self,
        keys: &[RateKey<'_>],
        now: Timestamp,
    ) -> Result<Option<RateLimited>, StoreError>;

    /// Stores a quiet-hours rule: a new one when its id is 0, else it replaces that rule
    /// (`NotFound` when there is none).
    async fn set_quiet_hours(&self, rule: &QuietHoursRule) -> Result<QuietHoursRule, StoreError>;

    /// Removes a quiet-hours rule; false when there was none with that id.
    async fn remove_quiet_hours(&self, id: i64) -> Result<bool, StoreError>;

    /// Quiet-hours rules, optionally of one tenant (global ones included).
    async fn list_quiet_hours(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<QuietHoursRule>, StoreError>;

    /// Adds sends and conversions to the fraud guard's counts: each count's bucket is a recent
    /// (10-second) one, added to the recent counts and to its hour's (one statement each).
    async fn add_destination_counts(&self, counts: &[DestinationCount]) -> Result<(), StoreError>;

    /// A tenant's counts for the ranges starting with `prefix` (a country's calling code, or
    /// a range), from the bucket holding `since` on, by range and bucket.
    async fn destination_counts(
        &self,
        tenant: &str,
        prefix: &str,
        since: Timestamp,
    ) -> Result<Vec<DestinationCount>, StoreError>;

    /// One tenant's counts for the ranges starting with one of `prefixes` (a range itself, or a
    /// country's calling code) in the recent 10-second buckets from the one holding `since` on
    /// (the last hour is kept).
    async fn recent_destination_counts(
        &self,
        tenant: &str,
        prefixes: &[String],
        since: Timestamp,
    ) -> Result<Vec<DestinationCount>, StoreError>;

    /// Forgets the recent buckets that start before `before`; how many.
    async fn prune_recent_counts(&self, before: Timestamp) -> Result<u64, StoreError>;

    /// Whether `tenant` reported any conversion for a send from `since` on (the guard judges
    /// only tenants that report verifications).
    async fn tenant_converts(&self, tenant: &str, since: Timestamp) -> Result<bool, StoreError>;

    /// Holds a range as `quarantine` says, unless its row is settled at `quarantine.since`
    /// (held, or lifted lately): true when it was held now (replicas judging the same range
    /// at once hold it once).
    async fn hold_range(&self, quarantine: &Quarantine) -> Result<bool, StoreError>;

    /// Pins a range: held until an operator lifts it (the guard's evidence, if any, is kept).
    async fn pin_range(
        &self,
        tenant: &str,
        range: &str,
        note: &str,
        now: Timestamp,
    ) -> Result<Quarantine, StoreError>;

    /// Lifts a held range; the guard leaves it alone until `until`. `None` when it is not held.
    async fn lift_range(
        &self,
        tenant: &str,
        range: &str,
        note: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<Option<Quarantine>, StoreError>;

    /// Quarantines (held, expired or lifted), of one tenant or all, newest first.
    async fn quarantines(&self, tenant: Option<&str>) -> Result<Vec<Quarantine>, StoreError>;

    /// Whether a send under these keys would be limited at `now`, without counting it.
    async fn peek(
        &self,
        keys: &[RateKey<'_>],
        now: Timestamp,
    ) -> Result<Option<RateLimited>, StoreError>;

    /// The entries in force at `now` that could block a job of `tenant`: those naming its
    /// account, one of its numbers or tokens, and every prefix entry.
    async fn block_candidates(
        &self,
        tenant: &str,
        patterns: &[&str],
        now: Timestamp,
    ) -> Result<Vec<BlockEntry>, StoreError>;

    /// Removes the block entries naming `account` of `tenant`, but not its opt-outs (kept as
    /// the law may require): how many were removed, and how many opt-outs stay.
    async fn erase_account_blocks(
        &self,
        tenant: &str,
        account: &str,
    ) -> Result<(u64, u64), StoreError>;

    /// Stores a new API key (its id is new: 48 random bits).
    async fn create_api_key(&self, key: &ApiKey) -> Result<(), StoreError>;

    /// The API key `id`, revoked or not.
    async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError>;

    /// API keys, of one tenant (its own only, not the global ones) or all, oldest first.
    async fn list_api_keys(&self, tenant: Option<&str>) -> Result<Vec<ApiKey>, StoreError>;

    /// Revokes the API key `id`; false when there is none that is still valid.
    async fn revoke_api_key(&self, id: &str, now: Timestamp) -> Result<bool, StoreError>;
}
