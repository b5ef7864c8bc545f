//! The Twilio adapter against a local server that speaks Twilio's REST API: it checks the path,
//! Basic auth and form fields, and plays back Twilio's real error bodies for each mapped code.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use otp_gateway::domain::{DeliveryStatus, FailureReason, TargetStatus};
use serde_json::{Value, json};

use crate::engine::{deliver, engine, engine_config, job};

/// `Basic base64("ACtest:secret")`.
const AUTHORIZATION: &str = "Basic QUN0ZXN0OnNlY3JldA==";

#[derive(Debug, Clone)]
struct Call {
    resource: String,
    account: String,
    form: HashMap<String, String>,
}

#[derive(Default)]
pub struct FakeTwilio {
    calls: Mutex<Vec<Call>>,
    throttled_once: Mutex<bool>,
    /// When set (the gateway's callback URL, its auth token): each accepted message's
    /// `delivered` callback is posted before the create request is answered, as real Twilio
    /// can do within milliseconds.
    early_callback: Mutex<Option<(String, String)>>,
    /// What the gateway answered those callbacks.
    pub callback_answers: Mutex<Vec<u16>>,
}

fn twilio_error(status: StatusCode, code: i64, message: &str) -> Response {
    let body = json!({"code": code, "message": message, "more_info": format!("https://www.twilio.com/docs/errors/{code}"), "status": status.as_u16()});
    (status, axum::Json(body)).into_response()
}

async fn create(
    State(fake): State<Arc<FakeTwilio>>,
    Path((account, resource)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    fake.calls.lock().unwrap().push(Call {
        resource: resource.clone(),
        account,
        form: form.clone(),
    });
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(AUTHORIZATION) {
        return twilio_error(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    }
    match form.get("To").map(String::as_str).unwrap_or_default() {
        "+15005550001" => twilio_error(
            StatusCode::BAD_REQUEST,
            21211,
            "The 'To' number +15005550001 is not a valid phone number.",
        ),
        "+15005550003" => twilio_error(
            StatusCode::BAD_REQUEST,
            21408,
            "Permission to send an SMS has not been enabled for the region indicated by the 'To' number: +15005550003.",
        ),
        "+15005550004" => twilio_error(
            StatusCode::BAD_REQUEST,
            21610,
            "Attempt to send to unsubscribed recipient",
        ),
        "+15005550009" => twilio_error(
            StatusCode::BAD_REQUEST,
            21614,
            "'To' number is not a valid mobile number",
        ),
        "+15005550429" if !std::mem::replace(&mut *fake.throttled_once.lock().unwrap(), true) => {
            let mut response =
                twilio_error(StatusCode::TOO_MANY_REQUESTS, 20429, "Too Many Requests");
            response
                .headers_mut()
                .insert("retry-after", "1".parse().unwrap());
            response
        }
        "+15005550503" => {
            (StatusCode::SERVICE_UNAVAILABLE, "upstream connect error").into_response()
        }
        _ => {
            let prefix = if resource == "Calls.json" { "CA" } else { "SM" };
            let sid = format!("{prefix}{}", uuid::Uuid::new_v4().simple());
            let early = fake.early_callback.lock().unwrap().clone();
            if let Some((url, token)) = early {
                let params = vec![
                    ("MessageSid".to_owned(), sid.clone()),
                    ("MessageStatus".to_owned(), "delivered".to_owned()),
                ];
                let signature = otp_gateway::receipts::twilio::signature(&token, &url, &params);
                let fake = Arc::clone(&fake);
                tokio::spawn(async move {
                    let _ = rustls::crypto::ring::default_provider().install_default();
                    let answer = reqwest::Client::new()
                        .post(&url)
                        .header("X-Twilio-Signature", signature)
                        .form(&params)
                        .send()
                        .await
                        .unwrap()
                        .status();
                    fake.callback_answers.lock().unwrap().push(answer.as_u16());
                });
                // The callback is on its way before the SID reaches the gateway.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (
                StatusCode::CREATED,
                axum::Json(json!({"sid": sid, "status": "queued"})),
            )
                .into_response()
        }
    }
}

impl FakeTwilio {
    /// The requests received so far.
    pub fn calls(&self) -> Vec<(String, HashMap<String, String>)> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| (c.resource.clone(), c.form.clone()))
            .collect()
    }
}

pub async fn fake_twilio() -> (String, Arc<FakeTwilio>) {
    let fake = Arc::new(FakeTwilio::default());
    let app = axum::Router::new()
        .route("/2010-04-01/Accounts/{account}/{resource}", post(create))
        .with_state(Arc::clone(&fake));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, fake)
}

fn twilio_config(dir: &std::path::Path, url: &str, token: &str) -> otp_gateway::config::Config {
    let twilio = json!({
        "kind": "twilio", "base_url": url, "account_sid": "ACtest", "auth_token": token,
        "from": "+15005550006", "status_callback": "https://otp.example.com/receipts/twilio",
        "retry": {"initial_interval": "10ms", "max_attempts": 2}
    });
    engine_config(
        dir,
        json!({"twilio": twilio}),
        &[
            (
                "routes",
                json!({"push": ["twilio"], "sms": ["twilio"], "voice": ["twilio"]}),
            ),
            // The fake sends no status callbacks: don't wait for them.
            ("delivery.receipt_wait", json!("0s")),
        ],
    )
}

fn to(number: &str) -> serde_json::Value {
    json!([{"phone": {"number": number}}])
}

#[tokio::test]
async fn sms_and_calls_reach_twilio_with_the_right_request() {
    let dir = tempfile::tempdir().unwrap();
    let (url, fake) = fake_twilio().await;
    let config = twilio_config(dir.path(), &url, "secret");
    assert!(
        !format!("{config:?}").contains("secret"),
        "the auth token is redacted"
    );
    let service = engine(&config, vec![]).await;

    let report = deliver(&service, &job("sms", 300.0, &["sms"], to("+14155550101"))).await;
    assert_eq!(report.status, DeliveryStatus::Sent);
    let attempt = &report.targets[0].attempts[0];
    assert!(
        attempt
            .provider_message_id
            .as_deref()
            .unwrap()
            .starts_with("SM")
    );
    let call = fake.calls.lock().unwrap()[0].clone();
    assert_eq!(
        (call.account.as_str(), call.resource.as_str()),
        ("ACtest", "Messages.json")
    );
    assert_eq!(call.form["To"], "+14155550101");
    assert_eq!(call.form["From"], "+15005550006");
    assert!(call.form["Body"].contains("482913"));
    assert_eq!(
        call.form["StatusCallback"],
        "https://otp.example.com/receipts/twilio"
    );
    let validity: i64 = call.form["ValidityPeriod"].parse().unwrap();
    assert!(
        (290..=300).contains(&validity),
        "seconds left until the code expires: {validity}"
    );

    let report = deliver(
        &service,
        &job("call", 300.0, &["voice"], to("+14155550101")),
    )
    .await;
    assert_eq!(report.status, DeliveryStatus::Sent);
    let call = fake.calls.lock().unwrap()[1].clone();
    assert_eq!(call.resource, "Calls.json");
    let twiml = &call.form["Twiml"];
    assert!(
        twiml.starts_with("<Response><Say language=\"en-US\">")
            && twiml.contains("4, 8, 2, 9, 1, 3. Again: 4, 8, 2, 9, 1, 3."),
        "{twiml}"
    );
}

#[tokio::test]
async fn twilio_errors_are_explained_with_their_code_and_message() {
    let dir = tempfile::tempdir().unwrap();
    let (url, fake) = fake_twilio().await;
    let service = engine(&twilio_config(dir.path(), &url, "secret"), vec![]).await;
    let cases = [
        ("+15005550001", FailureReason::InvalidRecipient, "21211"),
        (
            "+15005550003",
            FailureReason::DestinationNotPermitted,
            "21408",
        ),
        ("+15005550004", FailureReason::RecipientOptedOut, "21610"),
        ("+15005550009", FailureReason::NotMobileNumber, "21614"),
        ("+15005550503", FailureReason::ProviderUnavailable, "503"),
    ];
    for (i, (number, reason, code)) in cases.into_iter().enumerate() {
        let report = deliver(
            &service,
            &job(&format!("e-{i}"), 300.0, &["sms"], to(number)),
        )
        .await;
        let target = &report.targets[0];
        assert_eq!(target.status, TargetStatus::Failed, "{number}");
        assert_eq!(target.reason, Some(reason), "{number}");
        let attempt = target.attempts.last().unwrap();
        assert_eq!(attempt.provider_code.as_deref(), Some(code), "{number}");
        let message = attempt.provider_message.as_deref().unwrap();
        assert!(!message.is_empty());
        // Twilio quotes the number in its own text: it is masked like every other number.
        let digits = &number[1..];
        assert!(
            !message.contains(digits) && !report.summary.contains(digits),
            "{message} / {}",
            report.summary
        );
    }
    let quoted = deliver(
        &service,
        &job("quoted", 300.0, &["sms"], to("+15005550001")),
    )
    .await;
    assert_eq!(
        quoted.targets[0].attempts[0].provider_message.as_deref(),
        Some("The 'To' number +1500•••0001 is not a valid phone number.")
    );
    // Nowhere in the ledger's files either (the database and its write-ahead log).
    service.flush().await.unwrap();
    for file in ["ledger.db", "ledger.db-wal"] {
        let bytes = std::fs::read(dir.path().join(file)).unwrap_or_default();
        for number in ["15005550001", "15005550003"] {
            assert!(
                !bytes.windows(number.len()).any(|w| w == number.as_bytes()),
                "{number} in {file}"
            );
        }
    }
    // 503 is transient: retried once (max_attempts 2) before giving up.
    let outage_calls = fake
        .calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.form["To"] == "+15005550503")
        .count();
    assert_eq!(outage_calls, 2);

    // 429 with Retry-After: waited for and retried.
    let report = deliver(
        &service,
        &job("throttled", 300.0, &["sms"], to("+15005550429")),
    )
    .await;
    assert_eq!(report.status, DeliveryStatus::Sent);
    let attempts = &report.targets[0].attempts;
    assert_eq!(attempts[0].reason, Some(FailureReason::ProviderThrottled));
    assert!(
        attempts[1]
            .started_at
            .duration_since(attempts[0].ended_at.unwrap())
            >= jiff::SignedDuration::from_millis(950)
    );

    // A wrong auth token is the gateway's misconfiguration.
    let dir = tempfile::tempdir().unwrap();
    let service = engine(&twilio_config(dir.path(), &url, "wrong"), vec![]).await;
    let report = deliver(&service, &job("auth", 300.0, &["sms"], to("+14155550101"))).await;
    assert_eq!(
        report.targets[0].reason,
        Some(FailureReason::ProviderMisconfigured)
    );
    assert_eq!(
        report.targets[0].attempts[0].provider_code.as_deref(),
        Some("20003")
    );
}

#[tokio::test]
async fn signed_status_callbacks_move_deliveries_and_forged_ones_are_refused() {
    use crate::helpers::{Broker, Gateway, Names, broker_available, config};
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (url, _fake) = fake_twilio().await;
    let names = Names::new("receipts");
    let mut broker = Broker::connect(&names).await;
    let twilio = json!({"kind": "twilio", "base_url": url, "account_sid": "ACtest", "auth_token": "secret", "from": "+15005550006"});
    let overrides = [
        ("providers.twilio", twilio),
        (
            "routes",
            json!({"push": ["sandbox"], "sms": ["twilio"], "voice": ["twilio"]}),
        ),
    ];
    let gateway = Gateway::start(config(&names, dir.path(), &overrides)).await;
    let callback_url = format!("http://{}/receipts/twilio/twilio", gateway.receipts_addr);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let post = |params: Vec<(String, String)>, signature: String| {
        let (http, callback_url) = (http.clone(), callback_url.clone());
        async move {
            http.post(&callback_url)
                .header("X-Twilio-Signature", signature)
                .form(&params)
                .send()
                .await
                .unwrap()
                .status()
        }
    };

    let send = |job_id: &str| {
        let mut job = crate::helpers::job(job_id, "482913");
        job["targets"] = json!([{"phone": {"number": "+14155550101"}}]);
        job
    };
    broker.publish_json(&send("r-1")).await;
    let (_, sent) = broker.next_event(Duration::from_secs(20)).await;
    assert_eq!(sent["status"], "SENT");
    let sid = sent["targets"][0]["attempts"][0]["provider_message_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let delivered = vec![
        ("MessageSid".to_owned(), sid.clone()),
        ("MessageStatus".to_owned(), "delivered".to_owned()),
    ];
    let forged =
        otp_gateway::receipts::twilio::signature("not-the-token", &callback_url, &delivered);
    assert_eq!(post(delivered.clone(), forged).await, StatusCode::FORBIDDEN);
    let signed = otp_gateway::receipts::twilio::signature("secret", &callback_url, &delivered);
    assert_eq!(post(delivered, signed).await, StatusCode::NO_CONTENT);
    let (routing_key, report) = broker.next_event(Duration::from_secs(20)).await;
    assert_eq!(routing_key, "delivery.delivered");
    assert_eq!(report["targets"][0]["attempts"][0]["outcome"], "DELIVERED");

    // A failure receipt: the report says why, with Twilio's code.
    broker.publish_json(&send("r-2")).await;
    let (_, sent) = broker.next_event(Duration::from_secs(20)).await;
    let sid = sent["targets"][0]["attempts"][0]["provider_message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let failed = vec![
        ("MessageSid".to_owned(), sid),
        ("MessageStatus".to_owned(), "undelivered".to_owned()),
        ("ErrorCode".to_owned(), "30005".to_owned()),
    ];
    let signed = otp_gateway::receipts::twilio::signature("secret", &callback_url, &failed);
    assert_eq!(post(failed, signed).await, StatusCode::NO_CONTENT);
    let (routing_key, report) = broker.next_event(Duration::from_secs(20)).await;
    assert_eq!(routing_key, "delivery.failed");
    assert_eq!(report["reason"], "RECIPIENT_UNKNOWN");
    assert_eq!(
        report["targets"][0]["attempts"][0]["provider_code"],
        "30005"
    );

    // The metrics count both receipts and the deliveries they settled.
    let (_, metrics) = crate::ops::get(gateway.ops_addr, "/metrics", None).await;
    if let Some(parsed) = crate::ops::Exposition::parse(&metrics) {
        for outcome in ["DELIVERED", "FAILED"] {
            assert_eq!(
                parsed.value(
                    "otp_receipts_total",
                    json!({"provider": "twilio", "outcome": outcome})
                ),
                Some(1.0),
                "{metrics}"
            );
        }
        for (status, reason) in [("DELIVERED", ""), ("FAILED", "RECIPIENT_UNKNOWN")] {
            assert_eq!(
                parsed.value(
                    "otp_deliveries_settled_total",
                    json!({"tenant": "acme", "status": status, "reason": reason})
                ),
                Some(1.0),
                "{metrics}"
            );
        }
        assert_eq!(
            parsed.value(
                "otp_time_to_delivered_seconds_count",
                json!({"channel": "sms"})
            ),
            Some(1.0),
            "{metrics}"
        );
    }
    gateway.stop().await;
    broker.cleanup().await;
}

/// A job of tenant `tenant` in `locale` for `purpose`, by SMS or voice to a good number.
fn localized_job(
    id: &str,
    tenant: &str,
    purpose: &str,
    locale: &str,
    channel: &str,
) -> otp_gateway::domain::Job {
    let body = json!({
        "job_id": id, "tenant": tenant, "account": "user-42", "code": "482913",
        "expires_at": crate::engine::in_secs(300.0), "purpose": purpose, "locale": locale,
        "channels": [channel], "targets": to("+14155550101"),
    });
    otp_gateway::domain::Job::from_json(body.to_string().as_bytes()).unwrap()
}

#[tokio::test]
async fn templates_follow_the_locale_and_the_tenants_autofill_format() {
    let dir = tempfile::tempdir().unwrap();
    let (url, fake) = fake_twilio().await;
    let mut config = twilio_config(dir.path(), &url, "secret");
    let tenants = json!({
        "acme": {"app_name": "Acme", "autofill": {"format": "origin_bound", "domain": "acme.example"}},
        "droid": {"autofill": {"format": "android_app_hash", "hash": "FA+9qCX9VSu"}},
    });
    config.tenants = serde_json::from_value(tenants).unwrap();
    config.templates = serde_json::from_value(json!({
        "sign_up": {"fr": {"sms": "Bienvenue sur {{app_name}} ! Code : {{code}}"}}
    }))
    .unwrap();
    config.validate().unwrap();
    let service = engine(&config, vec![]).await;
    let body_of = |i: usize| fake.calls.lock().unwrap()[i].form["Body"].clone();

    let report = deliver(
        &service,
        &localized_job("de", "acme", "sign_in", "de-AT", "sms"),
    )
    .await;
    assert_eq!(report.status, DeliveryStatus::Sent);
    assert_eq!(
        body_of(0),
        "482913 ist Ihr Anmeldecode für Acme. Gültig für 5 Min. Bitte nicht weitergeben.\n\n@acme.example #482913"
    );
    let sms = report.targets[0].attempts[0]
        .sms
        .expect("the SMS shape is recorded");
    assert_eq!((sms.encoding.as_str(), sms.segments), ("GSM_7", 1));

    let report = deliver(
        &service,
        &localized_job("es", "acme", "password_reset", "es", "sms"),
    )
    .await;
    assert!(body_of(1).starts_with("482913 es tu código para restablecer la contraseña de Acme."));
    let sms = report.targets[0].attempts[0].sms.unwrap();
    assert_eq!(
        (sms.encoding.as_str(), sms.segments),
        ("UCS_2", 2),
        "{}",
        body_of(1)
    );

    deliver(
        &service,
        &localized_job("ja", "droid", "sign_in", "ja-JP", "sms"),
    )
    .await;
    assert_eq!(
        body_of(2),
        "Exampleのログインコードは482913です。有効期限は5分です。他の人に教えないでください。\n\nFA+9qCX9VSu"
    );

    deliver(
        &service,
        &localized_job("fr", "acme", "sign_up", "fr-CA", "sms"),
    )
    .await;
    assert_eq!(
        body_of(3),
        "Bienvenue sur Acme ! Code : 482913\n\n@acme.example #482913"
    );

    // Unknown locale: English; the call speaks the language of the text.
    let report = deliver(
        &service,
        &localized_job("it", "acme", "sign_in", "it-IT", "voice"),
    )
    .await;
    assert!(report.targets[0].attempts[0].sms.is_none());
    let twiml = fake.calls.lock().unwrap()[4].form["Twiml"].clone();
    assert_eq!(
        twiml,
        "<Response><Say language=\"en-US\">Your Acme sign-in code is: 4, 8, 2, 9, 1, 3. Again: 4, 8, 2, 9, 1, 3.</Say></Response>"
    );
}

#[test]
fn bad_templates_and_autofill_settings_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = twilio_config(dir.path(), "http://127.0.0.1:9", "secret");
    config.templates =
        serde_json::from_value(json!({"*": {"de": {"sms": "Code {{kode}}"}}})).unwrap();
    let error = config.validate().unwrap_err().to_string();
    assert!(
        error.contains("templates.*.de.sms") && error.contains("{{kode}}"),
        "{error}"
    );
    config.templates.clear();
    config.tenants = serde_json::from_value(
        json!({"acme": {"autofill": {"format": "android_app_hash", "hash": "nope"}}}),
    )
    .unwrap();
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("tenants.acme.autofill"), "{error}");
}

#[tokio::test]
async fn a_failure_callback_while_the_code_is_valid_moves_on_to_the_next_number() {
    let dir = tempfile::tempdir().unwrap();
    let (url, fake) = fake_twilio().await;
    let mut config = twilio_config(dir.path(), &url, "secret");
    config.delivery.receipt_wait = std::time::Duration::from_secs(2);
    let service = engine(&config, vec![]).await;
    let job = job(
        "callback-chain",
        300.0,
        &["sms"],
        json!([{"phone": {"number": "+14155550101"}}, {"phone": {"number": "+14155550102"}}]),
    );
    let running = crate::engine::spawn_delivery(&service, job);
    // Twilio accepted the first number; its status callback says the handset is unknown.
    let sid = loop {
        let report = service
            .ledger()
            .get(&"acme/callback-chain".parse().unwrap())
            .await
            .unwrap();
        if let Some(id) = report
            .as_ref()
            .and_then(|r| r.targets[0].attempts.first())
            .and_then(|a| a.provider_message_id.clone())
        {
            break id;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let params = vec![
        ("MessageSid".to_owned(), sid),
        ("MessageStatus".to_owned(), "undelivered".to_owned()),
        ("ErrorCode".to_owned(), "30005".to_owned()),
    ];
    let receipt = otp_gateway::receipts::twilio::receipt("twilio", &params).unwrap();
    assert!(
        otp_gateway::receipts::apply(&service, None, &receipt)
            .await
            .unwrap()
    );
    let report = running.await.unwrap();
    assert_eq!(report.targets[0].status, TargetStatus::Failed);
    assert_eq!(
        report.targets[0].reason,
        Some(FailureReason::RecipientUnknown)
    );
    assert_eq!(report.targets[1].status, TargetStatus::Sent);
    assert_eq!(report.status, DeliveryStatus::Sent);
    let numbers: Vec<String> = fake
        .calls()
        .into_iter()
        .map(|(_, f)| f["To"].clone())
        .collect();
    assert_eq!(numbers, ["+14155550101", "+14155550102"]);
}

#[tokio::test]
async fn a_status_callback_that_overtakes_the_send_s_answer_is_held_and_applied() {
    use crate::helpers::{Broker, Gateway, Names, broker_available, config};
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (url, fake) = fake_twilio().await;
    let names = Names::new("early-callback");
    let mut broker = Broker::connect(&names).await;
    let twilio = json!({"kind": "twilio", "base_url": url, "account_sid": "ACtest", "auth_token": "secret", "from": "+15005550006"});
    let overrides = [
        ("providers.twilio", twilio),
        (
            "routes",
            json!({"push": ["sandbox"], "sms": ["twilio"], "voice": ["twilio"]}),
        ),
    ];
    let gateway = Gateway::start(config(&names, dir.path(), &overrides)).await;
    *fake.early_callback.lock().unwrap() = Some((
        format!("http://{}/receipts/twilio/twilio", gateway.receipts_addr),
        "secret".to_owned(),
    ));
    let mut job = crate::helpers::job("early", "482913");
    job["targets"] = json!([{"phone": {"number": "+14155550101"}}]);
    broker.publish_json(&job).await;
    let (first, _) = broker.next_event(Duration::from_secs(20)).await;
    let (routing_key, report) = if first == "delivery.sent" {
        broker.next_event(Duration::from_secs(20)).await
    } else {
        (first, Value::Null)
    };
    assert_eq!(routing_key, "delivery.delivered", "{report}");
    crate::helpers::eventually(Duration::from_secs(10), "the callback answered", || {
        !fake.callback_answers.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(*fake.callback_answers.lock().unwrap(), [204]);
    gateway.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn the_status_callback_is_derived_from_the_receipts_public_url_unless_set() {
    let dir = tempfile::tempdir().unwrap();
    let (url, fake) = fake_twilio().await;
    let mut config = twilio_config(dir.path(), &url, "secret");
    let Some(otp_gateway::config::KindSettings::Twilio(twilio)) = config
        .providers
        .get_mut("twilio")
        .map(|provider| &mut provider.kind)
    else {
        panic!("a Twilio provider");
    };
    twilio.status_callback = None;
    config.receipts.public_url = "https://otp.example.com/".into();
    let service = engine(&config, vec![]).await;
    deliver(
        &service,
        &job("derived", 300.0, &["sms"], to("+14155550101")),
    )
    .await;
    let (_, form) = fake.calls().pop().unwrap();
    assert_eq!(
        form.get("StatusCallback").map(String::as_str),
        Some("https://otp.example.com/receipts/twilio/twilio"),
        "the URL the receipts listener verifies signatures against"
    );

    // Without a public URL there is none to derive: no callbacks are asked for.
    let dir = tempfile::tempdir().unwrap();
    let mut config = twilio_config(dir.path(), &url, "secret");
    if let Some(otp_gateway::config::KindSettings::Twilio(twilio)) = config
        .providers
        .get_mut("twilio")
        .map(|provider| &mut provider.kind)
    {
        twilio.status_callback = None;
    }
    let service = engine(&config, vec![]).await;
    deliver(&service, &job("none", 300.0, &["sms"], to("+14155550101"))).await;
    let (_, form) = fake.calls().pop().unwrap();
    assert!(!form.contains_key("StatusCallback"));
}
