//! The fraud guard's counts on the hot path: each SMS or call a provider accepted, and each
//! code the user entered, is added up in memory per tenant, range and 10-second bucket, and the
//! guard's loop writes the sums to the store every round (`fraud.evaluate_every`) in one
//! statement (shared by every replica, with no write per job). A crash loses at most the last
//! round's counts: they are statistics, not records.

use crate::policy::{DestinationCount, recent_bucket_of};
use crate::store::{PolicyStore, StoreError};
use jiff::Timestamp;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// (tenant, range, bucket) → (sends, conversions) not yet in the store.
type Pending = HashMap<(String, String, Timestamp), (u64, u64)>;

/// Adds up sends and conversions per tenant, range and 10-second bucket until they are flushed.
#[derive(Debug)]
pub struct DestinationCounter {
    policy: Arc<dyn PolicyStore>,
    pending: Mutex<Pending>,
}

impl DestinationCounter {
    /// A counter whose sums go to `policy`.
    pub fn new(policy: Arc<dyn PolicyStore>) -> Self {
        DestinationCounter {
            policy,
            pending: Mutex::default(),
        }
    }

    fn add(&self, tenant: &str, range: &str, at: Timestamp, sends: u64, conversions: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let sums = pending
            .entry((tenant.to_owned(), range.to_owned(), recent_bucket_of(at)))
            .or_default();
        sums.0 += sends;
        sums.1 += conversions;
    }

    /// A provider accepted an SMS or call of `tenant` to `range`, started at `at`.
    pub fn sent(&self, tenant: &str, range: &str, at: Timestamp) {
        self.add(tenant, range, at, 1, 0);
    }

    /// The user entered the code of an SMS or call of `tenant` to `range` started at `at` (the
    /// conversion is counted in the bucket of the send).
    pub fn converted(&self, tenant: &str, range: &str, at: Timestamp) {
        self.add(tenant, range, at, 0, 1);
    }

    /// Writes the sums so far to the store; on failure they are kept for the next time. What
    /// was written is returned (the guard judges the ranges that had sends).
    pub async fn flush(&self) -> Result<Vec<DestinationCount>, StoreError> {
        let taken = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if taken.is_empty() {
            return Ok(Vec::new());
        }
        let counts: Vec<DestinationCount> = taken
            .iter()
            .map(
                |((tenant, range, bucket), (sends, conversions))| DestinationCount {
                    tenant: tenant.clone(),
                    range: range.clone(),
                    bucket: *bucket,
                    sends: *sends,
                    conversions: *conversions,
                },
            )
            .collect();
        if let Err(error) = self.policy.add_destination_counts(&counts).await {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for (key, (sends, conversions)) in taken {
                let sums = pending.entry(key).or_default();
                sums.0 += sends;
                sums.1 += conversions;
            }
            return Err(error);
        }
        Ok(counts)
    }
}
