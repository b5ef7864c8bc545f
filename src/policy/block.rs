//! Block lists: entries that make a target ineligible. An entry matches an exact E.164 number,
//! a number prefix (e.g. `+882`, premium-rate ranges), a device token, or a whole account;
//! globally or for one tenant; optionally until an expiry. The report names the entry.

use jiff::Timestamp;
use serde::Serialize;

use crate::domain::{
    FailureReason, Job, JobError, Target, check_tenant, is_e164, mask_phone, mask_token,
    string_enum,
};

/// What a block entry matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BlockKind {
    /// One E.164 number.
    Number,
    /// Every number starting with the pattern (`+` and 1 to 14 digits).
    Prefix,
    /// One push token.
    DeviceToken,
    /// Every target of one account.
    Account,
}

string_enum!(BlockKind {
    Number => "NUMBER",
    Prefix => "PREFIX",
    DeviceToken => "DEVICE_TOKEN",
    Account => "ACCOUNT",
});

impl BlockKind {
    /// A pattern of this kind as it may be shown: numbers and tokens masked.
    pub fn shown(self, pattern: &str) -> String {
        match self {
            BlockKind::Number => mask_phone(pattern),
            BlockKind::DeviceToken => mask_token(pattern),
            BlockKind::Prefix | BlockKind::Account => pattern.to_owned(),
        }
    }
}

/// Who created a block entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BlockSource {
    /// An operator.
    Admin,
    /// The recipient opted out (reported by a provider, e.g. Twilio 21610 after STOP).
    OptOut,
    /// A provider said the push token is dead.
    ProviderFeedback,
}

string_enum!(BlockSource {
    Admin => "ADMIN",
    OptOut => "OPT_OUT",
    ProviderFeedback => "PROVIDER_FEEDBACK",
});

/// A block entry as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockEntry {
    /// Its id.
    pub id: i64,
    /// The tenant it applies to; `None` for every tenant.
    pub tenant: Option<String>,
    /// What it matches.
    pub kind: BlockKind,
    /// What it matches: a prefix or an account in clear; a number or token as the store keeps
    /// it (a keyed hash), except in the entries looked up for a job, which carry the job's own
    /// number or token they matched.
    pub pattern: String,
    /// The pattern as it may be shown (numbers and tokens masked).
    pub shown: String,
    /// Who created it.
    pub source: BlockSource,
    /// Why, in words.
    pub note: String,
    /// Since when it applies.
    pub created_at: Timestamp,
    /// Until when it applies; `None` for ever.
    pub expires_at: Option<Timestamp>,
}

/// A block entry to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewBlockEntry {
    /// The tenant it applies to; `None` for every tenant.
    pub tenant: Option<String>,
    /// What it matches.
    pub kind: BlockKind,
    /// The number, prefix, token or account.
    pub pattern: String,
    /// Who creates it.
    pub source: BlockSource,
    /// Why, in words.
    pub note: String,
    /// Until when it applies.
    pub expires_at: Option<Timestamp>,
}

impl NewBlockEntry {
    /// Checks the pattern against its kind, naming the field and saying what is wrong.
    pub fn validate(&self, now: Timestamp) -> Result<(), JobError> {
        let pattern = self.pattern.as_str();
        match self.kind {
            BlockKind::Number if !is_e164(pattern) => {
                return Err(JobError::new(
                    "pattern",
                    "a number entry takes an E.164 number, e.g. +14155550101",
                ));
            }
            BlockKind::Prefix => {
                let digits = pattern.strip_prefix('+').unwrap_or_default();
                if digits.is_empty()
                    || digits.len() > 14
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(JobError::new(
                        "pattern",
                        "a prefix entry takes + and 1 to 14 digits, e.g. +882",
                    ));
                }
            }
            BlockKind::DeviceToken | BlockKind::Account if pattern.trim().is_empty() => {
                return Err(JobError::new("pattern", "is empty"));
            }
            _ => {}
        }
        if let Some(tenant) = &self.tenant {
            if tenant.trim().is_empty() {
                return Err(JobError::new(
                    "tenant",
                    "is empty (leave it out for a global entry)",
                ));
            }
            check_tenant("tenant", tenant)?;
        }
        if self.expires_at.is_some_and(|at| at <= now) {
            return Err(JobError::new("expires_at", "is in the past"));
        }
        Ok(())
    }
}

impl BlockEntry {
    /// Whether the entry is in force for `tenant` at `now`.
    pub fn applies(&self, tenant: &str, now: Timestamp) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
            && self.expires_at.is_none_or(|at| now < at)
    }

    /// The reason a target it matches gets.
    pub fn reason(&self) -> FailureReason {
        match self.source {
            BlockSource::OptOut => FailureReason::RecipientOptedOut,
            BlockSource::Admin | BlockSource::ProviderFeedback => FailureReason::RecipientBlocked,
        }
    }

    /// "block-list entry #12 (prefix +882, admin, since 2026-11-21T10:00:00Z): premium range".
    pub fn describe(&self) -> String {
        let kind = self.kind.as_str().to_ascii_lowercase().replace('_', " ");
        let source = self.source.as_str().to_ascii_lowercase().replace('_', " ");
        let scope = self
            .tenant
            .as_deref()
            .map(|t| format!(", tenant {t}"))
            .unwrap_or_default();
        let note = if self.note.is_empty() {
            String::new()
        } else {
            format!(": {}", self.note)
        };
        format!(
            "block-list entry #{} ({kind} {}, {source}{scope}, since {}){note}",
            self.id, self.shown, self.created_at
        )
    }
}

/// Specificity of a match: an exact number or token beats an account, which beats a prefix
/// (longer prefixes beat shorter ones); a tenant's entry beats a global one of the same rank.
fn rank(entry: &BlockEntry) -> (u8, usize, bool) {
    let kind = match entry.kind {
        BlockKind::Number | BlockKind::DeviceToken => 3,
        BlockKind::Account => 2,
        BlockKind::Prefix => 1,
    };
    (kind, entry.pattern.len(), entry.tenant.is_some())
}

/// The entry that blocks `target` of `job` at `now`, if any: the most specific one in force.
pub fn blocking_entry<'a>(
    entries: &'a [BlockEntry],
    job: &Job,
    target: &Target,
    now: Timestamp,
) -> Option<&'a BlockEntry> {
    entries
        .iter()
        .filter(|entry| entry.applies(&job.tenant, now))
        .filter(|entry| match (entry.kind, target) {
            (BlockKind::Account, _) => entry.pattern == job.account,
            (BlockKind::Number, Target::Phone(phone)) => entry.pattern == phone.number,
            (BlockKind::Prefix, Target::Phone(phone)) => phone.number.starts_with(&entry.pattern),
            (BlockKind::DeviceToken, Target::Device(device)) => entry.pattern == device.token,
            _ => false,
        })
        .max_by_key(|entry| rank(entry))
}

#[cfg(test)]
mod tests {
    use jiff::SignedDuration;

    use super::*;
    use crate::domain::{DeviceTarget, PhoneTarget, Platform};

    fn job() -> Job {
        let body = serde_json::json!({
            "job_id": "j", "tenant": "acme", "account": "user-42", "code": "123456",
            "expires_at": "2030-01-01T00:00:00Z", "targets": []
        });
        Job::from_json(body.to_string().as_bytes()).unwrap()
    }

    fn entry(
        id: i64,
        tenant: Option<&str>,
        kind: BlockKind,
        pattern: &str,
        expires: Option<i64>,
    ) -> BlockEntry {
        BlockEntry {
            id,
            tenant: tenant.map(str::to_owned),
            kind,
            pattern: pattern.into(),
            shown: kind.shown(pattern),
            source: BlockSource::Admin,
            note: String::new(),
            created_at: Timestamp::UNIX_EPOCH,
            expires_at: expires.map(|s| Timestamp::from_second(s).unwrap()),
        }
    }

    fn phone(number: &str) -> Target {
        Target::Phone(PhoneTarget {
            number: number.into(),
        })
    }

    #[test]
    fn the_most_specific_entry_in_force_blocks() {
        let now = Timestamp::from_second(1_000).unwrap();
        let entries = vec![
            entry(1, None, BlockKind::Prefix, "+88", None),
            entry(2, None, BlockKind::Prefix, "+882", None),
            entry(3, Some("acme"), BlockKind::Number, "+88212345678", None),
            entry(4, Some("other"), BlockKind::Prefix, "+1", None),
            entry(5, None, BlockKind::Number, "+14155550101", Some(999)),
            entry(6, None, BlockKind::Account, "user-42", Some(2_000)),
            entry(7, None, BlockKind::DeviceToken, "dead-token", None),
        ];
        let job = job();
        let cases: &[(Target, Option<i64>)] = &[
            (phone("+88212345678"), Some(3)),
            (phone("+88299999999"), Some(6)),
            (phone("+14155550101"), Some(6)),
            (
                Target::Device(DeviceTarget {
                    id: "d".into(),
                    platform: Platform::Apns,
                    token: "dead-token".into(),
                    topic: None,
                    can_display_code: true,
                }),
                Some(7),
            ),
        ];
        for (target, expected) in cases {
            assert_eq!(
                blocking_entry(&entries, &job, target, now).map(|e| e.id),
                *expected,
                "{target:?}"
            );
        }
        // Without the account entry: prefixes, longest first; other tenants' and expired entries never match.
        let entries: Vec<_> = entries.into_iter().filter(|e| e.id != 6).collect();
        assert_eq!(
            blocking_entry(&entries, &job, &phone("+88299999999"), now).map(|e| e.id),
            Some(2)
        );
        assert_eq!(
            blocking_entry(&entries, &job, &phone("+8801234567"), now).map(|e| e.id),
            Some(1)
        );
        assert_eq!(
            blocking_entry(&entries, &job, &phone("+14155550101"), now),
            None,
            "expired, and +1 is another tenant's"
        );
        let later = now + SignedDuration::from_secs(5_000);
        assert_eq!(
            blocking_entry(&entries, &job, &phone("+88212345678"), later).map(|e| e.id),
            Some(3)
        );
    }

    #[test]
    fn opt_outs_say_so_and_reports_mask_the_pattern() {
        let mut opt_out = entry(9, Some("acme"), BlockKind::Number, "+14155550101", None);
        opt_out.source = BlockSource::OptOut;
        opt_out.note = "twilio 21610".into();
        assert_eq!(opt_out.reason(), FailureReason::RecipientOptedOut);
        assert_eq!(
            opt_out.describe(),
            "block-list entry #9 (number +1415•••0101, opt out, tenant acme, since 1970-01-01T00:00:00Z): twilio 21610"
        );
        assert_eq!(
            entry(1, None, BlockKind::Prefix, "+882", None).reason(),
            FailureReason::RecipientBlocked
        );
    }

    #[test]
    fn bad_patterns_are_refused_with_the_reason() {
        let now = Timestamp::from_second(1_000).unwrap();
        let new = |kind, pattern: &str| NewBlockEntry {
            tenant: None,
            kind,
            pattern: pattern.into(),
            source: BlockSource::Admin,
            note: String::new(),
            expires_at: None,
        };
        assert!(
            new(BlockKind::Number, "4155550101")
                .validate(now)
                .unwrap_err()
                .problem
                .contains("E.164")
        );
        assert!(new(BlockKind::Prefix, "882").validate(now).is_err());
        assert!(new(BlockKind::Prefix, "+88x").validate(now).is_err());
        assert!(new(BlockKind::Account, " ").validate(now).is_err());
        assert!(new(BlockKind::Prefix, "+882").validate(now).is_ok());
        let mut expired = new(BlockKind::Prefix, "+882");
        expired.expires_at = Some(Timestamp::from_second(10).unwrap());
        assert_eq!(expired.validate(now).unwrap_err().field, "expires_at");
        // A tenant no job could name would never match.
        let mut spaced = new(BlockKind::Prefix, "+882");
        spaced.tenant = Some("bad tenant".into());
        let refused = spaced.validate(now).unwrap_err();
        assert_eq!(refused.field, "tenant");
        assert!(refused.problem.contains("' '"), "{refused}");
    }
}
