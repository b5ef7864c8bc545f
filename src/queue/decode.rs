//! Decoding of job message bodies, chosen by the message's content type.

use prost::Message;

use crate::domain::{Job, JobError};
use crate::proto::{job_from_proto, v1};

/// JSON bodies (the default when a message has no content type).
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Protobuf bodies: an encoded `otpgateway.v1.SendCodeJob`.
pub const CONTENT_TYPE_PROTOBUF: &str = "application/x-protobuf";

/// Decodes and validates a job. Errors name the field (or `body` / `content_type`).
pub fn decode_job(content_type: Option<&str>, body: &[u8]) -> Result<Job, JobError> {
    let media_type = content_type
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|ct| !ct.is_empty());
    match media_type.as_deref() {
        None | Some(CONTENT_TYPE_JSON) => Job::from_json(body),
        Some(
            CONTENT_TYPE_PROTOBUF | "application/protobuf" | "application/vnd.google.protobuf",
        ) => {
            let job = v1::SendCodeJob::decode(body).map_err(|e| {
                JobError::new(
                    "body",
                    format!("not a valid otpgateway.v1.SendCodeJob protobuf: {e}"),
                )
            })?;
            job_from_proto(job)
        }
        Some(other) => Err(JobError::new(
            "content_type",
            format!(
                "unsupported content type `{other}`: use {CONTENT_TYPE_JSON} or {CONTENT_TYPE_PROTOBUF}"
            ),
        )),
    }
}

/// What a job that failed to decode says about itself, for the log line of its dead letter:
/// its `tenant` and `job_id` when they can be read (short strings only; nothing else of the
/// body, which may hold the code).
pub fn identify(content_type: Option<&str>, body: &[u8]) -> (Option<String>, Option<String>) {
    const LONGEST: usize = 128;
    let short = |s: String| Some(s).filter(|s| !s.is_empty() && s.len() <= LONGEST);
    if let Ok(job) = v1::SendCodeJob::decode(body)
        && content_type.is_some_and(|ct| ct.contains("protobuf"))
    {
        return (short(job.tenant), short(job.job_id));
    }
    #[derive(serde::Deserialize)]
    struct Identity {
        tenant: Option<serde_json::Value>,
        job_id: Option<serde_json::Value>,
    }
    let text = |v: Option<serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => short(s),
        _ => None,
    };
    match serde_json::from_slice::<Identity>(body) {
        Ok(identity) => (text(identity.tenant), text(identity.job_id)),
        Err(_) => (None, None),
    }
}

/// What stands in for the code in a dead-lettered copy of a job.
pub const REDACTED_CODE: &str = "[redacted]";

/// A job body without its code, for a dead-lettered copy (the rest kept for diagnosis): the
/// `code` of a protobuf or JSON job, and in a body that does not parse, every value written
/// after a `code` key (`"code": "…"`, `code=…`). A body in which no code can be found is kept
/// as it is.
pub fn without_code(content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    if content_type.is_some_and(|ct| ct.contains("protobuf"))
        && let Ok(mut job) = v1::SendCodeJob::decode(body)
    {
        if !job.code.is_empty() {
            job.code = REDACTED_CODE.into();
        }
        return job.encode_to_vec();
    }
    if let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(body) {
        if let Some(code) = value.as_object_mut().and_then(|job| job.get_mut("code")) {
            *code = serde_json::Value::String(REDACTED_CODE.into());
        }
        return serde_json::to_vec(&value).unwrap_or_else(|_| body.to_vec());
    }
    redact_code_values(&String::from_utf8_lossy(body)).into_bytes()
}

/// `text` with the value after each `code` key (`"code": "…"`, `"code": 123`, `code=…`)
/// replaced by [`REDACTED_CODE`].
fn redact_code_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("code") {
        let (before, after) = rest.split_at(at + "code".len());
        out.push_str(before);
        let key_end = after.strip_prefix('"').unwrap_or(after);
        let trimmed = key_end.trim_start();
        let Some(value) = trimmed
            .strip_prefix(':')
            .or_else(|| trimmed.strip_prefix('='))
        else {
            rest = after;
            continue;
        };
        let value = value.trim_start();
        out.push_str(&after[..after.len() - value.len()]);
        let (replaced, remaining) = match value.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"').map_or(quoted.len(), |i| i + 1);
                (format!("\"{REDACTED_CODE}\""), &quoted[end..])
            }
            None => {
                let end = value
                    .find(|c: char| !c.is_alphanumeric())
                    .unwrap_or(value.len());
                if end == 0 {
                    (String::new(), value)
                } else {
                    (REDACTED_CODE.to_owned(), &value[end..])
                }
            }
        };
        out.push_str(&replaced);
        rest = remaining;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_choose_the_decoder() {
        let err = decode_job(Some("text/plain"), b"{}").unwrap_err();
        assert_eq!(err.field, "content_type");
        let err = decode_job(Some("application/x-protobuf"), b"\xff\xff\xff").unwrap_err();
        assert_eq!(err.field, "body");
        let err = decode_job(Some("application/json; charset=utf-8"), b"[]").unwrap_err();
        assert_eq!(err.field, "body");
        let err = decode_job(
            None,
            br#"{"job_id":"j","tenant":"t","account":"a","expires_at":"2030-01-01T00:00:00Z"}"#,
        )
        .unwrap_err();
        assert_eq!(err.field, "code");
    }

    #[test]
    fn a_malformed_job_is_identified_by_tenant_and_job_id_only() {
        let body = br#"{"tenant":"acme","job_id":"j-1","code":482913,"channels":["fax"]}"#;
        assert_eq!(
            identify(None, body),
            (Some("acme".into()), Some("j-1".into()))
        );
        assert_eq!(identify(None, b"{not json"), (None, None));
    }
}

#[cfg(test)]
mod redaction {
    use super::*;

    #[test]
    fn dead_letter_copies_keep_the_job_but_not_its_code() {
        let json = br#"{"job_id":"j-1","tenant":"acme","code":"482913","targets":[]}"#;
        let copy = String::from_utf8(without_code(Some(CONTENT_TYPE_JSON), json)).unwrap();
        assert!(!copy.contains("482913") && copy.contains("j-1") && copy.contains(REDACTED_CODE));
        let numeric = br#"{"job_id":"j-2","code":482913}"#;
        let copy = String::from_utf8(without_code(None, numeric)).unwrap();
        assert!(!copy.contains("482913") && copy.contains("j-2"));
        for broken in [
            &br#"{"job_id":"j-3", "code" : "482913", "targets": [}"#[..],
            b"code=482913&tenant=acme",
            br#"{"code":482913"#,
        ] {
            let copy = String::from_utf8(without_code(Some("text/plain"), broken)).unwrap();
            assert!(!copy.contains("482913"), "{copy}");
        }
        let proto = v1::SendCodeJob {
            job_id: "j-4".into(),
            code: "482913".into(),
            ..Default::default()
        };
        let copy = without_code(Some(CONTENT_TYPE_PROTOBUF), &proto.encode_to_vec());
        let decoded = v1::SendCodeJob::decode(copy.as_slice()).unwrap();
        assert_eq!(
            (decoded.job_id.as_str(), decoded.code.as_str()),
            ("j-4", REDACTED_CODE)
        );
        // Nothing that names a code: kept as it is.
        assert_eq!(without_code(None, b"no secrets here"), b"no secrets here");
    }
}
