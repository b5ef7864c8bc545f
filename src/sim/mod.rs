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
//!
//! [`pumping`] is a traffic simulation of another kind: days of sign-in traffic, an SMS-pumping
//! attack and a marketing burst through the real gateway, to measure the fraud guard.

pub mod apns;
mod faults;
pub mod fcm;
mod inbox;
pub mod pumping;
pub mod smpp;
pub mod twilio;

pub use faults::{Faults, Knobs, SIMULATORS, log_normal, log_normal_mean};
pub use inbox::{Inbox, Received};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{UnparsedPublicKey, VerificationAlgorithm};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

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
