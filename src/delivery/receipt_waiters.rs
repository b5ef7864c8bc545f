//! Receipts handed straight to the engine that waits for them: when the job whose SMS or call
//! a receipt is about is still held by this process (waiting up to `receipt_wait`), the
//! receipt goes to it, and it records the receipt among its own writes (its copy of the report
//! stays exact; nothing is read back). Otherwise the receipt is applied through the ledger.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::providers::ProviderReceipt;

/// (provider, message id).
type Key = (String, String);

/// The engines waiting here for a receipt, by provider and message id.
#[derive(Debug, Default)]
pub(crate) struct ReceiptWaiters {
    waiting: Mutex<HashMap<Key, oneshot::Sender<ProviderReceipt>>>,
}

impl ReceiptWaiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, oneshot::Sender<ProviderReceipt>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the receipt of `message_id` from `provider` (until the wait is dropped).
    pub(crate) fn wait_for(self: &Arc<Self>, provider: &str, message_id: &str) -> ReceiptWait {
        let (sender, receipt) = oneshot::channel();
        let key = (provider.to_owned(), message_id.to_owned());
        self.lock().insert(key.clone(), sender);
        ReceiptWait {
            waiters: Arc::clone(self),
            key,
            receipt,
        }
    }

    /// Hands `receipt` to the engine waiting for it; gives it back when none is.
    pub(crate) fn hand_over(&self, receipt: ProviderReceipt) -> Result<(), ProviderReceipt> {
        let key = (receipt.provider.clone(), receipt.message_id.clone());
        let waiting = self.lock().remove(&key);
        match waiting {
            Some(sender) => sender.send(receipt),
            None => Err(receipt),
        }
    }
}

/// One engine's wait for one receipt.
#[derive(Debug)]
pub(crate) struct ReceiptWait {
    waiters: Arc<ReceiptWaiters>,
    key: Key,
    /// Resolves with the receipt.
    pub(crate) receipt: oneshot::Receiver<ProviderReceipt>,
}

impl Drop for ReceiptWait {
    fn drop(&mut self) {
        // No longer waited for (a message id belongs to one call, so the key is this wait's).
        self.waiters.lock().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::AttemptOutcome;

    fn receipt(id: &str) -> ProviderReceipt {
        ProviderReceipt {
            provider: "smsc".into(),
            message_id: id.into(),
            outcome: AttemptOutcome::Delivered,
            reason: None,
            code: None,
            detail: "deliver_sm receipt: stat DELIVRD".into(),
        }
    }

    #[tokio::test]
    async fn a_receipt_goes_to_its_waiter_and_comes_back_when_none_waits() {
        let waiters = Arc::new(ReceiptWaiters::default());
        let mut wait = waiters.wait_for("smsc", "A1");
        assert!(
            waiters.hand_over(receipt("B2")).is_err(),
            "nobody waits for B2"
        );
        waiters.hand_over(receipt("A1")).unwrap();
        assert_eq!((&mut wait.receipt).await.unwrap().message_id, "A1");
        // A wait that ended (timed out) no longer takes receipts.
        drop(waiters.wait_for("smsc", "C3"));
        assert!(waiters.hand_over(receipt("C3")).is_err());
    }
}
