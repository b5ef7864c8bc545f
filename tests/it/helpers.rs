//! Test harness: a gateway on unique broker names and a temporary ledger and outbox, a plain
//! AMQP client to publish jobs and read events and dead letters, and wait helpers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::Serialized;
use futures_util::StreamExt;
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use otp_gateway::app::Application;
use otp_gateway::config::Config;
use otp_gateway::domain::SystemClock;
use otp_gateway::proto::v1::code_delivery_client::CodeDeliveryClient;
use otp_gateway::providers::ProviderRegistry;
use otp_gateway::queue::LinkState;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const BROKER_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Whether RabbitMQ is reachable. Skips the test (returns false) when it is not, except under
/// CI=true, where a missing broker fails the test.
pub async fn broker_available() -> bool {
    let reachable = tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(BROKER_URL, ConnectionProperties::default()),
    )
    .await
    .is_ok_and(|c| c.is_ok());
    if !reachable {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "RabbitMQ is not reachable at {BROKER_URL} and CI=true: start it (rabbitmq-server -detached)"
            );
        }
        eprintln!("skipping: RabbitMQ is not reachable at {BROKER_URL}");
    }
    reachable
}

/// Unique names for one test.
#[derive(Debug, Clone)]
pub struct Names {
    pub suffix: String,
    pub jobs_exchange: String,
    pub jobs_queue: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub events_exchange: String,
    pub connection_name: String,
}

impl Names {
    pub fn new(test: &str) -> Self {
        let suffix = format!("{test}.{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        Names {
            jobs_exchange: format!("test.otp.jobs.{suffix}"),
            jobs_queue: format!("test.otp.send-code.{suffix}"),
            dead_letter_exchange: format!("test.otp.dead.{suffix}"),
            dead_letter_queue: format!("test.otp.send-code.dead.{suffix}"),
            events_exchange: format!("test.otp.events.{suffix}"),
            connection_name: format!("otp-gateway-test-{suffix}"),
            suffix,
        }
    }

    /// The `amqp.*` configuration keys that point the gateway at these names.
    pub fn amqp_settings(&self) -> [(&'static str, &String); 6] {
        [
            ("jobs_exchange", &self.jobs_exchange),
            ("jobs_queue", &self.jobs_queue),
            ("dead_letter_exchange", &self.dead_letter_exchange),
            ("dead_letter_queue", &self.dead_letter_queue),
            ("events_exchange", &self.events_exchange),
            ("connection_name", &self.connection_name),
        ]
    }

    /// The same settings as environment overrides, for the real binary (with no API keys:
    /// its listeners are on loopback; the auth tests turn keys on).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .amqp_settings()
            .into_iter()
            .map(|(key, value)| {
                (
                    format!("OTP_GATEWAY_AMQP__{}", key.to_ascii_uppercase()),
                    value.clone(),
                )
            })
            .collect();
        env.push(("OTP_GATEWAY_AUTH__MODE".into(), "none".into()));
        env
    }
}

/// A gateway configuration on `names`, with its files in `dir`.
pub fn config(names: &Names, dir: &Path, overrides: &[(&str, Value)]) -> Config {
    let mut figment = Config::figment(None)
        .merge(Serialized::default("grpc.listen", "127.0.0.1:0"))
        .merge(Serialized::default("receipts.listen", "127.0.0.1:0"))
        .merge(Serialized::default("ops.listen", "127.0.0.1:0"))
        // No API keys (loopback listeners) unless a test turns them on.
        .merge(Serialized::default("auth.mode", "none"))
        .merge(Serialized::default("amqp.url", BROKER_URL))
        .merge(Serialized::default("amqp.reconnect_initial", "100ms"))
        .merge(Serialized::default("amqp.reconnect_max", "1s"))
        .merge(Serialized::default(
            "store.url",
            format!("sqlite://{}/ledger.db", dir.display()),
        ))
        .merge(Serialized::default(
            "providers.sandbox.outbox",
            dir.join("outbox.jsonl"),
        ))
        .merge(Serialized::default("delivery.shutdown_grace", "5s"));
    for (key, value) in names.amqp_settings() {
        figment = figment.merge(Serialized::default(&format!("amqp.{key}"), value));
    }
    for (key, value) in overrides {
        figment = figment.merge(Serialized::default(key, value));
    }
    Config::from_figment(figment).expect("test configuration is valid")
}

/// A gateway running in this process.
pub struct Gateway {
    pub grpc_addr: std::net::SocketAddr,
    pub receipts_addr: std::net::SocketAddr,
    pub ops_addr: std::net::SocketAddr,
    pub link_state: tokio::sync::watch::Receiver<LinkState>,
    /// The fraud guard's rounds so far.
    pub fraud_rounds: tokio::sync::watch::Receiver<u64>,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Gateway {
    /// Starts a gateway with the configured providers and waits until it consumes.
    pub async fn start(config: Config) -> Gateway {
        let providers = ProviderRegistry::from_config(&config).await.unwrap();
        Self::start_with(config, providers).await
    }

    /// Starts a gateway with the given providers and waits until it consumes.
    pub async fn start_with(config: Config, providers: ProviderRegistry) -> Gateway {
        Self::spawn(config, providers).await.consuming().await
    }

    /// Waits until the gateway consumes from RabbitMQ.
    async fn consuming(mut self) -> Gateway {
        tokio::time::timeout(
            Duration::from_secs(20),
            self.link_state.wait_for(|s| *s == LinkState::Up),
        )
        .await
        .expect("the gateway connects to RabbitMQ within 20 s")
        .unwrap();
        self
    }

    /// Starts a gateway without waiting for the broker.
    pub async fn start_unconnected(config: Config) -> Gateway {
        let providers = ProviderRegistry::from_config(&config).await.unwrap();
        Self::spawn(config, providers).await
    }

    /// Starts a gateway that reads time from `clock` and waits until it consumes.
    pub async fn start_with_clock(
        config: Config,
        clock: Arc<dyn otp_gateway::domain::Clock>,
    ) -> Gateway {
        let providers = ProviderRegistry::from_config(&config).await.unwrap();
        Self::spawn_with(config, providers, clock)
            .await
            .consuming()
            .await
    }

    async fn spawn(config: Config, providers: ProviderRegistry) -> Gateway {
        Self::spawn_with(config, providers, Arc::new(SystemClock)).await
    }

    async fn spawn_with(
        config: Config,
        providers: ProviderRegistry,
        clock: Arc<dyn otp_gateway::domain::Clock>,
    ) -> Gateway {
        let app = Application::build_with(config, providers, clock)
            .await
            .unwrap();
        let grpc_addr = app.grpc_addr();
        let receipts_addr = app.receipts_addr();
        let ops_addr = app.ops_addr();
        let link_state = app.link_state();
        let fraud_rounds = app.fraud_guard().rounds();
        let stop = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(stop.clone()));
        Gateway {
            grpc_addr,
            receipts_addr,
            ops_addr,
            link_state,
            fraud_rounds,
            stop,
            task,
        }
    }

    /// Waits until the fraud guard did two more rounds: what was sent or verified before is
    /// stored and judged.
    pub async fn fraud_rounds_passed(&mut self) {
        let done = *self.fraud_rounds.borrow_and_update();
        tokio::time::timeout(
            Duration::from_secs(20),
            self.fraud_rounds.wait_for(|rounds| *rounds >= done + 2),
        )
        .await
        .expect("two fraud-guard rounds within 20 s")
        .unwrap();
    }

    /// Stops it the way SIGTERM does and waits until it is down.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the gateway stops within 30 s")
            .unwrap()
            .unwrap();
    }

    pub async fn admin(
        &self,
    ) -> otp_gateway::proto::v1::policy_admin_client::PolicyAdminClient<tonic::transport::Channel>
    {
        otp_gateway::proto::v1::policy_admin_client::PolicyAdminClient::connect(format!(
            "http://{}",
            self.grpc_addr
        ))
        .await
        .unwrap()
    }

    pub async fn client(&self) -> CodeDeliveryClient<tonic::transport::Channel> {
        CodeDeliveryClient::connect(format!("http://{}", self.grpc_addr))
            .await
            .unwrap()
    }
}

/// A plain AMQP client playing the upstream producer and event consumer.
pub struct Broker {
    pub names: Names,
    connection: Connection,
    pub channel: Channel,
    events_queue: String,
    events: Option<Consumer>,
}

impl Broker {
    /// Connects, declares the gateway's topology names the test needs before the gateway runs
    /// (the gateway declares the same, idempotently), and binds an events queue.
    pub async fn connect(names: &Names) -> Broker {
        let connection = Connection::connect(BROKER_URL, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let topology = otp_gateway::queue::Topology {
            jobs_exchange: names.jobs_exchange.clone(),
            jobs_routing_key: "send-code".into(),
            verifications_routing_key: "report-verification".into(),
            jobs_queue: names.jobs_queue.clone(),
            delivery_limit: 10,
            dead_letter_exchange: names.dead_letter_exchange.clone(),
            dead_letter_queue: names.dead_letter_queue.clone(),
            events_exchange: names.events_exchange.clone(),
            gateway_user: "guest".into(),
            sign_jobs: false,
            dead_letter_ttl: None,
        };
        topology.declare(&channel).await.unwrap();
        let events_queue = format!("test.events.{}", names.suffix);
        channel
            .queue_declare(
                events_queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                events_queue.as_str().into(),
                names.events_exchange.as_str().into(),
                "delivery.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let events = consume_no_ack(&channel, &events_queue).await;
        Broker {
            names: names.clone(),
            connection,
            channel,
            events_queue,
            events: Some(events),
        }
    }

    /// Publishes a job body with a content type (and optional extra properties), confirmed.
    pub async fn publish(
        &self,
        body: &[u8],
        content_type: Option<&str>,
        properties: BasicProperties,
    ) {
        self.publish_with_key("send-code", body, content_type, properties)
            .await;
    }

    /// Publishes to the jobs exchange with `routing_key`.
    pub async fn publish_with_key(
        &self,
        routing_key: &str,
        body: &[u8],
        content_type: Option<&str>,
        properties: BasicProperties,
    ) {
        let properties = match content_type {
            Some(ct) => properties.with_content_type(ct.into()),
            None => properties,
        }
        .with_delivery_mode(2);
        self.channel
            .basic_publish(
                self.names.jobs_exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    pub async fn publish_json(&self, job: &Value) {
        self.publish(
            job.to_string().as_bytes(),
            Some("application/json"),
            BasicProperties::default(),
        )
        .await;
    }

    /// The next delivery event (routing key and JSON report).
    pub async fn next_event(&mut self, within: Duration) -> (String, Value) {
        let events = self.events.as_mut().unwrap();
        let delivery = tokio::time::timeout(within, events.next())
            .await
            .unwrap_or_else(|_| panic!("no delivery event within {within:?}"))
            .unwrap()
            .unwrap();
        (
            delivery.routing_key.to_string(),
            serde_json::from_slice(&delivery.data).unwrap(),
        )
    }

    /// A server-named queue of this connection's own (gone when it closes).
    pub async fn exclusive_queue(&self) -> lapin::Queue {
        self.channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
    }

    /// A consumer of the events whose routing key matches `pattern` (e.g. `device.#`), on an
    /// exclusive queue.
    pub async fn subscribe(&self, pattern: &str) -> Consumer {
        let queue = self.exclusive_queue().await;
        self.channel
            .queue_bind(
                queue.name().clone(),
                self.names.events_exchange.as_str().into(),
                pattern.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        consume_no_ack(&self.channel, queue.name().as_str()).await
    }

    /// Events until one for each of `count` distinct deliveries has arrived.
    pub async fn events_for(
        &mut self,
        count: usize,
        within: Duration,
    ) -> std::collections::HashMap<String, Value> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = std::collections::HashMap::new();
        while seen.len() < count {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (_, report) = self.next_event(left).await;
            seen.insert(report["delivery_id"].as_str().unwrap().to_owned(), report);
        }
        seen
    }

    /// Takes one message from `queue`, if any.
    pub async fn get(&self, queue: &str) -> Option<BasicGetMessage> {
        let message = self
            .channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()?;
        message
            .delivery
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
        Some(message)
    }

    /// Waits up to `within` for a message on `queue` and takes it.
    pub async fn next_message(&self, queue: &str, within: Duration) -> BasicGetMessage {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(message) = self.get(queue).await {
                return message;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no message on {queue} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Takes the next message of `queue` and hands it back (nack, requeued) `times` times, as
    /// consumers that die holding it do: the broker counts each in `x-delivery-count`.
    pub async fn hand_back(&self, queue: &str, times: u32) {
        for _ in 0..times {
            let message = loop {
                if let Some(message) = self
                    .channel
                    .basic_get(queue.into(), BasicGetOptions::default())
                    .await
                    .unwrap()
                {
                    break message;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            message
                .delivery
                .nack(lapin::options::BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }

    /// Ready messages in `queue`.
    pub async fn ready(&self, queue: &str) -> u32 {
        self.state(queue).await.message_count()
    }

    /// Consumers of `queue`.
    pub async fn consumers(&self, queue: &str) -> u32 {
        self.state(queue).await.consumer_count()
    }

    async fn state(&self, queue: &str) -> lapin::Queue {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
    }

    /// Waits until `queue` holds `count` ready messages. A quorum queue takes jobs back from a
    /// closed channel through its log, a moment after the close, so a count right after a
    /// gateway stops may still be behind.
    pub async fn wait_ready(&self, queue: &str, count: u32, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let ready = self.ready(queue).await;
            if ready == count {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{queue} holds {ready} ready messages, not {count}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Messages of `queue` delivered to a consumer and not acked yet (as `rabbitmqctl` says).
    pub fn unacked(&self, queue: &str) -> Option<u32> {
        let output = std::process::Command::new("rabbitmqctl")
            .args(["list_queues", "-q", "name", "messages_unacknowledged"])
            .output()
            .expect("rabbitmqctl runs (it ships with the broker)");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|line| {
                let (name, count) = line.split_once('\t')?;
                (name == queue).then(|| count.trim().parse().ok())?
            })
    }

    /// Removes everything the test declared.
    pub async fn cleanup(self) {
        let ch = &self.channel;
        let delayed = format!("{}.delay.5s", self.names.jobs_queue);
        for queue in [
            &self.names.jobs_queue,
            &self.names.dead_letter_queue,
            &self.events_queue,
            &delayed,
        ] {
            let _ = ch
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in [
            &self.names.jobs_exchange,
            &self.names.dead_letter_exchange,
            &self.names.events_exchange,
        ] {
            let _ = ch
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

/// Consumes `queue` with automatic acks (for queues the test only reads).
pub async fn consume_no_ack(channel: &Channel, queue: &str) -> Consumer {
    channel
        .basic_consume(
            queue.into(),
            format!("test-reader-{queue}").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
}

/// A header of a message as a string.
pub fn header(message: &BasicGetMessage, name: &str) -> Option<String> {
    let headers = message.delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// An RFC 3339 instant `minutes` from now (negative for the past).
pub fn in_minutes(minutes: i64) -> String {
    (jiff::Timestamp::now() + jiff::SignedDuration::from_mins(minutes)).to_string()
}

/// A valid JSON job with a phone number and a device.
pub fn job(job_id: &str, code: &str) -> Value {
    json!({
        "job_id": job_id, "tenant": "acme", "account": "user-42", "code": code,
        "expires_at": in_minutes(5), "purpose": "sign_in", "locale": "en-US", "user_initiated": true,
        "channels": ["sms"],
        "targets": [{"phone": {"number": "+14155550101"}}]
    })
}

/// The outbox's lines (what reached the "handset").
pub fn outbox(dir: &Path) -> Vec<Value> {
    let path: PathBuf = dir.join("outbox.jsonl");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// Polls `check` every 50 ms until it holds, or panics after `within`.
pub async fn eventually<F: FnMut() -> bool>(within: Duration, what: &str, mut check: F) {
    let deadline = tokio::time::Instant::now() + within;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A private CA made with openssl in a test's directory, issuing certificates.
pub struct PrivateCa {
    dir: std::path::PathBuf,
    name: String,
}

/// The names a test server's certificate is issued for.
pub const SERVER_NAMES: &str = "subjectAltName=DNS:localhost,IP:127.0.0.1";

/// A client certificate's purpose (mutual TLS).
pub const CLIENT_AUTH: &str = "extendedKeyUsage=clientAuth";

impl PrivateCa {
    fn openssl(&self, args: &[&str]) {
        let output = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("openssl (Debian's openssl package) makes the test certificates");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A new CA, its files named after `name` in `dir`.
    pub fn new(dir: &Path, name: &str) -> PrivateCa {
        let ca = PrivateCa {
            dir: dir.to_owned(),
            name: name.to_owned(),
        };
        let (key, pem) = (format!("{name}-ca.key"), format!("{name}-ca.pem"));
        let subject = format!("/CN=otp-gateway test CA {name}");
        ca.new_key(&["-x509", "-days", "2"], &key, &pem, &subject);
        ca
    }

    /// A new P-256 key in `key` and, for `subject`, a request in `out` (with `-x509`, a
    /// self-signed certificate).
    fn new_key(&self, extra: &[&str], key: &str, out: &str, subject: &str) {
        let mut args = vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-nodes", "-keyout", key, "-out", out, "-subj", subject]);
        self.openssl(&args);
    }

    /// The CA's certificate (PEM).
    pub fn pem(&self) -> std::path::PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// A certificate (and its key) for `leaf`, with the extension lines `extensions` (e.g.
    /// [`SERVER_NAMES`] or [`CLIENT_AUTH`]): `(cert.pem, key.pem)`.
    pub fn issue(&self, leaf: &str, extensions: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let name = format!("{}-{leaf}", self.name);
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(self.dir.join(&ext), format!("{extensions}\n")).unwrap();
        let subject = format!("/CN={leaf}");
        self.new_key(&[], &key, &csr, &subject);
        let (ca_pem, ca_key) = (
            format!("{}-ca.pem", self.name),
            format!("{}-ca.key", self.name),
        );
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
        (self.dir.join(pem), self.dir.join(key))
    }
}

/// A TLS-terminating proxy in front of the local broker, as stunnel would be: TLS with `cert`
/// and `key`, requiring a client certificate that chains to `client_ca` when given, each
/// connection piped to 127.0.0.1:5672. Its port, and how many handshakes finished.
pub async fn tls_broker_proxy(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(path).unwrap() {
                roots.add(ca.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(roots.into())
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs, key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handshakes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&handshakes);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let counted = std::sync::Arc::clone(&counted);
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Ok(mut broker) = tokio::net::TcpStream::connect("127.0.0.1:5672").await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
            });
        }
    });
    (port, handshakes)
}

/// `serve` with the settings `env` and a SQLite ledger in `dir`, expected to refuse the start
/// as a configuration error (exit 64): what it said on stderr.
pub fn refused_start(dir: &Path, env: &[(&str, &std::ffi::OsStr)]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_otp-gateway"))
        .arg("serve")
        .env(
            "OTP_GATEWAY_STORE__URL",
            format!("sqlite://{}/ledger.db", dir.display()),
        )
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(64), "{env:?}: {stderr}");
    stderr
}
