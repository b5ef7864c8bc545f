//! The JSON job decoder (queue bodies): never panics; what it says of a bad job (dead-letter
//! headers, logs) and what the dead-lettered copy keeps never hold the job's code.
#![no_main]

use libfuzzer_sys::fuzz_target;
use otp_gateway::queue::{decode_job, identify, without_code};

fuzz_target!(|body: &[u8]| {
    let code = serde_code(body);
    let said = match decode_job(Some("application/json"), body) {
        Ok(_) => String::new(),
        Err(error) => format!("{} {}", error.field, error),
    };
    let (tenant, job_id) = identify(Some("application/json"), body);
    let copy = without_code(Some("application/json"), body);
    if let Some(code) = code.filter(|c| c.len() >= 4) {
        assert!(!said.contains(&code), "the error quotes the code");
        for read in [tenant, job_id].into_iter().flatten() {
            assert!(!read.contains(&code), "identify quotes the code");
        }
        let copy: serde_json::Value = serde_json::from_slice(&copy).expect("a JSON copy");
        assert_ne!(copy["code"].as_str(), Some(code.as_str()));
    }
});

/// The job's code, when the body is a JSON object with a string `code`.
fn serde_code(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("code")?.as_str().map(str::to_owned)
}
