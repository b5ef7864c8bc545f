//! Provider simulators for a local stack that needs no provider accounts (`otp-sim`): a Twilio
//! REST API with signed status callbacks, an SMPP 3.4 SMSC with delivery receipts, APNs over
//! HTTP/2 with ES256 provider tokens and FCM HTTP v1 with its OAuth token endpoint. Each speaks
//! its provider's wire protocol as the gateway's adapters (and any other client) expect it, and
//! each has fault knobs ([`Faults`]) that can be changed while it runs (`PUT /sim/faults/NAME`
//! with the fields to change).
//!
//! The simulators stand in for the user's phone too: what each accepted is kept in a small
//! in-memory inbox (`GET /sim/messages`), texts included, so that a developer can read the code
//! the gateway sent. Nothing is written to disk, and the log shows only masked numbers.
//!
//! One HTTP port serves Twilio, APNs, FCM, the OAuth endpoint and the control routes (HTTP/1.1
//! and cleartext HTTP/2); the SMSC has its own TCP port.

pub mod apns;
pub mod fcm;
pub mod smpp;
pub mod twilio;

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{UnparsedPublicKey, VerificationAlgorithm};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// How a simulator misbehaves. Every field has a default, so a partial JSON body sets only
/// what it names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Share of requests (0 to 1) answered with the provider's "unavailable" error: Twilio 503
    /// (error 20503), SMPP `ESME_RSYSERR`, APNs 503 `ServiceUnavailable`, FCM 503
    /// `UNAVAILABLE`.
    pub error_rate: f64,
    /// Median time (milliseconds) before an answer; 0 answers at once.
    pub latency_ms: u64,
    /// The 99th percentile of that time (log-normal); at or below the median: always the
    /// median.
    pub latency_p99_ms: u64,
    /// Device tokens the push services say are no longer registered (APNs 410 `Unregistered`,
    /// FCM 404 `UNREGISTERED`).
    pub dead_tokens: BTreeSet<String>,
    /// Numbers (E.164) whose user replied STOP: Twilio refuses them (21610); the SMSC accepts
    /// the submit and its receipt says `REJECTD`.
    pub opted_out: BTreeSet<String>,
    /// Numbers whose carrier filters the messages: Twilio's status callback says
    /// `undelivered` with error 30007; the SMSC's receipt says `UNDELIV`.
    pub filtered: BTreeSet<String>,
    /// Whether delivery receipts (SMPP deliver_sm, Twilio status callbacks) are sent.
    pub receipts: bool,
    /// How long after accepting a message its receipt follows (milliseconds).
    pub receipt_delay_ms: u64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            error_rate: 0.0,
            latency_ms: 0,
            latency_p99_ms: 0,
            dead_tokens: BTreeSet::new(),
            opted_out: BTreeSet::new(),
            filtered: BTreeSet::new(),
            receipts: true,
            receipt_delay_ms: 200,
        }
    }
}

impl Faults {
    /// Refuses values no simulator can act on, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(format!(
                "error_rate: {} is not between 0 and 1",
                self.error_rate
            ));
        }
        Ok(())
    }

    /// Whether this request draws the error.
    pub fn fails(&self) -> bool {
        self.error_rate > 0.0 && fastrand::f64() < self.error_rate
    }

    /// How long to take before answering this request.
    pub fn latency(&self) -> Duration {
        let median = Duration::from_millis(self.latency_ms);
        let p99 = Duration::from_millis(self.latency_p99_ms);
        if median.is_zero() || p99 <= median {
            median
        } else {
            log_normal(median, p99)
        }
    }

    /// Waits out [`Faults::latency`].
    pub async fn delay(&self) {
        let latency = self.latency();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }
}

/// The 99th percentile of the standard normal distribution.
const Z_99: f64 = 2.326_347_874;

/// A log-normal draw with `median` and `p99`: exp(mu + sigma * z), mu = ln(median),
/// sigma = ln(p99 / median) / z_0.99, z standard normal (Box-Muller from two uniforms).
pub fn log_normal(median: Duration, p99: Duration) -> Duration {
    let mu = median.as_secs_f64().ln();
    let sigma = (p99.as_secs_f64() / median.as_secs_f64()).ln() / Z_99;
    let u1 = 1.0 - fastrand::f64(); // (0, 1]: ln stays finite
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * fastrand::f64()).cos();
    Duration::from_secs_f64((mu + sigma * z).exp())
}

/// The mean of that log-normal: exp(mu + sigma^2 / 2).
pub fn log_normal_mean(median: Duration, p99: Duration) -> Duration {
    let sigma = (p99.as_secs_f64() / median.as_secs_f64()).ln() / Z_99;
    Duration::from_secs_f64(median.as_secs_f64() * (sigma * sigma / 2.0).exp())
}

/// The simulators by name, as the control routes and the inbox name them.
pub const SIMULATORS: [&str; 4] = ["twilio", "smpp", "apns", "fcm"];

/// Each simulator's faults, changeable while it runs.
#[derive(Debug, Default)]
pub struct Knobs {
    faults: [RwLock<Faults>; 4],
}

impl Knobs {
    /// Every simulator starting with `faults`.
    pub fn all(faults: Faults) -> Knobs {
        Knobs {
            faults: std::array::from_fn(|_| RwLock::new(faults.clone())),
        }
    }

    fn slot(&self, simulator: &str) -> Option<&RwLock<Faults>> {
        let index = SIMULATORS.iter().position(|s| *s == simulator)?;
        Some(&self.faults[index])
    }

    /// A copy of `simulator`'s faults (the defaults for an unknown name).
    pub fn get(&self, simulator: &str) -> Faults {
        self.slot(simulator)
            .map(|slot| slot.read().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default()
    }

    /// Replaces `simulator`'s faults; `Err` for an unknown name or a bad value.
    pub fn set(&self, simulator: &str, faults: Faults) -> Result<(), String> {
        let slot = self.slot(simulator).ok_or_else(|| {
            format!(
                "no simulator `{simulator}` (there are {})",
                SIMULATORS.join(", ")
            )
        })?;
        faults.validate()?;
        *slot.write().unwrap_or_else(|p| p.into_inner()) = faults;
        Ok(())
    }
}

/// One message a simulator accepted, as the phone (or device) would show it.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    /// When it was accepted (RFC 3339).
    pub at: String,
    /// The simulator that took it: twilio, smpp, apns or fcm.
    pub via: &'static str,
    /// sms, voice or push.
    pub channel: &'static str,
    /// The number (E.164) or device token it went to.
    pub to: String,
    /// The text (SMS), the spoken script (voice) or the alert body (push).
    pub text: String,
    /// The simulator's id for it (message SID, SMSC message id, apns-id, FCM name).
    pub id: String,
    /// What its receipt said, once one was sent (delivered, undelivered, rejected).
    pub receipt: Option<String>,
}

/// The most messages the inbox keeps (the oldest go first).
const INBOX_SIZE: usize = 1000;

/// What the simulators accepted, newest last.
#[derive(Debug, Default)]
pub struct Inbox {
    messages: Mutex<VecDeque<Received>>,
    accepted: std::sync::atomic::AtomicU64,
}

impl Inbox {
    /// Keeps `message` and logs it (masked, without its text).
    pub fn push(&self, message: Received) {
        let masked = if message.to.starts_with('+') {
            crate::domain::mask_phone(&message.to)
        } else {
            crate::domain::mask_token(&message.to)
        };
        tracing::info!(via = message.via, channel = message.channel, to = %masked, id = %message.id, "accepted");
        self.accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut messages = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        if messages.len() == INBOX_SIZE {
            messages.pop_front();
        }
        messages.push_back(message);
    }

    /// Notes the receipt sent for message `id` of `via`.
    pub fn receipt(&self, via: &str, id: &str, receipt: &str) {
        let mut messages = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(message) = messages
            .iter_mut()
            .rev()
            .find(|m| m.via == via && m.id == id)
        {
            message.receipt = Some(receipt.to_owned());
        }
    }

    /// How many messages were accepted since the start (also those no longer kept).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every message kept, oldest first.
    pub fn messages(&self) -> Vec<Received> {
        let messages = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        messages.iter().cloned().collect()
    }
}

/// The current time as RFC 3339.
fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

/// The current time in seconds since the Unix epoch.
fn now_secs() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// A JWT's header and claims, once its signature checks out with `public` under `algorithm`.
pub fn verify_jwt(
    jwt: &str,
    algorithm: &'static dyn VerificationAlgorithm,
    public: &[u8],
) -> Result<(serde_json::Value, serde_json::Value), String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        return Err("not a JWT (three base64url parts)".to_owned());
    };
    let decode = |part: &str| -> Result<Vec<u8>, String> {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|e| format!("not base64url: {e}"))
    };
    UnparsedPublicKey::new(algorithm, public)
        .verify(format!("{header}.{claims}").as_bytes(), &decode(signature)?)
        .map_err(|_| "the JWT's signature does not verify".to_owned())?;
    let json = |part: &str| -> Result<serde_json::Value, String> {
        serde_json::from_slice(&decode(part)?).map_err(|e| format!("not JSON: {e}"))
    };
    Ok((json(header)?, json(claims)?))
}

/// What the simulators are started with.
#[derive(Debug, Clone)]
pub struct SimSettings {
    /// The HTTP port: Twilio, APNs, FCM, OAuth and the control routes.
    pub http: SocketAddr,
    /// The SMSC's port.
    pub smpp: SocketAddr,
    /// Faults every simulator starts with.
    pub faults: Faults,
    /// The Twilio account the REST API accepts (Basic auth: SID and auth token); the auth
    /// token also signs the status callbacks.
    pub twilio: twilio::Account,
    /// The SMSC's accepted bind.
    pub smpp_bind: smpp::Bind,
    /// The APNs team and key the provider tokens must be signed with.
    pub apns: Option<apns::Team>,
    /// The FCM service account (its JSON key file) whose assertions the OAuth endpoint takes.
    pub fcm_service_account: Option<PathBuf>,
}

/// Running simulators; they stop when dropped.
pub struct Sim {
    /// Where the HTTP simulators and the control routes listen.
    pub http: SocketAddr,
    /// Where the SMSC listens.
    pub smpp: SocketAddr,
    /// Their faults.
    pub knobs: Arc<Knobs>,
    /// What they accepted.
    pub inbox: Arc<Inbox>,
    stop: CancellationToken,
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Sim {
    /// Binds both ports and starts serving.
    pub async fn start(settings: SimSettings) -> anyhow::Result<Sim> {
        settings.faults.validate().map_err(anyhow::Error::msg)?;
        let knobs = Arc::new(Knobs::all(settings.faults.clone()));
        let inbox = Arc::new(Inbox::default());
        let stop = CancellationToken::new();
        let client = {
            let _ = rustls::crypto::ring::default_provider().install_default();
            reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?
        };
        let shared = Shared {
            knobs: Arc::clone(&knobs),
            inbox: Arc::clone(&inbox),
        };
        let apns = match &settings.apns {
            Some(team) => Some(apns::Apns::new(team.clone())?),
            None => None,
        };
        let fcm = match &settings.fcm_service_account {
            Some(path) => Some(fcm::Fcm::from_file(path)?),
            None => None,
        };
        let router = axum::Router::new()
            .route("/sim/faults", get(all_faults))
            .route("/sim/faults/{simulator}", get(one_faults).put(set_faults))
            .route("/sim/messages", get(messages))
            .with_state(shared.clone())
            .merge(twilio::router(
                shared.clone(),
                settings.twilio.clone(),
                client,
            ))
            .merge(apns::router(shared.clone(), apns))
            .merge(fcm::router(shared.clone(), fcm));
        let listener = tokio::net::TcpListener::bind(settings.http).await?;
        let http = listener.local_addr()?;
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await;
        });
        let smpp = smpp::serve(settings.smpp, settings.smpp_bind, shared, stop.clone()).await?;
        Ok(Sim {
            http,
            smpp,
            knobs,
            inbox,
            stop,
        })
    }
}

/// What every simulator's handlers share.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) knobs: Arc<Knobs>,
    pub(crate) inbox: Arc<Inbox>,
}

async fn all_faults(State(shared): State<Shared>) -> Json<serde_json::Value> {
    let all: serde_json::Map<String, serde_json::Value> = SIMULATORS
        .iter()
        .map(|name| {
            let faults = serde_json::to_value(shared.knobs.get(name)).unwrap_or_default();
            ((*name).to_owned(), faults)
        })
        .collect();
    Json(serde_json::Value::Object(all))
}

fn unknown(simulator: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!(
            "no simulator `{simulator}` (there are {})\n",
            SIMULATORS.join(", ")
        ),
    )
        .into_response()
}

async fn one_faults(State(shared): State<Shared>, Path(simulator): Path<String>) -> Response {
    if !SIMULATORS.contains(&simulator.as_str()) {
        return unknown(&simulator);
    }
    Json(shared.knobs.get(&simulator)).into_response()
}

async fn set_faults(
    State(shared): State<Shared>,
    Path(simulator): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if !SIMULATORS.contains(&simulator.as_str()) {
        return unknown(&simulator);
    }
    // The fields named replace the simulator's; the others keep their value.
    let changes: serde_json::Map<String, serde_json::Value> = match serde_json::from_slice(&body) {
        Ok(changes) => changes,
        Err(e) => {
            let problem = format!("the body is not a JSON object of faults: {e}\n");
            return (StatusCode::BAD_REQUEST, problem).into_response();
        }
    };
    let mut merged = serde_json::to_value(shared.knobs.get(&simulator)).unwrap_or_default();
    for (field, value) in changes {
        merged[field] = value;
    }
    let faults: Faults = match serde_json::from_value(merged) {
        Ok(faults) => faults,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    match shared.knobs.set(&simulator, faults) {
        Ok(()) => {
            tracing::info!(simulator, "faults changed");
            Json(shared.knobs.get(&simulator)).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

/// `?to=` keeps only the messages to that number or token; `?via=` those of one simulator.
#[derive(Debug, Deserialize)]
struct MessagesQuery {
    to: Option<String>,
    via: Option<String>,
}

async fn messages(
    State(shared): State<Shared>,
    Query(query): Query<MessagesQuery>,
) -> Json<Vec<Received>> {
    let messages = shared
        .inbox
        .messages()
        .into_iter()
        .filter(|m| query.to.as_deref().is_none_or(|to| m.to == to))
        .filter(|m| query.via.as_deref().is_none_or(|via| m.via == via))
        .collect();
    Json(messages)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Simulators on free local ports, with +14155550123 opted out, and the defaults otherwise.
    pub(crate) async fn start() -> Sim {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        Sim::start(SimSettings {
            http: local,
            smpp: local,
            faults: Faults {
                opted_out: ["+14155550123".to_owned()].into(),
                receipt_delay_ms: 10,
                ..Faults::default()
            },
            twilio: twilio::Account {
                sid: "ACsim".into(),
                auth_token: "sim-token".into(),
            },
            smpp_bind: smpp::Bind {
                system_id: "otp".into(),
                password: "secret".into(),
            },
            apns: None,
            fcm_service_account: None,
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn faults_change_field_by_field_and_bad_values_are_refused_naming_the_field() {
        let sim = start().await;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let put = |body: &'static str| {
            client
                .put(format!("http://{}/sim/faults/twilio", sim.http))
                .body(body)
                .send()
        };
        let answer = put(r#"{"error_rate": 0.25}"#).await.unwrap();
        assert_eq!(answer.status(), 200);
        let twilio = sim.knobs.get("twilio");
        assert_eq!(twilio.error_rate, 0.25);
        assert!(
            twilio.opted_out.contains("+14155550123"),
            "the fields not named keep their value"
        );
        assert_eq!(sim.knobs.get("smpp").error_rate, 0.0, "one simulator only");
        for (body, named) in [
            (r#"{"error_rate": 2}"#, "error_rate"),
            (r#"{"eror_rate": 1}"#, "eror_rate"),
            (r#"{"receipts": "yes"}"#, "bool"),
        ] {
            let answer = put(body).await.unwrap();
            assert_eq!(answer.status(), 400);
            let text = answer.text().await.unwrap();
            assert!(text.contains(named), "{text}");
        }
        assert_eq!(sim.knobs.get("twilio").error_rate, 0.25, "left as it was");
        let unknown = client
            .put(format!("http://{}/sim/faults/sms", sim.http))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(unknown.status(), 404);
    }
}
