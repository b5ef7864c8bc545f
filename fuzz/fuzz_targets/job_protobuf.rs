//! The protobuf job decoder (queue bodies and SendCode): never panics, and what it says of a
//! bad job never holds the job's code.
#![no_main]

use libfuzzer_sys::fuzz_target;
use otp_gateway::proto::v1;
use otp_gateway::queue::{decode_job, identify, without_code};
use prost::Message;

fuzz_target!(|body: &[u8]| {
    const PROTOBUF: Option<&str> = Some("application/x-protobuf");
    let code = v1::SendCodeJob::decode(body).ok().map(|job| job.code);
    let said = match decode_job(PROTOBUF, body) {
        Ok(_) => String::new(),
        Err(error) => format!("{} {}", error.field, error),
    };
    let (tenant, job_id) = identify(PROTOBUF, body);
    let copy = without_code(PROTOBUF, body);
    if let Some(code) = code.filter(|c| c.len() >= 4) {
        assert!(!said.contains(&code), "the error quotes the code");
        for read in [tenant, job_id].into_iter().flatten() {
            assert!(!read.contains(&code), "identify quotes the code");
        }
        let copy = v1::SendCodeJob::decode(copy.as_slice()).expect("a protobuf copy");
        assert_ne!(copy.code, code);
    }
});
