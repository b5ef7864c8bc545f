//! The ops listener (`ops.listen`, its own port): `/livez` (the process serves), `/readyz`
//! (it can take jobs: the broker link is up and the ledger takes writes) and `/metrics`
//! (Prometheus' text format, see [`metrics`]). On a loopback address anyone who reaches it may
//! read it; on any other, a request needs an API key with the `status` or `admin` scope (or
//! the bootstrap admin key), as gRPC calls do: `Authorization: Bearer otpk_…`.

pub mod metrics;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
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
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

type Shared = Arc<(OpsState, bool)>;

/// `None` when the request may read the listener, else the answer (401 or 403).
async fn refused(state: &Shared, headers: &HeaderMap) -> Option<Response> {
    let (state, open) = (&state.0, state.1);
    if open || state.auth.mode() == AuthMode::None {
        return None;
    }
    // The scopes that open the provider status, or policy administration.
    for path in [
        "/otpgateway.v1.Providers/ListProviders",
        "/otpgateway.v1.PolicyAdmin/ListBlockEntries",
    ] {
        match state.auth.admit(path, headers).await {
            Ok(_) => return None,
            Err(status) if status.code() == tonic::Code::PermissionDenied => continue,
            Err(status) if status.code() == tonic::Code::Unavailable => {
                return Some(
                    (StatusCode::SERVICE_UNAVAILABLE, status.message().to_owned()).into_response(),
                );
            }
            Err(status) => {
                return Some(
                    (
                        StatusCode::UNAUTHORIZED,
                        [(header::WWW_AUTHENTICATE, "Bearer")],
                        format!("{}\n", status.message()),
                    )
                        .into_response(),
                );
            }
        }
    }
    Some(
        (
            StatusCode::FORBIDDEN,
            "this API key needs the `status` or `admin` scope to read the ops listener\n",
        )
            .into_response(),
    )
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
