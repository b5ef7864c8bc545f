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
}
