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
    // Twilio answers `accepted` for a message sent through a Messaging Service, else `queued`.
    let from = field("From");
    let status = if !voice && !field("MessagingServiceSid").is_empty() {
        "accepted"
    } else {
        "queued"
    };
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::extract::State;
    use axum::http::HeaderMap;
    use axum::{Form, routing::post};

    use crate::sim::tests::start;

    type Seen = Arc<Mutex<Vec<(Vec<(String, String)>, bool)>>>;

    /// A status-callback endpoint that records each callback and whether its signature holds.
    async fn callback_endpoint() -> (String, Seen) {
        let seen: Seen = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/receipts/twilio/twilio",
            listener.local_addr().unwrap()
        );
        let app = axum::Router::new()
            .route(
                "/receipts/twilio/twilio",
                post(
                    |State((seen, url)): State<(Seen, String)>,
                     headers: HeaderMap,
                     Form(params): Form<Vec<(String, String)>>| async move {
                        let signature = headers
                            .get("x-twilio-signature")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default();
                        let valid =
                            crate::receipts::twilio::verify("sim-token", &url, &params, signature);
                        seen.lock().unwrap().push((params, valid));
                    },
                ),
            )
            .with_state((Arc::clone(&seen), url.clone()));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, seen)
    }

    #[tokio::test]
    async fn twilio_checks_the_account_answers_its_errors_and_signs_the_callbacks() {
        let sim = start().await;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (callback, seen) = callback_endpoint().await;
        let client = reqwest::Client::new();
        let url = format!(
            "http://{}/2010-04-01/Accounts/ACsim/Messages.json",
            sim.http
        );
        let send = |token: &str, to: &str| {
            client
                .post(&url)
                .basic_auth("ACsim", Some(token))
                .form(&[
                    ("To", to),
                    ("From", "+15005550006"),
                    ("Body", "482913 is your code"),
                    ("StatusCallback", callback.as_str()),
                ])
                .send()
        };
        let body = |answer: reqwest::Response| async move {
            let status = answer.status().as_u16();
            let json: serde_json::Value =
                serde_json::from_str(&answer.text().await.unwrap()).unwrap();
            (status, json)
        };
        let (status, refused) = body(send("wrong", "+14155550101").await.unwrap()).await;
        assert_eq!((status, refused["code"].as_u64()), (401, Some(20003)));
        let (status, refused) = body(send("sim-token", "+14155550123").await.unwrap()).await;
        assert_eq!((status, refused["code"].as_u64()), (400, Some(21610)));
        let (status, accepted) = body(send("sim-token", "+14155550101").await.unwrap()).await;
        assert_eq!(status, 201);
        let sid = accepted["sid"].as_str().unwrap().to_owned();
        assert!(sid.starts_with("SM") && sid.len() == 34, "{sid}");
        for _ in 0..100 {
            if seen.lock().unwrap().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = seen.lock().unwrap().clone();
        let statuses: Vec<(String, bool)> = seen
            .iter()
            .map(|(params, valid)| {
                let get = |name: &str| {
                    params
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                assert_eq!(get("MessageSid"), sid);
                (get("MessageStatus"), *valid)
            })
            .collect();
        assert_eq!(
            statuses,
            [("sent".to_owned(), true), ("delivered".to_owned(), true)],
            "both callbacks signed with the auth token"
        );
        assert_eq!(
            sim.inbox.messages()[0].receipt.as_deref(),
            Some("delivered")
        );
    }
}
