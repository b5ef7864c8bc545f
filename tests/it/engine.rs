//! The delivery engine with scripted providers (per-call outcomes and latencies, answers by
//! recipient) and the real SQLite ledger: retries and their delays, Retry-After, the deadline,
//! breakers and the status page, failover, push acknowledgements and escalation.
//! (Real short intervals rather than tokio's paused clock: with paused time tokio jumps its
//! timers whenever the runtime waits on SQLite's worker threads, which would fire timeouts
//! spuriously. The breaker and back-off state machines have paused-clock unit tests.)

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use figment::providers::Serialized;
use otp_gateway::config::Config;
use otp_gateway::delivery::{
    AckOutcome, CircuitState, DeliveryService, Dispatcher, EngineSettings, Handled,
};
use otp_gateway::domain::{
    Acknowledgement, AttemptOutcome, DeliveryStatus, FailureReason, Job, Report, SystemClock,
    TargetStatus,
};
use otp_gateway::policy::{RateLimitRule, RateScope};
use otp_gateway::providers::{
    OutboundMessage, Provider, ProviderAccept, ProviderError, ProviderRegistry, Recipient,
};
use otp_gateway::store::{Ledger, PolicyStore};
use serde_json::{Value, json};
use tokio::time::Instant;

/// One scripted answer.
#[derive(Clone)]
pub enum Step {
    Accept(Duration),
    Fail(Duration, ProviderError),
}

/// A provider that answers from a script, then with its default; some recipients always get
/// their own answer. Records when each call came.
pub struct Scripted {
    name: String,
    script: Mutex<VecDeque<Step>>,
    default: Mutex<Step>,
    by_recipient: HashMap<String, ProviderError>,
    pub calls: Mutex<Vec<(Instant, String)>>,
    pub texts: Mutex<Vec<String>>,
}

impl Scripted {
    pub fn new(name: &str, script: Vec<Step>, default: Step) -> Arc<Self> {
        Self::with_recipients(name, script, default, HashMap::new())
    }

    pub fn with_recipients(
        name: &str,
        script: Vec<Step>,
        default: Step,
        by_recipient: HashMap<String, ProviderError>,
    ) -> Arc<Self> {
        Arc::new(Scripted {
            name: name.to_owned(),
            script: Mutex::new(script.into()),
            default: Mutex::new(default),
            by_recipient,
            calls: Mutex::default(),
            texts: Mutex::default(),
        })
    }

    pub fn set_default(&self, step: Step) {
        *self.default.lock().unwrap() = step;
    }

    pub fn call_times(&self) -> Vec<Instant> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(at, _)| *at)
            .collect()
    }
}

#[async_trait]
impl Provider for Scripted {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&self, message: &OutboundMessage<'_>) -> Result<ProviderAccept, ProviderError> {
        let recipient = match message.recipient {
            Recipient::Phone(number) => number.to_owned(),
            Recipient::Device { token, .. } => token.to_owned(),
        };
        self.calls
            .lock()
            .unwrap()
            .push((Instant::now(), recipient.clone()));
        if let Some(error) = self.by_recipient.get(&recipient) {
            return Err(error.clone());
        }
        let step = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| self.default.lock().unwrap().clone());
        match step {
            Step::Accept(latency) => {
                tokio::time::sleep(latency).await;
                Ok(ProviderAccept {
                    message_id: Some(format!("{}-{}", self.name, uuid::Uuid::new_v4().simple())),
                })
            }
            Step::Fail(latency, error) => {
                tokio::time::sleep(latency).await;
                Err(error)
            }
        }
    }
}

pub fn unavailable() -> ProviderError {
    ProviderError::new(
        FailureReason::ProviderUnavailable,
        Some("503"),
        "Service Unavailable",
    )
}

pub fn ok() -> Step {
    Step::Accept(Duration::ZERO)
}

pub fn fail(error: ProviderError) -> Step {
    Step::Fail(Duration::ZERO, error)
}

/// A provider section with quick retries and a quick breaker.
pub fn provider_settings(dir: &std::path::Path, name: &str, retry: Value, breaker: Value) -> Value {
    json!({"kind": "sandbox", "outbox": dir.join(format!("{name}.jsonl")), "retry": retry, "breaker": breaker})
}

/// A configuration with `providers`, the given routes and overrides.
pub fn engine_config(
    dir: &std::path::Path,
    providers: Value,
    overrides: &[(&str, Value)],
) -> Config {
    let mut figment = Config::figment(None)
        .merge(Serialized::default(
            "store.url",
            format!("sqlite://{}/ledger.db", dir.display()),
        ))
        .merge(Serialized::default("providers", providers));
    for (key, value) in overrides {
        figment = figment.merge(Serialized::default(key, value));
    }
    Config::from_figment(figment).expect("valid test configuration")
}

/// A delivery service over the real SQLite ledger and the given provider implementations.
pub async fn engine(
    config: &Config,
    replacements: Vec<(&str, Arc<dyn Provider>)>,
) -> Arc<DeliveryService> {
    let replacements = replacements
        .into_iter()
        .map(|(n, p)| (n.to_owned(), p))
        .collect::<BTreeMap<_, _>>();
    let registry = ProviderRegistry::from_config_with(config, replacements)
        .await
        .unwrap();
    let receipts = registry.take_receipts().expect("receipts not taken yet");
    let stores = otp_gateway::store::open(&config.store).await.unwrap();
    let dispatcher = Dispatcher::new(registry, stores.policy, EngineSettings::from_config(config));
    let service = Arc::new(DeliveryService::new(
        stores.ledger,
        dispatcher,
        Arc::new(SystemClock),
        "test-worker".into(),
    ));
    // Receipts that providers get on their own sessions (SMPP) are applied as the app does.
    tokio::spawn(otp_gateway::receipts::forward(
        receipts,
        Arc::clone(&service),
        None,
        tokio_util::sync::CancellationToken::new(),
    ));
    service
}

pub fn in_secs(seconds: f64) -> String {
    (jiff::Timestamp::now() + jiff::SignedDuration::from_secs_f64(seconds)).to_string()
}

pub fn job(job_id: &str, expires_in_secs: f64, channels: &[&str], targets: Value) -> Job {
    let body = json!({
        "job_id": job_id, "tenant": "acme", "account": "user-42", "code": "482913",
        "expires_at": in_secs(expires_in_secs), "channels": channels, "targets": targets,
    });
    Job::from_json(body.to_string().as_bytes()).unwrap()
}

pub async fn deliver(service: &DeliveryService, job: &Job) -> Report {
    let report = match service.handle(job, false).await.unwrap() {
        Handled::Finished { report, .. } | Handled::Deferred { report, .. } => report,
        Handled::HeldElsewhere(_) | Handled::Leased { .. } => panic!("nobody else holds it"),
    };
    // The report handed back (and published) is the one stored, to the microsecond.
    let stored = service
        .ledger()
        .get(&job.delivery_id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        serde_json::to_value(&report).unwrap(),
        serde_json::to_value(&stored).unwrap(),
        "the report handed back differs from the one stored"
    );
    report
}

/// Delivers `job` in the background (while the test acknowledges, aborts, …).
pub fn spawn_delivery(service: &Arc<DeliveryService>, job: Job) -> tokio::task::JoinHandle<Report> {
    let service = Arc::clone(service);
    tokio::spawn(async move { deliver(&service, &job).await })
}

/// The providers called for the first target, in order.
fn providers_tried(report: &Report) -> Vec<&str> {
    report.targets[0]
        .attempts
        .iter()
        .map(|a| a.provider.as_str())
        .collect()
}

/// An SMS-only job to `numbers`, in order.
fn sms_job(job_id: &str, expires_in_secs: f64, numbers: &[&str]) -> Job {
    let targets: Vec<Value> = numbers.iter().map(|n| phone(n)).collect();
    job(job_id, expires_in_secs, &["sms"], Value::Array(targets))
}

fn phone(number: &str) -> Value {
    json!({"phone": {"number": number}})
}

/// A job to a device, then a number, by push then SMS, valid for a minute.
fn push_then_sms_job(job_id: &str) -> Job {
    job(
        job_id,
        60.0,
        &["push", "sms"],
        json!([device("ipad-1", "a1b2c3d4e5f6a7b8"), phone("+14155550101")]),
    )
}

fn device(id: &str, token: &str) -> Value {
    json!({"device": {"id": id, "platform": "apns", "token": token}})
}

#[tokio::test]
async fn transient_failures_are_retried_with_delays_within_the_configured_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let retry = json!({"initial_interval": "200ms", "multiplier": 2.0, "max_interval": "1s", "max_attempts": 3});
    let config = engine_config(
        dir.path(),
        json!({"primary": provider_settings(dir.path(), "primary", retry, json!({}))}),
        &[(
            "routes",
            json!({"push": ["primary"], "sms": ["primary"], "voice": ["primary"]}),
        )],
    );
    let primary = Scripted::new(
        "primary",
        vec![fail(unavailable()), fail(unavailable())],
        ok(),
    );
    let service = engine(&config, vec![("primary", primary.clone())]).await;

    let report = deliver(&service, &sms_job("retry", 60.0, &["+14155550101"])).await;
    assert_eq!(report.status, DeliveryStatus::Sent);
    let attempts = &report.targets[0].attempts;
    assert_eq!(attempts.len(), 3);
    assert_eq!(
        attempts.iter().map(|a| a.retry).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_eq!(attempts[0].outcome, AttemptOutcome::Failed);
    assert_eq!(attempts[0].provider_code.as_deref(), Some("503"));
    assert!(attempts[0].next_retry_at.is_some() && attempts[1].next_retry_at.is_some());
    assert_eq!(attempts[2].outcome, AttemptOutcome::Sent);

    // Full jitter: each delay lies between 0 and its bound (200 ms, then 400 ms), plus the
    // time it takes to record an attempt.
    let times = primary.call_times();
    let slack = Duration::from_millis(300);
    assert!(
        times[1] - times[0] <= Duration::from_millis(200) + slack,
        "{:?}",
        times[1] - times[0]
    );
    assert!(
        times[2] - times[1] <= Duration::from_millis(400) + slack,
        "{:?}",
        times[2] - times[1]
    );
}

#[tokio::test]
async fn retry_after_is_honoured_and_the_deadline_stops_retries_before_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let retry = json!({"initial_interval": "50ms", "multiplier": 1.0, "max_interval": "50ms", "max_attempts": 1000});
    let config = engine_config(
        dir.path(),
        json!({"primary": provider_settings(dir.path(), "primary", retry, json!({"consecutive_failures": 1000, "window": 1000, "min_calls": 1000, "error_rate": 1.0}))}),
        &[
            (
                "routes",
                json!({"push": ["primary"], "sms": ["primary"], "voice": ["primary"]}),
            ),
            ("delivery.expiry_margin", json!("300ms")),
        ],
    );
    let mut throttled = ProviderError::new(
        FailureReason::ProviderThrottled,
        Some("429"),
        "Too Many Requests",
    );
    throttled.retry_after = Some(Duration::from_millis(400));
    let primary = Scripted::new("primary", vec![fail(throttled)], ok());
    let service = engine(&config, vec![("primary", primary.clone())]).await;
    let report = deliver(&service, &sms_job("retry-after", 60.0, &["+14155550101"])).await;
    assert_eq!(report.status, DeliveryStatus::Sent);
    let times = primary.call_times();
    assert!(
        times[1] - times[0] >= Duration::from_millis(400),
        "waited {:?}",
        times[1] - times[0]
    );

    // Always unavailable: retries stop before the code expires, and the report says so.
    primary.set_default(fail(unavailable()));
    let job = sms_job("deadline", 1.5, &["+14155550101"]);
    let report = deliver(&service, &job).await;
    assert_eq!(report.status, DeliveryStatus::Failed);
    assert_eq!(report.reason, Some(FailureReason::CodeExpired));
    let target = &report.targets[0];
    assert_eq!(target.reason, Some(FailureReason::CodeExpired));
    assert!(
        target
            .detail
            .as_deref()
            .unwrap()
            .contains("no provider accepted the code before it expired"),
        "{target:?}"
    );
    assert!(
        target.attempts.len() > 3,
        "it kept retrying until the deadline"
    );
    let deadline = job.expires_at - jiff::SignedDuration::from_millis(300);
    assert!(
        target.attempts.iter().all(|a| a.started_at < deadline),
        "no attempt after the deadline"
    );
    assert!(
        target.attempts.last().unwrap().next_retry_at.is_none(),
        "the last one plans no retry"
    );
    assert!(
        report
            .summary
            .contains("no provider accepted the code before it expired"),
        "{}",
        report.summary
    );
}

#[tokio::test]
async fn a_failing_primary_opens_its_circuit_is_skipped_then_probed_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    let once = json!({"max_attempts": 1});
    let breaker = json!({"consecutive_failures": 3, "cool_down": "500ms"});
    let config = engine_config(
        dir.path(),
        json!({
            "primary": provider_settings(dir.path(), "primary", once.clone(), breaker.clone()),
            "secondary": provider_settings(dir.path(), "secondary", once, breaker),
        }),
        &[(
            "routes",
            json!({"push": ["primary"], "sms": ["primary", "secondary"], "voice": ["primary"]}),
        )],
    );
    let primary = Scripted::new("primary", vec![], fail(unavailable()));
    let secondary = Scripted::new("secondary", vec![], ok());
    let service = engine(
        &config,
        vec![
            ("primary", primary.clone()),
            ("secondary", secondary.clone()),
        ],
    )
    .await;
    let circuit = |name: &str| {
        let health = service.provider_health();
        let provider = health.iter().find(|p| p.name == name).unwrap().clone();
        provider.circuit
    };

    for i in 0..3 {
        let report = deliver(
            &service,
            &sms_job(&format!("open-{i}"), 60.0, &["+14155550101"]),
        )
        .await;
        assert_eq!(
            report.status,
            DeliveryStatus::Sent,
            "failover to the secondary"
        );
        assert_eq!(providers_tried(&report), ["primary", "secondary"]);
    }
    let status = circuit("primary");
    assert_eq!(status.state, CircuitState::Open);
    assert_eq!(status.error_rate, 1.0);
    assert!(status.last_error.unwrap().0.contains("Service Unavailable"));
    assert_eq!(circuit("secondary").state, CircuitState::Closed);

    // Open: later jobs skip the primary without an attempt.
    let report = deliver(&service, &sms_job("skipped", 60.0, &["+14155550101"])).await;
    assert_eq!(providers_tried(&report), ["secondary"]);
    assert_eq!(primary.call_times().len(), 3);

    // After the cool-down one probe goes through; its success closes the circuit.
    tokio::time::sleep(Duration::from_millis(550)).await;
    assert_eq!(circuit("primary").state, CircuitState::HalfOpen);
    primary.set_default(ok());
    let report = deliver(&service, &sms_job("probe", 60.0, &["+14155550101"])).await;
    assert_eq!(providers_tried(&report), ["primary"]);
    assert_eq!(circuit("primary").state, CircuitState::Closed);
    let health = service.provider_health();
    let primary_routes = &health.iter().find(|p| p.name == "primary").unwrap().routes;
    assert!(
        primary_routes
            .iter()
            .any(|(route, _, snapshot)| route == "*" && snapshot.state == CircuitState::Closed)
    );
}

#[tokio::test]
async fn a_recipient_level_failure_moves_to_the_next_number_and_prefix_routes_are_used() {
    let dir = tempfile::tempdir().unwrap();
    let config = engine_config(
        dir.path(),
        json!({
            "us": provider_settings(dir.path(), "us", json!({}), json!({})),
            "world": provider_settings(dir.path(), "world", json!({}), json!({})),
        }),
        &[(
            "routes",
            json!({"push": ["world"], "sms": ["world"], "voice": ["world"], "by_prefix": {"sms": {"+1": ["us"]}}}),
        )],
    );
    let unknown = ProviderError::new(
        FailureReason::RecipientUnknown,
        Some("30005"),
        "Unknown destination handset",
    );
    let us = Scripted::with_recipients(
        "us",
        vec![],
        ok(),
        HashMap::from([("+14155550101".to_owned(), unknown)]),
    );
    let world = Scripted::new("world", vec![], ok());
    let service = engine(&config, vec![("us", us.clone()), ("world", world.clone())]).await;

    let targets = json!([phone("+14155550101"), phone("+4930123456789")]);
    let report = deliver(&service, &job("next-number", 60.0, &["sms"], targets)).await;
    assert_eq!(report.status, DeliveryStatus::Sent);
    let first = &report.targets[0];
    assert_eq!(first.status, TargetStatus::Failed);
    assert_eq!(first.reason, Some(FailureReason::RecipientUnknown));
    assert_eq!(
        first.attempts.len(),
        1,
        "a permanent recipient error is not retried"
    );
    assert_eq!(
        first.attempts[0].provider, "us",
        "+1 goes through its prefix route"
    );
    assert_eq!(report.targets[1].status, TargetStatus::Sent);
    assert_eq!(report.targets[1].attempts[0].provider, "world");
    assert!(
        report.summary.contains("RECIPIENT_UNKNOWN"),
        "{}",
        report.summary
    );
}

/// Engine with the sandbox for push (tokens `unregistered…` fail like APNs 410) and a scripted
/// SMS provider, and a short acknowledgement timeout.
async fn push_then_sms(
    dir: &std::path::Path,
    ack_timeout: &str,
) -> (Arc<DeliveryService>, Arc<Scripted>) {
    let config = engine_config(
        dir,
        json!({
            "push": provider_settings(dir, "push", json!({}), json!({})),
            "sms": provider_settings(dir, "sms", json!({}), json!({})),
        }),
        &[
            (
                "routes",
                json!({"push": ["push"], "sms": ["sms"], "voice": ["sms"]}),
            ),
            ("delivery.push_ack_timeout", json!(ack_timeout)),
            ("tenants.quiet.push_acknowledgement", json!(false)),
        ],
    );
    let sms = Scripted::new("sms", vec![], ok());
    (engine(&config, vec![("sms", sms.clone())]).await, sms)
}

/// Waits until every device target of `job_id` has a SENT push attempt.
async fn pushes_sent(service: &DeliveryService, job_id: &str, devices: usize) {
    let id = format!("acme/{job_id}").parse().unwrap();
    for _ in 0..200 {
        if let Some(report) = service.ledger().get(&id).await.unwrap() {
            let sent = report
                .targets
                .iter()
                .filter(|t| t.attempts.iter().any(|a| a.outcome == AttemptOutcome::Sent))
                .count();
            if sent >= devices {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the pushes were never sent");
}

/// Devices are pushed at once: a push that was accepted is in the ledger while another device's
/// push is still under way, however long that one takes.
#[tokio::test]
async fn a_push_accepted_is_written_while_another_device_s_push_is_under_way() {
    let dir = tempfile::tempdir().unwrap();
    let config = engine_config(
        dir.path(),
        json!({"push": provider_settings(dir.path(), "push", json!({}), json!({}))}),
        &[
            (
                "routes",
                json!({"push": ["push"], "sms": ["push"], "voice": ["push"]}),
            ),
            ("delivery.push_ack_timeout", json!("200ms")),
            ("tenants.quiet.push_acknowledgement", json!(false)),
        ],
    );
    let push = Scripted::new(
        "push",
        vec![
            Step::Accept(Duration::ZERO),
            Step::Accept(Duration::from_millis(1500)),
        ],
        ok(),
    );
    let service = engine(&config, vec![("push", push.clone())]).await;
    let targets = json!([
        device("phone", "a1b2c3d4e5f6a7b8"),
        device("ipad", "b2c3d4e5f6a7b8c9")
    ]);
    let job = job("two-devices", 60.0, &["push"], targets);
    let running = spawn_delivery(&service, job.clone());
    let mut seen = false;
    for _ in 0..100 {
        if let Some(report) = service.ledger().get(&job.delivery_id()).await.unwrap() {
            let outcomes: Vec<AttemptOutcome> = report
                .targets
                .iter()
                .filter_map(|t| t.attempts.first().map(|a| a.outcome))
                .collect();
            if outcomes.contains(&AttemptOutcome::Sent)
                && outcomes.contains(&AttemptOutcome::InFlight)
            {
                seen = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        seen,
        "the quick push was not in the ledger while the slow one was under way"
    );
    running.await.unwrap();
}

#[tokio::test]
async fn an_unregistered_device_and_no_acknowledgement_escalate_to_sms() {
    let dir = tempfile::tempdir().unwrap();
    let (service, sms) = push_then_sms(dir.path(), "300ms").await;
    let targets = json!([
        device("old-phone", "unregistered-a1b2c3d4e5f6"),
        device("ipad-1", "a1b2c3d4e5f6a7b8"),
        phone("+14155550101")
    ]);
    let report = deliver(&service, &job("escalate", 60.0, &["push", "sms"], targets)).await;
    assert_eq!(report.status, DeliveryStatus::Sent);
    assert_eq!(
        report.targets[0].reason,
        Some(FailureReason::DeviceUnregistered)
    );
    assert!(
        report.targets[0]
            .hint
            .unwrap()
            .contains("remove this device")
    );
    assert_eq!(
        report.targets[1].reason,
        Some(FailureReason::PushNotAcknowledged)
    );
    assert_eq!(report.targets[2].status, TargetStatus::Sent);
    assert_eq!(sms.call_times().len(), 1);
    assert!(
        report.summary.contains("PUSH_NOT_ACKNOWLEDGED"),
        "{}",
        report.summary
    );
}

#[tokio::test]
async fn denied_on_a_device_stops_the_chain_and_shown_makes_it_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let (service, sms) = push_then_sms(dir.path(), "10s").await;

    // DENIED: FAILED / USER_DENIED at once, and no SMS.
    let job_denied = push_then_sms_job("denied");
    let running = spawn_delivery(&service, job_denied);
    pushes_sent(&service, "denied", 1).await;
    let id = "acme/denied".parse().unwrap();
    let unknown = service
        .acknowledge(&id, "not-a-device", Acknowledgement::Denied)
        .await;
    assert!(unknown.unwrap_err().to_string().contains("not a target"));
    assert!(matches!(
        service
            .acknowledge(&id, "ipad-1", Acknowledgement::Denied)
            .await
            .unwrap(),
        AckOutcome::Recorded(_)
    ));
    let started = Instant::now();
    let report = running.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the denial ends the wait at once"
    );
    assert_eq!(report.status, DeliveryStatus::Failed);
    assert_eq!(report.reason, Some(FailureReason::UserDenied));
    assert_eq!(
        report.targets[0].acknowledgement,
        Some(Acknowledgement::Denied)
    );
    assert_eq!(report.targets[1].status, TargetStatus::Skipped);
    assert!(report.targets[1].attempts.is_empty());
    assert!(sms.call_times().is_empty(), "no SMS after a denial");

    // Two devices, one SHOWN: DELIVERED, and no SMS.
    let two = json!([
        device("ipad-1", "a1b2c3d4e5f6a7b8"),
        device("phone-2", "b2c3d4e5f6a7b8c9"),
        phone("+14155550101")
    ]);
    let job_shown = job("shown", 60.0, &["push", "sms"], two);
    let running = spawn_delivery(&service, job_shown);
    pushes_sent(&service, "shown", 2).await;
    service
        .acknowledge(
            &"acme/shown".parse().unwrap(),
            "phone-2",
            Acknowledgement::Shown,
        )
        .await
        .unwrap();
    let report = running.await.unwrap();
    assert_eq!(report.status, DeliveryStatus::Delivered);
    assert_eq!(report.reason, None);
    assert_eq!(report.targets[1].status, TargetStatus::Delivered);
    assert_eq!(report.targets[0].status, TargetStatus::Sent);
    assert_eq!(report.targets[2].status, TargetStatus::Skipped);
    assert!(sms.call_times().is_empty());

    // Finished deliveries refuse acknowledgements.
    let late = service
        .acknowledge(
            &"acme/shown".parse().unwrap(),
            "ipad-1",
            Acknowledgement::Shown,
        )
        .await;
    assert!(late.unwrap_err().to_string().contains("final"));
}

#[tokio::test]
async fn without_acknowledgements_an_accepted_push_is_sent_and_a_later_shown_delivers_it() {
    let dir = tempfile::tempdir().unwrap();
    let (service, sms) = push_then_sms(dir.path(), "10s").await;
    let body = json!({
        "job_id": "no-ack", "tenant": "quiet", "account": "a", "code": "482913", "expires_at": in_secs(60.0),
        "targets": [device("ipad-1", "a1b2c3d4e5f6a7b8"), phone("+14155550101")],
    });
    let job = Job::from_json(body.to_string().as_bytes()).unwrap();
    let report = deliver(&service, &job).await;
    assert_eq!(report.status, DeliveryStatus::Sent);
    assert!(sms.call_times().is_empty());
    let outcome = service
        .acknowledge(
            &"quiet/no-ack".parse().unwrap(),
            "ipad-1",
            Acknowledgement::Shown,
        )
        .await
        .unwrap();
    let AckOutcome::Finished(report) = outcome else {
        panic!("a SENT delivery is finished by the acknowledgement")
    };
    assert_eq!(report.status, DeliveryStatus::Delivered);
    assert_eq!(report.targets[0].status, TargetStatus::Delivered);
}

#[tokio::test]
async fn a_thousand_jobs_through_a_slow_provider_run_concurrently() {
    use crate::helpers::{Broker, Gateway, Names, broker_available, config};
    if !broker_available().await {
        return;
    }
    const JOBS: usize = 1000;
    const MAX_IN_FLIGHT: usize = 100;
    const LATENCY: Duration = Duration::from_millis(200);
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("concurrency");
    let mut broker = Broker::connect(&names).await;
    for i in 0..JOBS {
        let mut job = crate::helpers::job(&format!("c-{i}"), "482913");
        job["targets"] = json!([phone(&format!("+1415555{i:04}"))]);
        broker.publish_json(&job).await;
    }
    let overrides = [
        ("amqp.prefetch", json!(MAX_IN_FLIGHT)),
        ("delivery.max_in_flight", json!(MAX_IN_FLIGHT)),
    ];
    let settings = config(&names, dir.path(), &overrides);
    let slow = Scripted::new("sandbox", vec![], Step::Accept(LATENCY));
    let replacements = BTreeMap::from([("sandbox".to_owned(), slow.clone() as Arc<dyn Provider>)]);
    let providers = ProviderRegistry::from_config_with(&settings, replacements)
        .await
        .unwrap();

    let started = Instant::now();
    let gateway = Gateway::start_with(settings, providers).await;
    let events = broker.events_for(JOBS, Duration::from_secs(120)).await;
    let elapsed = started.elapsed();
    assert!(events.values().all(|r| r["status"] == "SENT"));
    assert_eq!(slow.call_times().len(), JOBS);

    let ideal = LATENCY * (JOBS / MAX_IN_FLIGHT) as u32; // 2 s
    let serial = LATENCY * JOBS as u32; // 200 s
    eprintln!(
        "{JOBS} jobs, {MAX_IN_FLIGHT} in flight, {LATENCY:?} per call: {elapsed:?} (ideal {ideal:?}, serial {serial:?})"
    );
    assert!(
        elapsed >= ideal,
        "faster than physically possible: {elapsed:?}"
    );
    assert!(
        elapsed < serial / 10,
        "{elapsed:?} is not far from serial ({serial:?})"
    );
    gateway.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_hanging_provider_times_out_without_stalling_jobs_routed_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let once = json!({"max_attempts": 1});
    let config = engine_config(
        dir.path(),
        json!({
            "hanging": provider_settings(dir.path(), "hanging", once.clone(), json!({})),
            "fast": provider_settings(dir.path(), "fast", once, json!({})),
        }),
        &[
            (
                "routes",
                json!({"push": ["fast"], "sms": ["fast"], "voice": ["fast"], "by_prefix": {"sms": {"+44": ["hanging"]}}}),
            ),
            ("delivery.provider_timeout", json!("1500ms")),
        ],
    );
    let hanging = Scripted::new("hanging", vec![], Step::Accept(Duration::from_secs(60)));
    let fast = Scripted::new("fast", vec![], ok());
    let service = engine(&config, vec![("hanging", hanging), ("fast", fast)]).await;

    let slow_job = sms_job("to-uk", 60.0, &["+447700900123"]);
    let started = Instant::now();
    let slow = tokio::spawn({
        let service = Arc::clone(&service);
        async move { (deliver(&service, &slow_job).await, started.elapsed()) }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let report = deliver(&service, &sms_job("to-us", 60.0, &["+14155550101"])).await;
    let fast_done = started.elapsed();
    assert_eq!(report.status, DeliveryStatus::Sent);

    let (report, slow_done) = slow.await.unwrap();
    assert!(
        fast_done < slow_done,
        "the fast route finished ({fast_done:?}) while the other hung ({slow_done:?})"
    );
    assert_eq!(report.status, DeliveryStatus::Failed);
    assert_eq!(
        report.targets[0].attempts[0].reason,
        Some(FailureReason::ProviderTimeout)
    );
    assert!(
        slow_done < Duration::from_secs(8),
        "the per-call timeout ended the hang: {slow_done:?}"
    );
}

#[tokio::test]
async fn calls_beyond_a_providers_limit_wait_for_a_slot_and_are_throttled_when_none_frees_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut primary_settings =
        provider_settings(dir.path(), "primary", json!({"max_attempts": 1}), json!({}));
    primary_settings["max_concurrent_calls"] = json!(1);
    let config = engine_config(
        dir.path(),
        json!({"primary": primary_settings}),
        &[
            (
                "routes",
                json!({"push": ["primary"], "sms": ["primary"], "voice": ["primary"]}),
            ),
            ("delivery.provider_timeout", json!("1500ms")),
        ],
    );
    let primary = Scripted::new("primary", vec![], Step::Accept(Duration::from_secs(1)));
    let service = engine(&config, vec![("primary", primary.clone())]).await;

    // The first job holds the only slot for a second; of the next two, one waits for it (and
    // gets it in time), the other would have to wait longer than the provider timeout.
    let first = spawn_delivery(&service, sms_job("first", 60.0, &["+14155550101"]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = spawn_delivery(&service, sms_job("second", 60.0, &["+14155550102"]));
    let third = spawn_delivery(&service, sms_job("third", 60.0, &["+14155550103"]));
    let first = first.await.unwrap();
    let mut later = [second.await.unwrap(), third.await.unwrap()];
    later.sort_by_key(|report| report.status != DeliveryStatus::Sent);

    assert_eq!(first.status, DeliveryStatus::Sent);
    assert_eq!(
        later[0].status,
        DeliveryStatus::Sent,
        "it waited for the slot"
    );
    let throttled = &later[1];
    assert_eq!(throttled.status, DeliveryStatus::Failed);
    assert_eq!(throttled.reason, Some(FailureReason::ProviderThrottled));
    assert!(
        throttled.targets[0].attempts.is_empty(),
        "the provider was never called for it"
    );
    let detail = throttled.targets[0].detail.as_deref().unwrap();
    assert!(
        detail.contains("max_concurrent_calls") && detail.contains("not tried: primary"),
        "{detail}"
    );
    // Never two calls open at once.
    let times = primary.call_times();
    assert_eq!(times.len(), 2);
    assert!(times[1] - times[0] >= Duration::from_secs(1), "{times:?}");
}

/// A provider that notes, at each call, whether the ledger (read on a connection of its own)
/// already shows the call in flight.
struct Watching {
    ledger: Arc<dyn Ledger>,
    in_flight_when_called: Mutex<Vec<bool>>,
}

#[async_trait]
impl Provider for Watching {
    fn name(&self) -> &str {
        "primary"
    }

    async fn send(&self, message: &OutboundMessage<'_>) -> Result<ProviderAccept, ProviderError> {
        let (tenant, job_id) = message.delivery_id.split_once('/').unwrap();
        let id = otp_gateway::domain::DeliveryId {
            tenant: tenant.into(),
            job_id: job_id.into(),
        };
        let report = self.ledger.get(&id).await.unwrap().unwrap();
        self.in_flight_when_called.lock().unwrap().push(
            report.targets[0]
                .attempts
                .last()
                .is_some_and(|a| a.outcome == AttemptOutcome::InFlight && a.provider == "primary"),
        );
        Ok(ProviderAccept {
            message_id: Some(uuid::Uuid::new_v4().to_string()),
        })
    }
}

#[tokio::test]
async fn the_ledger_shows_a_call_before_the_provider_hears_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = engine_config(
        dir.path(),
        json!({"primary": provider_settings(dir.path(), "primary", json!({}), json!({}))}),
        &[(
            "routes",
            json!({"push": ["primary"], "sms": ["primary"], "voice": ["primary"]}),
        )],
    );
    let watching = Arc::new(Watching {
        ledger: otp_gateway::store::open(&config.store)
            .await
            .unwrap()
            .ledger,
        in_flight_when_called: Mutex::default(),
    });
    let service = engine(&config, vec![("primary", watching.clone())]).await;
    for n in 0..10 {
        let job = sms_job(&format!("watched-{n}"), 60.0, &["+14155550101"]);
        let report = deliver(&service, &job).await;
        assert_eq!(report.status, DeliveryStatus::Sent);
    }
    assert_eq!(*watching.in_flight_when_called.lock().unwrap(), [true; 10]);
}

#[tokio::test]
async fn a_provider_level_refusal_fails_over_at_once_with_the_same_code() {
    let dir = tempfile::tempdir().unwrap();
    let three = json!({"max_attempts": 3, "initial_interval": "10ms"});
    let config = engine_config(
        dir.path(),
        json!({
            "broken": provider_settings(dir.path(), "broken", three.clone(), json!({})),
            "good": provider_settings(dir.path(), "good", three, json!({})),
        }),
        &[(
            "routes",
            json!({"push": ["good"], "sms": ["broken", "good"], "voice": ["good"]}),
        )],
    );
    let misconfigured = ProviderError::new(
        FailureReason::ProviderMisconfigured,
        Some("20003"),
        "Authenticate",
    );
    let broken = Scripted::new("broken", vec![], fail(misconfigured));
    let good = Scripted::new("good", vec![], ok());
    let service = engine(
        &config,
        vec![("broken", broken.clone()), ("good", good.clone())],
    )
    .await;
    let report = deliver(&service, &sms_job("failover", 60.0, &["+14155550101"])).await;
    assert_eq!(report.status, DeliveryStatus::Sent);
    let attempts = &report.targets[0].attempts;
    assert_eq!(
        attempts.len(),
        2,
        "a provider-level refusal is not retried on the same provider"
    );
    assert_eq!(
        (attempts[0].provider.as_str(), attempts[0].reason),
        ("broken", Some(FailureReason::ProviderMisconfigured))
    );
    assert_eq!(attempts[0].provider_code.as_deref(), Some("20003"));
    assert!(attempts[0].next_retry_at.is_none());
    assert_eq!(attempts[1].provider, "good");
    let texts: Vec<String> = broken
        .texts
        .lock()
        .unwrap()
        .iter()
        .chain(good.texts.lock().unwrap().iter())
        .cloned()
        .collect();
    assert!(
        texts.iter().all(|t| t.contains("482913")),
        "the same code throughout: {texts:?}"
    );
}

#[tokio::test]
async fn a_delivery_taken_over_while_waiting_for_an_acknowledgement_waits_again_then_escalates() {
    let dir = tempfile::tempdir().unwrap();
    let (service, sms) = push_then_sms(dir.path(), "300ms").await;
    let job = push_then_sms_job("takeover");
    let first = spawn_delivery(&service, job.clone());
    pushes_sent(&service, "takeover", 1).await;
    // The worker dies while it waits; the broker redelivers the job.
    first.abort();
    let _ = first.await;
    let report = match service.handle(&job, true).await.unwrap() {
        Handled::Finished { report, .. } => report,
        other => panic!("the takeover finishes it: {other:?}"),
    };
    assert_eq!(report.status, DeliveryStatus::Sent);
    assert_eq!(
        report.targets[0].attempts.len(),
        1,
        "the push is not sent again"
    );
    assert_eq!(
        report.targets[0].reason,
        Some(FailureReason::PushNotAcknowledged)
    );
    assert_eq!(
        report.targets[1].status,
        TargetStatus::Sent,
        "it escalated to SMS"
    );
    assert_eq!(sms.call_times().len(), 1);
}

#[tokio::test]
async fn a_denial_that_arrives_during_escalation_still_decides_the_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let (service, sms) = push_then_sms(dir.path(), "200ms").await;
    sms.set_default(Step::Accept(Duration::from_millis(800)));
    let job = push_then_sms_job("late-deny");
    let running = spawn_delivery(&service, job.clone());
    // Wait until the SMS call is under way, then the user taps "Don't Allow".
    for _ in 0..200 {
        if !sms.call_times().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sms.call_times().len(), 1, "escalated to SMS");
    service
        .acknowledge(
            &"acme/late-deny".parse().unwrap(),
            "ipad-1",
            Acknowledgement::Denied,
        )
        .await
        .unwrap();
    let report = running.await.unwrap();
    assert_eq!(report.status, DeliveryStatus::Failed);
    assert_eq!(report.reason, Some(FailureReason::UserDenied));
    assert_eq!(
        report.targets[0].acknowledgement,
        Some(Acknowledgement::Denied)
    );
}

/// An engine whose every route is one scripted provider with default settings.
async fn one_provider(
    dir: &std::path::Path,
    name: &str,
    answer: Step,
) -> (Config, Arc<DeliveryService>, Arc<Scripted>) {
    let config = engine_config(
        dir,
        json!({name: provider_settings(dir, name, json!({}), json!({}))}),
        &[(
            "routes",
            json!({"push": [name], "sms": [name], "voice": [name]}),
        )],
    );
    let provider = Scripted::new(name, vec![], answer);
    let service = engine(&config, vec![(name, provider.clone())]).await;
    (config, service, provider)
}

/// The policy store over the same database file as the engine (as another replica would).
async fn policy_store(config: &Config) -> Arc<dyn PolicyStore> {
    otp_gateway::store::open(&config.store)
        .await
        .unwrap()
        .policy
}

fn rule(
    tenant: Option<&str>,
    scope: RateScope,
    prefix: &str,
    limit: u32,
    window: Duration,
) -> RateLimitRule {
    RateLimitRule {
        id: 0,
        tenant: tenant.map(str::to_owned),
        scope,
        prefix: prefix.into(),
        limit,
        window,
    }
}

#[tokio::test]
async fn the_sixth_job_in_ten_minutes_to_one_number_is_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let (config, service, sms) = one_provider(dir.path(), "sms", ok()).await;
    let policy = policy_store(&config).await;
    let limit = policy
        .set_rate_limit(&rule(
            None,
            RateScope::Recipient,
            "",
            5,
            Duration::from_secs(600),
        ))
        .await
        .unwrap();

    for i in 0..5 {
        let report = deliver(
            &service,
            &sms_job(&format!("n-{i}"), 60.0, &["+14155550101"]),
        )
        .await;
        assert_eq!(report.status, DeliveryStatus::Sent, "job {i}");
    }
    let targets = json!([phone("+14155550101"), phone("+14155550102")]);
    let report = deliver(&service, &job("n-5", 60.0, &["sms"], targets)).await;
    let limited = &report.targets[0];
    assert_eq!(limited.reason, Some(FailureReason::RateLimited));
    assert!(limited.attempts.is_empty());
    let detail = limited.detail.as_deref().unwrap();
    assert!(
        detail.starts_with(&format!(
            "rate limit #{} (5 per 10m per recipient) reached; allowed again at 20",
            limit.id
        )),
        "{detail}"
    );
    assert_eq!(
        report.targets[1].status,
        TargetStatus::Sent,
        "the next number is still tried"
    );
    assert_eq!(sms.call_times().len(), 6);

    // Only number 1 alone: the delivery fails with RATE_LIMITED and says when to retry.
    let report = deliver(&service, &sms_job("n-6", 60.0, &["+14155550101"])).await;
    assert_eq!(report.status, DeliveryStatus::Failed);
    assert_eq!(report.reason, Some(FailureReason::RateLimited));
    assert!(
        report.summary.contains("allowed again at"),
        "{}",
        report.summary
    );
}

#[tokio::test]
async fn account_limits_fail_the_delivery_and_concurrent_jobs_cannot_overshoot_a_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (config, service, sms) =
        one_provider(dir.path(), "sms", Step::Accept(Duration::from_millis(20))).await;
    let policy = policy_store(&config).await;
    policy
        .set_rate_limit(&rule(
            Some("acme"),
            RateScope::Account,
            "",
            3,
            Duration::from_secs(3600),
        ))
        .await
        .unwrap();
    policy
        .set_rate_limit(&rule(
            Some("other"),
            RateScope::Tenant,
            "",
            1,
            Duration::from_secs(3600),
        ))
        .await
        .unwrap();

    let runs = (0..10).map(|i| {
        let service = Arc::clone(&service);
        let job = job(
            &format!("a-{i}"),
            60.0,
            &["sms"],
            json!([phone(&format!("+1415555{i:04}"))]),
        );
        tokio::spawn(async move { deliver(&service, &job).await })
    });
    let reports: Vec<Report> = futures_util::future::join_all(runs)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let sent = reports
        .iter()
        .filter(|r| r.status == DeliveryStatus::Sent)
        .count();
    assert_eq!(
        sent, 3,
        "three per hour for the account, however the jobs interleave"
    );
    let limited: Vec<_> = reports
        .iter()
        .filter(|r| r.reason == Some(FailureReason::RateLimited))
        .collect();
    assert_eq!(limited.len(), 7);
    assert!(
        limited[0].targets[0]
            .detail
            .as_deref()
            .unwrap()
            .contains("per account")
    );
    assert!(limited.iter().all(|r| r.targets[0].attempts.is_empty()));
    assert_eq!(sms.call_times().len(), 3);
}

#[tokio::test]
async fn destinations_not_permitted_for_a_channel_fall_through_to_the_next_channel() {
    let dir = tempfile::tempdir().unwrap();
    let config = engine_config(
        dir.path(),
        json!({"carrier": provider_settings(dir.path(), "carrier", json!({}), json!({}))}),
        &[
            (
                "routes",
                json!({"push": ["carrier"], "sms": ["carrier"], "voice": ["carrier"]}),
            ),
            (
                "tenants.acme.destinations",
                json!({"sms": {"allow": ["US", "CA"]}, "voice": {"deny": ["GB"]}}),
            ),
        ],
    );
    let carrier = Scripted::new("carrier", vec![], ok());
    let service = engine(&config, vec![("carrier", carrier.clone())]).await;

    // Germany: no SMS for acme, but a call is fine.
    let report = deliver(
        &service,
        &job(
            "de",
            60.0,
            &["sms", "voice"],
            json!([phone("+4930123456789")]),
        ),
    )
    .await;
    assert_eq!(report.status, DeliveryStatus::Sent);
    let attempts = &report.targets[0].attempts;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].channel, otp_gateway::domain::Channel::Voice);

    // The UK: neither.
    let report = deliver(
        &service,
        &job(
            "gb",
            60.0,
            &["sms", "voice"],
            json!([phone("+447400123456")]),
        ),
    )
    .await;
    assert_eq!(report.status, DeliveryStatus::Failed);
    assert_eq!(report.reason, Some(FailureReason::DestinationNotPermitted));
    let detail = report.targets[0].detail.as_deref().unwrap();
    assert!(
        detail.contains("GB") && detail.contains("tenants.acme.destinations.voice.deny"),
        "{detail}"
    );
    assert!(report.targets[0].attempts.is_empty(), "nothing was sent");

    // The US: SMS as usual.
    let report = deliver(
        &service,
        &job(
            "us",
            60.0,
            &["sms", "voice"],
            json!([phone("+14155550101")]),
        ),
    )
    .await;
    assert_eq!(
        report.targets[0].attempts[0].channel,
        otp_gateway::domain::Channel::Sms
    );
    assert_eq!(carrier.call_times().len(), 2);
}

#[tokio::test]
async fn a_job_that_sends_nothing_uses_up_no_account_quota() {
    let dir = tempfile::tempdir().unwrap();
    let (config, service, sms) = one_provider(dir.path(), "sms", ok()).await;
    let policy = policy_store(&config).await;
    policy
        .set_rate_limit(&rule(
            Some("acme"),
            RateScope::Account,
            "",
            1,
            Duration::from_secs(3600),
        ))
        .await
        .unwrap();
    let block = otp_gateway::policy::NewBlockEntry {
        tenant: Some("acme".into()),
        kind: otp_gateway::policy::BlockKind::Number,
        pattern: "+14155550199".into(),
        source: otp_gateway::policy::BlockSource::Admin,
        note: String::new(),
        expires_at: None,
    };
    policy
        .add_block(&block, jiff::Timestamp::now())
        .await
        .unwrap();

    let blocked = deliver(&service, &sms_job("blocked-only", 60.0, &["+14155550199"])).await;
    assert_eq!(blocked.reason, Some(FailureReason::RecipientBlocked));
    let report = deliver(&service, &sms_job("real", 60.0, &["+14155550101"])).await;
    assert_eq!(
        report.status,
        DeliveryStatus::Sent,
        "the blocked job sent nothing, so it counted nothing"
    );
    let report = deliver(&service, &sms_job("second", 60.0, &["+14155550102"])).await;
    assert_eq!(
        report.reason,
        Some(FailureReason::RateLimited),
        "one per hour for the account"
    );
    assert_eq!(sms.call_times().len(), 1);
}

#[tokio::test]
async fn a_number_sms_cannot_reach_is_called_unless_the_reason_closes_it_for_every_channel() {
    use FailureReason::*;
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("+14155550201", NotMobileNumber, true),
        ("+14155550202", CarrierFiltered, true),
        ("+14155550203", Undeliverable, true),
        ("+14155550204", RecipientUnreachable, true),
        ("+14155550205", InvalidRecipient, false),
        ("+14155550206", RecipientUnknown, false),
        ("+14155550207", RecipientOptedOut, false),
    ];
    let by_recipient = cases
        .iter()
        .map(|(number, reason, _)| {
            (
                number.to_string(),
                ProviderError::new(*reason, Some("x"), "refused"),
            )
        })
        .collect();
    let texts = Scripted::with_recipients("texts", vec![], ok(), by_recipient);
    let calls = Scripted::new("calls", vec![], ok());
    let config = engine_config(
        dir.path(),
        json!({
            "texts": provider_settings(dir.path(), "texts", json!({}), json!({})),
            "calls": provider_settings(dir.path(), "calls", json!({}), json!({})),
        }),
        &[(
            "routes",
            json!({"push": ["texts"], "sms": ["texts"], "voice": ["calls"]}),
        )],
    );
    let service = engine(
        &config,
        vec![("texts", texts.clone()), ("calls", calls.clone())],
    )
    .await;
    for (i, (number, reason, called)) in cases.into_iter().enumerate() {
        let report = deliver(
            &service,
            &job(
                &format!("channel-{i}"),
                300.0,
                &["sms", "voice"],
                json!([{"phone": {"number": number}}]),
            ),
        )
        .await;
        let was_called = calls
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|(_, to)| to == number);
        assert_eq!(was_called, called, "{reason}: {report:#?}");
        let attempts = &report.targets[0].attempts;
        assert_eq!(attempts[0].reason, Some(reason));
        if called {
            assert_eq!(report.status, DeliveryStatus::Sent, "{reason}");
            assert_eq!(attempts.len(), 2, "{reason}");
        } else {
            assert_eq!(report.status, DeliveryStatus::Failed, "{reason}");
            assert_eq!(report.reason, Some(reason));
        }
    }
}

#[tokio::test]
async fn shown_counts_only_from_a_device_that_got_a_push_and_the_answer_shows_the_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let (service, sms) = push_then_sms(dir.path(), "10s").await;
    let targets = json!([
        {"device": {"id": "watch", "platform": "apns", "token": "c3d4e5f6a7b8c9d0", "can_display_code": false}},
        device("old-phone", "unregistered-a1b2c3d4e5f6"),
        device("ipad-1", "a1b2c3d4e5f6a7b8"),
        phone("+14155550101")
    ]);
    let running = spawn_delivery(
        &service,
        job("never-pushed", 60.0, &["push", "sms"], targets),
    );
    pushes_sent(&service, "never-pushed", 1).await;
    let id = "acme/never-pushed".parse().unwrap();
    for (device, why) in [
        ("watch", "DEVICE_CANNOT_DISPLAY_CODE"),
        ("old-phone", "DEVICE_UNREGISTERED"),
    ] {
        let refused = service
            .acknowledge(&id, device, Acknowledgement::Shown)
            .await
            .unwrap_err();
        let status = tonic::Status::from(refused);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{device}");
        assert!(
            status.message().contains(why) && status.message().contains("no push"),
            "{device}: {}",
            status.message()
        );
    }
    let stored = service.ledger().get(&id).await.unwrap().unwrap();
    assert_eq!(stored.status, DeliveryStatus::InProgress);
    assert_eq!(
        stored.targets[0].reason,
        Some(FailureReason::DeviceCannotDisplayCode),
        "the refused acknowledgements rewrote nothing"
    );
    assert_eq!(stored.targets[0].acknowledgement, None);

    // DENIED from any device of the delivery still stops the chain, and the answer is the
    // report after the engine acted on it.
    let AckOutcome::Recorded(answer) = service
        .acknowledge(&id, "watch", Acknowledgement::Denied)
        .await
        .unwrap()
    else {
        panic!("recorded on a running delivery");
    };
    assert_eq!(answer.status, DeliveryStatus::Failed, "{answer:#?}");
    assert_eq!(answer.reason, Some(FailureReason::UserDenied));
    let report = running.await.unwrap();
    assert_eq!(report.status, DeliveryStatus::Failed);
    assert!(sms.call_times().is_empty());
}

/// One provider `only` for every channel, one call per target, its circuit opened by
/// `breaker`, and jobs waiting up to 20 s for a circuit to take calls again.
fn waiting_for_circuits(dir: &std::path::Path, breaker: Value) -> Config {
    let once = json!({"max_attempts": 1});
    engine_config(
        dir,
        json!({"only": provider_settings(dir, "only", once, breaker)}),
        &[
            (
                "routes",
                json!({"push": ["only"], "sms": ["only"], "voice": ["only"]}),
            ),
            ("delivery.circuit_wait", json!("20s")),
        ],
    )
}

/// A job that waits for a circuit has its failed call written down first: whoever reads the
/// delivery meanwhile (GetDelivery, the status page, support) sees why it waits.
#[tokio::test]
async fn a_failed_call_is_in_the_ledger_while_its_job_waits_for_the_circuit() {
    let dir = tempfile::tempdir().unwrap();
    let config = waiting_for_circuits(
        dir.path(),
        json!({"consecutive_failures": 1, "cool_down": "2s"}),
    );
    let only = Scripted::new("only", vec![fail(unavailable())], ok());
    let service = engine(&config, vec![("only", only.clone())]).await;
    let job = sms_job("waits", 60.0, &["+14155550101"]);
    let running = spawn_delivery(&service, job.clone());
    // The call failed and opened the circuit: the job now waits for the cool-down's probe.
    let mut seen = None;
    for _ in 0..150 {
        if let Some(report) = service.ledger().get(&job.delivery_id()).await.unwrap()
            && let Some(attempt) = report.targets[0].attempts.first()
            && attempt.outcome != AttemptOutcome::InFlight
        {
            seen = Some((report.status, attempt.outcome, attempt.reason));
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        seen,
        Some((
            DeliveryStatus::InProgress,
            AttemptOutcome::Failed,
            Some(FailureReason::ProviderUnavailable)
        )),
        "the failed call is written before the wait"
    );
    let report = running.await.unwrap();
    assert_eq!(report.status, DeliveryStatus::Sent, "{report:#?}");
}

#[tokio::test]
async fn jobs_wait_out_an_open_circuit_while_their_codes_are_valid_and_a_probe_releases_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = waiting_for_circuits(
        dir.path(),
        json!({"consecutive_failures": 3, "cool_down": "500ms"}),
    );
    // A short outage: three calls fail, then the provider is back.
    let only = Scripted::new(
        "only",
        vec![
            fail(unavailable()),
            fail(unavailable()),
            fail(unavailable()),
        ],
        ok(),
    );
    let service = engine(&config, vec![("only", only.clone())]).await;
    for i in 0..2 {
        let report = deliver(
            &service,
            &sms_job(&format!("before-{i}"), 60.0, &["+14155550101"]),
        )
        .await;
        assert_eq!(
            report.status,
            DeliveryStatus::Failed,
            "the circuit was closed: a plain failure"
        );
    }
    // The third failure opens the circuit; the jobs arriving meanwhile find it open. None
    // fails: they wait for the cool-down's probe, and its success lets them all go.
    let jobs: Vec<_> = (0..6)
        .map(|i| {
            spawn_delivery(
                &service,
                sms_job(&format!("during-{i}"), 60.0, &["+14155550101"]),
            )
        })
        .collect();
    for job in jobs {
        let report = job.await.unwrap();
        assert_eq!(report.status, DeliveryStatus::Sent, "{report:#?}");
        let attempts = &report.targets[0].attempts;
        assert_eq!(
            attempts.last().unwrap().outcome,
            AttemptOutcome::Sent,
            "{attempts:?}"
        );
    }
    assert_eq!(
        only.call_times().len(),
        3 + 6,
        "no call while the circuit was open: three failures, then one success per job"
    );

    // With the wait off, a job that finds every circuit open fails at once, as before.
    let dir = tempfile::tempdir().unwrap();
    let config = engine_config(
        dir.path(),
        json!({"only": provider_settings(dir.path(), "only", json!({"max_attempts": 1}), json!({"consecutive_failures": 1, "cool_down": "30s"}))}),
        &[
            (
                "routes",
                json!({"push": ["only"], "sms": ["only"], "voice": ["only"]}),
            ),
            ("delivery.circuit_wait", json!("0s")),
        ],
    );
    let only = Scripted::new("only", vec![fail(unavailable())], ok());
    let service = engine(&config, vec![("only", only.clone())]).await;
    deliver(&service, &sms_job("opens", 60.0, &["+14155550101"])).await;
    let report = deliver(&service, &sms_job("finds-it-open", 60.0, &["+14155550101"])).await;
    assert_eq!(report.status, DeliveryStatus::Failed);
    assert!(
        report.targets[0]
            .detail
            .as_deref()
            .unwrap()
            .contains("circuit is open"),
        "{report:#?}"
    );
}

#[tokio::test]
async fn a_number_listed_twice_is_sent_to_once() {
    let dir = tempfile::tempdir().unwrap();
    let failing = HashMap::from([(
        "+14155550301".to_owned(),
        ProviderError::new(FailureReason::CarrierFiltered, Some("30007"), "filtered"),
    )]);
    let texts = Scripted::with_recipients("texts", vec![], ok(), failing);
    let config = engine_config(
        dir.path(),
        json!({"texts": provider_settings(dir.path(), "texts", json!({}), json!({}))}),
        &[(
            "routes",
            json!({"push": ["texts"], "sms": ["texts"], "voice": ["texts"]}),
        )],
    );
    let service = engine(&config, vec![("texts", texts.clone())]).await;
    let report = deliver(
        &service,
        &sms_job(
            "twice",
            60.0,
            &["+14155550301", "+14155550301", "+14155550302"],
        ),
    )
    .await;
    assert_eq!(report.status, DeliveryStatus::Sent);
    assert_eq!(report.targets[1].status, TargetStatus::Skipped);
    assert!(
        report.targets[1]
            .detail
            .as_deref()
            .unwrap()
            .contains("same recipient as target 0"),
        "{report:#?}"
    );
    let to: Vec<String> = texts
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|(_, to)| to.clone())
        .collect();
    assert_eq!(to, ["+14155550301", "+14155550302"], "one call per number");
}
