//! The gateway's Prometheus metrics, in Prometheus' conventions: counters end in `_total`,
//! durations are in seconds, and every label takes a bounded set of values (tenants and
//! providers as configured, channels, statuses, outcomes and reasons from their enums; never a
//! number, token, account or job id). One [`Metrics`] per gateway, shared by the parts that
//! count and read by the ops listener's `/metrics`.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::recent::{DeadLetter, Recent};
use crate::delivery::{CircuitState, ProviderHealth};
use crate::domain::{
    AttemptOutcome, Channel, DeliveryStatus, FailureReason, Report, SmsShape, TargetStatus,
};

/// A delivery's end.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    tenant: String,
    status: String,
    reason: String,
}

/// Upstream's report of the user entering the code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerificationLabels {
    tenant: String,
    verified: String,
}

/// A send the fraud guard held (or, in monitor mode, would have held), or a range it suspected.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FraudLabels {
    tenant: String,
    range: String,
    mode: String,
}

/// One provider call's end.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    provider: String,
    channel: String,
    outcome: String,
    reason: String,
}

/// A provider and channel.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    provider: String,
    channel: String,
}

/// Why a job was dead-lettered: the field the reason names.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeadLetterLabels {
    reason: String,
}

/// A provider.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

/// A receipt: its provider and what it said.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReceiptLabels {
    provider: String,
    outcome: String,
}

/// An SMS a provider took: the destination's ISO 3166 country and the text's encoding.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SmsLabels {
    country: String,
    encoding: String,
}

/// A provider's route: a channel and the route key (`*` or a configured prefix).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    provider: String,
    channel: String,
    route: String,
}

/// A ledger backend and the kind of grouped write it committed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommitLabels {
    backend: String,
    statement: String,
}

/// A channel.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabels {
    channel: String,
}

/// Number shapes whose country [`Metrics::country`] keeps.
const COUNTRY_SHAPES: usize = 4096;

/// How many tenants get a label value of their own; the rest are counted as `_other`, so that
/// a producer inventing tenants cannot grow the series without bound.
const TENANT_LABELS: usize = 200;

/// From taking a job to a provider accepting its code, or to its delivery: 50 ms to 10 min.
const DELIVERY_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// How long a job waited in the queue: 10 ms to 10 min.
const QUEUE_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
];

/// Ledger commits: 0.25 ms to 2.5 s.
const COMMIT_BUCKETS: [f64; 12] = [
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5,
];

/// Writes per ledger commit: 1 to 512 (the most one group takes).
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Provider call durations, 5 ms to 30 s.
const CALL_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
];

/// The gateway's metrics.
pub struct Metrics {
    registry: Registry,
    tenants: Mutex<HashSet<String>>,
    /// The last hour, for the status page.
    recent: Mutex<Recent>,
    /// Countries of the numbers SMS went to, by number shape (see [`Metrics::country`]).
    countries: Mutex<std::collections::HashMap<(String, usize), Option<String>>>,
    deliveries: Family<DeliveryLabels, Counter>,
    settled: Family<DeliveryLabels, Counter>,
    verifications: Family<VerificationLabels, Counter>,
    fraud_held: Family<FraudLabels, Counter>,
    fraud_suspected: Family<FraudLabels, Counter>,
    first_send: Family<ChannelLabels, Histogram>,
    delivered: Family<ChannelLabels, Histogram>,
    queue_wait: Histogram,
    receipts: Family<ReceiptLabels, Counter>,
    sms: Family<SmsLabels, Counter>,
    sms_segments: Family<SmsLabels, Counter>,
    commit_duration: Family<CommitLabels, Histogram>,
    commit_writes: Family<CommitLabels, Histogram>,
    attempts: Family<AttemptLabels, Counter>,
    call_duration: Family<CallLabels, Histogram>,
    dead_letters: Family<DeadLetterLabels, Counter>,
    in_flight: Gauge<i64, AtomicI64>,
    broker_connected: Gauge<i64, AtomicI64>,
    circuit_open: Family<ProviderLabels, Gauge<i64, AtomicI64>>,
    route_circuit_open: Family<RouteLabels, Gauge<i64, AtomicI64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric at zero, registered under the `otp_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("otp");
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "deliveries",
            "Deliveries the engine ended, by tenant, the status they ended with (SENT until a \
             receipt says more) and headline reason (empty when none)",
            deliveries.clone(),
        );
        let settled = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "deliveries_settled",
            "SENT deliveries a later receipt or acknowledgement settled, by tenant, the status \
             it gave them (DELIVERED or FAILED) and headline reason",
            settled.clone(),
        );
        let verifications = Family::<VerificationLabels, Counter>::default();
        registry.register(
            "verifications",
            "Verification reports that changed a delivery (ReportVerification, or the queue's \
             verification messages), by tenant and whether the user entered the code (true) \
             or not (false)",
            verifications.clone(),
        );
        let fraud_held = Family::<FraudLabels, Counter>::default();
        registry.register(
            "fraud_held_sends",
            "SMS and calls to a range the fraud guard holds, by tenant, range and mode: held \
             (enforce, or a pinned range) or sent anyway (monitor)",
            fraud_held.clone(),
        );
        let fraud_suspected = Family::<FraudLabels, Counter>::default();
        registry.register(
            "fraud_suspected_ranges",
            "Ranges the fraud guard suspected of SMS pumping and held, by tenant, range and the \
             tenant's mode then",
            fraud_suspected.clone(),
        );
        let delivery_histogram = || {
            Family::<ChannelLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(DELIVERY_BUCKETS)
            })
        };
        let first_send = delivery_histogram();
        registry.register_with_unit(
            "time_to_first_send",
            "From the gateway taking a job (SendCode, or its first claim from the queue) to the \
             first provider accepting the code, by that attempt's channel",
            Unit::Seconds,
            first_send.clone(),
        );
        let delivered = delivery_histogram();
        registry.register_with_unit(
            "time_to_delivered",
            "From the gateway taking a job to the delivery becoming DELIVERED (a carrier's \
             receipt or the device's acknowledgement), by the delivering attempt's channel",
            Unit::Seconds,
            delivered.clone(),
        );
        let queue_wait = Histogram::new(QUEUE_BUCKETS);
        registry.register_with_unit(
            "queue_wait",
            "How long jobs waited in the queue: from the AMQP timestamp property their producer \
             set (whole seconds) to the gateway taking them; jobs without one are not counted",
            Unit::Seconds,
            queue_wait.clone(),
        );
        let receipts = Family::<ReceiptLabels, Counter>::default();
        registry.register(
            "receipts",
            "Delivery receipts from providers, by provider and outcome (DELIVERED, FAILED, or \
             UNMATCHED when no attempt has the receipt's message id)",
            receipts.clone(),
        );
        let sms = Family::<SmsLabels, Counter>::default();
        registry.register(
            "sms",
            "SMS a provider accepted, by destination country (ISO 3166 alpha-2 from \
             libphonenumber, ZZ when unknown) and encoding (GSM_7 or UCS_2)",
            sms.clone(),
        );
        let sms_segments = Family::<SmsLabels, Counter>::default();
        registry.register(
            "sms_segments",
            "Segments of the SMS a provider accepted (what carriers bill), by destination \
             country and encoding",
            sms_segments.clone(),
        );
        let attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "attempts",
            "Provider calls ended, by provider, channel, outcome (SENT: the provider took the \
             message; FAILED) and reason (empty when sent)",
            attempts.clone(),
        );
        let call_duration =
            Family::<CallLabels, Histogram>::new_with_constructor(|| Histogram::new(CALL_BUCKETS));
        registry.register_with_unit(
            "provider_call_duration",
            "How long provider calls took, by provider and channel (a timed-out call counts \
             the timeout)",
            Unit::Seconds,
            call_duration.clone(),
        );
        let dead_letters = Family::<DeadLetterLabels, Counter>::default();
        registry.register(
            "dead_letters",
            "Jobs the gateway dead-lettered, by the field its reason names (x-otp-error-field)",
            dead_letters.clone(),
        );
        let in_flight = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "jobs_in_flight",
            "Jobs taken from the queue and not yet acked or handed back",
            in_flight.clone(),
        );
        let broker_connected = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "broker_connected",
            "1 while the gateway consumes from the broker, else 0",
            broker_connected.clone(),
        );
        let circuit_open = Family::<ProviderLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "provider_circuit_open",
            "1 while a provider's circuit is open (calls refused until its cool-down ends), \
             else 0 (closed, or half open: a probe call is allowed)",
            circuit_open.clone(),
        );
        let commit_duration = Family::<CommitLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(COMMIT_BUCKETS)
        });
        registry.register_with_unit(
            "ledger_commit_duration",
            "How long the ledger's group commits took, by backend and the kind of grouped write \
             (sqlite: one transaction of every write waiting; postgres: one multi-row statement \
             per kind)",
            Unit::Seconds,
            commit_duration.clone(),
        );
        let commit_writes = Family::<CommitLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(BATCH_BUCKETS)
        });
        registry.register(
            "ledger_commit_writes",
            "Writes per ledger group commit (deliveries' writes sharing one commit), by backend \
             and kind",
            commit_writes.clone(),
        );
        let route_circuit_open = Family::<RouteLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "route_circuit_open",
            "1 while the circuit of a provider's route (a channel and a destination prefix, `*` \
             for the rest) is open, else 0",
            route_circuit_open.clone(),
        );
        Metrics {
            registry,
            route_circuit_open,
            commit_duration,
            commit_writes,
            tenants: Mutex::default(),
            recent: Mutex::default(),
            countries: Mutex::default(),
            deliveries,
            settled,
            verifications,
            fraud_held,
            fraud_suspected,
            first_send,
            delivered,
            queue_wait,
            receipts,
            sms,
            sms_segments,
            attempts,
            call_duration,
            dead_letters,
            in_flight,
            broker_connected,
            circuit_open,
        }
    }

    /// `tenant`, or `_other` once [`TENANT_LABELS`] others have a series.
    fn tenant(&self, tenant: &str) -> String {
        let mut seen = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(tenant) {
            return tenant.to_owned();
        }
        if seen.len() < TENANT_LABELS {
            seen.insert(tenant.to_owned());
            return tenant.to_owned();
        }
        "_other".to_owned()
    }

    fn delivery_labels(&self, report: &Report) -> DeliveryLabels {
        DeliveryLabels {
            tenant: self.tenant(&report.tenant),
            status: report.status.as_str().to_owned(),
            reason: report
                .reason
                .map(FailureReason::as_str)
                .unwrap_or_default()
                .to_owned(),
        }
    }

    /// The engine ended a delivery (its final report): counted, and how long its code took to
    /// reach a provider that accepted it.
    pub fn delivery_ended(&self, report: &Report) {
        if !report.status.is_terminal() {
            return;
        }
        let labels = self.delivery_labels(report);
        self.recent()
            .delivery(report.updated_at, &labels.status, &labels.reason);
        self.deliveries.get_or_create(&labels).inc();
        let first = report
            .targets
            .iter()
            .flat_map(|t| &t.attempts)
            .filter(|a| matches!(a.outcome, AttemptOutcome::Sent | AttemptOutcome::Delivered))
            .filter_map(|a| Some((a.ended_at?, a.channel)))
            .min_by_key(|(at, _)| *at);
        if let Some((at, channel)) = first {
            self.first_send
                .get_or_create(&ChannelLabels {
                    channel: channel.as_str().to_owned(),
                })
                .observe(seconds_between(report.created_at, at));
        }
        self.delivered_after(report);
    }

    /// A receipt or acknowledgement settled a SENT delivery (its final report).
    pub fn delivery_settled(&self, report: &Report) {
        self.settled
            .get_or_create(&self.delivery_labels(report))
            .inc();
        self.delivered_after(report);
    }

    fn delivered_after(&self, report: &Report) {
        if report.status != DeliveryStatus::Delivered {
            return;
        }
        let channel = report
            .targets
            .iter()
            .find(|t| t.status == TargetStatus::Delivered)
            .map_or(Channel::Sms, |t| t.channel);
        self.delivered
            .get_or_create(&ChannelLabels {
                channel: channel.as_str().to_owned(),
            })
            .observe(seconds_between(report.created_at, report.updated_at));
    }

    /// A job taken from the queue that its producer stamped (AMQP `timestamp`, whole seconds)
    /// `waited` ago.
    pub fn queue_waited(&self, waited: std::time::Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }

    /// Upstream reported that a `tenant`'s user entered the code (`verified`) or did not.
    pub fn verified(&self, tenant: &str, verified: bool) {
        self.verifications
            .get_or_create(&VerificationLabels {
                tenant: self.tenant(tenant),
                verified: verified.to_string(),
            })
            .inc();
    }

    /// A send of `tenant` to `range` met a hold of the fraud guard: refused in `enforce` (or
    /// when pinned), sent anyway in `monitor`.
    pub fn fraud_held(&self, tenant: &str, range: &str, mode: &str) {
        self.fraud_held
            .get_or_create(&FraudLabels {
                tenant: self.tenant(tenant),
                range: range.to_owned(),
                mode: mode.to_owned(),
            })
            .inc();
    }

    /// The fraud guard held `range` of `tenant` (in `mode`).
    pub fn fraud_suspected(&self, tenant: &str, range: &str, mode: &str) {
        self.fraud_suspected
            .get_or_create(&FraudLabels {
                tenant: self.tenant(tenant),
                range: range.to_owned(),
                mode: mode.to_owned(),
            })
            .inc();
    }

    /// A provider's delivery receipt arrived: `outcome`, or `None` when it matched no attempt.
    pub fn receipt(&self, provider: &str, outcome: Option<AttemptOutcome>) {
        self.receipts
            .get_or_create(&ReceiptLabels {
                provider: provider.to_owned(),
                outcome: outcome
                    .map_or("UNMATCHED", AttemptOutcome::as_str)
                    .to_owned(),
            })
            .inc();
    }

    /// The ISO 3166 country of `number` for the SMS metrics. libphonenumber's parse costs more
    /// than the rest of a send's accounting, so the answer is kept per number shape: the number
    /// without its last four digits, and its length (a region never turns on the subscriber's
    /// last digits). At most [`COUNTRY_SHAPES`] shapes are kept; then the memory starts afresh.
    pub fn country(&self, number: &str) -> Option<String> {
        let shape = (
            number
                .get(..number.len().saturating_sub(4))
                .unwrap_or(number)
                .to_owned(),
            number.len(),
        );
        let mut countries = self.countries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(country) = countries.get(&shape) {
            return country.clone();
        }
        let country = crate::policy::country_of(number);
        if countries.len() >= COUNTRY_SHAPES {
            countries.clear();
        }
        countries.insert(shape, country.clone());
        country
    }

    /// A provider accepted an SMS to `country` (ISO 3166 alpha-2, `None` when unknown).
    pub fn sms_accepted(&self, country: Option<&str>, shape: SmsShape) {
        let labels = SmsLabels {
            country: country.unwrap_or("ZZ").to_owned(),
            encoding: shape.encoding.as_str().to_owned(),
        };
        self.sms.get_or_create(&labels).inc();
        self.sms_segments
            .get_or_create(&labels)
            .inc_by(u64::from(shape.segments));
    }

    /// A provider call ended after `took`: sent, or failed with `reason`.
    pub fn call_ended(
        &self,
        provider: &str,
        channel: Channel,
        failed: Option<FailureReason>,
        took: std::time::Duration,
    ) {
        self.attempts
            .get_or_create(&AttemptLabels {
                provider: provider.to_owned(),
                channel: channel.as_str().to_owned(),
                outcome: if failed.is_some() { "FAILED" } else { "SENT" }.to_owned(),
                reason: failed
                    .map(FailureReason::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            })
            .inc();
        self.call_duration
            .get_or_create(&CallLabels {
                provider: provider.to_owned(),
                channel: channel.as_str().to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Deliveries the engine ended in the hour before `now`, by (status, reason), most first.
    pub fn last_hour(&self, now: jiff::Timestamp) -> Vec<(String, String, u32)> {
        self.recent().last_hour(now)
    }

    /// The newest dead letters, newest first.
    pub fn recent_dead_letters(&self) -> Vec<DeadLetter> {
        self.recent().dead_letters()
    }

    /// A job was dead-lettered for a reason naming `field`: `problem` (never the code).
    pub fn dead_lettered(&self, field: &str, problem: &str) {
        self.recent().dead_letter(DeadLetter {
            at: jiff::Timestamp::now(),
            field: field.to_owned(),
            problem: problem.to_owned(),
        });
        self.dead_letters
            .get_or_create(&DeadLetterLabels {
                reason: field.to_owned(),
            })
            .inc();
    }

    /// A job was taken from the queue (`+1`) or let go (`-1`).
    pub fn in_flight(&self, change: i64) {
        self.in_flight.inc_by(change);
    }

    /// The metrics in Prometheus' text format, with the broker link's state and the
    /// providers' circuits as they are now.
    pub fn render(&self, broker_connected: bool, providers: &[ProviderHealth]) -> String {
        self.broker_connected.set(i64::from(broker_connected));
        for provider in providers {
            let open = provider.circuit.state == CircuitState::Open;
            self.circuit_open
                .get_or_create(&ProviderLabels {
                    provider: provider.name.clone(),
                })
                .set(i64::from(open));
            for (route, channel, circuit) in &provider.routes {
                self.route_circuit_open
                    .get_or_create(&RouteLabels {
                        provider: provider.name.clone(),
                        channel: channel.as_str().to_owned(),
                        route: route.clone(),
                    })
                    .set(i64::from(circuit.state == CircuitState::Open));
            }
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String does not fail");
        text
    }
}

impl crate::store::CommitObserver for Metrics {
    fn committed(
        &self,
        backend: &'static str,
        statement: &'static str,
        writes: usize,
        took: std::time::Duration,
    ) {
        let labels = CommitLabels {
            backend: backend.to_owned(),
            statement: statement.to_owned(),
        };
        self.commit_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        self.commit_writes
            .get_or_create(&labels)
            .observe(writes as f64);
    }
}

/// Seconds from `from` to `to` (0 when `to` is earlier).
fn seconds_between(from: jiff::Timestamp, to: jiff::Timestamp) -> f64 {
    (to.as_millisecond() - from.as_millisecond()).max(0) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    fn ended(tenant: &str, status: DeliveryStatus) -> Report {
        Report {
            verification: None,
            delivery_id: format!("{tenant}/j1"),
            tenant: tenant.into(),
            job_id: "j1".into(),
            account: "user-42".into(),
            purpose: "sign_in".into(),
            status,
            reason: None,
            hint: None,
            summary: String::new(),
            created_at: Timestamp::UNIX_EPOCH,
            updated_at: Timestamp::from_second(2).unwrap(),
            expires_at: Timestamp::from_second(300).unwrap(),
            targets: Vec::new(),
        }
    }

    #[test]
    fn countries_are_kept_per_number_shape_and_agree_with_libphonenumber() {
        let metrics = Metrics::new();
        for number in [
            "+14155550101",
            "+14155550199",
            "+14165550101",
            "+447700900123",
            "+447911123456",
            "+4930123456789",
            "+999123",
        ] {
            assert_eq!(
                metrics.country(number),
                crate::policy::country_of(number),
                "{number}"
            );
        }
        // Numbers that differ in their last four digits share one entry.
        assert_eq!(metrics.countries.lock().unwrap().len(), 6);
    }

    #[test]
    fn tenants_past_the_bound_share_one_series() {
        let metrics = Metrics::new();
        for n in 0..TENANT_LABELS + 5 {
            metrics.delivery_ended(&ended(&format!("t{n}"), DeliveryStatus::Sent));
        }
        // A tenant seen before the bound keeps its series.
        metrics.delivery_ended(&ended("t0", DeliveryStatus::Sent));
        let text = metrics.render(true, &[]);
        assert!(text.contains(r#"otp_deliveries_total{tenant="t0",status="SENT",reason=""} 2"#));
        assert!(
            text.contains(r#"otp_deliveries_total{tenant="_other",status="SENT",reason=""} 5"#),
            "{text}"
        );
        assert!(!text.contains(&format!("tenant=\"t{TENANT_LABELS}\"")));
    }

    #[test]
    fn only_ended_deliveries_count_and_a_delivered_one_is_timed() {
        let metrics = Metrics::new();
        metrics.delivery_ended(&ended("acme", DeliveryStatus::Deferred));
        metrics.delivery_settled(&ended("acme", DeliveryStatus::Delivered));
        let text = metrics.render(false, &[]);
        assert!(!text.contains("otp_deliveries_total{"), "{text}");
        assert!(text.contains(
            r#"otp_deliveries_settled_total{tenant="acme",status="DELIVERED",reason=""} 1"#
        ));
        assert!(
            text.contains(r#"otp_time_to_delivered_seconds_sum{channel="sms"} 2.0"#),
            "{text}"
        );
        assert!(text.contains("otp_broker_connected 0"));
    }

    /// Every metric, with one series each, as the gateway writes them.
    fn every_metric() -> String {
        use crate::delivery::BreakerSnapshot;
        use crate::domain::{Attempt, TargetResult};
        let metrics = Metrics::new();
        let mut sent = ended("acme", DeliveryStatus::Sent);
        sent.targets = vec![TargetResult {
            index: 0,
            channel: Channel::Sms,
            target: "+1415•••0101".into(),
            platform: None,
            status: TargetStatus::Sent,
            reason: None,
            hint: None,
            detail: None,
            acknowledgement: None,
            attempts: vec![Attempt {
                provider: "twilio".into(),
                channel: Channel::Sms,
                target: "+1415•••0101".into(),
                started_at: Timestamp::UNIX_EPOCH,
                ended_at: Some(Timestamp::from_second(1).unwrap()),
                outcome: AttemptOutcome::Sent,
                reason: None,
                provider_code: None,
                provider_message: None,
                retry: 0,
                provider_message_id: Some("SM1".into()),
                next_retry_at: None,
                sms: None,
                token_invalid_since: None,
            }],
        }];
        metrics.delivery_ended(&sent);
        metrics.delivery_settled(&ended("acme", DeliveryStatus::Delivered));
        metrics.call_ended(
            "twilio",
            Channel::Sms,
            None,
            std::time::Duration::from_millis(80),
        );
        metrics.dead_lettered("tenant", "is required");
        metrics.in_flight(1);
        metrics.queue_waited(std::time::Duration::from_secs(1));
        metrics.receipt("twilio", Some(AttemptOutcome::Delivered));
        let shape = SmsShape {
            encoding: crate::domain::SmsEncoding::Gsm7,
            segments: 1,
        };
        metrics.sms_accepted(Some("US"), shape);
        let health = ProviderHealth {
            name: "twilio".into(),
            kind: "twilio",
            circuit: BreakerSnapshot {
                state: CircuitState::Open,
                reopens_in: None,
                error_rate: 1.0,
                calls: 5,
                latency: None,
                last_error: None,
            },
            routes: Vec::new(),
        };
        metrics.render(true, &[health])
    }

    #[test]
    fn the_alert_rules_and_the_dashboard_use_metrics_the_gateway_writes() {
        // The samples' names, and the histograms' family names (which annotations mention).
        let mut written: HashSet<String> = every_metric()
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect();
        let histograms: Vec<String> = written
            .iter()
            .filter_map(|name| name.strip_suffix("_bucket"))
            .map(str::to_owned)
            .collect();
        written.extend(histograms);
        for (file, text) in [
            (
                "deploy/prometheus/otp-gateway.rules.yml",
                include_str!("../../deploy/prometheus/otp-gateway.rules.yml"),
            ),
            (
                "deploy/grafana/dashboards/otp-gateway.json",
                include_str!("../../deploy/grafana/dashboards/otp-gateway.json"),
            ),
        ] {
            let mut named = 0;
            for (at, _) in text.match_indices("otp_") {
                let before = text[..at].chars().next_back();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                    continue;
                }
                let name: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    written.contains(&name),
                    "{file} uses {name}, which the gateway does not write: {written:?}"
                );
                named += 1;
            }
            assert!(named >= 6, "{file} names only {named} metrics");
        }
        let dashboard: serde_json::Value = serde_json::from_str(include_str!(
            "../../deploy/grafana/dashboards/otp-gateway.json"
        ))
        .unwrap();
        assert_eq!(dashboard["uid"], "otp-gateway");
        for panel in dashboard["panels"].as_array().unwrap() {
            assert!(
                !panel["targets"].as_array().unwrap().is_empty(),
                "{}",
                panel["title"]
            );
        }
    }
}
