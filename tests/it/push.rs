//! APNs and FCM against local HTTP/2 servers that speak their protocols. The APNs server checks
//! the ES256 provider token with the key's public half, the headers and the path, and plays back
//! APNs' answers by device token. The OAuth endpoint checks the service account's RS256
//! assertion; the FCM endpoint checks the access token and the message and plays back FCM's
//! errors. Then the device-token feedback: a block entry, `device.invalidated` on the events
//! exchange, and the push → SMS fallback in the same delivery.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt;
use axum::{Form, Json, Router};
use futures_util::StreamExt;
use otp_gateway::config::Config;
use otp_gateway::delivery::DeliveryService;
use otp_gateway::domain::{AttemptOutcome, DeliveryStatus, FailureReason, TargetStatus};
use otp_gateway::policy::{BlockKind, BlockSource};
use otp_gateway::sim::verify_jwt;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    RSA_PKCS1_2048_8192_SHA256, RsaKeyPair,
};
use serde_json::{Value, json};

use crate::engine::{deliver, engine, engine_config, job};
use crate::helpers::{Broker, Gateway, Names, broker_available, config, in_minutes, outbox};

const TEAM_ID: &str = "TEAM123456";
const KEY_ID: &str = "KEY1234567";
const TOPICS: [&str; 2] = ["com.example.app", "com.example.b"];
/// When the fake APNs says dead tokens died (ms since the epoch): 2026-11-20T10:00:00Z.
const DEAD_SINCE_MS: i64 = 1_795_255_200_000;
const CLIENT_EMAIL: &str = "gateway@otp-test.iam.gserviceaccount.com";
const FCM_KEY_ID: &str = "test-key-1";
const FCM_PROJECT: &str = "otp-test";

/// Serves `router` on a fresh port over HTTP/1.1 and cleartext HTTP/2; counts connections.
async fn serve(router: Router) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&connections);
    let listener = listener.tap_io(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, connections)
}

fn now_secs() -> i64 {
    jiff::Timestamp::now().as_second()
}

fn text(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// One request that reached the fake APNs.
#[derive(Debug, Clone)]
pub struct ApnsPush {
    pub token: String,
    pub topic: String,
    pub jwt: String,
    pub headers: HeaderMap,
    pub payload: Value,
    pub status: u16,
}

#[derive(Default)]
struct ApnsLog {
    pushes: Vec<ApnsPush>,
    violations: Vec<String>,
    per_token: HashMap<String, u32>,
    /// Requests being answered now, and the most there were at once.
    in_flight: (usize, usize),
}

struct ApnsState {
    public: Vec<u8>,
    log: Mutex<ApnsLog>,
}

/// A local APNs: `POST /3/device/<token>` over HTTP/2 with token authentication. By the
/// token's first four hex digits: `dead` 410 Unregistered with a timestamp, `bad0`
/// BadDeviceToken, `0429` TooManyRequests with Retry-After 1 (first time), `0403`
/// ExpiredProviderToken (first time), `0503` ServiceUnavailable; anything else 200.
pub struct FakeApns {
    pub url: String,
    /// The team's `.p8` key (PEM) the gateway signs with.
    pub key_pem: String,
    state: Arc<ApnsState>,
    connections: Arc<AtomicUsize>,
}

impl FakeApns {
    pub async fn start() -> FakeApns {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &SystemRandom::new(),
        )
        .unwrap();
        let state = Arc::new(ApnsState {
            public: pair.public_key().as_ref().to_vec(),
            log: Mutex::default(),
        });
        let router = Router::new()
            .route("/3/device/{token}", post(apns_push))
            .with_state(Arc::clone(&state));
        let (url, connections) = serve(router).await;
        FakeApns {
            url,
            key_pem: pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec())),
            state,
            connections,
        }
    }

    pub fn pushes(&self) -> Vec<ApnsPush> {
        self.state.log.lock().unwrap().pushes.clone()
    }

    pub fn violations(&self) -> Vec<String> {
        self.state.log.lock().unwrap().violations.clone()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The most requests that were being answered at once.
    pub fn max_concurrent(&self) -> usize {
        self.state.log.lock().unwrap().in_flight.1
    }

    /// A provider section for this server.
    pub fn provider(&self, topics: &[&str]) -> Value {
        json!({
            "kind": "apns", "team_id": TEAM_ID, "key_id": KEY_ID, "key": self.key_pem,
            "topics": topics, "environment": "sandbox", "base_url": self.url,
            "retry": {"initial_interval": "50ms", "max_interval": "2s", "max_attempts": 3},
            // The tests play many errors in a row: the breaker is not what they are about.
            "breaker": {"window": 100, "min_calls": 100, "consecutive_failures": 100},
        })
    }
}

fn apns_answer(status: u16, reason: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        Json(json!({ "reason": reason })),
    )
        .into_response()
}

async fn apns_push(
    State(state): State<Arc<ApnsState>>,
    version: Version,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut problems = Vec::new();
    if version != Version::HTTP_2 {
        problems.push(format!("{version:?} instead of HTTP/2"));
    }
    let authorization = text(&headers, "authorization");
    let jwt = authorization
        .strip_prefix("bearer ")
        .unwrap_or_default()
        .to_owned();
    match verify_jwt(&jwt, &ECDSA_P256_SHA256_FIXED, &state.public) {
        Ok((header, claims)) => {
            if header["alg"] != "ES256" || header["kid"] != KEY_ID {
                problems.push(format!("provider token header {header}"));
            }
            let iat = claims["iat"].as_i64().unwrap_or_default();
            if claims["iss"] != TEAM_ID || (now_secs() - iat).abs() > 3600 {
                problems.push(format!("provider token claims {claims}"));
            }
        }
        Err(problem) => {
            state.log.lock().unwrap().violations.push(problem);
            return apns_answer(403, "InvalidProviderToken");
        }
    }
    let topic = text(&headers, "apns-topic");
    if !TOPICS.contains(&topic.as_str()) {
        problems.push(format!("apns-topic {topic:?}"));
    }
    for (name, wanted) in [("apns-push-type", "alert"), ("apns-priority", "10")] {
        if text(&headers, name) != wanted {
            problems.push(format!("{name} {:?}", text(&headers, name)));
        }
    }
    let expiration = text(&headers, "apns-expiration")
        .parse::<i64>()
        .unwrap_or(0);
    if expiration <= now_secs() {
        problems.push(format!("apns-expiration {expiration} is not in the future"));
    }
    let collapse = text(&headers, "apns-collapse-id");
    if collapse.is_empty() || collapse.len() > 64 {
        problems.push(format!("apns-collapse-id {collapse:?}"));
    }
    let payload: Value = serde_json::from_slice(&body).unwrap_or_default();
    // Accepted pushes take a moment, so that concurrent ones overlap (streams on one connection).
    if token.starts_with("0000") {
        {
            let mut log = state.log.lock().unwrap();
            log.in_flight.0 += 1;
            log.in_flight.1 = log.in_flight.1.max(log.in_flight.0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        state.log.lock().unwrap().in_flight.0 -= 1;
    }
    if !payload["aps"]["alert"]["body"].is_string()
        || payload["aps"]["category"] != "OTP_CODE"
        || !payload["otp"]["code"].is_string()
    {
        problems.push(format!("payload {payload}"));
    }
    let mut log = state.log.lock().unwrap();
    if !problems.is_empty() {
        log.violations.extend(problems);
        return apns_answer(400, "BadRequestSeenByTheTest");
    }
    let seen = {
        let count = log.per_token.entry(token.clone()).or_default();
        *count += 1;
        *count
    };
    let response = match (&token[..4.min(token.len())], seen) {
        ("dead", _) => (
            StatusCode::GONE,
            Json(json!({"reason": "Unregistered", "timestamp": DEAD_SINCE_MS})),
        )
            .into_response(),
        ("bad0", _) => apns_answer(400, "BadDeviceToken"),
        ("0429", 1) => {
            let mut response = apns_answer(429, "TooManyRequests");
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            response
        }
        ("0403", 1) => apns_answer(403, "ExpiredProviderToken"),
        ("0503", _) => apns_answer(503, "ServiceUnavailable"),
        _ => {
            let mut response = StatusCode::OK.into_response();
            let id = format!("00000000-0000-4000-8000-{:012}", log.pushes.len());
            response
                .headers_mut()
                .insert("apns-id", HeaderValue::from_str(&id).unwrap());
            response
        }
    };
    log.pushes.push(ApnsPush {
        token,
        topic,
        jwt,
        headers,
        payload,
        status: response.status().as_u16(),
    });
    response
}

/// A 64-digit APNs token starting with `prefix`, unique by `n`.
fn apns_token(prefix: &str, n: usize) -> String {
    format!("{prefix}{:0>width$x}", n, width = 64 - prefix.len())
}

fn apns_device(id: &str, token: &str, topic: Option<&str>) -> Value {
    json!({"device": {"id": id, "platform": "apns", "token": token, "topic": topic}})
}

fn fcm_device(id: &str, token: &str, project: Option<&str>) -> Value {
    json!({"device": {"id": id, "platform": "fcm", "token": token, "topic": project}})
}

/// A delivery engine over its own ledger whose push route is `providers` (name, section), in
/// order. Pushes end at the push service (no acknowledgement wait) for tenant `acme`. Keep
/// `_dir` bound: the ledger lives in it.
struct PushEngine {
    service: Arc<DeliveryService>,
    config: Config,
    _dir: tempfile::TempDir,
}

async fn push_engine(providers: &[(&str, Value)]) -> PushEngine {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<&str> = providers.iter().map(|(name, _)| *name).collect();
    let sections: serde_json::Map<String, Value> = providers
        .iter()
        .map(|(name, section)| (name.to_string(), section.clone()))
        .collect();
    let config = engine_config(
        dir.path(),
        Value::Object(sections),
        &[
            ("routes.push", json!(names)),
            ("tenants.acme.push_acknowledgement", json!(false)),
        ],
    );
    let service = engine(&config, vec![]).await;
    PushEngine {
        service,
        config,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn apns_pushes_are_signed_once_multiplexed_on_one_connection_and_carry_the_code() {
    let apns = FakeApns::start().await;
    let PushEngine { service, _dir, .. } = push_engine(&[("apns", apns.provider(&TOPICS))]).await;
    let jobs: Vec<_> = (0..20)
        .map(|n| {
            job(
                &format!("apns-ok-{n}"),
                300.0,
                &["push"],
                json!([apns_device(
                    "iphone",
                    &apns_token("0000", n),
                    Some("com.example.app")
                )]),
            )
        })
        .collect();
    let reports = futures_util::future::join_all(jobs.iter().map(|j| deliver(&service, j))).await;
    assert_eq!(apns.violations(), Vec::<String>::new());
    for report in &reports {
        assert_eq!(report.status, DeliveryStatus::Sent, "{}", report.summary);
        let attempt = &report.targets[0].attempts[0];
        assert_eq!(attempt.provider, "apns");
        assert!(
            attempt
                .provider_message_id
                .as_deref()
                .unwrap()
                .starts_with("00000000-")
        );
    }
    let pushes = apns.pushes();
    assert_eq!(pushes.len(), 20);
    assert_eq!(
        apns.connections(),
        1,
        "every push shares one HTTP/2 connection"
    );
    assert!(
        apns.max_concurrent() > 1,
        "pushes are multiplexed: {} at once",
        apns.max_concurrent()
    );
    let tokens: HashSet<_> = pushes.iter().map(|p| p.jwt.clone()).collect();
    assert_eq!(tokens.len(), 1, "one provider token for all pushes");
    let push = &pushes[0];
    assert_eq!(push.topic, "com.example.app");
    assert!(
        push.payload["aps"]["alert"]["body"]
            .as_str()
            .unwrap()
            .contains("482913")
    );
    assert_eq!(push.payload["otp"]["code"], "482913");
    // With the token its acknowledgement must carry (128 bits, base64url).
    assert_eq!(
        push.payload["otp"]["ack_token"].as_str().map(str::len),
        Some(22)
    );
    let expiry = jobs[0].expires_at.as_second().to_string();
    let expirations: HashSet<_> = pushes
        .iter()
        .map(|p| text(&p.headers, "apns-expiration"))
        .collect();
    assert!(expirations.contains(&expiry));
    assert!(
        pushes
            .iter()
            .any(|p| text(&p.headers, "apns-collapse-id") == "acme/apns-ok-0")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn apns_answers_become_reasons_retries_and_a_new_provider_token() {
    let apns = FakeApns::start().await;
    let PushEngine {
        service,
        config,
        _dir,
    } = push_engine(&[("apns", apns.provider(&TOPICS))]).await;
    let one = |id: &str, token: String| {
        job(
            id,
            300.0,
            &["push"],
            json!([apns_device("iphone", &token, None)]),
        )
    };

    let dead = deliver(&service, &one("dead", apns_token("dead", 1))).await;
    let target = &dead.targets[0];
    assert_eq!(dead.status, DeliveryStatus::Failed);
    assert_eq!(target.reason, Some(FailureReason::DeviceUnregistered));
    assert_eq!(
        target.hint,
        Some("the app was removed or its token rotated: remove this device")
    );
    let attempt = &target.attempts[0];
    assert_eq!(attempt.provider_code.as_deref(), Some("Unregistered"));
    let since = jiff::Timestamp::from_millisecond(DEAD_SINCE_MS).unwrap();
    assert_eq!(attempt.token_invalid_since, Some(since));
    assert_eq!(target.attempts.len(), 1, "a dead token is not retried");

    let bad = deliver(&service, &one("bad", apns_token("bad0", 1))).await;
    assert_eq!(
        bad.targets[0].reason,
        Some(FailureReason::DeviceTokenInvalid)
    );
    assert_eq!(
        bad.targets[0].attempts[0].provider_code.as_deref(),
        Some("BadDeviceToken")
    );
    // A token the adapter refuses before any request is the job's input, not APNs' word.
    let local = deliver(&service, &one("local", "not-hex-at-all".into())).await;
    assert_eq!(
        local.targets[0].reason,
        Some(FailureReason::InvalidRecipient)
    );
    assert!(local.targets[0].attempts[0].provider_code.is_none());
    // Neither an invalid token (often the wrong environment or app: our configuration) nor a
    // local refusal announces the device dead; only the dead one does (and only it is blocked,
    // below).
    for report in [&bad, &local] {
        assert!(report.invalidated_devices().is_empty(), "{report:#?}");
    }
    assert_eq!(dead.invalidated_devices().len(), 1);

    let throttled = deliver(&service, &one("throttled", apns_token("0429", 1))).await;
    assert_eq!(throttled.status, DeliveryStatus::Sent);
    let attempts = &throttled.targets[0].attempts;
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].reason, Some(FailureReason::ProviderThrottled));
    assert_eq!(
        attempts[0].provider_code.as_deref(),
        Some("TooManyRequests")
    );
    let waited = attempts[1]
        .started_at
        .duration_since(attempts[0].started_at);
    assert!(
        waited >= jiff::SignedDuration::from_millis(990),
        "Retry-After honoured: {waited:?}"
    );

    let expired = deliver(&service, &one("expired", apns_token("0403", 1))).await;
    assert_eq!(expired.status, DeliveryStatus::Sent, "{}", expired.summary);
    assert_eq!(
        expired.targets[0].attempts.len(),
        1,
        "re-signed inside one attempt"
    );
    let pushes = apns.pushes();
    let to_expired: Vec<_> = pushes
        .iter()
        .filter(|p| p.token.starts_with("0403"))
        .collect();
    assert_eq!(to_expired.len(), 2);
    assert_eq!((to_expired[0].status, to_expired[1].status), (403, 200));
    assert_ne!(
        to_expired[0].jwt, to_expired[1].jwt,
        "signed a new provider token"
    );
    // The new token stays in use.
    let after = deliver(&service, &one("after", apns_token("0000", 7))).await;
    assert_eq!(after.status, DeliveryStatus::Sent);
    assert_eq!(apns.pushes().last().unwrap().jwt, to_expired[1].jwt);

    let down = deliver(&service, &one("down", apns_token("0503", 1))).await;
    assert_eq!(down.status, DeliveryStatus::Failed);
    assert_eq!(
        down.targets[0].reason,
        Some(FailureReason::ProviderUnavailable)
    );
    assert_eq!(
        down.targets[0].attempts.len(),
        3,
        "transient: retried up to max_attempts"
    );
    assert!(
        down.targets[0]
            .attempts
            .iter()
            .all(|a| a.provider_code.as_deref() == Some("ServiceUnavailable"))
    );
    assert_eq!(apns.violations(), Vec::<String>::new());

    // Only the dead token is on the tenant's block list, from provider feedback: not the
    // invalid one, not the one refused locally.
    let store = otp_gateway::store::open(&config.store)
        .await
        .unwrap()
        .policy;
    let blocks = store.list_blocks(Some("acme")).await.unwrap();
    let blocked: HashSet<_> = blocks
        .iter()
        .filter(|b| b.kind == BlockKind::DeviceToken && b.source == BlockSource::ProviderFeedback)
        .map(|b| b.shown.clone())
        .collect();
    assert_eq!(
        blocked,
        HashSet::from([BlockKind::DeviceToken.shown(&apns_token("dead", 1))])
    );
    // A later job to the dead token is refused before any call.
    let again = deliver(&service, &one("dead-again", apns_token("dead", 1))).await;
    assert_eq!(
        again.targets[0].reason,
        Some(FailureReason::RecipientBlocked)
    );
    assert!(again.targets[0].attempts.is_empty());
}

/// One request that reached the fake FCM.
#[derive(Debug, Clone)]
pub struct FcmSend {
    pub project: String,
    pub access_token: String,
    pub message: Value,
}

#[derive(Default)]
struct FcmLog {
    token_requests: u32,
    issued: Vec<String>,
    revoked: HashSet<String>,
    sends: Vec<FcmSend>,
    violations: Vec<String>,
    per_token: HashMap<String, u32>,
}

struct FcmState {
    public: Vec<u8>,
    token_uri: Mutex<String>,
    log: Mutex<FcmLog>,
}

/// A local Google OAuth token endpoint (`POST /token`, JWT-bearer grant) and FCM HTTP v1
/// (`POST /v1/projects/{project}/messages:send`). By registration token prefix: `unreg` 404
/// UNREGISTERED, `invalid` 400 INVALID_ARGUMENT on message.token, `mismatch` 403
/// SENDER_ID_MISMATCH, `quota` 429 QUOTA_EXCEEDED with Retry-After 1 (first time),
/// `unavailable` 503 UNAVAILABLE with Retry-After 1, `internal` 500 INTERNAL (first time),
/// `thirdparty` 401 THIRD_PARTY_AUTH_ERROR; anything else 200.
pub struct FakeFcm {
    pub url: String,
    state: Arc<FcmState>,
    connections: Arc<AtomicUsize>,
    /// The service-account JSON key file.
    pub service_account: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeFcm {
    pub async fn start() -> FakeFcm {
        let key_pem = include_str!("../fixtures/fcm-service-account-key.pem");
        let der = pem::parse(key_pem).unwrap().into_contents();
        let pair = RsaKeyPair::from_pkcs8(&der).unwrap();
        let state = Arc::new(FcmState {
            public: pair.public_key().as_ref().to_vec(),
            token_uri: Mutex::default(),
            log: Mutex::default(),
        });
        let router = Router::new()
            .route("/token", post(oauth_token))
            .route("/v1/projects/{project}/messages:send", post(fcm_send))
            .with_state(Arc::clone(&state));
        let (url, connections) = serve(router).await;
        let token_uri = format!("{url}/token");
        *state.token_uri.lock().unwrap() = token_uri.clone();
        let dir = tempfile::tempdir().unwrap();
        let service_account = dir.path().join("service-account.json");
        let json = json!({
            "type": "service_account", "project_id": FCM_PROJECT, "private_key_id": FCM_KEY_ID,
            "private_key": key_pem, "client_email": CLIENT_EMAIL, "client_id": "1",
            "token_uri": token_uri,
        });
        std::fs::write(&service_account, json.to_string()).unwrap();
        FakeFcm {
            url,
            state,
            connections,
            service_account,
            _dir: dir,
        }
    }

    pub fn provider(&self) -> Value {
        json!({
            "kind": "fcm", "service_account_file": self.service_account, "base_url": self.url,
            "retry": {"initial_interval": "50ms", "max_interval": "2s", "max_attempts": 3},
            // The tests play many errors in a row: the breaker is not what they are about.
            "breaker": {"window": 100, "min_calls": 100, "consecutive_failures": 100},
        })
    }

    pub fn sends(&self) -> Vec<FcmSend> {
        self.state.log.lock().unwrap().sends.clone()
    }

    pub fn token_requests(&self) -> u32 {
        self.state.log.lock().unwrap().token_requests
    }

    pub fn violations(&self) -> Vec<String> {
        self.state.log.lock().unwrap().violations.clone()
    }

    /// Every access token issued so far stops working (FCM answers 401).
    pub fn revoke_tokens(&self) {
        let mut log = self.state.log.lock().unwrap();
        let issued = log.issued.clone();
        log.revoked.extend(issued);
    }
}

async fn oauth_token(
    State(state): State<Arc<FcmState>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let token_uri = state.token_uri.lock().unwrap().clone();
    let mut log = state.log.lock().unwrap();
    log.token_requests += 1;
    let mut problems = Vec::new();
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        problems.push(format!("grant_type {:?}", form.get("grant_type")));
    }
    let assertion = form.get("assertion").cloned().unwrap_or_default();
    match verify_jwt(&assertion, &RSA_PKCS1_2048_8192_SHA256, &state.public) {
        Ok((header, claims)) => {
            if header["alg"] != "RS256" || header["kid"] != FCM_KEY_ID {
                problems.push(format!("assertion header {header}"));
            }
            let (iat, exp) = (
                claims["iat"].as_i64().unwrap_or_default(),
                claims["exp"].as_i64().unwrap_or_default(),
            );
            if claims["iss"] != CLIENT_EMAIL
                || claims["aud"] != token_uri.as_str()
                || !claims["scope"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("https://www.googleapis.com/auth/firebase.messaging")
                || (now_secs() - iat).abs() > 60
                || exp - iat > 3600
            {
                problems.push(format!("assertion claims {claims}"));
            }
        }
        Err(problem) => problems.push(problem),
    }
    if !problems.is_empty() {
        let description = problems.join("; ");
        log.violations.extend(problems);
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant", "error_description": description})),
        )
            .into_response();
    }
    let token = format!("ya29.test-{}", log.issued.len() + 1);
    log.issued.push(token.clone());
    Json(json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"})).into_response()
}

fn fcm_error(status: StatusCode, text: &str, code: &str, extra: Option<Value>) -> Response {
    let mut details = vec![json!({
        "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code})];
    details.extend(extra);
    (
        status,
        Json(
            json!({"error": {"code": status.as_u16(), "message": format!("{code} from the test"),
            "status": text, "details": details}}),
        ),
    )
        .into_response()
}

fn with_retry_after(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert("retry-after", HeaderValue::from_static("1"));
    response
}

async fn fcm_send(
    State(state): State<Arc<FcmState>>,
    version: Version,
    Path(project): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut log = state.log.lock().unwrap();
    let authorization = text(&headers, "authorization");
    let access_token = authorization
        .strip_prefix("Bearer ")
        .unwrap_or_default()
        .to_owned();
    if !log.issued.contains(&access_token) || log.revoked.contains(&access_token) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"code": 401, "status": "UNAUTHENTICATED",
                "message": "Request had invalid authentication credentials."}})),
        )
            .into_response();
    }
    let message = body["message"].clone();
    let mut problems = Vec::new();
    if version != Version::HTTP_2 {
        problems.push(format!("{version:?} instead of HTTP/2"));
    }
    let ttl = message["android"]["ttl"].as_str().unwrap_or_default();
    let ttl_secs = ttl.strip_suffix('s').and_then(|s| s.parse::<u64>().ok());
    if message["android"]["priority"] != "HIGH"
        || !ttl_secs.is_some_and(|s| s > 0 && s <= 300)
        || !message["data"]["code"].is_string()
        || !message["notification"]["body"].is_string()
    {
        problems.push(format!("message {message}"));
    }
    if !problems.is_empty() {
        log.violations.extend(problems);
        return fcm_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            None,
        );
    }
    let token = message["token"].as_str().unwrap_or_default().to_owned();
    let seen = {
        let count = log.per_token.entry(token.clone()).or_default();
        *count += 1;
        *count
    };
    let prefix = token.split('-').next().unwrap_or_default();
    let response = match (prefix, seen) {
        ("unreg", _) => fcm_error(StatusCode::NOT_FOUND, "NOT_FOUND", "UNREGISTERED", None),
        ("invalid", _) => fcm_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            Some(json!({"@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": "message.token", "description": "Invalid registration token"}]})),
        ),
        ("mismatch", _) => fcm_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            "SENDER_ID_MISMATCH",
            None,
        ),
        ("quota", 1) => with_retry_after(fcm_error(
            StatusCode::TOO_MANY_REQUESTS,
            "RESOURCE_EXHAUSTED",
            "QUOTA_EXCEEDED",
            None,
        )),
        ("unavailable", _) => with_retry_after(fcm_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "UNAVAILABLE",
            None,
        )),
        ("internal", 1) => fcm_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "INTERNAL",
            None,
        ),
        ("thirdparty", _) => fcm_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "THIRD_PARTY_AUTH_ERROR",
            None,
        ),
        _ => Json(json!({"name": format!("projects/{project}/messages/0:{}", log.sends.len())}))
            .into_response(),
    };
    log.sends.push(FcmSend {
        project,
        access_token,
        message,
    });
    response
}

#[tokio::test(flavor = "multi_thread")]
async fn fcm_gets_one_verified_access_token_and_maps_every_error() {
    let fcm = FakeFcm::start().await;
    let PushEngine { service, _dir, .. } = push_engine(&[("fcm", fcm.provider())]).await;
    let one = |id: &str, token: &str| {
        job(
            id,
            300.0,
            &["push"],
            json!([fcm_device("pixel", token, Some(FCM_PROJECT))]),
        )
    };
    let cases = [
        ("ok", "good-1", None, "name"),
        (
            "unreg",
            "unreg-1",
            Some(FailureReason::DeviceUnregistered),
            "UNREGISTERED",
        ),
        (
            "invalid",
            "invalid-1",
            Some(FailureReason::DeviceTokenInvalid),
            "INVALID_ARGUMENT",
        ),
        (
            "mismatch",
            "mismatch-1",
            Some(FailureReason::DeviceTokenInvalid),
            "SENDER_ID_MISMATCH",
        ),
        (
            "thirdparty",
            "thirdparty-1",
            Some(FailureReason::ProviderMisconfigured),
            "THIRD_PARTY_AUTH_ERROR",
        ),
    ];
    for (id, token, reason, code) in cases {
        let report = deliver(&service, &one(id, token)).await;
        let target = &report.targets[0];
        assert_eq!(target.reason, reason, "{id}: {}", report.summary);
        assert_eq!(target.attempts.len(), 1, "{id}: not retried");
        match reason {
            None => {
                assert_eq!(report.status, DeliveryStatus::Sent);
                let id = target.attempts[0].provider_message_id.as_deref().unwrap();
                assert!(id.starts_with("projects/otp-test/messages/0:"), "{id}");
            }
            Some(_) => assert_eq!(target.attempts[0].provider_code.as_deref(), Some(code)),
        }
    }
    // Throttled and internal errors are retried after FCM's Retry-After, then accepted.
    for (id, token, reason, code) in [
        (
            "quota",
            "quota-1",
            FailureReason::ProviderThrottled,
            "QUOTA_EXCEEDED",
        ),
        (
            "internal",
            "internal-1",
            FailureReason::ProviderUnavailable,
            "INTERNAL",
        ),
    ] {
        let report = deliver(&service, &one(id, token)).await;
        assert_eq!(
            report.status,
            DeliveryStatus::Sent,
            "{id}: {}",
            report.summary
        );
        let attempts = &report.targets[0].attempts;
        assert_eq!(attempts.len(), 2);
        assert_eq!(
            (attempts[0].reason, attempts[0].provider_code.as_deref()),
            (Some(reason), Some(code))
        );
        if id == "quota" {
            let waited = attempts[1]
                .started_at
                .duration_since(attempts[0].started_at);
            assert!(
                waited >= jiff::SignedDuration::from_millis(990),
                "Retry-After: {waited:?}"
            );
        }
    }
    let unavailable = deliver(&service, &one("unavailable", "unavailable-1")).await;
    assert_eq!(
        unavailable.targets[0].reason,
        Some(FailureReason::ProviderUnavailable)
    );
    assert_eq!(unavailable.targets[0].attempts.len(), 3);

    assert_eq!(fcm.violations(), Vec::<String>::new());
    assert_eq!(fcm.token_requests(), 1, "one access token, cached");
    let sends = fcm.sends();
    assert!(
        sends
            .iter()
            .all(|s| s.project == FCM_PROJECT && s.access_token == "ya29.test-1")
    );
    let first = &sends[0].message;
    assert_eq!(first["data"]["code"], "482913");
    assert_eq!(first["data"]["ack_token"].as_str().map(str::len), Some(22));
    assert_eq!(first["android"]["priority"], "HIGH");
    assert!(
        first["notification"]["body"]
            .as_str()
            .unwrap()
            .contains("482913")
    );
    let ttl: u64 = first["android"]["ttl"]
        .as_str()
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(
        (290..=300).contains(&ttl),
        "ttl is the code's time left: {ttl}"
    );

    // A refused access token is replaced once, and the push goes through.
    fcm.revoke_tokens();
    let report = deliver(&service, &one("after-revoke", "good-2")).await;
    assert_eq!(report.status, DeliveryStatus::Sent, "{}", report.summary);
    assert_eq!(report.targets[0].attempts.len(), 1);
    assert_eq!(fcm.token_requests(), 2);
    assert_eq!(fcm.sends().last().unwrap().access_token, "ya29.test-2");
    assert!(
        fcm.connections.load(Ordering::SeqCst) <= 3,
        "pooled: FCM and the token endpoint"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_service_account_is_a_misconfigured_provider() {
    let fcm = FakeFcm::start().await;
    // Another key than the one the token endpoint knows.
    let other = {
        let key = include_str!("../fixtures/fcm-service-account-key.pem");
        let mut account: Value =
            serde_json::from_str(&std::fs::read_to_string(&fcm.service_account).unwrap()).unwrap();
        account["client_email"] = json!("someone-else@otp-test.iam.gserviceaccount.com");
        assert_eq!(account["private_key"], key);
        account.to_string()
    };
    let mut provider = fcm.provider();
    provider
        .as_object_mut()
        .unwrap()
        .remove("service_account_file");
    provider["service_account"] = json!(other);
    let PushEngine { service, _dir, .. } = push_engine(&[("fcm", provider)]).await;
    let report = deliver(
        &service,
        &job(
            "refused",
            300.0,
            &["push"],
            json!([fcm_device("pixel", "good-1", None)]),
        ),
    )
    .await;
    let attempt = &report.targets[0].attempts[0];
    assert_eq!(
        report.targets[0].reason,
        Some(FailureReason::ProviderMisconfigured)
    );
    assert_eq!(
        attempt.provider_code.as_deref(),
        Some("oauth:invalid_grant")
    );
    assert!(
        attempt
            .provider_message
            .as_deref()
            .unwrap()
            .contains("someone-else@")
    );
    assert!(fcm.sends().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn each_device_goes_to_the_credential_of_its_app() {
    let apns_a = FakeApns::start().await;
    let apns_b = FakeApns::start().await;
    let fcm = FakeFcm::start().await;
    let PushEngine { service, _dir, .. } = push_engine(&[
        ("apns-a", apns_a.provider(&["com.example.app"])),
        ("apns-b", apns_b.provider(&["com.example.b"])),
        ("fcm", fcm.provider()),
    ])
    .await;
    let report = deliver(
        &service,
        &job(
            "apps",
            300.0,
            &["push"],
            json!([
                apns_device("iphone-a", &apns_token("0000", 1), Some("com.example.app")),
                apns_device("iphone-b", &apns_token("0000", 2), Some("com.example.b")),
                fcm_device("pixel", "good-1", Some(FCM_PROJECT)),
                apns_device(
                    "iphone-c",
                    &apns_token("0000", 3),
                    Some("com.example.unknown")
                ),
                fcm_device("tablet", "good-2", Some("another-project")),
            ]),
        ),
    )
    .await;
    let by_device: HashMap<_, _> = report
        .targets
        .iter()
        .map(|t| (t.target.as_str(), t))
        .collect();
    for (device, provider) in [
        ("iphone-a", "apns-a"),
        ("iphone-b", "apns-b"),
        ("pixel", "fcm"),
    ] {
        let target = by_device[device];
        assert_eq!(
            target.status,
            TargetStatus::Sent,
            "{device}: {}",
            report.summary
        );
        assert_eq!(target.attempts.len(), 1);
        assert_eq!(target.attempts[0].provider, provider);
        assert_eq!(target.attempts[0].outcome, AttemptOutcome::Sent);
    }
    let unknown = by_device["iphone-c"];
    assert_eq!(unknown.reason, Some(FailureReason::ProviderMisconfigured));
    assert!(unknown.attempts.is_empty());
    assert!(
        report
            .summary
            .contains("no push provider in the route serves apns app `com.example.unknown`"),
        "{}",
        report.summary
    );
    assert_eq!(
        by_device["tablet"].reason,
        Some(FailureReason::ProviderMisconfigured)
    );
    assert_eq!(apns_a.pushes().len(), 1);
    assert_eq!(apns_b.pushes().len(), 1);
    assert_eq!(apns_b.pushes()[0].topic, "com.example.b");
    assert_eq!(fcm.sends().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_token_is_reported_upstream_and_the_code_falls_back_to_sms() {
    if !broker_available().await {
        return;
    }
    let apns = FakeApns::start().await;
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("push-dead");
    let mut broker = Broker::connect(&names).await;
    let mut device_events = broker.subscribe("device.#").await;
    let overrides = [
        ("providers.apns", apns.provider(&TOPICS)),
        ("routes.push", json!(["apns"])),
    ];
    let gateway = Gateway::start(config(&names, dir.path(), &overrides)).await;
    let token = apns_token("dead", 9);
    broker
        .publish_json(&json!({
            "job_id": "dead-token", "tenant": "acme", "account": "user-42", "code": "482913",
            "expires_at": in_minutes(5), "channels": ["push", "sms"],
            "targets": [
                apns_device("iphone-1", &token, Some("com.example.app")),
                {"phone": {"number": "+14155550101"}},
            ],
        }))
        .await;

    let (key, report) = broker.next_event(Duration::from_secs(20)).await;
    assert_eq!(key, "delivery.sent", "{report}");
    let device = &report["targets"][0];
    assert_eq!(device["status"], "FAILED");
    assert_eq!(device["reason"], "DEVICE_UNREGISTERED");
    assert_eq!(
        device["hint"],
        "the app was removed or its token rotated: remove this device"
    );
    assert_eq!(device["attempts"][0]["provider_code"], "Unregistered");
    let phone = &report["targets"][1];
    assert_eq!(phone["status"], "SENT");
    assert_eq!(phone["attempts"][0]["provider"], "sandbox");
    let sms = outbox(dir.path());
    assert_eq!(
        sms.len(),
        1,
        "the code went out by SMS in the same delivery"
    );
    assert_eq!(sms[0]["channel"], "sms");
    assert_eq!(sms[0]["delivery_id"], "acme/dead-token");

    let event = tokio::time::timeout(Duration::from_secs(10), device_events.next())
        .await
        .expect("a device.invalidated event")
        .unwrap()
        .unwrap();
    assert_eq!(event.routing_key.as_str(), "device.invalidated");
    let body: Value = serde_json::from_slice(&event.data).unwrap();
    assert_eq!(body["tenant"], "acme");
    assert_eq!(body["account"], "user-42");
    assert_eq!(body["device_id"], "iphone-1");
    assert_eq!(body["platform"], "apns");
    assert_eq!(body["reason"], "DEVICE_UNREGISTERED");
    assert_eq!(body["provider"], "apns");
    assert_eq!(body["provider_code"], "Unregistered");
    assert_eq!(body["delivery_id"], "acme/dead-token");
    let since = jiff::Timestamp::from_millisecond(DEAD_SINCE_MS).unwrap();
    assert_eq!(body["token_invalid_since"], since.to_string());
    let raw = String::from_utf8_lossy(&event.data);
    assert!(!raw.contains(&token), "the token is masked: {raw}");
    assert!(!raw.contains("482913"), "never the code: {raw}");

    gateway.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_without_a_topic_fails_over_only_within_its_apps_credentials() {
    let apns_a = FakeApns::start().await;
    let apns_a2 = FakeApns::start().await;
    let apns_b = FakeApns::start().await;
    let PushEngine { service, _dir, .. } = push_engine(&[
        ("apns-a", apns_a.provider(&["com.example.app"])),
        ("apns-b", apns_b.provider(&["com.example.b"])),
        (
            "apns-a2",
            apns_a2.provider(&["com.example.c", "com.example.app"]),
        ),
    ])
    .await;
    // The first credential (apns-a) is down for this token; the topic-less device belongs to
    // its default app, so the other app's key (apns-b) is never used, and the second key of the
    // same app (apns-a2) pushes under that app's topic.
    let job = job(
        "topicless",
        300.0,
        &["push"],
        json!([apns_device("iphone", &apns_token("0503", 1), None)]),
    );
    let plan = service.explain(&job, None).await.unwrap();
    let planned: Vec<&str> = plan.targets[0].channels[0]
        .providers
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(planned, ["apns-a", "apns-a2"]);
    let report = deliver(&service, &job).await;
    let providers: Vec<&str> = report.targets[0]
        .attempts
        .iter()
        .map(|a| a.provider.as_str())
        .collect();
    assert!(!providers.contains(&"apns-b"), "{providers:?}");
    assert!(apns_b.pushes().is_empty(), "another app's key was used");
    assert_eq!(providers.last(), Some(&"apns-a2"), "{providers:?}");
    assert!(
        apns_a2
            .pushes()
            .iter()
            .all(|p| p.topic == "com.example.app"),
        "pushed under the device's app"
    );
    assert!(!apns_a.pushes().is_empty());
}
