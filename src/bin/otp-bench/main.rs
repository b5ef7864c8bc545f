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
//! - replicas: the same drain on SQLite with one gateway and on PostgreSQL with one, two and
//!   three replicas sharing the database and the queue (each pinned to a CPU with taskset when
//!   there is one); CPU per job, and the database's commits and row writes per job.
//! - smpp: the same drain through one SMPP bind (window 256, enquire_link at its default) to a
//!   local SMSC that answers at once and sends its DELIVRD receipt right after, against the
//!   sandbox drain of the same run; rounds alternated, medians and the ratio.
//! - fraud: a week of simulated sign-in traffic, a marketing burst and an SMS-pumping attack
//!   through the gateway on a hand-moved clock: fraudulent sends before each attacked range
//!   was held, time to hold, and legitimate sends held.
//!
//! `BENCHMARKS.md` has the results and what limits them.

mod broker;
mod fraud;
mod gateway;
mod grpc;
mod latency;
mod memory;
mod overhead;
mod provider;
mod realistic;
mod replicas;
mod smpp;
mod smsc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use otp_gateway::config::AmqpConfig;

use broker::job_body;
use fraud::fraud;
use gateway::{GatewaySetup, SmsProvider};
use grpc::grpc;
use latency::latency;
use memory::memory;
use overhead::overhead;
use realistic::realistic;
use replicas::replicas;
use smpp::smpp;

/// The realistic provider: log-normal latency with this median and 99th percentile...
pub(crate) const REALISTIC_MEDIAN: Duration = Duration::from_millis(200);
pub(crate) const REALISTIC_P99: Duration = Duration::from_millis(1500);
/// ...this share of HTTP 503 answers...
pub(crate) const REALISTIC_ERRORS: f64 = 0.02;
/// ...and this share of requests that hang until the gateway's provider timeout.
pub(crate) const REALISTIC_HANGS: f64 = 0.005;
/// The gateway's provider timeout in the realistic run.
pub(crate) const REALISTIC_TIMEOUT: Duration = Duration::from_secs(5);
/// The header each open-loop job carries: its scheduled publish time, in microseconds since
/// the Unix epoch.
pub(crate) const SCHEDULED_HEADER: &str = "x-bench-scheduled-at-us";

/// Measures the gateway against a bare consumer (see BENCHMARKS.md).
#[derive(Parser, Debug)]
#[command(name = "otp-bench", version)]
pub(crate) struct Args {
    /// Jobs in the pre-filled queue of each draining round (overhead and realistic).
    #[arg(long, default_value_t = 50_000)]
    pub(crate) jobs: usize,
    /// Overhead and latency rounds of each side, alternated baseline, gateway, baseline, ...
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// The broker.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub(crate) amqp: String,
    /// Unacknowledged messages the broker pushes at once (both sides).
    #[arg(long, default_value_t = 256)]
    pub(crate) prefetch: u16,
    /// Jobs the gateway works on at once (`delivery.max_in_flight`).
    #[arg(long, default_value_t = 256)]
    pub(crate) max_in_flight: usize,
    /// Jobs per second published in the latency runs.
    #[arg(long, default_value_t = 1000)]
    pub(crate) rate: u32,
    /// Seconds of publishing in each latency run.
    #[arg(long, default_value_t = 20)]
    pub(crate) latency_secs: u32,
    /// `SendCode` calls per second in the gRPC run.
    #[arg(long, default_value_t = 500)]
    pub(crate) grpc_rate: u32,
    /// Seconds of calls in the gRPC run.
    #[arg(long, default_value_t = 10)]
    pub(crate) grpc_secs: u32,
    /// Jobs held in flight at once in the memory probe.
    #[arg(long, default_value_t = 5000)]
    pub(crate) in_flight: u16,
    /// Jobs in the pre-filled queue of each smpp-part round (SMPP and sandbox alike).
    #[arg(long, default_value_t = 20_000)]
    pub(crate) smpp_jobs: usize,
    /// Jobs in the pre-filled queue of each replicas-part round.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) replica_jobs: usize,
    /// Replica counts on PostgreSQL in the replicas part (besides one replica on SQLite).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub(crate) replicas: Vec<usize>,
    /// The PostgreSQL server for the replicas part: the bench makes a database per round there.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub(crate) pg_admin: String,
    /// The fraud part's random seed (the traffic, conversions and numbers drawn).
    #[arg(long, default_value_t = otp_gateway::sim::pumping::Scenario::week().seed)]
    pub(crate) fraud_seed: u64,
    /// Only these parts (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(crate) only: Vec<Part>,
    /// Internal: run the gateway on this configuration (the bench starts it so).
    #[arg(long, hide = true, value_name = "CONFIG")]
    pub(crate) serve: Option<PathBuf>,
}

/// The parts of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Part {
    Overhead,
    Realistic,
    Latency,
    Grpc,
    Memory,
    Smpp,
    Replicas,
    Fraud,
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
pub(crate) struct Bench {
    pub(crate) args: Args,
    pub(crate) connection: Connection,
    /// Declarations and confirmed publishes.
    pub(crate) channel: Channel,
    pub(crate) run: u32,
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
            store: None,
            cpus: None,
        }
    }
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
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
    if bench.wants(Part::Replicas) {
        replicas(&bench).await?;
    }
    if bench.wants(Part::Fraud) {
        fraud(&bench).await?;
    }

    bench.connection.close(200, "done".into()).await?;
    Ok(())
}

/// Per-round figures, rounded, comma-separated.
pub(crate) fn each(rates: &[f64]) -> String {
    rates
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn mib(kib: Option<u64>) -> String {
    kib.map_or("unknown".into(), |kib| {
        format!("{:.1} MiB", kib as f64 / 1024.0)
    })
}

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// The `p` quantile (0..=1) of `samples`, nearest rank.
pub(crate) fn quantile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

pub(crate) fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}
