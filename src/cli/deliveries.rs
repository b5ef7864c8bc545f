//! The delivery commands: `send` (and follow with `--wait`), `status`, `explain` and `health`,
//! and the report as a person reads it.

use std::process::ExitCode;

use anyhow::Context;
use jiff::Timestamp;

use super::args::SendArgs;
use super::connection::{Server, gateway};
use super::{EXIT_CONFIG, EXIT_UNAVAILABLE};
use crate::proto::v1::code_delivery_client::CodeDeliveryClient;
use crate::proto::v1::{self, DeliveryReport};
use crate::proto::{
    is_terminal, reason_from_proto, status_from_proto, timestamp_from_proto, timestamp_to_proto,
};

pub(super) fn channel_from_name(name: &str) -> anyhow::Result<v1::Channel> {
    v1::Channel::from_str_name(&format!("CHANNEL_{}", name.trim().to_ascii_uppercase()))
        .filter(|c| *c != v1::Channel::Unspecified)
        .with_context(|| format!("unknown channel `{name}` (push, sms or voice)"))
}

pub(super) async fn send(args: SendArgs, server: &Server) -> anyhow::Result<ExitCode> {
    let mut targets = Vec::new();
    for (i, device) in args.devices.iter().enumerate() {
        let (platform, token) = device
            .split_once(':')
            .context("--device takes PLATFORM:TOKEN[@TOPIC], e.g. apns:a1b2c3@com.example.app")?;
        let (token, topic) = token.split_once('@').unwrap_or((token, ""));
        let platform =
            v1::Platform::from_str_name(&format!("PLATFORM_{}", platform.to_ascii_uppercase()))
                .filter(|p| *p != v1::Platform::Unspecified)
                .with_context(|| format!("unknown platform `{platform}` (apns or fcm)"))?;
        targets.push(v1::Target {
            kind: Some(v1::target::Kind::Device(v1::DeviceTarget {
                id: format!("device-{}", i + 1),
                platform: platform as i32,
                token: token.to_owned(),
                topic: topic.to_owned(),
                ..Default::default()
            })),
        });
    }
    for number in &args.numbers {
        targets.push(v1::Target {
            kind: Some(v1::target::Kind::Phone(v1::PhoneTarget {
                number: number.clone(),
            })),
        });
    }
    let channels = args
        .channels
        .iter()
        .map(|c| channel_from_name(c).map(|c| c as i32))
        .collect::<Result<_, _>>()?;
    let job = v1::SendCodeJob {
        job_id: args
            .job_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        tenant: args.tenant,
        account: args.account,
        code: args.code.unwrap_or_else(random_code),
        expires_at: Some(timestamp_to_proto(Timestamp::now() + args.ttl)),
        purpose: "sign_in".into(),
        locale: "en".into(),
        user_initiated: true,
        channels,
        targets,
        ..Default::default()
    };
    let mut client = match gateway(server).await {
        Ok(channel) => CodeDeliveryClient::new(channel),
        Err(code) => return Ok(code),
    };
    let response = client
        .send_code(v1::SendCodeRequest { job: Some(job) })
        .await?
        .into_inner();
    println!(
        "{}  {}{}",
        response.delivery_id,
        status_name(response.status),
        if response.duplicate {
            "  (duplicate: nothing new sent)"
        } else {
            ""
        }
    );
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let mut stream = client
        .watch_delivery(v1::WatchDeliveryRequest {
            delivery_id: response.delivery_id,
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(report) = stream.message().await? {
        let terminal = is_terminal(&report);
        last = Some(report);
        if terminal {
            break;
        }
    }
    let report = last.context("the gateway closed the stream without a report")?;
    print_report(&report);
    Ok(exit_for(&report))
}

pub(super) async fn status(id: &str, server: &Server) -> anyhow::Result<ExitCode> {
    let mut client = match gateway(server).await {
        Ok(channel) => CodeDeliveryClient::new(channel),
        Err(code) => return Ok(code),
    };
    let report = client
        .get_delivery(v1::GetDeliveryRequest {
            delivery_id: id.to_owned(),
        })
        .await?
        .into_inner();
    print_report(&report);
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn verify(
    id: &str,
    verified: bool,
    at: Option<Timestamp>,
    server: &Server,
) -> anyhow::Result<ExitCode> {
    let mut client = match gateway(server).await {
        Ok(channel) => CodeDeliveryClient::new(channel),
        Err(code) => return Ok(code),
    };
    let report = client
        .report_verification(v1::ReportVerificationRequest {
            delivery_id: id.to_owned(),
            verified,
            at: at.map(timestamp_to_proto),
        })
        .await?
        .into_inner();
    print_report(&report);
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn explain(
    file: &std::path::Path,
    at: Option<Timestamp>,
    server: &Server,
) -> anyhow::Result<ExitCode> {
    let body = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let job = match crate::domain::Job::from_json(&body) {
        Ok(job) => job,
        Err(error) => {
            eprintln!(
                "otp-gateway: {} is not a valid job: {error}",
                file.display()
            );
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let mut client = match gateway(server).await {
        Ok(channel) => CodeDeliveryClient::new(channel),
        Err(code) => return Ok(code),
    };
    let request = v1::ExplainRequest {
        job: Some(crate::proto::job_to_proto(&job)),
        at: at.map(timestamp_to_proto),
    };
    let plan = client.explain(request).await?.into_inner();
    let name = channel_name;
    let stages: Vec<String> = plan.stages.iter().map(|c| name(*c)).collect();
    println!("{}  stages: {}", plan.delivery_id, stages.join(" → "));
    if let Some(reason) = reason_from_proto(plan.blocked_reason) {
        println!("  nothing would be sent: {reason}: {}", plan.blocked_detail);
    }
    for target in &plan.targets {
        let verdict = match reason_from_proto(target.reason) {
            Some(reason) => reason.as_str().to_owned(),
            None if target.eligible => "eligible".to_owned(),
            None => "not tried".to_owned(),
        };
        println!(
            "  target {} {}: {verdict}: {}",
            target.index, target.target, target.decision
        );
        for channel in &target.channels {
            let providers: Vec<String> = channel
                .providers
                .iter()
                .map(|p| {
                    let circuit =
                        v1::CircuitState::try_from(p.circuit).map_or("?", |c| c.as_str_name());
                    format!(
                        "{} ({})",
                        p.name,
                        circuit
                            .trim_start_matches("CIRCUIT_STATE_")
                            .to_ascii_lowercase()
                    )
                })
                .collect();
            let mut refused = reason_from_proto(channel.refused_reason)
                .map(|r| format!("  refused: {r}: {}", channel.refused_detail))
                .unwrap_or_default();
            if !channel.fraud_watch.is_empty() {
                refused.push_str(&format!("  fraud guard: {}", channel.fraud_watch));
            }
            println!(
                "    {} via route {}: {}{refused}",
                name(channel.channel),
                channel.route,
                providers.join(", then ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn channel_name(value: i32) -> String {
    v1::Channel::try_from(value).map_or("?".into(), |c| {
        c.as_str_name()
            .trim_start_matches("CHANNEL_")
            .to_ascii_lowercase()
    })
}

pub(super) async fn health(server: &Server) -> anyhow::Result<ExitCode> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let channel = match gateway(server).await {
        Ok(channel) => channel,
        Err(code) => return Ok(code),
    };
    let response = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    let status = ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown);
    println!("{}", status.as_str_name());
    Ok(if status == ServingStatus::Serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_UNAVAILABLE)
    })
}

fn exit_for(report: &DeliveryReport) -> ExitCode {
    match status_from_proto(report.status) {
        Some(crate::domain::DeliveryStatus::Failed) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

fn status_name(value: i32) -> &'static str {
    status_from_proto(value).map_or("UNKNOWN", |s| s.as_str())
}

fn print_report(report: &DeliveryReport) {
    let reason = reason_from_proto(report.reason)
        .map(|r| r.as_str())
        .unwrap_or("");
    println!(
        "{}  {}  {reason}",
        report.delivery_id,
        status_name(report.status)
    );
    if !report.hint.is_empty() {
        println!("  what to do: {}", report.hint);
    }
    if !report.summary.is_empty() {
        println!("  {}", report.summary);
    }
    if let Some(at) = report.verified_at.as_ref().and_then(timestamp_from_proto) {
        println!("  the user entered the code at {at}");
    } else if let Some(at) = report
        .verification_failed_at
        .as_ref()
        .and_then(timestamp_from_proto)
    {
        println!("  the user did not enter the code (reported at {at})");
    }
    for target in &report.targets {
        let status = v1::TargetStatus::try_from(target.status).map_or("?", |s| s.as_str_name());
        let reason = reason_from_proto(target.reason)
            .map(|r| format!(" {r}"))
            .unwrap_or_default();
        println!(
            "  target {} {}: {}{reason}",
            target.index,
            target.target,
            status.trim_start_matches("TARGET_STATUS_")
        );
        for attempt in &target.attempts {
            let outcome =
                v1::AttemptOutcome::try_from(attempt.outcome).map_or("?", |o| o.as_str_name());
            let code = if attempt.provider_code.is_empty() {
                String::new()
            } else {
                format!(" [{}]", attempt.provider_code)
            };
            let sms = match v1::SmsEncoding::try_from(attempt.sms_encoding) {
                Ok(v1::SmsEncoding::Unspecified) | Err(_) => String::new(),
                Ok(encoding) => format!(
                    ", {}, {} segment{}",
                    encoding.as_str_name(),
                    attempt.sms_segments,
                    if attempt.sms_segments == 1 { "" } else { "s" }
                ),
            };
            println!(
                "    via {} ({}{sms}): {}{code} {}",
                attempt.provider,
                v1::Channel::try_from(attempt.channel)
                    .map_or("?", |c| c.as_str_name())
                    .trim_start_matches("CHANNEL_")
                    .to_lowercase(),
                outcome.trim_start_matches("ATTEMPT_OUTCOME_"),
                attempt.provider_message,
            );
        }
    }
}
fn random_code() -> String {
    format!("{:06}", uuid::Uuid::new_v4().as_u128() % 1_000_000)
}
