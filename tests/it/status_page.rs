//! The status page in a real browser (headless Chromium, Debian's `chromium`): after the test
//! opens a provider's circuit, fails deliveries for an opted-out number and dead-letters a job,
//! the page's DOM shows the open circuit, the failing reason with its hint and count, the dead
//! letter, and the diagnosis of the test's account; a screenshot is taken.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::engine::provider_settings;
use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(20);

/// Headless Chromium on `url`: the DOM after load, and a screenshot at `png`. `None` without
/// Chromium (a failure under CI=true: `.ci/run` installs Debian's `chromium`).
fn chromium(url: &str, png: &Path, profile: &Path) -> Option<String> {
    let browser = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok());
    let Some(browser) = browser else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chromium is missing and CI=true: apt-get install chromium"
        );
        eprintln!("skipping: chromium is not installed");
        return None;
    };
    let run = |extra: &[&str]| {
        let output = Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--window-size=1280,1800",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "chromium {extra:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    run(&[&format!("--screenshot={}", png.display())]);
    Some(run(&["--dump-dom"]))
}

#[tokio::test]
async fn the_status_page_shows_an_open_circuit_failing_reasons_and_an_account_s_diagnosis() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("status-page");
    let mut broker = Broker::connect(&names).await;
    // "carrier" answers nothing (nothing listens on port 9): two failures open its circuit
    // for ten minutes; the sandbox takes over.
    let carrier = json!({
        "kind": "http", "url": "http://127.0.0.1:9/send",
        "body": r#"{"to": "{{to}}", "text": "{{text}}"}"#, "message_id_field": "/id",
        "retry": {"max_attempts": 1},
        "breaker": {"consecutive_failures": 2, "cool_down": "10m"}
    });
    let config = config(
        &names,
        dir.path(),
        &[
            (
                "providers",
                json!({
                    "carrier": carrier,
                    "sandbox": provider_settings(dir.path(), "sandbox", json!({"max_attempts": 1}), json!({})),
                }),
            ),
            (
                "routes",
                json!({"push": ["sandbox"], "sms": ["carrier", "sandbox"], "voice": ["sandbox"]}),
            ),
        ],
    );
    let gateway = Gateway::start(config).await;

    let mut publish = async |id: &str, number: &str| {
        let mut job = job(id, "135790");
        job["targets"] = json!([{"phone": {"number": number}}]);
        broker.publish_json(&job).await;
        broker.next_event(WAIT).await.1
    };
    for id in ["fine-0", "fine-1"] {
        assert_eq!(publish(id, "+14155550101").await["status"], "SENT");
    }
    for n in 0..3 {
        let report = publish(&format!("stop-{n}"), "+15005550004").await;
        assert_eq!(report["reason"], "RECIPIENT_OPTED_OUT", "{report}");
    }
    let mut bad = job("no-tenant", "111222");
    bad.as_object_mut().unwrap().remove("tenant");
    broker.publish_json(&bad).await;
    broker.next_message(&names.dead_letter_queue, WAIT).await;

    let url = format!("http://{}/?tenant=acme&account=user-42", gateway.ops_addr);
    let png = dir.path().join("status.png");
    let (png_at, profile) = (png.clone(), dir.path().join("chromium-profile"));
    let dom = tokio::task::spawn_blocking(move || chromium(&url, &png_at, &profile))
        .await
        .unwrap();
    let Some(dom) = dom else {
        gateway.stop().await;
        broker.cleanup().await;
        return;
    };
    let shot = std::fs::read(&png).expect("a screenshot");
    assert!(
        shot.starts_with(b"\x89PNG") && shot.len() > 10_000,
        "{} bytes",
        shot.len()
    );

    assert!(
        dom.contains(r#"data-provider="carrier" data-circuit="OPEN""#),
        "the open circuit: {dom}"
    );
    assert!(dom.contains(r#"data-provider="sandbox" data-circuit="CLOSED""#));
    let reason_row = dom
        .split("<tr")
        .find(|row| row.contains(r#"data-reason="RECIPIENT_OPTED_OUT""#))
        .expect("the failing reason's row");
    assert!(
        reason_row.contains(r#"<td class="count">3</td>"#)
            && reason_row.contains("ask them to reply START"),
        "{reason_row}"
    );
    assert!(
        dom.contains(r#"<tr data-field="tenant">"#),
        "the dead letter: {dom}"
    );
    let diagnosis = &dom[dom.find(r#"id="diagnosis""#).expect("the diagnosis")..];
    assert!(
        diagnosis.contains(r#"data-reason="RECIPIENT_OPTED_OUT""#)
            && diagnosis.contains("+1500•••0004 opted out on"),
        "{diagnosis}"
    );
    assert!(diagnosis.contains(r#"data-target="+1415•••0101""#));
    assert!(!dom.contains("5005550004") && !dom.contains("135790"));

    gateway.stop().await;
    broker.cleanup().await;
}
