//! Smpp: one bind to a local SMSC against the sandbox, same queue size, rounds alternated.

use std::time::Duration;

use crate::broker::topology;
use crate::gateway::SmsProvider;
use crate::overhead::drain_jobs;
use crate::{Bench, each, median};
use crate::{gateway, smsc};

pub(crate) async fn smpp(bench: &Bench) -> anyhow::Result<()> {
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
