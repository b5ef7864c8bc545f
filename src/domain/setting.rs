//! Setting values every layer's settings are made of: durations as `std::time::Duration`
//! (read from "500ms", "30s" or ISO 8601, and refused where they make no sense), secrets that
//! never show in `Debug` output, a reconnect schedule, and a setting that is wrong, named by
//! its dotted key. No layer's settings type lives here: each layer owns its own.

use std::fmt;
use std::time::Duration;

use jiff::SignedDuration;
use serde::{Deserialize, Deserializer};

/// A setting whose value makes no sense, named by its dotted key (`amqp.prefetch`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration key `{key}`: {problem}")]
pub struct InvalidSetting {
    /// The dotted key, e.g. `providers.twilio.retry.max_interval`.
    pub key: String,
    /// What is wrong with the value.
    pub problem: String,
}

impl InvalidSetting {
    /// The setting at `key` is wrong: `problem`.
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        InvalidSetting {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// serde: a duration that must be positive ("30s"), as a `std` duration.
pub fn positive_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let value = SignedDuration::deserialize(deserializer)?;
    if value.is_positive() {
        Ok(value.unsigned_abs())
    } else {
        Err(serde::de::Error::custom(format!(
            "must be a positive duration, got {value:#}"
        )))
    }
}

/// serde: a duration that may be zero ("0s" turns something off) but not negative.
pub fn non_negative_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    let value = SignedDuration::deserialize(deserializer)?;
    if value.is_negative() {
        Err(serde::de::Error::custom(format!(
            "must not be negative, got {value:#}"
        )))
    } else {
        Ok(value.unsigned_abs())
    }
}

/// serde: an `http://` or `https://` URL, parsed.
pub fn http_url<'de, D: Deserializer<'de>>(deserializer: D) -> Result<url::Url, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_http_url(&text).map_err(serde::de::Error::custom)
}

/// serde: an optional `http://` or `https://` URL, parsed.
pub fn optional_http_url<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<url::Url>, D::Error> {
    match Option::<String>::deserialize(deserializer)? {
        Some(text) => parse_http_url(&text)
            .map(Some)
            .map_err(serde::de::Error::custom),
        None => Ok(None),
    }
}

fn parse_http_url(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    if matches!(url.scheme(), "http" | "https") {
        Ok(url)
    } else {
        Err(format!("`{text}` must be an http(s) URL"))
    }
}

/// A reconnect schedule that never gives up: exponential (with the crate's jitter) from
/// `initial` up to `max` (validated settings). Returns the schedule and its ceiling.
pub fn reconnect_backoff(
    initial: Duration,
    max: Duration,
) -> (backoff::ExponentialBackoff, Duration) {
    let max = max.max(initial);
    let schedule = backoff::ExponentialBackoffBuilder::new()
        .with_initial_interval(initial)
        .with_max_interval(max)
        .with_max_elapsed_time(None)
        .build();
    (schedule, max)
}

/// A secret from the configuration: shown as `•••`.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        SecretString(secret.into())
    }

    /// The secret itself, for the one call that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"•••\"")
    }
}

/// A secret given either in a setting or in a file a setting names (a Docker secret), at least
/// `min_len` characters; `Ok(None)` when neither is set. `key` and `file_key` name the settings
/// in errors.
pub fn secret_setting(
    (key, value): (&str, Option<&SecretString>),
    (file_key, file): (&str, Option<&std::path::Path>),
    min_len: usize,
) -> Result<Option<SecretString>, InvalidSetting> {
    let (secret, named) = match (value, file) {
        (Some(_), Some(_)) => {
            return Err(InvalidSetting::new(
                file_key,
                format!("is set together with {key}: give one of them"),
            ));
        }
        (Some(secret), None) => (secret.expose().trim().to_owned(), key),
        (None, Some(path)) => (
            std::fs::read_to_string(path)
                .map_err(|e| {
                    InvalidSetting::new(
                        file_key,
                        format!("cannot be read ({}): {e}", path.display()),
                    )
                })?
                .trim()
                .to_owned(),
            file_key,
        ),
        (None, None) => return Ok(None),
    };
    if secret.chars().count() < min_len {
        return Err(InvalidSetting::new(
            named,
            format!("is shorter than {min_len} characters (make one with `openssl rand -hex 32`)"),
        ));
    }
    Ok(Some(SecretString::new(secret)))
}

/// A URL that may carry a password: shown with the password replaced by `•••`.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    /// The URL with its password, for the one call that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL without its password, for logs and messages.
    pub fn redacted(&self) -> String {
        let url = &self.0;
        let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
            return url.clone();
        };
        let authority_end = url[scheme_end..]
            .find('/')
            .map_or(url.len(), |i| scheme_end + i);
        match url[scheme_end..authority_end].rfind('@') {
            Some(at) => {
                let userinfo = &url[scheme_end..scheme_end + at];
                let user = userinfo.split(':').next().unwrap_or_default();
                let masked = if userinfo.contains(':') {
                    format!("{user}:•••")
                } else {
                    user.into()
                };
                format!("{}{masked}{}", &url[..scheme_end], &url[scheme_end + at..])
            }
            None => url.clone(),
        }
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}
