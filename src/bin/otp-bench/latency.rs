//! Latency: open-loop publishing at a fixed rate.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use otp_gateway::queue::Topology;

use crate::broker::{EventWatch, events_queue, job_body, progress, remove, topology};
use crate::gateway::{GatewayProcess, SmsProvider};
use crate::overhead::bare_consumer;
use crate::provider;
use crate::provider::Behaviour;
use crate::{Bench, SCHEDULED_HEADER, ms, quantile};

/// A round's p50 and p99.
pub(crate) type Quantiles = (Duration, Duration);

pub(crate) async fn latency(bench: &Bench) -> anyhow::Result<()> {
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
pub(crate) async fn baseline_latency(
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
pub(crate) async fn gateway_latency(
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
pub(crate) struct Schedule {
    pub(crate) start: Instant,
    pub(crate) interval: Duration,
}

impl Schedule {
    fn at(&self, job: usize) -> Instant {
        self.start + self.interval * job as u32
    }
}

/// Publishes `count` jobs at `--rate` per second on a fixed schedule, whatever the broker or
/// consumer do (open loop: a late publish is measured from when it was due), each stamped
/// with its due time in [`SCHEDULED_HEADER`].
pub(crate) async fn open_loop(
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
