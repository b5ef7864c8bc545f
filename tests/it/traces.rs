//! Traces from the outside: the real binary exports to an in-process OTLP collector (a tonic
//! server for the OTLP trace service) and continues the W3C trace context its caller sent, so
//! one trace runs from the upstream call through SendCode, the queue and the consumer to the
//! provider attempt and its HTTP request, with no code and no full number in any span.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use otp_gateway::proto::v1;
use otp_gateway::proto::v1::code_delivery_client::CodeDeliveryClient;

use crate::helpers::*;

/// Keeps every span exported to it.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|a| a.key == key)?
        .value
        .as_ref()?;
    match value.value.as_ref()? {
        any_value::Value::StringValue(text) => Some(text.clone()),
        any_value::Value::IntValue(n) => Some(n.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        other => Some(format!("{other:?}")),
    }
}

#[tokio::test]
async fn one_trace_runs_from_the_upstream_call_through_the_queue_to_the_provider() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("traces");
    let broker = Broker::connect(&names).await;
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    // The SMS provider: a generic HTTP one, so each attempt makes an HTTP request. It is down
    // (503) for the first request and takes the retry.
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_port = hook.local_addr().unwrap().port();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/send",
        axum::routing::post(move || {
            let first = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
            async move {
                if first {
                    return (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        axum::Json(serde_json::json!({"error": "down"})),
                    );
                }
                (
                    axum::http::StatusCode::ACCEPTED,
                    axum::Json(serde_json::json!({"id": "hook-1"})),
                )
            }
        }),
    );
    tokio::spawn(async move { axum::serve(hook, app).await.unwrap() });
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[providers.hook]
kind = "http"
url = "http://127.0.0.1:{hook_port}/send"
body = '{{"to": "{{{{to}}}}", "text": "{{{{text}}}}"}}'
message_id_field = "/id"
retry = {{ initial_interval = "10ms" }}

[routes]
sms = ["hook"]
"#
        ),
    )
    .unwrap();

    let server = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_otp-gateway"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .envs(names.env())
        .env("OTP_GATEWAY_GRPC__LISTEN", &server)
        .env("OTP_GATEWAY_RECEIPTS__LISTEN", "127.0.0.1:0")
        .env("OTP_GATEWAY_OPS__LISTEN", "127.0.0.1:0")
        .env(
            "OTP_GATEWAY_TRACES__OTLP_ENDPOINT",
            format!("http://{otlp}"),
        )
        .env(
            "OTP_GATEWAY_STORE__URL",
            format!("sqlite://{}/ledger.db", dir.path().display()),
        )
        .env(
            "OTP_GATEWAY_PROVIDERS__SANDBOX__OUTBOX",
            dir.path().join("outbox.jsonl"),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("gateway.log")).unwrap())
        .spawn()
        .unwrap();

    // Ready once its health check says SERVING (the broker link is up).
    let mut client = None;
    for _ in 0..400 {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{server}"))
            .unwrap()
            .connect()
            .await
        {
            let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await;
            if health.is_ok_and(|h| {
                h.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            }) {
                client = Some(CodeDeliveryClient::new(channel));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = client.expect("the gateway serves gRPC and consumes");

    // The upstream service's trace: its span is the parent of the gateway's first span.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let upstream = "00f067aa0ba902b7";
    let mut request = crate::auth::send_request("acme", "traced-1", None);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{upstream}-01").parse().unwrap(),
    );
    client.send_code(request).await.unwrap();
    let mut sent = false;
    for _ in 0..400 {
        let report = client
            .get_delivery(crate::auth::get("acme/traced-1", None))
            .await
            .unwrap()
            .into_inner();
        if report.status == v1::DeliveryStatus::Sent as i32 {
            sent = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sent, "the delivery is sent");

    // SIGTERM: the gateway sends its last spans as it stops.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let exited = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();
    assert!(exited.success(), "{log}");

    let spans = collector.0.lock().unwrap().clone();
    let traced: Vec<&Span> = spans
        .iter()
        .filter(|s| hex(&s.trace_id) == trace_id)
        .collect();
    let names: Vec<&str> = traced.iter().map(|s| s.name.as_str()).collect();
    let by_id: HashMap<String, &Span> = traced.iter().map(|s| (hex(&s.span_id), *s)).collect();
    let named = |name: &str| {
        *traced
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no span {name} in the trace: {names:?}\n{log}"))
    };
    let send = named("otpgateway.v1.CodeDelivery/SendCode");
    assert_eq!(
        hex(&send.parent_span_id),
        upstream,
        "SendCode continues the caller's span"
    );
    assert_eq!(attribute(send, "rpc.system").as_deref(), Some("grpc"));
    let publish = named(&format!("{} publish", names_of(&broker).jobs_exchange));
    let process = named(&format!("{} process", names_of(&broker).jobs_queue));
    let provider = named("hook sms");
    assert_eq!(
        attribute(process, "messaging.system").as_deref(),
        Some("rabbitmq")
    );
    // provider → … → process → publish → SendCode → upstream.
    let ancestors = |span: &Span| {
        let mut chain = Vec::new();
        let mut parent = hex(&span.parent_span_id);
        while let Some(up) = by_id.get(&parent) {
            chain.push(up.name.clone());
            parent = hex(&up.parent_span_id);
        }
        chain
    };
    let chain = ancestors(provider);
    for link in [&process.name, &publish.name, &send.name] {
        assert!(
            chain.contains(link),
            "{link} is not above the provider span: {chain:?}"
        );
    }
    assert_eq!(hex(&process.parent_span_id), hex(&publish.span_id));
    assert_eq!(attribute(provider, "to").as_deref(), Some("+1415•••0101"));
    assert_eq!(attribute(provider, "otp.provider").as_deref(), Some("hook"));
    // Each attempt's HTTP request: a client span under it, per the HTTP conventions; the
    // refused one says why and is marked failed.
    let requests: Vec<&Span> = traced
        .iter()
        .copied()
        .filter(|s| s.name == "POST")
        .collect();
    assert_eq!(requests.len(), 2, "{names:?}");
    for http in &requests {
        let attempt = by_id[&hex(&http.parent_span_id)];
        assert_eq!(attempt.name, "hook sms");
        assert_eq!(http.kind, 3, "SPAN_KIND_CLIENT");
        for (key, value) in [
            ("http.request.method", "POST".to_owned()),
            ("server.address", "127.0.0.1".to_owned()),
            ("server.port", hook_port.to_string()),
            ("url.scheme", "http".to_owned()),
            ("network.protocol.version", "1.1".to_owned()),
        ] {
            assert_eq!(attribute(http, key), Some(value), "{key}");
        }
    }
    let status = |http: &Span| attribute(http, "http.response.status_code");
    let refused = requests
        .iter()
        .find(|http| status(http).as_deref() == Some("503"))
        .expect("the refused request");
    assert_eq!(attribute(refused, "error.type").as_deref(), Some("503"));
    assert_eq!(
        refused.status.as_ref().map(|s| s.code),
        Some(2),
        "STATUS_CODE_ERROR"
    );
    let accepted = requests
        .iter()
        .find(|http| status(http).as_deref() == Some("202"))
        .expect("the accepted request");
    assert_eq!(attribute(accepted, "error.type"), None);
    assert_eq!(
        attribute(publish, "messaging.destination.name").as_deref(),
        Some(names_of(&broker).jobs_exchange.as_str())
    );
    for span in &traced {
        for attribute in &span.attributes {
            let value = format!("{:?}", attribute.value);
            assert!(
                !value.contains("482913") && !value.contains("14155550101"),
                "{}: {} = {value}",
                span.name,
                attribute.key
            );
        }
    }
    broker.cleanup().await;
}

fn names_of(broker: &Broker) -> &Names {
    &broker.names
}

#[test]
fn an_endpoint_that_is_not_a_url_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    for endpoint in ["127.0.0.1:4317", "ftp://collector:4317"] {
        let stderr = refused_start(
            dir.path(),
            &[
                ("OTP_GATEWAY_AUTH__MODE", "none".as_ref()),
                ("OTP_GATEWAY_TRACES__OTLP_ENDPOINT", endpoint.as_ref()),
            ],
        );
        assert!(stderr.contains("traces.otlp_endpoint"), "{stderr}");
    }
}
