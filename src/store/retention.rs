//! The retention purge: deliveries (with their targets and attempts) are deleted for good
//! `retention.deliveries` after they were made, in the background, a batch at a time with a
//! pause between batches, so that the purge never holds the ledger's writer long.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Ledger;
use crate::config::RetentionConfig;
use crate::domain::Clock;

/// The pause between two batches of one run.
const BETWEEN_BATCHES: Duration = Duration::from_millis(50);

/// Purges old deliveries every `settings.interval` until `stop` (never, when
/// `settings.deliveries` is zero).
pub async fn purge_old_deliveries(
    ledger: Arc<dyn Ledger>,
    settings: RetentionConfig,
    clock: Arc<dyn Clock>,
    stop: CancellationToken,
) {
    let Ok(keep) = jiff::SignedDuration::try_from(settings.deliveries) else {
        return;
    };
    if keep.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(settings.interval) => {}
        }
        let before = clock.now() - keep;
        let mut removed = 0;
        loop {
            match ledger.purge(before, settings.batch).await {
                Ok(count) => {
                    removed += count;
                    if count < u64::from(settings.batch) {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "retention: old deliveries not deleted; trying again later");
                    break;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(BETWEEN_BATCHES) => {}
            }
        }
        if removed > 0 {
            tracing::info!(removed, older_than = %before, "retention: old deliveries deleted");
        }
    }
}
