//! The ops listener from the outside, over plain HTTP/1.1 as Prometheus and a load balancer
//! speak it: `/livez`, `/readyz` (503 with the reason while the broker is away), `/metrics`
//! in OpenMetrics as the Prometheus project's own parser reads it and counting what the test caused, and
//! keys required once the listener is off loopback.

use std::net::SocketAddr;
use std::time::Duration;

use otp_gateway::proto::v1;
use otp_gateway::proto::v1::policy_admin_client::PolicyAdminClient;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(20);

/// A GET of `path` with `key` as a bearer token (or none): the status and the body.
pub async fn get(addr: SocketAddr, path: &str, key: Option<&str>) -> (u16, String) {
    let authorization = key.map(|key| format!("Bearer {key}"));
    get_with(addr, path, authorization.as_deref()).await
}

/// A GET of `path` with `authorization` as the header's value (or none): the status and the
/// answer's head and body.
async fn get_with(addr: SocketAddr, path: &str, authorization: Option<&str>) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let authorization = authorization
        .map(|value| format!("Authorization: {value}\r\n"))
        .unwrap_or_default();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: ops\r\n{authorization}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("the ops listener answers")
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if authorization.is_empty() && status == 401 {
        // The challenge matters to a browser: keep it with the body.
        format!("{head}\r\n\r\n{body}")
    } else {
        body.to_owned()
    };
    (status, body)
}

/// An exposition as the Prometheus project's OpenMetrics parser reads it (Debian's
/// python3-prometheus-client, run by tests/fixtures/openmetrics.py): its families and samples.
/// The parser refuses what the format does not allow; without it the test fails under CI=true
/// (`.ci/run` installs it) and skips otherwise.
pub struct Exposition {
    families: Vec<Value>,
    samples: Vec<Value>,
}

impl Exposition {
    pub fn parse(text: &str) -> Option<Exposition> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let python = "/usr/bin/python3";
        let parser = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/openmetrics.py");
        let present = Command::new(python)
            .args(["-c", "import prometheus_client"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !present {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "Prometheus' Python parser is missing and CI=true: apt-get install python3-prometheus-client"
            );
            eprintln!("skipping the metrics checks: python3-prometheus-client is not installed");
            return None;
        }
        let mut child = Command::new(python)
            .arg(parser)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "the OpenMetrics parser refused the exposition: {}\n{text}",
            String::from_utf8_lossy(&output.stderr)
        );
        let (families, samples) = String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .partition(|item| item.get("family").is_some());
        Some(Exposition { families, samples })
    }

    /// The value of sample `name` with exactly `labels`.
    pub fn value(&self, name: &str, labels: Value) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s["name"] == name && s["labels"] == labels)
            .map(|s| s["value"].as_f64().unwrap())
    }

    /// The type the exposition declares for family `name`.
    pub fn kind(&self, name: &str) -> Option<&str> {
        self.families
            .iter()
            .find(|f| f["family"] == name)
            .and_then(|f| f["type"].as_str())
    }
}

#[tokio::test]
async fn metrics_count_what_the_gateway_did_in_openmetrics() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("ops-metrics");
    let mut broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(&names, dir.path(), &[])).await;
    let ops = gateway.ops_addr;

    assert_eq!(get(ops, "/livez", None).await.0, 200);
    let (status, body) = get(ops, "/readyz", None).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    // Three sends to a number the carrier says opted out (Twilio 21610 in the sandbox): the
    // first is refused by the provider, the next two by the opt-out it learned.
    for n in 0..3 {
        let mut job = job(&format!("opted-out-{n}"), "135790");
        job["targets"] = json!([{"phone": {"number": "+15005550004"}}]);
        broker.publish_json(&job).await;
        let (_, report) = broker.next_event(WAIT).await;
        assert_eq!(report["reason"], "RECIPIENT_OPTED_OUT", "{report}");
    }
    // Two that go through, stamped by their producer (AMQP timestamp) 3 s before they are
    // published, and one job without a tenant.
    for n in 0..2 {
        let stamped = jiff::Timestamp::now().as_second() as u64 - 3;
        broker
            .publish(
                job(&format!("fine-{n}"), "246801").to_string().as_bytes(),
                Some("application/json"),
                lapin::BasicProperties::default().with_timestamp(stamped),
            )
            .await;
        let (_, report) = broker.next_event(WAIT).await;
        assert_eq!(report["status"], "SENT", "{report}");
    }
    let mut bad = job("no-tenant", "111222");
    bad.as_object_mut().unwrap().remove("tenant");
    broker.publish_json(&bad).await;
    let dead = broker.next_message(&names.dead_letter_queue, WAIT).await;
    let field = header(&dead, "x-otp-error-field").unwrap();

    let (status, metrics) = get(ops, "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(
        !metrics.contains("5005550004") && !metrics.contains("135790"),
        "no number or code in the metrics"
    );
    let Some(parsed) = Exposition::parse(&metrics) else {
        gateway.stop().await;
        broker.cleanup().await;
        return;
    };
    assert_eq!(parsed.kind("otp_deliveries"), Some("counter"));
    assert_eq!(
        parsed.kind("otp_provider_call_duration_seconds"),
        Some("histogram")
    );
    assert_eq!(
        parsed.value(
            "otp_deliveries_total",
            json!({"tenant": "acme", "status": "FAILED", "reason": "RECIPIENT_OPTED_OUT"})
        ),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        parsed.value(
            "otp_deliveries_total",
            json!({"tenant": "acme", "status": "SENT", "reason": ""})
        ),
        Some(2.0),
        "{metrics}"
    );
    // Only the first opted-out send reached the provider.
    let attempt = |outcome: &str, reason: &str| json!({"provider": "sandbox", "channel": "sms", "outcome": outcome, "reason": reason});
    assert_eq!(
        parsed.value(
            "otp_attempts_total",
            attempt("FAILED", "RECIPIENT_OPTED_OUT")
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        parsed.value("otp_attempts_total", attempt("SENT", "")),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        parsed.value(
            "otp_provider_call_duration_seconds_count",
            json!({"provider": "sandbox", "channel": "sms"})
        ),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        parsed.value("otp_dead_letters_total", json!({"reason": field})),
        Some(1.0),
        "{metrics}"
    );
    let sms = json!({"country": "US", "encoding": "GSM_7"});
    assert_eq!(parsed.value("otp_sms_total", sms.clone()), Some(2.0));
    assert_eq!(parsed.value("otp_sms_segments_total", sms), Some(2.0));
    assert_eq!(
        parsed.value(
            "otp_time_to_first_send_seconds_count",
            json!({"channel": "sms"})
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        parsed.value("otp_queue_wait_seconds_count", json!({})),
        Some(2.0),
        "{metrics}"
    );
    let waited = parsed
        .value("otp_queue_wait_seconds_sum", json!({}))
        .unwrap();
    assert!((6.0..30.0).contains(&waited), "{waited}");
    assert_eq!(parsed.value("otp_broker_connected", json!({})), Some(1.0));
    assert_eq!(parsed.value("otp_jobs_in_flight", json!({})), Some(0.0));
    assert_eq!(
        parsed.value("otp_provider_circuit_open", json!({"provider": "sandbox"})),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        parsed.value(
            "otp_route_circuit_open",
            json!({"provider": "sandbox", "channel": "sms", "route": "*"})
        ),
        Some(0.0),
        "{metrics}"
    );
    // The deliveries' writes went through the SQLite ledger's group commits.
    let group = json!({"backend": "sqlite", "statement": "group"});
    let commits = parsed
        .value("otp_ledger_commit_writes_count", group.clone())
        .unwrap();
    let writes = parsed.value("otp_ledger_commit_writes_sum", group).unwrap();
    assert!(
        commits >= 1.0 && writes >= 5.0 * 3.0,
        "{commits} commits, {writes} writes"
    );

    gateway.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn readyz_says_why_while_the_broker_is_away() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("ops-ready");
    // Nothing listens on port 9 of this machine: the gateway retries the link.
    let config = config(
        &names,
        dir.path(),
        &[("amqp.url", json!("amqp://guest:guest@127.0.0.1:9/%2f"))],
    );
    let gateway = Gateway::start_unconnected(config).await;
    let ops = gateway.ops_addr;
    assert_eq!(get(ops, "/livez", None).await.0, 200);
    let (status, body) = get(ops, "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("broker"), "{body}");
    let (_, metrics) = get(ops, "/metrics", None).await;
    if let Some(parsed) = Exposition::parse(&metrics) {
        assert_eq!(parsed.value("otp_broker_connected", json!({})), Some(0.0));
    }
    gateway.stop().await;
}

#[tokio::test]
async fn off_loopback_the_ops_listener_wants_a_status_or_admin_key() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("ops-keys");
    let broker = Broker::connect(&names).await;
    let bootstrap = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let config = config(
        &names,
        dir.path(),
        &[
            ("auth.mode", json!("keys")),
            ("auth.bootstrap_admin_key", json!(bootstrap)),
            ("ops.listen", json!("0.0.0.0:0")),
        ],
    );
    let gateway = Gateway::start(config).await;
    let ops = SocketAddr::from(([127, 0, 0, 1], gateway.ops_addr.port()));

    let mut admin = PolicyAdminClient::connect(format!("http://{}", gateway.grpc_addr))
        .await
        .unwrap();
    let mut create = async |tenant: &str, scopes: &[v1::ApiKeyScope]| {
        let mut request = tonic::Request::new(v1::CreateApiKeyRequest {
            tenant: tenant.into(),
            scopes: scopes.iter().map(|s| *s as i32).collect(),
            label: "ops test".into(),
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {bootstrap}").parse().unwrap(),
        );
        admin
            .create_api_key(request)
            .await
            .unwrap()
            .into_inner()
            .secret
    };
    let sender = create("acme", &[v1::ApiKeyScope::Send]).await;
    let status = create("", &[v1::ApiKeyScope::Status]).await;

    for path in ["/metrics", "/readyz"] {
        let (code, body) = get(ops, path, None).await;
        assert_eq!(code, 401, "{path} without a key: {body}");
        let (code, _) = get(ops, path, Some("otpk_nothing_of_ours")).await;
        assert_eq!(code, 401, "{path} with a wrong key");
        let (code, body) = get(ops, path, Some(&sender)).await;
        assert_eq!(code, 403, "{path} with a send-only key: {body}");
        assert!(body.contains("status"), "{body}");
        assert_eq!(get(ops, path, Some(&status)).await.0, 200, "{path}");
        assert_eq!(get(ops, path, Some(&bootstrap)).await.0, 200, "{path}");
    }
    // Liveness stays open: a load balancer or kubelet probes it without a key.
    assert_eq!(get(ops, "/livez", None).await.0, 200);

    // The status page asks a browser for a key (HTTP Basic, the key as the password).
    let (code, answer) = get(ops, "/", None).await;
    assert_eq!(code, 401);
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("www-authenticate: basic realm="),
        "{answer}"
    );
    let basic = |key: &str| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("support:{key}"))
        )
    };
    let (code, page) = get_with(ops, "/", Some(&basic(&status))).await;
    assert_eq!(code, 200);
    assert!(page.contains(r#"id="providers""#), "{page}");
    // A tenant's read key sees the search and its own tenant's diagnoses, not the overview.
    let reader = create("acme", &[v1::ApiKeyScope::Read]).await;
    let (code, page) = get_with(ops, "/?tenant=acme&account=user-42", Some(&basic(&reader))).await;
    assert_eq!(code, 200, "{page}");
    assert!(!page.contains(r#"id="providers""#) && page.contains(r#"id="diagnosis""#));
    let (code, page) = get_with(
        ops,
        "/?tenant=globex&account=user-42",
        Some(&basic(&reader)),
    )
    .await;
    assert_eq!(code, 200);
    assert!(
        page.contains(r#"id="diagnosis-error""#) && !page.contains(r#"id="diagnosis""#),
        "{page}"
    );
    assert_eq!(get_with(ops, "/", Some(&basic(&sender))).await.0, 401);
    // A tenant's admin key does not open the view of every tenant, nor other tenants' accounts.
    let tenant_admin = create("acme", &[v1::ApiKeyScope::Admin]).await;
    let (code, body) = get(ops, "/metrics", Some(&tenant_admin)).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("every tenant"), "{body}");
    let (code, page) = get_with(
        ops,
        "/?tenant=globex&account=user-42",
        Some(&basic(&tenant_admin)),
    )
    .await;
    assert!(
        code == 401 || (!page.contains(r#"id="diagnosis""#) && !page.contains(r#"id="providers""#)),
        "{code}: {page}"
    );

    gateway.stop().await;
    broker.cleanup().await;
}

/// `promtool` with `args` in deploy/prometheus: its output, or `None` without promtool (a
/// failure under CI=true: `.ci/run` installs Debian's `prometheus`).
fn promtool(args: &[&str]) -> Option<std::process::Output> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");
    match std::process::Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
    {
        Ok(output) => Some(output),
        Err(error) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "promtool is missing and CI=true ({error}): apt-get install prometheus"
            );
            eprintln!("skipping: promtool is not installed");
            None
        }
    }
}

#[test]
fn the_alert_rules_and_the_scrape_config_pass_promtool_and_their_unit_tests() {
    for args in [
        &["check", "rules", "otp-gateway.rules.yml"][..],
        // Each alert fires on the series it is for and stays quiet on the others.
        &["test", "rules", "otp-gateway.rules.test.yml"],
        &["check", "config", "--syntax-only", "prometheus.yml"],
    ] {
        let Some(output) = promtool(args) else {
            return;
        };
        assert!(
            output.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
