//! The policy gate: whether a target may be tried at all (eligibility: channels, well-formed,
//! not blocked), and before each channel's first call quiet hours, destination permissions, the
//! fraud guard's holds and the rate-limit count (taken only when the send may go ahead). Shared with `Explain`.

use jiff::Timestamp;

use super::decisions::{Standing, channel_of};
use super::engine::{Dispatcher, JobCount, Run};
use super::fraud_guard::FraudVerdict;
use super::progress::Progress;
use crate::domain::{Channel, FailureReason, Job, Target, TargetStatus, is_e164};
use crate::policy::{
    BlockEntry, QuietDecision, QuietHoursRule, RateLimitRule, blocking_entry, destination_refusal,
    job_keys, quiet_decision, target_keys, zones_of,
};
use crate::store::StoreError;

/// What policy says about one job, read once at the gate: the engine's steps decide from it
/// with the pure policy functions and only write (rate counts, settled targets) afterwards.
#[derive(Debug, Clone, Default)]
pub(crate) struct PolicyContext {
    /// Block entries in force that name the job's account, numbers or tokens, or a prefix.
    pub(crate) blocks: Vec<BlockEntry>,
    /// The rate limits of the job's tenant (and the global ones).
    pub(crate) rate_limits: Vec<RateLimitRule>,
    /// The quiet-hours rules of the job's tenant (and the global ones).
    pub(crate) quiet_hours: Vec<QuietHoursRule>,
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
    /// Refused: the fraud guard holds `range` (DESTINATION_SUSPENDED).
    Suspended { range: String, detail: String },
    /// Open, but the fraud guard suspects `range` (the tenant is in monitor mode): sent, and
    /// counted as a send enforce mode would have held.
    Watched { range: String, detail: String },
}

/// What the per-channel checks decided for one target.
pub(super) enum Gate {
    /// Try it now.
    Go,
    /// Not on this channel (refused or held); another channel may still reach it.
    NotThisChannel,
    /// Not at all (rate limited).
    Closed,
    /// The job is over an account or tenant limit: nothing of it is sent.
    JobLimited,
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
pub(super) fn quiet_rule(rules: &[QuietHoursRule], id: i64) -> String {
    rules
        .iter()
        .find(|r| r.id == id)
        .map_or_else(|| format!("quiet hours #{id}"), QuietHoursRule::describe)
}

/// "07:00 Europe/Berlin (2026-11-22T06:00:00Z)": the recipient's local time and the instant.
pub(super) fn local_time(at: &jiff::Zoned) -> String {
    format!(
        "{} {} ({})",
        at.strftime("%H:%M"),
        at.time_zone().iana_name().unwrap_or("local"),
        at.timestamp()
    )
}

impl Dispatcher {
    /// The policy context of `job` at `at`, read once before anything is decided: the block
    /// entries in force that could apply to it, and its tenant's rate limits and quiet hours
    /// (the rules through the one-second cache).
    pub(crate) async fn policy_context(
        &self,
        job: &Job,
        at: Timestamp,
    ) -> Result<PolicyContext, StoreError> {
        let mut patterns = vec![job.account.as_str()];
        for target in &job.targets {
            patterns.push(match target {
                Target::Phone(phone) => &phone.number,
                Target::Device(device) => &device.token,
            });
        }
        let (blocks, rate_limits, quiet_hours) = tokio::try_join!(
            self.policy.block_candidates(&job.tenant, &patterns, at),
            self.policy.list_rate_limits(Some(&job.tenant)),
            self.policy.list_quiet_hours(Some(&job.tenant)),
        )?;
        Ok(PolicyContext {
            blocks,
            rate_limits,
            quiet_hours,
        })
    }

    pub(super) async fn check_eligibility(
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
                self.skip(index, channel_of(target), detail, progress)
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
        if let Some(detail) = self.destination_refused(job, target, channel) {
            return ChannelVerdict::Refused(FailureReason::DestinationNotPermitted, detail);
        }
        let Target::Phone(phone) = target else {
            return ChannelVerdict::Open;
        };
        match self
            .fraud
            .verdict(&job.tenant, &job.account, &phone.number, now)
        {
            FraudVerdict::Clear => ChannelVerdict::Open,
            FraudVerdict::Held(held) => ChannelVerdict::Suspended {
                detail: format!("the fraud guard holds {}", held.describe()),
                range: held.range,
            },
            FraudVerdict::Watched(watched) => ChannelVerdict::Watched {
                detail: format!(
                    "monitor mode: sent, but enforce would hold it: {}",
                    watched.describe()
                ),
                range: watched.range,
            },
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
    pub(super) async fn gate(
        &self,
        run: Run<'_>,
        index: usize,
        channel: Channel,
        progress: &Progress<'_>,
    ) -> Result<Gate, StoreError> {
        let job = run.job;
        let target = &job.targets[index];
        match self.channel_verdict(run.quiet, job, target, channel, progress.now()) {
            ChannelVerdict::Open => {}
            ChannelVerdict::Watched { range, .. } => {
                self.metrics.fraud_held(&job.tenant, &range, "monitor");
            }
            ChannelVerdict::Suspended { range, detail } => {
                self.metrics.fraud_held(&job.tenant, &range, "enforce");
                let reason = FailureReason::DestinationSuspended;
                self.fail(index, channel, reason, detail, progress).await?;
                return Ok(Gate::NotThisChannel);
            }
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
    pub(super) async fn count_job(
        &self,
        run: Run<'_>,
        progress: &Progress<'_>,
    ) -> Result<bool, StoreError> {
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
    pub(super) async fn within_limits(
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
}
