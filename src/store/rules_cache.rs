//! The one-second rules cache: rate-limit and quiet-hours rules change rarely and every job
//! reads them, so they are served from memory around any [`PolicyStore`]. A rule written
//! through the cache applies at once (the cache is emptied); one written elsewhere (another
//! process sharing the store) applies within [`RULES_TTL`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jiff::Timestamp;

use super::{PolicyStore, StoreError};
use crate::domain::ApiKey;
use crate::policy::{
    BlockEntry, DestinationCount, NewBlockEntry, Quarantine, QuietHoursRule, RateKey,
    RateLimitRule, RateLimited,
};

/// How long a tenant's rate-limit and quiet-hours rules are served from memory.
pub const RULES_TTL: Duration = Duration::from_secs(1);

/// Tenants whose rules are kept at most (beyond, the cache starts again empty).
const RULES_CACHED_TENANTS: usize = 10_000;

/// Rules of one kind by tenant (`None`: every tenant's), with when they were read.
type RulesByTenant<T> = Mutex<HashMap<Option<String>, (Instant, Vec<T>)>>;

/// A [`PolicyStore`] whose rate-limit and quiet-hours rules are served from memory.
#[derive(Debug)]
pub struct CachedRules {
    inner: Arc<dyn PolicyStore>,
    /// Counts rule writes, so a read that raced one is not kept.
    generation: AtomicU64,
    rate_limits: RulesByTenant<RateLimitRule>,
    quiet_hours: RulesByTenant<QuietHoursRule>,
}

impl CachedRules {
    /// Caches the rules of `inner`.
    pub fn new(inner: Arc<dyn PolicyStore>) -> Self {
        CachedRules {
            inner,
            generation: AtomicU64::new(0),
            rate_limits: Mutex::default(),
            quiet_hours: Mutex::default(),
        }
    }

    /// The rules of `tenant` from memory, or from `read` (kept unless a write came meanwhile).
    async fn get<T: Clone>(
        &self,
        rules: &RulesByTenant<T>,
        tenant: Option<&str>,
        read: impl Future<Output = Result<Vec<T>, StoreError>>,
    ) -> Result<Vec<T>, StoreError> {
        let key = tenant.map(str::to_owned);
        if let Some((at, found)) = lock(rules).get(&key)
            && at.elapsed() < RULES_TTL
        {
            return Ok(found.clone());
        }
        let generation = self.generation.load(Ordering::Acquire);
        let found = read.await?;
        let mut rules = lock(rules);
        if self.generation.load(Ordering::Acquire) == generation {
            if rules.len() >= RULES_CACHED_TENANTS {
                rules.clear();
            }
            rules.insert(key, (Instant::now(), found.clone()));
        }
        Ok(found)
    }

    /// Forgets every cached rule (after a rule was written, whether or not the write held).
    fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        lock(&self.rate_limits).clear();
        lock(&self.quiet_hours).clear();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl PolicyStore for CachedRules {
    async fn create_api_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        self.inner.create_api_key(key).await
    }

    async fn erase_account_blocks(
        &self,
        tenant: &str,
        account: &str,
    ) -> Result<(u64, u64), StoreError> {
        self.inner.erase_account_blocks(tenant, account).await
    }

    async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        self.inner.api_key(id).await
    }

    async fn list_api_keys(&self, tenant: Option<&str>) -> Result<Vec<ApiKey>, StoreError> {
        self.inner.list_api_keys(tenant).await
    }

    async fn revoke_api_key(&self, id: &str, now: Timestamp) -> Result<bool, StoreError> {
        self.inner.revoke_api_key(id, now).await
    }

    async fn add_block(
        &self,
        entry: &NewBlockEntry,
        now: Timestamp,
    ) -> Result<(BlockEntry, bool), StoreError> {
        self.inner.add_block(entry, now).await
    }

    async fn remove_block(&self, id: i64) -> Result<bool, StoreError> {
        self.inner.remove_block(id).await
    }

    async fn list_blocks(&self, tenant: Option<&str>) -> Result<Vec<BlockEntry>, StoreError> {
        self.inner.list_blocks(tenant).await
    }

    async fn set_rate_limit(&self, rule: &RateLimitRule) -> Result<RateLimitRule, StoreError> {
        let stored = self.inner.set_rate_limit(rule).await;
        self.invalidate();
        stored
    }

    async fn remove_rate_limit(&self, id: i64) -> Result<bool, StoreError> {
        let removed = self.inner.remove_rate_limit(id).await;
        self.invalidate();
        removed
    }

    async fn list_rate_limits(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<RateLimitRule>, StoreError> {
        let read = self.inner.list_rate_limits(tenant);
        self.get(&self.rate_limits, tenant, read).await
    }

    async fn consume(
        &self,
        keys: &[RateKey<'_>],
        now: Timestamp,
    ) -> Result<Option<RateLimited>, StoreError> {
        self.inner.consume(keys, now).await
    }

    async fn set_quiet_hours(&self, rule: &QuietHoursRule) -> Result<QuietHoursRule, StoreError> {
        let stored = self.inner.set_quiet_hours(rule).await;
        self.invalidate();
        stored
    }

    async fn remove_quiet_hours(&self, id: i64) -> Result<bool, StoreError> {
        let removed = self.inner.remove_quiet_hours(id).await;
        self.invalidate();
        removed
    }

    async fn list_quiet_hours(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<QuietHoursRule>, StoreError> {
        let read = self.inner.list_quiet_hours(tenant);
        self.get(&self.quiet_hours, tenant, read).await
    }

    async fn peek(
        &self,
        keys: &[RateKey<'_>],
        now: Timestamp,
    ) -> Result<Option<RateLimited>, StoreError> {
        self.inner.peek(keys, now).await
    }

    async fn add_destination_counts(&self, counts: &[DestinationCount]) -> Result<(), StoreError> {
        self.inner.add_destination_counts(counts).await
    }

    async fn destination_counts(
        &self,
        tenant: &str,
        prefix: &str,
        since: Timestamp,
    ) -> Result<Vec<DestinationCount>, StoreError> {
        self.inner.destination_counts(tenant, prefix, since).await
    }

    async fn recent_destination_counts(
        &self,
        tenant: &str,
        prefixes: &[String],
        since: Timestamp,
    ) -> Result<Vec<DestinationCount>, StoreError> {
        self.inner
            .recent_destination_counts(tenant, prefixes, since)
            .await
    }

    async fn prune_recent_counts(&self, before: Timestamp) -> Result<u64, StoreError> {
        self.inner.prune_recent_counts(before).await
    }

    async fn tenant_converts(&self, tenant: &str, since: Timestamp) -> Result<bool, StoreError> {
        self.inner.tenant_converts(tenant, since).await
    }

    async fn hold_range(&self, quarantine: &Quarantine) -> Result<bool, StoreError> {
        self.inner.hold_range(quarantine).await
    }

    async fn pin_range(
        &self,
        tenant: &str,
        range: &str,
        note: &str,
        now: Timestamp,
    ) -> Result<Quarantine, StoreError> {
        self.inner.pin_range(tenant, range, note, now).await
    }

    async fn lift_range(
        &self,
        tenant: &str,
        range: &str,
        note: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<Option<Quarantine>, StoreError> {
        self.inner.lift_range(tenant, range, note, now, until).await
    }

    async fn quarantines(&self, tenant: Option<&str>) -> Result<Vec<Quarantine>, StoreError> {
        self.inner.quarantines(tenant).await
    }

    async fn block_candidates(
        &self,
        tenant: &str,
        patterns: &[&str],
        now: Timestamp,
    ) -> Result<Vec<BlockEntry>, StoreError> {
        self.inner.block_candidates(tenant, patterns, now).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::RateScope;
    use crate::store::SqliteLedger;

    fn limit(limit: u32) -> RateLimitRule {
        RateLimitRule {
            id: 0,
            tenant: Some("acme".into()),
            scope: RateScope::Account,
            prefix: String::new(),
            limit,
            window: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn rules_are_served_from_memory_yet_a_change_through_it_applies_to_the_next_read() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/ledger.db", dir.path().display());
        let store: Arc<dyn PolicyStore> = Arc::new(SqliteLedger::connect(&url).await.unwrap());
        let cached = CachedRules::new(Arc::clone(&store));
        // Read (and kept) while there are none.
        assert!(
            cached
                .list_rate_limits(Some("acme"))
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            cached
                .list_quiet_hours(Some("acme"))
                .await
                .unwrap()
                .is_empty()
        );

        // Written elsewhere (another process on the same store): served from memory until
        // the rules are a second old.
        let elsewhere = store.set_rate_limit(&limit(3)).await.unwrap();
        assert!(
            cached
                .list_rate_limits(Some("acme"))
                .await
                .unwrap()
                .is_empty()
        );
        tokio::time::sleep(RULES_TTL).await;
        assert_eq!(
            cached.list_rate_limits(Some("acme")).await.unwrap(),
            std::slice::from_ref(&elsewhere)
        );

        // Written through the cache: the next read has it.
        let here = cached.set_rate_limit(&limit(5)).await.unwrap();
        assert_eq!(
            cached.list_rate_limits(Some("acme")).await.unwrap(),
            std::slice::from_ref(&here)
        );
        assert!(cached.remove_rate_limit(here.id).await.unwrap());
        assert!(
            cached
                .list_rate_limits(Some("acme"))
                .await
                .unwrap()
                .is_empty()
        );
    }
}
