//! otp-bench: sizes the gateway the way an operator would, against a bare RabbitMQ consumer in
//! the same run. Baseline rounds (a lapin consumer that only acks) and service rounds (the
//! gateway as its own process, full path: decode, ledger with fsync, policy, plan, provider
//! call, attempt records, event, ack) alternate, on the same broker, quorum queue, durability,
//! prefetch and message size; medians and the ratio are printed, with the service's peak RSS.
//! `BENCHMARKS.md` has the results and what limits them.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use otp_gateway::config::{AmqpConfig, Config};
use otp_gateway::queue::Topology;
use std::process::Command;
use tokio_util::sync::CancellationToken;

/// Measures the gateway's throughput against a bare consumer (see BENCHMARKS.md).
#[derive(Parser, Debug)]
#[command(name = "otp-bench", version)]
struct Args {
    /// Jobs in the pre-filled queue of each round.
    #[arg(long, default_value_t = 50_000)]
    jobs: usize,
    /// Rounds of each side, alternated baseline, service, baseline, service, ...
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The broker.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    /// Unacknowledged messages the broker pushes at once (both sides).
    #[arg(long, default_value_t = 256)]
    prefetch: u16,
    /// Jobs the gateway works on at once (`delivery.max_in_flight`).
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Internal: run the gateway from the environment's configuration (the service rounds).
    #[arg(long, hide = true)]
    serve: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let result = if args.serve {
        runtime.block_on(serve())
    } else {
        runtime.block_on(run(args))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("otp-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The service side: the gateway exactly as `otp-gateway serve` runs it, until SIGTERM.
async fn serve() -> anyhow::Result<()> {
    let config = Config::load(None)?;
    otp_gateway::telemetry::init(config.log.format, &config.log.level);
    let app = otp_gateway::app::Application::build(config).await?;
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        term.recv().await;
        on_signal.cancel();
    });
    app.run_until_stopped(stop).await
}

/// The gateway's process: killed if the bench stops early.
struct ServiceProcess(std::process::Child);

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One side's result.
struct Round {
    jobs_per_sec: f64,
    peak_rss_kib: Option<u64>,
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.rounds >= 1 && args.jobs >= 1,
        "--rounds and --jobs must be at least 1"
    );
    let connection = Connection::connect(&args.amqp, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let body_len = job_body("size", 0).len();
    println!(
        "otp-bench: {} jobs per round, {} rounds per side, prefetch {}, max_in_flight {}, job body {} bytes, {} cores",
        args.jobs,
        args.rounds,
        args.prefetch,
        args.max_in_flight,
        body_len,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut baseline = Vec::new();
    let mut service = Vec::new();
    for round in 1..=args.rounds {
        let id = format!("{}-{round}", std::process::id());
        baseline.push(baseline_round(&args, &connection, &channel, &id, round).await?);
        service.push(service_round(&args, &connection, &channel, &id, round).await?);
    }
    let median = |rounds: &[Round]| {
        let mut rates: Vec<f64> = rounds.iter().map(|r| r.jobs_per_sec).collect();
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let (base, svc) = (median(&baseline), median(&service));
    let rss = service.iter().filter_map(|r| r.peak_rss_kib).max();
    println!();
    println!("| side | rounds (jobs/s) | median (jobs/s) |");
    println!("|---|---|---|");
    for (name, rounds, median) in [
        ("bare consumer", &baseline, base),
        ("gateway", &service, svc),
    ] {
        let each: Vec<String> = rounds
            .iter()
            .map(|r| format!("{:.0}", r.jobs_per_sec))
            .collect();
        println!("| {name} | {} | {median:.0} |", each.join(", "));
    }
    println!(
        "\nservice / baseline = {:.3}; gateway peak RSS {}",
        svc / base,
        rss.map_or("unknown".into(), |kib| format!(
            "{:.1} MiB",
            kib as f64 / 1024.0
        ))
    );
    connection.close(200, "done".into()).await?;
    Ok(())
}

/// A job as an upstream service would publish it: SMS to a number of its own (no rate limit
/// applies), through the sandbox provider.
fn job_body(round: &str, n: usize) -> Vec<u8> {
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    serde_json::json!({
        "job_id": format!("{round}-{n:07}"), "tenant": "bench", "account": format!("user-{n}"),
        "code": "482913", "expires_at": expires.to_string(), "purpose": "sign_in",
        "locale": "en-US", "channels": ["sms"],
        "targets": [{"phone": {"number": format!("+1415555{:04}", n % 10_000)}}],
    })
    .to_string()
    .into_bytes()
}

/// Names of one round's topology (as the gateway's configuration would give them).
fn topology(prefix: &str) -> AmqpConfig {
    let mut amqp = Config::load(None)
        .expect("the embedded defaults are valid")
        .amqp;
    amqp.jobs_exchange = format!("{prefix}.jobs");
    amqp.jobs_queue = format!("{prefix}.send-code");
    amqp.dead_letter_exchange = format!("{prefix}.dead");
    amqp.dead_letter_queue = format!("{prefix}.send-code.dead");
    amqp.events_exchange = format!("{prefix}.events");
    amqp
}

/// Publishes `jobs` bodies to the jobs exchange of `topology`, persistent, confirmed.
async fn prefill(
    channel: &Channel,
    topology: &Topology,
    label: &str,
    jobs: usize,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut pending = Vec::with_capacity(1000);
    for n in 0..jobs {
        let confirm = channel
            .basic_publish(
                topology.jobs_exchange.as_str().into(),
                topology.jobs_routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &job_body(label, n),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await?;
        pending.push(confirm);
        if pending.len() == 1000 {
            for confirm in pending.drain(..) {
                confirm.await?;
            }
            progress(&format!("{label}: filling the queue"), n + 1, jobs, started);
        }
    }
    for confirm in pending {
        confirm.await?;
    }
    Ok(())
}

fn progress(what: &str, done: usize, total: usize, started: Instant) {
    let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
    eprint!("\r{what}: {done}/{total} ({rate:.0}/s)        ");
}

async fn remove(channel: &Channel, topology: &Topology, extra_queues: &[&str]) {
    for queue in [&topology.jobs_queue, &topology.dead_letter_queue]
        .into_iter()
        .map(String::as_str)
        .chain(extra_queues.iter().copied())
    {
        let _ = channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in [
        &topology.jobs_exchange,
        &topology.dead_letter_exchange,
        &topology.events_exchange,
    ] {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

/// A bare lapin consumer on a queue declared exactly like the gateway's: it only acks.
async fn baseline_round(
    args: &Args,
    connection: &Connection,
    channel: &Channel,
    id: &str,
    round: usize,
) -> anyhow::Result<Round> {
    let label = format!("baseline {round}/{}", args.rounds);
    let topology = Topology::from(&topology(&format!("bench.base.{id}")));
    topology.declare(channel).await?;
    prefill(channel, &topology, &label, args.jobs).await?;
    let consumer_channel = connection.create_channel().await?;
    consumer_channel
        .basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let started = Instant::now();
    let mut consumer = consumer_channel
        .basic_consume(
            topology.jobs_queue.as_str().into(),
            "otp-bench-baseline".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut done = 0;
    while done < args.jobs {
        let delivery = consumer
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("the baseline consumer was cancelled"))??;
        delivery.ack(BasicAckOptions::default()).await?;
        done += 1;
        if done % 1000 == 0 {
            progress(&label, done, args.jobs, started);
        }
    }
    let elapsed = started.elapsed();
    eprintln!();
    let _ = consumer_channel.close(200, "done".into()).await;
    remove(channel, &topology, &[]).await;
    Ok(Round {
        jobs_per_sec: args.jobs as f64 / elapsed.as_secs_f64(),
        peak_rss_kib: None,
    })
}

/// The gateway as its own process on a pre-filled queue, timed from when it starts consuming
/// to the last job's event (published just before its ack).
async fn service_round(
    args: &Args,
    connection: &Connection,
    channel: &Channel,
    id: &str,
    round: usize,
) -> anyhow::Result<Round> {
    let label = format!("gateway {round}/{}", args.rounds);
    let amqp = topology(&format!("bench.gw.{id}"));
    let topology = Topology::from(&amqp);
    topology.declare(channel).await?;
    let events_queue = format!("bench.gw.{id}.events");
    channel
        .queue_declare(
            events_queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            events_queue.as_str().into(),
            topology.events_exchange.as_str().into(),
            "delivery.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    prefill(channel, &topology, &label, args.jobs).await?;

    let dir = tempfile_dir(id)?;
    let mut child = ServiceProcess(
        Command::new(std::env::current_exe()?)
            .arg("--serve")
            .envs(service_env(args, &amqp, &dir))
            .stdin(Stdio::null())
            .spawn()?,
    );
    let pid = child.0.id();

    let events_channel = connection.create_channel().await?;
    events_channel
        .basic_qos(1000, BasicQosOptions::default())
        .await?;
    let mut events = events_channel
        .basic_consume(
            events_queue.as_str().into(),
            "otp-bench-events".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    // The clock starts when the gateway's consumer is attached.
    let started = loop {
        let queue = channel
            .queue_declare(
                topology.jobs_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        if queue.consumer_count() > 0 {
            break Instant::now();
        }
        if let Some(status) = child.0.try_wait()? {
            anyhow::bail!("the gateway exited before consuming: {status}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let mut done = 0;
    let mut failed = 0;
    while done < args.jobs {
        let event = tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .map_err(|_| anyhow::anyhow!("no event for 60 s after {done} jobs"))?
            .ok_or_else(|| anyhow::anyhow!("the events consumer was cancelled"))??;
        if event.routing_key.as_str() != "delivery.sent" {
            failed += 1;
        }
        done += 1;
        if done % 500 == 0 {
            progress(&label, done, args.jobs, started);
        }
    }
    let elapsed = started.elapsed();
    eprintln!();
    let peak_rss_kib = peak_rss_kib(pid);
    if failed > 0 {
        eprintln!("warning: {failed} jobs did not end SENT");
    }
    // SIGTERM, as an operator stops it.
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let _ = tokio::task::spawn_blocking(move || child.0.wait()).await;
    let _ = events_channel.close(200, "done".into()).await;
    remove(channel, &topology, &[&events_queue]).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Round {
        jobs_per_sec: args.jobs as f64 / elapsed.as_secs_f64(),
        peak_rss_kib,
    })
}

fn tempfile_dir(id: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("otp-bench-{id}"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The gateway's configuration for a service round, as environment variables.
fn service_env(args: &Args, amqp: &AmqpConfig, dir: &Path) -> Vec<(String, String)> {
    [
        ("AMQP__URL", args.amqp.clone()),
        ("AMQP__PREFETCH", args.prefetch.to_string()),
        ("AMQP__JOBS_EXCHANGE", amqp.jobs_exchange.clone()),
        ("AMQP__JOBS_QUEUE", amqp.jobs_queue.clone()),
        (
            "AMQP__DEAD_LETTER_EXCHANGE",
            amqp.dead_letter_exchange.clone(),
        ),
        ("AMQP__DEAD_LETTER_QUEUE", amqp.dead_letter_queue.clone()),
        ("AMQP__EVENTS_EXCHANGE", amqp.events_exchange.clone()),
        ("DELIVERY__MAX_IN_FLIGHT", args.max_in_flight.to_string()),
        ("GRPC__LISTEN", "127.0.0.1:0".into()),
        ("RECEIPTS__LISTEN", "127.0.0.1:0".into()),
        (
            "STORE__URL",
            format!("sqlite://{}/ledger.db", dir.display()),
        ),
        (
            "PROVIDERS__SANDBOX__OUTBOX",
            dir.join("outbox.jsonl").display().to_string(),
        ),
        ("LOG__LEVEL", "warn".into()),
    ]
    .into_iter()
    .map(|(key, value)| (format!("OTP_GATEWAY_{key}"), value))
    .collect()
}

/// The process's peak resident set (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}
