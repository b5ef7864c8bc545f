//! Change notices per delivery: who waits for a delivery's report to change (an engine waiting
//! for an acknowledgement or a receipt, a `WatchDelivery` stream, an acknowledgement's answer)
//! watches that delivery alone, and a write to it wakes only them. (A broadcast of every
//! change to every waiter cost each of hundreds of waiting jobs a wake-up per write anywhere.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// The watched deliveries and their watchers.
#[derive(Debug, Default)]
pub struct ChangeNotices {
    /// By delivery id: a counter bumped on every change, and how many watch it.
    watched: Mutex<HashMap<String, (watch::Sender<u64>, usize)>>,
    /// How many deliveries are watched (a write to an unwatched one takes no lock).
    count: AtomicUsize,
}

impl ChangeNotices {
    /// A new, empty set of notices.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (watch::Sender<u64>, usize)>> {
        self.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts watching delivery `id`: every change announced after this call wakes the watch.
    pub fn watch(self: &Arc<Self>, id: &str) -> ChangeWatch {
        let mut watched = self.lock();
        let entry = watched.entry(id.to_owned()).or_insert_with(|| {
            self.count.fetch_add(1, Ordering::Relaxed);
            (watch::channel(0).0, 0)
        });
        entry.1 += 1;
        let mut receiver = entry.0.subscribe();
        receiver.mark_unchanged();
        ChangeWatch {
            notices: Arc::clone(self),
            id: id.to_owned(),
            receiver,
        }
    }

    /// Announces that delivery `id`'s report changed.
    pub fn changed(&self, id: &str) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        if let Some((sender, _)) = self.lock().get(id) {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Announces that any delivery may have changed (changes made elsewhere may have been
    /// missed): every watcher looks again.
    pub fn changed_all(&self) {
        for (sender, _) in self.lock().values() {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn unwatch(&self, id: &str) {
        let mut watched = self.lock();
        if let Some(entry) = watched.get_mut(id) {
            entry.1 -= 1;
            if entry.1 == 0 {
                watched.remove(id);
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// A watch on one delivery's changes; it stops watching when dropped.
#[derive(Debug)]
pub struct ChangeWatch {
    notices: Arc<ChangeNotices>,
    id: String,
    receiver: watch::Receiver<u64>,
}

impl ChangeWatch {
    /// Returns at the delivery's next change (at once if one came since the last return).
    pub async fn changed(&mut self) {
        // The sender lives as long as this watch is registered: no error while we exist.
        if self.receiver.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for ChangeWatch {
    fn drop(&mut self) {
        self.notices.unwatch(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_watch_wakes_for_its_own_delivery_only_and_misses_nothing() {
        let notices = ChangeNotices::new();
        let mut mine = notices.watch("acme/1");
        notices.changed("acme/2");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), mine.changed())
                .await
                .is_err(),
            "another delivery's change does not wake it"
        );
        // A change announced before the wait is not missed.
        notices.changed("acme/1");
        tokio::time::timeout(std::time::Duration::from_secs(1), mine.changed())
            .await
            .unwrap();
        let second = notices.watch("acme/1");
        drop(mine);
        assert_eq!(notices.count.load(Ordering::Relaxed), 1);
        drop(second);
        assert_eq!(notices.count.load(Ordering::Relaxed), 0);
        assert!(notices.lock().is_empty());
    }
}
