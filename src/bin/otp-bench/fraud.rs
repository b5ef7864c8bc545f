//! Fraud: a week of simulated sign-in traffic over 20 countries, a marketing burst and an
//! SMS-pumping attack on three ranges and on a country never sent to, through the gateway
//! in this process on a hand-moved clock (`otp_gateway::sim::pumping`), the fraud guard in
//! `enforce` with the default thresholds. Reports what reached each attacked range before it
//! was held, how long that took, and what legitimate traffic was held.

use figment::providers::Serialized;
use otp_gateway::config::Config;
use otp_gateway::queue::Topology;
use otp_gateway::sim::pumping::{Scenario, run};

use crate::Bench;
use crate::broker::{remove, topology};

pub(crate) async fn fraud(bench: &Bench) -> anyhow::Result<()> {
    let prefix = bench.prefix("fraud", 0);
    let amqp = topology(&prefix);
    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir)?;
    let mut figment = Config::figment(None)
        .merge(Serialized::default("grpc.listen", "127.0.0.1:0"))
        .merge(Serialized::default("receipts.listen", "127.0.0.1:0"))
        .merge(Serialized::default("ops.listen", "127.0.0.1:0"))
        .merge(Serialized::default("auth.mode", "none"))
        .merge(Serialized::default("log.level", "warn"))
        .merge(Serialized::default("amqp.url", &bench.args.amqp))
        .merge(Serialized::default(
            "store.url",
            format!("sqlite://{}/ledger.db", dir.display()),
        ))
        .merge(Serialized::default(
            "providers.sandbox.outbox",
            dir.join("outbox.jsonl"),
        ))
        .merge(Serialized::default("fraud.mode", "enforce"))
        // Rounds as often as the simulation's steps need (it waits for two after each).
        .merge(Serialized::default("fraud.evaluate_every", "20ms"));
    for (key, value) in [
        ("jobs_exchange", &amqp.jobs_exchange),
        ("jobs_queue", &amqp.jobs_queue),
        ("dead_letter_exchange", &amqp.dead_letter_exchange),
        ("dead_letter_queue", &amqp.dead_letter_queue),
        ("events_exchange", &amqp.events_exchange),
    ] {
        figment = figment.merge(Serialized::default(&format!("amqp.{key}"), value));
    }
    let config = Config::from_figment(figment)?;
    let scenario = Scenario {
        seed: bench.args.fraud_seed,
        ..Scenario::week()
    };
    eprintln!(
        "fraud: {} days over {} countries, attack ×{} on {} ranges and a new country for {:#}, burst ×{} for {:#}, seed {}",
        scenario.days,
        scenario.countries,
        scenario.attack_factor,
        scenario.attacked,
        scenario.attack,
        scenario.burst_factor,
        scenario.burst,
        scenario.seed
    );
    let outcome = run(config, &scenario).await;
    remove(&bench.channel, &Topology::from(&amqp), &[]).await;
    let _ = std::fs::remove_dir_all(&dir);
    let outcome = outcome?;
    println!("\n## fraud (a week of traffic, the guard in enforce with the default thresholds)\n");
    println!("```\n{}```", outcome.describe());
    let worst = outcome
        .ranges
        .iter()
        .filter(|r| r.attacked)
        .map(|r| r.fraud_sent)
        .max()
        .unwrap_or_default();
    let unheld = outcome
        .ranges
        .iter()
        .filter(|r| r.attacked && r.held_at.is_none())
        .count();
    println!(
        "\ntargets: every attacked range held within 50 fraudulent sends (worst: {worst}, not held: {unheld}); no legitimate range held (held: {}; legitimate sends held outside attacked ranges: {}, in the burst: {})",
        outcome.legit_ranges_held().len(),
        outcome.legit_sends_held(),
        outcome.burst_held
    );
    Ok(())
}
