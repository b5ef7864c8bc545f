//! TLS on the gRPC port, from the outside: the real binary with a certificate from a private CA
//! and client certificates required (mutual TLS), API keys on, and its broker link over TLS
//! too (amqps:// through a TLS-terminating proxy in front of the local RabbitMQ). The CLI and a gRPC client reach
//! it with the CA file and a client certificate; without one, with a CA that did not sign the
//! gateway's certificate, or in plain text they are refused (and the gateway goes on serving);
//! a new certificate is taken on SIGHUP and when its files change.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use otp_gateway::proto::v1::code_delivery_client::CodeDeliveryClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::auth::{Served, bootstrap_key, cli_with, get, send_request, serve, text};
use crate::helpers::*;

/// Puts `from` at `to` in one step (a reload never sees half a file).
fn replace(from: &Path, to: &Path) {
    let staged = to.with_extension("new");
    std::fs::copy(from, &staged).unwrap();
    std::fs::rename(&staged, to).unwrap();
}

/// A gRPC client over TLS trusting `ca`, showing `identity` when given.
async fn tls_client(
    server: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<CodeDeliveryClient<Channel>, tonic::transport::Error> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    let channel = Channel::from_shared(format!("https://{server}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(CodeDeliveryClient::new(channel))
}

/// The client settings of the CLI: the CA and a client certificate.
fn client_env<'a>(ca: &'a Path, cert: &'a Path, key: &'a Path) -> [(&'static str, &'a OsStr); 3] {
    [
        ("OTP_GATEWAY_CA_FILE", ca.as_os_str()),
        ("OTP_GATEWAY_CLIENT_CERT", cert.as_os_str()),
        ("OTP_GATEWAY_CLIENT_KEY", key.as_os_str()),
    ]
}

/// Waits until `health` over TLS trusting `ca` answers SERVING.
fn wait_healthy(served: &Served, ca: &Path, cert: &Path, key: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let output = cli_with(
            &served.server,
            None,
            &["health"],
            &client_env(ca, cert, key),
        );
        if output.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {}",
            text(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

// Two workers: the broker's TLS proxy runs here while the CLI below blocks one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_port_speaks_tls_requires_client_certificates_and_takes_new_certificates() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if !broker_available().await {
        return;
    }
    let names = Names::new("grpc-tls");
    let broker = Broker::connect(&names).await;
    let dir = tempfile::tempdir().unwrap();
    let gateway_ca = PrivateCa::new(dir.path(), "gateway");
    let (issued_cert, issued_key) = gateway_ca.issue("server", SERVER_NAMES);
    let (cert_file, key_file): (PathBuf, PathBuf) =
        (dir.path().join("served.pem"), dir.path().join("served.key"));
    replace(&issued_cert, &cert_file);
    replace(&issued_key, &key_file);
    let clients_ca = PrivateCa::new(dir.path(), "clients");
    let (client_cert, client_key) = clients_ca.issue("backend", CLIENT_AUTH);
    let bootstrap = bootstrap_key();
    let clients_pem = clients_ca.pem();
    // The broker behind TLS too.
    let broker_ca = PrivateCa::new(dir.path(), "broker");
    let (broker_cert, broker_key) = broker_ca.issue("rabbit", SERVER_NAMES);
    let (amqps_port, amqps_handshakes) = tls_broker_proxy(&broker_cert, &broker_key, None).await;
    let amqps_url = format!("amqps://guest:guest@localhost:{amqps_port}/%2f");
    let broker_pem = broker_ca.pem();
    let served = serve(
        &names,
        dir.path(),
        &bootstrap,
        &[
            ("OTP_GATEWAY_GRPC__TLS__CERT_FILE", cert_file.as_os_str()),
            ("OTP_GATEWAY_GRPC__TLS__KEY_FILE", key_file.as_os_str()),
            (
                "OTP_GATEWAY_GRPC__TLS__CLIENT_CA_FILE",
                clients_pem.as_os_str(),
            ),
            ("OTP_GATEWAY_AMQP__URL", amqps_url.as_ref()),
            ("OTP_GATEWAY_AMQP__CA_FILE", broker_pem.as_os_str()),
        ],
    );
    let server = served.server.clone();
    let gateway_pem = gateway_ca.pem();
    let env = client_env(&gateway_pem, &client_cert, &client_key);
    wait_healthy(
        &served,
        &gateway_pem,
        &client_cert,
        &client_key,
        "the gateway serves TLS",
    );

    // The CLI makes a key and sends a code over TLS.
    let made = cli_with(
        &server,
        Some(&bootstrap),
        &[
            "keys",
            "create",
            "--tenant",
            "acme",
            "--scopes",
            "send,read",
        ],
        &env,
    );
    assert!(made.status.success(), "{}", text(&made.stderr));
    let key = text(&made.stdout).trim().to_owned();
    let sent = cli_with(
        &server,
        Some(&key),
        &[
            "send",
            "--tenant",
            "acme",
            "--to",
            "+14155550101",
            "--channels",
            "sms",
            "--wait",
        ],
        &env,
    );
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    let delivery_id = text(&sent.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert!(
        text(&sent.stdout).contains("SENT"),
        "{}",
        text(&sent.stdout)
    );
    assert!(
        amqps_handshakes.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the job went through the broker over TLS"
    );

    // A gRPC client with the CA and a client certificate reads it.
    let mut client = tls_client(&server, &gateway_pem, Some((&client_cert, &client_key)))
        .await
        .expect("a TLS client with a client certificate connects");
    let report = client
        .get_delivery(get(&delivery_id, Some(&key)))
        .await
        .expect("read over TLS")
        .into_inner();
    assert_eq!(report.delivery_id, delivery_id);

    // Without a client certificate the handshake is refused.
    let refused = match tls_client(&server, &gateway_pem, None).await {
        Err(error) => Err(error.to_string()),
        Ok(mut client) => client
            .send_code(send_request("acme", "no-cert", Some(&key)))
            .await
            .map(|_| ())
            .map_err(|status| status.to_string()),
    };
    assert!(refused.is_err(), "a client without a certificate got in");

    // A CA that did not sign the gateway's certificate: the CLI says it cannot verify it.
    let other_ca = PrivateCa::new(dir.path(), "other");
    let other_pem = other_ca.pem();
    let wrong = cli_with(
        &server,
        Some(&key),
        &["status", &delivery_id],
        &client_env(&other_pem, &client_cert, &client_key),
    );
    assert_eq!(wrong.status.code(), Some(69), "{}", text(&wrong.stderr));
    let said = text(&wrong.stderr);
    assert!(
        said.contains("certificate") && said.contains("--ca-file"),
        "{said}"
    );

    // A plain-text client is refused; the gateway goes on serving TLS.
    let plain = Command::new(env!("CARGO_BIN_EXE_otp-gateway"))
        .args([
            "status",
            &delivery_id,
            "--server",
            &format!("http://{server}"),
        ])
        .env("OTP_GATEWAY_KEY", &key)
        .output()
        .unwrap();
    assert!(!plain.status.success(), "plain text got an answer");
    let mut tcp = std::net::TcpStream::connect(&server).unwrap();
    std::io::Write::write_all(&mut tcp, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    drop(tcp);
    wait_healthy(
        &served,
        &gateway_pem,
        &client_cert,
        &client_key,
        "serving after plain text",
    );

    // A certificate from another CA, taken on SIGHUP: new connections need that CA.
    let (next_cert, next_key) = other_ca.issue("server", SERVER_NAMES);
    replace(&next_key, &key_file);
    replace(&next_cert, &cert_file);
    let hangup = Command::new("kill")
        .args(["-HUP", &served.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hangup.success());
    wait_healthy(
        &served,
        &other_pem,
        &client_cert,
        &client_key,
        "the new certificate is served",
    );
    let old = cli_with(&served.server, None, &["health"], &env);
    assert!(
        !old.status.success(),
        "the old CA still verifies the gateway"
    );

    // And again when the files change, without a signal (checked every 2 s).
    let (third_cert, third_key) = gateway_ca.issue("renewed", SERVER_NAMES);
    replace(&third_key, &key_file);
    replace(&third_cert, &cert_file);
    wait_healthy(
        &served,
        &gateway_pem,
        &client_cert,
        &client_key,
        "the renewed certificate is served",
    );

    // A key file that does not go with the certificate is logged; the certificate in use stays.
    replace(&next_key, &key_file);
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_healthy(
        &served,
        &gateway_pem,
        &client_cert,
        &client_key,
        "the certificate in use stays",
    );
    drop(served);
    let log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap();
    assert!(log.contains("gRPC TLS certificate reloaded"), "{log}");
    assert!(
        log.contains("not reloaded") && log.contains("grpc.tls.key_file"),
        "{log}"
    );
    broker.cleanup().await;
}

#[test]
fn certificate_files_that_do_not_load_stop_the_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = PrivateCa::new(dir.path(), "start");
    let (cert, key) = ca.issue("server", SERVER_NAMES);
    let (_, other_key) = ca.issue("other", SERVER_NAMES);
    let missing = dir.path().join("missing.pem");
    for (cert, key, named) in [
        (&missing, &key, "grpc.tls.cert_file"),
        (&key, &key, "grpc.tls.cert_file"),
        (&cert, &missing, "grpc.tls.key_file"),
        (&cert, &other_key, "grpc.tls.key_file"),
    ] {
        let stderr = refused_start(
            dir.path(),
            &[
                ("OTP_GATEWAY_GRPC__TLS__CERT_FILE", cert.as_os_str()),
                ("OTP_GATEWAY_GRPC__TLS__KEY_FILE", key.as_os_str()),
            ],
        );
        assert!(stderr.contains(named), "{named}: {stderr}");
    }
}
