//! Twilio's REST API as the gateway (or any Twilio client) calls it: `POST
//! /2010-04-01/Accounts/{AccountSid}/Messages.json` and `Calls.json`, form-encoded, with HTTP
//! Basic auth (account SID, auth token). Answers carry Twilio's JSON resources and error bodies
//! (`code`, `message`, `more_info`, `status`). When the request names a `StatusCallback`, the
//! message's statuses follow there as Twilio posts them: form-encoded, signed with
//! `X-Twilio-Signature` (HMAC-SHA1 of the URL and the sorted parameters under the auth token):
//! `sent`, then `delivered`, or `undelivered` with error 30007 for a filtered number. A call
//! goes `completed`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Form, Json};
use base64::Engine;
use serde_json::json;

use super::{Faults, Received, Shared, now_rfc3339};

/// The account the simulator accepts.
#[derive(Debug, Clone)]
pub struct Account {
    /// `AC…`.
    pub sid: String,
    /// Its auth token (Basic auth password; signs the status callbacks).
    pub auth_token: String,
}

#[derive(Clone)]
struct Twilio {
    shared: Shared,
    account: Arc<Account>,
    client: reqwest::Client,
}

/// The REST API's routes.
pub(crate) fn router(shared: Shared, account: Account, client: reqwest::Client) -> axum::Router {
    axum::Router::new()
        .route("/2010-04-01/Accounts/{account}/{resource}", post(create))
        .with_state(Twilio {
            shared,
            account: Arc::new(account),
            client,
        })
}

/// A Twilio error body with its HTTP status.
fn error(status: StatusCode, code: u32, message: &str) -> Response {
    let body = json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status.as_u16(),
    });
    (status, Json(body)).into_response()
}

/// Whether the Basic credentials are the account's.
fn authorized(headers: &HeaderMap, account: &Account) -> bool {
    let Some(encoded) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let expected = format!("{}:{}", account.sid, account.auth_token);
    decoded == expected.as_bytes()
}

async fn create(
    State(twilio): State<Twilio>,
    Path((account, resource)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let faults = twilio.shared.knobs.get("twilio");
    faults.delay().await;
    if !authorized(&headers, &twilio.account) {
        return error(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    }
    if account != twilio.account.sid {
        return error(
            StatusCode::NOT_FOUND,
            20404,
            &format!(
                "The requested resource /2010-04-01/Accounts/{account}/{resource} was not found"
            ),
        );
    }
    let voice = match resource.as_str() {
        "Messages.json" => false,
        "Calls.json" => true,
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                20404,
                &format!(
                    "The requested resource /2010-04-01/Accounts/{account}/{resource} was not found"
                ),
            );
        }
    };
    if faults.fails() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            20503,
            "Service Unavailable",
        );
    }
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    let to = field("To");
    if !to.starts_with('+') || to.len() < 8 || !to[1..].bytes().all(|b| b.is_ascii_digit()) {
        return error(
            StatusCode::BAD_REQUEST,
            21211,
            &format!("The 'To' number {to} is not a valid phone number."),
        );
    }
    if field("From").is_empty() && field("MessagingServiceSid").is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            21603,
            "The 'From' phone number is required.",
        );
    }
    let text = if voice {
        let twiml = field("Twiml");
        if twiml.is_empty() && field("Url").is_empty() {
            return error(StatusCode::BAD_REQUEST, 21205, "Url parameter is required.");
        }
        twiml.to_owned()
    } else {
        let body = field("Body");
        if body.is_empty() {
            return error(StatusCode::BAD_REQUEST, 21602, "Message body is required.");
        }
        if faults.opted_out.contains(to) {
            return error(
                StatusCode::BAD_REQUEST,
                21610,
                "Attempt to send to unsubscribed recipient",
            );
        }
        body.to_owned()
    };
    let sid = format!(
        "{}{}",
        if voice { "CA" } else { "SM" },
        uuid::Uuid::new_v4().simple()
    );
    twilio.shared.inbox.push(Received {
        at: now_rfc3339(),
        via: "twilio",
        channel: if voice { "voice" } else { "sms" },
        to: to.to_owned(),
        text,
        id: sid.clone(),
        receipt: None,
    });
    let callback = field("StatusCallback");
    if faults.receipts && !callback.is_empty() {
        tokio::spawn(callbacks(
            twilio.clone(),
            faults,
            Callback {
                url: callback.to_owned(),
                sid: sid.clone(),
                to: to.to_owned(),
                from: field("From").to_owned(),
                voice,
            },
        ));
    }
    let (from, status) = (field("From"), if voice { "queued" } else { "accepted" });
    let mut resource = json!({
        "sid": sid,
        "account_sid": twilio.account.sid,
        "to": to,
        "from": if from.is_empty() { serde_json::Value::Null } else { json!(from) },
        "status": status,
        "api_version": "2010-04-01",
        "date_created": jiff::Timestamp::now().strftime("%a, %d %b %Y %H:%M:%S +0000").to_string(),
        "uri": format!("/2010-04-01/Accounts/{}/{}/{sid}.json", twilio.account.sid, resource.trim_end_matches(".json")),
    });
    if !voice {
        resource["body"] = json!(field("Body"));
        resource["messaging_service_sid"] = match field("MessagingServiceSid") {
            "" => serde_json::Value::Null,
            sid => json!(sid),
        };
        resource["num_segments"] = json!("1");
    }
    (StatusCode::CREATED, Json(resource)).into_response()
}

/// Where and about what the status callbacks go.
struct Callback {
    url: String,
    sid: String,
    to: String,
    from: String,
    voice: bool,
}

/// Posts the message's statuses to its callback URL, signed, as Twilio does.
async fn callbacks(twilio: Twilio, faults: Faults, callback: Callback) {
    let delay = std::time::Duration::from_millis(faults.receipt_delay_ms);
    let statuses: Vec<(&str, Option<&str>)> = if callback.voice {
        vec![("completed", None)]
    } else if faults.filtered.contains(&callback.to) {
        vec![("sent", None), ("undelivered", Some("30007"))]
    } else {
        vec![("sent", None), ("delivered", None)]
    };
    for (status, error_code) in statuses {
        tokio::time::sleep(delay / 2).await;
        let (sid_name, status_name) = if callback.voice {
            ("CallSid", "CallStatus")
        } else {
            ("MessageSid", "MessageStatus")
        };
        let mut params: Vec<(String, String)> = vec![
            ("AccountSid".into(), twilio.account.sid.clone()),
            ("ApiVersion".into(), "2010-04-01".into()),
            (sid_name.into(), callback.sid.clone()),
            (status_name.into(), status.into()),
            ("To".into(), callback.to.clone()),
            ("From".into(), callback.from.clone()),
        ];
        if !callback.voice {
            params.push(("SmsSid".into(), callback.sid.clone()));
            params.push(("SmsStatus".into(), status.into()));
        }
        if let Some(code) = error_code {
            params.push(("ErrorCode".into(), code.into()));
        }
        let signature =
            crate::receipts::twilio::signature(&twilio.account.auth_token, &callback.url, &params);
        let answer = twilio
            .client
            .post(&callback.url)
            .header("X-Twilio-Signature", signature)
            .form(&params)
            .send()
            .await;
        match answer {
            Ok(answer) if answer.status().is_success() => {}
            Ok(answer) => {
                tracing::warn!(sid = %callback.sid, status = answer.status().as_u16(), "the status callback was refused");
            }
            Err(e) => tracing::warn!(sid = %callback.sid, error = %e, "the status callback failed"),
        }
        if status != "sent" {
            twilio.shared.inbox.receipt("twilio", &callback.sid, status);
        }
    }
}
