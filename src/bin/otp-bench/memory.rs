//! Memory: resident set with thousands of jobs in flight.

use std::time::Duration;

use otp_gateway::config::DEFAULT_MAX_CONCURRENT_CALLS;
use otp_gateway::queue::Topology;

use crate::broker::queue_state;
use crate::broker::{prefill, progress, remove, topology};
use crate::gateway::{GatewayProcess, SmsProvider};
use crate::provider;
use crate::provider::Behaviour;
use crate::{Bench, mib};

pub(crate) async fn memory(bench: &Bench) -> anyhow::Result<()> {
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
pub(crate) const MEMORY_HOLD: Duration = Duration::from_secs(60);

/// What a memory round saw once every job was in the gateway.
pub(crate) struct Held {
    /// Jobs delivered to the gateway and not acked (none can be: every call is held).
    pub(crate) jobs: usize,
    /// Calls open at the provider.
    pub(crate) calls: usize,
    pub(crate) rss_kib: u64,
    pub(crate) peak_rss_kib: Option<u64>,
}

/// `jobs` jobs through a provider that holds every call: the gateway's RSS once the broker has
/// handed it every job and the provider's open calls stopped growing.
pub(crate) async fn memory_round(
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
