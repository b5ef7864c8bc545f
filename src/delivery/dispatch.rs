//! The minimal dispatcher: push to every eligible device at once, then SMS to the first valid
//! number (the next one after a recipient-level failure), then voice; one provider per channel
//! (the first of its route), no retries. Every attempt is written to the ledger as it happens.
//! The delivery-engine issue replaces this with stages, retries, failover and breakers.

use std::time::Duration;

use futures_util::future::join_all;
use tracing::Instrument;

use super::Progress;
use crate::domain::{
    AttemptOutcome, Channel, FailureReason, Job, Report, RetryClass, Target, TargetStatus, is_e164,
    mask_phone, mask_token, render_message,
};
use crate::providers::{OutboundMessage, ProviderError, ProviderRegistry, Recipient};
use crate::store::{AttemptEnd, AttemptStart, StoreError, TargetUpdate};

/// How dispatch ended, before the headline reason and summary are worked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// At least one target accepted the code.
    Reached,
    /// Nothing reached the user; the reason, when it is the delivery's rather than a target's.
    Failed(Option<FailureReason>),
}

/// Sends a job's code to its targets through the configured providers.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    providers: ProviderRegistry,
    app_name: String,
    provider_timeout: Duration,
}

/// A target's state during one dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// May be tried.
    Open,
    /// Tried and a provider accepted it.
    Reached,
    /// A recipient-level failure or not eligible: not tried again.
    Closed,
}

impl Dispatcher {
    /// A dispatcher over `providers`.
    pub fn new(providers: ProviderRegistry, app_name: String, provider_timeout: Duration) -> Self {
        Dispatcher {
            providers,
            app_name,
            provider_timeout,
        }
    }

    /// Delivers `job`. `prior` is the report as claimed (non-empty when resuming a delivery a
    /// previous worker started: targets it already settled are not tried again).
    pub(crate) async fn dispatch(
        &self,
        job: &Job,
        prior: &Report,
        progress: &Progress<'_>,
    ) -> Result<Verdict, StoreError> {
        if progress.now() >= job.expires_at {
            tracing::info!(expires_at = %job.expires_at, "code expired before delivery started");
            return Ok(Verdict::Failed(Some(FailureReason::CodeExpired)));
        }
        let channels = job.channel_order();
        let mut standing = Vec::with_capacity(job.targets.len());
        for (index, target) in job.targets.iter().enumerate() {
            let previous = prior
                .targets
                .get(index)
                .map_or(TargetStatus::Pending, |t| t.status);
            standing.push(match previous {
                TargetStatus::Sent | TargetStatus::Delivered => Standing::Reached,
                TargetStatus::Failed | TargetStatus::Skipped => Standing::Closed,
                TargetStatus::Pending => {
                    self.check_eligibility(index as u32, target, &channels, progress)
                        .await?
                }
            });
        }
        if standing.contains(&Standing::Reached) {
            self.skip_open(
                &mut standing,
                job,
                "the code already reached the user",
                progress,
            )
            .await?;
            return Ok(Verdict::Reached);
        }

        for channel in channels {
            if progress.now() >= job.expires_at {
                self.close_open(
                    &mut standing,
                    job,
                    channel,
                    FailureReason::CodeExpired,
                    progress,
                )
                .await?;
                break;
            }
            let reached = match channel {
                Channel::Push => self.push_stage(job, prior, &mut standing, progress).await?,
                Channel::Sms | Channel::Voice => {
                    self.phone_stage(job, prior, channel, &mut standing, progress)
                        .await?
                }
            };
            if reached {
                self.skip_open(
                    &mut standing,
                    job,
                    "the code already reached the user",
                    progress,
                )
                .await?;
                return Ok(Verdict::Reached);
            }
        }
        self.skip_open(
            &mut standing,
            job,
            "a provider failure ended its stage before it was tried",
            progress,
        )
        .await?;
        Ok(Verdict::Failed(None))
    }

    async fn check_eligibility(
        &self,
        index: u32,
        target: &Target,
        channels: &[Channel],
        progress: &Progress<'_>,
    ) -> Result<Standing, StoreError> {
        let Some(channel) = channels.iter().copied().find(|c| target.reachable_by(*c)) else {
            let kind = if matches!(target, Target::Device(_)) {
                "push"
            } else {
                "sms or voice"
            };
            let detail = format!("the job does not ask for {kind}");
            self.settle(
                index,
                channel_of(target),
                TargetStatus::Skipped,
                None,
                Some(detail),
                progress,
            )
            .await?;
            return Ok(Standing::Closed);
        };
        let refusal = match target {
            Target::Phone(phone) if !is_e164(&phone.number) => Some((
                FailureReason::InvalidRecipient,
                "not a valid E.164 number (expected + then country code and number, e.g. +14155550101)",
            )),
            Target::Device(device) if !device.can_display_code => Some((
                FailureReason::DeviceCannotDisplayCode,
                "the device says it cannot display codes",
            )),
            _ => None,
        };
        match refusal {
            Some((reason, detail)) => {
                self.settle(
                    index,
                    channel,
                    TargetStatus::Failed,
                    Some(reason),
                    Some(detail.into()),
                    progress,
                )
                .await?;
                Ok(Standing::Closed)
            }
            None => Ok(Standing::Open),
        }
    }

    /// Push stage: every open device at once. True when any accepted.
    async fn push_stage(
        &self,
        job: &Job,
        prior: &Report,
        standing: &mut [Standing],
        progress: &Progress<'_>,
    ) -> Result<bool, StoreError> {
        let open: Vec<usize> = job
            .targets
            .iter()
            .enumerate()
            .filter(|(i, t)| standing[*i] == Standing::Open && matches!(t, Target::Device(_)))
            .map(|(i, _)| i)
            .collect();
        let results = join_all(
            open.iter()
                .map(|&index| self.attempt(job, prior, index, Channel::Push, progress)),
        )
        .await;
        let mut reached = false;
        for (index, result) in open.into_iter().zip(results) {
            match result? {
                Ok(()) => {
                    standing[index] = Standing::Reached;
                    reached = true;
                }
                // A device that failed is not tried again in this delivery.
                Err(_) => standing[index] = Standing::Closed,
            }
        }
        Ok(reached)
    }

    /// SMS or voice stage: open numbers in order until one accepts. A recipient-level failure
    /// moves to the next number; a provider-level one ends the stage (no failover yet).
    async fn phone_stage(
        &self,
        job: &Job,
        prior: &Report,
        channel: Channel,
        standing: &mut [Standing],
        progress: &Progress<'_>,
    ) -> Result<bool, StoreError> {
        for (index, target) in job.targets.iter().enumerate() {
            if standing[index] != Standing::Open || !matches!(target, Target::Phone(_)) {
                continue;
            }
            match self.attempt(job, prior, index, channel, progress).await? {
                Ok(()) => {
                    standing[index] = Standing::Reached;
                    return Ok(true);
                }
                Err(error) if error.class == RetryClass::PermanentForTarget => {
                    standing[index] = Standing::Closed;
                }
                Err(_) => return Ok(false),
            }
        }
        Ok(false)
    }

    /// One provider call for one target, recorded before and after.
    async fn attempt(
        &self,
        job: &Job,
        prior: &Report,
        index: usize,
        channel: Channel,
        progress: &Progress<'_>,
    ) -> Result<Result<(), ProviderError>, StoreError> {
        let target = &job.targets[index];
        let (recipient, masked) = match target {
            Target::Phone(phone) => (Recipient::Phone(&phone.number), mask_phone(&phone.number)),
            Target::Device(device) => (
                Recipient::Device {
                    platform: device.platform,
                    token: &device.token,
                    topic: device.topic.as_deref(),
                },
                mask_token(&device.token),
            ),
        };
        let Some(provider) = self.providers.route(channel).first() else {
            let error = ProviderError::new(
                FailureReason::ProviderMisconfigured,
                None,
                format!("no provider is routed for {channel}"),
            );
            self.settle(
                index as u32,
                channel,
                TargetStatus::Failed,
                Some(error.reason),
                Some(error.raw_message.clone()),
                progress,
            )
            .await?;
            return Ok(Err(error));
        };
        let started_at = progress.now();
        let attempt = progress
            .ledger
            .start_attempt(
                progress.key,
                &AttemptStart {
                    target: index as u32,
                    provider: provider.name().to_owned(),
                    channel,
                    masked_target: masked.clone(),
                    started_at,
                    retry: earlier_tries(prior, index, provider.name(), channel),
                },
            )
            .await?;
        progress.changed();
        let text = render_message(
            channel,
            &self.app_name,
            &job.code,
            job.expires_at,
            started_at,
        );
        let message = OutboundMessage {
            delivery_id: &progress.id,
            channel,
            recipient,
            masked_recipient: &masked,
            text: &text,
            code: &job.code,
            expires_at: job.expires_at,
        };
        let span =
            tracing::info_span!("provider", provider = provider.name(), %channel, to = %masked);
        let result = match tokio::time::timeout(self.provider_timeout, provider.send(&message))
            .instrument(span)
            .await
        {
            Ok(result) => result,
            Err(_) => Err(ProviderError::new(
                FailureReason::ProviderTimeout,
                None,
                format!("no answer within {:?}", self.provider_timeout),
            )),
        };
        let ended_at = progress.now();
        let (end, update) = match &result {
            Ok(accept) => {
                tracing::info!(provider = provider.name(), %channel, to = %masked, "accepted by provider");
                (
                    AttemptEnd {
                        ended_at,
                        outcome: AttemptOutcome::Sent,
                        reason: None,
                        provider_code: None,
                        provider_message: None,
                        provider_message_id: accept.message_id.clone(),
                    },
                    (TargetStatus::Sent, None),
                )
            }
            Err(error) => {
                tracing::info!(provider = provider.name(), %channel, to = %masked, reason = %error.reason, provider_code = error.raw_code.as_deref(), "provider refused");
                (
                    AttemptEnd {
                        ended_at,
                        outcome: AttemptOutcome::Failed,
                        reason: Some(error.reason),
                        provider_code: error.raw_code.clone(),
                        provider_message: Some(error.raw_message.clone()),
                        provider_message_id: None,
                    },
                    (TargetStatus::Failed, Some(error.reason)),
                )
            }
        };
        progress.ledger.finish_attempt(attempt, &end).await?;
        self.settle(index as u32, channel, update.0, update.1, None, progress)
            .await?;
        Ok(result.map(|_| ()))
    }

    async fn settle(
        &self,
        index: u32,
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
        progress
            .ledger
            .update_target(progress.key, index, &update, progress.now())
            .await?;
        progress.changed();
        Ok(())
    }

    /// Marks every still-open target as not tried, saying why.
    async fn skip_open(
        &self,
        standing: &mut [Standing],
        job: &Job,
        why: &str,
        progress: &Progress<'_>,
    ) -> Result<(), StoreError> {
        for (index, target) in job.targets.iter().enumerate() {
            if standing[index] == Standing::Open {
                standing[index] = Standing::Closed;
                self.settle(
                    index as u32,
                    channel_of(target),
                    TargetStatus::Skipped,
                    None,
                    Some(why.into()),
                    progress,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Fails every still-open target with `reason`.
    async fn close_open(
        &self,
        standing: &mut [Standing],
        job: &Job,
        channel: Channel,
        reason: FailureReason,
        progress: &Progress<'_>,
    ) -> Result<(), StoreError> {
        for (index, target) in job.targets.iter().enumerate() {
            if standing[index] == Standing::Open {
                standing[index] = Standing::Closed;
                let channel = if target.reachable_by(channel) {
                    channel
                } else {
                    channel_of(target)
                };
                self.settle(
                    index as u32,
                    channel,
                    TargetStatus::Failed,
                    Some(reason),
                    None,
                    progress,
                )
                .await?;
            }
        }
        Ok(())
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
