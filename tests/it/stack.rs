//! The local stack of `docker-compose.yml` without containers: the file is read with
//! `docker-compose config`, and its `otp-sim` and `otp-gateway` services run as the real
//! binaries with the command, environment and configuration file (`deploy/sim/gateway.toml`)
//! the file gives them, only the addresses rewritten to this machine (the broker and PostgreSQL
//! the tests use). Then the README's walk-through: a code delivered through the simulated
//! Twilio and its signed status callback, an opted-out number, a filtered one, a dead device
//! token, a Twilio outage that fails over to the SMSC and opens Twilio's circuit, and the
//! account diagnosis and metrics that explain it all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{BROKER_URL, Broker, Names, broker_available};
use crate::ops::get;
use crate::replicas::{Database, free_port};

const GATEWAY: &str = env!("CARGO_BIN_EXE_otp-gateway");
const SIM: &str = env!("CARGO_BIN_EXE_otp-sim");
const ADMIN_KEY: &str = "stack-test-bootstrap-admin-key-0123456789abcdef";
const HASH_KEY: &str = "stack-test-block-list-hash-key-0123456789abcdef";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `docker-compose.yml` as `docker-compose config` resolves it, as JSON; `None` (the test
/// skips) without docker-compose, unless CI=true: then it fails.
fn compose() -> Option<Value> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo().join("docker-compose.yml"),
        dir.path().join("docker-compose.yml"),
    )
    .unwrap();
    // The secret files the stack's user makes (their content is not read here).
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    for secret in ["otp_gateway_admin_key", "otp_gateway_hash_key"] {
        std::fs::write(dir.path().join("secrets").join(secret), "x").unwrap();
    }
    let resolved = match Command::new("docker-compose")
        .arg("config")
        .current_dir(dir.path())
        .output()
    {
        Ok(output) => output,
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipping: no docker-compose ({e})");
            return None;
        }
        Err(e) => panic!("no docker-compose and CI=true: {e}"),
    };
    assert!(
        resolved.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&resolved.stderr)
    );
    // docker-compose itself is Python with PyYAML: the same parser reads its output.
    let mut to_json = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    to_json
        .stdin
        .take()
        .unwrap()
        .write_all(&resolved.stdout)
        .unwrap();
    let json = to_json.wait_with_output().unwrap();
    assert!(json.status.success());
    Some(serde_json::from_slice(&json.stdout).unwrap())
}

/// The compose stack's addresses and where they are on this machine.
struct Rewrites(Vec<(String, String)>);

impl Rewrites {
    fn apply(&self, text: &str) -> String {
        self.0
            .iter()
            .fold(text.to_owned(), |text, (from, to)| text.replace(from, to))
    }
}

/// A process of the stack; killed when dropped.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the CLI against the gateway with `key`: whether it succeeded, and its stdout (then
/// its stderr when it failed).
fn cli(grpc: &str, key: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(GATEWAY)
        .args(["--server", grpc])
        .args(args)
        .env("OTP_GATEWAY_KEY", key)
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        text.push_str(&String::from_utf8_lossy(&output.stderr));
    }
    (output.status.success(), text)
}

/// The simulators' inbox for `to`.
async fn inbox(http: &str, to: &str) -> Vec<Value> {
    let url =
        url::Url::parse_with_params(&format!("http://{http}/sim/messages"), [("to", to)]).unwrap();
    let body = reqwest::get(url).await.unwrap().text().await.unwrap();
    let answer: Value = serde_json::from_str(&body).unwrap();
    answer.as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_stack_runs_without_containers_and_explains_each_failure() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(compose) = compose() else { return };
    if !broker_available().await {
        return;
    }
    let Some(database) = Database::create().await else {
        return;
    };
    let services = &compose["services"];
    for service in [
        "rabbitmq",
        "postgres",
        "otp-sim",
        "otp-gateway",
        "prometheus",
        "grafana",
    ] {
        assert!(
            services[service].is_object() && services[service]["profiles"].is_null(),
            "`docker compose up` runs {service}"
        );
    }
    // Grafana (no container here): its provisioning finds the dashboards where the compose file
    // mounts them, and the data source is the compose file's Prometheus.
    let provider = std::fs::read_to_string(
        repo().join("deploy/grafana/provisioning/dashboards/otp-gateway.yml"),
    )
    .unwrap();
    let dashboards = provider
        .lines()
        .find_map(|line| line.trim().strip_prefix("path: "))
        .unwrap();
    let mounts = services["grafana"]["volumes"].to_string();
    assert!(
        mounts.contains(dashboards) && mounts.contains("deploy/grafana/dashboards"),
        "{mounts}"
    );
    let source = std::fs::read_to_string(
        repo().join("deploy/grafana/provisioning/datasources/prometheus.yml"),
    )
    .unwrap();
    assert!(source.contains("url: http://prometheus:9090"), "{source}");
    let names = Names::new("stack");
    let dir = tempfile::tempdir().unwrap();
    let (sim_http, sim_smpp) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let (grpc, receipts, ops) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    // The simulators' files, as the containers mount them, with this machine's addresses.
    let sim_files = dir.path().join("sim");
    std::fs::create_dir(&sim_files).unwrap();
    let mount = "/etc/otp-gateway/sim/";
    assert!(
        services["otp-gateway"]["volumes"]
            .to_string()
            .contains(mount.trim_end_matches('/')),
        "the gateway mounts deploy/sim at {mount}"
    );
    let rewrites = Rewrites(vec![
        (mount.to_owned(), format!("{}/", sim_files.display())),
        ("otp-sim:8099".into(), sim_http.clone()),
        ("otp-sim:2775".into(), sim_smpp.clone()),
        ("otp-gateway:8088".into(), receipts.clone()),
    ]);
    for file in std::fs::read_dir(repo().join("deploy/sim")).unwrap() {
        let file = file.unwrap().path();
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(
            sim_files.join(file.file_name().unwrap()),
            rewrites.apply(&text),
        )
        .unwrap();
    }

    // otp-sim with the compose file's command, on local ports.
    let sim_service = &services["otp-sim"];
    assert_eq!(sim_service["entrypoint"][0], "otp-sim");
    let sim_args: Vec<String> = sim_service["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|arg| {
            let arg = arg.as_str().unwrap();
            match arg.split_once('=') {
                Some(("--http", _)) => format!("--http={sim_http}"),
                Some(("--smpp", _)) => format!("--smpp={sim_smpp}"),
                _ => rewrites.apply(arg),
            }
        })
        .collect();
    let sim_log = dir.path().join("otp-sim.log");
    let sim = Process {
        child: Command::new(SIM)
            .args(&sim_args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&sim_log).unwrap())
            .spawn()
            .unwrap(),
        log: sim_log,
    };

    // otp-gateway with the compose file's environment: its configuration file, the broker and
    // the ledger (PostgreSQL) and the secrets, each at this machine's address.
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::write(secrets.join("otp_gateway_admin_key"), ADMIN_KEY).unwrap();
    std::fs::write(secrets.join("otp_gateway_hash_key"), HASH_KEY).unwrap();
    let environment: HashMap<String, String> =
        serde_json::from_value(services["otp-gateway"]["environment"].clone()).unwrap();
    let mut command = Command::new(GATEWAY);
    command.arg("serve");
    for (name, value) in &environment {
        let value = match name.as_str() {
            "OTP_GATEWAY_AMQP__URL" => BROKER_URL.to_owned(),
            "OTP_GATEWAY_STORE__URL" => database.url.clone(),
            _ => rewrites
                .apply(value)
                .replace("/run/secrets/", &format!("{}/", secrets.display())),
        };
        command.env(name, value);
    }
    let gateway_log = dir.path().join("otp-gateway.log");
    let gateway = Process {
        child: command
            // The test's own queue names; API keys stay on, as in the stack.
            .envs(
                names
                    .env()
                    .into_iter()
                    .filter(|(name, _)| name.contains("_AMQP__")),
            )
            .env("OTP_GATEWAY_GRPC__LISTEN", &grpc)
            .env("OTP_GATEWAY_RECEIPTS__LISTEN", &receipts)
            .env("OTP_GATEWAY_OPS__LISTEN", &ops)
            .env("OTP_GATEWAY_STORE__POOL_SIZE", "4")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&gateway_log).unwrap())
            .spawn()
            .unwrap(),
        log: gateway_log,
    };
    let logs = || {
        format!(
            "--- otp-sim\n{}\n--- otp-gateway\n{}",
            sim.log(),
            gateway.log()
        )
    };
    let mut up = false;
    for _ in 0..600 {
        if cli(&grpc, ADMIN_KEY, &["health"]).0 {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the gateway did not come up\n{}", logs());
    let broker = Broker::connect(&names).await;

    // The README's first steps: a send key for the demo tenant, and a code that arrives.
    let (made, key) = cli(
        &grpc,
        ADMIN_KEY,
        &[
            "keys",
            "create",
            "--tenant",
            "demo",
            "--scopes",
            "send,read",
        ],
    );
    assert!(made, "{key}");
    let key = key.trim().to_owned();
    let send = |args: &[&str]| {
        let mut all = vec!["send", "--tenant", "demo", "--account", "user-42", "--wait"];
        all.extend_from_slice(args);
        cli(&grpc, &key, &all)
    };
    let (ok, report) = send(&["--to", "+14155550101", "--code", "482913"]);
    assert!(ok && report.contains("DELIVERED"), "{report}\n{}", logs());
    let received = inbox(&sim_http, "+14155550101").await;
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0]["via"], "twilio");
    assert!(
        received[0]["text"].as_str().unwrap().contains("482913"),
        "{received:?}"
    );
    assert_eq!(received[0]["receipt"], "delivered");
    // The user typed it in: the conversion signal.
    let id = report.split_whitespace().next().unwrap();
    let (ok, verified) = cli(&grpc, &key, &["verify", id]);
    assert!(
        ok && verified.contains("the user entered the code"),
        "{verified}"
    );

    // A number that replied STOP.
    let (ok, report) = send(&["--to", "+14155550123", "--channels", "sms"]);
    assert!(!ok && report.contains("RECIPIENT_OPTED_OUT"), "{report}");
    // A number whose carrier filters messages: Twilio took it, its status callback says so.
    let (ok, report) = send(&["--to", "+447700900666", "--channels", "sms"]);
    assert!(!ok && report.contains("CARRIER_FILTERED"), "{report}");
    let received = inbox(&sim_http, "+447700900666").await;
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0]["receipt"], "undelivered");
    // A dead APNs token: the push fails and the SMS goes.
    let dead = sim_args
        .iter()
        .find_map(|arg| arg.strip_prefix("--dead-token="))
        .expect("the compose file names a dead token")
        .to_owned();
    let device = format!("apns:{dead}@com.example.app");
    let (ok, report) = send(&["--device", &device, "--to", "+14155550102"]);
    assert!(
        ok && report.contains("DEVICE_UNREGISTERED") && report.contains("DELIVERED"),
        "{report}"
    );

    // FCM (its OAuth grant first), and a voice call with its status callback.
    let (ok, report) = send(&["--device", "fcm:fcm-token-1@otp-sim", "--channels", "push"]);
    assert!(ok && report.contains("SENT"), "{report}");
    let received = inbox(&sim_http, "fcm-token-1").await;
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0]["via"], "fcm");
    let (ok, report) = send(&["--to", "+14155550103", "--channels", "voice"]);
    assert!(ok && report.contains("DELIVERED"), "{report}");
    let received = inbox(&sim_http, "+14155550103").await;
    assert_eq!(
        (&received[0]["channel"], &received[0]["receipt"]),
        (&Value::from("voice"), &Value::from("completed"))
    );

    // A Twilio outage: every SMS goes to the SMSC, and Twilio's circuit opens.
    let client = reqwest::Client::new();
    let refused = client
        .put(format!("http://{sim_http}/sim/faults/twilio"))
        .body(r#"{"error_rate": 2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    assert!(refused.text().await.unwrap().contains("error_rate"));
    let outage = client
        .put(format!("http://{sim_http}/sim/faults/twilio"))
        .body(r#"{"error_rate": 1.0}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(outage.status(), 200);
    for n in 0..6 {
        let number = format!("+1415555020{n}");
        let (ok, report) = send(&["--to", &number, "--channels", "sms"]);
        assert!(ok && report.contains("DELIVERED"), "{report}");
        let received = inbox(&sim_http, &number).await;
        assert_eq!(received.last().unwrap()["via"], "smpp", "{received:?}");
        assert_eq!(received.last().unwrap()["receipt"], "delivered");
    }

    // Support's view: the account's diagnosis names each failure and its fix.
    let (ok, diagnosis) = cli(
        &grpc,
        &key,
        &["diagnose", "--tenant", "demo", "--account", "user-42"],
    );
    assert!(ok, "{diagnosis}");
    for expected in ["+1415•••0123", "START", "+4477•••0666", "remove it"] {
        assert!(
            diagnosis.contains(expected),
            "`{expected}` in the diagnosis:\n{diagnosis}"
        );
    }
    // The operator's view: the metrics Prometheus scrapes.
    let (made, status_key) = cli(
        &grpc,
        ADMIN_KEY,
        &[
            "keys",
            "create",
            "--scopes",
            "status",
            "--label",
            "prometheus",
        ],
    );
    assert!(made, "{status_key}");
    let (code, metrics) = get(ops.parse().unwrap(), "/metrics", Some(status_key.trim())).await;
    assert_eq!(code, 200);
    for expected in [
        r#"otp_provider_circuit_open{provider="twilio""#,
        r#"reason="RECIPIENT_OPTED_OUT"} 1"#,
        r#"otp_receipts_total{provider="smpp",outcome="DELIVERED"} 6"#,
        r#"otp_verifications_total{tenant="demo",verified="true"} 1"#,
    ] {
        assert!(metrics.contains(expected), "`{expected}` in\n{metrics}");
    }
    let circuit = metrics
        .lines()
        .find(|line| line.starts_with(r#"otp_provider_circuit_open{provider="twilio""#))
        .unwrap();
    assert!(
        circuit.ends_with(" 1"),
        "Twilio's circuit is open: {circuit}"
    );

    // Prometheus as the stack runs it: its key made by the prometheus-key service's command,
    // its scrape configuration and alert rules from deploy/prometheus.
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let script = services["prometheus-key"]["command"][0].as_str().unwrap();
    let script = rewrites
        .apply(script)
        .replace("$$", "$")
        .replace("/run/secrets/", &format!("{}/", secrets.display()))
        .replace("/keys/", &format!("{}/", keys.display()))
        .replace("otp-gateway:50051", &grpc);
    let binaries = Path::new(GATEWAY).parent().unwrap();
    let path = format!("{}:{}", binaries.display(), std::env::var("PATH").unwrap());
    let made = Command::new("sh")
        .args(["-c", &script])
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    prometheus_sees_the_open_circuit(&ops, &keys, dir.path()).await;
    broker.cleanup().await;
}

/// Runs Prometheus on `deploy/prometheus` (scraping `ops` with the key in `keys`, every second
/// instead of every 15 s) until its `OtpProviderCircuitOpen` alert is pending for Twilio; skips
/// without Prometheus unless CI=true.
async fn prometheus_sees_the_open_circuit(ops: &str, keys: &Path, dir: &Path) {
    let config = dir.join("prometheus");
    std::fs::create_dir(&config).unwrap();
    for file in std::fs::read_dir(repo().join("deploy/prometheus")).unwrap() {
        let file = file.unwrap().path();
        let text = std::fs::read_to_string(&file)
            .unwrap()
            .replace("otp-gateway:9090", ops)
            .replace("/run/otp-keys/", &format!("{}/", keys.display()))
            .replace("_interval: 15s", "_interval: 1s");
        std::fs::write(config.join(file.file_name().unwrap()), text).unwrap();
    }
    let web = format!("127.0.0.1:{}", free_port());
    let log = dir.join("prometheus.log");
    let started = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            config.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn();
    let prometheus = match started {
        Ok(child) => Process { child, log },
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipping the Prometheus part: no prometheus ({e})");
            return;
        }
        Err(e) => panic!("no prometheus and CI=true: {e}"),
    };
    let query = |expr: &str| {
        let url =
            url::Url::parse_with_params(&format!("http://{web}/api/v1/query"), [("query", expr)])
                .unwrap();
        async move {
            let body = reqwest::get(url).await.ok()?.text().await.ok()?;
            let answer: Value = serde_json::from_str(&body).ok()?;
            answer["data"]["result"].as_array().cloned()
        }
    };
    for _ in 0..300 {
        let up = query(r#"up{job="otp-gateway"} == 1"#).await;
        let alert = query(r#"ALERTS{alertname="OtpProviderCircuitOpen",provider="twilio"}"#).await;
        if up.is_some_and(|r| r.len() == 1) && alert.is_some_and(|r| !r.is_empty()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "Prometheus did not scrape the gateway or raise the circuit alert\n{}",
        prometheus.log()
    );
}
