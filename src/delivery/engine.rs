//! The engine's orchestration: a job's channels become stages (push to every eligible device
//! at once, then SMS to the first eligible number, the next after a recipient-level failure,
//! then voice), resuming what an interrupted worker began, and closing what was never tried.
//! Nothing is attempted past the deadline (the code's expiry less a margin); every attempt is
//! written to the ledger as it starts and ends.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use jiff::Timestamp;

use super::breaker::CircuitBreaker;
use super::circuits::Breakers;
use super::decisions::{Standing, channel_of, earlier_twin};
use super::fraud_guard::FraudGuard;
use super::gate::PolicyContext;
use super::progress::Progress;
use super::retry::RetryPolicy;
use super::settings::EngineSettings;
use crate::domain::{Channel, FailureReason, Job, Report, Target, TargetStatus};
use crate::policy::{QuietHoursRule, RateLimitRule, RateLimited};
use crate::providers::ProviderRegistry;
use crate::store::{PolicyStore, StoreError, TargetUpdate};

/// Why a target was not tried: the code reached the user another way.
pub(super) const ALREADY_REACHED: &str = "the code already reached the user";

/// Why a target was not tried: the user denied the request on a device.
pub(super) const DENIED_UNTRIED: &str = "the user denied the request on a device";

/// Why a target was not tried: the deadline came first.
pub(super) const EXPIRED_UNTRIED: &str = "the code expired before it was tried";

/// How dispatch ended, before the headline reason and summary are worked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// At least one target accepted the code (or a device showed it).
    Reached,
    /// Nothing reached the user; the reason, when it is the delivery's rather than a target's.
    Failed(Option<FailureReason>),
    /// Nothing reached the user yet, and quiet hours hold some target until this instant.
    Deferred(Timestamp),
}

/// Sends a job's code to its targets through the configured providers.
#[derive(Debug)]
pub struct Dispatcher {
    pub(super) providers: ProviderRegistry,
    pub(super) policy: Arc<dyn PolicyStore>,
    pub(super) settings: EngineSettings,
    pub(super) policies: BTreeMap<String, RetryPolicy>,
    pub(super) breakers: Breakers,
    /// What the engine counts (calls, deliveries).
    pub(super) metrics: Arc<crate::ops::Metrics>,
    /// The fraud guard: its counts of sends and conversions per range, its holds, and the loop
    /// that judges ranges.
    pub(super) fraud: Arc<FraudGuard>,
}

/// What every stage of one dispatch works from.
#[derive(Clone, Copy)]
pub(super) struct Run<'a> {
    pub(super) job: &'a Job,
    pub(super) prior: &'a Report,
    pub(super) deadline: Timestamp,
    pub(super) rules: &'a [RateLimitRule],
    pub(super) quiet: &'a [QuietHoursRule],
    /// The earliest end of a quiet-hours window that holds a target back (DEFER).
    pub(super) deferred: &'a Mutex<Option<Timestamp>>,
    /// Whether this job has been counted against its account and tenant limits.
    pub(super) job_count: &'a Mutex<JobCount>,
}

/// The account and tenant rate-limit count of one job: taken when its first send is about
/// to go out, so that a job that sends nothing (held by quiet hours, every target refused)
/// uses up no quota, and a resumed job is not counted twice.
#[derive(Debug, Clone)]
pub(super) enum JobCount {
    /// Not counted yet.
    Pending,
    /// Counted (or counted by the worker this delivery was taken over from).
    Done,
    /// Over a limit: nothing of this job is sent.
    Limited(RateLimited),
}

/// How one stage ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StageEnd {
    Reached,
    NotReached,
    Denied,
    Expired,
    JobLimited,
}

/// The receipt an accepted SMS or call will get: for which message, the attempt it settles,
/// and the wait registered for it as soon as the provider answered (a fast carrier's receipt
/// can come while the answer is still being written down).
#[derive(Debug)]
pub(super) struct AwaitedReceipt {
    pub(super) message_id: String,
    pub(super) attempt: crate::store::AttemptKey,
    pub(super) wait: super::receipt_waiters::ReceiptWait,
}

/// How one target's provider chain ended.
#[derive(Debug)]
pub(super) enum TargetEnd {
    /// A provider took the message; `receipt` when it will report the message's fate later.
    Accepted { receipt: Option<AwaitedReceipt> },
    /// The recipient cannot be reached this way, for `reason` (already settled on the target).
    Recipient { reason: FailureReason },
    /// Every provider failed or was skipped.
    Providers {
        reason: FailureReason,
        detail: String,
    },
    /// The deadline stopped the chain.
    Expired { detail: String },
}

impl Dispatcher {
    /// An engine over `providers` and the policy rules in `policy`; retry policies and breakers
    /// come from the providers' settings.
    pub fn new(
        providers: ProviderRegistry,
        policy: Arc<dyn PolicyStore>,
        settings: EngineSettings,
    ) -> Self {
        let mut policies = BTreeMap::new();
        let mut provider_breakers = BTreeMap::new();
        for entry in providers.entries() {
            policies.insert(entry.name().to_owned(), RetryPolicy::new(&entry.retry));
            provider_breakers.insert(
                entry.name().to_owned(),
                Arc::new(CircuitBreaker::new(&entry.breaker)),
            );
        }
        let breakers = Breakers {
            providers: provider_breakers,
            routes: Mutex::default(),
        };
        let metrics = Arc::<crate::ops::Metrics>::default();
        let fraud = Arc::new(FraudGuard::new(
            Arc::clone(&policy),
            settings.fraud.clone(),
            settings.range_depth,
            settings.fraud_evaluate_every,
            Arc::clone(&metrics),
        ));
        Dispatcher {
            providers,
            fraud,
            policy,
            settings,
            policies,
            breakers,
            metrics,
        }
    }

    /// Delivers `job`. `prior` is the report as claimed (when resuming a delivery a previous
    /// worker started, targets it already settled are not tried again).
    pub(crate) async fn dispatch(
        &self,
        job: &Job,
        prior: &Report,
        context: &PolicyContext,
        progress: &Progress<'_>,
    ) -> Result<Verdict, StoreError> {
        let deadline = job.expires_at - self.settings.expiry_margin;
        if progress.now() >= deadline {
            tracing::info!(expires_at = %job.expires_at, "code expired before delivery started");
            // Targets never tried say why, rather than reading as if they might still be.
            let mut standing: Vec<Standing> = (0..job.targets.len())
                .map(|index| match prior.targets.get(index).map(|t| t.status) {
                    None | Some(TargetStatus::Pending) => Standing::Open,
                    Some(_) => Standing::Closed,
                })
                .collect();
            let reason = Some(FailureReason::CodeExpired);
            self.close_untried(&mut standing, job, reason, EXPIRED_UNTRIED, progress)
                .await?;
            return Ok(Verdict::Failed(reason));
        }
        let channels = job.channel_order();
        let deferred = Mutex::new(None);
        let already_counted = prior.targets.iter().any(|t| !t.attempts.is_empty());
        let job_count = Mutex::new(if already_counted {
            JobCount::Done
        } else {
            JobCount::Pending
        });
        let run = Run {
            job,
            prior,
            deadline,
            rules: &context.rate_limits,
            quiet: &context.quiet_hours,
            deferred: &deferred,
            job_count: &job_count,
        };
        let mut standing = Vec::with_capacity(job.targets.len());
        // Pushes accepted by a worker that was interrupted while it waited for an acknowledgement.
        let mut resumed_pushes = Vec::new();
        for (index, target) in job.targets.iter().enumerate() {
            let previous = prior
                .targets
                .get(index)
                .map_or(TargetStatus::Pending, |t| t.status);
            let awaiting_ack = previous == TargetStatus::Sent
                && matches!(target, Target::Device(_))
                && !self.settings.tenants_without_ack.contains(&job.tenant);
            if awaiting_ack {
                resumed_pushes.push(index);
                standing.push(Standing::Closed);
                continue;
            }
            standing.push(match previous {
                TargetStatus::Sent | TargetStatus::Delivered => Standing::Reached,
                TargetStatus::Failed | TargetStatus::Skipped => Standing::Closed,
                TargetStatus::Pending => match earlier_twin(job, index) {
                    // The same number or token twice in one job: one send reaches both.
                    Some(twin) => {
                        let detail = format!("the same recipient as target {twin}");
                        self.skip(index, channel_of(target), detail, progress)
                            .await?;
                        Standing::Closed
                    }
                    None => {
                        self.check_eligibility(
                            index,
                            job,
                            target,
                            &channels,
                            &context.blocks,
                            progress,
                        )
                        .await?
                    }
                },
            });
        }
        if !resumed_pushes.is_empty() && !standing.contains(&Standing::Reached) {
            let end = self
                .conclude_push(job, resumed_pushes, deadline, &mut standing, progress)
                .await?;
            if end == StageEnd::Denied {
                self.close_untried(&mut standing, job, None, DENIED_UNTRIED, progress)
                    .await?;
                return Ok(Verdict::Failed(Some(FailureReason::UserDenied)));
            }
            // Shown: the device is now Reached (below); silent or expired: on to the channels.
        }
        if standing.contains(&Standing::Reached) {
            self.close_untried(&mut standing, job, None, ALREADY_REACHED, progress)
                .await?;
            return Ok(Verdict::Reached);
        }
        for channel in channels {
            let end = match channel {
                _ if progress.now() >= deadline => StageEnd::Expired,
                Channel::Push => self.push_stage(run, &mut standing, progress).await?,
                Channel::Sms | Channel::Voice => {
                    self.phone_stage(run, channel, &mut standing, progress)
                        .await?
                }
            };
            match end {
                StageEnd::Reached => {
                    self.close_untried(&mut standing, job, None, ALREADY_REACHED, progress)
                        .await?;
                    return Ok(Verdict::Reached);
                }
                StageEnd::Denied => {
                    self.close_untried(&mut standing, job, None, DENIED_UNTRIED, progress)
                        .await?;
                    return Ok(Verdict::Failed(Some(FailureReason::UserDenied)));
                }
                StageEnd::Expired => {
                    self.close_untried(
                        &mut standing,
                        job,
                        Some(FailureReason::CodeExpired),
                        EXPIRED_UNTRIED,
                        progress,
                    )
                    .await?;
                    break;
                }
                StageEnd::JobLimited => {
                    let limited = match &*job_count.lock().unwrap_or_else(|p| p.into_inner()) {
                        JobCount::Limited(limited) => limited.describe(),
                        _ => "a rate limit was reached".to_owned(),
                    };
                    let reason = Some(FailureReason::RateLimited);
                    self.close_untried(&mut standing, job, reason, &limited, progress)
                        .await?;
                    return Ok(Verdict::Failed(reason));
                }
                StageEnd::NotReached => {}
            }
        }
        let held_until = *deferred.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(until) = held_until {
            tracing::info!(%until, "held by quiet hours");
            return Ok(Verdict::Deferred(until));
        }
        self.close_untried(
            &mut standing,
            job,
            None,
            "every channel was tried without reaching it",
            progress,
        )
        .await?;
        Ok(Verdict::Failed(None))
    }

    pub(crate) fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    pub(crate) fn policy_store(&self) -> &dyn PolicyStore {
        self.policy.as_ref()
    }

    pub(crate) fn providers(&self) -> &ProviderRegistry {
        &self.providers
    }

    /// Settles a target as SKIPPED (not tried, no failure), saying why.
    pub(super) async fn skip(
        &self,
        index: usize,
        channel: Channel,
        detail: String,
        progress: &Progress<'_>,
    ) -> Result<(), StoreError> {
        self.settle(
            index,
            channel,
            TargetStatus::Skipped,
            None,
            Some(detail),
            progress,
        )
        .await
    }

    /// Settles a target as FAILED for `reason`, saying why.
    pub(super) async fn fail(
        &self,
        index: usize,
        channel: Channel,
        reason: FailureReason,
        detail: String,
        progress: &Progress<'_>,
    ) -> Result<(), StoreError> {
        self.settle(
            index,
            channel,
            TargetStatus::Failed,
            Some(reason),
            Some(detail),
            progress,
        )
        .await
    }

    pub(super) async fn settle(
        &self,
        index: usize,
        channel: Channel,
        status: TargetStatus,
        reason: Option<FailureReason>,
        detail: Option<String>,
        progress: &Progress<'_>,
    ) -> Result<(), StoreError> {
        let update = TargetUpdate {
            channel,
            status,
            reason,
            detail,
        };
        progress.update_target(index, &update).await
    }

    /// Settles every target never tried: SKIPPED (no reason) or FAILED with `reason`, saying why.
    pub(super) async fn close_untried(
        &self,
        standing: &mut [Standing],
        job: &Job,
        reason: Option<FailureReason>,
        why: &str,
        progress: &Progress<'_>,
    ) -> Result<(), StoreError> {
        let status = if reason.is_some() {
            TargetStatus::Failed
        } else {
            TargetStatus::Skipped
        };
        for (index, target) in job.targets.iter().enumerate() {
            if standing[index] == Standing::Open {
                standing[index] = Standing::Closed;
                self.settle(
                    index,
                    channel_of(target),
                    status,
                    reason,
                    Some(why.into()),
                    progress,
                )
                .await?;
            }
        }
        Ok(())
    }
}
