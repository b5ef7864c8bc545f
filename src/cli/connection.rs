//! How a client command reaches the gateway (`--server` / `OTP_GATEWAY_SERVER`, never the
//! server's configuration), and how its errors read: as a person would say them.

use std::process::ExitCode;

use super::{EXIT_CONFIG, EXIT_UNAVAILABLE};

/// Where the gateway listens when neither `--server` nor `OTP_GATEWAY_SERVER` says.
const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// The gateway's URL from `--server` (`HOST:PORT` or a URL), or the default.
pub(super) fn server_address(explicit: Option<&str>) -> String {
    match explicit {
        Some(server) if server.contains("://") => server.to_owned(),
        Some(server) => format!("http://{server}"),
        None => DEFAULT_SERVER.to_owned(),
    }
}

/// A channel to the gateway at `server`, or the exit code after saying why there is none.
pub(super) async fn gateway(server: &str) -> Result<tonic::transport::Channel, ExitCode> {
    let endpoint = tonic::transport::Channel::from_shared(server.to_owned()).map_err(|error| {
        eprintln!("otp-gateway: `{server}` is not a gateway address: {error}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    endpoint.connect().await.map_err(|error| {
        eprintln!("otp-gateway: cannot reach the gateway at {server} (is `otp-gateway serve` running?): {error}");
        ExitCode::from(EXIT_UNAVAILABLE)
    })
}

/// Says why the gateway refused a request and gives the exit code to end with.
pub(super) fn refused(status: &tonic::Status, code: u8) -> ExitCode {
    eprintln!("otp-gateway: {}", status.message());
    ExitCode::from(code)
}

pub(super) fn describe_error(error: &anyhow::Error) -> String {
    let mut said = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if said.contains(&text) {
            continue;
        }
        if !said.is_empty() {
            said.push_str(": ");
        }
        said.push_str(&text);
    }
    said
}

/// `not found: no delivery acme/nope`: the status code in words, then the gateway's message.
pub(super) fn describe_status(status: &tonic::Status) -> String {
    use tonic::Code;
    let code = match status.code() {
        Code::NotFound => "not found",
        Code::InvalidArgument => "invalid argument",
        Code::FailedPrecondition => "failed precondition",
        Code::PermissionDenied => "permission denied",
        Code::Unauthenticated => "unauthenticated",
        Code::Unavailable => "unavailable",
        Code::AlreadyExists => "already exists",
        Code::ResourceExhausted => "resource exhausted",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::Unimplemented => "unimplemented",
        _ => "error",
    };
    format!("{code}: {}", status.message())
}
