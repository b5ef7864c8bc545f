//! An SMS-pumping simulation through the real gateway: days of synthetic sign-in traffic
//! compressed into minutes on a hand-moved clock, then an attack on a few number ranges and a
//! legitimate marketing burst, with what the fraud guard held and when. `otp-bench --only fraud`
//! runs a week of it; the tests a shorter version.
//!
//! The traffic goes in as `SendCode` calls and `ReportVerification`s over gRPC, the gateway
//! sends through its sandbox provider, and the outcome of every job is read from its
//! `delivery.*` event. Legitimate ranges have their own volume with a daily cycle in their
//! country's time, and their country's conversion (70–95 %, the code entered 5–55 s after the
//! send); attacked ranges take `attack_factor` × their usual volume at 1 % conversion, and so
//! does a country never sent to before, spread over its ranges. Time moves in steps (longer
//! ones away from the attack and the burst); after each step's jobs ended, the simulation
//! waits for two rounds of the guard, so that the guard sees the traffic as it would live.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{StreamExt, TryStreamExt};
use jiff::{SignedDuration, Timestamp};
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use crate::app::Application;
use crate::config::Config;
use crate::domain::{Clock, ManualClock};
use crate::proto::v1::policy_admin_client::PolicyAdminClient;
use crate::proto::v1::{self, code_delivery_client::CodeDeliveryClient};
use crate::proto::{channel_to_proto, timestamp_to_proto};
use crate::providers::ProviderRegistry;

/// Calling code, two of its mobile ranges (at depth 3) and its UTC offset in hours.
const COUNTRIES: &[(&str, [&str; 2], i64)] = &[
    ("+44", ["+44770", "+44791"], 0),
    ("+49", ["+49151", "+49176"], 1),
    ("+33", ["+33612", "+33765"], 1),
    ("+34", ["+34612", "+34699"], 1),
    ("+39", ["+39333", "+39347"], 1),
    ("+31", ["+31612", "+31653"], 1),
    ("+46", ["+46701", "+46735"], 1),
    ("+48", ["+48501", "+48600"], 1),
    ("+351", ["+351912", "+351936"], 0),
    ("+353", ["+353851", "+353871"], 0),
    ("+41", ["+41761", "+41791"], 1),
    ("+43", ["+43664", "+43676"], 1),
    ("+45", ["+45201", "+45402"], 1),
    ("+47", ["+47412", "+47902"], 1),
    ("+358", ["+358401", "+358501"], 2),
    ("+1", ["+1415", "+1212"], -6),
    ("+61", ["+61412", "+61430"], 10),
    ("+81", ["+81901", "+81801"], 9),
    ("+55", ["+55119", "+55219"], -3),
    ("+65", ["+65812", "+65912"], 8),
];

/// A country never sent to before the attack (The Gambia: pumping favours small carriers with
/// high termination fees). Its attack is spread over numbers all over the country, a few per
/// range: only the country as a whole shows the surge.
const NEW_COUNTRY: &str = "+220";

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Days of traffic; the burst and the attack are on the last one.
    pub days: u32,
    /// Countries with legitimate traffic (at most 20), two ranges each.
    pub countries: usize,
    /// A legitimate range's average sends per hour, drawn between these.
    pub volume: (f64, f64),
    /// The time step away from the attack and the burst.
    pub quiet_step: SignedDuration,
    /// The time step around them.
    pub busy_step: SignedDuration,
    /// Legitimate ranges attacked (the last countries' first ranges), besides a country never
    /// sent to.
    pub attacked: usize,
    /// The attack's volume, as a multiple of each range's usual one.
    pub attack_factor: f64,
    /// How long the attack lasts.
    pub attack: SignedDuration,
    /// The marketing burst to the first country: its volume multiple.
    pub burst_factor: f64,
    /// How long the burst lasts.
    pub burst: SignedDuration,
    /// The random draws' seed.
    pub seed: u64,
}

impl Scenario {
    /// A week over 20 countries: `otp-bench --only fraud`.
    pub fn week() -> Scenario {
        Scenario {
            days: 7,
            countries: 20,
            volume: (3.0, 15.0),
            quiet_step: SignedDuration::from_mins(10),
            busy_step: SignedDuration::from_secs(20),
            attacked: 3,
            attack_factor: 50.0,
            attack: SignedDuration::from_hours(1),
            burst_factor: 20.0,
            burst: SignedDuration::from_hours(2),
            seed: 20_261_207,
        }
    }

    /// Two days over 6 countries, a 30-minute attack and an hour's burst: the tests' version.
    pub fn short() -> Scenario {
        Scenario {
            days: 2,
            countries: 6,
            volume: (4.0, 12.0),
            quiet_step: SignedDuration::from_mins(10),
            busy_step: SignedDuration::from_secs(20),
            attacked: 2,
            attack_factor: 50.0,
            attack: SignedDuration::from_mins(30),
            burst_factor: 20.0,
            burst: SignedDuration::from_hours(1),
            seed: 7,
        }
    }
}

/// How one range fared.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RangeOutcome {
    /// The range (for the country never sent to, its calling code).
    pub range: String,
    /// Under attack.
    pub attacked: bool,
    /// Legitimate sends asked for.
    pub legit_sends: u64,
    /// Of those, the ones the guard held.
    pub legit_held: u64,
    /// Attack sends asked for.
    pub fraud_sends: u64,
    /// Of those, the ones that reached the provider (before the hold).
    pub fraud_sent: u64,
    /// And the ones the guard held.
    pub fraud_held: u64,
    /// From the attack's first send to the hold (simulated time).
    pub time_to_hold: Option<SignedDuration>,
    /// When the guard held the range (simulated time), if it did.
    pub held_at: Option<Timestamp>,
}

/// What the simulation found.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Per range, attacked ones first.
    pub ranges: Vec<RangeOutcome>,
    /// Legitimate sends to the burst's country during the burst.
    pub burst_sends: u64,
    /// Of those, the ones the guard held.
    pub burst_held: u64,
    /// Jobs sent through the gateway.
    pub jobs: u64,
    /// Verifications reported.
    pub verifications: u64,
    /// Time steps.
    pub steps: u64,
    /// The wall-clock time the run took.
    pub elapsed: Duration,
    /// The guard's quarantines at the end, as `ListQuarantines` gave them.
    pub quarantines: Vec<v1::Quarantine>,
}

impl Outcome {
    /// The legitimate ranges the guard held (false positives).
    pub fn legit_ranges_held(&self) -> Vec<&RangeOutcome> {
        self.ranges
            .iter()
            .filter(|r| !r.attacked && r.held_at.is_some())
            .collect()
    }

    /// Legitimate sends held outside the attacked ranges.
    pub fn legit_sends_held(&self) -> u64 {
        self.ranges
            .iter()
            .filter(|r| !r.attacked)
            .map(|r| r.legit_held)
            .sum()
    }

    /// A table of the figures, for the bench and a failing test.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "{} jobs and {} verifications in {} steps, {:.1} s\n",
            self.jobs,
            self.verifications,
            self.steps,
            self.elapsed.as_secs_f64()
        ));
        out.push_str(
            "range      attacked  legit sends  legit held  fraud sends  sent before hold  held  time to hold\n",
        );
        for r in &self.ranges {
            if !r.attacked && r.legit_held == 0 && r.held_at.is_none() {
                continue;
            }
            out.push_str(&format!(
                "{:<10} {:<9} {:>11}  {:>10}  {:>11}  {:>16}  {:>4}  {}\n",
                r.range,
                if r.attacked { "yes" } else { "no" },
                r.legit_sends,
                r.legit_held,
                r.fraud_sends,
                r.fraud_sent,
                r.fraud_held,
                r.time_to_hold
                    .map_or_else(|| "not held".to_owned(), |t| format!("{t:#}")),
            ));
        }
        let legit: u64 = self.ranges.iter().map(|r| r.legit_sends).sum();
        out.push_str(&format!(
            "legitimate: {legit} sends, {} held outside attacked ranges, {} ranges held; burst: {} sends, {} held\n",
            self.legit_sends_held(),
            self.legit_ranges_held().len(),
            self.burst_sends,
            self.burst_held
        ));
        out
    }
}

/// One legitimate or attacked range's traffic.
struct RangePlan {
    range: String,
    country: usize,
    /// Average legitimate sends per hour (0 for the new country).
    volume: f64,
    /// The share of codes entered.
    conversion: f64,
    /// UTC offset of its country, hours.
    offset: i64,
    attacked: bool,
}

/// One job of a step.
struct PlannedJob {
    range: usize,
    fraud: bool,
    burst: bool,
    converts: bool,
    lag: SignedDuration,
}

/// The outcome of a job, from its event: the status and reason.
type Outcomes = Arc<Mutex<HashMap<String, (String, Option<String>)>>>;

/// Runs `scenario` through a gateway built from `config` (the sandbox as its SMS provider,
/// the fraud guard in `enforce`, its own broker names and ledger) on a hand-moved clock.
pub async fn run(config: Config, scenario: &Scenario) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let tenant = "sim";
    let start: Timestamp = "2026-11-30T00:00:00Z".parse().expect("a timestamp");
    let clock = Arc::new(ManualClock::new(start));
    let amqp_url = config.amqp.url.expose().to_owned();
    let events_exchange = config.amqp.events_exchange.clone();
    let providers = ProviderRegistry::from_config(&config).await?;
    let app = Application::build_with(config, providers, clock.clone() as Arc<dyn Clock>).await?;
    let grpc = format!("http://{}", app.grpc_addr());
    let mut link = app.link_state();
    let mut rounds = app.fraud_guard().rounds();
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(stop.clone()));
    tokio::time::timeout(
        Duration::from_secs(30),
        link.wait_for(|state| *state == crate::queue::LinkState::Up),
    )
    .await
    .context("the gateway did not consume within 30 s")??;

    // Every job's outcome, from its delivery event.
    let connection =
        lapin::Connection::connect(&amqp_url, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            events_exchange.as_str().into(),
            "delivery.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            "pumping-sim".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let outcomes: Outcomes = Arc::default();
    let ended = Arc::new(tokio::sync::Notify::new());
    let reading = tokio::spawn(read_outcomes(consumer, outcomes.clone(), ended.clone()));

    let client = CodeDeliveryClient::connect(grpc.clone()).await?;
    let mut rng = fastrand::Rng::with_seed(scenario.seed);
    let plans = plan_ranges(scenario, &mut rng);
    let end = start + SignedDuration::from_hours(24 * i64::from(scenario.days));
    let last_day = end - SignedDuration::from_hours(24);
    let burst = (
        last_day + SignedDuration::from_hours(9),
        last_day + SignedDuration::from_hours(9) + scenario.burst,
    );
    let attack = (
        last_day + SignedDuration::from_hours(15),
        last_day + SignedDuration::from_hours(15) + scenario.attack,
    );
    let margin = SignedDuration::from_mins(15);
    let busy = |t: Timestamp| {
        (t >= burst.0 - margin && t < burst.1 + margin)
            || (t >= attack.0 - margin && t < attack.1 + margin)
    };

    let mut outcome = Outcome {
        ranges: plans
            .iter()
            .map(|p| RangeOutcome {
                range: p.range.clone(),
                attacked: p.attacked,
                ..RangeOutcome::default()
            })
            .collect(),
        ..Outcome::default()
    };
    // Verifications to report: (delivery id, when the user entered the code).
    let mut verifications: Vec<(String, Timestamp)> = Vec::new();
    let mut next_job = 0u64;
    let mut t = start;
    while t < end {
        let step = if busy(t) {
            scenario.busy_step
        } else {
            scenario.quiet_step
        };
        clock.set(t);
        // The codes entered by now.
        let (due, later): (Vec<_>, Vec<_>) =
            verifications.into_iter().partition(|(_, at)| *at <= t);
        verifications = later;
        outcome.verifications += due.len() as u64;
        report_verifications(&client, due).await?;
        // This step's jobs.
        let hours = step.as_secs_f64() / 3600.0;
        let mut jobs = Vec::new();
        for (index, plan) in plans.iter().enumerate() {
            let mut rate = plan.volume * daily_cycle(t, plan.offset);
            let bursting = plan.country == 0 && t >= burst.0 && t < burst.1;
            if bursting {
                rate *= scenario.burst_factor;
            }
            for _ in 0..draw(rate * hours, &mut rng) {
                jobs.push(PlannedJob {
                    range: index,
                    fraud: false,
                    burst: bursting,
                    converts: rng.f64() < plan.conversion,
                    lag: SignedDuration::from_secs(rng.i64(5..=55)),
                });
            }
            if plan.attacked && t >= attack.0 && t < attack.1 {
                let usual = if plan.volume > 0.0 {
                    plan.volume
                } else {
                    // A country never sent to: the pace of an average range.
                    (scenario.volume.0 + scenario.volume.1) / 2.0
                };
                for _ in 0..draw(usual * scenario.attack_factor * hours, &mut rng) {
                    jobs.push(PlannedJob {
                        range: index,
                        fraud: true,
                        burst: false,
                        converts: rng.f64() < 0.01,
                        lag: SignedDuration::from_secs(rng.i64(5..=55)),
                    });
                }
            }
        }
        let ids: Vec<String> = jobs
            .iter()
            .map(|_| {
                next_job += 1;
                format!("sim-{next_job}")
            })
            .collect();
        let requests: Vec<v1::SendCodeRequest> = jobs
            .iter()
            .zip(&ids)
            .map(|(job, id)| send_request(tenant, id, &plans[job.range].range, t, &mut rng))
            .collect();
        futures_util::stream::iter(requests)
            .map(|request| {
                let mut client = client.clone();
                async move { client.send_code(request).await }
            })
            .buffer_unordered(32)
            .try_collect::<Vec<_>>()
            .await
            .context("SendCode")?;
        outcome.jobs += jobs.len() as u64;
        // Every job ended (its event came), then two rounds of the guard.
        let wanted: Vec<String> = ids.iter().map(|id| format!("{tenant}/{id}")).collect();
        wait_for_outcomes(&outcomes, &ended, &wanted).await?;
        let seen = outcomes.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for ((job, id), key) in jobs.iter().zip(&ids).zip(&wanted) {
            let (status, reason) = &seen[key];
            let held = reason.as_deref() == Some("DESTINATION_SUSPENDED");
            let range = &mut outcome.ranges[job.range];
            match (job.fraud, held) {
                (true, true) => range.fraud_held += 1,
                (true, false) => range.fraud_sent += 1,
                (false, true) => range.legit_held += 1,
                (false, false) => {}
            }
            if job.fraud {
                range.fraud_sends += 1;
            } else {
                range.legit_sends += 1;
            }
            if job.burst {
                outcome.burst_sends += 1;
                outcome.burst_held += u64::from(held);
            }
            if status == "SENT" && job.converts {
                verifications.push((format!("{tenant}/{id}"), t + job.lag));
            }
        }
        let done = *rounds.borrow_and_update();
        tokio::time::timeout(Duration::from_secs(30), rounds.wait_for(|r| *r >= done + 2))
            .await
            .context("the fraud guard did no round within 30 s")??;
        outcome.steps += 1;
        t += step;
    }

    let mut admin = PolicyAdminClient::connect(grpc).await?;
    outcome.quarantines = admin
        .list_quarantines(v1::ListQuarantinesRequest {
            tenant: tenant.to_owned(),
            in_force_only: false,
        })
        .await?
        .into_inner()
        .quarantines;
    for quarantine in &outcome.quarantines {
        let Some(range) = outcome
            .ranges
            .iter_mut()
            .find(|r| r.range == quarantine.range)
        else {
            continue;
        };
        let since = quarantine
            .since
            .as_ref()
            .and_then(crate::proto::timestamp_from_proto);
        range.held_at = since;
        if range.attacked {
            range.time_to_hold = since.map(|since| since.duration_since(attack.0));
        }
    }
    outcome.ranges.sort_by_key(|r| !r.attacked);
    drop(client);
    stop.cancel();
    running.await.context("the gateway task")??;
    reading.abort();
    let _ = connection.close(200, "done".into()).await;
    outcome.elapsed = started.elapsed();
    Ok(outcome)
}

/// The ranges: two per country with their volumes and conversions; the last `attacked`
/// countries' first ranges attacked, and the new country (as a whole).
fn plan_ranges(scenario: &Scenario, rng: &mut fastrand::Rng) -> Vec<RangePlan> {
    let countries = scenario.countries.min(COUNTRIES.len());
    let mut plans = Vec::new();
    for (country, (_, ranges, offset)) in COUNTRIES.iter().take(countries).enumerate() {
        let conversion = 0.70 + 0.25 * rng.f64();
        for (i, range) in ranges.iter().enumerate() {
            let (low, high) = scenario.volume;
            plans.push(RangePlan {
                range: (*range).to_owned(),
                country,
                volume: low + (high - low) * rng.f64(),
                conversion,
                offset: *offset,
                attacked: i == 0
                    && country >= countries.saturating_sub(scenario.attacked)
                    && country > 0,
            });
        }
    }
    plans.push(RangePlan {
        range: NEW_COUNTRY.to_owned(),
        country: usize::MAX,
        volume: 0.0,
        conversion: 0.0,
        offset: 0,
        attacked: true,
    });
    plans
}

/// The daily cycle: from 0.2 × the average at night to 1.8 × in the afternoon (local time).
fn daily_cycle(at: Timestamp, offset: i64) -> f64 {
    let local_hours = (at.as_second() as f64 / 3600.0 + offset as f64).rem_euclid(24.0);
    let phase = (local_hours - 9.0) / 24.0 * std::f64::consts::TAU;
    (1.0 + 0.8 * phase.sin()).max(0.2)
}

/// A whole number of events with mean `expected`: its floor, plus one with the fraction's odds.
fn draw(expected: f64, rng: &mut fastrand::Rng) -> u64 {
    let whole = expected.floor();
    whole as u64 + u64::from(rng.f64() < expected - whole)
}

fn send_request(
    tenant: &str,
    job_id: &str,
    range: &str,
    now: Timestamp,
    rng: &mut fastrand::Rng,
) -> v1::SendCodeRequest {
    let number = format!("{range}{:06}", rng.u32(0..1_000_000));
    v1::SendCodeRequest {
        job: Some(v1::SendCodeJob {
            job_id: job_id.to_owned(),
            tenant: tenant.to_owned(),
            account: format!("user-{job_id}"),
            code: "482913".to_owned(),
            expires_at: Some(timestamp_to_proto(now + SignedDuration::from_mins(10))),
            purpose: "sign_in".to_owned(),
            locale: "en-US".to_owned(),
            user_initiated: true,
            timezone: String::new(),
            channels: vec![channel_to_proto(crate::domain::Channel::Sms) as i32],
            targets: vec![v1::Target {
                kind: Some(v1::target::Kind::Phone(v1::PhoneTarget { number })),
            }],
        }),
    }
}

async fn report_verifications(
    client: &CodeDeliveryClient<tonic::transport::Channel>,
    due: Vec<(String, Timestamp)>,
) -> anyhow::Result<()> {
    futures_util::stream::iter(due)
        .map(|(delivery_id, at)| {
            let mut client = client.clone();
            async move {
                client
                    .report_verification(v1::ReportVerificationRequest {
                        delivery_id,
                        verified: true,
                        at: Some(timestamp_to_proto(at)),
                    })
                    .await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .context("ReportVerification")?;
    Ok(())
}

/// Keeps the first SENT, DELIVERED or FAILED event of each delivery.
async fn read_outcomes(
    mut consumer: lapin::Consumer,
    outcomes: Outcomes,
    ended: Arc<tokio::sync::Notify>,
) {
    while let Some(Ok(delivery)) = consumer.next().await {
        let Ok(report) = serde_json::from_slice::<serde_json::Value>(&delivery.data) else {
            continue;
        };
        let status = report["status"].as_str().unwrap_or_default().to_owned();
        if !matches!(status.as_str(), "SENT" | "DELIVERED" | "FAILED") {
            continue;
        }
        let id = report["delivery_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let reason = report["reason"].as_str().map(str::to_owned);
        outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_insert((status, reason));
        ended.notify_waiters();
    }
}

async fn wait_for_outcomes(
    outcomes: &Outcomes,
    ended: &tokio::sync::Notify,
    wanted: &[String],
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let notified = ended.notified();
        {
            let seen = outcomes.lock().unwrap_or_else(|p| p.into_inner());
            let missing = wanted.iter().filter(|id| !seen.contains_key(*id)).count();
            if missing == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("{missing} jobs had no outcome within 60 s");
            }
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}
