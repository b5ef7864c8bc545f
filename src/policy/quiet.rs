//! Quiet hours: daily local windows (which may cross midnight), optionally only on some days
//! of the week, for the whole service, a tenant or an account, per channel, with an action:
//! DEFER (hold until the window ends, if that is before the code expires), SUPPRESS (fail now)
//! or ALLOW_USER_INITIATED (a person waiting for the code gets it anyway). Evaluated in the
//! recipient's zone with jiff, so DST changes are handled: a window start that falls in a
//! spring-forward gap begins at the first valid instant after it.

use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, Zoned};
use serde::Serialize;

use crate::domain::{Channel, Job, JobError, string_enum};

/// What quiet hours do to a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum QuietAction {
    /// Hold until the window ends (only if that is before the code expires).
    Defer,
    /// Fail now with QUIET_HOURS.
    Suppress,
    /// Let user-initiated jobs through; defer the others.
    AllowUserInitiated,
}

string_enum!(QuietAction {
    Defer => "DEFER",
    Suppress => "SUPPRESS",
    AllowUserInitiated => "ALLOW_USER_INITIATED",
});

/// A quiet-hours rule.
#[derive(Debug, Clone, PartialEq)]
pub struct QuietHoursRule {
    /// Its id.
    pub id: i64,
    /// The tenant it applies to; `None` for every tenant.
    pub tenant: Option<String>,
    /// The account it applies to (within `tenant`); `None` for every account.
    pub account: Option<String>,
    /// The channels it covers; empty for all.
    pub channels: Vec<Channel>,
    /// Local start of the window.
    pub start: Time,
    /// Local end of the window (earlier than `start`: it crosses midnight).
    pub end: Time,
    /// The days a window may start on; empty for every day.
    pub days: Vec<Weekday>,
    /// What it does.
    pub action: QuietAction,
    /// The zone used when the recipient's is unknown (IANA name).
    pub default_zone: String,
}

/// The short name of a weekday (`mon` … `sun`), as stored and typed.
pub fn weekday_name(day: Weekday) -> &'static str {
    match day {
        Weekday::Monday => "mon",
        Weekday::Tuesday => "tue",
        Weekday::Wednesday => "wed",
        Weekday::Thursday => "thu",
        Weekday::Friday => "fri",
        Weekday::Saturday => "sat",
        Weekday::Sunday => "sun",
    }
}

/// A weekday from its short or full English name.
pub fn parse_weekday(name: &str) -> Option<Weekday> {
    let name = name.trim().to_ascii_lowercase();
    [
        Weekday::Monday,
        Weekday::Tuesday,
        Weekday::Wednesday,
        Weekday::Thursday,
        Weekday::Friday,
        Weekday::Saturday,
        Weekday::Sunday,
    ]
    .into_iter()
    .find(|day| name.len() >= 3 && format!("{day:?}").to_ascii_lowercase().starts_with(&name))
}

/// A local time of day from `HH:MM`.
pub fn parse_time_of_day(text: &str) -> Option<Time> {
    let (hours, minutes) = text.trim().split_once(':')?;
    Time::new(hours.parse().ok()?, minutes.parse().ok()?, 0, 0).ok()
}

/// What quiet hours decide for one send.
#[derive(Debug, Clone, PartialEq)]
pub enum QuietDecision {
    /// No window is in force.
    Clear,
    /// A window is in force but the job is user-initiated and the rule lets it through.
    Bypassed {
        /// The rule.
        rule_id: i64,
    },
    /// Hold it until `until`.
    Defer {
        /// The rule.
        rule_id: i64,
        /// When the window ends, in the recipient's zone.
        until: Zoned,
    },
    /// Fail it now.
    Suppress {
        /// The rule.
        rule_id: i64,
        /// When the window ends, in the recipient's zone.
        until: Zoned,
        /// Why it is not deferred instead.
        why: &'static str,
    },
}

impl QuietHoursRule {
    /// Checks a rule before it is stored, naming the field.
    pub fn validate(&self) -> Result<(), JobError> {
        if self.start == self.end {
            return Err(JobError::new(
                "end",
                "equals start: the window would be empty",
            ));
        }
        TimeZone::get(&self.default_zone).map_err(|e| {
            JobError::new(
                "default_zone",
                format!("`{}` is not a known time zone: {e}", self.default_zone),
            )
        })?;
        if self.account.is_some() && self.tenant.is_none() {
            return Err(JobError::new("account", "an account rule needs its tenant"));
        }
        if let Some(tenant) = &self.tenant {
            crate::domain::check_tenant("tenant", tenant)?;
        }
        Ok(())
    }

    fn applies(&self, job: &Job, channel: Channel) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == job.tenant)
            && self.account.as_deref().is_none_or(|a| a == job.account)
            && (self.channels.is_empty() || self.channels.contains(&channel))
    }

    /// Specificity: account rules beat tenant rules, which beat global ones.
    fn rank(&self) -> u8 {
        u8::from(self.tenant.is_some()) + u8::from(self.account.is_some())
    }

    /// When the window in force at `now` in `tz` ends, if one is.
    pub fn window_end(&self, now: Timestamp, tz: &TimeZone) -> Option<Zoned> {
        let today = now.to_zoned(tz.clone()).date();
        // A window in force now started today, or yesterday when it crosses midnight.
        for start_day in [today.yesterday().ok()?, today] {
            if !self.days.is_empty() && !self.days.contains(&start_day.weekday()) {
                continue;
            }
            let start = start_day
                .to_datetime(self.start)
                .to_zoned(tz.clone())
                .ok()?;
            let end_day = if self.end <= self.start {
                start_day.checked_add(1.day()).ok()?
            } else {
                start_day
            };
            let end = end_day.to_datetime(self.end).to_zoned(tz.clone()).ok()?;
            if start.timestamp() <= now && now < end.timestamp() {
                return Some(end);
            }
        }
        None
    }

    /// "quiet hours #4 (22:00–07:00, SMS and voice)".
    pub fn describe(&self) -> String {
        let channels = if self.channels.is_empty() {
            "all channels".to_owned()
        } else {
            self.channels
                .iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "quiet hours #{} ({}–{}, {channels})",
            self.id,
            self.start.strftime("%H:%M"),
            self.end.strftime("%H:%M")
        )
    }
}

/// The zones to judge `job`'s recipient by: the job's own, else `number_zones` (from the
/// number), else the rule's default. Unknown zone names are skipped.
fn zones_for(job: &Job, number_zones: &[TimeZone], rule: &QuietHoursRule) -> Vec<TimeZone> {
    if let Some(tz) = job
        .timezone
        .as_deref()
        .and_then(|name| TimeZone::get(name).ok())
    {
        return vec![tz];
    }
    if !number_zones.is_empty() {
        return number_zones.to_vec();
    }
    TimeZone::get(&rule.default_zone).into_iter().collect()
}

/// The quiet-hours decision for sending `job` on `channel` at `now`. A recipient in several
/// zones is quiet if it is quiet in any of them (the latest window end counts). The most
/// specific rule in force decides.
pub fn quiet_decision(
    rules: &[QuietHoursRule],
    job: &Job,
    channel: Channel,
    number_zones: &[TimeZone],
    now: Timestamp,
) -> QuietDecision {
    let in_force = rules
        .iter()
        .filter(|rule| rule.applies(job, channel))
        .filter_map(|rule| {
            let end = zones_for(job, number_zones, rule)
                .iter()
                .filter_map(|tz| rule.window_end(now, tz))
                .max_by_key(|end| end.timestamp())?;
            Some((rule, end))
        })
        .max_by_key(|(rule, end)| (rule.rank(), end.timestamp()));
    let Some((rule, until)) = in_force else {
        return QuietDecision::Clear;
    };
    match rule.action {
        QuietAction::Suppress => QuietDecision::Suppress {
            rule_id: rule.id,
            until,
            why: "the rule suppresses codes during quiet hours",
        },
        QuietAction::AllowUserInitiated if job.user_initiated => {
            QuietDecision::Bypassed { rule_id: rule.id }
        }
        QuietAction::Defer | QuietAction::AllowUserInitiated
            if until.timestamp() >= job.expires_at =>
        {
            QuietDecision::Suppress {
                rule_id: rule.id,
                until,
                why: "the window ends after the code expires",
            }
        }
        QuietAction::Defer | QuietAction::AllowUserInitiated => QuietDecision::Defer {
            rule_id: rule.id,
            until,
        },
    }
}

#[cfg(test)]
mod tests {
    use jiff::civil::time;

    use super::*;

    fn rule(
        start: Time,
        end: Time,
        days: &[Weekday],
        action: QuietAction,
        zone: &str,
    ) -> QuietHoursRule {
        QuietHoursRule {
            id: 1,
            tenant: None,
            account: None,
            channels: vec![Channel::Sms, Channel::Voice],
            start,
            end,
            days: days.to_vec(),
            action,
            default_zone: zone.into(),
        }
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn job(timezone: Option<&str>, user_initiated: bool, expires: &str) -> Job {
        let body = serde_json::json!({
            "job_id": "j", "tenant": "acme", "account": "user-42", "code": "123456",
            "expires_at": expires, "timezone": timezone, "user_initiated": user_initiated, "targets": []
        });
        Job::from_json(body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn windows_across_midnight_days_of_week_and_dst() {
        let night = rule(
            time(22, 0, 0, 0),
            time(7, 0, 0, 0),
            &[],
            QuietAction::Defer,
            "Europe/Berlin",
        );
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        let new_york = TimeZone::get("America/New_York").unwrap();
        let end = |r: &QuietHoursRule, now: &str, tz: &TimeZone| {
            r.window_end(at(now), tz).map(|z| z.timestamp().to_string())
        };
        let cases: &[(&str, &TimeZone, Option<&str>)] = &[
            // 23:30 in Berlin (CET, +01:00): quiet until 07:00 local = 06:00Z.
            (
                "2026-11-21T22:30:00Z",
                &berlin,
                Some("2026-11-22T06:00:00Z"),
            ),
            // 06:59 local: still quiet; 07:00 local: clear; 21:59: clear.
            (
                "2026-11-22T05:59:00Z",
                &berlin,
                Some("2026-11-22T06:00:00Z"),
            ),
            ("2026-11-22T06:00:00Z", &berlin, None),
            ("2026-11-21T20:59:00Z", &berlin, None),
            // The night DST starts in Berlin (29 March 2026, 02:00 → 03:00): 07:00 is CEST.
            (
                "2026-03-29T01:30:00Z",
                &berlin,
                Some("2026-03-29T05:00:00Z"),
            ),
            // The night DST ends in New York (1 November 2026): 22:00 EDT to 07:00 EST.
            (
                "2026-11-01T02:30:00Z",
                &new_york,
                Some("2026-11-01T12:00:00Z"),
            ),
            (
                "2026-11-01T11:59:00Z",
                &new_york,
                Some("2026-11-01T12:00:00Z"),
            ),
            ("2026-11-01T12:00:00Z", &new_york, None),
            // The night DST starts in New York (8 March 2026): 22:00 EST to 07:00 EDT.
            (
                "2026-03-08T03:00:00Z",
                &new_york,
                Some("2026-03-08T11:00:00Z"),
            ),
        ];
        for (now, tz, expected) in cases {
            assert_eq!(
                end(&night, now, tz).as_deref(),
                *expected,
                "at {now} in {}",
                tz.iana_name().unwrap()
            );
        }

        // Only windows starting on Friday or Saturday nights.
        let weekend = rule(
            time(22, 0, 0, 0),
            time(9, 0, 0, 0),
            &[Weekday::Friday, Weekday::Saturday],
            QuietAction::Defer,
            "UTC",
        );
        let utc = TimeZone::UTC;
        assert!(
            weekend
                .window_end(at("2026-11-21T08:00:00Z"), &utc)
                .is_some(),
            "Saturday morning: Friday's window"
        );
        assert!(
            weekend
                .window_end(at("2026-11-22T08:00:00Z"), &utc)
                .is_some(),
            "Sunday morning: Saturday's window"
        );
        assert!(
            weekend
                .window_end(at("2026-11-23T08:00:00Z"), &utc)
                .is_none(),
            "Monday morning: no Sunday window"
        );
        assert!(
            weekend
                .window_end(at("2026-11-19T23:00:00Z"), &utc)
                .is_none(),
            "Thursday night"
        );

        // A daytime window that does not cross midnight.
        let lunch = rule(
            time(12, 0, 0, 0),
            time(13, 0, 0, 0),
            &[],
            QuietAction::Suppress,
            "UTC",
        );
        assert!(lunch.window_end(at("2026-11-21T12:30:00Z"), &utc).is_some());
        assert!(lunch.window_end(at("2026-11-21T13:30:00Z"), &utc).is_none());
    }

    #[test]
    fn actions_zones_and_precedence() {
        let now = at("2026-11-21T22:30:00Z"); // 23:30 in Berlin, 17:30 in New York
        let defer = rule(
            time(22, 0, 0, 0),
            time(7, 0, 0, 0),
            &[],
            QuietAction::Defer,
            "Europe/Berlin",
        );
        let long_job = job(None, false, "2026-11-22T08:00:00Z");
        assert!(matches!(
            quiet_decision(
                std::slice::from_ref(&defer),
                &long_job,
                Channel::Sms,
                &[],
                now
            ),
            QuietDecision::Defer { .. }
        ));
        assert_eq!(
            quiet_decision(
                std::slice::from_ref(&defer),
                &long_job,
                Channel::Push,
                &[],
                now
            ),
            QuietDecision::Clear,
            "push is not covered"
        );

        // The job's zone wins over the rule's default.
        let in_new_york = job(Some("America/New_York"), false, "2026-11-22T08:00:00Z");
        assert_eq!(
            quiet_decision(
                std::slice::from_ref(&defer),
                &in_new_york,
                Channel::Sms,
                &[],
                now
            ),
            QuietDecision::Clear
        );
        // A number in several zones is quiet if it is quiet in any.
        let zones = [
            TimeZone::get("America/New_York").unwrap(),
            TimeZone::get("Asia/Tokyo").unwrap(),
        ];
        let tokyo_morning = at("2026-11-21T21:30:00Z"); // 06:30 in Tokyo, 16:30 in New York
        assert!(matches!(
            quiet_decision(
                std::slice::from_ref(&defer),
                &long_job,
                Channel::Sms,
                &zones,
                tokyo_morning
            ),
            QuietDecision::Defer { .. }
        ));

        // A window that ends after the code expires fails instead of deferring.
        let short_job = job(None, false, "2026-11-21T22:40:00Z");
        assert!(matches!(
            quiet_decision(
                std::slice::from_ref(&defer),
                &short_job,
                Channel::Sms,
                &[],
                now
            ),
            QuietDecision::Suppress {
                why: "the window ends after the code expires",
                ..
            }
        ));

        // ALLOW_USER_INITIATED lets a waiting user through.
        let mut allow = defer.clone();
        allow.action = QuietAction::AllowUserInitiated;
        let waiting = job(None, true, "2026-11-21T22:35:00Z");
        assert_eq!(
            quiet_decision(
                std::slice::from_ref(&allow),
                &waiting,
                Channel::Sms,
                &[],
                now
            ),
            QuietDecision::Bypassed { rule_id: 1 }
        );

        // The most specific rule decides: an account rule over a global one.
        let mut account_rule = rule(
            time(20, 0, 0, 0),
            time(21, 0, 0, 0),
            &[],
            QuietAction::Suppress,
            "Europe/Berlin",
        );
        account_rule.id = 2;
        account_rule.tenant = Some("acme".into());
        account_rule.account = Some("user-42".into());
        account_rule.start = time(23, 0, 0, 0);
        account_rule.end = time(23, 59, 0, 0);
        let decided = quiet_decision(
            &[defer.clone(), account_rule],
            &long_job,
            Channel::Sms,
            &[],
            now,
        );
        assert!(
            matches!(decided, QuietDecision::Suppress { rule_id: 2, .. }),
            "{decided:?}"
        );
    }

    #[test]
    fn days_and_times_parse() {
        assert_eq!(parse_weekday("Fri"), Some(Weekday::Friday));
        assert_eq!(parse_weekday("saturday"), Some(Weekday::Saturday));
        assert_eq!(parse_weekday("s"), None);
        assert_eq!(weekday_name(Weekday::Sunday), "sun");
        assert_eq!(parse_time_of_day("22:00"), Some(time(22, 0, 0, 0)));
        assert_eq!(parse_time_of_day("7:30"), Some(time(7, 30, 0, 0)));
        assert_eq!(parse_time_of_day("24:00"), None);
        assert_eq!(parse_time_of_day("noon"), None);
    }

    #[test]
    fn invalid_rules_say_what_is_wrong() {
        let mut bad = rule(
            time(22, 0, 0, 0),
            time(22, 0, 0, 0),
            &[],
            QuietAction::Defer,
            "Europe/Berlin",
        );
        assert_eq!(bad.validate().unwrap_err().field, "end");
        bad.end = time(7, 0, 0, 0);
        bad.default_zone = "Mars/Olympus".into();
        assert_eq!(bad.validate().unwrap_err().field, "default_zone");
        bad.default_zone = "UTC".into();
        assert!(bad.validate().is_ok());
        assert_eq!(bad.describe(), "quiet hours #1 (22:00–07:00, sms, voice)");
    }
}
