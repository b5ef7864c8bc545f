//! Overhead: bare consumer vs gateway with the sandbox provider, alternated.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use otp_gateway::config::AmqpConfig;
use otp_gateway::queue::Topology;

use crate::broker::{EventWatch, events_queue, floor_round, prefill, progress, remove, topology};
use crate::gateway::{GatewayProcess, GatewaySetup, SmsProvider};
use crate::{Bench, each, median, mib};

pub(crate) async fn overhead(bench: &Bench) -> anyhow::Result<()> {
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
pub(crate) async fn baseline_round(bench: &Bench, round: usize) -> anyhow::Result<f64> {
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
pub(crate) async fn bare_consumer(
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
pub(crate) struct Drained {
    pub(crate) jobs_per_sec: f64,
    /// The gateway's CPU time per job (every thread, user and system).
    pub(crate) cpu_per_job: Option<Duration>,
    /// Between 5 % and 95 % of the jobs done: without the start and the drain's tail.
    pub(crate) steady_jobs_per_sec: f64,
    pub(crate) peak_rss_kib: Option<u64>,
    pub(crate) elapsed: Duration,
    pub(crate) not_sent: usize,
}

/// The gateway on a pre-filled queue, timed from when it starts consuming to the last job's
/// event (published just before its ack).
pub(crate) async fn drain(
    bench: &Bench,
    label: &str,
    amqp: &AmqpConfig,
    setup: GatewaySetup<'_>,
) -> anyhow::Result<Drained> {
    drain_jobs(bench, label, amqp, setup, bench.args.jobs).await
}

/// [`drain`] with `jobs` in the queue.
pub(crate) async fn drain_jobs(
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
