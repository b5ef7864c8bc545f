//! APNs' provider API: `POST /3/device/{token}` over HTTP/2 (cleartext here, TLS at Apple) with
//! token authentication: `authorization: bearer <JWT>`, ES256, `kid` the key id, `iss` the
//! team id, `iat` within the last hour, verified with the public half of the team's `.p8` key.
//! The `apns-topic` header and a JSON payload with `aps` are required. Answers as APNs does:
//! 200 with `apns-id`; 403 `InvalidProviderToken` / `MissingProviderToken`; 400 `BadDeviceToken`
//! for a token that is not 64 hex digits, `MissingTopic`, `BadCollapseId`, `PayloadEmpty`; 410
//! `Unregistered` with the time it stopped being valid for a dead token; 503
//! `ServiceUnavailable` for the error rate.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
};
use serde_json::json;

use super::{Received, Shared, now_rfc3339, now_secs, verify_jwt};

/// The team whose provider tokens APNs accepts.
#[derive(Debug, Clone)]
pub struct Team {
    /// The 10-character team id (`iss`).
    pub team_id: String,
    /// The key's id (`kid`).
    pub key_id: String,
    /// The `.p8` key (PKCS#8 PEM) the gateway signs with; its public half checks the tokens.
    pub key_file: PathBuf,
}

/// A team and the public key its tokens verify with.
pub(crate) struct Apns {
    team: Team,
    public: Vec<u8>,
}

impl Apns {
    /// Reads the team's key.
    pub(crate) fn new(team: Team) -> anyhow::Result<Apns> {
        let text = std::fs::read_to_string(&team.key_file)
            .map_err(|e| anyhow::anyhow!("apns key {}: {e}", team.key_file.display()))?;
        let der = pem::parse(text.trim())
            .map_err(|e| anyhow::anyhow!("apns key {}: {e}", team.key_file.display()))?;
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            der.contents(),
            &SystemRandom::new(),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "apns key {}: not a P-256 PKCS#8 key: {e}",
                team.key_file.display()
            )
        })?;
        Ok(Apns {
            public: pair.public_key().as_ref().to_vec(),
            team,
        })
    }
}

#[derive(Clone)]
struct ApnsState {
    shared: Shared,
    apns: Option<Arc<Apns>>,
}

/// The provider API's route; without a team every push is refused (403
/// `InvalidProviderToken`).
pub(crate) fn router(shared: Shared, apns: Option<Apns>) -> axum::Router {
    axum::Router::new()
        .route("/3/device/{token}", post(push))
        .with_state(ApnsState {
            shared,
            apns: apns.map(Arc::new),
        })
}

fn answer(status: StatusCode, reason: &str) -> Response {
    (status, Json(json!({ "reason": reason }))).into_response()
}

/// Why the request's provider token is refused, if it is.
fn refused_token(apns: Option<&Apns>, headers: &HeaderMap) -> Option<&'static str> {
    let Some(jwt) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("bearer ")
                .or_else(|| v.strip_prefix("Bearer "))
        })
    else {
        return Some("MissingProviderToken");
    };
    let apns = apns?;
    let Ok((header, claims)) = verify_jwt(jwt, &ECDSA_P256_SHA256_FIXED, &apns.public) else {
        return Some("InvalidProviderToken");
    };
    if header["alg"] != "ES256" || header["kid"] != apns.team.key_id.as_str() {
        return Some("InvalidProviderToken");
    }
    if claims["iss"] != apns.team.team_id.as_str() {
        return Some("InvalidProviderToken");
    }
    let issued = claims["iat"].as_i64().unwrap_or_default();
    if now_secs() - issued > 3600 {
        return Some("ExpiredProviderToken");
    }
    None
}

async fn push(
    State(state): State<ApnsState>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let faults = state.shared.knobs.get("apns");
    faults.delay().await;
    if state.apns.is_none() {
        return answer(StatusCode::FORBIDDEN, "InvalidProviderToken");
    }
    if let Some(reason) = refused_token(state.apns.as_deref(), &headers) {
        return answer(StatusCode::FORBIDDEN, reason);
    }
    if faults.fails() {
        return answer(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable");
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    if header("apns-topic").is_empty() {
        return answer(StatusCode::BAD_REQUEST, "MissingTopic");
    }
    if header("apns-collapse-id").len() > 64 {
        return answer(StatusCode::BAD_REQUEST, "BadCollapseId");
    }
    if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return answer(StatusCode::BAD_REQUEST, "BadDeviceToken");
    }
    // APNs documents no reason for a body that is not JSON: it is as good as empty.
    let payload: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if !payload["aps"].is_object() {
        return answer(StatusCode::BAD_REQUEST, "PayloadEmpty");
    }
    if faults.dead_tokens.contains(&token) {
        // Invalid since a day ago (milliseconds since the epoch), as APNs reports it.
        let since = (now_secs() - 86_400) * 1000;
        return (
            StatusCode::GONE,
            Json(json!({"reason": "Unregistered", "timestamp": since})),
        )
            .into_response();
    }
    let id = uuid::Uuid::new_v4().hyphenated().to_string().to_uppercase();
    let alert = &payload["aps"]["alert"];
    let text = alert["body"]
        .as_str()
        .or_else(|| alert.as_str())
        .unwrap_or_default();
    state.shared.inbox.push(Received {
        at: now_rfc3339(),
        via: "apns",
        channel: "push",
        to: token,
        text: text.to_owned(),
        id: id.clone(),
        receipt: None,
    });
    let mut response = StatusCode::OK.into_response();
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("apns-id", value);
    }
    response
}
