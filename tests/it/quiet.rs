//! Quiet hours through the real queue with a controllable clock: a deferred job is held in the
//! broker, survives a restart and resumes by itself when the window ends; a waiting user gets
//! through ALLOW_USER_INITIATED; SUPPRESS fails with the local end of the window.

use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use otp_gateway::domain::Clock;
use otp_gateway::proto::v1;
use serde_json::json;

use crate::helpers::*;

/// The system clock moved by a fixed offset.
#[derive(Debug)]
struct OffsetClock(SignedDuration);

impl Clock for OffsetClock {
    fn now(&self) -> Timestamp {
        Timestamp::now() + self.0
    }
}

/// A clock whose local time in Berlin is `hh:mm:ss` today.
fn berlin_clock(hour: i8, minute: i8, second: i8) -> Arc<OffsetClock> {
    let zone = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
    let today = Timestamp::now().to_zoned(zone.clone()).date();
    let target = today
        .at(hour, minute, second, 0)
        .to_zoned(zone)
        .unwrap()
        .timestamp();
    Arc::new(OffsetClock(target.duration_since(Timestamp::now())))
}

async fn set_rule(gateway: &Gateway, action: v1::QuietAction) {
    let mut admin = v1::policy_admin_client::PolicyAdminClient::connect(format!(
        "http://{}",
        gateway.grpc_addr
    ))
    .await
    .unwrap();
    let rule = v1::QuietHours {
        tenant: "acme".into(),
        channels: vec![v1::Channel::Sms as i32],
        start: "22:00".into(),
        end: "07:00".into(),
        action: action as i32,
        default_zone: "Europe/Berlin".into(),
        ..Default::default()
    };
    admin
        .set_quiet_hours(v1::SetQuietHoursRequest { rule: Some(rule) })
        .await
        .unwrap();
}

fn quiet_job(job_id: &str, clock: &OffsetClock, user_initiated: bool) -> serde_json::Value {
    json!({
        "job_id": job_id, "tenant": "acme", "account": "user-42", "code": "505050",
        "expires_at": (clock.now() + SignedDuration::from_mins(30)).to_string(),
        "user_initiated": user_initiated, "channels": ["sms"],
        "targets": [{"phone": {"number": "+4930123456789"}}]
    })
}

#[tokio::test]
async fn a_deferred_job_survives_a_restart_and_resumes_when_the_window_ends() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("quiet-defer");
    let mut broker = Broker::connect(&names).await;
    let clock = berlin_clock(6, 59, 57); // three seconds before the window ends
    let gateway = Gateway::start_with_clock(config(&names, dir.path(), &[]), clock.clone()).await;
    set_rule(&gateway, v1::QuietAction::Defer).await;

    broker
        .publish_json(&quiet_job("night", &clock, false))
        .await;
    let (routing_key, report) = broker.next_event(Duration::from_secs(20)).await;
    assert_eq!(routing_key, "delivery.deferred");
    assert_eq!(report["status"], "DEFERRED");
    assert_eq!(report["reason"], "QUIET_HOURS");
    let summary = report["summary"].as_str().unwrap();
    assert!(summary.contains("until 07:00 Europe/Berlin"), "{summary}");
    assert!(
        outbox(dir.path()).is_empty(),
        "nothing is sent during quiet hours"
    );

    // The gateway restarts while the job is held: the broker keeps it.
    gateway.stop().await;
    let gateway = Gateway::start_with_clock(config(&names, dir.path(), &[]), clock.clone()).await;
    let (routing_key, report) = broker.next_event(Duration::from_secs(30)).await;
    assert_eq!(routing_key, "delivery.sent", "{report}");
    let sent_at: Timestamp = report["targets"][0]["attempts"][0]["started_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let window_end = berlin_clock(7, 0, 0).now();
    assert!(
        sent_at >= window_end - SignedDuration::from_secs(1),
        "sent at {sent_at}, window ends {window_end}"
    );
    assert_eq!(outbox(dir.path()).len(), 1);
    gateway.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn waiting_users_get_through_and_suppress_fails_with_the_local_end_of_the_window() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("quiet-allow");
    let mut broker = Broker::connect(&names).await;
    let clock = berlin_clock(23, 30, 0);
    let gateway = Gateway::start_with_clock(config(&names, dir.path(), &[]), clock.clone()).await;
    set_rule(&gateway, v1::QuietAction::AllowUserInitiated).await;

    broker
        .publish_json(&quiet_job("waiting", &clock, true))
        .await;
    let (_, report) = broker.next_event(Duration::from_secs(20)).await;
    assert_eq!(
        report["status"], "SENT",
        "a user waiting for the code gets it"
    );

    let mut admin = v1::policy_admin_client::PolicyAdminClient::connect(format!(
        "http://{}",
        gateway.grpc_addr
    ))
    .await
    .unwrap();
    let rules = admin
        .list_quiet_hours(v1::ListQuietHoursRequest {
            tenant: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .rules;
    let mut rule = rules[0].clone();
    rule.action = v1::QuietAction::Suppress as i32;
    admin
        .set_quiet_hours(v1::SetQuietHoursRequest { rule: Some(rule) })
        .await
        .unwrap();
    // Explain says what the send will do.
    let body = quiet_job("suppressed", &clock, true);
    let job = otp_gateway::domain::Job::from_json(body.to_string().as_bytes()).unwrap();
    let plan = gateway
        .client()
        .await
        .explain(v1::ExplainRequest {
            job: Some(otp_gateway::proto::job_to_proto(&job)),
            at: None,
        })
        .await
        .unwrap()
        .into_inner();
    let sms = &plan.targets[0].channels[0];
    assert_eq!(sms.refused_reason, v1::FailureReason::QuietHours as i32);
    assert!(
        sms.refused_detail.contains("until 07:00 Europe/Berlin"),
        "{}",
        sms.refused_detail
    );
    broker.publish_json(&body).await;
    let (_, report) = broker.next_event(Duration::from_secs(20)).await;
    assert_eq!(report["status"], "FAILED");
    assert_eq!(report["reason"], "QUIET_HOURS");
    let detail = report["targets"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("until 07:00 Europe/Berlin"), "{detail}");
    // The number's own zone decides, not the rule's default: 23:30 in Berlin is 17:30 in New York.
    let mut new_york = quiet_job("new-york", &clock, true);
    new_york["targets"] = json!([{"phone": {"number": "+12125550101"}}]);
    broker.publish_json(&new_york).await;
    let (_, report) = broker.next_event(Duration::from_secs(20)).await;
    assert_eq!(report["status"], "SENT", "{report}");
    assert_eq!(
        outbox(dir.path()).len(),
        2,
        "the waiting user's code and New York's; nothing while suppressed"
    );
    gateway.stop().await;
    broker.cleanup().await;
}
