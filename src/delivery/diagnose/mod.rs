//! Account diagnosis: why an account's codes do not arrive, from its recent deliveries and the
//! block entries in force, per trusted number and device, with an ordered list of fixes a
//! support agent can read out. [`diagnose`] decides without I/O; [`DeliveryService::diagnose`]
//! reads what it needs.

use std::collections::BTreeMap;

use jiff::Timestamp;

use super::service::DeliveryService;
use crate::domain::{
    AttemptOutcome, Channel, DeliveryStatus, FailureReason, Platform, Report, TargetResult,
    TargetStatus,
};
use crate::policy::{BlockEntry, BlockKind, Quarantine};
use crate::store::{ListQuery, StoreError};

mod fixes;

use fixes::{fixes, summary};

/// The most deliveries a diagnosis reads (newest first).
pub const DIAGNOSIS_DELIVERIES: u32 = 200;

/// Everything a support agent needs about one account.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnosis {
    /// The tenant.
    pub tenant: String,
    /// The account.
    pub account: String,
    /// How many deliveries were read (the newest, at most [`DIAGNOSIS_DELIVERIES`]).
    pub examined: usize,
    /// When the oldest of them was made.
    pub since: Option<Timestamp>,
    /// The newest delivery: its id, status and when it last changed.
    pub last_delivery: Option<(String, DeliveryStatus, Timestamp)>,
    /// Each trusted number and device seen, in the order of the newest delivery's targets.
    pub targets: Vec<TargetDiagnosis>,
    /// Block entries on the account itself.
    pub account_blocks: Vec<BlockEntry>,
    /// What to do, most pressing first.
    pub fixes: Vec<Fix>,
    /// One sentence on the account's deliveries.
    pub summary: String,
}

/// One trusted number or device.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetDiagnosis {
    /// The masked number, or the device id.
    pub target: String,
    /// The push platform of a device; `None` for a number.
    pub platform: Option<Platform>,
    /// Its last outcome (SENT, DELIVERED or FAILED) and when.
    pub last_status: TargetStatus,
    /// Why, when the last outcome was a failure.
    pub last_reason: Option<FailureReason>,
    /// When the last outcome happened.
    pub last_at: Timestamp,
    /// How many of its newest outcomes were failures, up to its last success.
    pub failures_in_a_row: u32,
    /// Its last success (SENT or DELIVERED), if any was read.
    pub last_success: Option<Timestamp>,
    /// Its failures, by reason and provider code, most recent first.
    pub failures: Vec<FailureSeen>,
    /// Block entries in force on it.
    pub blocks: Vec<BlockEntry>,
    /// Since when a push service has called its token dead.
    pub token_invalid_since: Option<Timestamp>,
    /// The fraud guard's holds in force on its number's range (named by a refused send).
    pub fraud_holds: Vec<Quarantine>,
}

/// Failures of one kind on one target.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureSeen {
    /// Why.
    pub reason: FailureReason,
    /// The channel.
    pub channel: Channel,
    /// The provider that said so, when one did.
    pub provider: Option<String>,
    /// Its own code.
    pub provider_code: Option<String>,
    /// How often, among the deliveries read.
    pub count: u32,
    /// The last time.
    pub last_at: Timestamp,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Fix {
    /// The number or device it is about; `None` for the account.
    pub target: Option<String>,
    /// The failure it answers, when one.
    pub reason: Option<FailureReason>,
    /// What to say and do, in one sentence.
    pub text: String,
}

impl DeliveryService {
    /// The diagnosis of `account` of `tenant` from its newest deliveries and the tenant's
    /// block entries in force.
    pub async fn diagnose(&self, tenant: &str, account: &str) -> Result<Diagnosis, StoreError> {
        let mut reports = Vec::new();
        let mut before = None;
        while reports.len() < DIAGNOSIS_DELIVERIES as usize {
            let page = self
                .ledger()
                .list(&ListQuery {
                    tenant: tenant.to_owned(),
                    account: Some(account.to_owned()),
                    status: None,
                    limit: 100,
                    before,
                })
                .await?;
            reports.extend(page.reports);
            match page.next {
                Some(next) => before = Some(next),
                None => break,
            }
        }
        reports.truncate(DIAGNOSIS_DELIVERIES as usize);
        let blocks = self.dispatcher.policy.list_blocks(Some(tenant)).await?;
        let now = self.clock.now();
        let holds: Vec<Quarantine> = self
            .dispatcher
            .fraud
            .holds_of(tenant, now)
            .into_values()
            .collect();
        Ok(diagnose(tenant, account, &reports, &blocks, &holds, now))
    }
}

/// The diagnosis of `account` from `reports` (its deliveries, newest first), `blocks` (the
/// tenant's and global block entries) and `holds` (the fraud guard's holds in force on the
/// tenant's ranges) at `now`.
pub fn diagnose(
    tenant: &str,
    account: &str,
    reports: &[Report],
    blocks: &[BlockEntry],
    holds: &[Quarantine],
    now: Timestamp,
) -> Diagnosis {
    let in_force: Vec<&BlockEntry> = blocks
        .iter()
        .filter(|entry| entry.applies(tenant, now))
        .collect();
    let mut targets: Vec<TargetDiagnosis> = Vec::new();
    // Per target: whether a success already ended its run of failures.
    let mut run_ended: BTreeMap<String, bool> = BTreeMap::new();
    for report in reports {
        for result in &report.targets {
            let Some(at) = outcome_at(result, report) else {
                continue;
            };
            let index = match targets.iter().position(|t| t.target == result.target) {
                Some(index) => index,
                None => {
                    targets.push(TargetDiagnosis {
                        target: result.target.clone(),
                        platform: result.platform,
                        last_status: result.status,
                        last_reason: result.reason,
                        last_at: at,
                        failures_in_a_row: 0,
                        last_success: None,
                        failures: Vec::new(),
                        blocks: Vec::new(),
                        token_invalid_since: None,
                        fraud_holds: Vec::new(),
                    });
                    targets.len() - 1
                }
            };
            let target = &mut targets[index];
            let ended = run_ended.entry(result.target.clone()).or_default();
            if result.status == TargetStatus::Failed {
                if !*ended {
                    target.failures_in_a_row += 1;
                }
                if let Some(reason) = result.reason {
                    count_failure(target, result, reason, at);
                }
            } else {
                *ended = true;
                target.last_success.get_or_insert(at);
            }
            for attempt in &result.attempts {
                if let Some(since) = attempt.token_invalid_since {
                    target.token_invalid_since.get_or_insert(since);
                }
            }
            for entry in &in_force {
                let matches = match entry.kind {
                    BlockKind::Number => result.platform.is_none() && entry.shown == result.target,
                    BlockKind::DeviceToken => result
                        .attempts
                        .iter()
                        .any(|a| a.channel == Channel::Push && a.target == entry.shown),
                    BlockKind::Prefix | BlockKind::Account => false,
                } || result
                    .detail
                    .as_deref()
                    .is_some_and(|d| mentions_entry(d, entry.id));
                if matches && !target.blocks.iter().any(|b| b.id == entry.id) {
                    target.blocks.push((*entry).clone());
                }
            }
            for hold in holds {
                let named = result
                    .detail
                    .as_deref()
                    .is_some_and(|d| mentions(d, &format!("{} {}", hold.scope(), hold.range)));
                if named && !target.fraud_holds.iter().any(|h| h.range == hold.range) {
                    target.fraud_holds.push(hold.clone());
                }
            }
        }
    }
    let account_blocks: Vec<BlockEntry> = in_force
        .iter()
        .filter(|e| e.kind == BlockKind::Account && e.pattern == account)
        .map(|e| (*e).clone())
        .collect();
    let fixes = fixes(reports, &targets, &account_blocks);
    Diagnosis {
        tenant: tenant.to_owned(),
        account: account.to_owned(),
        examined: reports.len(),
        since: reports.last().map(|r| r.created_at),
        last_delivery: reports
            .first()
            .map(|r| (r.delivery_id.clone(), r.status, r.updated_at)),
        summary: summary(reports),
        targets,
        account_blocks,
        fixes,
    }
}

/// When a target's outcome happened, if it had one (SKIPPED and PENDING targets say nothing
/// about the number or device).
fn outcome_at(result: &TargetResult, report: &Report) -> Option<Timestamp> {
    if !matches!(
        result.status,
        TargetStatus::Sent | TargetStatus::Delivered | TargetStatus::Failed
    ) {
        return None;
    }
    Some(
        result
            .attempts
            .iter()
            .filter_map(|a| a.ended_at.or(Some(a.started_at)))
            .max()
            .unwrap_or(report.updated_at),
    )
}

fn count_failure(
    target: &mut TargetDiagnosis,
    result: &TargetResult,
    reason: FailureReason,
    at: Timestamp,
) {
    let attempt = result
        .attempts
        .iter()
        .rev()
        .find(|a| a.outcome == AttemptOutcome::Failed && a.reason == Some(reason));
    let provider = attempt.map(|a| a.provider.clone());
    let provider_code = attempt.and_then(|a| a.provider_code.clone());
    match target
        .failures
        .iter_mut()
        .find(|f| f.reason == reason && f.provider_code == provider_code)
    {
        // Reports come newest first: the first seen is the last one.
        Some(seen) => seen.count += 1,
        None => target.failures.push(FailureSeen {
            reason,
            channel: result.channel,
            provider,
            provider_code,
            count: 1,
            last_at: at,
        }),
    }
}

/// Whether a target's detail names block-list entry `id` ("block-list entry #12 (…)").
fn mentions_entry(detail: &str, id: i64) -> bool {
    mentions(detail, &format!("entry #{id}"))
}

/// Whether `detail` holds `wanted` not followed by a digit (entry #1 is not entry #12, range
/// +4477 not +44770).
fn mentions(detail: &str, wanted: &str) -> bool {
    detail.match_indices(wanted).any(|(at, _)| {
        !detail[at + wanted.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Attempt;
    use crate::policy::BlockSource;

    const HOUR: i64 = 3600;

    fn at(seconds: i64) -> Timestamp {
        // 1 Dec 2026, 00:00 UTC, plus `seconds`.
        Timestamp::from_second(1_796_083_200 + seconds).unwrap()
    }

    /// A target's outcome: its status, reason, the provider's code, at `when`.
    struct Outcome {
        target: &'static str,
        platform: Option<Platform>,
        channel: Channel,
        status: TargetStatus,
        reason: Option<FailureReason>,
        code: Option<&'static str>,
        detail: Option<String>,
    }

    fn number(
        target: &'static str,
        status: TargetStatus,
        reason: Option<FailureReason>,
    ) -> Outcome {
        Outcome {
            target,
            platform: None,
            channel: Channel::Sms,
            status,
            reason,
            code: None,
            detail: None,
        }
    }

    fn device(
        target: &'static str,
        status: TargetStatus,
        reason: Option<FailureReason>,
    ) -> Outcome {
        Outcome {
            platform: Some(Platform::Apns),
            channel: Channel::Push,
            ..number(target, status, reason)
        }
    }

    fn coded(mut outcome: Outcome, code: &'static str) -> Outcome {
        outcome.code = Some(code);
        outcome
    }

    /// A delivery `n` hours in, with its targets' outcomes.
    fn delivery(n: i64, outcomes: Vec<Outcome>) -> Report {
        let when = at(n * HOUR);
        let targets: Vec<TargetResult> = outcomes
            .into_iter()
            .enumerate()
            .map(|(index, o)| {
                let called = o.code.is_some()
                    || o.status != TargetStatus::Failed
                    || matches!(
                        o.reason,
                        Some(FailureReason::PushNotAcknowledged | FailureReason::UserDenied)
                    );
                let attempts = if called {
                    vec![Attempt {
                        provider: if o.channel == Channel::Push {
                            "apns"
                        } else {
                            "twilio"
                        }
                        .into(),
                        channel: o.channel,
                        target: if o.platform.is_some() {
                            "a1b2•••c3d4".into()
                        } else {
                            o.target.into()
                        },
                        started_at: when,
                        ended_at: Some(when),
                        outcome: match o.status {
                            TargetStatus::Failed if o.code.is_some() => AttemptOutcome::Failed,
                            TargetStatus::Delivered => AttemptOutcome::Delivered,
                            _ => AttemptOutcome::Sent,
                        },
                        reason: o.code.and(o.reason),
                        provider_code: o.code.map(str::to_owned),
                        provider_message: None,
                        retry: 0,
                        provider_message_id: None,
                        next_retry_at: None,
                        sms: None,
                        token_invalid_since: None,
                    }]
                } else {
                    Vec::new()
                };
                TargetResult {
                    index: index as u32,
                    channel: o.channel,
                    target: o.target.into(),
                    platform: o.platform,
                    status: o.status,
                    reason: o.reason,
                    hint: None,
                    detail: o.detail,
                    acknowledgement: None,
                    attempts,
                }
            })
            .collect();
        let failed = targets.iter().all(|t| t.status == TargetStatus::Failed);
        Report {
            verification: None,
            delivery_id: format!("acme/j{n}"),
            tenant: "acme".into(),
            job_id: format!("j{n}"),
            account: "user-42".into(),
            purpose: "sign_in".into(),
            status: if failed {
                DeliveryStatus::Failed
            } else if targets.iter().any(|t| t.status == TargetStatus::Delivered) {
                DeliveryStatus::Delivered
            } else {
                DeliveryStatus::Sent
            },
            reason: if failed { targets[0].reason } else { None },
            hint: None,
            summary: String::new(),
            created_at: when,
            updated_at: when,
            expires_at: when,
            targets,
        }
    }

    fn entry(id: i64, kind: BlockKind, shown: &str, source: BlockSource, hours: i64) -> BlockEntry {
        BlockEntry {
            id,
            tenant: Some("acme".into()),
            kind,
            pattern: if kind == BlockKind::Account {
                shown.into()
            } else {
                "hmac:00".into()
            },
            shown: shown.into(),
            source,
            note: String::new(),
            created_at: at(hours * HOUR),
            expires_at: None,
        }
    }

    /// Newest first, as the ledger lists them.
    fn run(mut reports: Vec<Report>, blocks: &[BlockEntry]) -> Diagnosis {
        reports.reverse();
        diagnose("acme", "user-42", &reports, blocks, &[], at(1000 * HOUR))
    }

    fn texts(diagnosis: &Diagnosis) -> Vec<&str> {
        diagnosis.fixes.iter().map(|f| f.text.as_str()).collect()
    }

    use FailureReason::*;
    use TargetStatus::{Delivered, Failed, Sent};

    #[test]
    fn an_opted_out_number_is_named_with_the_day_of_its_opt_out() {
        let reports = vec![
            delivery(0, vec![number("+1415•••0101", Delivered, None)]),
            delivery(
                50,
                vec![coded(
                    number("+1415•••0101", Failed, Some(RecipientOptedOut)),
                    "21610",
                )],
            ),
            delivery(
                60,
                vec![number("+1415•••0101", Failed, Some(RecipientOptedOut))],
            ),
        ];
        let blocks = [entry(
            7,
            BlockKind::Number,
            "+1415•••0101",
            BlockSource::OptOut,
            50,
        )];
        let diagnosis = run(reports, &blocks);
        let target = &diagnosis.targets[0];
        assert_eq!(target.failures_in_a_row, 2);
        assert_eq!(target.last_success, Some(at(0)));
        assert_eq!(target.blocks.len(), 1);
        assert_eq!(
            texts(&diagnosis),
            [
                "+1415•••0101 opted out on 3 Dec 2026 (replied STOP): ask the user to text START to the sender, or add another number"
            ]
        );
        assert!(diagnosis.summary.starts_with("3 deliveries since 1 Dec 2026: 1 delivered, 0 sent, 2 failed; the last FAILED (RECIPIENT_OPTED_OUT)"), "{}", diagnosis.summary);
    }

    #[test]
    fn a_dead_token_says_to_remove_the_device() {
        let mut dead = delivery(
            30,
            vec![
                coded(device("ipad-1", Failed, Some(DeviceUnregistered)), "410"),
                number("+1415•••0101", Sent, None),
            ],
        );
        dead.targets[0].attempts[0].token_invalid_since = Some(at(20 * HOUR));
        let diagnosis = run(
            vec![delivery(0, vec![device("ipad-1", Delivered, None)]), dead],
            &[],
        );
        assert_eq!(
            texts(&diagnosis),
            ["ipad-1 stopped accepting pushes on 1 Dec 2026: remove it from trusted devices"]
        );
        assert_eq!(
            diagnosis.targets[0].token_invalid_since,
            Some(at(20 * HOUR))
        );
        assert_eq!(diagnosis.targets[1].last_status, Sent);
    }

    #[test]
    fn sms_the_carrier_keeps_filtering_suggest_voice() {
        let filtered = || coded(number("+44•••1234", Failed, Some(CarrierFiltered)), "30007");
        let diagnosis = run(
            vec![
                delivery(0, vec![number("+44•••1234", Sent, None)]),
                delivery(1, vec![filtered()]),
                delivery(2, vec![filtered()]),
                delivery(3, vec![filtered()]),
            ],
            &[],
        );
        assert_eq!(diagnosis.targets[0].failures_in_a_row, 3);
        assert_eq!(diagnosis.targets[0].failures[0].count, 3);
        assert_eq!(
            texts(&diagnosis),
            [
                "the last 3 SMS to +44•••1234 were filtered by the carrier (twilio 30007): switch this account to voice"
            ]
        );
    }

    #[test]
    fn no_number_and_a_device_that_cannot_display_codes() {
        let diagnosis = run(
            vec![delivery(
                1,
                vec![device("watch-1", Failed, Some(DeviceCannotDisplayCode))],
            )],
            &[],
        );
        assert_eq!(
            texts(&diagnosis),
            [
                "watch-1 cannot display codes (push codes are not activated on it): use another device, or add a trusted number",
                "no number on file, and the only device cannot display codes: add a trusted number",
            ]
        );
    }

    #[test]
    fn an_offline_device_without_a_number_to_fall_back_on() {
        let unseen = || device("pixel-7", Failed, Some(PushNotAcknowledged));
        let diagnosis = run(
            vec![delivery(1, vec![unseen()]), delivery(2, vec![unseen()])],
            &[],
        );
        assert_eq!(
            texts(&diagnosis),
            [
                "pixel-7 did not show the last 2 codes pushed to it (offline, or notifications off): ask the user to open the app while online and allow notifications, or add a trusted number",
                "no number on file, and no device took the last code: add a trusted number so codes can fall back to SMS or voice",
            ]
        );
    }

    #[test]
    fn a_wrong_number_and_a_landline() {
        let diagnosis = run(
            vec![delivery(
                1,
                vec![
                    coded(
                        number("+1415•••0199", Failed, Some(RecipientUnknown)),
                        "30005",
                    ),
                    coded(
                        number("+1500•••0009", Failed, Some(NotMobileNumber)),
                        "21614",
                    ),
                ],
            )],
            &[],
        );
        assert_eq!(
            texts(&diagnosis),
            [
                "+1415•••0199 is not a number the carrier knows (twilio 30005), since 1 Dec 2026: check it with the user and correct the trusted number",
                "+1500•••0009 cannot receive text messages (a landline?) (twilio 21614): switch this account to voice for it, or add a mobile number",
            ]
        );
    }

    #[test]
    fn a_provider_outage_is_not_the_account_s_fault_and_comes_last() {
        let diagnosis = run(
            vec![delivery(
                1,
                vec![
                    coded(
                        number("+1415•••0101", Failed, Some(ProviderUnavailable)),
                        "503",
                    ),
                    number("+1415•••0102", Failed, Some(RecipientBlocked)),
                ],
            )],
            &[{
                let mut admin = entry(12, BlockKind::Number, "+1415•••0102", BlockSource::Admin, 0);
                admin.note = "fraud report".into();
                admin
            }],
        );
        assert_eq!(
            texts(&diagnosis),
            [
                "+1415•••0102 is on the block list (entry #12, added by an operator on 1 Dec 2026: fraud report): remove the entry if it is wrong, or add another number",
                "the last SMS to +1415•••0101 failed at the provider (PROVIDER_UNAVAILABLE, twilio 503), not because of the account: nothing for the user to change; see the provider's status",
            ]
        );
    }

    #[test]
    fn don_t_allow_comes_first() {
        let diagnosis = run(
            vec![delivery(
                1,
                vec![
                    number("+1415•••0101", Failed, Some(RecipientUnreachable)),
                    device("ipad-1", Failed, Some(UserDenied)),
                ],
            )],
            &[],
        );
        assert_eq!(diagnosis.fixes[0].reason, Some(UserDenied));
        assert_eq!(
            diagnosis.fixes[0].text,
            "the user tapped \"Don't Allow\" on ipad-1 on 1 Dec 2026: someone else may have tried to sign in; confirm with the user before sending another code, and secure the account if it was not them"
        );
    }

    #[test]
    fn a_prefix_entry_named_in_a_detail_and_an_account_entry_are_found() {
        let mut blocked = number("+8821•••5678", Failed, Some(RecipientBlocked));
        blocked.detail = Some("block-list entry #3 (prefix +882, admin, since …)".into());
        let diagnosis = run(
            vec![delivery(1, vec![blocked])],
            &[
                entry(3, BlockKind::Prefix, "+882", BlockSource::Admin, 0),
                entry(31, BlockKind::Prefix, "+883", BlockSource::Admin, 0),
                entry(4, BlockKind::Account, "user-42", BlockSource::Admin, 0),
            ],
        );
        let ids: Vec<i64> = diagnosis.targets[0].blocks.iter().map(|b| b.id).collect();
        assert_eq!(ids, [3], "#31 is another entry");
        assert_eq!(diagnosis.account_blocks.len(), 1);
        assert!(
            texts(&diagnosis)[0].starts_with("the account itself is on the block list (entry #4")
        );
    }

    #[test]
    fn a_healthy_account_needs_nothing_and_an_unknown_one_says_so() {
        let diagnosis = run(
            vec![delivery(1, vec![device("ipad-1", Delivered, None)])],
            &[],
        );
        assert!(diagnosis.fixes.is_empty(), "{:?}", diagnosis.fixes);
        let nothing = run(Vec::new(), &[]);
        assert_eq!(nothing.examined, 0);
        assert!(
            nothing.fixes[0]
                .text
                .starts_with("no delivery of this account")
        );
    }
}
