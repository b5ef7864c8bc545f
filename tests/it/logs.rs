//! The real binary, run as an operator would, with JSON logs at debug level: codes never show
//! up in its logs, and phone numbers only masked. Also exercises the `send` and `status` CLI.

use std::process::{Command, Stdio};
use std::time::Duration;

use lapin::BasicProperties;
use serde_json::json;

use crate::helpers::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn logs_never_contain_a_code_and_mask_numbers() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("logs");
    let mut broker = Broker::connect(&names).await;
    let port = free_port();
    let server = format!("127.0.0.1:{port}");
    let binary = env!("CARGO_BIN_EXE_otp-gateway");
    let mut env = names.env();
    env.extend([
        ("OTP_GATEWAY_GRPC__LISTEN".to_owned(), server.clone()),
        (
            "OTP_GATEWAY_RECEIPTS__LISTEN".to_owned(),
            "127.0.0.1:0".to_owned(),
        ),
        (
            "OTP_GATEWAY_OPS__LISTEN".to_owned(),
            "127.0.0.1:0".to_owned(),
        ),
        (
            "OTP_GATEWAY_STORE__URL".to_owned(),
            format!("sqlite://{}/ledger.db", dir.path().display()),
        ),
        (
            "OTP_GATEWAY_PROVIDERS__SANDBOX__OUTBOX".to_owned(),
            dir.path().join("outbox.jsonl").display().to_string(),
        ),
        ("RUST_LOG".to_owned(), "debug".to_owned()),
        // A Twilio account whose status_callback disagrees with the receipts listener's
        // public URL: its callbacks could never verify, and the start says so.
        (
            "OTP_GATEWAY_RECEIPTS__PUBLIC_URL".to_owned(),
            "http://127.0.0.1:8088".to_owned(),
        ),
        (
            "OTP_GATEWAY_PROVIDERS__TWILIO__KIND".to_owned(),
            "twilio".to_owned(),
        ),
        (
            "OTP_GATEWAY_PROVIDERS__TWILIO__ACCOUNT_SID".to_owned(),
            "ACtest".to_owned(),
        ),
        (
            "OTP_GATEWAY_PROVIDERS__TWILIO__AUTH_TOKEN".to_owned(),
            "secret".to_owned(),
        ),
        (
            "OTP_GATEWAY_PROVIDERS__TWILIO__FROM".to_owned(),
            // Quoted: figment reads an unquoted +15005550006 as a number.
            r#""+15005550006""#.to_owned(),
        ),
        (
            "OTP_GATEWAY_PROVIDERS__TWILIO__STATUS_CALLBACK".to_owned(),
            "http://localhost:8088/receipts/twilio/twilio".to_owned(),
        ),
    ]);
    let child = Command::new(binary)
        .args(["serve", "--log-json"])
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // `send --wait` through the CLI, retried until the gateway answers and consumes.
    let mut sent = None;
    for _ in 0..100 {
        let output = Command::new(binary)
            .args([
                "send",
                "--server",
                &server,
                "--to",
                "+14155550101",
                "--code",
                "482913",
                "--channels",
                "sms",
                "--wait",
            ])
            .output()
            .unwrap();
        if output.status.success() {
            sent = Some(String::from_utf8(output.stdout).unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sent = sent.expect("otp-gateway send --wait succeeds once the gateway is up");
    assert!(sent.contains("SENT"), "{sent}");
    let delivery_id = sent.split_whitespace().next().unwrap().to_owned();
    let status = Command::new(binary)
        .args(["status", "--server", &server, &delivery_id])
        .output()
        .unwrap();
    assert!(status.status.success());
    let printed = String::from_utf8_lossy(&status.stdout);
    assert!(
        printed.contains("via sandbox (sms, GSM_7, 1 segment): SENT"),
        "{printed}"
    );
    // A client command takes --server before the verb too, never needs the server's
    // configuration (a broken one does not stop it), and says "not found" as a person would.
    let unknown = Command::new(binary)
        .args(["--server", &server, "status", "acme/nope"])
        .env("OTP_GATEWAY_AMQP__PREFETCH", "0")
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    assert_eq!(
        String::from_utf8_lossy(&unknown.stderr),
        "otp-gateway: not found: no delivery acme/nope\n"
    );

    // A queue job, and malformed ones whose errors would echo the code if they could.
    broker.publish_json(&job("logged", "739164")).await;
    let mut numeric_code = job("numeric", "0");
    numeric_code["code"] = json!(615243);
    broker.publish_json(&numeric_code).await;
    broker
        .publish(
            br#"{"code": "928374", "#,
            Some("application/json"),
            BasicProperties::default(),
        )
        .await;
    // A provider error text that quotes the number (the sandbox plays Twilio's 21211).
    let mut quoted = job("quoted", "551234");
    quoted["targets"] = json!([{"phone": {"number": "+15005550001"}}]);
    broker.publish_json(&quoted).await;
    let events = broker.events_for(3, Duration::from_secs(20)).await;
    assert!(events.contains_key("acme/logged"));
    let quoted_event = events["acme/quoted"].to_string();
    assert!(
        quoted_event.contains("+1500•••0001") && !quoted_event.contains("15005550001"),
        "the event masks the number inside the provider's text: {quoted_event}"
    );
    broker
        .wait_ready(&names.dead_letter_queue, 2, Duration::from_secs(10))
        .await;

    // SIGTERM, as docker or systemd would send it.
    let terminated = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "clean exit on SIGTERM");
    let logs = String::from_utf8(output.stderr).unwrap();

    assert!(
        logs.contains("delivery finished"),
        "the run was logged:\n{logs}"
    );
    assert!(
        logs.contains("malformed job"),
        "the dead letters were logged:\n{logs}"
    );
    assert!(
        logs.lines().any(|l| l.contains("malformed job")
            && l.contains(r#""job_id":"numeric""#)
            && l.contains(r#""tenant":"acme""#)),
        "a dead letter's log line names its job:\n{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("otp-gateway serving") && l.contains(r#""receipts":"127.0.0.1:"#)),
        "the receipts listener's address is logged at start:\n{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("not the URL the receipts listener verifies")
                && l.contains("http://127.0.0.1:8088/receipts/twilio/twilio")),
        "a status_callback that can never verify is warned about:\n{logs}"
    );
    for line in logs.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    for code in ["482913", "739164", "615243", "928374"] {
        assert!(
            !logs.contains(code),
            "code {code} appears in the logs:\n{logs}"
        );
    }
    assert!(
        !logs.contains("+14155550101") && !logs.contains("15005550001"),
        "a full phone number appears in the logs"
    );
    assert!(logs.contains("+1415•••0101"), "numbers are logged masked");
    assert!(
        !logs.contains("guest:guest"),
        "the broker password is redacted"
    );
    assert!(
        outbox(dir.path())
            .iter()
            .any(|l| l["message"].as_str().unwrap().contains("482913"))
    );
    broker.cleanup().await;
}
