//! Decoding of job message bodies, chosen by the message's content type.

use prost::Message;

use crate::domain::{Job, JobError};
use crate::proto::{job_from_proto, v1};

/// JSON bodies (the default when a message has no content type).
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Protobuf bodies: an encoded `otpgateway.v1.SendCodeJob`.
pub const CONTENT_TYPE_PROTOBUF: &str = "application/x-protobuf";

/// A content type's media type, lowercased, without parameters (`None` when there is none).
fn media_type(content_type: Option<&str>) -> Option<String> {
    content_type
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|ct| !ct.is_empty())
}

/// Decodes and validates a job. Errors name the field (or `body` / `content_type`).
pub fn decode_job(content_type: Option<&str>, body: &[u8]) -> Result<Job, JobError> {
    match media_type(content_type).as_deref() {
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

/// A verification message: upstream's report that the user entered the code (or did not).
#[derive(Debug, Clone, PartialEq)]
pub struct VerificationReport {
    /// The delivery.
    pub id: crate::domain::DeliveryId,
    /// Whether the user entered the code.
    pub verified: bool,
    /// When (`None`: when the gateway reads it).
    pub at: Option<jiff::Timestamp>,
}

/// The JSON body of a verification message.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct VerificationJson {
    delivery_id: String,
    verified: bool,
    #[serde(default)]
    at: Option<String>,
}

/// Decodes a verification message (JSON: `{"delivery_id": "acme/job-1", "verified": true,
/// "at": "2026-12-07T10:01:30Z"}`, `at` optional). Errors name the field.
pub fn decode_verification(
    content_type: Option<&str>,
    body: &[u8],
) -> Result<VerificationReport, JobError> {
    if let Some(other) = media_type(content_type).filter(|ct| ct != CONTENT_TYPE_JSON) {
        return Err(JobError::new(
            "content_type",
            format!("a verification message is {CONTENT_TYPE_JSON}, not `{other}`"),
        ));
    }
    let mut reader = serde_json::Deserializer::from_slice(body);
    let json: VerificationJson = serde_path_to_error::deserialize(&mut reader).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." {
            "body".to_owned()
        } else {
            field
        };
        JobError::new(field, e.inner().to_string())
    })?;
    let id = json
        .delivery_id
        .parse()
        .map_err(|e: JobError| JobError::new("delivery_id", e.problem))?;
    let at = json
        .at
        .map(|at| {
            at.parse::<jiff::Timestamp>()
                .map_err(|e| JobError::new("at", format!("`{at}` is not an RFC 3339 time: {e}")))
        })
        .transpose()?;
    Ok(VerificationReport {
        id,
        verified: json.verified,
        at,
    })
}

/// What a job that failed to decode says about itself, for the log line of its dead letter:
/// its `tenant` and `job_id` when they can be read and look like a tenant and a job id (a
/// corrupted message can run one field into the next), and never when they hold the message's
/// own code, or, when its code cannot be read, when they could be one (4 to 16 letters and
/// digits, a digit among them: a corrupted message may have put its code's bytes there).
pub fn identify(content_type: Option<&str>, body: &[u8]) -> (Option<String>, Option<String>) {
    let (tenant, job_id, code) = read_identity(content_type, body);
    let could_be_a_code = |v: &str| {
        (4..=16).contains(&v.len())
            && v.chars().all(|c| c.is_ascii_alphanumeric())
            && v.chars().any(|c| c.is_ascii_digit())
    };
    let clean = |value: Option<String>, fits: &dyn Fn(&str) -> bool| {
        value.filter(|v| {
            fits(v)
                && match code.as_str() {
                    "" => !could_be_a_code(v),
                    code => !v.contains(code),
                }
        })
    };
    (
        clean(tenant, &|t| {
            crate::domain::check_tenant("tenant", t).is_ok()
        }),
        clean(job_id, &|j| {
            !j.trim().is_empty()
                && j.len() <= crate::domain::MAX_JOB_ID_LEN
                && !j.chars().any(char::is_control)
        }),
    )
}

/// The `tenant`, `job_id` and `code` a body holds, as far as they can be read.
fn read_identity(
    content_type: Option<&str>,
    body: &[u8],
) -> (Option<String>, Option<String>, String) {
    if let Ok(job) = v1::SendCodeJob::decode(body)
        && content_type.is_some_and(|ct| ct.contains("protobuf"))
    {
        return (Some(job.tenant), Some(job.job_id), job.code);
    }
    #[derive(serde::Deserialize)]
    struct Identity {
        tenant: Option<serde_json::Value>,
        job_id: Option<serde_json::Value>,
        code: Option<serde_json::Value>,
    }
    let text = |v: Option<serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => Some(s),
        _ => None,
    };
    match serde_json::from_slice::<Identity>(body) {
        Ok(identity) => {
            let code = match identity.code {
                Some(serde_json::Value::String(code)) => code,
                Some(other @ serde_json::Value::Number(_)) => other.to_string(),
                _ => String::new(),
            };
            (text(identity.tenant), text(identity.job_id), code)
        }
        Err(_) => (None, None, String::new()),
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

/// A property of the decoder, over many generated inputs: whatever a message holds, no error
/// it yields (which goes into dead-letter headers and logs) and nothing `identify` reads
/// quotes the code back, and a dead-lettered copy never holds it.
#[cfg(test)]
mod code_never_quoted {
    use super::*;

    /// A code unlike anything else in the generated messages.
    const CODE: &str = "739148";

    /// A JSON job with the code, then `mutations` random edits of its text.
    fn mutated_json(rng: &mut fastrand::Rng, mutations: usize) -> Vec<u8> {
        let fields = [
            format!(r#""code":"{CODE}""#),
            format!(r#""code":{CODE}"#),
            format!(r#""code":["{CODE}"]"#),
            format!(r#""code":{{"v":"{CODE}"}}"#),
            format!(r#""code":"{CODE}{CODE}{CODE}""#),
        ];
        let code = &fields[rng.usize(..fields.len())];
        let others = [
            r#""job_id":"j-1""#,
            r#""tenant":"acme""#,
            r#""account":"user-1""#,
            r#""expires_at":"2030-01-01T00:00:00Z""#,
            r#""channels":["sms","fax"]"#,
            r#""targets":[{"phone":{"number":"+14155550101"}}]"#,
            r#""targets":[{"device":{"id":"d","platform":"webpush","token":"ab"}}]"#,
            r#""locale":7"#,
        ];
        let mut parts: Vec<&str> = others.iter().copied().filter(|_| rng.bool()).collect();
        parts.insert(rng.usize(..=parts.len()), code);
        let mut text = format!("{{{}}}", parts.join(",")).into_bytes();
        let alphabet = b"{}[]\":,0123456789abcdef \\\x00\xff";
        for _ in 0..mutations {
            if text.is_empty() {
                break;
            }
            let at = rng.usize(..text.len());
            match rng.u8(..3) {
                0 => text[at] = alphabet[rng.usize(..alphabet.len())],
                1 => {
                    text.remove(at);
                }
                _ => text.insert(at, alphabet[rng.usize(..alphabet.len())]),
            }
        }
        text
    }

    fn check(content_type: Option<&str>, body: &[u8]) {
        if let Err(error) = decode_job(content_type, body) {
            let said = format!("{error} {}", error.field);
            assert!(
                !said.contains(CODE),
                "{said:?} from {:?}",
                String::from_utf8_lossy(body)
            );
        }
        let (tenant, job_id) = identify(content_type, body);
        for read in [tenant, job_id].into_iter().flatten() {
            assert!(!read.contains(CODE), "{read:?}");
        }
    }

    #[test]
    fn no_json_message_makes_the_decoder_quote_its_code() {
        let mut rng = fastrand::Rng::with_seed(20261207);
        for case in 0..20_000 {
            let body = mutated_json(&mut rng, case % 6);
            check(Some(CONTENT_TYPE_JSON), &body);
            check(None, &body);
        }
    }

    #[test]
    fn no_protobuf_message_makes_the_decoder_quote_its_code() {
        let mut rng = fastrand::Rng::with_seed(7);
        for case in 0..20_000 {
            let job = v1::SendCodeJob {
                job_id: if rng.bool() {
                    "j-1".into()
                } else {
                    String::new()
                },
                tenant: if rng.bool() {
                    "acme".into()
                } else {
                    "bad tenant!".into()
                },
                account: "user-1".into(),
                code: CODE.repeat(1 + case % 2),
                ..Default::default()
            };
            let mut body = job.encode_to_vec();
            for _ in 0..case % 4 {
                if body.is_empty() {
                    break;
                }
                let at = rng.usize(..body.len());
                body[at] = rng.u8(..);
            }
            check(Some(CONTENT_TYPE_PROTOBUF), &body);
            // A dead-lettered copy holds no code in its `code` field (corruption may have moved
            // the code's bytes into another field, where nothing can tell them from a name).
            if decode_job(Some(CONTENT_TYPE_PROTOBUF), &body).is_err()
                && v1::SendCodeJob::decode(body.as_slice()).is_ok()
            {
                let copy = without_code(Some(CONTENT_TYPE_PROTOBUF), &body);
                let copy = v1::SendCodeJob::decode(copy.as_slice()).unwrap();
                assert!(!copy.code.contains(CODE), "{copy:?}");
            }
        }
    }
}
