//! The rules every store backend keeps, written against [`Ledger`] and [`PolicyStore`]: a
//! backend runs the whole suite with one line, `store_contract!(open)`, where `open` makes a
//! fresh, empty store ([`Subject`]). The engine relies on each of these rules.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;

use super::{
    AttemptEnd, AttemptStart, Claim, KnownReport, Ledger, ListQuery, NewDelivery, NewTarget,
    PolicyStore, TargetUpdate,
};
use crate::domain::{
    Acknowledgement, AttemptOutcome, Channel, DeliveryId, DeliveryStatus, Platform, Report,
    SmsEncoding, SmsShape, TargetStatus, Verification,
};
use crate::policy::{
    BlockKind, BlockSource, DestinationCount, NewBlockEntry, QuietAction, QuietHoursRule, RateKey,
    RateLimitRule, RateScope,
};

/// A fresh, empty store under test, and what keeps it alive (a temporary directory, a
/// database dropped afterwards).
pub(crate) struct Subject {
    /// The ledger.
    pub(crate) ledger: Arc<dyn Ledger>,
    /// The policy store (without a rules cache: the backend's own).
    pub(crate) policy: Arc<dyn PolicyStore>,
    /// Dropped at the end of the test.
    pub(crate) _keep: Box<dyn std::any::Any + Send>,
}

/// The contract suite for a backend: `open` is an `async fn() -> Option<Subject>` making a
/// fresh store (`None`: the backend's server is not there and the run may skip it).
macro_rules! store_contract {
    ($open:ident) => {
        mod contract {
            use crate::store::contract as c;

            #[tokio::test]
            async fn claims_are_exclusive_and_finished_deliveries_stay_finished() {
                let Some(s) = super::$open().await else {
                    return;
                };
                c::claims_are_exclusive_and_finished_deliveries_stay_finished(&*s.ledger).await;
            }

            #[tokio::test]
            async fn accepted_deliveries_are_claimed_once_and_lists_page_newest_first() {
                let Some(s) = super::$open().await else {
                    return;
                };
                c::accepted_deliveries_are_claimed_once_and_lists_page_newest_first(&*s.ledger)
                    .await;
            }

            #[tokio::test]
            async fn a_known_report_is_exact_until_another_writer_changes_the_delivery() {
                let Some(s) = super::$open().await else {
                    return;
                };
                c::a_known_report_is_exact_until_another_writer_changes_the_delivery(&*s.ledger)
                    .await;
            }

            #[tokio::test]
            async fn rules_are_stored_listed_by_tenant_and_removed() {
                let Some(s) = super::$open().await else {
                    return;
                };
                c::rules_are_stored_listed_by_tenant_and_removed(&*s.policy).await;
            }

            #[tokio::test]
            async fn a_limit_counts_sends_atomically_and_refuses_past_it() {
                let Some(s) = super::$open().await else {
                    return;
                };
                c::a_limit_counts_sends_atomically_and_refuses_past_it(&*s.policy).await;
            }

            #[tokio::test]
            async fn block_entries_are_kept_once_and_found_for_a_job() {
                let Some(s) = super::$open().await else {
                    return;
                };
                c::block_entries_are_kept_once_and_found_for_a_job(&*s.policy).await;
            }

            #[tokio::test]
            async fn old_deliveries_are_purged_and_an_account_erased_but_its_opt_outs() {
                let Some(s) = super::$open().await else {
                    return;
                };
                c::old_deliveries_are_purged_and_an_account_erased_but_its_opt_outs(
                    &*s.ledger, &*s.policy,
                )
                .await;
            }

            #[tokio::test]
            async fn a_receipt_is_matched_only_to_an_attempt_that_awaits_one() {
                let Some(s) = super::$open().await else {
                    return;
                };
                c::a_receipt_is_matched_only_to_an_attempt_that_awaits_one(&*s.ledger).await;
            }

            #[tokio::test]
            async fn a_verified_delivery_stays_verified_and_a_failure_can_be_replaced() {
                let Some(s) = super::$open().await else {
                    return;
                };
                c::a_verified_delivery_stays_verified_and_a_failure_can_be_replaced(&*s.ledger)
                    .await;
            }

            #[tokio::test]
            async fn destination_counts_add_up_and_are_read_by_prefix_tenant_and_time() {
                let Some(s) = super::$open().await else {
                    return;
                };
                c::destination_counts_add_up_and_are_read_by_prefix_tenant_and_time(
                    &*s.ledger, &*s.policy,
                )
                .await;
            }

            #[tokio::test]
            async fn recent_counts_feed_the_guard_and_a_range_is_held_once_pinned_and_lifted() {
                let Some(s) = super::$open().await else {
                    return;
                };
                c::recent_counts_feed_the_guard_and_a_range_is_held_once_pinned_and_lifted(
                    &*s.ledger, &*s.policy,
                )
                .await;
            }

            #[tokio::test]
            async fn api_keys_are_kept_as_hashes_listed_by_tenant_and_revoked_once() {
                let Some(s) = super::$open().await else {
                    return;
                };
                c::api_keys_are_kept_as_hashes_listed_by_tenant_and_revoked_once(&*s.policy).await;
            }
        }
    };
}
pub(crate) use store_contract;

/// `new` claimed by `worker` at `now` as a new delivery: its key and the engine's copy.
pub(crate) async fn started(
    ledger: &dyn Ledger,
    new: &NewDelivery,
    worker: &str,
    now: Timestamp,
) -> (super::DeliveryKey, KnownReport) {
    match ledger.claim(new, worker, false, now).await.unwrap() {
        Claim::Started(key, known) => (key, known),
        other => panic!("a new delivery starts: {other:?}"),
    }
}

/// The outcome of a delivery whose call was sent: SENT, with no reason or summary.
pub(crate) fn sent_outcome(_: &Report) -> super::Outcome {
    super::Outcome {
        status: DeliveryStatus::Sent,
        reason: None,
        summary: String::new(),
    }
}

pub(crate) fn new_delivery(job_id: &str) -> NewDelivery {
    NewDelivery {
        id: DeliveryId {
            tenant: "acme".into(),
            job_id: job_id.into(),
        },
        account: "user-42".into(),
        purpose: "sign_in".into(),
        expires_at: Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(1),
        targets: vec![
            NewTarget {
                channel: Channel::Push,
                label: "ipad-1".into(),
                platform: Some(Platform::Apns),
            },
            NewTarget {
                channel: Channel::Sms,
                label: "+1415•••0101".into(),
                platform: None,
            },
        ],
    }
}

pub(crate) async fn claims_are_exclusive_and_finished_deliveries_stay_finished(
    ledger: &dyn Ledger,
) {
    let now = Timestamp::UNIX_EPOCH;
    let new = new_delivery("j1");

    let Claim::Started(key, KnownReport { report, .. }) =
        ledger.claim(&new, "w1", false, now).await.unwrap()
    else {
        panic!("first claim starts");
    };
    assert_eq!(report.status, DeliveryStatus::InProgress);
    assert_eq!(report.targets.len(), 2);
    assert!(matches!(
        ledger.claim(&new, "w2", false, now).await.unwrap(),
        Claim::HeldElsewhere(_)
    ));

    let attempt = ledger
        .start_attempt(
            key,
            &AttemptStart {
                target: 1,
                provider: "sandbox".into(),
                channel: Channel::Sms,
                masked_target: "+1415•••0101".into(),
                started_at: now,
                retry: 0,
                sms: Some(SmsShape {
                    encoding: SmsEncoding::Ucs2,
                    segments: 2,
                }),
                range: Some("+1415".into()),
            },
        )
        .await
        .unwrap();
    // The worker dies here; the broker redelivers to w2, which takes over (once w1's lease,
    // in a store replicas share, has run out).
    let later = now + jiff::SignedDuration::from_hours(1);
    let Claim::Resumed(_, KnownReport { report, .. }) =
        ledger.claim(&new, "w2", true, later).await.unwrap()
    else {
        panic!("takeover resumes");
    };
    let interrupted = &report.targets[1].attempts[0];
    assert_eq!(interrupted.outcome, AttemptOutcome::Interrupted);
    assert_eq!(interrupted.reason, None, "not a timeout: nobody knows");
    assert_eq!(
        interrupted.provider_message.as_deref(),
        Some(crate::store::INTERRUPTED)
    );
    ledger
        .finish_attempt(
            key,
            attempt,
            &AttemptEnd {
                ended_at: now,
                outcome: AttemptOutcome::Sent,
                reason: None,
                provider_code: None,
                provider_message: None,
                provider_message_id: Some("m1".into()),
                awaits_receipt: true,
                next_retry_at: None,
                token_invalid_since: None,
            },
            1,
            &TargetUpdate {
                channel: Channel::Sms,
                status: TargetStatus::Sent,
                reason: None,
                detail: None,
            },
        )
        .await
        .unwrap();
    let sent = |report: &Report| crate::store::Outcome {
        status: DeliveryStatus::Sent,
        reason: None,
        summary: format!("done with {} targets", report.targets.len()),
    };
    let finished = ledger.finish(key, now, Arc::new(sent), None).await.unwrap();
    assert_eq!(finished.targets[1].status, TargetStatus::Sent);
    assert!(
        matches!(ledger.claim(&new, "w3", true, now).await.unwrap(), Claim::Finished(r) if r.summary == "done with 2 targets")
    );
}

pub(crate) async fn accepted_deliveries_are_claimed_once_and_lists_page_newest_first(
    ledger: &dyn Ledger,
) {
    let now = Timestamp::UNIX_EPOCH;
    for i in 0..5 {
        let (_, created) = ledger
            .accept(&new_delivery(&format!("j{i}")), now)
            .await
            .unwrap();
        assert!(created);
    }
    let (report, created) = ledger.accept(&new_delivery("j0"), now).await.unwrap();
    assert!(!created);
    assert_eq!(report.status, DeliveryStatus::Accepted);
    assert!(matches!(
        ledger
            .claim(&new_delivery("j0"), "w", false, now)
            .await
            .unwrap(),
        Claim::Started(..)
    ));

    let mut query = ListQuery {
        tenant: "acme".into(),
        account: None,
        status: None,
        limit: 2,
        before: None,
    };
    let page = ledger.list(&query).await.unwrap();
    assert_eq!(
        page.reports
            .iter()
            .map(|r| r.job_id.as_str())
            .collect::<Vec<_>>(),
        ["j4", "j3"]
    );
    query.before = page.next;
    query.limit = 10;
    let page = ledger.list(&query).await.unwrap();
    assert_eq!(page.reports.len(), 3);
    assert!(page.next.is_none());
    query.before = None;
    query.status = Some(DeliveryStatus::InProgress);
    assert_eq!(ledger.list(&query).await.unwrap().reports[0].job_id, "j0");

    ledger
        .forget_accepted(&new_delivery("j1").id)
        .await
        .unwrap();
    assert!(ledger.get(&new_delivery("j1").id).await.unwrap().is_none());
    ledger
        .forget_accepted(&new_delivery("j0").id)
        .await
        .unwrap();
    assert!(
        ledger.get(&new_delivery("j0").id).await.unwrap().is_some(),
        "only ACCEPTED ones go"
    );
}

/// A receipt finds the newest attempt that awaits one under its provider and message id, once:
/// not an attempt whose provider reports no fate (the same message id from a provider without
/// receipts), and not one a receipt has already decided.
pub(crate) async fn a_receipt_is_matched_only_to_an_attempt_that_awaits_one(ledger: &dyn Ledger) {
    let now = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(1);
    let delivered = AttemptEnd {
        outcome: AttemptOutcome::Delivered,
        ..sent_end(now, "m1")
    };
    // Two deliveries whose calls the provider accepted as the same message id: one awaits a
    // receipt, the newer one does not.
    let mut keys = Vec::new();
    for (job, awaits) in [("awaits", true), ("no-receipts", false)] {
        let (key, _) = started(ledger, &new_delivery(job), "w", now).await;
        let end = AttemptEnd {
            awaits_receipt: awaits,
            ..sent_end(now, "m1")
        };
        recorded_call(ledger, key, &end).await;
        keys.push(key);
    }
    let matched = ledger
        .apply_receipt("sandbox", "m1", &delivered)
        .await
        .unwrap()
        .expect("the attempt awaiting a receipt is found");
    assert_eq!(matched.0, keys[0]);
    assert_eq!(matched.1.job_id, "awaits");
    let report = ledger.get(&matched.1).await.unwrap().unwrap();
    assert_eq!(
        report.targets[1].attempts[0].outcome,
        AttemptOutcome::Delivered
    );
    assert!(
        ledger
            .apply_receipt("sandbox", "m1", &delivered)
            .await
            .unwrap()
            .is_none(),
        "a decided attempt and one awaiting no receipt are never matched"
    );
    let other = ledger
        .get(&new_delivery("no-receipts").id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(other.targets[1].attempts[0].outcome, AttemptOutcome::Sent);
    assert_eq!(
        other.targets[1].attempts[0].provider_message_id.as_deref(),
        Some("m1"),
        "the message id is kept for support either way"
    );
}

pub(crate) async fn a_verified_delivery_stays_verified_and_a_failure_can_be_replaced(
    ledger: &dyn Ledger,
) {
    let now = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(1);
    let at = |minutes: i64| now + jiff::SignedDuration::from_mins(minutes);
    let new = new_delivery("verified");
    let (key, _) = started(ledger, &new, "w", now).await;
    let id = new.id.clone();
    let report = async |ledger: &dyn Ledger| ledger.get(&id).await.unwrap().unwrap();
    assert_eq!(report(ledger).await.verification, None);
    let failed = Verification {
        verified: false,
        at: at(1),
    };
    assert!(
        ledger
            .record_verification(key, failed, at(1))
            .await
            .unwrap()
    );
    assert_eq!(report(ledger).await.verification, Some(failed));
    let verified = Verification {
        verified: true,
        at: at(2),
    };
    assert!(
        ledger
            .record_verification(key, verified, at(2))
            .await
            .unwrap()
    );
    let shown = report(ledger).await;
    assert_eq!(shown.verification, Some(verified));
    assert_eq!(shown.updated_at, at(2));
    for later in [true, false] {
        let again = Verification {
            verified: later,
            at: at(3),
        };
        assert!(
            !ledger.record_verification(key, again, at(3)).await.unwrap(),
            "a verified delivery stays verified at its first verification's time"
        );
    }
    assert_eq!(report(ledger).await.verification, Some(verified));
}

pub(crate) async fn destination_counts_add_up_and_are_read_by_prefix_tenant_and_time(
    ledger: &dyn Ledger,
    policy: &dyn PolicyStore,
) {
    let hour = |h: i64| Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(h);
    let count =
        |tenant: &str, range: &str, h: i64, sends: u64, conversions: u64| DestinationCount {
            tenant: tenant.into(),
            range: range.into(),
            bucket: hour(h),
            sends,
            conversions,
        };
    policy
        .add_destination_counts(&[
            count("acme", "+44770", 10, 5, 4),
            count("acme", "+44771", 10, 2, 0),
            count("acme", "+1415", 10, 3, 3),
            count("other", "+44770", 10, 9, 9),
            count("acme", "+44770", 8, 1, 1),
        ])
        .await
        .unwrap();
    // A second replica's (or second's) sums add to the first's.
    policy
        .add_destination_counts(&[count("acme", "+44770", 10, 2, 1)])
        .await
        .unwrap();
    let since = hour(9) + jiff::SignedDuration::from_mins(30);
    let uk = policy
        .destination_counts("acme", "+44", since)
        .await
        .unwrap();
    assert_eq!(
        uk,
        [
            count("acme", "+44770", 10, 7, 5),
            count("acme", "+44771", 10, 2, 0)
        ],
        "the country's ranges of this tenant, from the hour holding `since`"
    );
    let range = policy
        .destination_counts("acme", "+44770", hour(0))
        .await
        .unwrap();
    assert_eq!(
        range,
        [
            count("acme", "+44770", 8, 1, 1),
            count("acme", "+44770", 10, 7, 5)
        ]
    );
    // The retention purge takes the counts older than the deliveries it deletes.
    ledger.purge(since, 100).await.unwrap();
    let kept = policy
        .destination_counts("acme", "+44770", hour(0))
        .await
        .unwrap();
    assert_eq!(kept, [count("acme", "+44770", 10, 7, 5)]);
    // An SMS accepted and one refused: only the accepted one's range is the delivery's.
    let now = hour(20);
    let (key, _) = started(ledger, &new_delivery("ranges"), "w", now).await;
    recorded_call(ledger, key, &sent_end(now, "m-ranges")).await;
    let failed = AttemptEnd {
        outcome: AttemptOutcome::Failed,
        reason: Some(crate::domain::FailureReason::ProviderUnavailable),
        ..sent_end(now, "m-refused")
    };
    recorded_call(ledger, key, &failed).await;
    assert_eq!(
        ledger.sent_ranges(key).await.unwrap(),
        [("+1415".to_owned(), now)]
    );
}

pub(crate) async fn recent_counts_feed_the_guard_and_a_range_is_held_once_pinned_and_lifted(
    ledger: &dyn Ledger,
    policy: &dyn PolicyStore,
) {
    use crate::policy::{Evidence, GuardMode, Quarantine, QuarantineState};
    let at = |secs: i64| Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_secs(secs);
    let count = |range: &str, secs: i64, sends: u64, conversions: u64| DestinationCount {
        tenant: "acme".into(),
        range: range.into(),
        bucket: at(secs),
        sends,
        conversions,
    };
    let hour = 3600;
    // Two 10-second buckets of one hour, and a range of another tenant.
    policy
        .add_destination_counts(&[
            count("+44770", 10 * hour + 5, 3, 0),
            count("+44770", 10 * hour + 12, 4, 1),
            count("+44771", 10 * hour + 12, 1, 0),
            DestinationCount {
                tenant: "other".into(),
                ..count("+44770", 10 * hour + 5, 9, 0)
            },
        ])
        .await
        .unwrap();
    let recent = policy
        .recent_destination_counts("acme", &["+44770".to_owned()], at(10 * hour))
        .await
        .unwrap();
    assert_eq!(
        recent,
        [
            count("+44770", 10 * hour, 3, 0),
            count("+44770", 10 * hour + 10, 4, 1)
        ],
        "10-second buckets of the named ranges of this tenant"
    );
    let country = policy
        .recent_destination_counts("acme", &["+44".to_owned()], at(10 * hour))
        .await
        .unwrap();
    assert_eq!(
        country.len(),
        3,
        "a country's ranges by its calling code: {country:?}"
    );
    // The same sends count in their hour.
    let hourly = policy
        .destination_counts("acme", "+44770", at(0))
        .await
        .unwrap();
    assert_eq!(hourly, [count("+44770", 10 * hour, 7, 1)]);
    assert!(policy.tenant_converts("acme", at(9 * hour)).await.unwrap());
    assert!(!policy.tenant_converts("other", at(0)).await.unwrap());
    assert!(!policy.tenant_converts("acme", at(11 * hour)).await.unwrap());
    assert_eq!(
        policy
            .prune_recent_counts(at(10 * hour + 10))
            .await
            .unwrap(),
        2
    );
    let recent = policy
        .recent_destination_counts("acme", &["+44770".to_owned(), "+44771".to_owned()], at(0))
        .await
        .unwrap();
    assert_eq!(recent.len(), 2, "{recent:?}");

    // Held by the guard: once, whichever replica asks first.
    let now = at(20 * hour);
    let evidence = Evidence {
        window_sends: 80,
        window_secs: 600,
        hourly_rate: 480.0,
        baseline_hourly: 4.0,
        judged_sends: 20,
        judged_conversions: 0,
    };
    let held = Quarantine::suspected(
        "acme",
        "+44770",
        GuardMode::Enforce,
        evidence.clone(),
        now,
        jiff::SignedDuration::from_hours(1),
    );
    assert!(policy.hold_range(&held).await.unwrap());
    let later = Quarantine {
        since: now + jiff::SignedDuration::from_mins(5),
        ..held.clone()
    };
    assert!(!policy.hold_range(&later).await.unwrap(), "already held");
    let listed = policy.quarantines(Some("acme")).await.unwrap();
    assert_eq!(listed, std::slice::from_ref(&held), "the evidence is kept");
    // Lifted: the guard leaves it alone until `until`; lifting again finds nothing held.
    let lift_at = now + jiff::SignedDuration::from_mins(10);
    let until = lift_at + jiff::SignedDuration::from_hours(1);
    let lifted = policy
        .lift_range("acme", "+44770", "lifted by ops", lift_at, until)
        .await
        .unwrap()
        .expect("it was held");
    assert_eq!(lifted.state, QuarantineState::Lifted);
    assert_eq!(lifted.until, Some(until));
    assert!(!lifted.in_force(lift_at) && lifted.settled(lift_at));
    assert!(
        policy
            .lift_range("acme", "+44770", "again", lift_at, until)
            .await
            .unwrap()
            .is_none()
    );
    assert!(!policy.hold_range(&later).await.unwrap(), "lifted lately");
    let after = Quarantine {
        since: until,
        until: Some(until + jiff::SignedDuration::from_hours(1)),
        ..held.clone()
    };
    assert!(
        policy.hold_range(&after).await.unwrap(),
        "held again once the lift ran out"
    );
    // Pinned: held until lifted, keeping when the hold began and the guard's evidence.
    let pinned = policy
        .pin_range(
            "acme",
            "+44770",
            "pinned by ops",
            until + jiff::SignedDuration::from_mins(1),
        )
        .await
        .unwrap();
    assert!(pinned.pinned() && pinned.since == until && pinned.evidence == Some(evidence));
    let fresh = policy
        .pin_range("other", "+1415", "pinned", now)
        .await
        .unwrap();
    assert!(fresh.pinned() && fresh.evidence.is_none() && fresh.since == now);
    assert_eq!(policy.quarantines(None).await.unwrap().len(), 2);
    // The retention purge takes holds that ended before its cut, never a pin.
    ledger.purge(at(100 * hour), 100).await.unwrap();
    assert_eq!(policy.quarantines(None).await.unwrap().len(), 2);
    policy
        .lift_range(
            "other",
            "+1415",
            "done",
            now,
            now + jiff::SignedDuration::from_secs(1),
        )
        .await
        .unwrap()
        .unwrap();
    ledger.purge(at(100 * hour), 100).await.unwrap();
    let kept = policy.quarantines(None).await.unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].tenant, "acme");
}

/// An SMS call to target `target` starting at `at`, as the engine records it.
pub(crate) fn sms_start(target: u32, at: Timestamp) -> AttemptStart {
    AttemptStart {
        target,
        provider: "sandbox".into(),
        channel: Channel::Sms,
        masked_target: "+1415•••0101".into(),
        started_at: at,
        retry: 0,
        sms: None,
        range: Some("+1415".into()),
    }
}

/// An SMS call to target 1 of delivery `key` started and ended with `end` (its target updated
/// after it), as the engine records one; the attempt's key.
pub(crate) async fn recorded_call(
    ledger: &dyn Ledger,
    key: super::DeliveryKey,
    end: &AttemptEnd,
) -> super::AttemptKey {
    let attempt = ledger
        .start_attempt(key, &sms_start(1, end.ended_at))
        .await
        .unwrap();
    let update = TargetUpdate::after(Channel::Sms, end);
    ledger
        .finish_attempt(key, attempt, end, 1, &update)
        .await
        .unwrap();
    attempt
}

/// A call's end as the engine records it.
pub(crate) fn sent_end(now: Timestamp, message_id: &str) -> AttemptEnd {
    AttemptEnd {
        ended_at: now,
        outcome: AttemptOutcome::Sent,
        reason: None,
        provider_code: None,
        provider_message: None,
        provider_message_id: Some(message_id.into()),
        awaits_receipt: true,
        next_retry_at: None,
        token_invalid_since: None,
    }
}

/// The revision rule the engine's own copy of a report relies on: starting an attempt leaves
/// the revision as it is, ending one (with its target) and updating a target raise it by one
/// each; `finish` with a report known at the current revision takes it as exact, and once
/// anything else wrote (an acknowledgement) it reads the delivery afresh. A known report may
/// carry the engine's last call's end unwritten: `finish` writes it in either case.
pub(crate) async fn a_known_report_is_exact_until_another_writer_changes_the_delivery(
    ledger: &dyn Ledger,
) {
    let now = Timestamp::UNIX_EPOCH;
    let start = |target: u32| sms_start(target, now);
    let sent = TargetUpdate {
        channel: Channel::Sms,
        status: TargetStatus::Sent,
        reason: None,
        detail: None,
    };
    let summary = |report: &Report| crate::store::Outcome {
        status: DeliveryStatus::Sent,
        reason: None,
        summary: format!("detail {:?}", report.targets[0].detail),
    };

    // Only the engine writes: its copy, at its counted revision, is used as it is.
    let (key, mut known) = started(ledger, &new_delivery("rev-1"), "w1", now).await;
    let attempt = ledger.start_attempt(key, &start(1)).await.unwrap();
    ledger
        .finish_attempt(key, attempt, &sent_end(now, "m1"), 1, &sent)
        .await
        .unwrap();
    let skipped = TargetUpdate {
        channel: Channel::Push,
        status: TargetStatus::Skipped,
        reason: None,
        detail: Some("in the ledger".into()),
    };
    ledger.update_target(key, 0, &skipped, now).await.unwrap();
    known.revision += 2;
    known.report.targets[0].detail = Some("the engine's copy".into());
    let finished = ledger
        .finish(key, now, Arc::new(summary), Some(known))
        .await
        .unwrap();
    assert_eq!(
        finished.summary, "detail Some(\"the engine's copy\")",
        "at its revision, the engine's copy is taken as exact"
    );

    // An acknowledgement recorded meanwhile raises the revision: the ledger is read again.
    let (key, mut known) = started(ledger, &new_delivery("rev-2"), "w1", now).await;
    ledger.update_target(key, 0, &skipped, now).await.unwrap();
    ledger
        .record_ack(key, 0, Acknowledgement::Denied, now)
        .await
        .unwrap();
    known.revision += 1;
    known.report.targets[0].detail = Some("the engine's copy".into());
    let finished = ledger
        .finish(key, now, Arc::new(summary), Some(known))
        .await
        .unwrap();
    assert_eq!(finished.summary, "detail Some(\"in the ledger\")");
    assert_eq!(
        finished.targets[0].acknowledgement,
        Some(Acknowledgement::Denied),
        "what another writer recorded is in the final report"
    );

    // The engine's last call's end left unwritten: `finish` writes it with the outcome.
    let pending = |attempt, id: &str| crate::store::PendingEnd {
        attempt,
        end: sent_end(now, id),
        target: 1,
        update: sent.clone(),
    };
    let (key, mut known) = started(ledger, &new_delivery("rev-3"), "w1", now).await;
    let attempt = ledger.start_attempt(key, &start(1)).await.unwrap();
    known.revision += 1;
    known.pending_end = Some(pending(attempt, "m3"));
    known.report.targets[0].detail = Some("the engine's copy".into());
    let finished = ledger
        .finish(key, now, Arc::new(summary), Some(known))
        .await
        .unwrap();
    assert_eq!(finished.summary, "detail Some(\"the engine's copy\")");
    let stored = ledger.report(key).await.unwrap();
    assert_eq!(stored.status, DeliveryStatus::Sent);
    assert_eq!(stored.targets[1].status, TargetStatus::Sent);
    let ended = &stored.targets[1].attempts[0];
    assert_eq!(ended.outcome, crate::domain::AttemptOutcome::Sent);
    assert_eq!(ended.provider_message_id.as_deref(), Some("m3"));
    assert!(ended.ended_at.is_some(), "the call's end is in the ledger");

    // ... and when another writer came between, the end still lands and the ledger decides.
    let (key, mut known) = started(ledger, &new_delivery("rev-4"), "w1", now).await;
    let attempt = ledger.start_attempt(key, &start(1)).await.unwrap();
    ledger.update_target(key, 0, &skipped, now).await.unwrap();
    known.revision += 1;
    known.pending_end = Some(pending(attempt, "m4"));
    known.report.targets[0].detail = Some("the engine's copy".into());
    let finished = ledger
        .finish(key, now, Arc::new(summary), Some(known))
        .await
        .unwrap();
    assert_eq!(finished.summary, "detail Some(\"in the ledger\")");
    assert_eq!(finished.targets[1].status, TargetStatus::Sent);
    let ended = &finished.targets[1].attempts[0];
    assert_eq!(ended.outcome, crate::domain::AttemptOutcome::Sent);
    assert_eq!(ended.provider_message_id.as_deref(), Some("m4"));
}

fn rate_rule(tenant: Option<&str>, scope: RateScope, limit: u32) -> RateLimitRule {
    RateLimitRule {
        id: 0,
        tenant: tenant.map(str::to_owned),
        scope,
        prefix: String::new(),
        limit,
        window: Duration::from_secs(60),
    }
}

/// Rate limits and quiet-hours rules: stored with an id, listed for a tenant with the global
/// ones, replaced by id, removed once.
pub(crate) async fn rules_are_stored_listed_by_tenant_and_removed(policy: &dyn PolicyStore) {
    assert!(
        policy
            .list_rate_limits(Some("acme"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        policy
            .list_quiet_hours(Some("acme"))
            .await
            .unwrap()
            .is_empty()
    );
    let acme = policy
        .set_rate_limit(&rate_rule(Some("acme"), RateScope::Account, 3))
        .await
        .unwrap();
    let other = policy
        .set_rate_limit(&rate_rule(Some("globex"), RateScope::Account, 5))
        .await
        .unwrap();
    assert!(acme.id > 0 && other.id != acme.id);
    assert_eq!(
        policy.list_rate_limits(Some("acme")).await.unwrap(),
        std::slice::from_ref(&acme)
    );
    // The same (tenant, scope, prefix) again replaces the limit.
    let replaced = policy
        .set_rate_limit(&rate_rule(Some("acme"), RateScope::Account, 7))
        .await
        .unwrap();
    assert_eq!(
        policy.list_rate_limits(Some("acme")).await.unwrap(),
        std::slice::from_ref(&replaced)
    );
    assert_eq!(policy.list_rate_limits(None).await.unwrap().len(), 2);

    let quiet = QuietHoursRule {
        id: 0,
        tenant: None,
        account: None,
        channels: vec![Channel::Sms],
        start: jiff::civil::time(22, 0, 0, 0),
        end: jiff::civil::time(7, 0, 0, 0),
        days: Vec::new(),
        action: QuietAction::Defer,
        default_zone: "Europe/Berlin".into(),
    };
    let quiet = policy.set_quiet_hours(&quiet).await.unwrap();
    assert_eq!(
        policy.list_quiet_hours(Some("acme")).await.unwrap(),
        std::slice::from_ref(&quiet),
        "a global rule applies to every tenant"
    );
    let missing = QuietHoursRule {
        id: quiet.id + 1000,
        ..quiet.clone()
    };
    assert!(matches!(
        policy.set_quiet_hours(&missing).await,
        Err(crate::store::StoreError::NotFound(_))
    ));

    assert!(policy.remove_rate_limit(replaced.id).await.unwrap());
    assert!(!policy.remove_rate_limit(replaced.id).await.unwrap());
    assert!(policy.remove_quiet_hours(quiet.id).await.unwrap());
    assert!(
        policy
            .list_rate_limits(Some("acme"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        policy
            .list_quiet_hours(Some("acme"))
            .await
            .unwrap()
            .is_empty()
    );
}

/// A limit of 3 takes exactly 3 of 10 concurrent sends; a refused send counts nothing under any
/// key; `peek` counts nothing at all.
pub(crate) async fn a_limit_counts_sends_atomically_and_refuses_past_it(policy: &dyn PolicyStore) {
    let now = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(1);
    let tight = policy
        .set_rate_limit(&rate_rule(Some("acme"), RateScope::Recipient, 3))
        .await
        .unwrap();
    let loose = policy
        .set_rate_limit(&rate_rule(Some("acme"), RateScope::Account, 100))
        .await
        .unwrap();
    let keys = [
        RateKey {
            rule: &loose,
            key: "user-42".into(),
        },
        RateKey {
            rule: &tight,
            key: "+14155550101".into(),
        },
    ];
    assert!(policy.peek(&keys, now).await.unwrap().is_none());
    let results = futures_util::future::join_all((0..10).map(|_| policy.consume(&keys, now))).await;
    let taken = results
        .iter()
        .filter(|r| r.as_ref().unwrap().is_none())
        .count();
    assert_eq!(taken, 3, "exactly the limit's sends go through");
    let limited = policy
        .peek(&keys, now)
        .await
        .unwrap()
        .expect("at its limit");
    assert_eq!(limited.rule.id, tight.id);
    assert!(limited.allowed_at > now);
    // The account counter holds only the 3 sends that went through: 97 more fit.
    let account_only = [RateKey {
        rule: &loose,
        key: "user-42".into(),
    }];
    for _ in 0..97 {
        assert!(policy.consume(&account_only, now).await.unwrap().is_none());
    }
    assert!(policy.consume(&account_only, now).await.unwrap().is_some());
}

/// An entry with the same tenant, kind and pattern is kept once; a job's candidates are the
/// entries in force naming its patterns, its tenant's and the global ones.
pub(crate) async fn block_entries_are_kept_once_and_found_for_a_job(policy: &dyn PolicyStore) {
    let now = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(1);
    let entry = |tenant: Option<&str>, pattern: &str, expires_at| NewBlockEntry {
        tenant: tenant.map(str::to_owned),
        kind: BlockKind::Number,
        pattern: pattern.into(),
        source: BlockSource::Admin,
        note: "test".into(),
        expires_at,
    };
    let (first, new) = policy
        .add_block(&entry(Some("acme"), "+14155550101", None), now)
        .await
        .unwrap();
    assert!(new);
    let (again, new) = policy
        .add_block(&entry(Some("acme"), "+14155550101", None), now)
        .await
        .unwrap();
    assert!(!new);
    assert_eq!(again.id, first.id);
    let (global, _) = policy
        .add_block(&entry(None, "+14155550102", None), now)
        .await
        .unwrap();
    policy
        .add_block(&entry(Some("globex"), "+14155550103", None), now)
        .await
        .unwrap();
    let expired = now - jiff::SignedDuration::from_secs(1);
    policy
        .add_block(&entry(Some("acme"), "+14155550104", Some(expired)), now)
        .await
        .unwrap();

    let patterns = [
        "user-42",
        "+14155550101",
        "+14155550102",
        "+14155550103",
        "+14155550104",
    ];
    let mut found: Vec<i64> = policy
        .block_candidates("acme", &patterns, now)
        .await
        .unwrap()
        .iter()
        .map(|b| b.id)
        .collect();
    found.sort_unstable();
    assert_eq!(found, [first.id, global.id]);
    assert_eq!(policy.list_blocks(Some("acme")).await.unwrap().len(), 3);

    // Numbers and tokens are kept as keyed hashes and listed masked; a job's own number or
    // token finds its entry, which carries it back in clear to be matched.
    let (token, _) = policy
        .add_block(
            &NewBlockEntry {
                kind: BlockKind::DeviceToken,
                pattern: "f00dfeedcafe0123456789abcdef".into(),
                ..entry(Some("acme"), "", None)
            },
            now,
        )
        .await
        .unwrap();
    assert_eq!(first.shown, "+1415•••0101");
    assert!(!token.shown.contains("cafe0123"), "{}", token.shown);
    for listed in policy.list_blocks(None).await.unwrap() {
        assert!(
            !listed.pattern.contains("41555501") && !listed.pattern.contains("cafe0123"),
            "{listed:?}"
        );
        assert!(!listed.shown.contains("41555501"), "{listed:?}");
    }
    let found = policy
        .block_candidates(
            "acme",
            &["user-42", "+14155550101", "f00dfeedcafe0123456789abcdef"],
            now,
        )
        .await
        .unwrap();
    let mut patterns: Vec<&str> = found.iter().map(|b| b.pattern.as_str()).collect();
    patterns.sort_unstable();
    assert_eq!(
        patterns,
        ["+14155550101", "f00dfeedcafe0123456789abcdef"],
        "found by their hashes, given back in clear"
    );
    assert!(policy.remove_block(first.id).await.unwrap());
    assert!(!policy.remove_block(first.id).await.unwrap());
}

/// A key reads back as it was stored (its secret only as a hash that opens it); a tenant's
/// listing holds its keys only; a key is revoked once.
pub(crate) async fn api_keys_are_kept_as_hashes_listed_by_tenant_and_revoked_once(
    policy: &dyn PolicyStore,
) {
    use crate::domain::{ApiKey, KeyText, Scope};
    let now = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(1);
    let key = |tenant: Option<&str>, scopes: &[Scope]| {
        let text = KeyText::generate();
        let key = ApiKey {
            id: text.id.clone(),
            tenant: tenant.map(str::to_owned),
            scopes: scopes.to_vec(),
            label: "backend".into(),
            secret_hash: text.secret_hash(),
            created_at: now,
            revoked_at: None,
        };
        (text, key)
    };
    let (acme_text, acme) = key(Some("acme"), &[Scope::Send, Scope::Read]);
    let (_, globex) = key(Some("globex"), &[Scope::Ack]);
    let (_, global) = key(None, &[Scope::Admin, Scope::Status]);
    for stored in [&acme, &globex, &global] {
        policy.create_api_key(stored).await.unwrap();
    }
    let found = policy.api_key(&acme.id).await.unwrap().unwrap();
    assert_eq!(found, acme);
    assert!(found.opens_with(&acme_text.secret));
    assert!(policy.api_key("000000000000").await.unwrap().is_none());
    let listed = policy.list_api_keys(Some("acme")).await.unwrap();
    assert_eq!(listed, vec![acme.clone()], "a tenant's keys only");
    assert_eq!(policy.list_api_keys(None).await.unwrap().len(), 3);
    assert_eq!(
        policy.api_key(&global.id).await.unwrap().unwrap().tenant,
        None
    );
    let later = now + jiff::SignedDuration::from_mins(5);
    assert!(policy.revoke_api_key(&acme.id, later).await.unwrap());
    assert!(!policy.revoke_api_key(&acme.id, later).await.unwrap());
    assert!(!policy.revoke_api_key("000000000000", later).await.unwrap());
    let revoked = policy.api_key(&acme.id).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(later));
}

/// The purge deletes deliveries made before the cut-off, a batch at a time; erasing an account
/// deletes its deliveries and account entries, but its opt-outs.
pub(crate) async fn old_deliveries_are_purged_and_an_account_erased_but_its_opt_outs(
    ledger: &dyn Ledger,
    policy: &dyn PolicyStore,
) {
    let early = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(1);
    let late = early + jiff::SignedDuration::from_hours(24 * 40);
    let made = |job_id: &str, account: &str| {
        let mut new = new_delivery(job_id);
        new.account = account.into();
        new
    };
    for n in 0..3 {
        ledger
            .accept(&made(&format!("old-{n}"), "user-old"), early)
            .await
            .unwrap();
    }
    ledger.accept(&made("new", "user-new"), late).await.unwrap();
    let cut_off = late - jiff::SignedDuration::from_hours(24 * 30);
    assert_eq!(
        ledger.purge(cut_off, 2).await.unwrap(),
        2,
        "a batch at a time"
    );
    assert_eq!(ledger.purge(cut_off, 2).await.unwrap(), 1);
    assert_eq!(ledger.purge(cut_off, 2).await.unwrap(), 0);
    let id = |job_id: &str| DeliveryId {
        tenant: "acme".into(),
        job_id: job_id.into(),
    };
    assert!(ledger.get(&id("old-0")).await.unwrap().is_none());
    assert!(ledger.get(&id("new")).await.unwrap().is_some());

    ledger
        .accept(&made("other", "user-other"), late)
        .await
        .unwrap();
    let block = |account: &str, source| NewBlockEntry {
        tenant: Some("acme".into()),
        kind: BlockKind::Account,
        pattern: account.into(),
        source,
        note: String::new(),
        expires_at: None,
    };
    policy
        .add_block(&block("user-new", BlockSource::Admin), late)
        .await
        .unwrap();
    policy
        .add_block(&block("user-other", BlockSource::OptOut), late)
        .await
        .unwrap();
    assert_eq!(ledger.erase_account("acme", "user-new").await.unwrap(), 1);
    assert_eq!(
        policy
            .erase_account_blocks("acme", "user-new")
            .await
            .unwrap(),
        (1, 0)
    );
    assert!(ledger.get(&id("new")).await.unwrap().is_none());
    assert!(ledger.get(&id("other")).await.unwrap().is_some());
    // An opt-out stays (the law may require it).
    assert_eq!(
        policy
            .erase_account_blocks("acme", "user-other")
            .await
            .unwrap(),
        (0, 1)
    );
    // Hashed: still blocking the account, which it no longer names in clear.
    let kept = policy.list_blocks(Some("acme")).await.unwrap();
    assert!(
        kept.iter()
            .all(|b| b.pattern != "user-other" && b.shown == "(erased account)"),
        "{kept:?}"
    );
    let found = policy
        .block_candidates("acme", &["user-other"], late)
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].pattern, "user-other");
    assert_eq!(found[0].source, BlockSource::OptOut);
    // Erased again: the one opt-out is still kept, once.
    assert_eq!(
        policy
            .erase_account_blocks("acme", "user-other")
            .await
            .unwrap(),
        (0, 1)
    );
    assert_eq!(
        ledger.erase_account("globex", "user-other").await.unwrap(),
        0
    );
}
