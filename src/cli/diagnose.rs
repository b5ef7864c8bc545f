//! `diagnose`: why an account's codes fail, printed for a support agent: the fixes to read out
//! first, then each trusted number and device.

use std::process::ExitCode;

use super::connection::{Server, gateway};
use super::deliveries::channel_name;
use crate::proto::v1::code_delivery_client::CodeDeliveryClient;
use crate::proto::v1::{self, AccountDiagnosis, TargetDiagnosis};
use crate::proto::{reason_from_proto, timestamp_from_proto};

pub(super) async fn diagnose(
    tenant: &str,
    account: &str,
    server: &Server,
) -> anyhow::Result<ExitCode> {
    let mut client = match gateway(server).await {
        Ok(channel) => CodeDeliveryClient::new(channel),
        Err(code) => return Ok(code),
    };
    let diagnosis = client
        .diagnose_account(v1::DiagnoseAccountRequest {
            tenant: tenant.to_owned(),
            account: account.to_owned(),
        })
        .await?
        .into_inner();
    print!("{}", render(&diagnosis));
    Ok(ExitCode::SUCCESS)
}

/// An instant as RFC 3339 to the second, or "?".
fn when(at: Option<&prost_types::Timestamp>) -> String {
    at.and_then(timestamp_from_proto).map_or("?".into(), |at| {
        at.strftime("%Y-%m-%d %H:%M UTC").to_string()
    })
}

fn reason_name(value: i32) -> &'static str {
    reason_from_proto(value).map_or("", |r| r.as_str())
}

/// The diagnosis as text.
fn render(diagnosis: &AccountDiagnosis) -> String {
    let mut out = format!(
        "{} / {}: {}\n",
        diagnosis.tenant, diagnosis.account, diagnosis.summary
    );
    if diagnosis.fixes.is_empty() {
        out.push_str("\nNothing to fix: the newest delivery reached the user.\n");
    } else {
        out.push_str("\nWhat to do:\n");
        for (n, fix) in diagnosis.fixes.iter().enumerate() {
            out.push_str(&format!("  {}. {}\n", n + 1, fix.text));
        }
    }
    for entry in &diagnosis.account_blocks {
        out.push_str(&format!(
            "\nThe account is blocked: entry #{} since {}{}\n",
            entry.id,
            when(entry.created_at.as_ref()),
            if entry.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", entry.note)
            }
        ));
    }
    if !diagnosis.targets.is_empty() {
        out.push_str("\nNumbers and devices:\n");
        for target in &diagnosis.targets {
            out.push_str(&target_lines(target));
        }
    }
    out
}

fn target_lines(target: &TargetDiagnosis) -> String {
    let platform = v1::Platform::try_from(target.platform)
        .ok()
        .filter(|p| *p != v1::Platform::Unspecified)
        .map(|p| {
            format!(
                " ({})",
                p.as_str_name()
                    .trim_start_matches("PLATFORM_")
                    .to_ascii_lowercase()
            )
        })
        .unwrap_or_default();
    let status = v1::TargetStatus::try_from(target.last_status)
        .map_or("?", |s| s.as_str_name())
        .trim_start_matches("TARGET_STATUS_");
    let reason = reason_name(target.last_reason);
    let mut out = format!(
        "  {}{platform}: last {status}{}{} on {}",
        target.target,
        if reason.is_empty() { "" } else { " " },
        reason,
        when(target.last_at.as_ref())
    );
    if target.failures_in_a_row > 0 {
        out.push_str(&format!(", {} failed in a row", target.failures_in_a_row));
    }
    out.push_str(&match &target.last_success_at {
        Some(at) => format!(", last success {}\n", when(Some(at))),
        None => ", no success read\n".into(),
    });
    for seen in &target.failures {
        let said = match (seen.provider.as_str(), seen.provider_code.as_str()) {
            ("", _) => String::new(),
            (provider, "") => format!(" ({provider})"),
            (provider, code) => format!(" ({provider} {code})"),
        };
        out.push_str(&format!(
            "    {} × {} by {}{said}, last {}\n",
            seen.count,
            reason_name(seen.reason),
            channel_name(seen.channel),
            when(seen.last_at.as_ref())
        ));
    }
    for entry in &target.blocks {
        let source = v1::BlockSource::try_from(entry.source)
            .map_or("?", |s| s.as_str_name())
            .trim_start_matches("BLOCK_SOURCE_")
            .to_ascii_lowercase()
            .replace('_', " ");
        out.push_str(&format!(
            "    blocked by entry #{} ({source}) since {}\n",
            entry.id,
            when(entry.created_at.as_ref())
        ));
    }
    if let Some(since) = &target.token_invalid_since {
        out.push_str(&format!(
            "    push token dead since {}\n",
            when(Some(since))
        ));
    }
    out
}
