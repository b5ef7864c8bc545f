//! The generated `otpgateway.v1` protobuf types and services, and their conversions to and
//! from the domain. Both transports (gRPC and protobuf queue bodies) decode through here.

use jiff::Timestamp;

use crate::delivery::Diagnosis;
use crate::policy::{BlockEntry, BlockKind, BlockSource};

use crate::domain::{
    self, Acknowledgement, ApiKey, Attempt, AttemptOutcome, Channel, Code, DeliveryStatus,
    DeviceTarget, FailureReason, Job, JobError, PhoneTarget, Platform, Report, Scope, SmsEncoding,
    Target, TargetResult, TargetStatus,
};

/// Generated from `proto/otpgateway/v1/*.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("otpgateway.v1");
}

/// The encoded descriptor set of `otpgateway.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/otpgateway_descriptor.bin"));

/// Converts a domain instant to a protobuf timestamp.
pub fn timestamp_to_proto(at: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.as_second(),
        nanos: at.subsec_nanosecond(),
    }
}

/// Converts a protobuf timestamp to a domain instant.
pub fn timestamp_from_proto(at: &prost_types::Timestamp) -> Option<Timestamp> {
    Timestamp::new(at.seconds, at.nanos).ok()
}

/// The domain form of a protobuf channel (`None` for UNSPECIFIED or unknown).
pub fn channel_from_proto(value: i32) -> Option<Channel> {
    match v1::Channel::try_from(value).ok()? {
        v1::Channel::Push => Some(Channel::Push),
        v1::Channel::Sms => Some(Channel::Sms),
        v1::Channel::Voice => Some(Channel::Voice),
        v1::Channel::Unspecified => None,
    }
}

/// The protobuf form of a channel.
pub fn channel_to_proto(channel: Channel) -> v1::Channel {
    match channel {
        Channel::Push => v1::Channel::Push,
        Channel::Sms => v1::Channel::Sms,
        Channel::Voice => v1::Channel::Voice,
    }
}

fn platform_to_proto(platform: Option<Platform>) -> v1::Platform {
    match platform {
        Some(Platform::Apns) => v1::Platform::Apns,
        Some(Platform::Fcm) => v1::Platform::Fcm,
        None => v1::Platform::Unspecified,
    }
}

/// Converts a protobuf job to a validated domain job, naming the field that is wrong.
pub fn job_from_proto(job: v1::SendCodeJob) -> Result<Job, JobError> {
    let expires_at = job
        .expires_at
        .as_ref()
        .ok_or_else(|| JobError::new("expires_at", "is missing"))
        .and_then(|t| {
            timestamp_from_proto(t).ok_or_else(|| JobError::new("expires_at", "is out of range"))
        })?;
    let channels = job
        .channels
        .iter()
        .enumerate()
        .map(|(i, value)| {
            channel_from_proto(*value).ok_or_else(|| {
                JobError::new(
                    format!("channels[{i}]"),
                    format!("unknown channel {value}, expected PUSH, SMS or VOICE"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let targets = job
        .targets
        .into_iter()
        .enumerate()
        .map(|(i, target)| match target.kind {
            Some(v1::target::Kind::Phone(phone)) => Ok(Target::Phone(PhoneTarget {
                number: phone.number,
            })),
            Some(v1::target::Kind::Device(device)) => {
                let platform = match v1::Platform::try_from(device.platform) {
                    Ok(v1::Platform::Apns) => Platform::Apns,
                    Ok(v1::Platform::Fcm) => Platform::Fcm,
                    _ => {
                        return Err(JobError::new(
                            format!("targets[{i}].device.platform"),
                            "must be APNS or FCM",
                        ));
                    }
                };
                Ok(Target::Device(DeviceTarget {
                    id: device.id,
                    platform,
                    token: device.token,
                    topic: Some(device.topic).filter(|t| !t.is_empty()),
                    can_display_code: device.can_display_code.unwrap_or(true),
                }))
            }
            None => Err(JobError::new(
                format!("targets[{i}]"),
                "must be a device or a phone",
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let domain_job = Job {
        job_id: job.job_id,
        tenant: job.tenant,
        account: job.account,
        code: Code::new(job.code),
        expires_at,
        purpose: if job.purpose.is_empty() {
            "sign_in".into()
        } else {
            job.purpose
        },
        locale: if job.locale.is_empty() {
            "en".into()
        } else {
            job.locale
        },
        user_initiated: job.user_initiated,
        timezone: Some(job.timezone).filter(|t| !t.is_empty()),
        channels,
        targets,
    };
    domain_job.validate()?;
    Ok(domain_job)
}

/// The protobuf form of a delivery status.
pub fn status_to_proto(status: DeliveryStatus) -> v1::DeliveryStatus {
    match status {
        DeliveryStatus::Accepted => v1::DeliveryStatus::Accepted,
        DeliveryStatus::InProgress => v1::DeliveryStatus::InProgress,
        DeliveryStatus::Deferred => v1::DeliveryStatus::Deferred,
        DeliveryStatus::Sent => v1::DeliveryStatus::Sent,
        DeliveryStatus::Delivered => v1::DeliveryStatus::Delivered,
        DeliveryStatus::Failed => v1::DeliveryStatus::Failed,
    }
}

/// The domain form of a protobuf delivery status (`None` for UNSPECIFIED or unknown).
pub fn status_from_proto(value: i32) -> Option<DeliveryStatus> {
    DeliveryStatus::ALL
        .iter()
        .copied()
        .find(|s| status_to_proto(*s) as i32 == value)
}

/// The protobuf form of a failure reason; the names match one to one.
pub fn reason_to_proto(reason: Option<FailureReason>) -> v1::FailureReason {
    reason
        .and_then(|r| v1::FailureReason::from_str_name(&format!("FAILURE_REASON_{}", r.as_str())))
        .unwrap_or(v1::FailureReason::Unspecified)
}

/// The domain form of a protobuf failure reason.
pub fn reason_from_proto(value: i32) -> Option<FailureReason> {
    let name = v1::FailureReason::try_from(value).ok()?.as_str_name();
    name.strip_prefix("FAILURE_REASON_")?.parse().ok()
}

fn target_status_to_proto(status: TargetStatus) -> v1::TargetStatus {
    match status {
        TargetStatus::Pending => v1::TargetStatus::Pending,
        TargetStatus::Skipped => v1::TargetStatus::Skipped,
        TargetStatus::Sent => v1::TargetStatus::Sent,
        TargetStatus::Delivered => v1::TargetStatus::Delivered,
        TargetStatus::Failed => v1::TargetStatus::Failed,
    }
}

fn outcome_to_proto(outcome: AttemptOutcome) -> v1::AttemptOutcome {
    match outcome {
        AttemptOutcome::InFlight => v1::AttemptOutcome::InFlight,
        AttemptOutcome::Sent => v1::AttemptOutcome::Sent,
        AttemptOutcome::Delivered => v1::AttemptOutcome::Delivered,
        AttemptOutcome::Failed => v1::AttemptOutcome::Failed,
        AttemptOutcome::Interrupted => v1::AttemptOutcome::Interrupted,
    }
}

fn attempt_to_proto(attempt: &Attempt) -> v1::AttemptRecord {
    v1::AttemptRecord {
        provider: attempt.provider.clone(),
        channel: channel_to_proto(attempt.channel) as i32,
        target: attempt.target.clone(),
        started_at: Some(timestamp_to_proto(attempt.started_at)),
        ended_at: attempt.ended_at.map(timestamp_to_proto),
        outcome: outcome_to_proto(attempt.outcome) as i32,
        reason: reason_to_proto(attempt.reason) as i32,
        provider_code: attempt.provider_code.clone().unwrap_or_default(),
        provider_message: attempt.provider_message.clone().unwrap_or_default(),
        retry: attempt.retry,
        provider_message_id: attempt.provider_message_id.clone().unwrap_or_default(),
        next_retry_at: attempt.next_retry_at.map(timestamp_to_proto),
        sms_encoding: match attempt.sms.map(|s| s.encoding) {
            None => v1::SmsEncoding::Unspecified,
            Some(SmsEncoding::Gsm7) => v1::SmsEncoding::Gsm7,
            Some(SmsEncoding::Ucs2) => v1::SmsEncoding::Ucs2,
        } as i32,
        sms_segments: attempt.sms.map_or(0, |s| s.segments),
        token_invalid_since: attempt.token_invalid_since.map(timestamp_to_proto),
    }
}

fn target_to_proto(target: &TargetResult) -> v1::TargetResult {
    v1::TargetResult {
        index: target.index,
        channel: channel_to_proto(target.channel) as i32,
        target: target.target.clone(),
        platform: platform_to_proto(target.platform) as i32,
        status: target_status_to_proto(target.status) as i32,
        reason: reason_to_proto(target.reason) as i32,
        hint: target.hint.unwrap_or_default().to_owned(),
        detail: target.detail.clone().unwrap_or_default(),
        attempts: target.attempts.iter().map(attempt_to_proto).collect(),
        acknowledgement: match target.acknowledgement {
            Some(Acknowledgement::Shown) => v1::Acknowledgement::Shown,
            Some(Acknowledgement::Denied) => v1::Acknowledgement::Denied,
            None => v1::Acknowledgement::Unspecified,
        } as i32,
    }
}

/// The protobuf form of a report.
pub fn report_to_proto(report: &Report) -> v1::DeliveryReport {
    v1::DeliveryReport {
        delivery_id: report.delivery_id.clone(),
        tenant: report.tenant.clone(),
        job_id: report.job_id.clone(),
        account: report.account.clone(),
        purpose: report.purpose.clone(),
        status: status_to_proto(report.status) as i32,
        reason: reason_to_proto(report.reason) as i32,
        hint: report.hint.unwrap_or_default().to_owned(),
        summary: report.summary.clone(),
        created_at: Some(timestamp_to_proto(report.created_at)),
        updated_at: Some(timestamp_to_proto(report.updated_at)),
        expires_at: Some(timestamp_to_proto(report.expires_at)),
        targets: report.targets.iter().map(target_to_proto).collect(),
        verified_at: report
            .verification
            .filter(|v| v.verified)
            .map(|v| timestamp_to_proto(v.at)),
        verification_failed_at: report
            .verification
            .filter(|v| !v.verified)
            .map(|v| timestamp_to_proto(v.at)),
    }
}

/// Whether a protobuf report is terminal.
pub fn is_terminal(report: &v1::DeliveryReport) -> bool {
    status_from_proto(report.status).is_some_and(domain::DeliveryStatus::is_terminal)
}

/// The domain form of a protobuf acknowledgement.
pub fn acknowledgement_from_proto(value: i32) -> Option<Acknowledgement> {
    match v1::Acknowledgement::try_from(value).ok()? {
        v1::Acknowledgement::Shown => Some(Acknowledgement::Shown),
        v1::Acknowledgement::Denied => Some(Acknowledgement::Denied),
        v1::Acknowledgement::Unspecified => None,
    }
}

/// A protobuf duration.
pub fn duration_to_proto(duration: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: duration.as_secs() as i64,
        nanos: duration.subsec_nanos() as i32,
    }
}

fn circuit_state_to_proto(state: crate::delivery::CircuitState) -> v1::CircuitState {
    use crate::delivery::CircuitState;
    match state {
        CircuitState::Closed => v1::CircuitState::Closed,
        CircuitState::Open => v1::CircuitState::Open,
        CircuitState::HalfOpen => v1::CircuitState::HalfOpen,
    }
}

fn circuit_to_proto(snapshot: &crate::delivery::BreakerSnapshot) -> v1::CircuitStatus {
    let state = circuit_state_to_proto(snapshot.state);
    v1::CircuitStatus {
        state: state as i32,
        reopens_in: snapshot.reopens_in.map(duration_to_proto),
        error_rate: snapshot.error_rate,
        calls: snapshot.calls,
        latency_p50: snapshot.latency.map(|l| duration_to_proto(l.0)),
        latency_p90: snapshot.latency.map(|l| duration_to_proto(l.1)),
        latency_p99: snapshot.latency.map(|l| duration_to_proto(l.2)),
        last_error: snapshot
            .last_error
            .as_ref()
            .map(|e| e.0.clone())
            .unwrap_or_default(),
        last_error_at: snapshot
            .last_error
            .as_ref()
            .map(|e| timestamp_to_proto(e.1)),
    }
}

/// The protobuf form of an `Explain` plan.
pub fn explanation_to_proto(plan: &crate::delivery::Explanation) -> v1::ExplainResponse {
    let refusal = |r: &Option<(FailureReason, String)>| {
        (
            reason_to_proto(r.as_ref().map(|r| r.0)) as i32,
            r.as_ref().map(|r| r.1.clone()).unwrap_or_default(),
        )
    };
    let (blocked_reason, blocked_detail) = refusal(&plan.blocked);
    v1::ExplainResponse {
        delivery_id: plan.delivery_id.clone(),
        at: Some(timestamp_to_proto(plan.at)),
        stages: plan
            .stages
            .iter()
            .map(|c| channel_to_proto(*c) as i32)
            .collect(),
        blocked_reason,
        blocked_detail,
        targets: plan
            .targets
            .iter()
            .map(|target| v1::TargetPlan {
                index: target.index,
                target: target.target.clone(),
                platform: platform_to_proto(target.platform) as i32,
                eligible: target.eligible,
                reason: reason_to_proto(target.reason) as i32,
                decision: target.decision.clone(),
                channels: target
                    .channels
                    .iter()
                    .map(|channel| {
                        let (refused_reason, refused_detail) = refusal(&channel.refused);
                        v1::ChannelPlan {
                            channel: channel_to_proto(channel.channel) as i32,
                            route: channel.route.clone(),
                            providers: channel
                                .providers
                                .iter()
                                .map(|p| v1::ProviderChoice {
                                    name: p.name.clone(),
                                    circuit: circuit_state_to_proto(p.circuit) as i32,
                                })
                                .collect(),
                            refused_reason,
                            refused_detail,
                            fraud_watch: channel.fraud_watch.clone().unwrap_or_default(),
                        }
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The protobuf form of a domain job (for clients that read JSON jobs, e.g. `otp-gateway explain`).
pub fn job_to_proto(job: &Job) -> v1::SendCodeJob {
    v1::SendCodeJob {
        job_id: job.job_id.clone(),
        tenant: job.tenant.clone(),
        account: job.account.clone(),
        code: job.code.expose().to_owned(),
        expires_at: Some(timestamp_to_proto(job.expires_at)),
        purpose: job.purpose.clone(),
        locale: job.locale.clone(),
        user_initiated: job.user_initiated,
        timezone: job.timezone.clone().unwrap_or_default(),
        channels: job
            .channels
            .iter()
            .map(|c| channel_to_proto(*c) as i32)
            .collect(),
        targets: job
            .targets
            .iter()
            .map(|target| v1::Target {
                kind: Some(match target {
                    Target::Phone(phone) => v1::target::Kind::Phone(v1::PhoneTarget {
                        number: phone.number.clone(),
                    }),
                    Target::Device(device) => v1::target::Kind::Device(v1::DeviceTarget {
                        id: device.id.clone(),
                        platform: platform_to_proto(Some(device.platform)) as i32,
                        token: device.token.clone(),
                        topic: device.topic.clone().unwrap_or_default(),
                        can_display_code: Some(device.can_display_code),
                    }),
                }),
            })
            .collect(),
    }
}

/// The protobuf form of a provider's health.
pub fn provider_health_to_proto(health: &crate::delivery::ProviderHealth) -> v1::ProviderStatus {
    v1::ProviderStatus {
        name: health.name.clone(),
        kind: health.kind.to_owned(),
        circuit: Some(circuit_to_proto(&health.circuit)),
        routes: health
            .routes
            .iter()
            .map(|(route, channel, snapshot)| v1::RouteStatus {
                route: route.clone(),
                channel: channel_to_proto(*channel) as i32,
                circuit: Some(circuit_to_proto(snapshot)),
            })
            .collect(),
    }
}

/// An API key scope's wire form.
pub fn scope_to_proto(scope: Scope) -> v1::ApiKeyScope {
    match scope {
        Scope::Send => v1::ApiKeyScope::Send,
        Scope::Read => v1::ApiKeyScope::Read,
        Scope::Ack => v1::ApiKeyScope::Ack,
        Scope::Admin => v1::ApiKeyScope::Admin,
        Scope::Status => v1::ApiKeyScope::Status,
    }
}

/// An API key scope from its wire form (`None`: unspecified or unknown).
pub fn scope_from_proto(value: i32) -> Option<Scope> {
    Scope::ALL
        .iter()
        .copied()
        .find(|scope| scope_to_proto(*scope) as i32 == value)
}

/// A stored API key's wire form (never with its secret).
pub fn api_key_to_proto(key: &ApiKey) -> v1::ApiKey {
    v1::ApiKey {
        id: key.id.clone(),
        tenant: key.tenant.clone().unwrap_or_default(),
        scopes: key
            .scopes
            .iter()
            .map(|s| scope_to_proto(*s) as i32)
            .collect(),
        label: key.label.clone(),
        created_at: Some(timestamp_to_proto(key.created_at)),
        revoked_at: key.revoked_at.map(timestamp_to_proto),
    }
}

fn kind_to_proto(kind: BlockKind) -> v1::BlockKind {
    match kind {
        BlockKind::Number => v1::BlockKind::Number,
        BlockKind::Prefix => v1::BlockKind::Prefix,
        BlockKind::DeviceToken => v1::BlockKind::DeviceToken,
        BlockKind::Account => v1::BlockKind::Account,
    }
}

fn source_to_proto(source: BlockSource) -> v1::BlockSource {
    match source {
        BlockSource::Admin => v1::BlockSource::Admin,
        BlockSource::OptOut => v1::BlockSource::OptOut,
        BlockSource::ProviderFeedback => v1::BlockSource::ProviderFeedback,
    }
}

/// The protobuf form of a block entry (numbers and tokens masked).
pub fn entry_to_proto(entry: &BlockEntry) -> v1::BlockEntry {
    v1::BlockEntry {
        id: entry.id,
        tenant: entry.tenant.clone().unwrap_or_default(),
        kind: kind_to_proto(entry.kind) as i32,
        pattern: entry.shown.clone(),
        source: source_to_proto(entry.source) as i32,
        note: entry.note.clone(),
        created_at: Some(timestamp_to_proto(entry.created_at)),
        expires_at: entry.expires_at.map(timestamp_to_proto),
    }
}

/// The protobuf form of an account diagnosis.
pub fn diagnosis_to_proto(diagnosis: &Diagnosis) -> v1::AccountDiagnosis {
    let last = diagnosis.last_delivery.as_ref();
    v1::AccountDiagnosis {
        tenant: diagnosis.tenant.clone(),
        account: diagnosis.account.clone(),
        deliveries_examined: diagnosis.examined as u32,
        since: diagnosis.since.map(timestamp_to_proto),
        last_delivery_id: last.map(|(id, _, _)| id.clone()).unwrap_or_default(),
        last_delivery_status: last.map_or(v1::DeliveryStatus::Unspecified, |(_, status, _)| {
            status_to_proto(*status)
        }) as i32,
        last_delivery_at: last.map(|(_, _, at)| timestamp_to_proto(*at)),
        summary: diagnosis.summary.clone(),
        targets: diagnosis
            .targets
            .iter()
            .map(|target| v1::TargetDiagnosis {
                target: target.target.clone(),
                platform: platform_to_proto(target.platform) as i32,
                last_status: target_status_to_proto(target.last_status) as i32,
                last_reason: reason_to_proto(target.last_reason) as i32,
                last_at: Some(timestamp_to_proto(target.last_at)),
                failures_in_a_row: target.failures_in_a_row,
                last_success_at: target.last_success.map(timestamp_to_proto),
                failures: target
                    .failures
                    .iter()
                    .map(|seen| v1::FailureSeen {
                        reason: reason_to_proto(Some(seen.reason)) as i32,
                        channel: channel_to_proto(seen.channel) as i32,
                        provider: seen.provider.clone().unwrap_or_default(),
                        provider_code: seen.provider_code.clone().unwrap_or_default(),
                        count: seen.count,
                        last_at: Some(timestamp_to_proto(seen.last_at)),
                    })
                    .collect(),
                blocks: target.blocks.iter().map(entry_to_proto).collect(),
                token_invalid_since: target.token_invalid_since.map(timestamp_to_proto),
                fraud_holds: target
                    .fraud_holds
                    .iter()
                    .map(|hold| quarantine_to_proto(hold, true))
                    .collect(),
                hint: target
                    .last_reason
                    .filter(|_| target.last_status == TargetStatus::Failed)
                    .map(|reason| reason.hint().to_owned())
                    .unwrap_or_default(),
            })
            .collect(),
        account_blocks: diagnosis
            .account_blocks
            .iter()
            .map(entry_to_proto)
            .collect(),
        fixes: diagnosis
            .fixes
            .iter()
            .map(|fix| v1::DiagnosisFix {
                target: fix.target.clone().unwrap_or_default(),
                reason: reason_to_proto(fix.reason) as i32,
                text: fix.text.clone(),
            })
            .collect(),
    }
}

/// A quarantine on the wire; `holds_now` says whether it refuses sends now (the tenant's mode
/// decides for the guard's own holds).
pub fn quarantine_to_proto(
    quarantine: &crate::policy::Quarantine,
    holds_now: bool,
) -> v1::Quarantine {
    use crate::policy::QuarantineState;
    v1::Quarantine {
        tenant: quarantine.tenant.clone(),
        range: quarantine.range.clone(),
        state: match quarantine.state {
            QuarantineState::Held => v1::quarantine::State::Held,
            QuarantineState::Lifted => v1::quarantine::State::Lifted,
        } as i32,
        since: Some(timestamp_to_proto(quarantine.since)),
        until: quarantine.until.map(timestamp_to_proto),
        in_force: holds_now,
        pinned: quarantine.pinned(),
        mode: quarantine.mode.as_str().to_owned(),
        evidence: quarantine.evidence.as_ref().map(|e| v1::FraudEvidence {
            window_sends: e.window_sends,
            window_seconds: e.window_secs,
            hourly_rate: e.hourly_rate,
            baseline_hourly: e.baseline_hourly,
            judged_sends: e.judged_sends,
            judged_conversions: e.judged_conversions,
        }),
        note: quarantine.note.clone(),
        description: quarantine.describe(),
        updated_at: Some(timestamp_to_proto(quarantine.updated_at)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_and_status_has_a_protobuf_twin() {
        for reason in FailureReason::ALL {
            let proto = reason_to_proto(Some(*reason));
            assert_ne!(proto, v1::FailureReason::Unspecified, "{reason}");
            assert_eq!(reason_from_proto(proto as i32), Some(*reason));
        }
        for status in DeliveryStatus::ALL {
            assert_eq!(
                status_from_proto(status_to_proto(*status) as i32),
                Some(*status)
            );
        }
        assert_eq!(status_from_proto(0), None);
    }

    #[test]
    fn protobuf_jobs_name_the_bad_field() {
        let job = v1::SendCodeJob {
            job_id: "j".into(),
            tenant: "acme".into(),
            account: "a".into(),
            code: "123456".into(),
            expires_at: Some(timestamp_to_proto(Timestamp::UNIX_EPOCH)),
            targets: vec![v1::Target {
                kind: Some(v1::target::Kind::Device(v1::DeviceTarget {
                    id: "d".into(),
                    platform: 0,
                    token: "t".into(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        assert_eq!(
            job_from_proto(job.clone()).unwrap_err().field,
            "targets[0].device.platform"
        );
        let mut no_expiry = job;
        no_expiry.expires_at = None;
        assert_eq!(job_from_proto(no_expiry).unwrap_err().field, "expires_at");
    }
}
