//! The words of a diagnosis: the fixes a support agent reads out, in order, and the summary.

use jiff::Timestamp;

use super::{FailureSeen, Fix, TargetDiagnosis};
use crate::domain::{Channel, DeliveryStatus, FailureReason, Report, TargetStatus};
use crate::policy::{BlockEntry, BlockSource};

/// "3 Nov 2026".
pub(super) fn day(at: Timestamp) -> String {
    at.strftime("%-d %b %Y").to_string()
}

/// "the last SMS" or "the last 3 SMS", "the last push" or "the last 3 pushes".
fn last_n(n: u32, channel: Channel) -> String {
    let what = match (channel, n) {
        (Channel::Sms, _) => "SMS",
        (Channel::Voice, 1) => "call",
        (Channel::Voice, _) => "calls",
        (Channel::Push, 1) => "push",
        (Channel::Push, _) => "pushes",
    };
    if n <= 1 {
        format!("the last {what}")
    } else {
        format!("the last {n} {what}")
    }
}

/// "twilio 30007", or `None` when no provider said it.
fn provider_words(seen: &FailureSeen) -> Option<String> {
    match (&seen.provider, &seen.provider_code) {
        (Some(provider), Some(code)) => Some(format!("{provider} {code}")),
        (Some(provider), None) => Some(provider.clone()),
        _ => None,
    }
}

/// " (twilio 30007)", or "" when no provider said it.
fn provider_said(seen: &FailureSeen) -> String {
    provider_words(seen)
        .map(|words| format!(" ({words})"))
        .unwrap_or_default()
}

/// How urgent a fix is: lower first.
fn rank(reason: Option<FailureReason>) -> u8 {
    use FailureReason::*;
    match reason {
        Some(UserDenied) => 0,
        None => 1,
        Some(
            RecipientOptedOut
            | RecipientBlocked
            | DeviceUnregistered
            | DeviceTokenInvalid
            | RecipientUnknown
            | InvalidRecipient
            | NotMobileNumber
            | DestinationNotPermitted,
        ) => 2,
        Some(DeviceCannotDisplayCode) => 3,
        Some(CarrierFiltered | RecipientUnreachable | PushNotAcknowledged | Undeliverable) => 4,
        // The account's own gap (no number to fall back on) after what each target needs.
        Some(
            NoEligibleTarget | RateLimited | QuietHours | CodeExpired | InvalidJob
            | DestinationSuspended,
        ) => 5,
        Some(
            ProviderUnavailable
            | ProviderTimeout
            | ProviderThrottled
            | ProviderRejected
            | ProviderMisconfigured,
        ) => 6,
    }
}

pub(super) fn fixes(
    reports: &[Report],
    targets: &[TargetDiagnosis],
    account_blocks: &[BlockEntry],
) -> Vec<Fix> {
    let mut fixes = Vec::new();
    if reports.is_empty() {
        fixes.push(Fix {
            target: None,
            reason: None,
            text: "no delivery of this account is in the ledger: check the tenant and account \
                   id, and whether the sign-in service asked for a code at all (deliveries are \
                   kept for retention.deliveries)"
                .into(),
        });
        return fixes;
    }
    for entry in account_blocks {
        fixes.push(Fix {
            target: None,
            reason: Some(FailureReason::RecipientBlocked),
            text: format!(
                "the account itself is on the block list (entry #{}, {}, since {}{}): remove \
                 the entry if it is wrong",
                entry.id,
                entry.source.as_str().to_ascii_lowercase().replace('_', " "),
                day(entry.created_at),
                note(entry),
            ),
        });
    }
    for target in targets {
        if let Some(fix) = target_fix(target) {
            fixes.push(fix);
        }
    }
    if let Some(fix) = account_gap(targets) {
        fixes.push(fix);
    }
    fixes.sort_by_key(|fix| rank(fix.reason));
    fixes
}

fn note(entry: &BlockEntry) -> String {
    if entry.note.is_empty() {
        String::new()
    } else {
        format!(": {}", entry.note)
    }
}

/// What to do about one number or device, when its last outcome failed or an entry blocks it.
fn target_fix(target: &TargetDiagnosis) -> Option<Fix> {
    use FailureReason::*;
    let name = &target.target;
    let opt_out = target
        .blocks
        .iter()
        .find(|b| b.source == BlockSource::OptOut);
    if let Some(entry) = opt_out {
        return Some(Fix {
            target: Some(name.clone()),
            reason: Some(RecipientOptedOut),
            text: format!(
                "{name} opted out on {} (replied STOP): ask the user to text START to the \
                 sender, or add another number",
                day(entry.created_at)
            ),
        });
    }
    if let Some(entry) = target
        .blocks
        .iter()
        .find(|b| b.source == BlockSource::ProviderFeedback)
    {
        return Some(Fix {
            target: Some(name.clone()),
            reason: Some(DeviceUnregistered),
            text: format!(
                "{name} stopped accepting pushes on {}: remove it from trusted devices",
                day(target.token_invalid_since.unwrap_or(entry.created_at))
            ),
        });
    }
    if let Some(entry) = target
        .blocks
        .iter()
        .find(|b| b.source == BlockSource::Admin)
    {
        return Some(Fix {
            target: Some(name.clone()),
            reason: Some(RecipientBlocked),
            text: format!(
                "{name} is on the block list (entry #{}, added by an operator on {}{}): remove \
                 the entry if it is wrong, or add another {}",
                entry.id,
                day(entry.created_at),
                note(entry),
                if target.platform.is_some() {
                    "device"
                } else {
                    "number"
                }
            ),
        });
    }
    if target.last_status != TargetStatus::Failed {
        return None;
    }
    let reason = target.last_reason?;
    let seen = target.failures.iter().find(|f| f.reason == reason)?;
    let n = target.failures_in_a_row;
    let when = day(seen.last_at);
    let text = match reason {
        RecipientOptedOut => format!(
            "{name} opted out on {when} (replied STOP){}: ask the user to text START to the \
             sender, or add another number",
            provider_said(seen)
        ),
        DeviceUnregistered => format!(
            "{name} stopped accepting pushes on {}: remove it from trusted devices",
            day(target.token_invalid_since.unwrap_or(seen.last_at))
        ),
        DeviceTokenInvalid => format!(
            "{name}'s push token was refused as invalid on {when}{}: have the user sign in to \
             the app on it again (if every device fails so, check the app's push settings)",
            provider_said(seen)
        ),
        RecipientUnknown | InvalidRecipient => format!(
            "{name} is not a number the carrier knows{}, since {when}: check it with the user \
             and correct the trusted number",
            provider_said(seen)
        ),
        NotMobileNumber => format!(
            "{name} cannot receive text messages (a landline?){}: switch this account to voice \
             for it, or add a mobile number",
            provider_said(seen)
        ),
        DestinationNotPermitted => format!(
            "{name} is in a country this tenant may not send to: enable the country for the \
             tenant, or add a number in an enabled one"
        ),
        DestinationSuspended => match target.fraud_holds.first() {
            Some(hold) => format!(
                "{name}'s number {} {} is held by the fraud guard (a surge of codes nobody \
                 entered: SMS pumping suspected) since {}, {}: use push or another number \
                 meanwhile; if the traffic is genuine, an operator can lift the hold \
                 (`otp-gateway fraud lift {} {}`)",
                hold.scope(),
                hold.range,
                hold.since,
                hold.until.map_or_else(
                    || "until lifted".to_owned(),
                    |until| format!("until {until}")
                ),
                hold.tenant,
                hold.range,
            ),
            None => format!(
                "{name}'s number range was held by the fraud guard on {when} (SMS pumping \
                 suspected); the hold has ended since: the next code should go"
            ),
        },
        CarrierFiltered => format!(
            "{} to {name} were filtered by the carrier{}: switch this account to voice",
            last_n(n, seen.channel),
            provider_said(seen)
        ),
        RecipientUnreachable => format!(
            "{} to {name} found the phone off or out of coverage{}: ask the user to check \
             their signal, or add another number",
            last_n(n, seen.channel),
            provider_said(seen)
        ),
        Undeliverable => format!(
            "{} to {name} could not be delivered{}: try another number or channel",
            last_n(n, seen.channel),
            provider_said(seen)
        ),
        PushNotAcknowledged => format!(
            "{name} did not show {} (offline, or notifications off): ask the user to open the \
             app while online and allow notifications, or add a trusted number",
            if n <= 1 {
                "the last code pushed to it".to_owned()
            } else {
                format!("the last {n} codes pushed to it")
            }
        ),
        DeviceCannotDisplayCode => format!(
            "{name} cannot display codes (push codes are not activated on it): use another \
             device, or add a trusted number"
        ),
        UserDenied => format!(
            "the user tapped \"Don't Allow\" on {name} on {when}: someone else may have tried \
             to sign in; confirm with the user before sending another code, and secure the \
             account if it was not them"
        ),
        RateLimited => format!(
            "codes to {name} hit a rate limit on {when}: wait before asking for another, or \
             raise the limit if the traffic is genuine"
        ),
        QuietHours => format!(
            "{name} was in its quiet hours on {when}: the code goes out when they end, or use \
             another number"
        ),
        CodeExpired => format!(
            "the code for {name} expired before it could be sent on {when}: ask the user to \
             request a new one"
        ),
        RecipientBlocked => format!(
            "{name} was blocked by an entry no longer in force on {when}: ask for a new code"
        ),
        NoEligibleTarget | InvalidJob => format!("{name}: {}", reason.hint()),
        ProviderUnavailable
        | ProviderTimeout
        | ProviderThrottled
        | ProviderRejected
        | ProviderMisconfigured => format!(
            "{} to {name} failed at the provider ({}{}), not because of the account: nothing \
             for the user to change; see the provider's status",
            last_n(n, seen.channel),
            reason.as_str(),
            provider_words(seen)
                .map(|words| format!(", {words}"))
                .unwrap_or_default()
        ),
    };
    Some(Fix {
        target: Some(name.clone()),
        reason: Some(reason),
        text,
    })
}

/// What the account lacks as a whole: no number to fall back on, or no way at all.
fn account_gap(targets: &[TargetDiagnosis]) -> Option<Fix> {
    let numbers: Vec<&TargetDiagnosis> = targets.iter().filter(|t| t.platform.is_none()).collect();
    let devices: Vec<&TargetDiagnosis> = targets.iter().filter(|t| t.platform.is_some()).collect();
    let failing = |t: &&TargetDiagnosis| t.last_status == TargetStatus::Failed;
    if !numbers.is_empty() || devices.is_empty() || !devices.iter().all(failing) {
        return None;
    }
    let text = if devices.len() == 1
        && devices[0].last_reason == Some(FailureReason::DeviceCannotDisplayCode)
    {
        "no number on file, and the only device cannot display codes: add a trusted number".into()
    } else {
        "no number on file, and no device took the last code: add a trusted number so codes can \
         fall back to SMS or voice"
            .into()
    };
    Some(Fix {
        target: None,
        reason: Some(FailureReason::NoEligibleTarget),
        text,
    })
}

/// "5 deliveries since 1 Dec 2026: 2 delivered, 1 sent, 2 failed; the last FAILED
/// (RECIPIENT_OPTED_OUT) on 4 Dec 2026".
pub(super) fn summary(reports: &[Report]) -> String {
    let Some(last) = reports.first() else {
        return "No delivery of this account is in the ledger.".into();
    };
    let count = |status: DeliveryStatus| reports.iter().filter(|r| r.status == status).count();
    let oldest = reports.last().map_or(last.created_at, |r| r.created_at);
    let reason = last
        .reason
        .map(|r| format!(" ({})", r.as_str()))
        .unwrap_or_default();
    format!(
        "{} deliver{} since {}: {} delivered, {} sent, {} failed; the last {}{reason} on {}.",
        reports.len(),
        if reports.len() == 1 { "y" } else { "ies" },
        day(oldest),
        count(DeliveryStatus::Delivered),
        count(DeliveryStatus::Sent),
        count(DeliveryStatus::Failed),
        last.status.as_str(),
        day(last.updated_at),
    )
}
