//! How a client command reaches the gateway (`--server` / `OTP_GATEWAY_SERVER`; TLS with
//! `--ca-file` and, for mutual TLS, `--client-cert` / `--client-key`; the API key: `--key` /
//! `OTP_GATEWAY_KEY`; never the server's configuration), and how its errors read: as a person
//! would say them.

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use super::{EXIT_CONFIG, EXIT_UNAVAILABLE};

/// The gateway a client command talks to, how, and the key it shows.
pub(super) struct Server {
    address: String,
    key: Option<String>,
    tls: ClientTls,
}

/// The client's TLS settings.
pub(super) struct ClientTls {
    /// The CAs the gateway's certificate chains to (none: the system's roots).
    pub(super) ca_file: Option<PathBuf>,
    /// This client's certificate and key, for mutual TLS.
    pub(super) client_cert: Option<(PathBuf, PathBuf)>,
}

impl Server {
    /// The gateway at `address` (`HOST:PORT` or a URL; default 127.0.0.1:50051), called with
    /// `key` when there is one, over TLS when the URL is `https://` or `tls` names files.
    pub(super) fn new(address: Option<&str>, key: Option<String>, tls: ClientTls) -> Server {
        let secure = tls.ca_file.is_some() || tls.client_cert.is_some();
        Server {
            address: server_address(address, secure),
            key: key.map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()),
            tls,
        }
    }

    /// The TLS settings for an `https://` address, or the exit code after saying which file
    /// is wrong.
    fn tls_config(&self) -> Result<ClientTlsConfig, ExitCode> {
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|error| {
                eprintln!(
                    "otp-gateway: {flag} {}: cannot be read: {error}",
                    path.display()
                );
                ExitCode::from(EXIT_CONFIG)
            })
        };
        let mut config = ClientTlsConfig::new();
        config = match &self.tls.ca_file {
            Some(path) => config.ca_certificate(Certificate::from_pem(read("--ca-file", path)?)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.tls.client_cert {
            config = config.identity(Identity::from_pem(
                read("--client-cert", cert)?,
                read("--client-key", key)?,
            ));
        }
        Ok(config)
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

/// The gateway's URL from `--server` (`HOST:PORT` or a URL), or the default; a `HOST:PORT`
/// is reached over TLS when `secure`.
fn server_address(explicit: Option<&str>, secure: bool) -> String {
    let scheme = if secure { "https" } else { "http" };
    match explicit {
        Some(server) if server.contains("://") => server.to_owned(),
        Some(server) => format!("{scheme}://{server}"),
        None => DEFAULT_SERVER.replacen("http", scheme, 1),
    }
}

/// An error with its causes, `: `-separated (a transport error's own text says little).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
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
    let mut endpoint =
        tonic::transport::Channel::from_shared(server.address.clone()).map_err(|error| {
            eprintln!("otp-gateway: `{server}` is not a gateway address: {error}");
            ExitCode::from(EXIT_CONFIG)
        })?;
    if server.address.starts_with("https://") {
        endpoint = endpoint.tls_config(server.tls_config()?).map_err(|error| {
            eprintln!(
                "otp-gateway: the TLS settings do not work: {}",
                chain(&error)
            );
            ExitCode::from(EXIT_CONFIG)
        })?;
    }
    let channel = endpoint.connect().await.map_err(|error| {
        eprintln!(
            "otp-gateway: cannot reach the gateway at {server} (is `otp-gateway serve` running, and does it speak {}?): {}",
            if server.address.starts_with("https://") { "TLS, with a certificate --ca-file trusts" } else { "plain text (give --ca-file or an https:// server for TLS)" },
            chain(&error)
        );
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
