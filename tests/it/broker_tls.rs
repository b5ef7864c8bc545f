//! The broker link over TLS (amqps://), through a TLS-terminating proxy in front of the local
//! RabbitMQ that requires a client certificate: jobs published to the broker reach the
//! gateway through it; a broker certificate that does not chain to `amqp.ca_file` stops the
//! start, saying which certificate and why; TLS settings that cannot work are refused naming
//! the key.

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn jobs_reach_the_gateway_over_amqps_with_a_client_certificate() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker_ca = PrivateCa::new(dir.path(), "broker");
    let (cert, key) = broker_ca.issue("rabbit", SERVER_NAMES);
    let clients_ca = PrivateCa::new(dir.path(), "clients");
    let (client_cert, client_key) = clients_ca.issue("gateway", CLIENT_AUTH);
    let (port, handshakes) = tls_broker_proxy(&cert, &key, Some(&clients_ca.pem())).await;

    let names = Names::new("amqps");
    let mut broker = Broker::connect(&names).await;
    let overrides = [
        (
            "amqp.url",
            json!(format!("amqps://guest:guest@localhost:{port}/%2f")),
        ),
        ("amqp.ca_file", json!(broker_ca.pem())),
        ("amqp.client_cert_file", json!(client_cert)),
        ("amqp.client_key_file", json!(client_key)),
    ];
    let gateway = Gateway::start(config(&names, dir.path(), &overrides)).await;
    assert!(
        handshakes.load(Ordering::SeqCst) >= 1,
        "the gateway connected through the TLS proxy"
    );
    broker.publish_json(&job("tls-1", "482913")).await;
    let events = broker.events_for(1, Duration::from_secs(20)).await;
    assert_eq!(events["acme/tls-1"]["status"], "SENT");
    assert_eq!(outbox(dir.path()).len(), 1);
    gateway.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_the_ca_file_does_not_vouch_for_stops_the_start() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker_ca = PrivateCa::new(dir.path(), "broker");
    let (cert, key) = broker_ca.issue("rabbit", SERVER_NAMES);
    let (port, _) = tls_broker_proxy(&cert, &key, None).await;
    let other_ca = PrivateCa::new(dir.path(), "other");
    let names = Names::new("amqps-wrong-ca");
    let binary = env!("CARGO_BIN_EXE_otp-gateway");
    let mut command = Command::new(binary);
    command
        .arg("serve")
        .envs(names.env())
        .env(
            "OTP_GATEWAY_AMQP__URL",
            format!("amqps://guest:hunter2@localhost:{port}/%2f"),
        )
        .env("OTP_GATEWAY_AMQP__CA_FILE", other_ca.pem())
        .env("OTP_GATEWAY_GRPC__LISTEN", "127.0.0.1:0")
        .env("OTP_GATEWAY_RECEIPTS__LISTEN", "127.0.0.1:0")
        .env("OTP_GATEWAY_OPS__LISTEN", "127.0.0.1:0")
        .env(
            "OTP_GATEWAY_STORE__URL",
            format!("sqlite://{}/ledger.db", dir.path().display()),
        );
    // Run off the runtime that serves the proxy.
    let child = tokio::task::spawn_blocking(move || command.output());
    let output = tokio::time::timeout(Duration::from_secs(30), child)
        .await
        .expect("the start stops instead of retrying")
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");
    assert!(stderr.contains("amqp.ca_file"), "{stderr}");
    assert!(
        stderr.contains(&other_ca.pem().display().to_string()),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "no password: {stderr}");
}

#[test]
fn tls_settings_that_cannot_work_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "no certificate here").unwrap();
    type Setting<'a> = (&'a str, &'a std::ffi::OsStr);
    let cases: [(&str, &[Setting], &str); 4] = [
        (
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            &[("OTP_GATEWAY_AMQP__CA_FILE", not_pem.as_os_str())],
            "amqp.ca_file",
        ),
        (
            "amqps://guest:guest@127.0.0.1:5671/%2f",
            &[("OTP_GATEWAY_AMQP__CA_FILE", missing.as_os_str())],
            "amqp.ca_file",
        ),
        (
            "amqps://guest:guest@127.0.0.1:5671/%2f",
            &[("OTP_GATEWAY_AMQP__CA_FILE", not_pem.as_os_str())],
            "amqp.ca_file",
        ),
        (
            "amqps://guest:guest@127.0.0.1:5671/%2f",
            &[("OTP_GATEWAY_AMQP__CLIENT_CERT_FILE", not_pem.as_os_str())],
            "amqp.client_key_file",
        ),
    ];
    for (url, env, key) in cases {
        let mut settings = vec![("OTP_GATEWAY_AMQP__URL", url.as_ref())];
        settings.extend_from_slice(env);
        let stderr = refused_start(dir.path(), &settings);
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
}
