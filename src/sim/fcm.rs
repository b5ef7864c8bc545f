//! Google's OAuth token endpoint and FCM HTTP v1. `POST /token` takes the JWT-bearer grant
//! (`grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`, `assertion` an RS256 JWT signed
//! with the service account's key: `iss` its client_email, `aud` the token URI, the
//! firebase.messaging scope, at most an hour long) and issues an access token for an hour.
//! `POST /v1/projects/{project}/messages:send` takes a `message` with a `token`, with that
//! access token as Bearer, and answers `{"name": "projects/…/messages/…"}`, or FCM's errors:
//! 401 `UNAUTHENTICATED`, 404 `UNREGISTERED` for a dead token, 400 `INVALID_ARGUMENT`, 503
//! `UNAVAILABLE` for the error rate.

use std::collections::{HashMap, HashSet};
use std::path::Path as FilePath;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Form, Json};
use ring::signature::{KeyPair, RSA_PKCS1_2048_8192_SHA256, RsaKeyPair};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Received, Shared, now_rfc3339, now_secs, verify_jwt};

/// The firebase.messaging scope the assertion must ask for.
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// The service account fields the endpoints check against.
#[derive(Debug, Deserialize)]
struct ServiceAccount {
    project_id: String,
    client_email: String,
    private_key: String,
    token_uri: String,
}

/// The service account and the access tokens issued to it.
pub(crate) struct Fcm {
    account: ServiceAccount,
    public: Vec<u8>,
    issued: Mutex<HashSet<String>>,
}

impl Fcm {
    /// Reads a service account's JSON key file.
    pub(crate) fn from_file(path: &FilePath) -> anyhow::Result<Fcm> {
        let context = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!("fcm service account {}: {e}", path.display())
        };
        let text = std::fs::read_to_string(path).map_err(|e| context(&e))?;
        let account: ServiceAccount = serde_json::from_str(&text).map_err(|e| context(&e))?;
        let der = pem::parse(account.private_key.trim()).map_err(|e| context(&e))?;
        let pair = RsaKeyPair::from_pkcs8(der.contents()).map_err(|e| context(&e))?;
        Ok(Fcm {
            public: pair.public_key().as_ref().to_vec(),
            account,
            issued: Mutex::default(),
        })
    }
}

#[derive(Clone)]
struct FcmState {
    shared: Shared,
    fcm: Option<Arc<Fcm>>,
}

/// The token endpoint and the send route; without a service account every grant is refused.
pub(crate) fn router(shared: Shared, fcm: Option<Fcm>) -> axum::Router {
    axum::Router::new()
        .route("/token", post(token))
        .route("/v1/projects/{project}/messages:send", post(send))
        .with_state(FcmState {
            shared,
            fcm: fcm.map(Arc::new),
        })
}

fn invalid_grant(description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": "invalid_grant", "error_description": description})),
    )
        .into_response()
}

/// Why the assertion is refused, if it is.
fn refused_assertion(fcm: &Fcm, assertion: &str) -> Option<String> {
    let (header, claims) = match verify_jwt(assertion, &RSA_PKCS1_2048_8192_SHA256, &fcm.public) {
        Ok(parts) => parts,
        Err(problem) => return Some(problem),
    };
    if header["alg"] != "RS256" {
        return Some(format!("alg {} is not RS256", header["alg"]));
    }
    if claims["iss"] != fcm.account.client_email.as_str() {
        return Some("iss is not the service account's client_email".to_owned());
    }
    if claims["aud"] != fcm.account.token_uri.as_str() {
        return Some("aud is not the token URI".to_owned());
    }
    let scopes = claims["scope"].as_str().unwrap_or_default();
    if !scopes.split(' ').any(|s| s == SCOPE) {
        return Some(format!("scope does not include {SCOPE}"));
    }
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap_or_default(),
        claims["exp"].as_i64().unwrap_or_default(),
    );
    let now = now_secs();
    if exp <= now || iat > now + 300 || exp - iat > 3600 {
        return Some("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe".to_owned());
    }
    None
}

async fn token(
    State(state): State<FcmState>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let Some(fcm) = state.fcm.as_deref() else {
        return invalid_grant("no service account is configured at the simulator");
    };
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type", "error_description": "Invalid grant_type"})),
        )
            .into_response();
    }
    let assertion = form
        .get("assertion")
        .map(String::as_str)
        .unwrap_or_default();
    if let Some(problem) = refused_assertion(fcm, assertion) {
        return invalid_grant(&problem);
    }
    let access = format!("ya29.sim-{}", uuid::Uuid::new_v4().simple());
    fcm.issued
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(access.clone());
    Json(json!({"access_token": access, "expires_in": 3599, "token_type": "Bearer"}))
        .into_response()
}

fn error(status: StatusCode, text: &str, code: Option<&str>, message: &str) -> Response {
    let details: Vec<Value> = code
        .map(|code| json!({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}))
        .into_iter()
        .collect();
    let body = json!({"error": {"code": status.as_u16(), "message": message, "status": text, "details": details}});
    (status, Json(body)).into_response()
}

async fn send(
    State(state): State<FcmState>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let faults = state.shared.knobs.get("fcm");
    faults.delay().await;
    let access = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let known = state.fcm.as_deref().is_some_and(|fcm| {
        fcm.issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(access)
    });
    if !known {
        return error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            None,
            "Request had invalid authentication credentials. Expected OAuth 2 access token.",
        );
    }
    if state
        .fcm
        .as_deref()
        .is_some_and(|fcm| fcm.account.project_id != project)
    {
        return error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            Some("SENDER_ID_MISMATCH"),
            "SenderId mismatch",
        );
    }
    if faults.fails() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            Some("UNAVAILABLE"),
            "The service is currently unavailable.",
        );
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or_default();
    let message = &body["message"];
    let Some(token) = message["token"].as_str().filter(|t| !t.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            Some("INVALID_ARGUMENT"),
            "Request contains an invalid argument: message.token is required",
        );
    };
    if faults.dead_tokens.contains(token) {
        return error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            Some("UNREGISTERED"),
            "Requested entity was not found.",
        );
    }
    let id = format!("0:{}", uuid::Uuid::new_v4().simple());
    let text = message["notification"]["body"]
        .as_str()
        .or_else(|| message["data"]["body"].as_str())
        .unwrap_or_default();
    state.shared.inbox.push(Received {
        at: now_rfc3339(),
        via: "fcm",
        channel: "push",
        to: token.to_owned(),
        text: text.to_owned(),
        id: id.clone(),
        receipt: None,
    });
    Json(json!({"name": format!("projects/{project}/messages/{id}")})).into_response()
}
