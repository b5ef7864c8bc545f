//! `otp-gateway serve`: loads and validates the configuration (exit 64 naming the key when it
//! is wrong), starts the gateway and runs it until SIGTERM or SIGINT.

use std::path::Path;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use super::EXIT_CONFIG;
use super::connection::describe_error;
use crate::app::Application;
use crate::config::{Config, LogFormat};

/// Runs the gateway on the configuration at `config` (layered over the defaults).
pub async fn serve(config: Option<&Path>, log_json: bool) -> anyhow::Result<ExitCode> {
    let config = match Config::load(config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("otp-gateway: {error}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let format = if log_json {
        LogFormat::Json
    } else {
        config.log.format
    };
    let telemetry =
        match crate::telemetry::init_with_traces(format, &config.log.level, &config.traces) {
            Ok(telemetry) => telemetry,
            Err(error) => {
                eprintln!("otp-gateway: {error}");
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
        };
    let app = match Application::build(config).await {
        Ok(app) => app,
        // A key file that cannot be read or does not hold a key is a configuration error.
        Err(error) if error.is::<crate::providers::ProviderBuildError>() => {
            eprintln!("otp-gateway: {}", describe_error(&error));
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
        Err(error) => return Err(error),
    };
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signal(stop.clone()));
    let ran = app.run_until_stopped(stop).await;
    // Spans of the last jobs go out before the process ends (on a blocking thread: the
    // exporter waits for its own sends).
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    ran?;
    Ok(ExitCode::SUCCESS)
}

async fn stop_on_signal(stop: CancellationToken) {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
    }
    stop.cancel();
}
