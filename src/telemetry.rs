//! Logging through `tracing`: readable lines by default, JSON on request, to stderr.
//! `RUST_LOG`, when set, overrides the configured level. Codes are never logged (the `Code`
//! type cannot be formatted) and numbers and tokens are masked where they are logged.
//!
//! Traces: with `traces.otlp_endpoint` set, the same spans go to an OpenTelemetry collector
//! over OTLP/gRPC, and a W3C `traceparent` is carried from a gRPC call's metadata through the
//! job's AMQP headers to the consumer and each provider attempt, so one trace runs from the
//! upstream call to the provider. Off (no exporter, no propagation) unless configured.

use std::io::IsTerminal;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::Deserialize;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The `[traces]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracesConfig {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`; unset: no traces.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the spans.
    pub service_name: String,
}

impl Default for TracesConfig {
    fn default() -> Self {
        TracesConfig {
            otlp_endpoint: None,
            service_name: "otp-gateway".into(),
        }
    }
}

/// Whether spans go to a collector (then spans get their OpenTelemetry names and attributes).
static TRACES_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Gives `span` (declared with `otel.name` and `otel.kind` fields left `Empty`) its
/// OpenTelemetry name, kind and attributes, when traces are on; otherwise nothing is made, and
/// log lines stay as they were.
pub fn describe(
    span: &tracing::Span,
    kind: &'static str,
    name: impl FnOnce() -> String,
    attributes: impl FnOnce() -> Vec<(&'static str, String)>,
) {
    if !TRACES_ON.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    span.record("otel.name", name());
    span.record("otel.kind", kind);
    for (key, value) in attributes() {
        span.set_attribute(key, value);
    }
}

/// Sets attributes on `span` (one already [`describe`]d) when traces are on, such as what an
/// answer said; otherwise nothing is made.
pub fn annotate(
    span: &tracing::Span,
    attributes: impl FnOnce() -> Vec<(&'static str, opentelemetry::Value)>,
) {
    if !TRACES_ON.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    for (key, value) in attributes() {
        span.set_attribute(key, value);
    }
}

/// Marks `span` failed (its OpenTelemetry status ERROR) when traces are on.
pub fn mark_failed(span: &tracing::Span) {
    if TRACES_ON.load(std::sync::atomic::Ordering::Relaxed) {
        span.record("otel.status_code", "ERROR");
    }
}

/// Keeps the trace exporter running; [`Telemetry::shutdown`] sends what is left.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans not exported yet and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            eprintln!("otp-gateway: the trace exporter did not shut down cleanly: {error}");
        }
    }
}

/// Installs the global subscriber (logs only). Call once, from `main`.
pub fn init(format: LogFormat, level: &str) {
    // Without an endpoint nothing can fail.
    let _ = init_with_traces(format, level, &TracesConfig::default());
}

/// Installs the global subscriber, and the trace exporter when `traces.otlp_endpoint` is set.
/// Call once. An endpoint that is not a URL is an error naming the setting.
pub fn init_with_traces(
    format: LogFormat,
    level: &str,
    traces: &TracesConfig,
) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let logs = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let provider = match &traces.otlp_endpoint {
        None => None,
        Some(endpoint) => Some(tracer_provider(endpoint, &traces.service_name)?),
    };
    let spans = provider.as_ref().map(|provider| {
        TRACES_ON.store(true, std::sync::atomic::Ordering::Relaxed);
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("otp-gateway"))
            .with_filter(EnvFilter::new("otp_gateway=info"))
    });
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init();
    Ok(Telemetry { provider })
}

fn tracer_provider(endpoint: &str, service_name: &str) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig;
    let parsed = url::Url::parse(endpoint)
        .map_err(|error| format!("traces.otlp_endpoint: `{endpoint}` is not a URL: {error}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "traces.otlp_endpoint: `{endpoint}` must be an http:// or https:// URL (OTLP over gRPC)"
        ));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|error| format!("traces.otlp_endpoint: cannot export to `{endpoint}`: {error}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name.to_owned())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The two W3C headers, as read from a carrier.
struct W3c {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Extractor for W3c {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent.as_deref(),
            "tracestate" => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// Makes `span` a child of the trace context its caller sent (`traceparent`, `tracestate`),
/// read through `get`. Nothing happens when traces are off or no context came.
pub fn continue_trace(span: &tracing::Span, get: impl Fn(&str) -> Option<String>) {
    let carrier = W3c {
        traceparent: get("traceparent"),
        tracestate: get("tracestate"),
    };
    if carrier.traceparent.is_none() {
        return;
    }
    let context = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    let _ = span.set_parent(context);
}

/// The W3C headers (`traceparent`, and `tracestate` when there is one) that carry `span`'s
/// context on; empty when traces are off.
pub fn trace_headers(span: &tracing::Span) -> Vec<(String, String)> {
    struct Headers(Vec<(String, String)>);
    impl Injector for Headers {
        fn set(&mut self, key: &str, value: String) {
            self.0.push((key.to_owned(), value));
        }
    }
    let mut headers = Headers(Vec::new());
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut headers));
    headers.0
}
