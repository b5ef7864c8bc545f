//! The fraud guard's decision: whether a number range looks pumped. A range is suspected when
//! its send volume over the last few minutes rises above `volume_factor` × its usual hourly
//! volume (or above a floor, for a range or country never sent to before) while the codes
//! sent there are not being used: of its last `sample` sends old enough to have been used
//! (`grace`), fewer than `min_conversion` were. Both must hold: a marketing burst converts, and
//! a quiet range with a few unused codes is no surge. Pure: counts and `now` in, a verdict out.

use std::collections::{BTreeMap, HashSet};

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use super::fraud::{BUCKET, DestinationCount, bucket_of};
use crate::domain::string_enum;

/// The length of one recent bucket: the resolution the guard judges the last minutes at.
pub const RECENT_BUCKET: SignedDuration = SignedDuration::from_secs(10);

/// The start of the recent bucket `at` falls in.
pub fn recent_bucket_of(at: Timestamp) -> Timestamp {
    let width = RECENT_BUCKET.as_secs();
    Timestamp::from_second(at.as_second().div_euclid(width) * width).unwrap_or(at)
}

/// What the guard does for a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GuardMode {
    /// Nothing is judged (the counts are still kept).
    Off,
    /// Suspected ranges are recorded and announced (`fraud.suspected`), and sends go on.
    #[default]
    Monitor,
    /// Suspected ranges are held: SMS and calls there fail with `DESTINATION_SUSPENDED`.
    Enforce,
}

string_enum!(GuardMode {
    Off => "off",
    Monitor => "monitor",
    Enforce => "enforce",
});

/// The thresholds (`[fraud]` in the configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct GuardThresholds {
    /// The recent window the volume is measured over.
    pub window: SignedDuration,
    /// How many times its usual hourly volume a range must be sending at (the window's sends
    /// scaled to an hour).
    pub volume_factor: f64,
    /// The fewest sends in the window that can be a surge (a new range's or country's floor).
    pub min_window_sends: u64,
    /// How far back a range's usual volume is averaged.
    pub baseline: SignedDuration,
    /// How many of the newest sends old enough to have been used are judged.
    pub sample: u64,
    /// The share of those whose code was entered below which the range is suspected.
    pub min_conversion: f64,
    /// How old a send must be before an unused code counts against its range.
    pub grace: SignedDuration,
    /// How long a range is held, and how long a lifted range is not held again by the guard.
    pub hold_for: SignedDuration,
}

impl Default for GuardThresholds {
    fn default() -> Self {
        GuardThresholds {
            window: SignedDuration::from_mins(10),
            volume_factor: 5.0,
            min_window_sends: 10,
            baseline: SignedDuration::from_hours(7 * 24),
            sample: 15,
            min_conversion: 0.2,
            grace: SignedDuration::from_secs(60),
            hold_for: SignedDuration::from_hours(1),
        }
    }
}

/// The guard's settings for one tenant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantGuard {
    /// What the guard does.
    pub mode: GuardMode,
    /// Accounts whose codes are never held.
    pub safe_accounts: HashSet<String>,
    /// Numbers never held.
    pub safe_numbers: HashSet<String>,
}

/// The guard's settings for every tenant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuardPolicy {
    /// When a range is suspected, and for how long it is held.
    pub thresholds: GuardThresholds,
    /// The mode of tenants not in `tenants`.
    pub default_mode: GuardMode,
    /// Numbers never held, for any tenant.
    pub safe_numbers: HashSet<String>,
    /// Tenants with settings of their own.
    pub tenants: BTreeMap<String, TenantGuard>,
}

impl GuardPolicy {
    /// The mode of `tenant`.
    pub fn mode(&self, tenant: &str) -> GuardMode {
        self.tenants
            .get(tenant)
            .map_or(self.default_mode, |t| t.mode)
    }

    /// Whether a send of `tenant`'s `account` to `number` is on a safe list.
    pub fn safe(&self, tenant: &str, account: &str, number: &str) -> bool {
        self.safe_numbers.contains(number)
            || self.tenants.get(tenant).is_some_and(|t| {
                t.safe_accounts.contains(account) || t.safe_numbers.contains(number)
            })
    }
}

/// What the guard saw of a range: the figures behind a suspicion, kept with the quarantine and
/// sent in `fraud.suspected`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Evidence {
    /// Sends in the recent window.
    pub window_sends: u64,
    /// The window, in seconds.
    pub window_secs: u64,
    /// The window's sends scaled to an hour.
    pub hourly_rate: f64,
    /// The range's usual sends per hour (its average over the baseline period).
    pub baseline_hourly: f64,
    /// The newest sends old enough to have been used that were judged.
    pub judged_sends: u64,
    /// Of those, the ones whose code the user entered.
    pub judged_conversions: u64,
}

impl Evidence {
    /// The share of judged codes that were used (1 when none was judged).
    pub fn conversion(&self) -> f64 {
        if self.judged_sends == 0 {
            1.0
        } else {
            self.judged_conversions as f64 / self.judged_sends as f64
        }
    }

    /// "84 sends in the last 10 min (504/h, usually 4.2/h); 0 of the last 15 codes used (0 %)".
    pub fn describe(&self) -> String {
        format!(
            "{} sends in the last {} min ({:.0}/h, usually {:.1}/h); {} of the last {} codes used ({:.0} %)",
            self.window_sends,
            self.window_secs / 60,
            self.hourly_rate,
            self.baseline_hourly,
            self.judged_conversions,
            self.judged_sends,
            self.conversion() * 100.0
        )
    }
}

/// The evidence about one range at `now`, from its recent buckets (any order) and its usual
/// hourly volume.
pub fn evidence(
    recent: &[DestinationCount],
    baseline_hourly: f64,
    now: Timestamp,
    thresholds: &GuardThresholds,
) -> Evidence {
    let window_start = now - thresholds.window;
    let window_sends: u64 = recent
        .iter()
        .filter(|c| c.bucket >= window_start && c.bucket <= now)
        .map(|c| c.sends)
        .sum();
    let hours = thresholds.window.as_secs_f64() / 3600.0;
    // The newest buckets that ended at least `grace` ago, newest first, until `sample` sends.
    let mut mature: Vec<&DestinationCount> = recent
        .iter()
        .filter(|c| c.bucket + RECENT_BUCKET + thresholds.grace <= now)
        .collect();
    mature.sort_by_key(|c| std::cmp::Reverse(c.bucket));
    let (mut judged_sends, mut judged_conversions) = (0, 0);
    for count in mature {
        if judged_sends >= thresholds.sample {
            break;
        }
        judged_sends += count.sends;
        judged_conversions += count.conversions.min(count.sends);
    }
    Evidence {
        window_sends,
        window_secs: thresholds.window.as_secs().max(0) as u64,
        hourly_rate: if hours > 0.0 {
            window_sends as f64 / hours
        } else {
            0.0
        },
        baseline_hourly,
        judged_sends,
        judged_conversions,
    }
}

/// Whether `evidence` is a surge of unused codes: the volume is over its floor and over
/// `volume_factor` × the usual, and at least `sample` judged sends converted below
/// `min_conversion`.
pub fn suspected(evidence: &Evidence, thresholds: &GuardThresholds) -> bool {
    evidence.window_sends >= thresholds.min_window_sends
        && evidence.hourly_rate > thresholds.volume_factor * evidence.baseline_hourly
        && evidence.judged_sends >= thresholds.sample
        && evidence.conversion() < thresholds.min_conversion
}

/// A range's usual sends per hour at `now`: its hourly counts over the baseline period before
/// the current hour, averaged over the hours since the first of them (a range first sent to
/// two days ago is averaged over two days, not a week). 0 for a range never sent to.
pub fn baseline_hourly(
    hourly: &[DestinationCount],
    now: Timestamp,
    baseline: SignedDuration,
) -> f64 {
    let this_hour = bucket_of(now);
    let from = this_hour - baseline;
    let past = hourly
        .iter()
        .filter(|c| c.bucket >= from && c.bucket < this_hour);
    let (sends, first) = past.fold((0u64, None::<Timestamp>), |(sends, first), c| {
        (
            sends + c.sends,
            Some(first.map_or(c.bucket, |f| f.min(c.bucket))),
        )
    });
    let Some(first) = first else {
        return 0.0;
    };
    let hours = this_hour.duration_since(first).as_secs() / BUCKET.as_secs();
    sends as f64 / hours.max(1) as f64
}

/// Whether a quarantine holds sends or has been lifted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuarantineState {
    /// Held (in force until `until`, or until lifted when pinned).
    Held,
    /// Lifted by an operator: the guard does not hold the range again before `until`.
    Lifted,
}

string_enum!(QuarantineState {
    Held => "held",
    Lifted => "lifted",
});

/// A range the guard (or an operator) holds for a tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct Quarantine {
    /// The tenant.
    pub tenant: String,
    /// The range (`+44770`).
    pub range: String,
    /// Held or lifted.
    pub state: QuarantineState,
    /// When it was held.
    pub since: Timestamp,
    /// When the hold ends (for a lifted one: until when the guard leaves the range alone);
    /// `None` for a pinned hold, which lasts until lifted.
    pub until: Option<Timestamp>,
    /// The tenant's mode when the guard held it (`enforce` for an operator's pin).
    pub mode: GuardMode,
    /// What the guard saw; `None` for a range an operator pinned before the guard held it.
    pub evidence: Option<Evidence>,
    /// Who held or lifted it, and why, in words.
    pub note: String,
    /// When it last changed.
    pub updated_at: Timestamp,
}

impl Quarantine {
    /// A hold by the guard at `now`, for `hold_for`.
    pub fn suspected(
        tenant: &str,
        range: &str,
        mode: GuardMode,
        evidence: Evidence,
        now: Timestamp,
        hold_for: SignedDuration,
    ) -> Quarantine {
        Quarantine {
            tenant: tenant.to_owned(),
            range: range.to_owned(),
            state: QuarantineState::Held,
            since: now,
            until: Some(now + hold_for),
            mode,
            evidence: Some(evidence),
            note: "held by the fraud guard".to_owned(),
            updated_at: now,
        }
    }

    /// Whether it holds the range at `now`.
    pub fn in_force(&self, now: Timestamp) -> bool {
        self.state == QuarantineState::Held && self.until.is_none_or(|until| until > now)
    }

    /// Whether it was pinned by an operator (held until lifted).
    pub fn pinned(&self) -> bool {
        self.state == QuarantineState::Held && self.until.is_none()
    }

    /// Whether the guard leaves the range alone at `now`: held already, or lifted recently.
    pub fn settled(&self, now: Timestamp) -> bool {
        self.until.is_none_or(|until| until > now)
    }

    /// Whether sends to the range are refused at `now` for a tenant in `mode`: a pin always
    /// holds, the guard's own hold only in `enforce`.
    pub fn holds(&self, mode: GuardMode, now: Timestamp) -> bool {
        self.in_force(now) && (self.pinned() || mode == GuardMode::Enforce)
    }

    /// "range" for a number range, "country" for a country's calling code.
    pub fn scope(&self) -> &'static str {
        if super::fraud::calling_code(&self.range).as_deref() == Some(self.range.as_str()) {
            "country"
        } else {
            "range"
        }
    }

    /// "range +44770 held since 2026-12-07T10:00:00Z until …: 84 sends in the last 10 min …".
    pub fn describe(&self) -> String {
        let until = match self.until {
            Some(until) => format!("until {until}"),
            None => "until an operator lifts it".to_owned(),
        };
        let why = match &self.evidence {
            Some(evidence) => evidence.describe(),
            None => self.note.clone(),
        };
        format!(
            "{} {} {} since {} {until} ({}): {why}",
            self.scope(),
            self.range,
            self.state,
            self.since,
            self.note
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn count(bucket: Timestamp, sends: u64, conversions: u64) -> DestinationCount {
        DestinationCount {
            tenant: "acme".into(),
            range: "+44770".into(),
            bucket,
            sends,
            conversions,
        }
    }

    #[test]
    fn a_surge_of_unused_codes_is_suspected_and_a_converting_burst_is_not() {
        let thresholds = GuardThresholds::default();
        let now = at("2026-12-07T10:10:00Z");
        // Ten sends every 10 s for the last five minutes, none used.
        let attack: Vec<_> = (0..30)
            .map(|i| {
                count(
                    recent_bucket_of(now - SignedDuration::from_secs(10 * i)),
                    10,
                    0,
                )
            })
            .collect();
        let seen = evidence(&attack, 4.0, now, &thresholds);
        assert_eq!(seen.window_sends, 300);
        assert_eq!(seen.hourly_rate, 1800.0);
        // Buckets that ended 60 s ago or earlier, newest first, until 15 sends: two buckets.
        assert_eq!((seen.judged_sends, seen.judged_conversions), (20, 0));
        assert!(suspected(&seen, &thresholds), "{}", seen.describe());
        // The same volume with 80 % of the codes used: a marketing burst.
        let burst: Vec<_> = attack.iter().map(|c| count(c.bucket, 10, 8)).collect();
        let seen = evidence(&burst, 4.0, now, &thresholds);
        assert!(!suspected(&seen, &thresholds));
        // Unused codes at the range's usual volume: no surge.
        let seen = evidence(&attack, 400.0, now, &thresholds);
        assert!(!suspected(&seen, &thresholds));
    }

    #[test]
    fn fresh_sends_are_not_judged_until_their_codes_had_time_to_be_used() {
        let thresholds = GuardThresholds::default();
        let now = at("2026-12-07T10:10:00Z");
        // 40 sends in the last 60 s: none old enough to count against the range.
        let fresh: Vec<_> = (0..4)
            .map(|i| {
                count(
                    recent_bucket_of(now - SignedDuration::from_secs(10 * i)),
                    10,
                    0,
                )
            })
            .collect();
        let seen = evidence(&fresh, 0.0, now, &thresholds);
        assert_eq!(seen.judged_sends, 0);
        assert!(!suspected(&seen, &thresholds));
        // A new range (no baseline) under the floor is no surge either.
        let few = vec![count(at("2026-12-07T10:00:00Z"), 9, 0)];
        assert!(!suspected(
            &evidence(&few, 0.0, now, &thresholds),
            &thresholds
        ));
        let enough = vec![count(at("2026-12-07T10:00:00Z"), 15, 0)];
        assert!(suspected(
            &evidence(&enough, 0.0, now, &thresholds),
            &thresholds
        ));
    }

    #[test]
    fn the_baseline_averages_past_hours_since_the_range_was_first_sent_to() {
        let now = at("2026-12-07T10:30:00Z");
        let week = SignedDuration::from_hours(168);
        let hourly = vec![
            count(at("2026-12-07T08:00:00Z"), 6, 5),
            count(at("2026-12-07T09:00:00Z"), 4, 3),
            // The current hour is not part of the usual.
            count(at("2026-12-07T10:00:00Z"), 500, 0),
        ];
        // Two past hours since the first: (6 + 4) / 2.
        assert_eq!(baseline_hourly(&hourly, now, week), 5.0);
        assert_eq!(baseline_hourly(&hourly[2..], now, week), 0.0);
        let old = vec![count(at("2026-11-01T08:00:00Z"), 1000, 0)];
        assert_eq!(
            baseline_hourly(&old, now, week),
            0.0,
            "older than the period"
        );
    }

    #[test]
    fn holds_apply_in_enforce_and_pins_always() {
        let now = at("2026-12-07T10:00:00Z");
        let hour = SignedDuration::from_hours(1);
        let mut held = Quarantine::suspected(
            "acme",
            "+44770",
            GuardMode::Monitor,
            Evidence::default(),
            now,
            hour,
        );
        assert!(held.holds(GuardMode::Enforce, now));
        assert!(!held.holds(GuardMode::Monitor, now));
        assert!(!held.holds(GuardMode::Enforce, now + hour), "expired");
        assert!(held.settled(now) && !held.settled(now + hour));
        held.until = None;
        assert!(held.pinned() && held.holds(GuardMode::Monitor, now + hour));
        held.state = QuarantineState::Lifted;
        held.until = Some(now + hour);
        assert!(!held.in_force(now) && held.settled(now));
    }
}
