//! One target through its route's providers: transient failures are retried with back-off, a
//! provider whose retries run out, whose circuit is open or that refuses the message for its
//! own reasons gives way to the next one, and a recipient-level failure ends the chain. When
//! every circuit is open the target waits (bounded) for one to take calls again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio::time::Instant;

use super::breaker::CircuitBreaker;
use super::circuits::DEFAULT_ROUTE;
use super::decisions::{AfterFailure, ChainSeen, after_failure, chain_failure, earlier_tries};
use super::engine::{AwaitedReceipt, Dispatcher, TargetEnd};
use super::progress::Progress;
use crate::domain::{Channel, Job, Report, RetryClass};
use crate::providers::{ProviderEntry, Recipient, Route};
use crate::store::{AttemptEnd, StoreError};

/// The longest a job waiting for a blocked route sleeps before it looks again (a change of
/// any circuit wakes it sooner).
pub(super) const ROUTE_WAIT_SLICE: Duration = Duration::from_secs(1);

impl Dispatcher {
    /// One target through its route's providers: retries, failover, breakers, deadline.
    pub(super) async fn deliver_to_target(
        &self,
        job: &Job,
        prior: &Report,
        index: usize,
        channel: Channel,
        deadline: Timestamp,
        progress: &Progress<'_>,
    ) -> Result<TargetEnd, StoreError> {
        let route = self
            .providers
            .route(channel, &Recipient::of(&job.targets[index]));
        let recipient = route.recipient(Recipient::of(&job.targets[index]));
        let route_key = route.prefix.unwrap_or(DEFAULT_ROUTE);
        let mut seen = ChainSeen::default();
        // Calls made by this run per provider (a later round numbers its retries on).
        let mut tried_here: HashMap<&str, u32> = HashMap::new();
        let mut waiting_since = None;
        'rounds: loop {
            seen.skipped_open.clear();
            seen.skipped_busy.clear();
            'providers: for entry in &route.providers {
                let name = entry.name();
                let policy = &self.policies[name];
                let provider_breaker = &self.breakers.providers[name];
                let route_breaker = self.route_breaker(entry, channel, route_key);
                let mut retry = earlier_tries(prior, index, name, channel)
                    + tried_here.get(name).copied().unwrap_or(0);
                let mut calls = 0;
                // The last failed call, while its planned retry has not happened yet.
                let mut planned_retry: Option<(crate::store::AttemptKey, AttemptEnd)> = None;
                loop {
                    if progress.now() >= deadline {
                        self.cancel_retry(planned_retry.take(), index, channel, progress)
                            .await?;
                        seen.stopped_by_deadline = true;
                        break 'providers;
                    }
                    let Some(slot) = self.call_slot(entry, deadline, progress).await? else {
                        self.cancel_retry(planned_retry.take(), index, channel, progress)
                            .await?;
                        tracing::warn!(
                            provider = name,
                            max_concurrent_calls = entry.call_limit,
                            "every call slot of the provider stayed busy: provider skipped"
                        );
                        seen.skipped_busy.push(name.to_owned());
                        continue 'providers;
                    };
                    if !Self::admit(provider_breaker, &route_breaker, Instant::now()) {
                        self.cancel_retry(planned_retry.take(), index, channel, progress)
                            .await?;
                        tracing::info!(
                            provider = name,
                            route = route_key,
                            "circuit open: provider skipped"
                        );
                        seen.skipped_open.push(name.to_owned());
                        continue 'providers;
                    }
                    let started = Instant::now();
                    *tried_here.entry(name).or_default() += 1;
                    let (attempt, result) = self
                        .call(job, index, channel, entry, retry, progress)
                        .await?;
                    let latency = started.elapsed();
                    drop(slot);
                    calls += 1;
                    self.record_call(entry, &route_breaker, channel, route_key, &result, latency);
                    let error = match result {
                        Ok(accept) => {
                            let receipt = accept
                                .message_id
                                .clone()
                                .filter(|_| entry.provider.sends_receipts(channel))
                                .map(|message_id| AwaitedReceipt {
                                    wait: progress.receipts.wait_for(name, &message_id),
                                    message_id,
                                    attempt,
                                });
                            let receipts = entry.provider.may_send_receipts(channel);
                            let end = AttemptEnd::sent(progress.now(), accept.message_id, receipts);
                            self.finish_call(attempt, &end, index, channel, progress)
                                .await?;
                            return Ok(TargetEnd::Accepted { receipt });
                        }
                        Err(error) => error,
                    };
                    let delay = (error.class == RetryClass::Transient
                        && calls < policy.max_attempts())
                    .then(|| policy.delay(calls, error.retry_after, self.settings.retry_after_max))
                    .flatten();
                    let now = progress.now();
                    let next = after_failure(error.class, delay, now, deadline);
                    let retry_at = match next {
                        AfterFailure::Retry { at, .. } => Some(at),
                        _ => None,
                    };
                    let end = AttemptEnd::failed(now, &error, retry_at);
                    self.finish_call(attempt, &end, index, channel, progress)
                        .await?;
                    match next {
                        AfterFailure::EndTarget => {
                            self.learn_from(job, index, name, &error, progress).await?;
                            return Ok(TargetEnd::Recipient {
                                reason: error.reason,
                            });
                        }
                        AfterFailure::Retry { delay, .. } => {
                            seen.last_error = Some((name.to_owned(), error));
                            planned_retry = Some((attempt, end));
                            progress.flush().await?;
                            tokio::time::sleep(delay).await;
                            retry += 1;
                        }
                        AfterFailure::NextProvider { past_deadline } => {
                            seen.stopped_by_deadline |= past_deadline;
                            seen.last_error = Some((name.to_owned(), error));
                            continue 'providers;
                        }
                    }
                }
            }
            if seen.stopped_by_deadline
                || !self
                    .wait_for_route(&route, channel, deadline, &mut waiting_since, progress)
                    .await?
            {
                break 'rounds;
            }
        }
        Ok(chain_failure(
            seen,
            &recipient,
            channel,
            self.settings.provider_timeout,
        ))
    }

    /// When no provider of `route` takes calls (every one's circuit is open, or probing) but
    /// the code has time left: waits for a circuit to let a call through again (its cool-down
    /// ending, a probe's success) and returns true to go round the route once more. Waits are
    /// bounded by `circuit_wait` in all (from `waiting_since`) and never pass the deadline.
    /// The last call's end is written before waiting.
    pub(super) async fn wait_for_route(
        &self,
        route: &Route<'_>,
        channel: Channel,
        deadline: Timestamp,
        waiting_since: &mut Option<Instant>,
        progress: &Progress<'_>,
    ) -> Result<bool, StoreError> {
        if route.providers.is_empty() || self.settings.circuit_wait.is_zero() {
            return Ok(false);
        }
        let route_key = route.prefix.unwrap_or(DEFAULT_ROUTE);
        let now = Instant::now();
        let breakers: Vec<[Arc<CircuitBreaker>; 2]> = route
            .providers
            .iter()
            .map(|entry| {
                [
                    Arc::clone(&self.breakers.providers[entry.name()]),
                    self.route_breaker(entry, channel, route_key),
                ]
            })
            .collect();
        // A provider whose circuits take calls failed on its own: nothing to wait for.
        if breakers
            .iter()
            .any(|pair| pair.iter().all(|b| b.takes_calls(now)))
        {
            return Ok(false);
        }
        let left = deadline.duration_since(progress.now());
        if !left.is_positive() {
            return Ok(false);
        }
        let since = *waiting_since.get_or_insert_with(|| {
            tracing::info!(channel = %channel, "every provider's circuit is open: waiting for one to take calls again");
            now
        });
        let until = (since + self.settings.circuit_wait).min(now + left.unsigned_abs());
        if now >= until {
            return Ok(false);
        }
        // A provider takes calls when both its circuits do: the later of their chances. A
        // probe under way has none of its own (its result wakes us).
        let next = breakers
            .iter()
            .filter_map(|pair| {
                let [a, b] = pair;
                Some(a.next_chance(now)?.max(b.next_chance(now)?))
            })
            .min()
            .unwrap_or(ROUTE_WAIT_SLICE)
            .min(ROUTE_WAIT_SLICE)
            .min(until - now);
        let changes = futures_util::future::select_all(
            breakers
                .iter()
                .flatten()
                .map(|breaker| Box::pin(breaker.changed())),
        );
        progress.write_held_end().await?;
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = changes => {}
        }
        Ok(true)
    }

    /// A slot for one call to `entry` (one of its `max_concurrent_calls`), waiting for a call
    /// to end while all are open, for at most the provider timeout and never past the deadline;
    /// `None` when none came free. The last call's end is written before waiting.
    pub(super) async fn call_slot(
        &self,
        entry: &ProviderEntry,
        deadline: Timestamp,
        progress: &Progress<'_>,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, StoreError> {
        if let Ok(slot) = Arc::clone(&entry.calls).try_acquire_owned() {
            return Ok(Some(slot));
        }
        progress.write_held_end().await?;
        let left = progress.time_left(deadline);
        let wait = self.settings.provider_timeout.min(left);
        Ok(
            tokio::time::timeout(wait, Arc::clone(&entry.calls).acquire_owned())
                .await
                .ok()
                .and_then(Result::ok),
        )
    }

    /// A planned retry that will not happen after all (the deadline passed while waiting, or
    /// the circuit opened): its attempt record stops announcing it.
    pub(super) async fn cancel_retry(
        &self,
        planned: Option<(crate::store::AttemptKey, AttemptEnd)>,
        index: usize,
        channel: Channel,
        progress: &Progress<'_>,
    ) -> Result<(), StoreError> {
        if let Some((attempt, mut end)) = planned {
            end.next_retry_at = None;
            self.finish_call(attempt, &end, index, channel, progress)
                .await?;
        }
        Ok(())
    }
}
