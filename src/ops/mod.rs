//! The ops listener (`ops.listen`, its own port): `/livez` (the process serves), `/readyz`
//! (it can take jobs: the broker link is up and the ledger takes writes), `/metrics`
//! (OpenMetrics, see [`metrics`]) and `/` (the status page with the account diagnosis, see
//! `page`). On a loopback address anyone who reaches it may read it; on any other, a request
//! needs an API key with the `status` or `admin` scope (or the bootstrap admin key), as gRPC
//! calls do: `Authorization: Bearer otpk_…`, or for a browser HTTP Basic with the key as the
//! password. On the page a tenant's `read` key may diagnose its tenant's accounts.

pub mod metrics;
mod page;
pub mod recent;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::AuthMode;
use crate::delivery::DeliveryService;
use crate::grpc::Authenticator;
use crate::queue::LinkState;
pub use metrics::Metrics;

/// How long `/readyz` waits for the ledger to take a write.
const LEDGER_CHECK: Duration = Duration::from_secs(2);

/// What the ops endpoints read.
pub struct OpsState {
    /// The engine (its ledger, providers and metrics).
    pub service: Arc<DeliveryService>,
    /// The broker link's state.
    pub link_state: watch::Receiver<LinkState>,
    /// Checks keys when the listener is not on loopback.
    pub auth: Arc<Authenticator>,
}

/// Serves the ops endpoints on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    state: OpsState,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let open = listener.local_addr()?.ip().is_loopback();
    let state = Arc::new((state, open));
    let app = axum::Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/", get(status_page))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

type Shared = Arc<(OpsState, bool)>;

/// The request's key as a bearer token: `Authorization: Bearer <key>` as it came, or the
/// password of `Authorization: Basic` (what a browser sends after its login prompt).
fn bearer(headers: &HeaderMap) -> HeaderMap {
    use base64::Engine;
    let mut bearer = HeaderMap::new();
    let Some(original) = headers.get(header::AUTHORIZATION) else {
        return bearer;
    };
    let basic_key = original
        .to_str()
        .ok()
        .and_then(|value| value.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .and_then(|(_, encoded)| {
            base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()
        })
        .and_then(|decoded| String::from_utf8(decoded).ok())
        .and_then(|pair| pair.split_once(':').map(|(_, key)| key.to_owned()));
    let value = basic_key
        .and_then(|key| format!("Bearer {key}").parse().ok())
        .unwrap_or_else(|| original.clone());
    bearer.insert(header::AUTHORIZATION, value);
    bearer
}

/// The operator's paths: the provider status, or policy administration.
const OPERATOR_PATHS: [&str; 2] = [
    "/otpgateway.v1.Providers/ListProviders",
    "/otpgateway.v1.PolicyAdmin/ListBlockEntries",
];

/// How a request fared at the key check.
enum Admitted {
    /// It may read everything.
    Operator,
    /// Its key lacks the scopes (403), or the key store did not answer (503).
    Refused(Response),
    /// No valid key (401).
    Unknown(String),
}

async fn admitted(state: &Shared, headers: &HeaderMap) -> Admitted {
    let (state, open) = (&state.0, state.1);
    if open || state.auth.mode() == AuthMode::None {
        return Admitted::Operator;
    }
    let headers = bearer(headers);
    for path in OPERATOR_PATHS {
        match state.auth.admit(path, &headers).await {
            // The operator's view spans every tenant: a tenant's key may not have it.
            Ok(Some(caller)) if !caller.is_global() => {
                return Admitted::Refused(
                    (
                        StatusCode::FORBIDDEN,
                        "this API key acts inside one tenant: the ops listener wants a key for \
                         every tenant (`keys create --scopes status` without --tenant)\n",
                    )
                        .into_response(),
                );
            }
            Ok(_) => return Admitted::Operator,
            Err(status) if status.code() == tonic::Code::PermissionDenied => continue,
            Err(status) if status.code() == tonic::Code::Unavailable => {
                return Admitted::Refused(
                    (StatusCode::SERVICE_UNAVAILABLE, status.message().to_owned()).into_response(),
                );
            }
            Err(status) => return Admitted::Unknown(format!("{}\n", status.message())),
        }
    }
    Admitted::Refused(
        (
            StatusCode::FORBIDDEN,
            "this API key needs the `status` or `admin` scope to read the ops listener\n",
        )
            .into_response(),
    )
}

/// `None` when the request may read the listener, else the answer (401, 403 or 503).
async fn refused(state: &Shared, headers: &HeaderMap) -> Option<Response> {
    match admitted(state, headers).await {
        Admitted::Operator => None,
        Admitted::Refused(response) => Some(response),
        Admitted::Unknown(message) => Some(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                message,
            )
                .into_response(),
        ),
    }
}

/// The status page. An operator's key (or loopback) sees everything; a tenant's `read` key
/// sees the search and its tenant's diagnoses; anything else is asked for a key (a browser
/// shows its login prompt: any user name, the key as the password).
async fn status_page(State(state): State<Shared>, uri: Uri, headers: HeaderMap) -> Response {
    let mut tenant = String::new();
    let mut account = String::new();
    for (name, value) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match name.as_ref() {
            "tenant" => tenant = value.trim().to_owned(),
            "account" => account = value.trim().to_owned(),
            _ => {}
        }
    }
    let operator = match admitted(&state, &headers).await {
        Admitted::Operator => true,
        Admitted::Refused(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
            return response;
        }
        Admitted::Refused(_) | Admitted::Unknown(_) => false,
    };
    let ops = &state.0;
    // The diagnosis is a `DiagnoseAccount` call: its scope (`read`) and tenant apply.
    let reader = if operator {
        Ok(crate::grpc::Caller::unrestricted())
    } else {
        match ops
            .auth
            .admit(
                "/otpgateway.v1.CodeDelivery/DiagnoseAccount",
                &bearer(&headers),
            )
            .await
        {
            Ok(caller) => Ok(caller.unwrap_or_else(crate::grpc::Caller::unrestricted)),
            Err(status) => Err(status),
        }
    };
    let reader = match reader {
        Ok(reader) => reader,
        Err(status) if status.code() == tonic::Code::Unavailable => {
            return (StatusCode::SERVICE_UNAVAILABLE, status.message().to_owned()).into_response();
        }
        Err(_) => {
            return (
                StatusCode::UNAUTHORIZED,
                [(
                    header::WWW_AUTHENTICATE,
                    "Basic realm=\"otp-gateway status\", charset=\"UTF-8\"",
                )],
                "the status page needs an API key with the status or admin scope, or a \
                 tenant's read key to diagnose its accounts: give it as the password\n",
            )
                .into_response();
        }
    };
    let diagnosis = if account.is_empty() {
        None
    } else {
        Some(match reader.listing(&tenant) {
            Ok(Some(named)) => ops
                .service
                .diagnose(&named, &account)
                .await
                .map_err(|error| format!("the ledger did not answer: {error}")),
            Ok(None) => Err("name the tenant".to_owned()),
            Err(status) => Err(status.message().to_owned()),
        })
    };
    let now = ops.service.clock().now();
    let overview = operator.then(|| page::Overview {
        providers: ops.service.provider_health(),
        last_hour: ops.service.metrics().last_hour(now),
        dead_letters: ops.service.metrics().recent_dead_letters(),
    });
    let html = page::render(&page::Page {
        replica: ops.service.replica(),
        broker_up: *ops.link_state.borrow() == LinkState::Up,
        now,
        overview,
        tenant: &tenant,
        account: &account,
        diagnosis,
    });
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

async fn metrics(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if let Some(refused) = refused(&state, &headers).await {
        return refused;
    }
    let ops = &state.0;
    let connected = *ops.link_state.borrow() == LinkState::Up;
    let text = ops
        .service
        .metrics()
        .render(connected, &ops.service.provider_health());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn readyz(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if let Some(refused) = refused(&state, &headers).await {
        return refused;
    }
    let ops = &state.0;
    let mut problems = Vec::new();
    let link = *ops.link_state.borrow();
    if link != LinkState::Up {
        problems.push(format!(
            "broker: not consuming ({link:?}): jobs wait in the queue until the link is back"
        ));
    }
    match tokio::time::timeout(LEDGER_CHECK, ops.service.ledger().flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => problems.push(format!("ledger: {error}")),
        Err(_) => problems.push(format!(
            "ledger: a write did not complete within {LEDGER_CHECK:?}"
        )),
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let mut body = problems.join("\n");
        body.push('\n');
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}
