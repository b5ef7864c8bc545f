//! How a client command reaches the gateway (`--server` / `OTP_GATEWAY_SERVER`, and the API
//! key: `--key` / `OTP_GATEWAY_KEY`; never the server's configuration), and how its errors
//! read: as a person would say them.

use std::fmt;
use std::process::ExitCode;

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;

use super::{EXIT_CONFIG, EXIT_UNAVAILABLE};

/// The gateway a client command talks to, and the key it shows.
pub(super) struct Server {
    address: String,
    key: Option<String>,
}

impl Server {
    /// The gateway at `address` (`HOST:PORT` or a URL; default 127.0.0.1:50051), called with
    /// `key` when there is one.
    pub(super) fn new(address: Option<&str>, key: Option<String>) -> Server {
        Server {
            address: server_address(address),
            key: key.map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()),
        }
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.address)
    }
}

/// Shows the API key with every call (`authorization: Bearer <key>`).
#[derive(Clone)]
pub(super) struct ShowKey(Option<AsciiMetadataValue>);

impl Interceptor for ShowKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(key) = &self.0 {
            request.metadata_mut().insert("authorization", key.clone());
        }
        Ok(request)
    }
}

/// A connection to the gateway that shows the key.
pub(super) type Gateway = InterceptedService<tonic::transport::Channel, ShowKey>;

/// Where the gateway listens when neither `--server` nor `OTP_GATEWAY_SERVER` says.
const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// The gateway's URL from `--server` (`HOST:PORT` or a URL), or the default.
fn server_address(explicit: Option<&str>) -> String {
    match explicit {
        Some(server) if server.contains("://") => server.to_owned(),
        Some(server) => format!("http://{server}"),
        None => DEFAULT_SERVER.to_owned(),
    }
}

/// A connection to `server`, or the exit code after saying why there is none.
pub(super) async fn gateway(server: &Server) -> Result<Gateway, ExitCode> {
    let key = match &server.key {
        None => None,
        Some(key) => Some(
            MetadataValue::try_from(format!("Bearer {key}")).map_err(|_| {
                eprintln!(
                    "otp-gateway: the API key (--key / OTP_GATEWAY_KEY) holds characters no key has"
                );
                ExitCode::from(EXIT_CONFIG)
            })?,
        ),
    };
    let endpoint =
        tonic::transport::Channel::from_shared(server.address.clone()).map_err(|error| {
            eprintln!("otp-gateway: `{server}` is not a gateway address: {error}");
            ExitCode::from(EXIT_CONFIG)
        })?;
    let channel = endpoint.connect().await.map_err(|error| {
        eprintln!("otp-gateway: cannot reach the gateway at {server} (is `otp-gateway serve` running?): {error}");
        ExitCode::from(EXIT_UNAVAILABLE)
    })?;
    Ok(InterceptedService::new(channel, ShowKey(key)))
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
