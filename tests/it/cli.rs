//! The binary as an operator meets it: a bad configuration stops it with exit code 64 naming
//! the key; an unreachable broker is explained (without the password) while it keeps retrying,
//! and SIGTERM still stops it cleanly.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

const BINARY: &str = env!("CARGO_BIN_EXE_otp-gateway");

#[test]
fn a_bad_configuration_exits_64_and_names_the_key() {
    let output = Command::new(BINARY)
        .arg("serve")
        .env("OTP_GATEWAY_AMQP__PREFETCH", "0")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("amqp.prefetch"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, "[routes]\nsms = [\"twilio\"]\n").unwrap();
    let output = Command::new(BINARY)
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("routes.sms") && stderr.contains("twilio"),
        "{stderr}"
    );
}

#[test]
fn a_push_key_that_cannot_be_read_exits_64_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    let missing = dir.path().join("AuthKey_KEY1234567.p8");
    std::fs::write(
        &file,
        format!(
            "[providers.apns]\nkind = \"apns\"\nteam_id = \"TEAM123456\"\nkey_id = \"KEY1234567\"\n\
             key_file = {missing:?}\ntopics = [\"com.example.app\"]\n"
        ),
    )
    .unwrap();
    let output = Command::new(BINARY)
        .args(["serve", "--config"])
        .arg(&file)
        .env("OTP_GATEWAY_GRPC__LISTEN", "127.0.0.1:0")
        .env("OTP_GATEWAY_RECEIPTS__LISTEN", "127.0.0.1:0")
        .env("OTP_GATEWAY_OPS__LISTEN", "127.0.0.1:0")
        .env(
            "OTP_GATEWAY_STORE__URL",
            format!("sqlite://{}/ledger.db", dir.path().display()),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("providers.apns.key_file") && stderr.contains("AuthKey_KEY1234567.p8"),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_broker_is_explained_and_sigterm_still_stops_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BINARY)
        .arg("serve")
        .current_dir(dir.path())
        .env(
            "OTP_GATEWAY_AMQP__URL",
            "amqp://guest:hunter2@127.0.0.1:1/%2f",
        )
        .env("OTP_GATEWAY_GRPC__LISTEN", "127.0.0.1:0")
        .env("OTP_GATEWAY_RECEIPTS__LISTEN", "127.0.0.1:0")
        .env("OTP_GATEWAY_OPS__LISTEN", "127.0.0.1:0")
        .env("OTP_GATEWAY_AMQP__RECONNECT_INITIAL", "100ms")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let terminated = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "clean exit while disconnected: {stderr}");
    assert!(stderr.contains("cannot reach RabbitMQ"), "{stderr}");
    assert!(
        stderr.contains("amqp://guest:•••@127.0.0.1:1/%2f"),
        "{stderr}"
    );
    assert!(stderr.contains("rabbitmq-server -detached"), "{stderr}");
    assert!(stderr.contains("retrying"), "{stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "the password never shows: {stderr}"
    );
    assert!(
        dir.path().join("otp-gateway.db").exists(),
        "the embedded SQLite ledger is the default"
    );
}

#[test]
fn a_ledger_that_cannot_be_opened_is_explained_once() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.db");
    std::fs::write(
        &ledger,
        "this is no SQLite database, but it is long enough to be read as one",
    )
    .unwrap();
    let output = Command::new(BINARY)
        .arg("serve")
        .env("OTP_GATEWAY_GRPC__LISTEN", "127.0.0.1:0")
        .env("OTP_GATEWAY_RECEIPTS__LISTEN", "127.0.0.1:0")
        .env("OTP_GATEWAY_OPS__LISTEN", "127.0.0.1:0")
        .env(
            "OTP_GATEWAY_STORE__URL",
            format!("sqlite://{}", ledger.display()),
        )
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("opening the ledger"), "{stderr}");
    assert_eq!(
        stderr.matches("file is not a database").count(),
        1,
        "said once: {stderr}"
    );
}

#[test]
fn client_commands_never_read_the_servers_configuration() {
    // A server configuration with a broken Twilio section (no token, no sender).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        "[providers.twilio]\nkind = \"twilio\"\naccount_sid = \"nope\"\n",
    )
    .unwrap();
    let serve = Command::new(BINARY)
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(serve.status.code(), Some(64), "the server refuses it");

    // The client finds the gateway without it (here: nobody listening on a free port, or the
    // default address) and says what happened there, not what is wrong with the server's file.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = free.local_addr().unwrap().to_string();
    drop(free);
    for args in [
        vec!["status", "acme/nope", "--server", server.as_str()],
        vec!["status", "acme/nope"],
    ] {
        let output = Command::new(BINARY)
            .args(&args)
            .env("OTP_GATEWAY_CONFIG", &file)
            .env_remove("OTP_GATEWAY_SERVER")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_ne!(output.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(!stderr.contains("configuration"), "{args:?}: {stderr}");
    }
    let output = Command::new(BINARY)
        .args(["status", "acme/nope", "--server", server.as_str()])
        .env("OTP_GATEWAY_CONFIG", &file)
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(69),
        "unreachable: EX_UNAVAILABLE"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot reach the gateway"), "{stderr}");
}
