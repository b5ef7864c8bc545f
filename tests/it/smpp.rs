//! SMPP 3.4 binds against an in-process SMSC that speaks the protocol on a real TCP socket
//! (framing and PDUs from `rusmpp`'s codec): binds with a password, enquire_link, submit_sm
//! answered by destination (throttled once, invalid destination, accepted) and deliver_sm
//! receipts some time later. The SMSC can be stopped and started again on the same port.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use otp_gateway::domain::{AttemptOutcome, DeliveryStatus, FailureReason, TargetStatus};
use rusmpp::pdus::{BindTransceiverResp, DeliverSm, SubmitSmResp};
use rusmpp::tlvs::{MessageDeliveryRequestTlvValue, TlvValue};
use rusmpp::types::{COctetString, OctetString};
use rusmpp::values::{EsmClass, MessageState};
use rusmpp::{Command, CommandStatus, Pdu};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::engine::{deliver, engine, engine_config, in_secs};

/// What the SMSC saw of one submit_sm.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub destination: String,
    pub dest_ton: u8,
    pub dest_npi: u8,
    pub source: String,
    pub data_coding: u8,
    pub registered_delivery: u8,
    pub validity_period: String,
    /// short_message, or the message_payload TLV when short_message is empty.
    pub text: Vec<u8>,
    pub in_payload: bool,
}

#[derive(Default)]
pub struct SmscState {
    pub binds: Mutex<Vec<(String, bool)>>,
    pub submits: Mutex<Vec<Submitted>>,
    pub enquire_links: Mutex<u32>,
    throttled: Mutex<HashMap<String, bool>>,
    next_id: Mutex<u32>,
    /// submit_sm received and not answered yet, and the most there ever were.
    outstanding: Mutex<(u32, u32)>,
    /// When each submit_sm arrived.
    pub arrivals: Mutex<Vec<std::time::Instant>>,
}

impl SmscState {
    pub fn max_outstanding(&self) -> u32 {
        self.outstanding.lock().unwrap().1
    }

    /// Numbers message ids from the start again, as an SMSC does after a restart.
    pub fn renumber(&self) {
        *self.next_id.lock().unwrap() = 0;
    }
}

/// A running SMSC; dropping it (or `stop`) closes the port and every session.
pub struct Smsc {
    pub port: u16,
    pub state: Arc<SmscState>,
    stop: CancellationToken,
}

impl Drop for Smsc {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Smsc {
    pub async fn start() -> Smsc {
        Self::start_on(0, Arc::new(SmscState::default())).await
    }

    /// Starts on `port` (0: any), keeping `state` (restarts keep the record).
    pub async fn start_on(port: u16, state: Arc<SmscState>) -> Smsc {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = CancellationToken::new();
        let (state2, stop2) = (Arc::clone(&state), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop2.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else { return };
                tokio::spawn(session(stream, Arc::clone(&state2), stop2.clone()));
            }
        });
        Smsc { port, state, stop }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn submits(&self) -> Vec<Submitted> {
        self.state.submits.lock().unwrap().clone()
    }
}

fn submitted(submit: &rusmpp::pdus::SubmitSm) -> Submitted {
    let payload = submit.tlvs().iter().find_map(|tlv| match tlv.value() {
        Some(TlvValue::MessagePayload(p)) => Some(p.value.as_ref().to_vec()),
        _ => None,
    });
    let short = submit.short_message().as_ref().to_vec();
    Submitted {
        destination: submit.destination_addr.as_str().to_owned(),
        dest_ton: u8::from(submit.dest_addr_ton),
        dest_npi: u8::from(submit.dest_addr_npi),
        source: submit.source_addr.as_str().to_owned(),
        data_coding: u8::from(submit.data_coding),
        registered_delivery: u8::from(submit.registered_delivery),
        validity_period: String::from_utf8_lossy(submit.validity_period.as_ref())
            .trim_end_matches('\0')
            .to_owned(),
        in_payload: short.is_empty() && payload.is_some(),
        text: if short.is_empty() {
            payload.unwrap_or_default()
        } else {
            short
        },
    }
}

/// The receipt the SMSC sends for a message to `destination`: undeliverable for numbers ending
/// in 0666 (text form with an error code), delivered otherwise (TLV form for numbers ending in
/// an odd digit, text form for the rest).
fn receipt_for(message_id: &str, destination: &str) -> DeliverSm {
    let undeliverable = destination.ends_with("0666");
    let stat = if undeliverable { "UNDELIV" } else { "DELIVRD" };
    let err = if undeliverable { "001" } else { "000" };
    let text = format!(
        "id:{message_id} sub:001 dlvrd:00{} submit date:2611211000 done date:2611211000 stat:{stat} err:{err} text:",
        u8::from(!undeliverable)
    );
    let odd = destination
        .chars()
        .last()
        .and_then(|c| c.to_digit(10))
        .is_some_and(|d| d % 2 == 1);
    let tlvs = if odd && !undeliverable {
        vec![
            MessageDeliveryRequestTlvValue::ReceiptedMessageId(
                COctetString::from_str(message_id).unwrap(),
            ),
            MessageDeliveryRequestTlvValue::MessageState(MessageState::Delivered),
        ]
    } else {
        vec![]
    };
    DeliverSm::builder()
        .source_addr(COctetString::from_str(destination).unwrap())
        .destination_addr(COctetString::from_str("OTP").unwrap())
        .esm_class(EsmClass::from(0x04))
        .short_message(OctetString::from_slice(text.as_bytes()).unwrap())
        .tlvs(tlvs)
        .build()
}

async fn session(stream: tokio::net::TcpStream, state: Arc<SmscState>, stop: CancellationToken) {
    let mut framed = Framed::new(stream, rusmpp::tokio_codec::CommandCodec::new());
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Command>();
    let mut sequence = 10_000u32;
    loop {
        let command = tokio::select! {
            _ = stop.cancelled() => return,
            out = out_rx.recv() => {
                let Some(out) = out else { return };
                if framed.send(&out).await.is_err() { return }
                continue;
            }
            incoming = framed.next() => match incoming {
                Some(Ok(command)) => command,
                _ => return,
            },
        };
        let seq = command.sequence_number();
        let reply = match command.pdu() {
            Some(Pdu::BindTransceiver(bind)) => {
                let ok = bind.system_id.as_str() == "otp" && bind.password.as_str() == "secret";
                state
                    .binds
                    .lock()
                    .unwrap()
                    .push((bind.system_id.as_str().to_owned(), ok));
                let status = if ok {
                    CommandStatus::EsmeRok
                } else {
                    CommandStatus::EsmeRinvpaswd
                };
                let response = BindTransceiverResp::builder()
                    .system_id(COctetString::from_str("SMSC").unwrap())
                    .build();
                Command::new(status, seq, response)
            }
            Some(Pdu::EnquireLink) => {
                *state.enquire_links.lock().unwrap() += 1;
                Command::new(CommandStatus::EsmeRok, seq, Pdu::EnquireLinkResp)
            }
            Some(Pdu::Unbind) => {
                let _ = framed
                    .send(&Command::new(CommandStatus::EsmeRok, seq, Pdu::UnbindResp))
                    .await;
                return;
            }
            Some(Pdu::SubmitSm(submit)) => {
                state
                    .arrivals
                    .lock()
                    .unwrap()
                    .push(std::time::Instant::now());
                {
                    let mut outstanding = state.outstanding.lock().unwrap();
                    outstanding.0 += 1;
                    outstanding.1 = outstanding.1.max(outstanding.0);
                }
                let record = submitted(submit);
                let destination = record.destination.clone();
                state.submits.lock().unwrap().push(record);
                let first_time = !state
                    .throttled
                    .lock()
                    .unwrap()
                    .insert(destination.clone(), true)
                    .unwrap_or(false);
                if destination.ends_with("0058") && first_time {
                    Command::new(
                        CommandStatus::EsmeRthrottled,
                        seq,
                        SubmitSmResp::builder().build(),
                    )
                } else if destination.ends_with("0011") {
                    Command::new(
                        CommandStatus::EsmeRinvdstadr,
                        seq,
                        SubmitSmResp::builder().build(),
                    )
                } else {
                    let id = {
                        let mut next = state.next_id.lock().unwrap();
                        *next += 1;
                        format!("{:X}", 0xA000 + *next)
                    };
                    sequence += 1;
                    let receipt = Command::new(
                        CommandStatus::EsmeRok,
                        sequence,
                        receipt_for(&id, &destination),
                    );
                    let out = out_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let _ = out.send(receipt);
                    });
                    let response = Command::new(
                        CommandStatus::EsmeRok,
                        seq,
                        SubmitSmResp::builder()
                            .message_id(COctetString::from_str(&id).unwrap())
                            .build(),
                    );
                    // Numbers ending in 0777 are answered slowly (by a task: the session goes on).
                    if destination.ends_with("0777") {
                        let (out, state) = (out_tx.clone(), Arc::clone(&state));
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            state.outstanding.lock().unwrap().0 -= 1;
                            let _ = out.send(response);
                        });
                        continue;
                    }
                    response
                }
            }
            _ => continue,
        };
        if matches!(reply.pdu(), Some(Pdu::SubmitSmResp(_))) {
            state.outstanding.lock().unwrap().0 -= 1;
        }
        if framed.send(&reply).await.is_err() {
            return;
        }
    }
}

fn smpp_provider(address: &str, password: &str) -> Value {
    json!({
        "kind": "smpp", "address": address, "system_id": "otp", "password": password,
        "source_addr": "OTP", "window": 2, "throughput": 200.0,
        "enquire_link_interval": "200ms", "response_timeout": "2s",
        "reconnect_initial": "50ms", "reconnect_max": "200ms",
        "retry": {"initial_interval": "10ms", "max_attempts": 2},
    })
}

fn smpp_config(
    dir: &std::path::Path,
    address: &str,
    password: &str,
) -> otp_gateway::config::Config {
    engine_config(
        dir,
        json!({"sandbox": {"kind": "sandbox", "outbox": dir.join("outbox.jsonl")}, "smpp": smpp_provider(address, password)}),
        &[
            (
                "routes",
                json!({"push": ["sandbox"], "sms": ["smpp"], "voice": ["sandbox"]}),
            ),
            ("delivery.receipt_wait", json!("5s")),
        ],
    )
}

fn sms_job(id: &str, locale: &str, numbers: &[&str]) -> otp_gateway::domain::Job {
    let targets: Vec<Value> = numbers
        .iter()
        .map(|n| json!({"phone": {"number": n}}))
        .collect();
    let body = json!({
        "job_id": id, "tenant": "acme", "account": "user-42", "code": "482913",
        "expires_at": in_secs(300.0), "locale": locale, "channels": ["sms"], "targets": targets,
    });
    otp_gateway::domain::Job::from_json(body.to_string().as_bytes()).unwrap()
}

/// UCS-2 (UTF-16BE) octets as text.
fn from_ucs2(octets: &[u8]) -> String {
    let units: Vec<u16> = octets
        .chunks(2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .collect();
    String::from_utf16(&units).unwrap()
}

#[tokio::test]
async fn submits_carry_the_text_validity_and_receipt_request_and_receipts_settle_them() {
    let dir = tempfile::tempdir().unwrap();
    let smsc = Smsc::start().await;
    let mut config = smpp_config(dir.path(), &smsc.address(), "secret");
    config.templates = serde_json::from_value(json!({"long": {"ja": {
        "sms": format!("{}{{{{code}}}}", "このメッセージは長いです。".repeat(12))
    }}}))
    .unwrap();
    let service = engine(&config, vec![]).await;

    // GSM-7 text, a text-form receipt.
    let report = deliver(&service, &sms_job("gsm", "en", &["+14155550100"])).await;
    assert_eq!(report.status, DeliveryStatus::Delivered, "{report:#?}");
    let attempt = &report.targets[0].attempts[0];
    assert_eq!(attempt.outcome, AttemptOutcome::Delivered);
    assert_eq!(attempt.provider_message_id.as_deref(), Some("A001"));
    assert!(
        attempt
            .provider_message
            .as_deref()
            .unwrap()
            .contains("stat DELIVRD"),
        "{attempt:?}"
    );
    let submit = &smsc.submits()[0];
    assert_eq!(
        (
            submit.destination.as_str(),
            submit.dest_ton,
            submit.dest_npi
        ),
        ("14155550100", 1, 1)
    );
    assert_eq!(submit.source, "OTP");
    assert_eq!((submit.data_coding, submit.registered_delivery), (0, 1));
    let validity = &submit.validity_period;
    assert!(
        validity.starts_with("0000000004") && validity.ends_with("000R"),
        "relative validity of the code's remaining ~5 minutes: {validity}"
    );
    let expected =
        "482913 is your Example sign-in code. It expires in 5 min. Don't share it with anyone.";
    assert_eq!(
        submit.text,
        otp_gateway::domain::gsm7_septets(expected).unwrap()
    );
    assert_eq!(
        smsc.state.binds.lock().unwrap()[0],
        ("otp".to_owned(), true)
    );

    // UCS-2 text, a TLV-form receipt.
    let report = deliver(&service, &sms_job("ucs2", "ja", &["+14155550101"])).await;
    assert_eq!(report.status, DeliveryStatus::Delivered);
    let submit = &smsc.submits()[1];
    assert_eq!(submit.data_coding, 8);
    assert!(from_ucs2(&submit.text).starts_with("Exampleのログインコードは482913です。"));
    assert!(!submit.in_payload);

    // Beyond 254 octets the text travels in message_payload.
    let mut job = sms_job("long", "ja", &["+14155550102"]);
    job.purpose = "long".into();
    let report = deliver(&service, &job).await;
    assert_eq!(report.status, DeliveryStatus::Delivered);
    let submit = &smsc.submits()[2];
    assert!(submit.in_payload && submit.text.len() > 254, "{submit:?}");
    assert!(from_ucs2(&submit.text).ends_with("482913"));
    let sms = report.targets[0].attempts[0].sms.unwrap();
    assert_eq!((sms.encoding.as_str(), sms.segments), ("UCS_2", 3));
    assert!(
        *smsc.state.enquire_links.lock().unwrap() >= 1,
        "the bind is kept alive"
    );
}

#[tokio::test]
async fn command_statuses_and_refused_binds_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let smsc = Smsc::start().await;
    let service = engine(&smpp_config(dir.path(), &smsc.address(), "secret"), vec![]).await;

    let report = deliver(&service, &sms_job("throttled", "en", &["+14155550058"])).await;
    assert_eq!(report.status, DeliveryStatus::Delivered);
    let attempts = &report.targets[0].attempts;
    assert_eq!(attempts[0].reason, Some(FailureReason::ProviderThrottled));
    assert_eq!(attempts[0].provider_code.as_deref(), Some("0x00000058"));
    assert_eq!(attempts[1].outcome, AttemptOutcome::Delivered);

    let report = deliver(&service, &sms_job("bad", "en", &["+14155550011"])).await;
    assert_eq!(report.status, DeliveryStatus::Failed);
    assert_eq!(report.reason, Some(FailureReason::InvalidRecipient));
    let attempt = &report.targets[0].attempts[0];
    assert_eq!(attempt.provider_code.as_deref(), Some("0x0000000B"));
    assert!(
        attempt
            .provider_message
            .as_deref()
            .unwrap()
            .contains("ESME_RINVDSTADR")
    );
    assert_eq!(
        report.targets[0].attempts.len(),
        1,
        "a bad number is not retried"
    );

    // A wrong password: the bind is refused and sends say why.
    let dir = tempfile::tempdir().unwrap();
    let service = engine(&smpp_config(dir.path(), &smsc.address(), "wrong"), vec![]).await;
    let report = deliver(&service, &sms_job("refused", "en", &["+14155550100"])).await;
    assert_eq!(report.status, DeliveryStatus::Failed);
    let attempt = &report.targets[0].attempts[0];
    assert_eq!(attempt.reason, Some(FailureReason::ProviderMisconfigured));
    let message = attempt.provider_message.as_deref().unwrap();
    assert!(
        message.contains("bind_transceiver refused") && message.contains("ESME_RINVPASWD"),
        "{message}"
    );
    assert!(smsc.state.binds.lock().unwrap().iter().any(|(_, ok)| !ok));
}

#[tokio::test]
async fn a_failure_receipt_moves_the_chain_on_to_the_next_number() {
    let dir = tempfile::tempdir().unwrap();
    let smsc = Smsc::start().await;
    let service = engine(&smpp_config(dir.path(), &smsc.address(), "secret"), vec![]).await;
    let job = sms_job("chain", "en", &["+14155550666", "+14155550100"]);
    let report = deliver(&service, &job).await;
    assert_eq!(report.status, DeliveryStatus::Delivered, "{report:#?}");
    let first = &report.targets[0];
    assert_eq!(first.status, TargetStatus::Failed);
    assert_eq!(first.reason, Some(FailureReason::Undeliverable));
    assert_eq!(first.attempts[0].provider_code.as_deref(), Some("001"));
    assert_eq!(report.targets[1].status, TargetStatus::Delivered);
    let destinations: Vec<String> = smsc.submits().into_iter().map(|s| s.destination).collect();
    assert_eq!(destinations, ["14155550666", "14155550100"]);
}

#[tokio::test]
async fn the_bind_survives_the_smsc_restarting() {
    let dir = tempfile::tempdir().unwrap();
    let smsc = Smsc::start().await;
    let (port, state) = (smsc.port, Arc::clone(&smsc.state));
    let service = engine(&smpp_config(dir.path(), &smsc.address(), "secret"), vec![]).await;
    let report = deliver(&service, &sms_job("before", "en", &["+14155550100"])).await;
    assert_eq!(report.status, DeliveryStatus::Delivered);

    drop(smsc);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _smsc = Smsc::start_on(port, Arc::clone(&state)).await;
    let report = deliver(&service, &sms_job("after", "en", &["+14155550102"])).await;
    assert_eq!(report.status, DeliveryStatus::Delivered, "{report:#?}");
    let binds = state.binds.lock().unwrap().len();
    assert!(binds >= 2, "bound again after the restart ({binds} binds)");
}

#[tokio::test]
async fn a_job_routed_to_a_failing_twilio_falls_over_to_smpp_and_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let smsc = Smsc::start().await;
    let (url, twilio) = crate::twilio::fake_twilio().await;
    let config = engine_config(
        dir.path(),
        json!({
            "twilio": {"kind": "twilio", "base_url": url, "account_sid": "ACtest", "auth_token": "secret",
                       "from": "+15005550006", "retry": {"initial_interval": "10ms", "max_attempts": 2}},
            "smpp": smpp_provider(&smsc.address(), "secret"),
        }),
        &[
            (
                "routes",
                json!({"push": ["twilio"], "sms": ["twilio", "smpp"], "voice": ["twilio"]}),
            ),
            ("delivery.receipt_wait", json!("5s")),
        ],
    );
    let service = engine(&config, vec![]).await;
    // Twilio answers 503 for this number.
    let report = deliver(&service, &sms_job("failover", "en", &["+15005550503"])).await;
    assert_eq!(report.status, DeliveryStatus::Delivered, "{report:#?}");
    let providers: Vec<&str> = report.targets[0]
        .attempts
        .iter()
        .map(|a| a.provider.as_str())
        .collect();
    assert_eq!(providers, ["twilio", "twilio", "smpp"]);
    assert_eq!(
        report.targets[0].attempts[0].reason,
        Some(FailureReason::ProviderUnavailable)
    );
    assert_eq!(twilio.calls().len(), 2);
    assert_eq!(smsc.submits()[0].destination, "15005550503");
}

/// Six SMS jobs to `number` delivered at once; each ends DELIVERED.
async fn six_delivered(
    service: &otp_gateway::delivery::DeliveryService,
    prefix: &str,
    number: &str,
) {
    let jobs: Vec<_> = (0..6)
        .map(|i| sms_job(&format!("{prefix}-{i}"), "en", &[number]))
        .collect();
    let reports =
        futures_util::future::join_all(jobs.iter().map(|job| deliver(service, job))).await;
    for report in reports {
        assert_eq!(report.status, DeliveryStatus::Delivered, "{report:#?}");
    }
}

#[tokio::test]
async fn the_window_and_the_throughput_limit_hold_per_bind() {
    let dir = tempfile::tempdir().unwrap();
    let smsc = Smsc::start().await;
    let service = engine(&smpp_config(dir.path(), &smsc.address(), "secret"), vec![]).await;
    // Six jobs at once to a slowly answering number: never more than the window (2) unanswered.
    six_delivered(&service, "slow", "+14155550777").await;
    assert_eq!(smsc.submits().len(), 6);
    assert_eq!(smsc.state.max_outstanding(), 2, "window of 2");

    // 10 submits per second: six submits take at least half a second.
    let dir = tempfile::tempdir().unwrap();
    let smsc = Smsc::start().await;
    let mut config = smpp_config(dir.path(), &smsc.address(), "secret");
    let Some(otp_gateway::config::KindSettings::Smpp(smpp)) = config
        .providers
        .get_mut("smpp")
        .map(|provider| &mut provider.kind)
    else {
        panic!("an SMPP provider");
    };
    smpp.throughput = 10.0;
    smpp.window = 10;
    let service = engine(&config, vec![]).await;
    let handed_over = std::time::Instant::now();
    six_delivered(&service, "paced", "+14155550100").await;
    let arrivals = smsc.state.arrivals.lock().unwrap().clone();
    // Measured from when the jobs were handed over (not from the first arrival, which the
    // network may hold back a little while the later ones keep their pace).
    let spread = *arrivals.last().unwrap() - handed_over;
    assert!(
        spread >= Duration::from_millis(450),
        "six submits at 10/s spread over {spread:?}"
    );
}

#[test]
fn smpp_settings_are_validated_naming_the_key() {
    use otp_gateway::config::{Config, KindSettings, SecretString, SmppSettings};
    let dir = tempfile::tempdir().unwrap();
    let config = smpp_config(dir.path(), "127.0.0.1:2775", "secret");
    assert!(
        !format!("{config:?}").contains("secret"),
        "the password is redacted"
    );
    let refused = |change: &dyn Fn(&mut Config)| {
        let mut config = config.clone();
        change(&mut config);
        config.validate().unwrap_err().to_string()
    };
    let bind = |change: fn(&mut SmppSettings)| {
        refused(
            &move |c: &mut Config| match c.providers.get_mut("smpp").map(|p| &mut p.kind) {
                Some(KindSettings::Smpp(smpp)) => change(smpp),
                _ => panic!("an SMPP provider"),
            },
        )
    };
    let error = refused(&|c| c.routes.voice = vec!["smpp".into()]);
    assert!(
        error.contains("routes.voice") && error.contains("SMS only"),
        "{error}"
    );
    let error = bind(|s| s.address = "no-port".into());
    assert!(error.contains("providers.smpp.address"), "{error}");
    let error = bind(|s| s.password = SecretString::new("much-too-long"));
    assert!(
        error.contains("providers.smpp.password") && error.contains('8'),
        "{error}"
    );
    let error = bind(|s| s.window = 0);
    assert!(error.contains("providers.smpp.window"), "{error}");
    let error = bind(|s| s.throughput = 0.0);
    assert!(error.contains("providers.smpp.throughput"), "{error}");
}

#[tokio::test]
async fn through_the_queue_an_smpp_receipt_makes_the_delivery_delivered() {
    use crate::helpers::{Broker, Gateway, Names, broker_available, config};
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let smsc = Smsc::start().await;
    let names = Names::new("smpp");
    let mut broker = Broker::connect(&names).await;
    let overrides = [
        ("providers.smpp", smpp_provider(&smsc.address(), "secret")),
        (
            "routes",
            json!({"push": ["sandbox"], "sms": ["smpp"], "voice": ["sandbox"]}),
        ),
        ("delivery.receipt_wait", json!("5s")),
    ];
    let gateway = Gateway::start(config(&names, dir.path(), &overrides)).await;
    let mut job = crate::helpers::job("smpp-1", "482913");
    job["targets"] = json!([{"phone": {"number": "+14155550100"}}]);
    broker.publish_json(&job).await;
    let (routing_key, report) = broker.next_event(Duration::from_secs(20)).await;
    assert_eq!(routing_key, "delivery.delivered", "{report}");
    let attempt = &report["targets"][0]["attempts"][0];
    assert_eq!(attempt["provider"], "smpp");
    assert_eq!(attempt["sms"]["encoding"], "GSM_7");
    assert_eq!(attempt["sms"]["segments"], 1);
    assert_eq!(smsc.submits().len(), 1);
    gateway.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn two_binds_are_two_named_providers_in_one_route() {
    let dir = tempfile::tempdir().unwrap();
    let smsc = Smsc::start().await;
    let config = engine_config(
        dir.path(),
        json!({
            "carrier-a": smpp_provider(&smsc.address(), "stale"),
            "carrier-b": smpp_provider(&smsc.address(), "secret"),
        }),
        &[
            (
                "routes",
                json!({"push": ["sandbox"], "sms": ["carrier-a", "carrier-b"], "voice": ["sandbox"]}),
            ),
            ("delivery.receipt_wait", json!("5s")),
        ],
    );
    let service = engine(&config, vec![]).await;
    let report = deliver(&service, &sms_job("two-binds", "en", &["+14155550100"])).await;
    assert_eq!(report.status, DeliveryStatus::Delivered, "{report:#?}");
    let attempts = &report.targets[0].attempts;
    assert_eq!(attempts[0].provider, "carrier-a");
    assert_eq!(
        attempts[0].reason,
        Some(FailureReason::ProviderMisconfigured)
    );
    assert_eq!(attempts[1].provider, "carrier-b");
    assert_eq!(attempts[1].outcome, AttemptOutcome::Delivered);
}

#[tokio::test]
async fn a_receipt_settles_only_the_newest_attempt_still_waiting_for_its_reused_message_id() {
    let dir = tempfile::tempdir().unwrap();
    let smsc = Smsc::start().await;
    let (port, state) = (smsc.port, Arc::clone(&smsc.state));
    let service = engine(&smpp_config(dir.path(), &smsc.address(), "secret"), vec![]).await;
    let first = deliver(&service, &sms_job("reuse-a", "en", &["+14155550100"])).await;
    assert_eq!(first.status, DeliveryStatus::Delivered);
    assert_eq!(
        first.targets[0].attempts[0].provider_message_id.as_deref(),
        Some("A001")
    );

    // The SMSC restarts and numbers its messages from the start: job B's first number gets
    // A001 again, and an UNDELIV receipt for it.
    drop(smsc);
    tokio::time::sleep(Duration::from_millis(300)).await;
    state.renumber();
    let _smsc = Smsc::start_on(port, Arc::clone(&state)).await;
    crate::helpers::eventually(Duration::from_secs(5), "bound again", || {
        state.binds.lock().unwrap().len() >= 2
    })
    .await;
    let second = deliver(
        &service,
        &sms_job("reuse-b", "en", &["+14155550666", "+14155550100"]),
    )
    .await;
    assert_eq!(second.status, DeliveryStatus::Delivered, "{second:#?}");
    assert_eq!(
        second.targets[0].attempts[0].provider_message_id.as_deref(),
        Some("A001")
    );
    assert_eq!(second.targets[0].status, TargetStatus::Failed);
    assert_eq!(second.targets[0].reason, Some(FailureReason::Undeliverable));
    assert_eq!(second.targets[1].status, TargetStatus::Delivered);

    // Job A's report is as it was: its attempt was final and is not rewritten.
    let first_now = service
        .ledger()
        .get(&sms_job("reuse-a", "en", &[]).delivery_id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first_now.status, DeliveryStatus::Delivered);
    assert_eq!(first_now.targets[0].status, TargetStatus::Delivered);
    assert_eq!(
        first_now.targets[0].attempts[0].outcome,
        AttemptOutcome::Delivered
    );
}

#[tokio::test]
async fn a_burst_of_two_thousand_sms_through_one_wide_bind_all_arrive_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let smsc = Smsc::start().await;
    let mut config = smpp_config(dir.path(), &smsc.address(), "secret");
    let Some(otp_gateway::config::KindSettings::Smpp(smpp)) = config
        .providers
        .get_mut("smpp")
        .map(|provider| &mut provider.kind)
    else {
        panic!("an SMPP provider");
    };
    // Window 256, no throughput cap to speak of, and enquire_link at its default (30 s): a
    // submit must never wait for the SMSC to speak first.
    smpp.window = 256;
    smpp.throughput = 1_000_000.0;
    smpp.enquire_link_interval = Duration::from_secs(30);
    smpp.response_timeout = Duration::from_secs(5);
    let service = engine(&config, vec![]).await;
    let started = std::time::Instant::now();
    let jobs: Vec<_> = (0..2_000)
        .map(|i| sms_job(&format!("burst-{i}"), "en", &["+14155550100"]))
        .collect();
    let reports = futures_util::future::join_all(jobs.iter().map(|job| {
        let service = Arc::clone(&service);
        async move {
            match service.handle(job, false).await.unwrap() {
                otp_gateway::delivery::Handled::Finished { report, .. } => report,
                other => panic!("{other:?}"),
            }
        }
    }))
    .await;
    let took = started.elapsed();
    let delivered = reports
        .iter()
        .filter(|r| r.status == DeliveryStatus::Delivered)
        .count();
    let failed: Vec<_> = reports
        .iter()
        .filter(|r| r.status != DeliveryStatus::Delivered)
        .take(3)
        .collect();
    assert_eq!(delivered, 2_000, "{took:?}; not delivered: {failed:#?}");
    assert_eq!(smsc.submits().len(), 2_000);
    println!("2,000 SMS through one bind (window 256) in {took:?}");
}

#[tokio::test]
async fn a_bind_known_to_be_down_fails_over_at_once_instead_of_waiting_out_the_response_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there: every bind is refused at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = closed.local_addr().unwrap().to_string();
    drop(closed);
    let mut down = smpp_provider(&address, "secret");
    down["response_timeout"] = json!("30s");
    let config = engine_config(
        dir.path(),
        json!({"carrier": down, "sandbox": {"kind": "sandbox", "outbox": dir.path().join("outbox.jsonl")}}),
        &[(
            "routes",
            json!({"push": ["sandbox"], "sms": ["carrier", "sandbox"], "voice": ["sandbox"]}),
        )],
    );
    let service = engine(&config, vec![]).await;
    let started = std::time::Instant::now();
    let report = deliver(&service, &sms_job("down", "en", &["+14155550100"])).await;
    let took = started.elapsed();
    assert_eq!(report.status, DeliveryStatus::Sent, "{report:#?}");
    let attempts = &report.targets[0].attempts;
    assert_eq!(attempts[0].provider, "carrier");
    assert_eq!(attempts[0].reason, Some(FailureReason::ProviderUnavailable));
    assert!(
        attempts[0]
            .provider_message
            .as_deref()
            .unwrap()
            .contains("cannot reach the SMSC"),
        "{attempts:?}"
    );
    assert_eq!(attempts.last().unwrap().provider, "sandbox");
    // Against a 30 s response timeout (twice, with one retry), the failover took no wait.
    assert!(took < Duration::from_secs(10), "{took:?}");
}
