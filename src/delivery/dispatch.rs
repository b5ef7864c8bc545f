//! The delivery engine. A job's channels become stages: push to every eligible device at once
//! (then wait for a device to confirm it showed the code), SMS to the first eligible number
//! (the next one after a recipient-level failure), then voice. Each target goes through its
//! route's providers in order: transient failures are retried with back-off, a provider whose
//! retries run out, whose circuit is open or that refuses the message for its own reasons
//! gives way to the next one, and a recipient-level failure moves on to the next target.
//! Nothing is attempted past the deadline (the code's expiry less a margin). Every attempt is
//! written to the ledger as it starts and ends.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use jiff::{SignedDuration, Timestamp};
use tokio::time::Instant;
use tracing::Instrument;

use super::Progress;
use super::breaker::{Admission, BreakerSnapshot, CallResult, CircuitBreaker, CircuitState};
use super::retry::RetryPolicy;
use crate::config::{Config, DestinationRules, positive};
use crate::domain::{
    Acknowledgement, AttemptOutcome, Autofill, Channel, FailureReason, Job, MessageContext,
    MessageTemplates, Report, RetryClass, Target, TargetStatus, is_e164, mask_phone, mask_token,
};
use crate::policy::{
    BlockEntry, BlockKind, BlockSource, NewBlockEntry, QuietDecision, QuietHoursRule,
    RateLimitRule, RateLimited, blocking_entry, destination_refusal, job_keys, quiet_decision,
    target_keys, zones_of,
};
use crate::providers::{
    OutboundMessage, ProviderEntry, ProviderError, ProviderRegistry, Recipient, Route,
};
use crate::store::{AttemptEnd, AttemptStart, PolicyStore, StoreError, TargetUpdate};

/// The route key of a channel's default route (prefix routes use their prefix).
const DEFAULT_ROUTE: &str = "*";
/// The longest a job waiting for a blocked route sleeps before it looks again (a change of
/// any circuit wakes it sooner).
const ROUTE_WAIT_SLICE: Duration = Duration::from_secs(1);
/// How often a push stage re-reads the ledger for acknowledgements that arrived at another
/// replica (acknowledgements made here wake it at once).
const ACK_POLL: Duration = Duration::from_millis(250);

/// Why a target was not tried: the code reached the user another way.
const ALREADY_REACHED: &str = "the code already reached the user";
/// Why a target was not tried: the user denied the request on a device.
const DENIED_UNTRIED: &str = "the user denied the request on a device";
/// Why a target was not tried: the deadline came first.
const EXPIRED_UNTRIED: &str = "the code expired before it was tried";

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

/// Timing settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// App name in messages.
    pub app_name: String,
    /// Per provider call.
    pub provider_timeout: Duration,
    /// How long a push stage waits for a device acknowledgement.
    pub push_ack_timeout: Duration,
    /// Nothing is attempted later than this before expiry.
    pub expiry_margin: SignedDuration,
    /// Longest `Retry-After` honoured.
    pub retry_after_max: Duration,
    /// How long an accepted SMS or call waits for a failure receipt before the job is let go.
    pub receipt_wait: Duration,
    /// How long a target whose every provider has its circuit open waits for one to take calls
    /// again (never past the code's expiry); zero: it fails at once.
    pub circuit_wait: Duration,
    /// Tenants whose push stage does not wait for acknowledgements.
    pub tenants_without_ack: HashSet<String>,
    /// Countries each tenant may send SMS and voice to.
    pub destinations: BTreeMap<String, DestinationRules>,
    /// Message templates (built-in plus configured).
    pub templates: MessageTemplates,
    /// Tenants' own app names.
    pub app_names: BTreeMap<String, String>,
    /// Tenants' autofill formats.
    pub autofill: BTreeMap<String, Autofill>,
}

impl EngineSettings {
    /// The settings from validated configuration.
    pub fn from_config(config: &Config) -> Self {
        let (delivery, tenants) = (&config.delivery, &config.tenants);
        let duration = |key: &str, value, fallback| positive(key, value).unwrap_or(fallback);
        EngineSettings {
            app_name: delivery.app_name.clone(),
            provider_timeout: duration(
                "delivery.provider_timeout",
                delivery.provider_timeout,
                Duration::from_secs(10),
            ),
            push_ack_timeout: duration(
                "delivery.push_ack_timeout",
                delivery.push_ack_timeout,
                Duration::from_secs(15),
            ),
            expiry_margin: delivery.expiry_margin,
            retry_after_max: duration(
                "delivery.retry_after_max",
                delivery.retry_after_max,
                Duration::from_secs(30),
            ),
            receipt_wait: delivery.receipt_wait.unsigned_abs(),
            circuit_wait: delivery.circuit_wait.unsigned_abs(),
            tenants_without_ack: tenants
                .iter()
                .filter(|(_, tenant)| !tenant.push_acknowledgement)
                .map(|(name, _)| name.clone())
                .collect(),

            destinations: tenants
                .iter()
                .map(|(name, tenant)| (name.clone(), tenant.destinations.clone()))
                .collect(),
            // `Config::validate` has refused bad templates already.
            templates: MessageTemplates::new(&config.templates).unwrap_or_default(),
            app_names: tenants
                .iter()
                .filter_map(|(name, t)| Some((name.clone(), t.app_name.clone()?)))
                .collect(),
            autofill: tenants
                .iter()
                .map(|(name, t)| (name.clone(), t.autofill.clone()))
                .collect(),
        }
    }
}

/// The state of one provider as the status page shows it.
#[derive(Debug, Clone)]
pub struct ProviderHealth {
    /// Configured name.
    pub name: String,
    /// Adapter kind.
    pub kind: &'static str,
    /// The provider-wide circuit.
    pub circuit: BreakerSnapshot,
    /// Circuits of its routes, by route key (`*` or a prefix).
    pub routes: Vec<(String, Channel, BreakerSnapshot)>,
}

/// Circuit breakers per provider and per provider × route.
#[derive(Debug)]
struct Breakers {
    providers: BTreeMap<String, Arc<CircuitBreaker>>,
    /// By (provider, channel, route key); created on first use. The lock is never held
    /// across an await.
    routes: Mutex<BTreeMap<(String, Channel, String), Arc<CircuitBreaker>>>,
}

/// Sends a job's code to its targets through the configured providers.
#[derive(Debug)]
pub struct Dispatcher {
    providers: ProviderRegistry,
    policy: Arc<dyn PolicyStore>,
    settings: EngineSettings,
    policies: BTreeMap<String, RetryPolicy>,
    breakers: Breakers,
}

/// A target's standing during one dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Not tried yet.
    Open,
    /// Failed for provider reasons on a channel: may be tried on the next channel.
    Tried,
    /// Accepted by a provider.
    Reached,
    /// Settled: not tried again.
    Closed,
}

/// What every stage of one dispatch works from.
#[derive(Clone, Copy)]
struct Run<'a> {
    job: &'a Job,
    prior: &'a Report,
    deadline: Timestamp,
    rules: &'a [RateLimitRule],
    quiet: &'a [QuietHoursRule],
    /// The earliest end of a quiet-hours window that holds a target back (DEFER).
    deferred: &'a Mutex<Option<Timestamp>>,
    /// Whether this job has been counted against its account and tenant limits.
    job_count: &'a Mutex<JobCount>,
}

/// The account and tenant rate-limit count of one job: taken when its first send is about
/// to go out, so that a job that sends nothing (held by quiet hours, every target refused)
/// uses up no quota, and a resumed job is not counted twice.
#[derive(Debug, Clone)]
enum JobCount {
    /// Not counted yet.
    Pending,
    /// Counted (or counted by the worker this delivery was taken over from).
    Done,
    /// Over a limit: nothing of this job is sent.
    Limited(RateLimited),
}

/// What quiet hours and destination permissions say about one channel for one target.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ChannelVerdict {
    /// Nothing against it.
    Open,
    /// Refused: the reason and why.
    Refused(FailureReason, String),
    /// Held by quiet hours until `until`.
    Held { until: Timestamp, detail: String },
}

/// What the per-channel checks decided for one target.
enum Gate {
    /// Try it now.
    Go,
    /// Not on this channel (refused or held); another channel may still reach it.
    NotThisChannel,
    /// Not at all (rate limited).
    Closed,
    /// The job is over an account or tenant limit: nothing of it is sent.
    JobLimited,
}

/// How one stage ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StageEnd {
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
struct AwaitedReceipt {
    message_id: String,
    attempt: crate::store::AttemptKey,
    wait: super::receipt_waiters::ReceiptWait,
}

/// How one target's provider chain ended.
#[derive(Debug)]
enum TargetEnd {
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

/// What the push stage's wait for acknowledgements saw.
enum AckEnd {
    Shown(usize),
    Denied(usize),
    TimedOut,
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
        Dispatcher {
            providers,
            policy,
            settings,
            policies,
            breakers,
        }
    }

    fn route_breaker(
        &self,
        entry: &ProviderEntry,
        channel: Channel,
        route: &str,
    ) -> Arc<CircuitBreaker> {
        let mut routes = self
            .breakers
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Arc::clone(
            routes
                .entry((entry.name().to_owned(), channel, route.to_owned()))
                .or_insert_with(|| Arc::new(CircuitBreaker::new(&entry.breaker))),
        )
    }

    /// The status page: every provider's circuit and recent figures, and its routes'.
    pub fn provider_health(&self) -> Vec<ProviderHealth> {
        let now = Instant::now();
        let routes = self
            .breakers
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.providers
            .entries()
            .map(|entry| ProviderHealth {
                name: entry.name().to_owned(),
                kind: entry.kind,
                circuit: self.breakers.providers[entry.name()].snapshot(now),
                routes: routes
                    .iter()
                    .filter(|((name, _, _), _)| name == entry.name())
                    .map(|((_, channel, route), breaker)| {
                        (route.clone(), *channel, breaker.snapshot(now))
                    })
                    .collect(),
            })
            .collect()
    }

    /// Delivers `job`. `prior` is the report as claimed (when resuming a delivery a previous
    /// worker started, targets it already settled are not tried again).
    pub(crate) async fn dispatch(
        &self,
        job: &Job,
        prior: &Report,
        blocks: &[BlockEntry],
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
        let rules = self.policy.list_rate_limits(Some(&job.tenant)).await?;
        let quiet = self.policy.list_quiet_hours(Some(&job.tenant)).await?;
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
            rules: &rules,
            quiet: &quiet,
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
                        self.settle(
                            index,
                            channel_of(target),
                            TargetStatus::Skipped,
                            None,
                            Some(detail),
                            progress,
                        )
                        .await?;
                        Standing::Closed
                    }
                    None => {
                        self.check_eligibility(index, job, target, &channels, blocks, progress)
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

    /// The block entries in force at `at` that could apply to this job.
    pub(crate) async fn block_candidates_at(
        &self,
        job: &Job,
        at: Timestamp,
    ) -> Result<Vec<BlockEntry>, StoreError> {
        let mut patterns = vec![job.account.as_str()];
        for target in &job.targets {
            patterns.push(match target {
                Target::Phone(phone) => &phone.number,
                Target::Device(device) => &device.token,
            });
        }
        self.policy
            .block_candidates(&job.tenant, &patterns, at)
            .await
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

    /// The circuit a call through `entry` on this route would meet (the worse of the
    /// provider's and the route's).
    pub(crate) fn circuit_of(
        &self,
        entry: &ProviderEntry,
        channel: Channel,
        route: &str,
        now: Instant,
    ) -> CircuitState {
        let provider = self.breakers.providers[entry.name()].snapshot(now).state;
        let route = self
            .route_breaker(entry, channel, route)
            .snapshot(now)
            .state;
        match (provider, route) {
            (CircuitState::Open, _) | (_, CircuitState::Open) => CircuitState::Open,
            (CircuitState::HalfOpen, _) | (_, CircuitState::HalfOpen) => CircuitState::HalfOpen,
            _ => CircuitState::Closed,
        }
    }

    async fn check_eligibility(
        &self,
        index: usize,
        job: &Job,
        target: &Target,
        channels: &[Channel],
        blocks: &[BlockEntry],
        progress: &Progress<'_>,
    ) -> Result<Standing, StoreError> {
        match eligibility(job, target, channels, blocks, progress.now()) {
            Eligibility::Eligible(_) => Ok(Standing::Open),
            Eligibility::NotAsked(detail) => {
                self.settle(
                    index,
                    channel_of(target),
                    TargetStatus::Skipped,
                    None,
                    Some(detail),
                    progress,
                )
                .await?;
                Ok(Standing::Closed)
            }
            Eligibility::Refused {
                channel,
                reason,
                detail,
            } => {
                self.fail(index, channel, reason, detail, progress).await?;
                Ok(Standing::Closed)
            }
        }
    }

    /// Push stage: every open device at once, then (unless the tenant switched it off) a wait
    /// for a device to confirm it showed the code.
    async fn push_stage(
        &self,
        run: Run<'_>,
        standing: &mut [Standing],
        progress: &Progress<'_>,
    ) -> Result<StageEnd, StoreError> {
        let Run {
            job,
            prior,
            deadline,
            ..
        } = run;
        let mut open = Vec::new();
        for (index, target) in job.targets.iter().enumerate() {
            if standing[index] == Standing::Open && matches!(target, Target::Device(_)) {
                match self.gate(run, index, Channel::Push, progress).await? {
                    Gate::Go => open.push(index),
                    Gate::NotThisChannel | Gate::Closed => standing[index] = Standing::Closed,
                    Gate::JobLimited => return Ok(StageEnd::JobLimited),
                }
            }
        }
        if open.is_empty() {
            return Ok(StageEnd::NotReached);
        }
        let ends = join_all(open.iter().map(|&index| {
            self.deliver_to_target(job, prior, index, Channel::Push, deadline, progress)
        }))
        .await;
        let mut accepted = Vec::new();
        let mut expired = false;
        for (index, end) in open.into_iter().zip(ends) {
            standing[index] = Standing::Closed;
            match end? {
                TargetEnd::Accepted { .. } => accepted.push(index),
                TargetEnd::Recipient { .. } => {}
                TargetEnd::Providers { reason, detail } => {
                    self.fail(index, Channel::Push, reason, detail, progress)
                        .await?;
                }
                TargetEnd::Expired { detail } => {
                    expired = true;
                    self.fail(
                        index,
                        Channel::Push,
                        FailureReason::CodeExpired,
                        detail,
                        progress,
                    )
                    .await?;
                }
            }
        }
        if accepted.is_empty() {
            return Ok(if expired {
                StageEnd::Expired
            } else {
                StageEnd::NotReached
            });
        }
        self.conclude_push(job, accepted, deadline, standing, progress)
            .await
    }

    /// After pushes were accepted: done for tenants without acknowledgements, otherwise wait
    /// for a device to confirm (DELIVERED), deny (USER_DENIED) or stay silent (escalate).
    async fn conclude_push(
        &self,
        job: &Job,
        accepted: Vec<usize>,
        deadline: Timestamp,
        standing: &mut [Standing],
        progress: &Progress<'_>,
    ) -> Result<StageEnd, StoreError> {
        if self.settings.tenants_without_ack.contains(&job.tenant) {
            for index in accepted {
                standing[index] = Standing::Reached;
            }
            return Ok(StageEnd::Reached);
        }
        match self.await_acknowledgement(job, deadline, progress).await? {
            AckEnd::Shown(index) => {
                let detail = "the device confirmed it showed the code".to_owned();
                self.settle(
                    index,
                    Channel::Push,
                    TargetStatus::Delivered,
                    None,
                    Some(detail),
                    progress,
                )
                .await?;
                standing[index] = Standing::Reached;
                Ok(StageEnd::Reached)
            }
            AckEnd::Denied(index) => {
                let detail = "the user tapped \"Don't Allow\" on this device".to_owned();
                self.fail(
                    index,
                    Channel::Push,
                    FailureReason::UserDenied,
                    detail,
                    progress,
                )
                .await?;
                Ok(StageEnd::Denied)
            }
            AckEnd::TimedOut => {
                let waited = self.settings.push_ack_timeout;
                for index in accepted {
                    let detail = format!(
                        "accepted by the push service, but the device did not confirm within {waited:?}"
                    );
                    self.fail(
                        index,
                        Channel::Push,
                        FailureReason::PushNotAcknowledged,
                        detail,
                        progress,
                    )
                    .await?;
                }
                Ok(StageEnd::NotReached)
            }
        }
    }

    /// Waits for `AcknowledgeDelivery` from any device of the job, up to the push
    /// acknowledgement timeout and never past the deadline.
    async fn await_acknowledgement(
        &self,
        job: &Job,
        deadline: Timestamp,
        progress: &Progress<'_>,
    ) -> Result<AckEnd, StoreError> {
        let left = deadline
            .duration_since(progress.now())
            .max(SignedDuration::ZERO)
            .unsigned_abs();
        let until = Instant::now() + self.settings.push_ack_timeout.min(left);
        // The accepted pushes are on disk while we wait: a worker that takes over after a
        // power cut waits for the acknowledgement again instead of pushing again.
        progress.flush().await?;
        let mut changes = progress.watch();
        loop {
            let acks = progress.ledger.acknowledgements(progress.key).await?;
            let acknowledged = |wanted: Acknowledgement| {
                acks.iter()
                    .find(|(index, ack)| {
                        *ack == wanted
                            && matches!(job.targets.get(*index as usize), Some(Target::Device(_)))
                    })
                    .map(|(index, _)| *index as usize)
            };
            if let Some(index) = acknowledged(Acknowledgement::Denied) {
                return Ok(AckEnd::Denied(index));
            }
            if let Some(index) = acknowledged(Acknowledgement::Shown) {
                return Ok(AckEnd::Shown(index));
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return Ok(AckEnd::TimedOut),
                _ = tokio::time::sleep(ACK_POLL) => {}
                _ = changes.changed() => {}
            }
        }
    }

    /// After a provider that sends receipts accepted an SMS or call: waits up to the receipt
    /// wait (never past the deadline) for its receipt. Returns the reason when a failure receipt
    /// came (the chain goes on), `None` when it was delivered or nothing came in time (a
    /// later receipt only updates the report). A receipt reaching this process is handed
    /// straight to this wait and recorded among the engine's own writes; one applied through
    /// the ledger (before the wait began, or at another replica) is seen on the target.
    async fn await_failure_receipt(
        &self,
        index: usize,
        channel: Channel,
        mut awaited: AwaitedReceipt,
        deadline: Timestamp,
        progress: &Progress<'_>,
    ) -> Result<Option<FailureReason>, StoreError> {
        let left = deadline
            .duration_since(progress.now())
            .max(SignedDuration::ZERO)
            .unsigned_abs();
        let wait = self.settings.receipt_wait.min(left);
        if wait.is_zero() {
            return self.take_handed(awaited, index, channel, progress).await;
        }
        let until = Instant::now() + wait;
        let mut handed_open = true;
        progress.flush().await?;
        let mut changes = progress.watch();
        loop {
            // Only this target's state: a receipt applied through the ledger settles it.
            match progress
                .ledger
                .target_state(progress.key, index as u32)
                .await?
            {
                Some((TargetStatus::Delivered, _)) => return Ok(None),
                Some((TargetStatus::Failed, reason)) => {
                    return Ok(Some(reason.unwrap_or(FailureReason::Undeliverable)));
                }
                _ => {}
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {
                    return self.take_handed(awaited, index, channel, progress).await;
                }
                _ = tokio::time::sleep(ACK_POLL) => {}
                _ = changes.changed() => {}
                receipt = &mut awaited.wait.receipt, if handed_open => match receipt {
                    Ok(receipt) => {
                        return self
                            .record_receipt(receipt, &awaited, index, channel, progress)
                            .await;
                    }
                    Err(_) => handed_open = false,
                },
            }
        }
    }

    /// The receipt handed to this wait already, if one was (recorded), as the wait ends.
    async fn take_handed(
        &self,
        mut awaited: AwaitedReceipt,
        index: usize,
        channel: Channel,
        progress: &Progress<'_>,
    ) -> Result<Option<FailureReason>, StoreError> {
        match awaited.wait.receipt.try_recv() {
            Ok(receipt) => {
                self.record_receipt(receipt, &awaited, index, channel, progress)
                    .await
            }
            Err(_) => Ok(None),
        }
    }

    /// Records a receipt handed to the engine on its attempt and target (among its own writes);
    /// the reason when it says the message failed.
    async fn record_receipt(
        &self,
        receipt: crate::providers::ProviderReceipt,
        awaited: &AwaitedReceipt,
        index: usize,
        channel: Channel,
        progress: &Progress<'_>,
    ) -> Result<Option<FailureReason>, StoreError> {
        let end = AttemptEnd {
            ended_at: progress.now(),
            outcome: receipt.outcome,
            reason: receipt.reason,
            provider_code: receipt.code,
            provider_message: Some(receipt.detail),
            provider_message_id: Some(awaited.message_id.clone()),
            next_retry_at: None,
            token_invalid_since: None,
        };
        self.finish_call(awaited.attempt, &end, index, channel, progress)
            .await?;
        Ok(match receipt.outcome {
            AttemptOutcome::Failed => Some(receipt.reason.unwrap_or(FailureReason::Undeliverable)),
            _ => None,
        })
    }

    /// SMS or voice stage: eligible numbers in order until one accepts.
    async fn phone_stage(
        &self,
        run: Run<'_>,
        channel: Channel,
        standing: &mut [Standing],
        progress: &Progress<'_>,
    ) -> Result<StageEnd, StoreError> {
        let Run {
            job,
            prior,
            deadline,
            ..
        } = run;
        for (index, target) in job.targets.iter().enumerate() {
            if !matches!(standing[index], Standing::Open | Standing::Tried)
                || !matches!(target, Target::Phone(_))
            {
                continue;
            }
            match self.gate(run, index, channel, progress).await? {
                Gate::Go => {}
                Gate::NotThisChannel => {
                    // The next channel may still reach the number.
                    standing[index] = Standing::Tried;
                    continue;
                }
                Gate::Closed => {
                    standing[index] = Standing::Closed;
                    continue;
                }
                Gate::JobLimited => return Ok(StageEnd::JobLimited),
            }
            match self
                .deliver_to_target(job, prior, index, channel, deadline, progress)
                .await?
            {
                TargetEnd::Accepted { receipt } => {
                    if let Some(awaited) = receipt
                        && let Some(reason) = self
                            .await_failure_receipt(index, channel, awaited, deadline, progress)
                            .await?
                    {
                        // The carrier could not deliver it: on to the next number, or to the
                        // next channel for this one unless the number itself is wrong.
                        tracing::info!(target = index, %reason, "failure receipt: the chain goes on");
                        standing[index] = standing_after(reason);
                        continue;
                    }
                    standing[index] = Standing::Reached;
                    return Ok(StageEnd::Reached);
                }
                TargetEnd::Recipient { reason } => standing[index] = standing_after(reason),
                TargetEnd::Providers { reason, detail } => {
                    // The next number may route elsewhere; this one may work on the next channel.
                    standing[index] = Standing::Tried;
                    self.fail(index, channel, reason, detail, progress).await?;
                }
                TargetEnd::Expired { detail } => {
                    standing[index] = Standing::Closed;
                    self.fail(index, channel, FailureReason::CodeExpired, detail, progress)
                        .await?;
                    return Ok(StageEnd::Expired);
                }
            }
        }
        Ok(StageEnd::NotReached)
    }

    /// Admits a call through both the provider's and the route's breaker.
    fn admit(provider: &CircuitBreaker, route: &CircuitBreaker, now: Instant) -> bool {
        match provider.admit(now) {
            Admission::Rejected => false,
            granted => match route.admit(now) {
                Admission::Rejected => {
                    if granted == Admission::Probe {
                        provider.release_probe();
                    }
                    false
                }
                _ => true,
            },
        }
    }

    /// One target through its route's providers: retries, failover, breakers, deadline.
    async fn deliver_to_target(
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
        let mut last_error: Option<(String, ProviderError)> = None;
        let mut skipped_open = Vec::new();
        let mut skipped_busy = Vec::new();
        let mut stopped_by_deadline = false;
        // Calls made by this run per provider (a later round numbers its retries on).
        let mut tried_here: HashMap<&str, u32> = HashMap::new();
        let mut waiting_since = None;
        'rounds: loop {
            skipped_open.clear();
            skipped_busy.clear();
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
                        stopped_by_deadline = true;
                        break 'providers;
                    }
                    let Some(slot) = self.call_slot(entry, deadline, progress).await else {
                        self.cancel_retry(planned_retry.take(), index, channel, progress)
                            .await?;
                        tracing::warn!(
                            provider = name,
                            max_concurrent_calls = entry.call_limit,
                            "every call slot of the provider stayed busy: provider skipped"
                        );
                        skipped_busy.push(name.to_owned());
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
                        skipped_open.push(name.to_owned());
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
                    let verdict = match &result {
                        Err(error) if error.class != RetryClass::PermanentForTarget => {
                            CallResult::Failure
                        }
                        _ => CallResult::Success,
                    };
                    let message = result.as_ref().err().map(ToString::to_string);
                    if provider_breaker.record(Instant::now(), verdict, latency, message.as_deref())
                    {
                        tracing::warn!(
                            provider = name,
                            error = message.as_deref(),
                            "circuit opened for the provider as a whole (every route)"
                        );
                    }
                    if route_breaker.record(Instant::now(), verdict, latency, message.as_deref()) {
                        tracing::warn!(
                            provider = name,
                            channel = %channel,
                            route = route_key,
                            error = message.as_deref(),
                            "circuit opened for the provider on this route"
                        );
                    }
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
                            let end = AttemptEnd::sent(progress.now(), accept.message_id);
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
                    let next_retry_at = delay
                        .map(|d| now + SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX));
                    let retry_in_time = next_retry_at.filter(|at| *at < deadline);
                    if next_retry_at.is_some() && retry_in_time.is_none() {
                        stopped_by_deadline = true;
                    }
                    let end = AttemptEnd::failed(now, &error, retry_in_time);
                    self.finish_call(attempt, &end, index, channel, progress)
                        .await?;
                    match (error.class, retry_in_time, delay) {
                        (RetryClass::PermanentForTarget, _, _) => {
                            self.learn_from(job, index, name, &error, progress).await?;
                            return Ok(TargetEnd::Recipient {
                                reason: error.reason,
                            });
                        }
                        (RetryClass::Transient, Some(_), Some(delay)) => {
                            last_error = Some((name.to_owned(), error));
                            planned_retry = Some((attempt, end));
                            progress.flush().await?;
                            tokio::time::sleep(delay).await;
                            retry += 1;
                        }
                        _ => {
                            last_error = Some((name.to_owned(), error));
                            continue 'providers;
                        }
                    }
                }
            }
            if stopped_by_deadline
                || !self
                    .wait_for_route(&route, channel, deadline, &mut waiting_since, progress)
                    .await
            {
                break 'rounds;
            }
        }
        let last = last_error.as_ref().map(|(name, e)| {
            format!(
                "{name} said {} ({}: {})",
                e.reason,
                e.raw_code.as_deref().unwrap_or("-"),
                e.raw_message
            )
        });
        if stopped_by_deadline {
            let detail = match &last {
                Some(last) => {
                    format!("no provider accepted the code before it expired; last, {last}")
                }
                None => "no provider accepted the code before it expired".to_owned(),
            };
            return Ok(TargetEnd::Expired { detail });
        }
        let mut skipped = String::new();
        if !skipped_open.is_empty() {
            skipped += &format!(" (circuit open, not tried: {})", skipped_open.join(", "));
        }
        if !skipped_busy.is_empty() {
            skipped += &format!(
                " (every call slot busy for {:?}, not tried: {})",
                self.settings.provider_timeout,
                skipped_busy.join(", ")
            );
        }
        Ok(match (last_error, last) {
            (Some((_, error)), Some(last)) => TargetEnd::Providers {
                reason: error.reason,
                detail: format!("every provider failed; last, {last}{skipped}"),
            },
            _ if !skipped_open.is_empty() => TargetEnd::Providers {
                reason: FailureReason::ProviderUnavailable,
                detail: format!("every provider's circuit is open{skipped}"),
            },
            _ if !skipped_busy.is_empty() => TargetEnd::Providers {
                reason: FailureReason::ProviderThrottled,
                detail: format!(
                    "no provider could be called: as many calls as each allows \
                     (max_concurrent_calls) were open{skipped}"
                ),
            },
            _ => TargetEnd::Providers {
                reason: FailureReason::ProviderMisconfigured,
                detail: match recipient {
                    Recipient::Device {
                        platform,
                        topic: Some(topic),
                        ..
                    } => format!(
                        "no {channel} provider in the route serves {platform} app `{topic}`"
                    ),
                    Recipient::Device { platform, .. } => {
                        format!("no {channel} provider in the route serves {platform} devices")
                    }
                    Recipient::Phone(_) => format!("no provider is routed for {channel}"),
                },
            },
        })
    }

    /// When no provider of `route` takes calls (every one's circuit is open, or probing) but
    /// the code has time left: waits for a circuit to let a call through again (its cool-down
    /// ending, a probe's success) and returns true to go round the route once more. Waits are
    /// bounded by `circuit_wait` in all (from `waiting_since`) and never pass the deadline.
    async fn wait_for_route(
        &self,
        route: &Route<'_>,
        channel: Channel,
        deadline: Timestamp,
        waiting_since: &mut Option<Instant>,
        progress: &Progress<'_>,
    ) -> bool {
        if route.providers.is_empty() || self.settings.circuit_wait.is_zero() {
            return false;
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
            return false;
        }
        let left = deadline.duration_since(progress.now());
        if !left.is_positive() {
            return false;
        }
        let since = *waiting_since.get_or_insert_with(|| {
            tracing::info!(channel = %channel, "every provider's circuit is open: waiting for one to take calls again");
            now
        });
        let until = (since + self.settings.circuit_wait).min(now + left.unsigned_abs());
        if now >= until {
            return false;
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
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = changes => {}
        }
        true
    }

    /// A slot for one call to `entry` (one of its `max_concurrent_calls`), waiting for a call
    /// to end while all are open, for at most the provider timeout and never past the deadline;
    /// `None` when none came free.
    async fn call_slot(
        &self,
        entry: &ProviderEntry,
        deadline: Timestamp,
        progress: &Progress<'_>,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Ok(slot) = Arc::clone(&entry.calls).try_acquire_owned() {
            return Some(slot);
        }
        let left = deadline
            .duration_since(progress.now())
            .max(SignedDuration::ZERO)
            .unsigned_abs();
        let wait = self.settings.provider_timeout.min(left);
        tokio::time::timeout(wait, Arc::clone(&entry.calls).acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// One provider call, its start recorded; the caller records its end.
    async fn call(
        &self,
        job: &Job,
        index: usize,
        channel: Channel,
        entry: &ProviderEntry,
        retry: u32,
        progress: &Progress<'_>,
    ) -> Result<
        (
            crate::store::AttemptKey,
            Result<crate::providers::ProviderAccept, ProviderError>,
        ),
        StoreError,
    > {
        let target = &job.targets[index];
        let recipient = Recipient::of(target);
        let masked = match target {
            Target::Phone(phone) => mask_phone(&phone.number),
            Target::Device(device) => mask_token(&device.token),
        };
        let provider = &entry.provider;
        let started_at = progress.now();
        let rendered = self.settings.templates.render(
            channel,
            &MessageContext {
                app_name: self
                    .settings
                    .app_names
                    .get(&job.tenant)
                    .unwrap_or(&self.settings.app_name),
                purpose: &job.purpose,
                locale: &job.locale,
                autofill: self
                    .settings
                    .autofill
                    .get(&job.tenant)
                    .unwrap_or(&Autofill::None),
                code: &job.code,
                expires_at: job.expires_at,
                now: started_at,
            },
        );
        // Committed before the provider hears of the code (see `Progress::start_attempt`).
        let attempt = progress
            .start_attempt(&AttemptStart {
                target: index as u32,
                provider: provider.name().to_owned(),
                channel,
                masked_target: masked.clone(),
                started_at,
                retry,
                sms: rendered.sms,
            })
            .await?;
        let message = OutboundMessage {
            delivery_id: &progress.id,
            channel,
            recipient,
            masked_recipient: &masked,
            text: &rendered.text,
            language: &rendered.language,
            sms: rendered.sms,
            code: &job.code,
            expires_at: job.expires_at,
        };
        let span = tracing::info_span!("provider", provider = provider.name(), %channel, to = %masked, retry);
        let timeout = self.settings.provider_timeout;
        let result = match tokio::time::timeout(timeout, provider.send(&message))
            .instrument(span)
            .await
        {
            Ok(result) => result,
            Err(_) => Err(ProviderError::new(
                FailureReason::ProviderTimeout,
                None,
                format!("no answer within {timeout:?}"),
            )),
        };
        match &result {
            Ok(_) => {
                tracing::info!(provider = provider.name(), %channel, to = %masked, retry, "accepted by provider")
            }
            Err(error) => tracing::info!(provider = provider.name(), %channel, to = %masked, retry,
                reason = %error.reason, provider_code = error.raw_code.as_deref(), "provider refused"),
        }
        Ok((attempt, result))
    }

    /// Records how a call ended together with its target's new state (SENT, or FAILED with the
    /// call's reason), in one ledger transaction.
    async fn finish_call(
        &self,
        attempt: crate::store::AttemptKey,
        end: &AttemptEnd,
        index: usize,
        channel: Channel,
        progress: &Progress<'_>,
    ) -> Result<(), StoreError> {
        let update = TargetUpdate::after(channel, end);
        progress.finish_attempt(attempt, end, index, &update).await
    }

    /// What quiet hours and destination permissions say about sending to `target` on
    /// `channel` at `now`. Shared by the engine and `Explain`.
    pub(crate) fn channel_verdict(
        &self,
        quiet: &[QuietHoursRule],
        job: &Job,
        target: &Target,
        channel: Channel,
        now: Timestamp,
    ) -> ChannelVerdict {
        // The number's zones only matter to a quiet-hours rule.
        let zones = match target {
            Target::Phone(phone) if !quiet.is_empty() => zones_of(&phone.number),
            _ => Vec::new(),
        };
        match quiet_decision(quiet, job, channel, &zones, now) {
            QuietDecision::Clear => {}
            QuietDecision::Bypassed { rule_id } => {
                tracing::debug!(rule = rule_id, "quiet hours: user-initiated, sent anyway");
            }
            QuietDecision::Suppress {
                rule_id,
                until,
                why,
            } => {
                let detail = format!(
                    "{} until {} ({why})",
                    quiet_rule(quiet, rule_id),
                    local_time(&until)
                );
                return ChannelVerdict::Refused(FailureReason::QuietHours, detail);
            }
            QuietDecision::Defer { rule_id, until } => {
                let detail = format!(
                    "held by {} until {}",
                    quiet_rule(quiet, rule_id),
                    local_time(&until)
                );
                return ChannelVerdict::Held {
                    until: until.timestamp(),
                    detail,
                };
            }
        }
        match self.destination_refused(job, target, channel) {
            Some(detail) => ChannelVerdict::Refused(FailureReason::DestinationNotPermitted, detail),
            None => ChannelVerdict::Open,
        }
    }

    /// Why the tenant may not send `channel` messages to this number's country, if it may not.
    pub(crate) fn destination_refused(
        &self,
        job: &Job,
        target: &Target,
        channel: Channel,
    ) -> Option<String> {
        let Target::Phone(phone) = target else {
            return None;
        };
        let rule = self
            .settings
            .destinations
            .get(&job.tenant)?
            .for_channel(channel)?;
        destination_refusal(&job.tenant, channel, rule, &phone.number)
    }

    /// The per-channel checks before a target's first call on `channel`, in order: quiet hours,
    /// destination permissions, rate limits (counted only when the send may go ahead).
    async fn gate(
        &self,
        run: Run<'_>,
        index: usize,
        channel: Channel,
        progress: &Progress<'_>,
    ) -> Result<Gate, StoreError> {
        let job = run.job;
        match self.channel_verdict(run.quiet, job, &job.targets[index], channel, progress.now()) {
            ChannelVerdict::Open => {}
            ChannelVerdict::Refused(reason, detail) => {
                self.fail(index, channel, reason, detail, progress).await?;
                return Ok(Gate::NotThisChannel);
            }
            ChannelVerdict::Held { until, detail } => {
                self.settle(
                    index,
                    channel,
                    TargetStatus::Pending,
                    None,
                    Some(detail),
                    progress,
                )
                .await?;
                let mut deferred = run.deferred.lock().unwrap_or_else(|p| p.into_inner());
                *deferred = Some(deferred.map_or(until, |held| held.min(until)));
                return Ok(Gate::NotThisChannel);
            }
        }
        if !self.count_job(run, progress).await? {
            return Ok(Gate::JobLimited);
        }
        if self
            .within_limits(job, index, channel, run.rules, progress)
            .await?
        {
            Ok(Gate::Go)
        } else {
            Ok(Gate::Closed)
        }
    }

    /// Counts the job against its account and tenant limits the first time one of its sends
    /// is about to go out; false when a limit is reached (then and for the rest of the run).
    async fn count_job(&self, run: Run<'_>, progress: &Progress<'_>) -> Result<bool, StoreError> {
        let state = run
            .job_count
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match state {
            JobCount::Done => Ok(true),
            JobCount::Limited(_) => Ok(false),
            JobCount::Pending => {
                let limited = self
                    .policy
                    .consume(&job_keys(run.rules, run.job), progress.now())
                    .await?;
                let mut state = run.job_count.lock().unwrap_or_else(|p| p.into_inner());
                match limited {
                    Some(limited) => {
                        tracing::info!(rule = limited.rule.id, allowed_at = %limited.allowed_at, "rate limited");
                        *state = JobCount::Limited(limited);
                        Ok(false)
                    }
                    None => {
                        *state = JobCount::Done;
                        Ok(true)
                    }
                }
            }
        }
    }

    /// Counts a send to target `index` against the recipient and prefix limits; when one is
    /// reached the target fails with RATE_LIMITED (saying when it frees up) and false is returned.
    async fn within_limits(
        &self,
        job: &Job,
        index: usize,
        channel: Channel,
        rules: &[RateLimitRule],
        progress: &Progress<'_>,
    ) -> Result<bool, StoreError> {
        let keys = target_keys(rules, job, &job.targets[index]);
        let Some(limited) = self.policy.consume(&keys, progress.now()).await? else {
            return Ok(true);
        };
        tracing::info!(rule = limited.rule.id, allowed_at = %limited.allowed_at, "target rate limited");
        let reason = Some(FailureReason::RateLimited);
        self.settle(
            index,
            channel,
            TargetStatus::Failed,
            reason,
            Some(limited.describe()),
            progress,
        )
        .await?;
        Ok(false)
    }

    /// Turns what a provider said about a recipient into a block entry, so that later jobs do
    /// not try again: an opt-out (e.g. Twilio 21610) blocks the number for the tenant, a dead
    /// push token (unregistered, invalid) blocks the token.
    async fn learn_from(
        &self,
        job: &Job,
        index: usize,
        provider: &str,
        error: &ProviderError,
        progress: &Progress<'_>,
    ) -> Result<(), StoreError> {
        let (kind, pattern, source) = match (&job.targets[index], error.reason) {
            (Target::Phone(phone), FailureReason::RecipientOptedOut) => {
                (BlockKind::Number, phone.number.clone(), BlockSource::OptOut)
            }
            // Only a token the push service called dead (unregistered) is blocked: an invalid
            // one often means the wrong environment or app (our configuration), not the device.
            (Target::Device(device), FailureReason::DeviceUnregistered) => (
                BlockKind::DeviceToken,
                device.token.clone(),
                BlockSource::ProviderFeedback,
            ),
            _ => return Ok(()),
        };
        let entry = NewBlockEntry {
            tenant: Some(job.tenant.clone()),
            kind,
            pattern,
            source,
            note: format!(
                "{provider} said {} ({}: {})",
                error.reason,
                error.raw_code.as_deref().unwrap_or("-"),
                error.raw_message
            ),
            expires_at: None,
        };
        let (added, new) = self.policy.add_block(&entry, progress.now()).await?;
        if new {
            tracing::info!(entry = added.id, kind = %added.kind, source = %added.source, "block-list entry added from provider feedback");
        }
        Ok(())
    }

    /// A planned retry that will not happen after all (the deadline passed while waiting, or
    /// the circuit opened): its attempt record stops announcing it.
    async fn cancel_retry(
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

    /// Settles a target as FAILED for `reason`, saying why.
    async fn fail(
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

    async fn settle(
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
    async fn close_untried(
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

/// Whether a target may be tried at all, before any channel-specific rule.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Eligibility {
    /// Yes, first by this channel.
    Eligible(Channel),
    /// None of the job's channels reaches it.
    NotAsked(String),
    /// Not valid, or refused by policy: the reason and why.
    Refused {
        channel: Channel,
        reason: FailureReason,
        detail: String,
    },
}

/// The eligibility of `target`: reachable by the job's channels, well-formed, not blocked.
/// Shared by the engine and `Explain`, so a dry run decides exactly as a send does.
pub(crate) fn eligibility(
    job: &Job,
    target: &Target,
    channels: &[Channel],
    blocks: &[BlockEntry],
    now: Timestamp,
) -> Eligibility {
    let Some(channel) = channels.iter().copied().find(|c| target.reachable_by(*c)) else {
        let kind = if matches!(target, Target::Device(_)) {
            "push"
        } else {
            "sms or voice"
        };
        return Eligibility::NotAsked(format!("the job does not ask for {kind}"));
    };
    let refusal = match target {
        Target::Phone(phone) if !is_e164(&phone.number) => Some((
            FailureReason::InvalidRecipient,
            "not a valid E.164 number (expected + then country code and number, e.g. +14155550101)"
                .to_owned(),
        )),
        Target::Device(device) if !device.can_display_code => Some((
            FailureReason::DeviceCannotDisplayCode,
            "the device says it cannot display codes".to_owned(),
        )),
        _ => blocking_entry(blocks, job, target, now)
            .map(|entry| (entry.reason(), format!("blocked by {}", entry.describe()))),
    };
    match refusal {
        Some((reason, detail)) => Eligibility::Refused {
            channel,
            reason,
            detail,
        },
        None => Eligibility::Eligible(channel),
    }
}

/// The description of quiet-hours rule `id` among `rules`.
fn quiet_rule(rules: &[QuietHoursRule], id: i64) -> String {
    rules
        .iter()
        .find(|r| r.id == id)
        .map_or_else(|| format!("quiet hours #{id}"), QuietHoursRule::describe)
}

/// "07:00 Europe/Berlin (2026-11-22T06:00:00Z)": the recipient's local time and the instant.
fn local_time(at: &jiff::Zoned) -> String {
    format!(
        "{} {} ({})",
        at.strftime("%H:%M"),
        at.time_zone().iana_name().unwrap_or("local"),
        at.timestamp()
    )
}

/// The first earlier target of `job` with the same recipient as target `index` (the same
/// number, or the same platform and token).
fn earlier_twin(job: &Job, index: usize) -> Option<usize> {
    let same = |a: &Target, b: &Target| match (a, b) {
        (Target::Phone(a), Target::Phone(b)) => a.number == b.number,
        (Target::Device(a), Target::Device(b)) => a.platform == b.platform && a.token == b.token,
        _ => false,
    };
    job.targets[..index]
        .iter()
        .position(|earlier| same(earlier, &job.targets[index]))
}

/// Where a number stands after `reason` failed it on one channel: closed for the job, or open
/// to the next channel (a landline can take a call).
fn standing_after(reason: FailureReason) -> Standing {
    if reason.closes_number_for_every_channel() {
        Standing::Closed
    } else {
        Standing::Tried
    }
}

fn channel_of(target: &Target) -> Channel {
    match target {
        Target::Device(_) => Channel::Push,
        Target::Phone(_) => Channel::Sms,
    }
}

/// How often `provider` was already tried on `channel` for target `index` (by a worker that
/// was interrupted): the retry number of the next attempt.
fn earlier_tries(prior: &Report, index: usize, provider: &str, channel: Channel) -> u32 {
    prior.targets.get(index).map_or(0, |target| {
        target
            .attempts
            .iter()
            .filter(|a| a.provider == provider && a.channel == channel)
            .count() as u32
    })
}

impl AttemptEnd {
    fn sent(ended_at: Timestamp, message_id: Option<String>) -> Self {
        AttemptEnd {
            ended_at,
            outcome: AttemptOutcome::Sent,
            reason: None,
            provider_code: None,
            provider_message: None,
            provider_message_id: message_id,
            next_retry_at: None,
            token_invalid_since: None,
        }
    }

    fn failed(
        ended_at: Timestamp,
        error: &ProviderError,
        next_retry_at: Option<Timestamp>,
    ) -> Self {
        AttemptEnd {
            ended_at,
            outcome: AttemptOutcome::Failed,
            reason: Some(error.reason),
            provider_code: error.raw_code.clone(),
            provider_message: Some(error.raw_message.clone()),
            provider_message_id: None,
            next_retry_at,
            token_invalid_since: error.token_invalid_since,
        }
    }
}
