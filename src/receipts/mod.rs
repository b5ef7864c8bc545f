//! Delivery receipts: the HTTP listener for provider callbacks (Twilio status callbacks) and the
//! forwarder for receipts providers receive on their own sessions (SMPP deliver_sm). A receipt is
//! verified, applied to the attempt it is about, and, when it settles a finished delivery (SENT
//! to DELIVERED or FAILED), published as an event.

mod guard;
mod head;
pub mod twilio;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use tokio::sync::mpsc;

use crate::config::ReceiptsConfig;
use crate::delivery::{DeliveryService, ReceiptApplied};
use crate::domain::SecretString;
use crate::providers::ProviderReceipt;
use crate::queue::Publisher;
use crate::store::StoreError;

/// What the receipt endpoints need.
pub struct ReceiptsState {
    /// Applies receipts.
    pub service: Arc<DeliveryService>,
    /// Publishes the changed reports.
    pub publisher: Publisher,
    /// Auth tokens of the configured Twilio providers, by provider name.
    pub twilio_tokens: BTreeMap<String, SecretString>,
    /// The base URL providers call (signatures cover the full URL as the provider saw it).
    pub public_url: String,
    /// Cut short the callbacks held for a message not recorded yet.
    pub stop: CancellationToken,
}

/// How long open callbacks may take to finish once the listener stops.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves the receipt endpoints on `listener` until `stop`, within `limits` (see `guard`).
pub async fn serve(
    listener: TcpListener,
    state: ReceiptsState,
    limits: ReceiptsConfig,
    stop: CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let guard = Arc::new(guard::Guard::new(
        limits.max_body,
        limits.read_timeout,
        limits.rate_per_source,
    ));
    let app = axum::Router::new()
        .route("/receipts/twilio/{provider}", post(twilio_callback))
        .with_state(Arc::new(state))
        .layer(axum::middleware::from_fn_with_state(guard, guard::guard));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "receipts: a connection could not be accepted");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = tower::ServiceExt::map_request(
            app.clone(),
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(guard::Peer(peer));
                request
            },
        );
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let read_timeout = limits.read_timeout;
        tokio::spawn(async move {
            let Some(stream) = head::read_head(stream, read_timeout, peer).await else {
                return;
            };
            let connection = builder.serve_connection(
                TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(service),
            );
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%peer, %error, "receipts: connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("receipts: callbacks still open at shutdown were cut off");
    }
    Ok(())
}

async fn twilio_callback(
    State(state): State<Arc<ReceiptsState>>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    Form(params): Form<Vec<(String, String)>>,
) -> StatusCode {
    let Some(token) = state.twilio_tokens.get(&provider) else {
        return StatusCode::NOT_FOUND;
    };
    let url = crate::providers::twilio_callback_url(&state.public_url, &provider);
    let claimed = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !twilio::verify(token.expose(), &url, &params, claimed) {
        tracing::warn!(%provider, checked_against = %url,
            "Twilio callback with a wrong signature refused: Twilio signs the URL it called, which must be this one (set receipts.public_url to the base URL Twilio reaches, and leave the provider's status_callback unset or equal to it)");
        return StatusCode::FORBIDDEN;
    }
    let Some(receipt) = twilio::receipt(&provider, &params) else {
        return StatusCode::NO_CONTENT;
    };
    // Twilio can call back before its own answer to the send (the message SID) is written
    // down: the callback is held and tried again for a few seconds.
    match apply_patiently(
        &state.service,
        Some(&state.publisher),
        &receipt,
        &state.stop,
    )
    .await
    {
        // Twilio does not call again after a 2xx: the receipt is on disk before it is told.
        Applied::Yes => match state.service.flush().await {
            Ok(()) => StatusCode::NO_CONTENT,
            Err(error) => {
                tracing::error!(%error, "receipt applied but not synced: answered 503");
                StatusCode::SERVICE_UNAVAILABLE
            }
        },
        Applied::UnknownMessage => {
            // Answered with a server error so that Twilio (where its retry is enabled) tries
            // again; nothing is lost on our side either way.
            StatusCode::SERVICE_UNAVAILABLE
        }
        Applied::Stopped => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Applies `receipt` and publishes the report it settled, if any (and if `events` is given).
/// Returns whether the receipt's message was known.
pub async fn apply(
    service: &DeliveryService,
    events: Option<&Publisher>,
    receipt: &ProviderReceipt,
) -> Result<bool, StoreError> {
    match service.apply_receipt(receipt).await? {
        ReceiptApplied::UnknownMessage => Ok(false),
        ReceiptApplied::Recorded => Ok(true),
        ReceiptApplied::Concluded(report) => {
            if let Some(publisher) = events
                && let Err(error) = publisher.publish_event(&report).await
            {
                tracing::warn!(%error, "receipt applied, but its event was not confirmed");
            }
            Ok(true)
        }
    }
}

/// How often, and how far apart, a receipt for a message not recorded yet is tried again: a
/// carrier may answer on its session (or Twilio call back) before the send's own answer has
/// been written down.
/// The first retry comes soon (the send's answer is usually being written that very moment),
/// later ones back off to [`UNKNOWN_RETRY_DELAY`]; about 5 s in all.
const UNKNOWN_RETRIES: u32 = 24;
const UNKNOWN_FIRST_DELAY: std::time::Duration = std::time::Duration::from_millis(10);
const UNKNOWN_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

/// What [`apply_patiently`] made of a receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Applied to the attempt waiting for it.
    Yes,
    /// No attempt waits for this message id, even after a few seconds (logged).
    UnknownMessage,
    /// The gateway is stopping.
    Stopped,
}

/// Applies `receipt`, trying again for a few seconds while its message is not recorded yet
/// (or the ledger fails). A receipt that matches nothing in the end is logged, not applied.
pub async fn apply_patiently(
    service: &DeliveryService,
    events: Option<&Publisher>,
    receipt: &ProviderReceipt,
    stop: &CancellationToken,
) -> Applied {
    let mut delay = UNKNOWN_FIRST_DELAY;
    for attempt in 0..=UNKNOWN_RETRIES {
        match apply(service, events, receipt).await {
            Ok(true) => return Applied::Yes,
            Ok(false) if attempt == UNKNOWN_RETRIES => break,
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "receipt not applied yet; trying again"),
        }
        tokio::select! {
            _ = stop.cancelled() => return Applied::Stopped,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(UNKNOWN_RETRY_DELAY);
    }
    tracing::warn!(provider = %receipt.provider, message_id = %receipt.message_id,
        outcome = %receipt.outcome,
        "receipt matches no attempt waiting for one (unknown message id, or its attempt is already final): not applied");
    Applied::UnknownMessage
}

/// Applies the receipts providers receive on their own sessions (SMPP deliver_sm) until `stop`,
/// each with [`apply_patiently`].
pub async fn forward(
    mut receipts: mpsc::UnboundedReceiver<ProviderReceipt>,
    service: Arc<DeliveryService>,
    events: Option<Publisher>,
    stop: CancellationToken,
) {
    let pending = tokio_util::task::TaskTracker::new();
    loop {
        let receipt = tokio::select! {
            _ = stop.cancelled() => break,
            receipt = receipts.recv() => match receipt {
                Some(receipt) => receipt,
                None => break,
            },
        };
        let (service, events, stop) = (Arc::clone(&service), events.clone(), stop.clone());
        pending.spawn(async move {
            apply_patiently(&service, events.as_ref(), &receipt, &stop).await;
        });
    }
    pending.close();
    pending.wait().await;
}
