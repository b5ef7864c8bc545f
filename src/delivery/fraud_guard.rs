//! The fraud guard at work. Every `evaluate_every`, each replica writes its counts to the store
//! and judges the ranges it sent to since the last time, from the counts every replica wrote
//! (`policy::guard` decides); a suspected range is held in the store, once for all replicas,
//! and announced. The holds in force are read back into memory at the same pace, so the gate
//! consults memory only: a hold made at one replica, or an operator's pin or lift, applies at
//! every replica within `evaluate_every`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::destinations::DestinationCounter;
use crate::domain::Clock;
use crate::policy::guard::{baseline_hourly, evidence, suspected};
use crate::policy::{
    DestinationCount, Evidence, GuardMode, GuardPolicy, Quarantine, calling_code, destination_range,
};
use crate::store::{PolicyStore, StoreError};

/// How far back the recent counts are read and kept.
const RECENT_KEPT: SignedDuration = SignedDuration::from_hours(1);
/// How long a range's usual volume, and whether a tenant reports verifications, are reused.
const REREAD_AFTER: SignedDuration = SignedDuration::from_mins(10);

/// What the guard says about a send to one number.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum FraudVerdict {
    /// Nothing against it.
    Clear,
    /// Its range is suspected, and the tenant is in monitor mode: sent, and counted.
    Watched(Quarantine),
    /// Its range is held (enforce, or pinned by an operator): not sent.
    Held(Quarantine),
}

/// `fraud.suspected`: the guard held a range.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Suspicion {
    /// The tenant.
    pub tenant: String,
    /// The range (`+44770`): never a number.
    pub range: String,
    /// The tenant's mode: `enforce` (sends there fail with DESTINATION_SUSPENDED) or
    /// `monitor` (they go on).
    pub mode: GuardMode,
    /// Whether sends there are refused.
    pub held: bool,
    /// When it was held.
    pub since: Timestamp,
    /// When the hold ends (`None`: never on its own).
    pub until: Option<Timestamp>,
    /// The figures behind it.
    pub evidence: Evidence,
    /// The same in words.
    pub description: String,
}

impl Suspicion {
    fn of(quarantine: &Quarantine) -> Suspicion {
        Suspicion {
            tenant: quarantine.tenant.clone(),
            range: quarantine.range.clone(),
            mode: quarantine.mode,
            held: quarantine.mode == GuardMode::Enforce,
            since: quarantine.since,
            until: quarantine.until,
            evidence: quarantine.evidence.clone().unwrap_or_default(),
            description: quarantine.describe(),
        }
    }
}

/// The guard: the counts on their way to the store, the holds in memory, and the judging loop.
#[derive(Debug)]
pub struct FraudGuard {
    policy: Arc<dyn PolicyStore>,
    counter: DestinationCounter,
    settings: GuardPolicy,
    range_depth: u8,
    evaluate_every: Duration,
    metrics: Arc<crate::ops::Metrics>,
    /// Rows that are not over (held, or lifted lately), by (tenant, range).
    holds: RwLock<HashMap<(String, String), Quarantine>>,
    /// Usual hourly volume by (tenant, range), with when it was read.
    baselines: Mutex<HashMap<(String, String), (Timestamp, f64)>>,
    /// Whether a tenant reports verifications, with when it was read.
    converting: Mutex<HashMap<String, (Timestamp, bool)>>,
    /// Rounds done so far.
    rounds: tokio::sync::watch::Sender<u64>,
}

impl FraudGuard {
    /// A guard over `policy`'s counts (added up by its own counter) and quarantines.
    pub fn new(
        policy: Arc<dyn PolicyStore>,
        settings: GuardPolicy,
        range_depth: u8,
        evaluate_every: Duration,
        metrics: Arc<crate::ops::Metrics>,
    ) -> Self {
        FraudGuard {
            counter: DestinationCounter::new(Arc::clone(&policy)),
            policy,
            settings,
            range_depth,
            evaluate_every,
            metrics,
            holds: RwLock::default(),
            baselines: Mutex::default(),
            converting: Mutex::default(),
            rounds: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The number of rounds done so far, and changes to it: a round that starts after a
    /// send has been counted judges it.
    pub fn rounds(&self) -> tokio::sync::watch::Receiver<u64> {
        self.rounds.subscribe()
    }

    /// The counts of sends and conversions on their way to the store.
    pub fn counter(&self) -> &DestinationCounter {
        &self.counter
    }

    /// The guard's settings.
    pub fn settings(&self) -> &GuardPolicy {
        &self.settings
    }

    /// The range of `number` at the configured depth.
    pub fn range_of(&self, number: &str) -> Option<String> {
        destination_range(number, self.range_depth)
    }

    /// What the guard says about sending `tenant`'s `account` a code at `number` at `now`.
    pub(crate) fn verdict(
        &self,
        tenant: &str,
        account: &str,
        number: &str,
        now: Timestamp,
    ) -> FraudVerdict {
        let holds = self.holds.read().unwrap_or_else(|p| p.into_inner());
        // Nothing held anywhere (the usual case): no number to look up.
        if holds.is_empty() {
            return FraudVerdict::Clear;
        }
        let Some(range) = self.range_of(number) else {
            return FraudVerdict::Clear;
        };
        // The number's range, or its whole country.
        let Some(quarantine) = holds
            .get(&(tenant.to_owned(), range))
            .filter(|q| q.in_force(now))
            .or_else(|| {
                calling_code(number).and_then(|country| holds.get(&(tenant.to_owned(), country)))
            })
        else {
            return FraudVerdict::Clear;
        };
        if !quarantine.in_force(now) || self.settings.safe(tenant, account, number) {
            return FraudVerdict::Clear;
        }
        let mode = self.settings.mode(tenant);
        if quarantine.holds(mode, now) {
            FraudVerdict::Held(quarantine.clone())
        } else if mode == GuardMode::Monitor {
            FraudVerdict::Watched(quarantine.clone())
        } else {
            FraudVerdict::Clear
        }
    }

    /// The quarantines in force for `tenant` at `now` (from memory), by range.
    pub fn holds_of(&self, tenant: &str, now: Timestamp) -> BTreeMap<String, Quarantine> {
        self.holds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|((t, _), q)| t == tenant && q.in_force(now))
            .map(|((_, range), q)| (range.clone(), q.clone()))
            .collect()
    }

    /// Quarantines (held, expired or lifted), of one tenant or all, newest first.
    pub async fn list(&self, tenant: Option<&str>) -> Result<Vec<Quarantine>, StoreError> {
        self.policy.quarantines(tenant).await
    }

    /// Pins `range` of `tenant`: held until lifted, at every replica within `evaluate_every`
    /// (here at once).
    pub async fn pin(
        &self,
        tenant: &str,
        range: &str,
        note: &str,
        now: Timestamp,
    ) -> Result<Quarantine, StoreError> {
        let pinned = self.policy.pin_range(tenant, range, note, now).await?;
        self.remember(pinned.clone());
        Ok(pinned)
    }

    /// Lifts the hold on `range` of `tenant`; the guard leaves it alone for `hold_for`. `None`
    /// when it was not held.
    pub async fn lift(
        &self,
        tenant: &str,
        range: &str,
        note: &str,
        now: Timestamp,
    ) -> Result<Option<Quarantine>, StoreError> {
        let until = now + self.settings.thresholds.hold_for;
        let lifted = self
            .policy
            .lift_range(tenant, range, note, now, until)
            .await?;
        if let Some(lifted) = &lifted {
            self.remember(lifted.clone());
        }
        Ok(lifted)
    }

    fn remember(&self, quarantine: Quarantine) {
        self.holds
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                (quarantine.tenant.clone(), quarantine.range.clone()),
                quarantine,
            );
    }

    /// Reads the quarantines that are not over at `now` back into memory.
    pub async fn reload(&self, now: Timestamp) -> Result<(), StoreError> {
        let rows = self.policy.quarantines(None).await?;
        let holds = rows
            .into_iter()
            .filter(|q| q.settled(now))
            .map(|q| ((q.tenant.clone(), q.range.clone()), q))
            .collect();
        *self.holds.write().unwrap_or_else(|p| p.into_inner()) = holds;
        Ok(())
    }

    /// One round: stores the counts, reads the holds back, and judges the ranges sent to since
    /// the last round. The ranges held now are returned.
    pub async fn evaluate(&self, now: Timestamp) -> Result<Vec<Quarantine>, StoreError> {
        let written = self.counter.flush().await?;
        self.reload(now).await?;
        let mut by_tenant: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for count in written {
            if count.conversions > 0 {
                // A tenant that reports verifications is judged from its first one on.
                self.converting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(count.tenant.clone(), (now, true));
            }
            if count.sends > 0 {
                let ranges = by_tenant.entry(count.tenant).or_default();
                if !ranges.contains(&count.range) {
                    ranges.push(count.range);
                }
            }
        }
        let mut held = Vec::new();
        for (tenant, ranges) in by_tenant {
            let mode = self.settings.mode(&tenant);
            if mode == GuardMode::Off || !self.converts(&tenant, now).await? {
                continue;
            }
            // The ranges sent to, and their countries (a country never sent to is judged as a
            // whole: an attack spread over its ranges is a surge there), unless settled.
            let mut prefixes: Vec<String> = ranges.clone();
            for range in &ranges {
                if let Some(country) = calling_code(range)
                    && !prefixes.contains(&country)
                {
                    prefixes.push(country);
                }
            }
            prefixes.retain(|prefix| !self.settled(&tenant, prefix, now));
            for prefix in prefixes {
                let recent = self
                    .policy
                    .recent_destination_counts(
                        &tenant,
                        std::slice::from_ref(&prefix),
                        now - RECENT_KEPT,
                    )
                    .await?;
                let country = !ranges.contains(&prefix);
                // A country's surge counts only what its held ranges do not explain already.
                let recent: Vec<DestinationCount> = if country {
                    recent
                        .into_iter()
                        .filter(|c| !self.settled(&tenant, &c.range, now))
                        .collect()
                } else {
                    recent
                };
                if let Some(quarantine) = self
                    .judge(&tenant, &prefix, country, &recent, mode, now)
                    .await?
                {
                    held.push(quarantine);
                }
            }
        }
        Ok(held)
    }

    /// Whether the guard leaves `range` (or country) of `tenant` alone at `now`.
    fn settled(&self, tenant: &str, range: &str, now: Timestamp) -> bool {
        self.holds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(tenant.to_owned(), range.to_owned()))
            .is_some_and(|q| q.settled(now))
    }

    /// Judges one range, or with `country` a country's calling code (held only when it was
    /// never sent to over the baseline period); holds it when suspected (and no other replica
    /// did first).
    async fn judge(
        &self,
        tenant: &str,
        range: &str,
        country: bool,
        recent: &[DestinationCount],
        mode: GuardMode,
        now: Timestamp,
    ) -> Result<Option<Quarantine>, StoreError> {
        let thresholds = &self.settings.thresholds;
        // Everything but the volume against the usual first: the usual is a read.
        let mut seen = evidence(recent, 0.0, now, thresholds);
        if !suspected(&seen, thresholds) {
            return Ok(None);
        }
        seen.baseline_hourly = self.baseline(tenant, range, now).await?;
        if !suspected(&seen, thresholds) || (country && seen.baseline_hourly > 0.0) {
            return Ok(None);
        }
        let quarantine = Quarantine::suspected(tenant, range, mode, seen, now, thresholds.hold_for);
        if !self.policy.hold_range(&quarantine).await? {
            return Ok(None);
        }
        tracing::warn!(tenant, range, %mode, evidence = %quarantine.describe(), "fraud guard: range suspected of SMS pumping");
        self.metrics.fraud_suspected(tenant, range, mode.as_str());
        self.remember(quarantine.clone());
        Ok(Some(quarantine))
    }

    /// The usual sends per hour of `range`, or of every range of a country given its calling
    /// code (read at most every ten minutes).
    async fn baseline(&self, tenant: &str, range: &str, now: Timestamp) -> Result<f64, StoreError> {
        let key = (tenant.to_owned(), range.to_owned());
        if let Some((read, value)) = self.lock_baselines().get(&key)
            && now.duration_since(*read) < REREAD_AFTER
        {
            return Ok(*value);
        }
        let period = self.settings.thresholds.baseline;
        let hourly = self
            .policy
            .destination_counts(tenant, range, now - period)
            .await?;
        let value = baseline_hourly(&hourly, now, period);
        self.lock_baselines().insert(key, (now, value));
        Ok(value)
    }

    fn lock_baselines(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, String), (Timestamp, f64)>> {
        self.baselines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `tenant` reported a verification over the baseline period (read at most every
    /// ten minutes; once true, kept).
    async fn converts(&self, tenant: &str, now: Timestamp) -> Result<bool, StoreError> {
        if let Some((read, converts)) = self
            .converting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            && (*converts || now.duration_since(*read) < REREAD_AFTER)
        {
            return Ok(*converts);
        }
        let since = now - self.settings.thresholds.baseline;
        let converts = self.policy.tenant_converts(tenant, since).await?;
        self.converting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_owned(), (now, converts));
        Ok(converts)
    }

    /// Judges every `evaluate_every` until `stop` (then stores the last counts), sending each
    /// range it holds to `announce`; the recent counts older than an hour are pruned as it goes.
    pub async fn run(
        self: Arc<Self>,
        clock: Arc<dyn Clock>,
        announce: mpsc::UnboundedSender<Suspicion>,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.evaluate_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pruned: Option<Timestamp> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = clock.now();
            match self.evaluate(now).await {
                Ok(held) => {
                    for quarantine in &held {
                        let _ = announce.send(Suspicion::of(quarantine));
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "the fraud guard could not store its counts or judge ranges: tried again next round");
                }
            }
            self.rounds.send_modify(|rounds| *rounds += 1);
            if pruned.is_none_or(|at| now.duration_since(at) >= SignedDuration::from_mins(1)) {
                pruned = Some(now);
                if let Err(error) = self.policy.prune_recent_counts(now - RECENT_KEPT).await {
                    tracing::warn!(%error, "the fraud guard's old recent counts could not be pruned");
                }
            }
        }
        if let Err(error) = self.counter.flush().await {
            tracing::warn!(%error, "the fraud guard's last counts could not be stored");
        }
    }
}
