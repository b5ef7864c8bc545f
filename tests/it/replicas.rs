//! Several replicas of the real binary sharing one PostgreSQL database and one job queue: a
//! replica killed mid-run loses no job and re-sends only what was in a provider call at the
//! kill; a per-recipient limit holds across replicas; an acknowledgement at one replica decides
//! a delivery waiting at another at once; a block entry added at one stops a send at another.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use otp_gateway::proto::v1;
use otp_gateway::proto::v1::code_delivery_client::CodeDeliveryClient;
use otp_gateway::proto::v1::policy_admin_client::PolicyAdminClient;
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

use crate::helpers::{BROKER_URL, Broker, Names, broker_available, in_minutes};

const BINARY: &str = env!("CARGO_BIN_EXE_otp-gateway");
/// The block-list hash key every replica of a test shares.
const HASH_KEY: &str = "replicas-test-block-list-hash-key-0123456789";
const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database of its own for one test, dropped (with its connections) afterwards.
pub(crate) struct Database {
    name: String,
    pub(crate) url: String,
}

impl Database {
    /// `None` (the test skips) when PostgreSQL is not there, unless CI=true: then it fails.
    pub(crate) async fn create() -> Option<Database> {
        let mut admin = match PgConnection::connect(ADMIN_URL).await {
            Ok(admin) => admin,
            Err(error) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("skipping: no PostgreSQL at 127.0.0.1:5432 ({error})");
                return None;
            }
            Err(error) => panic!("no PostgreSQL at 127.0.0.1:5432 and CI=true: {error}"),
        };
        let name = format!("otp_it_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
        Some(Database {
            url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
            name,
        })
    }

    async fn pool(&self) -> PgPool {
        PgPool::connect(&self.url).await.unwrap()
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    if let Ok(mut admin) = PgConnection::connect(ADMIN_URL).await {
                        let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                        let _ = sqlx::query(AssertSqlSafe(sql)).execute(&mut admin).await;
                    }
                });
        })
        .join();
    }
}

/// One gateway process.
struct Replica {
    child: Child,
    grpc: String,
    /// The receipts listener (provider callbacks).
    receipts: String,
    outbox: PathBuf,
}

pub(crate) fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

impl Replica {
    fn spawn(n: usize, names: &Names, database: &Database, dir: &Path) -> Replica {
        let grpc = format!("127.0.0.1:{}", free_port());
        let receipts = format!("127.0.0.1:{}", free_port());
        let outbox = dir.join(format!("outbox-{n}.jsonl"));
        let log = std::fs::File::create(dir.join(format!("replica-{n}.log"))).unwrap();
        // A configuration file of the test's, if it wrote one (providers and routes).
        let file = dir.join("gateway.toml");
        let mut command = Command::new(BINARY);
        command.arg("serve");
        if file.exists() {
            command.arg("--config").arg(&file);
        }
        let child = command
            .envs(names.env())
            .env("OTP_GATEWAY_AMQP__URL", BROKER_URL)
            .env("OTP_GATEWAY_AMQP__RECONNECT_INITIAL", "100ms")
            .env("OTP_GATEWAY_STORE__URL", &database.url)
            .env("OTP_GATEWAY_STORE__HASH_KEY", HASH_KEY)
            .env("OTP_GATEWAY_STORE__LEASE", "2s")
            // Four tests' replicas at once stay within PostgreSQL's 100 connections.
            .env("OTP_GATEWAY_STORE__POOL_SIZE", "8")
            .env("OTP_GATEWAY_GRPC__LISTEN", &grpc)
            .env("OTP_GATEWAY_RECEIPTS__LISTEN", &receipts)
            .env("OTP_GATEWAY_OPS__LISTEN", "127.0.0.1:0")
            .env("OTP_GATEWAY_PROVIDERS__SANDBOX__OUTBOX", &outbox)
            .env("OTP_GATEWAY_DELIVERY__SHUTDOWN_GRACE", "2s")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Replica {
            child,
            grpc: format!("http://{grpc}"),
            receipts: format!("http://{receipts}"),
            outbox,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn client(&self) -> CodeDeliveryClient<tonic::transport::Channel> {
        // A replica's start (the migrations of a new database) can take a while on two cores
        // shared with every other test.
        for _ in 0..600 {
            if let Ok(client) = CodeDeliveryClient::connect(self.grpc.clone()).await {
                return client;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("replica {} did not come up", self.grpc);
    }

    async fn admin(&self) -> PolicyAdminClient<tonic::transport::Channel> {
        self.client().await;
        PolicyAdminClient::connect(self.grpc.clone()).await.unwrap()
    }

    /// The messages that reached the sandbox "handset" through this replica, by delivery id.
    fn sends(&self) -> HashMap<String, usize> {
        let mut sends = HashMap::new();
        for line in std::fs::read_to_string(&self.outbox)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        {
            *sends
                .entry(line["delivery_id"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
        sends
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A provider server that takes each message after `delay` and counts what reached it, by
/// delivery id: a call is open long enough for a kill to cut it off. While `stalled` holds,
/// calls stay open until it is lifted, so a test can kill a replica that surely is in calls.
struct SlowCarrier {
    received: std::sync::Mutex<HashMap<String, usize>>,
    stalled: tokio::sync::watch::Sender<bool>,
    /// The calls held open by the stall now, by delivery id.
    held: std::sync::Mutex<std::collections::HashSet<String>>,
    /// After this many calls, the carrier stalls by itself.
    stall_after: std::sync::atomic::AtomicUsize,
}

impl SlowCarrier {
    fn stall(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }

    /// Stalls once `calls` calls reached the carrier (whatever the pace of the test).
    fn stall_after(&self, calls: usize) {
        self.stall_after
            .store(calls, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn slow_carrier(delay: Duration) -> (String, std::sync::Arc<SlowCarrier>) {
    use axum::extract::State;
    let carrier = std::sync::Arc::new(SlowCarrier {
        received: Default::default(),
        stalled: tokio::sync::watch::Sender::new(false),
        held: Default::default(),
        stall_after: usize::MAX.into(),
    });
    let app = axum::Router::new()
        .route(
            "/send",
            axum::routing::post(
                move |State(carrier): State<std::sync::Arc<SlowCarrier>>, body: String| async move {
                    let id = body.trim().to_owned();
                    let calls = {
                        let mut received = carrier.received.lock().unwrap();
                        *received.entry(id.clone()).or_default() += 1;
                        received.values().sum::<usize>()
                    };
                    if calls
                        == carrier
                            .stall_after
                            .load(std::sync::atomic::Ordering::SeqCst)
                    {
                        carrier.stall(true);
                    }
                    let mut stalled = carrier.stalled.subscribe();
                    if *stalled.borrow_and_update() {
                        carrier.held.lock().unwrap().insert(id.clone());
                        let _ = stalled.wait_for(|stalled| !*stalled).await;
                        carrier.held.lock().unwrap().remove(&id);
                    }
                    tokio::time::sleep(delay).await;
                    (axum::http::StatusCode::ACCEPTED, "queued")
                },
            ),
        )
        .with_state(std::sync::Arc::clone(&carrier));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/send", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, carrier)
}

/// Both replicas up and consuming the jobs queue.
async fn start(names: &Names, database: &Database, dir: &Path, count: usize) -> Vec<Replica> {
    let replicas: Vec<Replica> = (0..count)
        .map(|n| Replica::spawn(n, names, database, dir))
        .collect();
    for replica in &replicas {
        replica.client().await;
    }
    let broker = Broker::connect(names).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let consumers = broker.consumers(&names.jobs_queue).await;
        if consumers as usize >= count {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{consumers} of {count} replicas consume"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    replicas
}

/// The end of each replica's log, for a failure's message.
fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for n in 0.. {
        let Ok(log) = std::fs::read_to_string(dir.join(format!("replica-{n}.log"))) else {
            break;
        };
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        out.push_str(&format!("--- replica {n} log (last 20 lines)\n{tail}\n"));
    }
    out
}

fn sms_job(job_id: &str, number: &str) -> Value {
    json!({
        "job_id": job_id, "tenant": "acme", "account": format!("user-{job_id}"), "code": "482913",
        "expires_at": in_minutes(10), "purpose": "sign_in", "locale": "en", "user_initiated": true,
        "channels": ["sms"], "targets": [{"phone": {"number": number}}]
    })
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Waits until `n` deliveries are final.
async fn all_final(pool: &PgPool, n: i64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let done = count(
            pool,
            "SELECT count(*) FROM deliveries WHERE status IN ('SENT', 'DELIVERED', 'FAILED')",
        )
        .await;
        if done >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{done} of {n} deliveries final");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_run_loses_no_job_and_resends_only_what_was_in_a_call() {
    if !broker_available().await {
        return;
    }
    let Some(database) = Database::create().await else {
        return;
    };
    let names = Names::new("replicas-kill");
    let dir = tempfile::tempdir().unwrap();
    // SMS through a carrier that answers after 20 ms: replica 0 is in many calls when it dies.
    let (url, carrier) = slow_carrier(Duration::from_millis(20)).await;
    std::fs::write(
        dir.path().join("gateway.toml"),
        format!(
            "[routes]\nsms = [\"slow\"]\n\n[providers.slow]\nkind = \"http\"\nurl = \"{url}\"\n\
             body = \"{{{{delivery_id}}}}\"\ncontent_type = \"text/plain\"\n"
        ),
    )
    .unwrap();
    let mut replicas = start(&names, &database, dir.path(), 2).await;
    let broker = Broker::connect(&names).await;
    let pool = database.pool().await;
    const JOBS: usize = 2000;
    carrier.stall_after(JOBS / 2);
    for n in 0..JOBS {
        let number = format!("+1415555{:04}", n % 10_000);
        broker
            .publish_json(&sms_job(&format!("k-{n}"), &number))
            .await;
    }
    // Halfway through (once half the jobs reached it), the carrier holds every call it gets
    // from then on open, and a replica dies in those calls without a word (as with a power
    // cut). The victim is the replica with the most calls held.
    let pids: Vec<u32> = replicas.iter().map(Replica::pid).collect();
    // Per replica, the calls the carrier holds open that it owns (by its pid, the first part
    // of its worker name), most first.
    let held_by = || async {
        let held: Vec<String> = carrier.held.lock().unwrap().iter().cloned().collect();
        let rows = sqlx::query_as::<_, (String, String)>(
            "SELECT split_part(owner, '-', 1), tenant || '/' || job_id FROM deliveries
             WHERE tenant || '/' || job_id = ANY($1) AND status = 'IN_PROGRESS'",
        )
        .bind(&held)
        .fetch_all(&pool)
        .await
        .unwrap();
        let mut by: HashMap<u32, Vec<String>> = HashMap::new();
        for (pid, id) in rows {
            if let Ok(pid) = pid.parse::<u32>() {
                by.entry(pid).or_default().push(id);
            }
        }
        by.into_iter()
            .filter(|(pid, _)| pids.contains(pid))
            .max_by_key(|(_, ids)| ids.len())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (victim, held_at_kill) = loop {
        match held_by().await {
            Some((pid, ids)) if ids.len() >= 2 => break (pid, ids),
            held => assert!(
                Instant::now() < deadline,
                "no replica had calls held open by the carrier ({held:?})\n{}",
                logs(dir.path())
            ),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let index = pids.iter().position(|pid| *pid == victim).unwrap();
    replicas[index].kill();
    carrier.stall(false);
    // The other replica finishes the rest, taking over what the victim held once its leases
    // ran out.
    all_final(&pool, JOBS as i64, Duration::from_secs(120)).await;

    assert_eq!(
        count(&pool, "SELECT count(*) FROM deliveries").await,
        JOBS as i64
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM deliveries WHERE status = 'SENT'"
        )
        .await,
        JOBS as i64,
        "every job ended sent, none lost"
    );
    let interrupted: Vec<String> = sqlx::query_scalar(
        "SELECT d.tenant || '/' || d.job_id FROM attempts a JOIN deliveries d ON d.id = a.delivery
         WHERE a.outcome = 'INTERRUPTED'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let sends = carrier.received.lock().unwrap().clone();
    assert_eq!(sends.len(), JOBS, "every job reached the carrier");
    let resent: Vec<&String> = sends
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(
        resent.iter().all(|id| interrupted.contains(id)),
        "re-sent only where a call was open at the kill: resent {resent:?}, interrupted {interrupted:?}"
    );
    assert!(resent.len() <= interrupted.len());
    assert!(sends.values().all(|n| *n <= 2));
    assert!(
        held_at_kill.iter().all(|id| interrupted.contains(id)),
        "replica {victim} died in the calls the carrier held ({held_at_kill:?}): each was taken \
         over and recorded as interrupted ({interrupted:?})"
    );
    eprintln!(
        "kill test: {} calls open at the kill ({} of them held by the carrier), {} of them re-sent",
        interrupted.len(),
        held_at_kill.len(),
        resent.len()
    );
    drop(replicas);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_recipient_limit_holds_across_replicas() {
    if !broker_available().await {
        return;
    }
    let Some(database) = Database::create().await else {
        return;
    };
    let names = Names::new("replicas-limit");
    let dir = tempfile::tempdir().unwrap();
    let replicas = start(&names, &database, dir.path(), 2).await;
    replicas[0]
        .admin()
        .await
        .set_rate_limit(v1::SetRateLimitRequest {
            tenant: "acme".into(),
            scope: v1::RateScope::Recipient as i32,
            prefix: String::new(),
            limit: 5,
            window: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
        })
        .await
        .unwrap();
    // Past the rules cache of both replicas.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let broker = Broker::connect(&names).await;
    for n in 0..60 {
        broker
            .publish_json(&sms_job(&format!("l-{n}"), "+14155550123"))
            .await;
    }
    let pool = database.pool().await;
    all_final(&pool, 60, Duration::from_secs(60)).await;
    let sent: usize = replicas
        .iter()
        .map(|r| r.sends().values().sum::<usize>())
        .sum();
    assert_eq!(sent, 5, "exactly the limit reached the number");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM deliveries WHERE reason = 'RATE_LIMITED'"
        )
        .await,
        55
    );
    let handled_by: i64 = count(&pool, "SELECT count(DISTINCT owner) FROM deliveries").await;
    eprintln!("limit test: jobs handled by {handled_by} replicas");
    drop(replicas);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_at_one_replica_decides_a_delivery_waiting_at_another() {
    if !broker_available().await {
        return;
    }
    let Some(database) = Database::create().await else {
        return;
    };
    let names = Names::new("replicas-ack");
    let dir = tempfile::tempdir().unwrap();
    let replicas = start(&names, &database, dir.path(), 2).await;
    let broker = Broker::connect(&names).await;
    let job = json!({
        "job_id": "ack-1", "tenant": "acme", "account": "user-42", "code": "482913",
        "expires_at": in_minutes(10), "purpose": "sign_in", "locale": "en", "user_initiated": true,
        "channels": ["push", "sms"],
        "targets": [
            {"device": {"id": "ipad-1", "platform": "apns", "token": "a1b2c3", "can_display_code": true}},
            {"phone": {"number": "+14155550101"}}
        ]
    });
    broker.publish_json(&job).await;
    let pool = database.pool().await;
    // The push went out: the delivery waits (push_ack_timeout 15 s) for the device.
    let deadline = Instant::now() + Duration::from_secs(20);
    let owner: String = loop {
        let owner: Option<String> = sqlx::query_scalar(
            "SELECT d.owner FROM deliveries d JOIN attempts a ON a.delivery = d.id
             WHERE d.job_id = 'ack-1' AND a.outcome = 'SENT' AND d.status = 'IN_PROGRESS'",
        )
        .fetch_optional(&pool)
        .await
        .unwrap();
        if let Some(owner) = owner {
            break owner;
        }
        assert!(Instant::now() < deadline, "the push did not go out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The device answers through the other replica.
    let other = replicas
        .iter()
        .find(|r| !owner.starts_with(&format!("{}-", r.pid())))
        .expect("another replica");
    // The other replica streams the changes the owner makes.
    let mut watch = other
        .client()
        .await
        .watch_delivery(v1::WatchDeliveryRequest {
            delivery_id: "acme/ack-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, v1::DeliveryStatus::InProgress as i32);
    // The token the push carried (made by the owner; the other checks it, under the same
    // ledger secret).
    let ack_token = replicas
        .iter()
        .flat_map(|r| {
            std::fs::read_to_string(&r.outbox)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter_map(|line| serde_json::from_str::<Value>(&line).ok())
        .find_map(|line| line["ack_token"].as_str().map(str::to_owned))
        .expect("the push carried an acknowledgement token");
    let acked = Instant::now();
    let answer = other
        .client()
        .await
        .acknowledge_delivery(v1::AcknowledgeDeliveryRequest {
            delivery_id: "acme/ack-1".into(),
            device_id: "ipad-1".into(),
            acknowledgement: v1::Acknowledgement::Shown as i32,
            ack_token,
        })
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status: String =
            sqlx::query_scalar("SELECT status FROM deliveries WHERE job_id = 'ack-1'")
                .fetch_one(&pool)
                .await
                .unwrap();
        if status == "DELIVERED" {
            break;
        }
        if Instant::now() >= deadline {
            for n in 0..2 {
                let log = std::fs::read_to_string(dir.path().join(format!("replica-{n}.log")))
                    .unwrap_or_default();
                eprintln!("--- replica {n}:\n{log}");
            }
            panic!("still {status}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let decided = acked.elapsed();
    assert!(
        decided < Duration::from_secs(2),
        "the waiting replica acted within {decided:?} (its push wait is 15 s)"
    );
    assert_eq!(
        answer.status,
        v1::DeliveryStatus::Delivered as i32,
        "the other replica's answer shows the outcome the acknowledgement led to"
    );
    let streamed = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(report) = watch.message().await.unwrap() {
            if report.status == v1::DeliveryStatus::Delivered as i32 {
                return report;
            }
        }
        panic!("the stream ended before the outcome");
    })
    .await
    .expect("the other replica streamed the owner's outcome");
    assert_eq!(streamed.delivery_id, "acme/ack-1");
    let sms: usize = replicas
        .iter()
        .flat_map(|r| r.sends().into_iter())
        .filter(|(id, _)| id == "acme/ack-1")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        sms, 1,
        "only the push went out: no SMS after the device showed it"
    );
    drop(replicas);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_entry_or_a_pinned_range_added_at_one_replica_stops_sends_at_every_replica() {
    if !broker_available().await {
        return;
    }
    let Some(database) = Database::create().await else {
        return;
    };
    let names = Names::new("replicas-block");
    let dir = tempfile::tempdir().unwrap();
    let replicas = start(&names, &database, dir.path(), 2).await;
    replicas[0]
        .admin()
        .await
        .add_block_entry(v1::AddBlockEntryRequest {
            tenant: "acme".into(),
            kind: v1::BlockKind::Number as i32,
            pattern: "+14155550199".into(),
            note: "fraud".into(),
            expires_at: None,
            source: v1::BlockSource::Admin as i32,
        })
        .await
        .unwrap();
    let broker = Broker::connect(&names).await;
    for n in 0..40 {
        broker
            .publish_json(&sms_job(&format!("b-{n}"), "+14155550199"))
            .await;
    }
    let pool = database.pool().await;
    all_final(&pool, 40, Duration::from_secs(60)).await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM deliveries WHERE status = 'FAILED' AND reason = 'RECIPIENT_BLOCKED'").await,
        40,
        "every job refused by the block entry"
    );
    let sent: usize = replicas
        .iter()
        .map(|r| r.sends().values().sum::<usize>())
        .sum();
    assert_eq!(sent, 0, "nothing reached the number");
    let owners: i64 = count(&pool, "SELECT count(DISTINCT owner) FROM deliveries").await;
    eprintln!("block test: jobs handled by {owners} replicas");

    // A range pinned at one replica is held at the other after its next round (1 s).
    replicas[0]
        .admin()
        .await
        .pin_quarantine(v1::PinQuarantineRequest {
            tenant: "acme".into(),
            range: "+44770".into(),
            note: "pumping".into(),
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for n in 0..40 {
        broker
            .publish_json(&sms_job(&format!("p-{n}"), &format!("+4477009{n:05}")))
            .await;
    }
    all_final(&pool, 80, Duration::from_secs(60)).await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM deliveries WHERE status = 'FAILED' AND reason = 'DESTINATION_SUSPENDED'").await,
        40,
        "every job to the range refused by the pin\n{}",
        logs(dir.path())
    );
    let sent: usize = replicas
        .iter()
        .map(|r| r.sends().values().sum::<usize>())
        .sum();
    assert_eq!(sent, 0, "nothing reached the range");
    drop(replicas);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twilio_callback_at_one_replica_moves_on_the_delivery_waiting_at_another() {
    if !broker_available().await {
        return;
    }
    let Some(database) = Database::create().await else {
        return;
    };
    let names = Names::new("replicas-receipt");
    let dir = tempfile::tempdir().unwrap();
    let (url, twilio) = crate::twilio::fake_twilio().await;
    // Both replicas verify callbacks against the public URL Twilio is given.
    std::fs::write(
        dir.path().join("gateway.toml"),
        format!(
            "[routes]\nsms = [\"twilio\"]\n\n[receipts]\npublic_url = \"https://otp.example.com\"\n\n\
             [providers.twilio]\nkind = \"twilio\"\nbase_url = \"{url}\"\naccount_sid = \"ACtest\"\n\
             auth_token = \"secret\"\nfrom = \"+15005550006\"\n"
        ),
    )
    .unwrap();
    let replicas = start(&names, &database, dir.path(), 2).await;
    let broker = Broker::connect(&names).await;
    let mut job = sms_job("receipt-1", "+14155550101");
    job["targets"] =
        json!([{"phone": {"number": "+14155550101"}}, {"phone": {"number": "+14155550102"}}]);
    broker.publish_json(&job).await;
    let pool = database.pool().await;
    // The first number's SMS was accepted: its job waits (receipt_wait 10 s) for a receipt.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (owner, sid): (String, String) = loop {
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT d.owner, a.provider_message_id FROM deliveries d JOIN attempts a ON a.delivery = d.id
             WHERE d.job_id = 'receipt-1' AND a.outcome = 'SENT' AND d.status = 'IN_PROGRESS'",
        )
        .fetch_optional(&pool)
        .await
        .unwrap();
        if let Some(row) = row {
            break row;
        }
        assert!(Instant::now() < deadline, "the first SMS did not go out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Twilio's "undelivered" callback reaches the other replica.
    let other = replicas
        .iter()
        .find(|r| !owner.starts_with(&format!("{}-", r.pid())))
        .expect("another replica");
    let params = vec![
        ("MessageSid".to_owned(), sid),
        ("MessageStatus".to_owned(), "undelivered".to_owned()),
        ("ErrorCode".to_owned(), "30005".to_owned()),
    ];
    let signed_url = "https://otp.example.com/receipts/twilio/twilio";
    let signature = otp_gateway::receipts::twilio::signature("secret", signed_url, &params);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let posted = Instant::now();
    let answer = reqwest::Client::new()
        .post(format!("{}/receipts/twilio/twilio", other.receipts))
        .header("X-Twilio-Signature", signature)
        .form(&params)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(answer.as_u16(), 204);
    // The waiting replica moves on to the second number at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !twilio
        .calls()
        .iter()
        .any(|(_, form)| form.get("To").map(String::as_str) == Some("+14155550102"))
    {
        assert!(Instant::now() < deadline, "the second number was not tried");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let moved = posted.elapsed();
    assert!(
        moved < Duration::from_secs(2),
        "the waiting replica went on within {moved:?} (its receipt wait is 10 s)"
    );
    let failed: String = sqlx::query_scalar(
        "SELECT t.reason FROM targets t JOIN deliveries d ON d.id = t.delivery
         WHERE d.job_id = 'receipt-1' AND t.idx = 0",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        failed, "RECIPIENT_UNKNOWN",
        "the first number failed with the receipt's reason (Twilio 30005)"
    );
    drop(replicas);
    broker.cleanup().await;
}
