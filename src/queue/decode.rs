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
