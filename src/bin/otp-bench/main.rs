//! otp-bench: sizes the gateway the way an operator would, against a bare RabbitMQ consumer in
//! the same run, on the same broker, quorum queue, durability, prefetch and message size.
//!
//! - overhead: baseline rounds (a lapin consumer that only acks) and gateway rounds (its own
//!   process, full path: decode, ledger with fsync, policy, plan, sandbox provider, attempt
//!   records, event, ack) alternate, each draining a pre-filled queue; medians and the ratio.
//! - realistic: the gateway drains a pre-filled queue through a local provider with log-normal
//!   latency, 5xx answers and hangs; throughput against the Little's-law bound.
//! - latency: open-loop publishing at a fixed rate (each job stamped with its scheduled time),
//!   bare consumer and gateway rounds alternated; publish -> provider call and publish -> ack,
//!   p50 and p99 per round and their medians.
//! - grpc: `SendCode` at a fixed rate, p50 and p99.
//! - memory: the gateway's resident set with thousands of jobs in flight.
//! - smpp: the same drain through one SMPP bind (window 256, enquire_link at its default) to a
//!   local SMSC that answers at once and sends its DELIVRD receipt right after, against the
//!   sandbox drain of the same run; rounds alternated, medians and the ratio.
//!
//! `BENCHMARKS.md` has the results and what limits them.

mod gateway;
mod provider;
mod smsc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use otp_gateway::config::{AmqpConfig, Config, DEFAULT_MAX_CONCURRENT_CALLS};
use otp_gateway::proto::v1;
use otp_gateway::queue::Topology;

use gateway::{GatewayProcess, GatewaySetup, SmsProvider};
use provider::Behaviour;

/// The realistic provider: log-normal latency with this median and 99th percentile...
const REALISTIC_MEDIAN: Duration = Duration::from_millis(200);
const REALISTIC_P99: Duration = Duration::from_millis(1500);
/// ...this share of HTTP 503 answers...
const REALISTIC_ERRORS: f64 = 0.02;
/// ...and this share of requests that hang until the gateway's provider timeout.
const REALISTIC_HANGS: f64 = 0.005;
/// The gateway's provider timeout in the realistic run.
const REALISTIC_TIMEOUT: Duration = Duration::from_secs(5);
/// The header each open-loop job carries: its scheduled publish time, in microseconds since
/// the Unix epoch.
const SCHEDULED_HEADER: &str = "x-bench-scheduled-at-us";

/// Measures the gateway against a bare consumer (see BENCHMARKS.md).
#[derive(Parser, Debug)]
#[command(name = "otp-bench", version)]
struct Args {
    /// Jobs in the pre-filled queue of each draining round (overhead and realistic).
    #[arg(long, default_value_t = 50_000)]
    jobs: usize,
    /// Overhead and latency rounds of each side, alternated baseline, gateway, baseline, ...
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
    /// Jobs per second published in the latency runs.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds of publishing in each latency run.
    #[arg(long, default_value_t = 20)]
    latency_secs: u32,
    /// `SendCode` calls per second in the gRPC run.
    #[arg(long, default_value_t = 500)]
    grpc_rate: u32,
    /// Seconds of calls in the gRPC run.
    #[arg(long, default_value_t = 10)]
    grpc_secs: u32,
    /// Jobs held in flight at once in the memory probe.
    #[arg(long, default_value_t = 5000)]
    in_flight: u16,
    /// Jobs in the pre-filled queue of each smpp-part round (SMPP and sandbox alike).
    #[arg(long, default_value_t = 20_000)]
    smpp_jobs: usize,
    /// Only these parts (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
    /// Internal: run the gateway on this configuration (the bench starts it so).
    #[arg(long, hide = true, value_name = "CONFIG")]
    serve: Option<PathBuf>,
}

/// The parts of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Overhead,
    Realistic,
    Latency,
    Grpc,
    Memory,
    Smpp,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let result = match &args.serve {
        Some(config) => runtime.block_on(gateway::serve(config)),
        None => {
            // The bench's own broker client: its errors (a lost connection) say why a part stopped.
            otp_gateway::telemetry::init(otp_gateway::config::LogFormat::Text, "lapin=error");
            runtime.block_on(run(args))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("otp-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The broker connection and the run's settings.
struct Bench {
    args: Args,
    connection: Connection,
    /// Declarations and confirmed publishes.
    channel: Channel,
    run: u32,
}

impl Bench {
    fn wants(&self, part: Part) -> bool {
        self.args.only.is_empty() || self.args.only.contains(&part)
    }

    /// A round's names: `bench.<what>.<pid>-<n>`.
    fn prefix(&self, what: &str, n: usize) -> String {
        format!("bench.{what}.{}-{n}", self.run)
    }

    fn setup<'a>(&'a self, amqp: &'a AmqpConfig, provider: SmsProvider) -> GatewaySetup<'a> {
        GatewaySetup {
            amqp_url: &self.args.amqp,
            amqp,
            prefetch: self.args.prefetch,
            max_in_flight: self.args.max_in_flight,
            provider,
            provider_timeout: Duration::from_secs(10),
            max_concurrent_calls: None,
            grpc_port: 0,
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.rounds >= 1 && args.jobs >= 1 && args.rate >= 1 && args.grpc_rate >= 1,
        "--rounds, --jobs, --rate and --grpc-rate must be at least 1"
    );
    let connection = Connection::connect(&args.amqp, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    println!(
        "otp-bench: {} jobs per draining round, {} overhead and latency rounds per side, prefetch {}, max_in_flight {}, job body {} bytes, {} cores",
        args.jobs,
        args.rounds,
        args.prefetch,
        args.max_in_flight,
        job_body("size", 0).len(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let bench = Bench {
        args,
        connection,
        channel,
        run: std::process::id(),
    };
    if bench.wants(Part::Overhead) {
        overhead(&bench).await?;
    }
    if bench.wants(Part::Realistic) {
        realistic(&bench).await?;
    }
    if bench.wants(Part::Latency) {
        latency(&bench).await?;
    }
    if bench.wants(Part::Grpc) {
        grpc(&bench).await?;
    }
    if bench.wants(Part::Memory) {
        memory(&bench).await?;
    }
    if bench.wants(Part::Smpp) {
        smpp(&bench).await?;
    }

    bench.connection.close(200, "done".into()).await?;
    Ok(())
}

/// Per-round figures, rounded, comma-separated.
fn each(rates: &[f64]) -> String {
    rates
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("unknown".into(), |kib| {
        format!("{:.1} MiB", kib as f64 / 1024.0)
    })
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// The `p` quantile (0..=1) of `samples`, nearest rank.
fn quantile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

// ---------------------------------------------------------------------------------------------
// overhead: bare consumer vs gateway with the sandbox provider, alternated

async fn overhead(bench: &Bench) -> anyhow::Result<()> {
    let rounds = bench.args.rounds;
    let mut baseline = Vec::new();
    let mut service = Vec::new();
    let mut floor = Vec::new();
    let mut cpu_per_job = Vec::new();
    let mut rss = None;
    for round in 1..=rounds {
        baseline.push(baseline_round(bench, round).await?);
        floor.push(floor_round(bench, round).await?);
        let label = format!("gateway {round}/{rounds}");
        let amqp = topology(&bench.prefix("gw", round));
        let drained = drain(
            bench,
            &label,
            &amqp,
            bench.setup(&amqp, SmsProvider::Sandbox),
        )
        .await?;
        rss = rss.max(drained.peak_rss_kib);
        service.push(drained.jobs_per_sec);
        if let Some(cpu) = drained.cpu_per_job {
            cpu_per_job.push(cpu.as_secs_f64() * 1e6);
        }
    }
    let (base, svc) = (median(&baseline), median(&service));
    println!("\n## overhead (sandbox provider, 0 ms)\n");
    println!("| side | rounds (jobs/s) | median (jobs/s) |");
    println!("|---|---|---|");
    println!("| bare consumer | {} | {base:.0} |", each(&baseline));
    println!("| gateway | {} | {svc:.0} |", each(&service));
    println!(
        "| broker floor (reference: acks and publishes one confirmed event per job, nothing else) | {} | {:.0} |",
        each(&floor),
        median(&floor)
    );
    println!(
        "\ngateway / bare consumer = {:.3} (target >= 0.5); gateway / broker floor = {:.3}; gateway CPU per job {} µs (rounds: {}); gateway peak RSS {}",
        svc / base,
        svc / median(&floor),
        if cpu_per_job.is_empty() {
            "unknown".to_owned()
        } else {
            format!("{:.0}", median(&cpu_per_job))
        },
        each(&cpu_per_job),
        mib(rss)
    );
    Ok(())
}

/// A bare lapin consumer on a queue declared exactly like the gateway's: it only acks.
async fn baseline_round(bench: &Bench, round: usize) -> anyhow::Result<f64> {
    let args = &bench.args;
    let label = format!("baseline {round}/{}", args.rounds);
    let topology = Topology::from(&topology(&bench.prefix("base", round)));
    topology.declare(&bench.channel).await?;
    prefill(&bench.channel, &topology, &label, args.jobs).await?;
    let started = Instant::now();
    let (consumer_channel, mut consumer) =
        bare_consumer(bench, &topology, "otp-bench-baseline").await?;
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
    remove(&bench.channel, &topology, &[]).await;
    Ok(args.jobs as f64 / elapsed.as_secs_f64())
}

/// The bare consumer's channel (with the gateway's prefetch) and its consumer on the jobs
/// queue of `topology`.
async fn bare_consumer(
    bench: &Bench,
    topology: &Topology,
    tag: &str,
) -> anyhow::Result<(Channel, lapin::Consumer)> {
    let channel = bench.connection.create_channel().await?;
    channel
        .basic_qos(bench.args.prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            topology.jobs_queue.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

/// What a gateway drain measured.
struct Drained {
    jobs_per_sec: f64,
    /// The gateway's CPU time per job (every thread, user and system).
    cpu_per_job: Option<Duration>,
    /// Between 5 % and 95 % of the jobs done: without the start and the drain's tail.
    steady_jobs_per_sec: f64,
    peak_rss_kib: Option<u64>,
    elapsed: Duration,
    not_sent: usize,
}

/// The gateway on a pre-filled queue, timed from when it starts consuming to the last job's
/// event (published just before its ack).
async fn drain(
    bench: &Bench,
    label: &str,
    amqp: &AmqpConfig,
    setup: GatewaySetup<'_>,
) -> anyhow::Result<Drained> {
    drain_jobs(bench, label, amqp, setup, bench.args.jobs).await
}

/// [`drain`] with `jobs` in the queue.
async fn drain_jobs(
    bench: &Bench,
    label: &str,
    amqp: &AmqpConfig,
    setup: GatewaySetup<'_>,
    jobs: usize,
) -> anyhow::Result<Drained> {
    let topology = Topology::from(amqp);
    topology.declare(&bench.channel).await?;
    let events = events_queue(&bench.channel, &topology).await?;
    prefill(&bench.channel, &topology, label, jobs).await?;
    let mut gateway = GatewayProcess::start(
        &setup,
        &format!("{}-{label}", bench.run).replace(['/', ' '], "-"),
    )?;
    let mut seen = EventWatch::start(&bench.connection, &events).await?;
    let started = gateway
        .consuming(&bench.channel, &topology.jobs_queue)
        .await?;
    let cpu_before = gateway.cpu_time();
    seen.wait(jobs, label, started).await?;
    let elapsed = started.elapsed();
    let cpu_per_job = gateway
        .cpu_time()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before) / jobs as u32);
    let peak_rss_kib = gateway.peak_rss_kib();
    gateway.stop().await;
    seen.close().await;
    remove(&bench.channel, &topology, &[&events]).await;
    if seen.not_sent > 0 {
        eprintln!(
            "warning: {} jobs did not end SENT or DELIVERED",
            seen.not_sent
        );
    }
    let steady_jobs_per_sec = match seen.marks {
        [Some(from), Some(to)] if to > from => {
            (jobs - 2 * (jobs / 20)) as f64 / (to - from).as_secs_f64()
        }
        _ => jobs as f64 / elapsed.as_secs_f64(),
    };
    Ok(Drained {
        jobs_per_sec: jobs as f64 / elapsed.as_secs_f64(),
        cpu_per_job,
        steady_jobs_per_sec,
        peak_rss_kib,
        elapsed,
        not_sent: seen.not_sent,
    })
}

// ---------------------------------------------------------------------------------------------
// smpp: one bind to a local SMSC against the sandbox, same queue size, rounds alternated

async fn smpp(bench: &Bench) -> anyhow::Result<()> {
    let (rounds, jobs) = (bench.args.rounds, bench.args.smpp_jobs);
    let smsc = smsc::start().await?;
    let (mut sandbox, mut bind, mut not_delivered) = (Vec::new(), Vec::new(), 0);
    let (mut sandbox_cpu, mut bind_cpu) = (Vec::new(), Vec::new());
    let micros = |cpu: Option<Duration>| cpu.map(|c| c.as_secs_f64() * 1e6);
    for round in 1..=rounds {
        let label = format!("smpp sandbox {round}/{rounds}");
        let amqp = topology(&bench.prefix("smpp-sandbox", round));
        let drained = drain_jobs(
            bench,
            &label,
            &amqp,
            bench.setup(&amqp, SmsProvider::Sandbox),
            jobs,
        )
        .await?;
        sandbox.push(drained.jobs_per_sec);
        sandbox_cpu.extend(micros(drained.cpu_per_job));
        let label = format!("smpp bind {round}/{rounds}");
        let amqp = topology(&bench.prefix("smpp-bind", round));
        let before = smsc.submits();
        let drained = drain_jobs(
            bench,
            &label,
            &amqp,
            bench.setup(&amqp, SmsProvider::Smpp(smsc.addr)),
            jobs,
        )
        .await?;
        anyhow::ensure!(
            smsc.submits() - before == jobs as u64,
            "the SMSC got {} submit_sm for {jobs} jobs",
            smsc.submits() - before
        );
        not_delivered += drained.not_sent;
        bind.push(drained.jobs_per_sec);
        bind_cpu.extend(micros(drained.cpu_per_job));
    }
    let (base, smpp) = (median(&sandbox), median(&bind));
    println!(
        "\n## smpp (one bind: window {}, throughput cap {:.0}/s, enquire_link every 30 s; the SMSC answers at once and sends DELIVRD receipts)\n",
        gateway::SMPP_WINDOW,
        gateway::SMPP_THROUGHPUT
    );
    let cpu = |samples: &[f64]| {
        if samples.is_empty() {
            "unknown".to_owned()
        } else {
            format!("{:.0}", median(samples))
        }
    };
    println!(
        "| side | rounds of {jobs} jobs (jobs/s) | median (jobs/s) | gateway CPU per job (µs, median) |"
    );
    println!("|---|---|---|---|");
    println!(
        "| sandbox | {} | {base:.0} | {} |",
        each(&sandbox),
        cpu(&sandbox_cpu)
    );
    println!(
        "| SMPP bind | {} | {smpp:.0} | {} |",
        each(&bind),
        cpu(&bind_cpu)
    );
    println!(
        "\nSMPP / sandbox = {:.3} (target >= 0.8); jobs not SENT or DELIVERED: {not_delivered}",
        smpp / base
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// realistic: a provider with log-normal latency, errors and hangs, against Little's law

async fn realistic(bench: &Bench) -> anyhow::Result<()> {
    let server = provider::start(
        Behaviour::Realistic {
            median: REALISTIC_MEDIAN,
            p99: REALISTIC_P99,
            error_share: REALISTIC_ERRORS,
            hang_share: REALISTIC_HANGS,
            timeout: REALISTIC_TIMEOUT,
        },
        false,
    )
    .await?;
    let amqp = topology(&bench.prefix("real", 1));
    let mut setup = bench.setup(&amqp, SmsProvider::Http(server.addr));
    setup.provider_timeout = REALISTIC_TIMEOUT;
    let drained = drain(bench, "realistic", &amqp, setup).await?;
    let stats = &server.stats;
    let jobs = bench.args.jobs as f64;
    let in_flight = bench.args.max_in_flight as f64;
    // What each job kept a slot busy for at the provider, as measured there (retries included).
    let provider_time_per_job = stats.busy().as_secs_f64() / jobs;
    let bound = in_flight / provider_time_per_job;
    let designed_mean = provider::log_normal_mean(REALISTIC_MEDIAN, REALISTIC_P99).as_secs_f64()
        * (1.0 - REALISTIC_HANGS)
        + REALISTIC_TIMEOUT.as_secs_f64() * REALISTIC_HANGS;
    println!(
        "\n## realistic (log-normal median {} p99 {}, {:.1} % 503, {:.1} % hang until the {} s timeout)\n",
        ms(REALISTIC_MEDIAN),
        ms(REALISTIC_P99),
        REALISTIC_ERRORS * 100.0,
        REALISTIC_HANGS * 100.0,
        REALISTIC_TIMEOUT.as_secs()
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| jobs | {} in {:.1} s |",
        bench.args.jobs,
        drained.elapsed.as_secs_f64()
    );
    println!(
        "| throughput | {:.0} jobs/s overall; {:.0} jobs/s steady (5 % to 95 % of the jobs) |",
        drained.jobs_per_sec, drained.steady_jobs_per_sec
    );
    println!(
        "| provider requests | {} ({} answered 503, {} hung) |",
        stats.requests(),
        stats.failed(),
        stats.hung()
    );
    println!(
        "| provider time per job | {:.1} ms (per request {:.1} ms; designed mean {:.1} ms) |",
        provider_time_per_job * 1000.0,
        stats.busy().as_secs_f64() * 1000.0 / stats.requests().max(1) as f64,
        designed_mean * 1000.0
    );
    println!(
        "| Little's-law bound | {bound:.0} jobs/s (max_in_flight {} / provider time per job) |",
        bench.args.max_in_flight
    );
    println!(
        "| throughput / bound | {:.3} overall, {:.3} steady (target >= 0.9) |",
        drained.jobs_per_sec / bound,
        drained.steady_jobs_per_sec / bound
    );
    println!("| jobs not SENT | {} |", drained.not_sent);
    println!("| gateway peak RSS | {} |", mib(drained.peak_rss_kib));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// latency: open-loop publishing at a fixed rate

/// A round's p50 and p99.
type Quantiles = (Duration, Duration);

async fn latency(bench: &Bench) -> anyhow::Result<()> {
    let count = (bench.args.rate * bench.args.latency_secs) as usize;
    let rounds = bench.args.rounds;
    // Per round: (p50, p99) of bare delivered, gateway provider call, gateway ack.
    let (mut bare, mut call, mut ack) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let mut base = baseline_latency(bench, count, round).await?;
        bare.push((quantile(&mut base, 0.5), quantile(&mut base, 0.99)));
        let (mut calls, mut acks) = gateway_latency(bench, count, round).await?;
        call.push((quantile(&mut calls, 0.5), quantile(&mut calls, 0.99)));
        ack.push((quantile(&mut acks, 0.5), quantile(&mut acks, 0.99)));
    }
    println!(
        "\n## latency (open loop, {} jobs/s for {} s per round, bare consumer and gateway alternated, {rounds} rounds each; from each job's scheduled publish time; each round's first second is warm-up, left out)\n",
        bench.args.rate, bench.args.latency_secs
    );
    let rows = |pairs: &[Quantiles], pick: fn(&Quantiles) -> Duration| {
        pairs
            .iter()
            .map(|pair| ms(pick(pair)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let med = |pairs: &[Quantiles], pick: fn(&Quantiles) -> Duration| {
        quantile(&mut pairs.iter().map(pick).collect::<Vec<_>>(), 0.5)
    };
    let p50 = |pair: &Quantiles| pair.0;
    let p99 = |pair: &Quantiles| pair.1;
    let bare_p99 = med(&bare, p99);
    println!(
        "| path | p50 per round | p99 per round | median p50 | median p99 | added p99 (medians, vs bare consumer) |"
    );
    println!("|---|---|---|---|---|---|");
    for (path, pairs, gateway) in [
        ("bare consumer: publish -> delivered", &bare, false),
        ("gateway: publish -> provider call", &call, true),
        ("gateway: publish -> ack (event)", &ack, true),
    ] {
        let added = if gateway {
            ms(med(pairs, p99).saturating_sub(bare_p99))
        } else {
            "-".to_owned()
        };
        println!(
            "| {path} | {} | {} | {} | {} | {added} |",
            rows(pairs, p50),
            rows(pairs, p99),
            ms(med(pairs, p50)),
            ms(med(pairs, p99)),
        );
    }
    println!("\ntarget: added p99 <= 5 ms at 1,000 jobs/s");
    Ok(())
}

/// The bare consumer under open-loop load: publish -> delivered, from the scheduled time in
/// each message's header.
async fn baseline_latency(
    bench: &Bench,
    count: usize,
    round: usize,
) -> anyhow::Result<Vec<Duration>> {
    let label = format!("latency {round}/{}: bare consumer", bench.args.rounds);
    let topology = Topology::from(&topology(&bench.prefix("lat-base", round)));
    topology.declare(&bench.channel).await?;
    let (consumer_channel, mut consumer) =
        bare_consumer(bench, &topology, "otp-bench-latency").await?;
    let warm_up = bench.args.rate as usize;
    let consumed = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(count);
        let mut received = 0;
        while received < count {
            let Some(Ok(delivery)) = consumer.next().await else {
                break;
            };
            received += 1;
            let job = serde_json::from_slice::<serde_json::Value>(&delivery.data)
                .ok()
                .and_then(|body| body.get("job_id")?.as_str().and_then(provider::job_index));
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let scheduled = delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(SCHEDULED_HEADER).cloned());
            if let Some(AMQPValue::LongLongInt(us)) = scheduled
                && job.is_some_and(|job| job >= warm_up)
            {
                latencies.push(now.saturating_sub(Duration::from_micros(us as u64)));
            }
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        latencies
    });
    open_loop(bench, &topology, &label, count).await?;
    let latencies = tokio::time::timeout(Duration::from_secs(60), consumed)
        .await
        .map_err(|_| anyhow::anyhow!("the bare consumer did not get every job"))??;
    eprintln!();
    let _ = consumer_channel.close(200, "done".into()).await;
    remove(&bench.channel, &topology, &[]).await;
    Ok(latencies)
}

/// The gateway under open-loop load, with a provider that answers at once: publish -> first
/// provider call and publish -> event (published just before the ack).
async fn gateway_latency(
    bench: &Bench,
    count: usize,
    round: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let label = format!("latency {round}/{}: gateway", bench.args.rounds);
    let server = provider::start(Behaviour::Instant, true).await?;
    let amqp = topology(&bench.prefix("lat-gw", round));
    let topology = Topology::from(&amqp);
    topology.declare(&bench.channel).await?;
    let events = events_queue(&bench.channel, &topology).await?;
    let mut gateway = GatewayProcess::start(
        &bench.setup(&amqp, SmsProvider::Http(server.addr)),
        &format!("{}-latency-{round}", bench.run),
    )?;
    let mut seen = EventWatch::start(&bench.connection, &events).await?;
    seen.record = true;
    let started = gateway
        .consuming(&bench.channel, &topology.jobs_queue)
        .await?;
    // Events are taken as they come, while the jobs are being published.
    let events_label = format!("{label} events");
    let watching = tokio::spawn(async move {
        seen.wait(count, &events_label, started)
            .await
            .map(|()| seen)
    });
    let schedule = open_loop(bench, &topology, &label, count).await?;
    let mut seen = watching.await??;
    gateway.stop().await;
    seen.close().await;
    remove(&bench.channel, &topology, &[&events]).await;
    let warm_up = bench.args.rate as usize;
    let since_schedule = |arrivals: Vec<(usize, Instant)>| {
        arrivals
            .into_iter()
            .filter(|&(job, _)| job >= warm_up)
            .map(|(job, at)| at.saturating_duration_since(schedule.at(job)))
            .collect::<Vec<_>>()
    };
    let calls = since_schedule(server.stats.arrivals());
    let acks = since_schedule(std::mem::take(&mut seen.arrivals));
    anyhow::ensure!(
        calls.len() >= count - warm_up,
        "the provider saw {} of {count} jobs",
        calls.len() + warm_up
    );
    Ok((calls, acks))
}

/// When each open-loop job was due.
struct Schedule {
    start: Instant,
    interval: Duration,
}

impl Schedule {
    fn at(&self, job: usize) -> Instant {
        self.start + self.interval * job as u32
    }
}

/// Publishes `count` jobs at `--rate` per second on a fixed schedule, whatever the broker or
/// consumer do (open loop: a late publish is measured from when it was due), each stamped
/// with its due time in [`SCHEDULED_HEADER`].
async fn open_loop(
    bench: &Bench,
    topology: &Topology,
    label: &str,
    count: usize,
) -> anyhow::Result<Schedule> {
    let channel = bench.connection.create_channel().await?;
    let interval = Duration::from_secs(1) / bench.args.rate;
    let start = Instant::now() + Duration::from_millis(100);
    let wall_start = SystemTime::now().duration_since(UNIX_EPOCH)? + Duration::from_millis(100);
    let schedule = Schedule { start, interval };
    for n in 0..count {
        tokio::time::sleep_until(schedule.at(n).into()).await;
        let due = wall_start + interval * n as u32;
        let mut headers = FieldTable::default();
        headers.insert(
            SCHEDULED_HEADER.into(),
            AMQPValue::LongLongInt(due.as_micros() as i64),
        );
        channel
            .basic_publish(
                topology.jobs_exchange.as_str().into(),
                topology.jobs_routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &job_body(label, n),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_headers(headers),
            )
            .await?;
        if (n + 1) % 1000 == 0 {
            progress(label, n + 1, count, start);
        }
    }
    let _ = channel.close(200, "done".into()).await;
    Ok(schedule)
}

// ---------------------------------------------------------------------------------------------
// grpc: SendCode at a fixed rate

async fn grpc(bench: &Bench) -> anyhow::Result<()> {
    let amqp = topology(&bench.prefix("grpc", 1));
    let topology = Topology::from(&amqp);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut setup = bench.setup(&amqp, SmsProvider::Sandbox);
    setup.grpc_port = port;
    topology.declare(&bench.channel).await?;
    let mut gateway = GatewayProcess::start(&setup, &format!("{}-grpc", bench.run))?;
    gateway
        .consuming(&bench.channel, &topology.jobs_queue)
        .await?;
    let client = loop {
        match v1::code_delivery_client::CodeDeliveryClient::connect(format!(
            "http://127.0.0.1:{port}"
        ))
        .await
        {
            Ok(client) => break client,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let count = (bench.args.grpc_rate * bench.args.grpc_secs) as usize;
    let interval = Duration::from_secs(1) / bench.args.grpc_rate;
    let start = Instant::now() + Duration::from_millis(100);
    let mut calls = Vec::with_capacity(count);
    for n in 0..count {
        let due = start + interval * n as u32;
        tokio::time::sleep_until(due.into()).await;
        let mut client = client.clone();
        let job = grpc_job(n);
        calls.push(tokio::spawn(async move {
            let sent = client
                .send_code(v1::SendCodeRequest { job: Some(job) })
                .await;
            (sent.is_ok(), due.elapsed())
        }));
        if (n + 1) % 500 == 0 {
            progress("grpc: SendCode", n + 1, count, start);
        }
    }
    let mut latencies = Vec::with_capacity(count);
    let mut failed = 0;
    let warm_up = bench.args.grpc_rate as usize;
    for (n, call) in calls.into_iter().enumerate() {
        let (ok, latency) = call.await?;
        if !ok {
            failed += 1;
        } else if n >= warm_up {
            latencies.push(latency);
        }
    }
    eprintln!();
    let peak = gateway.peak_rss_kib();
    gateway.stop().await;
    remove(&bench.channel, &topology, &[]).await;
    println!(
        "\n## gRPC SendCode (open loop, {} calls/s for {} s, first second left out; accepted = ledger commit + confirmed publish)\n",
        bench.args.grpc_rate, bench.args.grpc_secs
    );
    println!("| calls | failed | p50 | p99 | gateway peak RSS |");
    println!("|---|---|---|---|---|");
    let (p50, p99) = (
        quantile(&mut latencies, 0.5),
        quantile(&mut latencies, 0.99),
    );
    println!(
        "| {count} | {failed} | {} | {} | {} |",
        ms(p50),
        ms(p99),
        mib(peak)
    );
    Ok(())
}

fn grpc_job(n: usize) -> v1::SendCodeJob {
    v1::SendCodeJob {
        job_id: format!("grpc-{n:07}"),
        tenant: "bench".into(),
        account: format!("user-{n}"),
        code: "482913".into(),
        expires_at: Some(otp_gateway::proto::timestamp_to_proto(
            jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1),
        )),
        purpose: "sign_in".into(),
        targets: vec![v1::Target {
            kind: Some(v1::target::Kind::Phone(v1::PhoneTarget {
                number: format!("+1415555{:04}", n % 10_000),
            })),
        }],
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// memory: resident set with thousands of jobs in flight

async fn memory(bench: &Bench) -> anyhow::Result<()> {
    let jobs = bench.args.in_flight as usize;
    let mut rows = Vec::new();
    // The provider's default call limit, then one high enough for every job to be at the
    // provider at once (over HTTP/1.1: one connection each).
    for limit in [None, Some(jobs)] {
        rows.push((limit, memory_round(bench, jobs, limit).await?));
    }
    println!(
        "\n## memory ({jobs} jobs, every provider call held {} s)\n",
        MEMORY_HOLD.as_secs()
    );
    println!(
        "| provider max_concurrent_calls | jobs held by the gateway | calls open at the provider | gateway RSS (sampled max) | gateway peak RSS (VmHWM) |"
    );
    println!("|---|---|---|---|---|");
    for (limit, held) in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            limit.map_or("default".to_owned(), |l| l.to_string()),
            held.jobs,
            held.calls,
            mib(Some(held.rss_kib)),
            mib(held.peak_rss_kib)
        );
    }
    println!("\ntarget: <= 150 MiB with 5,000 jobs in flight");
    Ok(())
}

/// How long the provider holds every call in the memory rounds.
const MEMORY_HOLD: Duration = Duration::from_secs(60);

/// What a memory round saw once every job was in the gateway.
struct Held {
    /// Jobs delivered to the gateway and not acked (none can be: every call is held).
    jobs: usize,
    /// Calls open at the provider.
    calls: usize,
    rss_kib: u64,
    peak_rss_kib: Option<u64>,
}

/// `jobs` jobs through a provider that holds every call: the gateway's RSS once the broker has
/// handed it every job and the provider's open calls stopped growing.
async fn memory_round(
    bench: &Bench,
    jobs: usize,
    max_concurrent_calls: Option<usize>,
) -> anyhow::Result<Held> {
    let server = provider::start(Behaviour::Hold(MEMORY_HOLD), false).await?;
    let label = format!("memory-{}", max_concurrent_calls.unwrap_or(0));
    let amqp = topology(&bench.prefix(&label, 1));
    let topology = Topology::from(&amqp);
    topology.declare(&bench.channel).await?;
    prefill(&bench.channel, &topology, &label, jobs).await?;
    let mut setup = bench.setup(&amqp, SmsProvider::Http(server.addr));
    setup.prefetch = u16::try_from(jobs).unwrap_or(u16::MAX);
    setup.max_in_flight = jobs;
    setup.max_concurrent_calls = max_concurrent_calls;
    setup.provider_timeout = MEMORY_HOLD + Duration::from_secs(30);
    let mut gateway = GatewayProcess::start(&setup, &format!("{}-{label}", bench.run))?;
    let started = gateway
        .consuming(&bench.channel, &topology.jobs_queue)
        .await?;
    let limit = max_concurrent_calls.unwrap_or(DEFAULT_MAX_CONCURRENT_CALLS as usize);
    let expected_calls = limit.min(jobs);
    let mut rss = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss = rss.max(gateway.rss_kib().unwrap_or(0));
        let ready = queue_state(&bench.channel, &topology.jobs_queue)
            .await?
            .message_count();
        let open = server.stats.in_flight();
        progress(
            &format!("{label}: calls open at the provider"),
            open,
            expected_calls,
            started,
        );
        if (ready == 0 && open >= expected_calls) || started.elapsed() > MEMORY_HOLD / 2 {
            break;
        }
    }
    // Let it settle with everything in flight.
    tokio::time::sleep(Duration::from_secs(2)).await;
    rss = rss.max(gateway.rss_kib().unwrap_or(0));
    let held = Held {
        jobs: jobs
            - queue_state(&bench.channel, &topology.jobs_queue)
                .await?
                .message_count() as usize,
        calls: server.stats.in_flight(),
        rss_kib: rss,
        peak_rss_kib: gateway.peak_rss_kib(),
    };
    eprintln!();
    drop(gateway);
    remove(&bench.channel, &topology, &[]).await;
    Ok(held)
}

/// `queue` as the broker has it now: its ready messages and its consumers.
async fn queue_state(channel: &Channel, queue: &str) -> anyhow::Result<lapin::Queue> {
    Ok(channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?)
}

// ---------------------------------------------------------------------------------------------
// broker helpers

/// Watches a round's events queue: counts events, and (when recording) when each job's
/// arrived.
struct EventWatch {
    channel: Channel,
    consumer: lapin::Consumer,
    seen: usize,
    not_sent: usize,
    /// When 5 % and 95 % of the events had arrived (the steady middle of a drain).
    marks: [Option<Instant>; 2],
    record: bool,
    arrivals: Vec<(usize, Instant)>,
}

impl EventWatch {
    async fn start(connection: &Connection, queue: &str) -> anyhow::Result<Self> {
        let channel = connection.create_channel().await?;
        channel.basic_qos(1000, BasicQosOptions::default()).await?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                "otp-bench-events".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(EventWatch {
            channel,
            consumer,
            seen: 0,
            not_sent: 0,
            marks: [None, None],
            record: false,
            arrivals: Vec::new(),
        })
    }

    /// Until `count` events have arrived (60 s at most between two).
    async fn wait(&mut self, count: usize, label: &str, started: Instant) -> anyhow::Result<()> {
        while self.seen < count {
            let event = tokio::time::timeout(Duration::from_secs(60), self.consumer.next())
                .await
                .map_err(|_| anyhow::anyhow!("no event for 60 s after {} jobs", self.seen))?
                .ok_or_else(|| anyhow::anyhow!("the events consumer was cancelled"))??;
            let at = Instant::now();
            if !matches!(
                event.routing_key.as_str(),
                "delivery.sent" | "delivery.delivered"
            ) {
                self.not_sent += 1;
            }
            if self.record
                && let Ok(report) = serde_json::from_slice::<serde_json::Value>(&event.data)
                && let Some(job) = report
                    .get("job_id")
                    .and_then(|id| id.as_str())
                    .and_then(provider::job_index)
            {
                self.arrivals.push((job, at));
            }
            self.seen += 1;
            if self.seen == count / 20 {
                self.marks[0] = Some(at);
            }
            if self.seen == count - count / 20 {
                self.marks[1] = Some(at);
            }
            if self.seen.is_multiple_of(500) {
                progress(label, self.seen, count, started);
            }
        }
        eprintln!();
        Ok(())
    }

    async fn close(&self) {
        let _ = self.channel.close(200, "done".into()).await;
    }
}

/// A classic queue bound to every `delivery.*` event of `topology`; its name.
async fn events_queue(channel: &Channel, topology: &Topology) -> anyhow::Result<String> {
    let queue = format!("{}.bench-events", topology.jobs_queue);
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            topology.events_exchange.as_str().into(),
            "delivery.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(queue)
}

/// A job as an upstream service would publish it: SMS to a number of its own (no rate limit
/// applies), through the sandbox provider.
fn job_body(label: &str, n: usize) -> Vec<u8> {
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    let round: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
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

/// The broker's share alone: a consumer that, per job, publishes one persistent confirmed
/// event and then acks (the gateway's broker traffic with no work in between), on its own
/// connection with a publishing and a consuming channel, as the gateway has. What it drains
/// is the most any gateway could on this broker and machine.
async fn floor_round(bench: &Bench, round: usize) -> anyhow::Result<f64> {
    let args = &bench.args;
    let label = format!("floor {round}/{}", args.rounds);
    let amqp = topology(&bench.prefix("floor", round));
    let topology = Topology::from(&amqp);
    topology.declare(&bench.channel).await?;
    let events = events_queue(&bench.channel, &topology).await?;
    prefill(&bench.channel, &topology, &label, args.jobs).await?;
    let connection = Connection::connect(&args.amqp, ConnectionProperties::default()).await?;
    let publish = connection.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let consume = connection.create_channel().await?;
    consume
        .basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let mut seen = EventWatch::start(&bench.connection, &events).await?;
    let started = Instant::now();
    let mut consumer = consume
        .basic_consume(
            topology.jobs_queue.as_str().into(),
            "otp-bench-floor".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let exchange = topology.events_exchange.clone();
    let jobs = args.jobs;
    // The size of the gateway's event for these jobs (its report as JSON).
    let body = vec![b'x'; 930];
    tokio::spawn(async move {
        let mut n = 0;
        while n < jobs {
            let Some(Ok(delivery)) = consumer.next().await else {
                break;
            };
            n += 1;
            let publish = publish.clone();
            let exchange = exchange.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let confirm = publish
                    .basic_publish(
                        exchange.as_str().into(),
                        "delivery.sent".into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await;
                if let Ok(confirm) = confirm {
                    let _ = confirm.await;
                }
                let _ = delivery.ack(BasicAckOptions::default()).await;
            });
        }
    });
    seen.wait(jobs, &label, started).await?;
    let elapsed = started.elapsed();
    seen.close().await;
    let _ = connection.close(200, "done".into()).await;
    remove(&bench.channel, &topology, &[&events]).await;
    Ok(jobs as f64 / elapsed.as_secs_f64())
}
