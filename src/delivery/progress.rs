//! One delivery's writes: every write goes to the ledger's staged view and into the delivery's
//! own copy of the report (so the final outcome needs no read back), and tells watchers.
//!
//! A provider call's end is held back until the delivery's next write, wait or flush: when
//! the next is the delivery's end (the common case: the call reached its target), the ledger
//! writes both at once (see [`KnownReport::pending_end`]), one statement instead of two. Every
//! other write, every flush and every wait (for a receipt or an acknowledgement, a retry's
//! back-off, a circuit, a free call slot) writes it first.

use std::sync::{Arc, Mutex};

use jiff::Timestamp;

use super::changes::{ChangeNotices, ChangeWatch};
use super::receipt_waiters::ReceiptWaiters;
use crate::domain::{Attempt, AttemptOutcome, Clock, FailureReason, Report};
use crate::store::{
    AttemptEnd, AttemptKey, AttemptStart, DeliveryKey, KnownReport, Ledger, PendingEnd, StoreError,
    TargetUpdate, as_stored,
};

/// The ledger row being written by one delivery, and the channel that announces its changes.
pub(crate) struct Progress<'a> {
    pub(crate) key: DeliveryKey,
    pub(crate) id: String,
    /// The staged view: writes return once committed; see [`Progress::flush`].
    pub(crate) ledger: &'a dyn Ledger,
    pub(super) own: Mutex<OwnWrites>,
    pub(crate) clock: &'a dyn Clock,
    pub(super) changes: &'a Arc<ChangeNotices>,
    /// Receipts handed to this delivery's engine while it waits for them.
    pub(crate) receipts: &'a Arc<ReceiptWaiters>,
}

/// What a delivery's own writes made of its report.
pub(super) struct OwnWrites {
    /// The report as they left it, and the revision they brought it to.
    pub(super) known: KnownReport,
    /// Where each attempt they started sits in `known`: its key, target and position.
    pub(super) attempts: Vec<(AttemptKey, usize, usize)>,
    /// Provider calls started and not ended yet (several devices are pushed at once).
    pub(super) calls_in_flight: usize,
}

impl Progress<'_> {
    /// Tells this delivery's watchers that its report changed.
    pub(crate) fn changed(&self) {
        self.changes.changed(&self.id);
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// How long until `deadline` (zero once it passed).
    pub(crate) fn time_left(&self, deadline: Timestamp) -> std::time::Duration {
        deadline
            .duration_since(self.now())
            .max(jiff::SignedDuration::ZERO)
            .unsigned_abs()
    }

    /// Records that a provider call is starting (and tells watchers): committed (visible, and kept if the process
    /// dies) when this returns, on disk with the next flush. Not fsynced before the call: a
    /// power cut could forget an attempt that was made, but it could not stop a second send
    /// either way (a taken-over attempt that was in flight is tried again), and an fsync
    /// before every call would add its latency to every code.
    pub(crate) async fn start_attempt(
        &self,
        start: &AttemptStart,
    ) -> Result<AttemptKey, StoreError> {
        self.write_held_end().await?;
        let attempt = self.ledger.start_attempt(self.key, start).await?;
        let mut own = lock(&self.own);
        let OwnWrites {
            known, attempts, ..
        } = &mut *own;
        let index = start.target as usize;
        if let Some(target) = known.report.targets.get_mut(index) {
            target.attempts.push(Attempt {
                provider: start.provider.clone(),
                channel: start.channel,
                target: start.masked_target.clone(),
                started_at: as_stored(start.started_at),
                ended_at: None,
                outcome: AttemptOutcome::InFlight,
                reason: None,
                provider_code: None,
                provider_message: None,
                retry: start.retry,
                provider_message_id: None,
                next_retry_at: None,
                token_invalid_since: None,
                sms: start.sms,
            });
            attempts.push((attempt, index, target.attempts.len() - 1));
        }
        own.calls_in_flight += 1;
        drop(own);
        self.changed();
        Ok(attempt)
    }

    /// Records how a provider call ended and its target's new state, and tells watchers. Held
    /// back until the delivery's next write, wait or flush (see the module's note).
    pub(crate) async fn finish_attempt(
        &self,
        attempt: AttemptKey,
        end: &AttemptEnd,
        index: usize,
        update: &TargetUpdate,
    ) -> Result<(), StoreError> {
        let displaced = {
            let mut own = lock(&self.own);
            let OwnWrites {
                known,
                attempts,
                calls_in_flight,
            } = &mut *own;
            known.revision += 1;
            *calls_in_flight = calls_in_flight.saturating_sub(1);
            let this = PendingEnd {
                attempt,
                end: end.clone(),
                target: index as u32,
                update: update.clone(),
            };
            // Held back only when no other call of the delivery is still under way (several
            // devices are pushed at once): the one under way could take as long as a provider
            // lets it, and this end must not wait for it. One held before is written now.
            let displaced = if *calls_in_flight == 0 {
                known.pending_end.replace(this)
            } else {
                Some(this)
            };
            if let Some(&(_, target, position)) =
                attempts.iter().find(|(key, _, _)| *key == attempt)
                && let Some(started) = known.report.targets[target].attempts.get_mut(position)
            {
                started.ended_at = Some(as_stored(end.ended_at));
                started.outcome = end.outcome;
                started.reason = end.reason;
                started.provider_code = end.provider_code.clone();
                started.provider_message = end.provider_message.clone();
                started.provider_message_id = end.provider_message_id.clone();
                started.next_retry_at = end.next_retry_at.map(as_stored);
                started.token_invalid_since = end.token_invalid_since.map(as_stored);
            }
            apply_update(&mut known.report, index, update);
            displaced
        };
        if let Some(p) = displaced {
            self.ledger
                .finish_attempt(self.key, p.attempt, &p.end, p.target, &p.update)
                .await?;
        }
        self.changed();
        Ok(())
    }

    /// Updates one target, and tells watchers.
    pub(crate) async fn update_target(
        &self,
        index: usize,
        update: &TargetUpdate,
    ) -> Result<(), StoreError> {
        self.write_held_end().await?;
        self.ledger
            .update_target(self.key, index as u32, update, self.now())
            .await?;
        let mut own = lock(&self.own);
        own.known.revision += 1;
        apply_update(&mut own.known.report, index, update);
        drop(own);
        self.changed();
        Ok(())
    }

    /// Waits until everything written so far is on disk: before a retry's back-off and before
    /// waiting for a device, so a worker that takes over after a power cut finds what was sent.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        self.write_held_end().await?;
        self.ledger.flush().await
    }

    /// Writes the provider call's end held back, if there is one: before any wait.
    pub(crate) async fn write_held_end(&self) -> Result<(), StoreError> {
        let pending = lock(&self.own).known.pending_end.take();
        match pending {
            Some(p) => {
                self.ledger
                    .finish_attempt(self.key, p.attempt, &p.end, p.target, &p.update)
                    .await
            }
            None => Ok(()),
        }
    }

    /// Watches this delivery's changes, for waiting on what another task writes
    /// (acknowledgements, receipts).
    pub(crate) fn watch(&self) -> ChangeWatch {
        self.changes.watch(&self.id)
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A target as the ledger has it after `update`.
pub(super) fn apply_update(report: &mut Report, index: usize, update: &TargetUpdate) {
    if let Some(target) = report.targets.get_mut(index) {
        target.channel = update.channel;
        target.status = update.status;
        target.reason = update.reason;
        target.hint = update.reason.map(FailureReason::hint);
        target.detail = update.detail.clone();
    }
}
