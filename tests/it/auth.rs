//! API keys from the outside: the real binary with authentication on (the default) and a
//! bootstrap admin key from the environment; keys made, listed and revoked with the CLI;
//! calls over gRPC without a key, with a wrong, malformed, revoked or another tenant's key.
//! Health checks and reflection stay open; the ledger keeps no key in clear.

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use otp_gateway::proto::v1;
use otp_gateway::proto::v1::code_delivery_client::CodeDeliveryClient;
use otp_gateway::proto::v1::policy_admin_client::PolicyAdminClient;
use otp_gateway::proto::v1::providers_client::ProvidersClient;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::helpers::*;

const BINARY: &str = env!("CARGO_BIN_EXE_otp-gateway");

/// The real gateway, with keys on and `bootstrap` as its bootstrap admin key.
pub struct Served {
    pub child: Child,
    pub server: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// The gateway with keys on, `bootstrap` as its bootstrap key and the settings `env`.
pub fn serve(
    names: &Names,
    dir: &std::path::Path,
    bootstrap: &str,
    env: &[(&str, &std::ffi::OsStr)],
) -> Served {
    let server = free_address();
    let child = Command::new(BINARY)
        .arg("serve")
        .envs(env.iter().copied())
        .envs(names.env())
        .env("OTP_GATEWAY_AUTH__MODE", "keys")
        .env("OTP_GATEWAY_AUTH__BOOTSTRAP_ADMIN_KEY", bootstrap)
        .env("OTP_GATEWAY_GRPC__LISTEN", &server)
        .env("OTP_GATEWAY_RECEIPTS__LISTEN", "127.0.0.1:0")
        .env("OTP_GATEWAY_OPS__LISTEN", "127.0.0.1:0")
        .env(
            "OTP_GATEWAY_STORE__URL",
            format!("sqlite://{}/ledger.db", dir.display()),
        )
        .env(
            "OTP_GATEWAY_PROVIDERS__SANDBOX__OUTBOX",
            dir.join("outbox.jsonl"),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("gateway.log")).unwrap())
        .spawn()
        .unwrap();
    Served { child, server }
}

/// The CLI against `server`, with `key` in OTP_GATEWAY_KEY (or none).
pub fn cli(server: &str, key: Option<&str>, args: &[&str]) -> Output {
    cli_with(server, key, args, &[])
}

/// The CLI against `server`, with `key` in OTP_GATEWAY_KEY (or none) and more settings `env`.
pub fn cli_with(
    server: &str,
    key: Option<&str>,
    args: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
) -> Output {
    let mut command = Command::new(BINARY);
    command
        .args(args)
        .args(["--server", server])
        .env_remove("OTP_GATEWAY_KEY")
        .envs(env.iter().copied());
    if let Some(key) = key {
        command.env("OTP_GATEWAY_KEY", key);
    }
    command.output().unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A key made with the CLI under `admin`: its text, alone on stdout.
fn create_key(server: &str, admin: &str, args: &[&str]) -> String {
    let mut all = vec!["keys", "create"];
    all.extend_from_slice(args);
    let output = cli(server, Some(admin), &all);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let key = text(&output.stdout).trim().to_owned();
    assert!(key.starts_with("otpk_") && !key.contains('\n'), "{key}");
    key
}

/// A request carrying `key` (or none).
pub fn with_key<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {key}")).unwrap(),
        );
    }
    request
}

pub fn send_request(
    tenant: &str,
    job_id: &str,
    key: Option<&str>,
) -> tonic::Request<v1::SendCodeRequest> {
    let job = v1::SendCodeJob {
        job_id: job_id.into(),
        tenant: tenant.into(),
        account: "user-1".into(),
        code: "482913".into(),
        expires_at: Some(prost_types::Timestamp {
            seconds: jiff::Timestamp::now().as_second() + 600,
            nanos: 0,
        }),
        purpose: "sign_in".into(),
        locale: "en".into(),
        user_initiated: true,
        channels: vec![v1::Channel::Sms as i32],
        targets: vec![v1::Target {
            kind: Some(v1::target::Kind::Phone(v1::PhoneTarget {
                number: "+14155550101".into(),
            })),
        }],
        ..Default::default()
    };
    with_key(v1::SendCodeRequest { job: Some(job) }, key)
}

pub fn get(id: &str, key: Option<&str>) -> tonic::Request<v1::GetDeliveryRequest> {
    with_key(
        v1::GetDeliveryRequest {
            delivery_id: id.into(),
        },
        key,
    )
}

async fn channel(server: &str) -> Channel {
    for _ in 0..200 {
        if let Ok(channel) = Channel::from_shared(format!("http://{server}"))
            .unwrap()
            .connect()
            .await
        {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway at {server} did not come up");
}

/// The secret part of `otpk_<id>_<secret>` (which may itself hold `_`: base64url), or the
/// whole of a bootstrap key.
fn secret_of(key: &str) -> &str {
    let secret = match key.strip_prefix("otpk_") {
        Some(rest) => rest.split_once('_').unwrap().1,
        None => key,
    };
    assert!(secret.len() >= 40, "{key}");
    secret
}

/// A fresh bootstrap admin key.
pub fn bootstrap_key() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

#[tokio::test]
async fn keys_limit_every_call_to_their_tenant_and_scopes() {
    if !broker_available().await {
        return;
    }
    let names = Names::new("auth-keys");
    let broker = Broker::connect(&names).await;
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = bootstrap_key();
    let served = serve(&names, dir.path(), &bootstrap, &[]);
    let server = served.server.as_str();
    let channel = channel(server).await;

    // Health checks and reflection need no key.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health is open");
    {
        use tonic_reflection::pb::v1 as reflection;
        let mut client =
            reflection::server_reflection_client::ServerReflectionClient::new(channel.clone());
        let request = reflection::ServerReflectionRequest {
            message_request: Some(
                reflection::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
            ..Default::default()
        };
        let mut answers = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection is open")
            .into_inner();
        assert!(answers.message().await.unwrap().is_some());
    }

    // Without a key, with a malformed, unknown or wrong one: the same refusal.
    let mut delivery = CodeDeliveryClient::new(channel.clone());
    let forged = format!("otpk_{}_{}", "0123456789ab", "A".repeat(43));
    let mut refusals = Vec::new();
    for key in [
        None,
        Some("not-a-key"),
        Some(forged.as_str()),
        Some(&bootstrap[1..]),
    ] {
        let status = delivery
            .send_code(send_request("acme", "no-key", key))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{key:?}: {status:?}");
        refusals.push(status.message().to_owned());
    }
    assert!(refusals.windows(2).all(|w| w[0] == w[1]), "{refusals:?}");
    // The CLI without a key is refused too, and says so.
    let refused = cli(server, None, &["keys", "ls"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("a valid API key is required"),
        "{}",
        text(&refused.stderr)
    );

    // The bootstrap key makes keys (it cannot send codes itself).
    let status = delivery
        .send_code(send_request("acme", "bootstrap", Some(&bootstrap)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let acme = create_key(
        server,
        &bootstrap,
        &[
            "--tenant",
            "acme",
            "--scopes",
            "send,read",
            "--label",
            "acme backend",
        ],
    );
    let globex = create_key(
        server,
        &bootstrap,
        &["--tenant", "globex", "--scopes", "send,read,ack"],
    );
    let acme_admin = create_key(
        server,
        &bootstrap,
        &["--tenant", "acme", "--scopes", "admin"],
    );
    // A key for every tenant may only administer or read the status.
    let global_sender = cli(
        server,
        Some(&bootstrap),
        &["keys", "create", "--scopes", "send"],
    );
    assert_eq!(global_sender.status.code(), Some(64));
    assert!(
        text(&global_sender.stderr).contains("tenant"),
        "{}",
        text(&global_sender.stderr)
    );

    // A key sends for its tenant only.
    let sent = delivery
        .send_code(send_request("acme", "job-1", Some(&acme)))
        .await
        .expect("acme's key sends for acme")
        .into_inner();
    assert_eq!(sent.delivery_id, "acme/job-1");
    let status = delivery
        .send_code(send_request("globex", "job-2", Some(&acme)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("acme"), "{status:?}");

    // It reads its tenant's deliveries; another tenant's are "not found", exactly as ones
    // that do not exist.
    let report = delivery
        .get_delivery(get("acme/job-1", Some(&acme)))
        .await
        .expect("acme reads its delivery")
        .into_inner();
    assert_eq!(report.delivery_id, "acme/job-1");
    let hidden = delivery
        .get_delivery(get("acme/job-1", Some(&globex)))
        .await
        .unwrap_err();
    let missing = delivery
        .get_delivery(get("acme/job-404", Some(&globex)))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound);
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(
        hidden.message().replace("job-1", "X"),
        missing.message().replace("job-404", "X")
    );
    let watch = delivery
        .watch_delivery(with_key(
            v1::WatchDeliveryRequest {
                delivery_id: "acme/job-1".into(),
            },
            Some(&globex),
        ))
        .await
        .unwrap_err();
    assert_eq!(watch.code(), Code::NotFound);
    let shown = |key: &str| {
        with_key(
            v1::AcknowledgeDeliveryRequest {
                delivery_id: "acme/job-1".into(),
                device_id: "d".into(),
                acknowledgement: v1::Acknowledgement::Shown as i32,
                ack_token: String::new(),
            },
            Some(key),
        )
    };
    let ack = delivery
        .acknowledge_delivery(shown(&globex))
        .await
        .unwrap_err();
    assert_eq!(ack.code(), Code::NotFound, "{ack:?}");
    // Listing without naming a tenant lists the key's own; naming another is refused.
    let listed = delivery
        .list_deliveries(with_key(v1::ListDeliveriesRequest::default(), Some(&acme)))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.deliveries.iter().all(|d| d.tenant == "acme"));
    assert!(!listed.deliveries.is_empty());
    let other = delivery
        .list_deliveries(with_key(
            v1::ListDeliveriesRequest {
                tenant: "acme".into(),
                ..Default::default()
            },
            Some(&globex),
        ))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    // A diagnosis too: of the key's own tenant when none is named, never of another's.
    let diagnosis = delivery
        .diagnose_account(with_key(
            v1::DiagnoseAccountRequest {
                account: "user-1".into(),
                ..Default::default()
            },
            Some(&acme),
        ))
        .await
        .expect("a read key diagnoses its tenant's accounts")
        .into_inner();
    assert_eq!(diagnosis.tenant, "acme");
    assert!(diagnosis.deliveries_examined >= 1, "{diagnosis:?}");
    let other = delivery
        .diagnose_account(with_key(
            v1::DiagnoseAccountRequest {
                tenant: "acme".into(),
                account: "user-1".into(),
            },
            Some(&globex),
        ))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);

    // Scopes: no ack, no admin, no status with a send,read key.
    let no_ack = delivery
        .acknowledge_delivery(shown(&acme))
        .await
        .unwrap_err();
    assert_eq!(no_ack.code(), Code::PermissionDenied);
    assert!(no_ack.message().contains("`ack`"), "{no_ack:?}");
    let mut providers = ProvidersClient::new(channel.clone());
    let no_status = providers
        .list_providers(with_key(v1::ListProvidersRequest::default(), Some(&acme)))
        .await
        .unwrap_err();
    assert_eq!(no_status.code(), Code::PermissionDenied);
    providers
        .list_providers(with_key(
            v1::ListProvidersRequest::default(),
            Some(&bootstrap),
        ))
        .await
        .expect("the bootstrap key reads the status");
    let mut admin = PolicyAdminClient::new(channel.clone());
    let no_admin = admin
        .list_block_entries(with_key(
            v1::ListBlockEntriesRequest::default(),
            Some(&acme),
        ))
        .await
        .unwrap_err();
    assert_eq!(no_admin.code(), Code::PermissionDenied);

    // A tenant's admin key administers its tenant only.
    let block = |tenant: &str, number: &str, key: &str| {
        with_key(
            v1::AddBlockEntryRequest {
                tenant: tenant.into(),
                kind: v1::BlockKind::Number as i32,
                pattern: number.into(),
                ..Default::default()
            },
            Some(key),
        )
    };
    let global = admin
        .add_block_entry(block("", "+14155550199", &bootstrap))
        .await
        .expect("a global admin blocks for every tenant")
        .into_inner()
        .entry
        .unwrap();
    let theirs = admin
        .add_block_entry(block("globex", "+14155550198", &bootstrap))
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    admin
        .add_block_entry(block("acme", "+14155550197", &acme_admin))
        .await
        .expect("acme's admin blocks for acme");
    for tenant in ["globex", ""] {
        let status = admin
            .add_block_entry(block(tenant, "+14155550196", &acme_admin))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{tenant:?}");
    }
    for id in [global.id, theirs.id] {
        let status = admin
            .remove_block_entry(with_key(
                v1::RemoveBlockEntryRequest { id },
                Some(&acme_admin),
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "#{id}");
    }
    let listed = admin
        .list_block_entries(with_key(
            v1::ListBlockEntriesRequest::default(),
            Some(&acme_admin),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.entries.iter().all(|e| e.tenant != "globex"),
        "{listed:?}"
    );
    // It sees and makes keys of its tenant only.
    let other_key = cli(
        server,
        Some(&acme_admin),
        &["keys", "create", "--tenant", "globex", "--scopes", "send"],
    );
    assert!(!other_key.status.success());
    assert!(
        text(&other_key.stderr).contains("acts for tenant `acme` only"),
        "{}",
        text(&other_key.stderr)
    );
    let listed = cli(server, Some(&acme_admin), &["keys", "ls"]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let lines = text(&listed.stdout);
    assert_eq!(lines.lines().count(), 2, "acme's two keys: {lines}");
    assert!(
        lines.contains("acme backend") && !lines.contains("globex"),
        "{lines}"
    );

    // The list shows ids, never secrets; a revoked key opens nothing from then on.
    let listed = text(&cli(server, Some(&bootstrap), &["keys", "ls"]).stdout);
    let acme_id = acme.split('_').nth(1).unwrap();
    assert!(listed.contains(acme_id), "{listed}");
    for key in [&acme, &globex, &acme_admin] {
        let secret = secret_of(key);
        assert!(!listed.contains(secret), "{listed}");
    }
    let revoked = cli(server, Some(&bootstrap), &["keys", "revoke", acme_id]);
    assert!(revoked.status.success(), "{}", text(&revoked.stderr));
    let status = delivery
        .get_delivery(get("acme/job-1", Some(&acme)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(status.message(), refusals[0]);
    let listed = text(
        &cli(
            server,
            Some(&bootstrap),
            &["keys", "ls", "--tenant", "acme"],
        )
        .stdout,
    );
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(acme_id) && l.contains("REVOKED")),
        "{listed}"
    );
    let again = cli(server, Some(&bootstrap), &["keys", "revoke", acme_id]);
    assert_eq!(again.status.code(), Some(1));

    // The ledger holds no key in clear.
    drop(served);
    let ledger = std::fs::read(dir.path().join("ledger.db")).unwrap();
    let wal = std::fs::read(dir.path().join("ledger.db-wal")).unwrap_or_default();
    for key in [&acme, &globex, &acme_admin, &bootstrap] {
        let secret = secret_of(key).as_bytes();
        for bytes in [&ledger, &wal] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret),
                "a key's secret is in the ledger file"
            );
        }
    }
    broker.cleanup().await;
}

#[test]
fn no_keys_is_refused_unless_every_listener_is_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    for (grpc, receipts, ops, refused) in [
        ("0.0.0.0:0", "127.0.0.1:0", "127.0.0.1:0", "grpc.listen"),
        ("127.0.0.1:0", "0.0.0.0:0", "127.0.0.1:0", "receipts.listen"),
        ("127.0.0.1:0", "127.0.0.1:0", "0.0.0.0:0", "ops.listen"),
    ] {
        let stderr = refused_start(
            dir.path(),
            &[
                ("OTP_GATEWAY_AUTH__MODE", "none".as_ref()),
                ("OTP_GATEWAY_GRPC__LISTEN", grpc.as_ref()),
                ("OTP_GATEWAY_RECEIPTS__LISTEN", receipts.as_ref()),
                ("OTP_GATEWAY_OPS__LISTEN", ops.as_ref()),
            ],
        );
        assert!(stderr.contains("auth.mode"), "{stderr}");
        assert!(stderr.contains(refused), "{stderr}");
    }
    // A bootstrap key too short to be a secret is refused, naming the setting.
    let stderr = refused_start(
        dir.path(),
        &[("OTP_GATEWAY_AUTH__BOOTSTRAP_ADMIN_KEY", "admin".as_ref())],
    );
    assert!(stderr.contains("auth.bootstrap_admin_key"), "{stderr}");
    assert!(
        !stderr.contains("admin\""),
        "the key is not echoed: {stderr}"
    );
}
