//! The gRPC API: `otpgateway.v1.CodeDelivery`, `otpgateway.v1.Providers`, `otpgateway.v1.PolicyAdmin`, `grpc.health.v1.Health` (NOT_SERVING while the
//! broker is unreachable) and server reflection (v1 and v1alpha). Services decode, call the delivery layer or
//! the store, and encode; errors map to statuses in one place (`status`). Every call but health
//! and reflection is admitted by an API key (`auth`), which limits it to a tenant and scopes.

mod api_keys;
mod auth;
mod code_delivery;
mod policy_admin;
mod providers;
mod quarantines;
mod status;
mod tls;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::delivery::DeliveryService;
use crate::proto::v1::code_delivery_server::CodeDeliveryServer;
use crate::proto::v1::policy_admin_server::PolicyAdminServer;
use crate::proto::v1::providers_server::ProvidersServer;
use crate::queue::{LinkState, Publisher};
use crate::store::PolicyStore;

pub use auth::{AuthLayer, Authenticator, Caller, KEY_TTL};
pub use code_delivery::CodeDeliveryApi;
pub use policy_admin::PolicyAdminApi;
pub use providers::ProvidersApi;
pub use tls::{GrpcTls, RELOAD_CHECK as TLS_RELOAD_CHECK, server_config as tls_server_config};

/// The health-checked service name of `CodeDelivery`.
pub const CODE_DELIVERY_SERVICE: &str = "otpgateway.v1.CodeDelivery";

/// How often `WatchDelivery` re-reads the ledger when no change notice arrives (changes made
/// by other replicas are only seen this way).
const WATCH_POLL: Duration = Duration::from_millis(500);

/// The gRPC port: the bound listener, and its TLS when it has one.
#[derive(Debug)]
pub struct GrpcPort {
    /// The bound socket.
    pub listener: TcpListener,
    /// TLS settings (none: plain text).
    pub tls: Option<GrpcTls>,
}

/// Serves the gRPC API on `port` until `stop` is cancelled.
pub async fn serve(
    port: GrpcPort,
    service: Arc<DeliveryService>,
    policy: Arc<dyn PolicyStore>,
    auth: Arc<Authenticator>,
    publisher: Publisher,
    link_state: watch::Receiver<LinkState>,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    // The first status is set before the port answers, so no check sees the default SERVING.
    let initial = *link_state.borrow();
    set_health(&reporter, initial).await;
    tokio::spawn(report_health(reporter, link_state, stop.clone()));
    // Reflection in both versions: grpcurl and current tools speak v1, grpcio-reflection's own
    // client, older grpcurl and several GUIs only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");
    let providers = ProvidersApi::new(Arc::clone(&service));
    let policy_admin = PolicyAdminApi::new(policy, Arc::clone(&service), Arc::clone(&auth));
    let api = CodeDeliveryApi::new(service, publisher, WATCH_POLL, stop.clone());
    let router = tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            oversized_is_resource_exhausted,
        ))
        .layer(AuthLayer::new(auth))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(CodeDeliveryServer::new(api))
        .add_service(ProvidersServer::new(providers))
        .add_service(PolicyAdminServer::new(policy_admin));
    let GrpcPort { listener, tls } = port;
    match tls {
        None => {
            router
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await
        }
        Some(tls) => {
            let incoming = tls::incoming(listener, tls, stop.clone());
            router
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
        }
    }
}

/// A request over the message size limit is RESOURCE_EXHAUSTED, as gRPC's conventions (and
/// every other implementation) say; tonic's decoder answers OUT_OF_RANGE for it.
fn oversized_is_resource_exhausted<B>(
    mut response: axum::http::Response<B>,
) -> axum::http::Response<B> {
    let headers = response.headers_mut();
    let oversized = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| {
                m.contains("decoded%20message%20length%20too%20large")
                    || m.contains("decoded message length too large")
            });
    if oversized {
        headers.insert("grpc-status", axum::http::HeaderValue::from_static("8"));
    }
    response
}

/// Mirrors the broker link's state into gRPC health: SERVING only while jobs can be queued.
async fn report_health(
    reporter: HealthReporter,
    mut link_state: watch::Receiver<LinkState>,
    stop: CancellationToken,
) {
    loop {
        let state = *link_state.borrow_and_update();
        set_health(&reporter, state).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = link_state.changed() => if changed.is_err() { return },
        }
    }
}

async fn set_health(reporter: &HealthReporter, state: LinkState) {
    let status = match state {
        LinkState::Up => ServingStatus::Serving,
        LinkState::Down => ServingStatus::NotServing,
    };
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(CODE_DELIVERY_SERVICE, status)
        .await;
}
