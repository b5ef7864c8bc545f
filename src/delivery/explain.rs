//! `Explain`: the engine's plan for a job at a given time, with every policy decision and the
//! rule that made it, and the providers that would be tried with their circuit state. Nothing
//! is sent, nothing is written, nothing is counted against rate limits.

use jiff::Timestamp;
use tokio::time::Instant;

use super::breaker::CircuitState;
use super::engine::Dispatcher;
use super::gate::{ChannelVerdict, Eligibility, eligibility};
use crate::domain::{Channel, FailureReason, Job, Platform, Target, mask_phone};
use crate::policy::{job_keys, target_keys};
use crate::providers::Recipient;
use crate::store::StoreError;

/// A provider that would be tried, and its circuit now.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderChoice {
    /// Its name.
    pub name: String,
    /// The provider's circuit (open means it would be skipped).
    pub circuit: CircuitState,
}

/// How one channel would reach a target.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelPlan {
    /// The channel.
    pub channel: Channel,
    /// The route (`*` or the destination prefix).
    pub route: String,
    /// Providers in failover order.
    pub providers: Vec<ProviderChoice>,
    /// When policy refuses or holds this channel for this target (quiet hours, destination,
    /// rate limit): why.
    pub refused: Option<(FailureReason, String)>,
    /// When the fraud guard suspects the number's range and the tenant is in monitor mode
    /// (sent anyway): the hold, in words.
    pub fraud_watch: Option<String>,
}

/// The decision about one target.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetPlan {
    /// Position in the job.
    pub index: u32,
    /// Device id or masked number.
    pub target: String,
    /// For devices.
    pub platform: Option<Platform>,
    /// Whether it would be tried at all.
    pub eligible: bool,
    /// Why not.
    pub reason: Option<FailureReason>,
    /// The rule or check that decided, in words.
    pub decision: String,
    /// Per channel that reaches it, in stage order.
    pub channels: Vec<ChannelPlan>,
}

/// The whole plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// `tenant/job_id`.
    pub delivery_id: String,
    /// The instant the plan is for.
    pub at: Timestamp,
    /// The stages, in order.
    pub stages: Vec<Channel>,
    /// Set when the whole delivery would fail before any stage (expired code, account or
    /// tenant rate limit), with why.
    pub blocked: Option<(FailureReason, String)>,
    /// Per target.
    pub targets: Vec<TargetPlan>,
}

impl Dispatcher {
    /// The plan for `job` at `at`.
    pub async fn explain(&self, job: &Job, at: Timestamp) -> Result<Explanation, StoreError> {
        let stages = job.channel_order();
        let deadline = job.expires_at - self.settings().expiry_margin;
        let context = self.policy_context(job, at).await?;
        let (blocks, rules, quiet) = (&context.blocks, &context.rate_limits, &context.quiet_hours);
        let blocked = if at >= deadline {
            Some((
                FailureReason::CodeExpired,
                format!(
                    "the code expires at {}: nothing would be sent",
                    job.expires_at
                ),
            ))
        } else {
            self.policy_store()
                .peek(&job_keys(rules, job), at)
                .await?
                .map(|limited| (FailureReason::RateLimited, limited.describe()))
        };
        let now = Instant::now();
        let mut targets = Vec::with_capacity(job.targets.len());
        for (index, target) in job.targets.iter().enumerate() {
            let (label, platform) = match target {
                Target::Device(device) => (device.id.clone(), Some(device.platform)),
                Target::Phone(phone) => (mask_phone(&phone.number), None),
            };
            let (eligible, reason, decision) = match eligibility(job, target, &stages, blocks, at) {
                Eligibility::Eligible(_) => (true, None, "valid and on no block list".to_owned()),
                Eligibility::NotAsked(detail) => (false, None, detail),
                Eligibility::Refused { reason, detail, .. } => (false, Some(reason), detail),
            };
            let mut channels = Vec::new();
            for channel in stages.iter().copied().filter(|c| target.reachable_by(*c)) {
                let route = self.providers().route(channel, &Recipient::of(target));
                let route_key = route.prefix.unwrap_or("*").to_owned();
                let providers = route
                    .providers
                    .iter()
                    .map(|entry| ProviderChoice {
                        name: entry.name().to_owned(),
                        circuit: self.circuit_of(entry, channel, &route_key, now),
                    })
                    .collect();
                let verdict = self.channel_verdict(quiet, job, target, channel, at);
                let fraud_watch = match &verdict {
                    ChannelVerdict::Watched { detail, .. } => Some(detail.clone()),
                    _ => None,
                };
                let refused = match verdict {
                    ChannelVerdict::Refused(reason, detail) => Some((reason, detail)),
                    ChannelVerdict::Suspended { detail, .. } => {
                        Some((FailureReason::DestinationSuspended, detail))
                    }
                    ChannelVerdict::Held { detail, .. } => {
                        Some((FailureReason::QuietHours, format!("would be {detail}")))
                    }
                    ChannelVerdict::Open | ChannelVerdict::Watched { .. } => self
                        .policy_store()
                        .peek(&target_keys(rules, job, target), at)
                        .await?
                        .map(|limited| (FailureReason::RateLimited, limited.describe())),
                };
                channels.push(ChannelPlan {
                    channel,
                    route: route_key,
                    providers,
                    refused,
                    fraud_watch,
                });
            }
            targets.push(TargetPlan {
                index: index as u32,
                target: label,
                platform,
                eligible,
                reason,
                decision,
                channels,
            });
        }
        Ok(Explanation {
            delivery_id: job.delivery_id().to_string(),
            at,
            stages,
            blocked,
            targets,
        })
    }
}
