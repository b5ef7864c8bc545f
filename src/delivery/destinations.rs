//! The fraud guard's counts on the hot path: each SMS or call a provider accepted, and each
//! code the user entered, is added up in memory per tenant, range and hour, and the sums go to
//! the store once a second in one statement (shared by every replica, with no write per job).
//! A crash loses at most the last second's counts: they are statistics, not records.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::policy::{DestinationCount, bucket_of};
use crate::store::{PolicyStore, StoreError};

/// How often the sums go to the store.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// (tenant, range, bucket) → (sends, conversions) not yet in the store.
type Pending = HashMap<(String, String, Timestamp), (u64, u64)>;

/// Adds up sends and conversions per tenant, range and hour until they are flushed.
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
            .entry((tenant.to_owned(), range.to_owned(), bucket_of(at)))
            .or_default();
        sums.0 += sends;
        sums.1 += conversions;
    }

    /// A provider accepted an SMS or call of `tenant` to `range`, started at `at`.
    pub fn sent(&self, tenant: &str, range: &str, at: Timestamp) {
        self.add(tenant, range, at, 1, 0);
    }

    /// The user entered the code of an SMS or call of `tenant` to `range` started at `at` (the
    /// conversion is counted in the hour of the send).
    pub fn converted(&self, tenant: &str, range: &str, at: Timestamp) {
        self.add(tenant, range, at, 0, 1);
    }

    /// Writes the sums so far to the store; on failure they are kept for the next time.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let taken = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if taken.is_empty() {
            return Ok(());
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
        let written = self.policy.add_destination_counts(&counts).await;
        if written.is_err() {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for (key, (sends, conversions)) in taken {
                let sums = pending.entry(key).or_default();
                sums.0 += sends;
                sums.1 += conversions;
            }
        }
        written
    }

    /// Flushes every second until `stop`, then once more.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(error) = self.flush().await {
                tracing::warn!(%error, "the fraud guard's counts could not be stored: kept for the next try");
            }
        }
        if let Err(error) = self.flush().await {
            tracing::warn!(%error, "the fraud guard's last counts could not be stored");
        }
    }
}
