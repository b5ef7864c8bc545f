//! Replicas: one gateway on SQLite, then one, two and three replicas on PostgreSQL sharing the
//! database and one queue, each draining the same pre-filled queue; rounds alternated.

use std::time::{Duration, Instant};

use otp_gateway::queue::Topology;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::broker::{EventWatch, events_queue, prefill, remove, topology};
use crate::gateway::{GatewayProcess, SmsProvider};
use crate::{Bench, each, median};

/// One configuration of the part: the store and how many replicas.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Setup {
    Sqlite,
    Postgres(usize),
}

impl Setup {
    fn label(self) -> String {
        match self {
            Setup::Sqlite => "SQLite, 1 gateway".to_owned(),
            Setup::Postgres(1) => "PostgreSQL, 1 replica".to_owned(),
            Setup::Postgres(n) => format!("PostgreSQL, {n} replicas"),
        }
    }

    fn replicas(self) -> usize {
        match self {
            Setup::Sqlite => 1,
            Setup::Postgres(n) => n,
        }
    }
}

/// CPU time used so far by every process named `name` (as in /proc/PID/comm): the database's
/// and the broker's share of the cores.
fn cpu_of(name: &str) -> Duration {
    let mut ticks = 0u64;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        ticks += field(11) + field(12);
    }
    Duration::from_millis(ticks * 10)
}

/// What one round of one setup measured.
struct Round {
    jobs_per_sec: f64,
    /// Every replica's CPU time per job, summed (µs).
    cpu_per_job: f64,
    /// Each replica's share of the CPU time.
    cpu_shares: Vec<f64>,
    /// The database's and the broker's CPU time per job (µs).
    database_cpu_per_job: f64,
    broker_cpu_per_job: f64,
    /// PostgreSQL: commits and row writes per job.
    commits_per_job: Option<f64>,
    writes_per_job: Option<f64>,
}

pub(crate) async fn replicas(bench: &Bench) -> anyhow::Result<()> {
    let mut setups = vec![Setup::Sqlite];
    setups.extend(bench.args.replicas.iter().map(|n| Setup::Postgres(*n)));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = std::process::Command::new("taskset")
        .arg("-V")
        .output()
        .is_ok();
    let mut results: Vec<Vec<Round>> = setups.iter().map(|_| Vec::new()).collect();
    for round in 1..=bench.args.rounds {
        for (index, setup) in setups.iter().enumerate() {
            let label = format!("{} {round}/{}", setup.label(), bench.args.rounds);
            results[index].push(run(bench, *setup, &label, round, pinned.then_some(cores)).await?);
        }
    }
    println!(
        "\n## replicas ({} jobs per round, sandbox provider; {}; {cores} cores shared with the broker and the database)\n",
        bench.args.replica_jobs,
        if pinned {
            "replica i pinned to CPU i mod cores with taskset"
        } else {
            "not pinned (no taskset)"
        }
    );
    println!(
        "| setup | rounds (jobs/s) | median (jobs/s) | CPU per job, all replicas (µs) | CPU share per replica | database CPU per job (µs) | broker CPU per job (µs) | commits per job | row writes per job |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut medians = Vec::new();
    for (setup, rounds) in setups.iter().zip(&results) {
        let rates: Vec<f64> = rounds.iter().map(|r| r.jobs_per_sec).collect();
        let cpu: Vec<f64> = rounds.iter().map(|r| r.cpu_per_job).collect();
        let optional = |values: Vec<Option<f64>>| -> String {
            let values: Vec<f64> = values.into_iter().flatten().collect();
            if values.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.1}", median(&values))
            }
        };
        let shares = rounds
            .last()
            .map(|r| {
                r.cpu_shares
                    .iter()
                    .map(|s| format!("{:.0} %", s * 100.0))
                    .collect::<Vec<_>>()
                    .join(" / ")
            })
            .unwrap_or_default();
        medians.push(median(&rates));
        let database: Vec<f64> = rounds.iter().map(|r| r.database_cpu_per_job).collect();
        let broker: Vec<f64> = rounds.iter().map(|r| r.broker_cpu_per_job).collect();
        println!(
            "| {} | {} | {:.0} | {:.0} | {shares} | {:.0} | {:.0} | {} | {} |",
            setup.label(),
            each(&rates),
            median(&rates),
            median(&cpu),
            median(&database),
            median(&broker),
            optional(rounds.iter().map(|r| r.commits_per_job).collect()),
            optional(rounds.iter().map(|r| r.writes_per_job).collect()),
        );
    }
    let of = |setup: Setup| setups.iter().position(|s| *s == setup).map(|i| medians[i]);
    if let (Some(sqlite), Some(one)) = (of(Setup::Sqlite), of(Setup::Postgres(1))) {
        println!(
            "\nPostgreSQL 1 replica / SQLite 1 gateway = {:.3} (target >= 0.7)",
            one / sqlite
        );
        if let Some(two) = of(Setup::Postgres(2)) {
            println!(
                "PostgreSQL 2 replicas / 1 replica = {:.3} (target >= 1.6 where the CPU allows it)",
                two / one
            );
        }
        if let Some(three) = of(Setup::Postgres(3)) {
            println!("PostgreSQL 3 replicas / 1 replica = {:.3}", three / one);
        }
    }
    Ok(())
}

/// A database of its own for one round, dropped afterwards.
async fn fresh_database(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let mut admin = PgConnection::connect(admin_url).await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    let (base, _) = admin_url
        .rsplit_once('/')
        .ok_or_else(|| anyhow::anyhow!("--pg-admin is not a database URL"))?;
    Ok(format!("{base}/{name}"))
}

async fn drop_database(admin_url: &str, name: &str) {
    if let Ok(mut admin) = PgConnection::connect(admin_url).await {
        let _ = sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await;
    }
}

/// The database's commits and row writes so far.
async fn activity(url: &str) -> anyhow::Result<(i64, i64)> {
    let mut conn = PgConnection::connect(url).await?;
    let commits: i64 = sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut conn)
    .await?;
    let writes: Option<i64> = sqlx::query_scalar(
        "SELECT sum(n_tup_ins + n_tup_upd + n_tup_del)::bigint FROM pg_stat_user_tables",
    )
    .fetch_one(&mut conn)
    .await?;
    Ok((commits, writes.unwrap_or(0)))
}

async fn run(
    bench: &Bench,
    setup: Setup,
    label: &str,
    round: usize,
    cores: Option<usize>,
) -> anyhow::Result<Round> {
    let jobs = bench.args.replica_jobs;
    let amqp = topology(&bench.prefix(&format!("rep{}", setup.replicas()), round));
    let topology = Topology::from(&amqp);
    topology.declare(&bench.channel).await?;
    let events = events_queue(&bench.channel, &topology).await?;
    let database = format!("otp_bench_{}_{round}_{}", bench.run, setup.replicas());
    let store = match setup {
        Setup::Sqlite => None,
        Setup::Postgres(_) => Some(fresh_database(&bench.args.pg_admin, &database).await?),
    };
    prefill(&bench.channel, &topology, label, jobs).await?;
    let mut gateways = Vec::new();
    for replica in 0..setup.replicas() {
        let mut gateway_setup = bench.setup(&amqp, SmsProvider::Sandbox);
        gateway_setup.store = store.clone();
        gateway_setup.cpus = cores.map(|cores| (replica % cores).to_string());
        gateways.push(GatewayProcess::start(
            &gateway_setup,
            &format!("{}-{label}-{replica}", bench.run).replace(['/', ' ', ','], "-"),
        )?);
        // One replica migrates the schema before the next starts.
        if replica == 0 {
            gateways[0]
                .consuming(&bench.channel, &topology.jobs_queue)
                .await?;
        }
    }
    let mut seen = EventWatch::start(&bench.connection, &events).await?;
    let mut started = Instant::now();
    for gateway in &mut gateways {
        started = started.min(
            gateway
                .consuming(&bench.channel, &topology.jobs_queue)
                .await?,
        );
    }
    let before = match &store {
        Some(url) => Some(activity(url).await?),
        None => None,
    };
    let cpu_before: Vec<Duration> = gateways
        .iter()
        .map(|g| g.cpu_time().unwrap_or_default())
        .collect();
    let (database_before, broker_before) = (cpu_of("postgres"), cpu_of("beam.smp"));
    seen.wait(jobs, label, started).await?;
    let elapsed = started.elapsed();
    let cpu: Vec<Duration> = gateways
        .iter()
        .zip(&cpu_before)
        .map(|(g, before)| g.cpu_time().unwrap_or_default().saturating_sub(*before))
        .collect();
    let (database_cpu, broker_cpu) = (
        cpu_of("postgres").saturating_sub(database_before),
        cpu_of("beam.smp").saturating_sub(broker_before),
    );
    let after = match &store {
        Some(url) => Some(activity(url).await?),
        None => None,
    };
    for gateway in gateways {
        gateway.stop().await;
    }
    seen.close().await;
    remove(&bench.channel, &topology, &[&events]).await;
    if store.is_some() {
        drop_database(&bench.args.pg_admin, &database).await;
    }
    let total: Duration = cpu.iter().sum();
    let per_job = |count: i64| count as f64 / jobs as f64;
    Ok(Round {
        jobs_per_sec: jobs as f64 / elapsed.as_secs_f64(),
        cpu_per_job: total.as_secs_f64() * 1e6 / jobs as f64,
        database_cpu_per_job: database_cpu.as_secs_f64() * 1e6 / jobs as f64,
        broker_cpu_per_job: broker_cpu.as_secs_f64() * 1e6 / jobs as f64,
        cpu_shares: cpu
            .iter()
            .map(|c| c.as_secs_f64() / total.as_secs_f64().max(f64::MIN_POSITIVE))
            .collect(),
        commits_per_job: before.zip(after).map(|(b, a)| per_job(a.0 - b.0)),
        writes_per_job: before.zip(after).map(|(b, a)| per_job(a.1 - b.1)),
    })
}
