//! Account diagnosis through the real queue, the gRPC API and the CLI: an account whose number
//! opted out (Twilio 21610 in the sandbox) and whose device's app was removed (APNs 410) gets
//! both named with their fixes, most pressing first; a healthy account gets none.

use std::time::Duration;

use otp_gateway::proto::v1;
use otp_gateway::proto::v1::code_delivery_client::CodeDeliveryClient;
use serde_json::json;
use tonic::Code;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn an_account_s_opt_out_and_dead_device_are_diagnosed_with_their_fixes() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("diagnose");
    let mut broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(&names, dir.path(), &[])).await;

    for n in 0..2 {
        let mut job = job(&format!("diag-{n}"), "135790");
        job["channels"] = json!(["push", "sms"]);
        job["targets"] = json!([
            {"device": {"id": "ipad-1", "platform": "apns", "token": "unregistered-a1b2c3d4e5f6"}},
            {"phone": {"number": "+15005550004"}}
        ]);
        broker.publish_json(&job).await;
        let (_, report) = broker.next_event(WAIT).await;
        assert_eq!(report["status"], "FAILED", "{report}");
    }
    let mut fine = job("diag-fine", "246801");
    fine["account"] = json!("user-7");
    broker.publish_json(&fine).await;
    broker.next_event(WAIT).await;

    let mut client = CodeDeliveryClient::connect(format!("http://{}", gateway.grpc_addr))
        .await
        .unwrap();
    let diagnosis = client
        .diagnose_account(v1::DiagnoseAccountRequest {
            tenant: "acme".into(),
            account: "user-42".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(diagnosis.deliveries_examined, 2);
    assert_eq!(diagnosis.last_delivery_id, "acme/diag-1");
    let today = jiff::Timestamp::now().strftime("%-d %b %Y").to_string();
    let fixes: Vec<&str> = diagnosis.fixes.iter().map(|f| f.text.as_str()).collect();
    assert_eq!(
        fixes,
        [
            format!("ipad-1 stopped accepting pushes on {today}: remove it from trusted devices"),
            format!(
                "+1500•••0004 opted out on {today} (replied STOP): ask the user to text START \
                 to the sender, or add another number"
            ),
        ],
        "{diagnosis:#?}"
    );
    let number = diagnosis
        .targets
        .iter()
        .find(|t| t.target == "+1500•••0004")
        .expect("the number is diagnosed");
    assert_eq!(number.failures_in_a_row, 2);
    assert_eq!(
        number.last_reason,
        v1::FailureReason::RecipientOptedOut as i32
    );
    assert!(number.last_success_at.is_none());
    assert_eq!(number.blocks.len(), 1, "{number:?}");
    assert_eq!(number.blocks[0].source, v1::BlockSource::OptOut as i32);
    assert_eq!(number.blocks[0].pattern, "+1500•••0004");
    let provider_said = number
        .failures
        .iter()
        .find(|f| f.provider_code == "21610")
        .expect("the carrier's own code is kept");
    assert_eq!(provider_said.provider, "sandbox");
    let device = diagnosis
        .targets
        .iter()
        .find(|t| t.target == "ipad-1")
        .unwrap();
    assert_eq!(device.platform, v1::Platform::Apns as i32);
    assert!(!device.hint.is_empty());

    // A healthy account needs nothing; an account is required.
    let healthy = client
        .diagnose_account(v1::DiagnoseAccountRequest {
            tenant: "acme".into(),
            account: "user-7".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(healthy.fixes.is_empty(), "{healthy:?}");
    assert_eq!(healthy.deliveries_examined, 1);
    let status = client
        .diagnose_account(v1::DiagnoseAccountRequest {
            tenant: "acme".into(),
            account: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("account"), "{status:?}");

    // The CLI prints the fixes first, then each number and device (run off the test's one
    // thread, which the gateway serves on).
    let server = gateway.grpc_addr.to_string();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_otp-gateway"))
            .args(["diagnose", "--tenant", "acme", "--account", "user-42"])
            .args(["--server", &server])
            .env_remove("OTP_GATEWAY_KEY")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        printed.starts_with("acme / user-42: 2 deliveries since"),
        "{printed}"
    );
    assert!(
        printed.contains("What to do:\n  1. ipad-1 stopped accepting pushes on")
            && printed.contains("  2. +1500•••0004 opted out on"),
        "{printed}"
    );
    assert!(
        printed.contains("+1500•••0004: last FAILED RECIPIENT_OPTED_OUT")
            && printed.contains("2 failed in a row")
            && printed.contains("(sandbox 21610)")
            && printed.contains("blocked by entry #"),
        "{printed}"
    );
    assert!(
        !printed.contains("5005550004"),
        "no clear number: {printed}"
    );

    gateway.stop().await;
    broker.cleanup().await;
}
