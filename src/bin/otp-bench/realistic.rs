//! Realistic: a provider with log-normal latency, errors and hangs, against Little's law.

use crate::broker::topology;
use crate::gateway::SmsProvider;
use crate::overhead::drain;
use crate::provider;
use crate::provider::Behaviour;
use crate::{
    Bench, REALISTIC_ERRORS, REALISTIC_HANGS, REALISTIC_MEDIAN, REALISTIC_P99, REALISTIC_TIMEOUT,
    mib, ms,
};

pub(crate) async fn realistic(bench: &Bench) -> anyhow::Result<()> {
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
    let designed_mean = otp_gateway::sim::log_normal_mean(REALISTIC_MEDIAN, REALISTIC_P99)
        .as_secs_f64()
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
