//! Rate limits: at most `limit` sends per `window` per recipient (number or device token), per
//! account, per tenant, or per destination prefix (the SMS-pumping defence), each rule global
//! or for one tenant. Counting happens in the store; here: which counters a send touches.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use crate::domain::{Job, JobError, Target, string_enum};

/// What a rate limit counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RateScope {
    /// Each phone number or device token.
    Recipient,
    /// Each account.
    Account,
    /// The tenant as a whole.
    Tenant,
    /// Numbers starting with the rule's prefix, together.
    Prefix,
}

string_enum!(RateScope {
    Recipient => "RECIPIENT",
    Account => "ACCOUNT",
    Tenant => "TENANT",
    Prefix => "PREFIX",
});

impl RateScope {
    /// Whether the scope is counted once per job (rather than per target).
    pub fn per_job(self) -> bool {
        matches!(self, RateScope::Account | RateScope::Tenant)
    }
}

/// A rate-limit rule as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateLimitRule {
    /// Its id.
    pub id: i64,
    /// The tenant it applies to; `None` for every tenant.
    pub tenant: Option<String>,
    /// What it counts by.
    pub scope: RateScope,
    /// For `Prefix`: the prefix; empty otherwise.
    pub prefix: String,
    /// Sends allowed per window.
    pub limit: u32,
    /// The sliding window.
    pub window: Duration,
}

/// A counter one send touches: the rule, and the key it counts under.
#[derive(Debug, Clone, PartialEq)]
pub struct RateKey<'a> {
    /// The rule.
    pub rule: &'a RateLimitRule,
    /// The counter's key within the rule (tenant, account, number, token or prefix).
    pub key: String,
}

/// A limit that was reached.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimited {
    /// The rule.
    pub rule: RateLimitRule,
    /// When the next send would be allowed.
    pub allowed_at: Timestamp,
}

impl RateLimitRule {
    /// Checks a rule before it is stored.
    pub fn validate(&self) -> Result<(), JobError> {
        if self.limit == 0 {
            return Err(JobError::new(
                "limit",
                "must be at least 1 (remove the rule to stop sending instead)",
            ));
        }
        if self.window.is_zero() {
            return Err(JobError::new("window", "must be longer than zero"));
        }
        match self.scope {
            RateScope::Prefix => {
                let digits = self.prefix.strip_prefix('+').unwrap_or_default();
                if digits.is_empty()
                    || digits.len() > 14
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(JobError::new(
                        "prefix",
                        "a prefix rule takes + and 1 to 14 digits, e.g. +882",
                    ));
                }
            }
            _ if !self.prefix.is_empty() => {
                return Err(JobError::new("prefix", "only PREFIX rules take a prefix"));
            }
            _ => {}
        }
        if let Some(tenant) = &self.tenant {
            if tenant.trim().is_empty() {
                return Err(JobError::new(
                    "tenant",
                    "is empty (leave it out for a global rule)",
                ));
            }
            crate::domain::check_tenant("tenant", tenant)?;
        }
        Ok(())
    }

    /// "rate limit #3 (5 per 10m per recipient)".
    pub fn describe(&self) -> String {
        let scope = match self.scope {
            RateScope::Prefix => format!("to {}", self.prefix),
            other => format!("per {}", other.as_str().to_ascii_lowercase()),
        };
        let window = SignedDuration::try_from(self.window).unwrap_or(SignedDuration::MAX);
        format!(
            "rate limit #{} ({} per {window:#} {scope})",
            self.id, self.limit
        )
    }

    fn applies(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
    }
}

impl RateLimited {
    /// "rate limit #3 (5 per 10m per recipient) reached; allowed again at …".
    pub fn describe(&self) -> String {
        format!(
            "{} reached; allowed again at {}",
            self.rule.describe(),
            self.allowed_at
        )
    }
}

/// The per-job counters (account, tenant) a job of `job.tenant` touches.
pub fn job_keys<'a>(rules: &'a [RateLimitRule], job: &Job) -> Vec<RateKey<'a>> {
    rules
        .iter()
        .filter(|rule| rule.scope.per_job() && rule.applies(&job.tenant))
        .map(|rule| RateKey {
            rule,
            key: match rule.scope {
                RateScope::Account => format!("{}/{}", job.tenant, job.account),
                _ => job.tenant.clone(),
            },
        })
        .collect()
}

/// The per-target counters (recipient, prefix) a send to `target` touches.
pub fn target_keys<'a>(rules: &'a [RateLimitRule], job: &Job, target: &Target) -> Vec<RateKey<'a>> {
    let recipient = match target {
        Target::Phone(phone) => phone.number.as_str(),
        Target::Device(device) => device.token.as_str(),
    };
    rules
        .iter()
        .filter(|rule| rule.applies(&job.tenant))
        .filter_map(|rule| match rule.scope {
            RateScope::Recipient => Some(RateKey {
                rule,
                key: recipient.to_owned(),
            }),
            RateScope::Prefix
                if matches!(target, Target::Phone(_)) && recipient.starts_with(&rule.prefix) =>
            {
                Some(RateKey {
                    rule,
                    key: rule.prefix.clone(),
                })
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::PhoneTarget;

    fn rule(id: i64, tenant: Option<&str>, scope: RateScope, prefix: &str) -> RateLimitRule {
        RateLimitRule {
            id,
            tenant: tenant.map(str::to_owned),
            scope,
            prefix: prefix.into(),
            limit: 5,
            window: Duration::from_secs(600),
        }
    }

    fn job() -> Job {
        let body = serde_json::json!({
            "job_id": "j", "tenant": "acme", "account": "user-42", "code": "123456",
            "expires_at": "2030-01-01T00:00:00Z", "targets": []
        });
        Job::from_json(body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn keys_follow_scope_tenant_and_prefix() {
        let rules = vec![
            rule(1, None, RateScope::Recipient, ""),
            rule(2, Some("acme"), RateScope::Account, ""),
            rule(3, Some("other"), RateScope::Tenant, ""),
            rule(4, None, RateScope::Prefix, "+882"),
            rule(5, None, RateScope::Tenant, ""),
        ];
        let job = job();
        let keys: Vec<_> = job_keys(&rules, &job)
            .into_iter()
            .map(|k| (k.rule.id, k.key))
            .collect();
        assert_eq!(
            keys,
            [(2, "acme/user-42".to_owned()), (5, "acme".to_owned())]
        );
        let premium = Target::Phone(PhoneTarget {
            number: "+88212345678".into(),
        });
        let keys: Vec<_> = target_keys(&rules, &job, &premium)
            .into_iter()
            .map(|k| (k.rule.id, k.key))
            .collect();
        assert_eq!(
            keys,
            [(1, "+88212345678".to_owned()), (4, "+882".to_owned())]
        );
        let us = Target::Phone(PhoneTarget {
            number: "+14155550101".into(),
        });
        assert_eq!(target_keys(&rules, &job, &us).len(), 1);
    }

    #[test]
    fn rules_are_validated_and_described() {
        let mut bad = rule(1, None, RateScope::Prefix, "882");
        assert_eq!(bad.validate().unwrap_err().field, "prefix");
        bad.prefix = "+882".into();
        assert!(bad.validate().is_ok());
        bad.limit = 0;
        assert_eq!(bad.validate().unwrap_err().field, "limit");
        assert_eq!(
            rule(7, None, RateScope::Recipient, "").describe(),
            "rate limit #7 (5 per 10m per recipient)"
        );
        assert_eq!(
            rule(8, None, RateScope::Prefix, "+882").describe(),
            "rate limit #8 (5 per 10m to +882)"
        );
    }
}
