//! TLS on the gRPC port (rustls on ring): the certificate and key files of `grpc.tls`, and
//! optionally the CAs a client certificate must chain to (mutual TLS). HTTP/2 is agreed by
//! ALPN. The files are read again on SIGHUP and when one of them changes (checked every
//! [`RELOAD_CHECK`]): new connections get the new certificate, open ones keep theirs; files
//! that do not load are logged and the certificate in use stays. A client that does not finish
//! its handshake within [`HANDSHAKE_TIMEOUT`] (a plain-text client, a scanner) is dropped
//! without holding anything up.

use std::io;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::GrpcTlsConfig;
use crate::domain::InvalidSetting;

/// How often the certificate files are checked for changes.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at most (beyond, new connections wait to be accepted).
const HANDSHAKES_AT_ONCE: usize = 256;

fn certificates(
    key: &str,
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, InvalidSetting> {
    let problem = |what: String| InvalidSetting::new(key, format!("{}: {what}", path.display()));
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| problem(format!("cannot be read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(format!("is not PEM: {e}")))?;
    if certificates.is_empty() {
        return Err(problem("holds no PEM certificate".into()));
    }
    Ok(certificates)
}

/// The server's TLS settings from the files `tls` names; the error names the key whose file is
/// wrong and says why.
pub fn server_config(tls: &GrpcTlsConfig) -> Result<Arc<rustls::ServerConfig>, InvalidSetting> {
    let chain = certificates("grpc.tls.cert_file", &tls.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file).map_err(|e| {
        InvalidSetting::new(
            "grpc.tls.key_file",
            format!(
                "{}: no PEM private key could be read: {e}",
                tls.key_file.display()
            ),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| InvalidSetting::new("grpc.tls", e.to_string()))?;
    let builder = match &tls.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in certificates("grpc.tls.client_ca_file", path)? {
                roots.add(certificate).map_err(|e| {
                    InvalidSetting::new(
                        "grpc.tls.client_ca_file",
                        format!("{}: a certificate is not a usable CA: {e}", path.display()),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| {
                    InvalidSetting::new(
                        "grpc.tls.client_ca_file",
                        format!("{}: {e}", path.display()),
                    )
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        InvalidSetting::new(
            "grpc.tls.key_file",
            format!(
                "{} does not go with the certificate in {}: {e}",
                tls.key_file.display(),
                tls.cert_file.display()
            ),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS settings in use, replaced when the files change.
type Current = Arc<RwLock<Arc<rustls::ServerConfig>>>;

/// The gRPC port's TLS: the files, and the settings read from them at start.
#[derive(Debug, Clone)]
pub struct GrpcTls {
    files: GrpcTlsConfig,
    initial: Arc<rustls::ServerConfig>,
}

impl GrpcTls {
    /// Reads the files (the error names the key of the one that is wrong).
    pub fn load(files: &GrpcTlsConfig) -> Result<GrpcTls, InvalidSetting> {
        Ok(GrpcTls {
            initial: server_config(files)?,
            files: files.clone(),
        })
    }
}

/// The connections of `listener` after their TLS handshake, until `stop`; the certificate is
/// reloaded as the module says.
pub fn incoming(
    listener: TcpListener,
    tls: GrpcTls,
    stop: CancellationToken,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let current: Current = Arc::new(RwLock::new(tls.initial));
    tokio::spawn(reload(tls.files, Arc::clone(&current), stop.clone()));
    let (sender, receiver) = mpsc::channel(HANDSHAKES_AT_ONCE);
    tokio::spawn(accept(listener, current, sender, stop));
    ReceiverStream::new(receiver)
}

async fn accept(
    listener: TcpListener,
    current: Current,
    sender: mpsc::Sender<io::Result<TlsStream<TcpStream>>>,
    stop: CancellationToken,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_AT_ONCE));
    loop {
        let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
            return;
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "gRPC: a connection could not be accepted");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = TlsAcceptor::from(Arc::clone(
            &current.read().unwrap_or_else(|p| p.into_inner()),
        ));
        let sender = sender.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = sender.send(Ok(tls)).await;
                }
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "gRPC: TLS handshake failed");
                }
                Err(_) => tracing::debug!(%peer, "gRPC: TLS handshake timed out"),
            }
        });
    }
}

/// What the files looked like when last read: a change in any of them means a reload.
fn stamps(tls: &GrpcTlsConfig) -> Vec<Option<(SystemTime, u64)>> {
    [
        Some(&tls.cert_file),
        Some(&tls.key_file),
        tls.client_ca_file.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        std::fs::metadata(path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    })
    .collect()
}

async fn reload(tls: GrpcTlsConfig, current: Current, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(error) => {
            tracing::warn!(%error, "SIGHUP cannot be caught: the gRPC certificate reloads only when its files change");
            None
        }
    };
    let mut seen = stamps(&tls);
    let mut check = tokio::time::interval(RELOAD_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            _ = stop.cancelled() => return,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(hangup) => hangup.recv().await,
                    None => std::future::pending().await,
                }
            } => "SIGHUP",
            _ = check.tick() => {
                let now = stamps(&tls);
                if now == seen {
                    continue;
                }
                seen = now;
                "a file changed"
            }
        };
        match server_config(&tls) {
            Ok(config) => {
                *current.write().unwrap_or_else(|p| p.into_inner()) = config;
                tracing::info!(why, cert_file = %tls.cert_file.display(), "gRPC TLS certificate reloaded");
            }
            Err(error) => tracing::error!(
                why, %error,
                "gRPC TLS certificate not reloaded: the one in use stays until the files load"
            ),
        }
    }
}
