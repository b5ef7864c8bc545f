//! A send-code job as upstream submits it, its targets and channels, and its validation.

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::string_enum;

/// Longest accepted `job_id` (bytes; every limit below is in bytes of UTF-8).
pub const MAX_JOB_ID_LEN: usize = 128;
/// Longest accepted `tenant`.
pub const MAX_TENANT_LEN: usize = 64;
/// Longest accepted `account`.
pub const MAX_ACCOUNT_LEN: usize = 256;
/// Longest accepted `purpose`.
pub const MAX_PURPOSE_LEN: usize = 64;
/// Longest accepted `locale` (BCP 47 tags in use are far shorter).
pub const MAX_LOCALE_LEN: usize = 35;
/// Longest accepted `timezone` (IANA names are at most about 30).
pub const MAX_TIMEZONE_LEN: usize = 64;
/// Longest accepted device `id`.
pub const MAX_DEVICE_ID_LEN: usize = 128;
/// Longest accepted device `token` (APNs tokens are 64 hex digits, FCM tokens about 160).
pub const MAX_TOKEN_LEN: usize = 4096;
/// Longest accepted device `topic` (a bundle id or Firebase project).
pub const MAX_TOPIC_LEN: usize = 255;
/// Longest accepted phone `number` as given (E.164 has at most 16 characters; a longer but
/// bounded one gets a report with INVALID_RECIPIENT).
pub const MAX_NUMBER_LEN: usize = 64;
/// Most targets one job may carry.
pub const MAX_TARGETS: usize = 32;

/// A delivery channel; a job's channel list is its escalation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// A notification on a trusted device.
    Push,
    /// A text message to a trusted number.
    Sms,
    /// A call that reads the code out.
    Voice,
}

string_enum!(Channel { Push => "push", Sms => "sms", Voice => "voice" });

impl Channel {
    /// The order used when a job names no channels.
    pub const DEFAULT_ORDER: [Channel; 3] = [Channel::Push, Channel::Sms, Channel::Voice];
}

/// The push platform of a device token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// Apple Push Notification service.
    Apns,
    /// Firebase Cloud Messaging.
    Fcm,
}

string_enum!(Platform { Apns => "apns", Fcm => "fcm" });

/// The one-time code. A credential: its `Debug` is redacted, it has no `Display` and no
/// `Serialize`, so it cannot end up in a log line, a report or an event by accident.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Code(String);

impl Code {
    /// Wraps a code as received.
    pub fn new(code: impl Into<String>) -> Self {
        Code(code.into())
    }

    /// The code itself, for the one place that must show it: the message to the recipient.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Code(•••)")
    }
}

/// A trusted device of the account.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DeviceTarget {
    /// Upstream's id of the device.
    pub id: String,
    /// The push platform its token belongs to.
    pub platform: Platform,
    /// APNs device token or FCM registration token.
    pub token: String,
    /// APNs topic or FCM project.
    #[serde(default)]
    pub topic: Option<String>,
    /// False when the device cannot show the code.
    #[serde(default = "default_true")]
    pub can_display_code: bool,
}

/// A trusted phone number of the account.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PhoneTarget {
    /// The number as given; it should be E.164.
    pub number: String,
}

/// One recipient endpoint of a job.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A trusted device, reached by push.
    Device(DeviceTarget),
    /// A trusted phone number, reached by SMS or voice.
    Phone(PhoneTarget),
}

impl Target {
    /// Whether `channel` can reach this target.
    pub fn reachable_by(&self, channel: Channel) -> bool {
        matches!(
            (self, channel),
            (Target::Device(_), Channel::Push) | (Target::Phone(_), Channel::Sms | Channel::Voice)
        )
    }
}

/// A send-code job. Deserializes from the JSON queue body described in DESIGN.md.
#[derive(Debug, Clone, Deserialize)]
pub struct Job {
    /// Unique per tenant.
    pub job_id: String,
    /// The upstream tenant.
    pub tenant: String,
    /// The account the code is for.
    pub account: String,
    /// The code (a secret).
    pub code: Code,
    /// Nothing is sent at or after this instant.
    pub expires_at: Timestamp,
    /// What the code is for; selects the message wording.
    #[serde(default = "default_purpose")]
    pub purpose: String,
    /// The recipient's locale.
    #[serde(default = "default_locale")]
    pub locale: String,
    /// Whether a person is waiting for the code right now.
    #[serde(default)]
    pub user_initiated: bool,
    /// The recipient's IANA time zone, when known.
    #[serde(default)]
    pub timezone: Option<String>,
    /// Escalation order; empty means push, sms, voice.
    #[serde(default)]
    pub channels: Vec<Channel>,
    /// Trusted devices and numbers.
    #[serde(default)]
    pub targets: Vec<Target>,
}

fn default_true() -> bool {
    true
}

fn default_purpose() -> String {
    "sign_in".to_owned()
}

fn default_locale() -> String {
    "en".to_owned()
}

/// Why a job was refused as malformed, naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct JobError {
    /// The field path, e.g. `targets[1].device.token`, or `body` when the whole body is unreadable.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl JobError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        JobError {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

impl Job {
    /// Parses and validates a JSON job body.
    pub fn from_json(body: &[u8]) -> Result<Job, JobError> {
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let job: Job =
            serde_path_to_error::deserialize(&mut deserializer).map_err(|e| json_error(e, body))?;
        deserializer.end().map_err(|e| {
            JobError::new("body", format!("not valid JSON: {}", without_position(&e)))
        })?;
        job.validate()?;
        Ok(job)
    }

    /// The delivery id of this job.
    pub fn delivery_id(&self) -> DeliveryId {
        DeliveryId {
            tenant: self.tenant.clone(),
            job_id: self.job_id.clone(),
        }
    }

    /// The channels in escalation order, without repeats.
    pub fn channel_order(&self) -> Vec<Channel> {
        let source: &[Channel] = if self.channels.is_empty() {
            &Channel::DEFAULT_ORDER
        } else {
            &self.channels
        };
        let mut order = Vec::with_capacity(source.len());
        for channel in source {
            if !order.contains(channel) {
                order.push(*channel);
            }
        }
        order
    }

    /// Checks what makes a job unprocessable (as opposed to undeliverable: an expired code or
    /// a malformed phone number still get a report, see `delivery`).
    pub fn validate(&self) -> Result<(), JobError> {
        check_identifier("job_id", &self.job_id, MAX_JOB_ID_LEN, |c| !c.is_control())?;
        check_tenant("tenant", &self.tenant)?;
        check_identifier("account", &self.account, MAX_ACCOUNT_LEN, |c| {
            !c.is_control()
        })?;
        let code = self.code.expose();
        if !(4..=16).contains(&code.len()) || !code.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(JobError::new("code", "must be 4 to 16 letters or digits"));
        }
        if self.purpose.is_empty() || self.purpose.len() > MAX_PURPOSE_LEN {
            return Err(JobError::new(
                "purpose",
                format!("must be 1 to {MAX_PURPOSE_LEN} bytes"),
            ));
        }
        check_length("locale", &self.locale, MAX_LOCALE_LEN)?;
        if let Some(zone) = &self.timezone {
            check_length("timezone", zone, MAX_TIMEZONE_LEN)?;
        }
        if self.targets.len() > MAX_TARGETS {
            return Err(JobError::new(
                "targets",
                format!(
                    "at most {MAX_TARGETS} targets per job, got {}",
                    self.targets.len()
                ),
            ));
        }
        for (index, target) in self.targets.iter().enumerate() {
            if let Target::Phone(phone) = target {
                check_length(
                    &format!("targets[{index}].phone.number"),
                    &phone.number,
                    MAX_NUMBER_LEN,
                )?;
            }
            if let Target::Device(device) = target {
                let field = |name: &str| format!("targets[{index}].device.{name}");
                check_length(&field("id"), &device.id, MAX_DEVICE_ID_LEN)?;
                check_length(&field("token"), &device.token, MAX_TOKEN_LEN)?;
                if let Some(topic) = &device.topic {
                    check_length(&field("topic"), topic, MAX_TOPIC_LEN)?;
                }
                if device.id.trim().is_empty() {
                    return Err(JobError::new(
                        format!("targets[{index}].device.id"),
                        "is empty",
                    ));
                }
                if device.token.trim().is_empty() {
                    return Err(JobError::new(
                        format!("targets[{index}].device.token"),
                        "is empty",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Checks a tenant name as jobs carry it (letters, digits, `-`, `_`, `.`; at most 64 bytes):
/// an admin rule or entry for a tenant no job could name would never match.
pub fn check_tenant(field: &str, tenant: &str) -> Result<(), JobError> {
    check_identifier(field, tenant, MAX_TENANT_LEN, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
    })
}

/// Refuses a value longer than `max_len` bytes (saying so, never echoing it).
fn check_length(field: &str, value: &str, max_len: usize) -> Result<(), JobError> {
    if value.len() > max_len {
        return Err(JobError::new(
            field,
            format!(
                "is {} bytes long; at most {max_len} are accepted",
                value.len()
            ),
        ));
    }
    Ok(())
}

fn check_identifier(
    field: &str,
    value: &str,
    max_len: usize,
    allowed: impl Fn(char) -> bool,
) -> Result<(), JobError> {
    if value.trim().is_empty() {
        return Err(JobError::new(field, "is missing or empty"));
    }
    check_length(field, value, max_len)?;
    if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
        return Err(JobError::new(
            field,
            format!("contains the character {bad:?}"),
        ));
    }
    Ok(())
}

/// Turns serde's error into a [`JobError`] naming the field where it arose (`channels[1]`,
/// `targets[0].device.platform`, `code`; `body` for JSON that does not parse). Values that
/// serde quotes are cut out (a misplaced code must not reach a log line through an error);
/// what was expected is kept.
fn json_error(error: serde_path_to_error::Error<serde_json::Error>, body: &[u8]) -> JobError {
    let path = error.path().to_string();
    let inner = error.inner();
    let message = without_position(inner);
    if inner.is_syntax() || inner.is_eof() {
        // Valid JSON of the wrong shape can read as a syntax error to a typed parser (a
        // target with two keys): then the place is what matters.
        let valid_json = serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok();
        if !valid_json || path == "." || path.is_empty() {
            return JobError::new("body", format!("not valid JSON: {message}"));
        }
        let problem = if path.starts_with("targets[") && path.ends_with(']') {
            "must hold exactly one of `device` or `phone`".to_owned()
        } else {
            format!("has an unexpected shape ({})", redact_quoted(&message))
        };
        return JobError::new(path, problem);
    }
    // A missing field is named by serde, the path is its parent.
    let field = match message.strip_prefix("missing field `") {
        Some(rest) => {
            let name = rest.split('`').next().unwrap_or_default();
            match path.as_str() {
                "." | "" => name.to_owned(),
                parent => format!("{parent}.{name}"),
            }
        }
        None if path == "." || path.is_empty() => "body".to_owned(),
        None => path,
    };
    let problem = match message.split_once(", expected") {
        Some((what, expected)) => format!("{}, expected{expected}", redact_quoted(what)),
        None => redact_quoted(&message),
    };
    let problem = match problem.as_str() {
        "expected map with a single key" => {
            "must hold exactly one of `device` or `phone`".to_owned()
        }
        _ => problem,
    };
    JobError::new(field, problem)
}

/// serde_json's message without its ` at line L column C` (the field path says where).
fn without_position(error: &serde_json::Error) -> String {
    let message = error.to_string();
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message,
    }
}

/// Replaces every `quoted` or "quoted" fragment with `…`.
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut open: Option<char> = None;
    for c in message.chars() {
        match open {
            Some(quote) if c == quote => {
                out.push('…');
                out.push(c);
                open = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '`' || c == '"' {
                    open = Some(c);
                }
            }
        }
    }
    out
}

/// Whether `number` is in E.164 form: `+`, a non-zero country digit, 8 to 15 digits in all.
pub fn is_e164(number: &str) -> bool {
    let Some(digits) = number.strip_prefix('+') else {
        return false;
    };
    (8..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// Whether `token` can be an APNs device token: hexadecimal digits (64 today).
pub fn is_apns_token(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `(tenant, job_id)`: the idempotency key and the delivery id, written `tenant/job_id`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeliveryId {
    /// The tenant.
    pub tenant: String,
    /// The job id, unique within the tenant.
    pub job_id: String,
}

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.job_id)
    }
}

impl FromStr for DeliveryId {
    type Err = JobError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_TENANT_LEN + 1 + MAX_JOB_ID_LEN {
            // Never echoed: an error must not carry a long input back.
            return Err(JobError::new(
                "delivery_id",
                format!(
                    "is {} bytes long; a delivery id has at most {}",
                    s.len(),
                    MAX_TENANT_LEN + 1 + MAX_JOB_ID_LEN
                ),
            ));
        }
        match s.split_once('/') {
            Some((tenant, job_id)) if !tenant.is_empty() && !job_id.is_empty() => Ok(DeliveryId {
                tenant: tenant.to_owned(),
                job_id: job_id.to_owned(),
            }),
            _ => Err(JobError::new(
                "delivery_id",
                "must be \"<tenant>/<job_id>\"",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> serde_json::Value {
        serde_json::json!({
            "job_id": "3f2c", "tenant": "acme", "account": "user-42", "code": "482913",
            "expires_at": "2026-11-21T10:05:00Z", "purpose": "sign_in", "locale": "en-US",
            "user_initiated": true, "timezone": "Europe/Berlin",
            "channels": ["push", "sms", "voice"],
            "targets": [
                {"device": {"id": "ipad-1", "platform": "apns", "token": "a1b2", "topic": "com.example.app",
                            "can_display_code": true}},
                {"phone": {"number": "+14155550101"}}
            ]
        })
    }

    #[test]
    fn the_design_example_parses() {
        let job = Job::from_json(body().to_string().as_bytes()).unwrap();
        assert_eq!(job.delivery_id().to_string(), "acme/3f2c");
        assert_eq!(job.targets.len(), 2);
        assert_eq!(job.channel_order(), Channel::DEFAULT_ORDER);
        assert!(
            !format!("{job:?}").contains("482913"),
            "Debug must not show the code"
        );
    }

    #[test]
    fn missing_and_invalid_fields_are_named() {
        let mut json = body();
        json.as_object_mut().unwrap().remove("code");
        let err = Job::from_json(json.to_string().as_bytes()).unwrap_err();
        assert_eq!(err.field, "code");

        let mut json = body();
        json["targets"][0]["device"]["token"] = "".into();
        let err = Job::from_json(json.to_string().as_bytes()).unwrap_err();
        assert_eq!(err.field, "targets[0].device.token");

        let err = Job::from_json(b"{not json").unwrap_err();
        assert_eq!(err.field, "body");
        assert!(err.problem.starts_with("not valid JSON"), "{err}");

        let mut json = body();
        json["code"] = 482913.into();
        let err = Job::from_json(json.to_string().as_bytes()).unwrap_err();
        assert!(!err.to_string().contains("482913"), "{err}");
        assert!(err.problem.contains("expected a string"), "{err}");

        let mut json = body();
        json["tenant"] = "ac me".into();
        assert_eq!(
            Job::from_json(json.to_string().as_bytes())
                .unwrap_err()
                .field,
            "tenant"
        );
    }

    #[test]
    fn type_errors_name_the_field_and_what_was_expected() {
        let refused = |change: &dyn Fn(&mut serde_json::Value)| {
            let mut json = body();
            change(&mut json);
            Job::from_json(json.to_string().as_bytes()).unwrap_err()
        };
        let err = refused(&|j| j["channels"] = serde_json::json!(["sms", "fax"]));
        assert_eq!(err.field, "channels[1]");
        assert!(
            err.problem.contains("push") && err.problem.contains("voice"),
            "{err}"
        );
        let err = refused(&|j| j["targets"][0]["device"]["platform"] = "webpush".into());
        assert_eq!(err.field, "targets[0].device.platform");
        assert!(
            err.problem.contains("apns") && err.problem.contains("fcm"),
            "{err}"
        );
        let err = refused(&|j| j["code"] = 482913.into());
        assert_eq!(err.field, "code");
        assert!(!err.to_string().contains("482913"), "{err}");
        let err = refused(&|j| j["expires_at"] = "tomorrow".into());
        assert_eq!(err.field, "expires_at");
        assert!(!err.problem.starts_with("not valid JSON"), "{err}");
        let err = refused(&|j| {
            j["targets"][1] = serde_json::json!({"phone": {"number": "+14155550101"},
                "device": {"id": "x", "platform": "apns", "token": "ab"}})
        });
        assert_eq!(err.field, "targets[1]");
        assert!(err.problem.contains("exactly one of"), "{err}");
        let err = refused(&|j| {
            j["targets"][0]["device"]
                .as_object_mut()
                .unwrap()
                .remove("token");
        });
        assert_eq!(err.field, "targets[0].device.token");
        assert!(err.problem.contains("missing"), "{err}");
    }

    #[test]
    fn every_string_is_bounded_and_never_echoed() {
        let long = "x".repeat(5 * 1024 * 1024);
        for (path, field) in [
            ("/locale", "locale"),
            ("/timezone", "timezone"),
            ("/account", "account"),
            ("/targets/0/device/id", "targets[0].device.id"),
            ("/targets/0/device/topic", "targets[0].device.topic"),
            ("/targets/0/device/token", "targets[0].device.token"),
            ("/targets/1/phone/number", "targets[1].phone.number"),
        ] {
            let mut json = body();
            *json.pointer_mut(path).unwrap() = long.clone().into();
            let err = Job::from_json(json.to_string().as_bytes()).unwrap_err();
            assert_eq!(err.field, field);
            assert!(err.to_string().len() < 200, "{field}: not echoed");
        }
        let err = long.parse::<DeliveryId>().unwrap_err();
        assert!(err.to_string().len() < 200);
    }

    #[test]
    fn e164_numbers() {
        assert!(is_e164("+14155550101"));
        assert!(is_e164("+4930123456"));
        assert!(!is_e164("14155550101"));
        assert!(!is_e164("+1 415 555 0101"));
        assert!(!is_e164("+0123456789"));
        assert!(!is_e164("+1234567"));
        assert!(!is_e164("+1234567890123456"));
    }

    #[test]
    fn delivery_ids_parse_at_the_first_slash() {
        let id: DeliveryId = "acme/job/with/slashes".parse().unwrap();
        assert_eq!(id.tenant, "acme");
        assert_eq!(id.job_id, "job/with/slashes");
        assert!("nojob".parse::<DeliveryId>().is_err());
        assert!("/x".parse::<DeliveryId>().is_err());
    }
}
