//! The command line: `serve` runs the gateway (the only verb that loads the configuration);
//! `send`, `status`, `diagnose`, `block`, `quiet`, `limits`, `keys`, `fraud`, `explain` and `health` are gRPC
//! clients of a running gateway with their own connection settings (`--server` /
//! `OTP_GATEWAY_SERVER`, `--key` / `OTP_GATEWAY_KEY`).
//!
//! - `args`: the verbs and their flags.
//! - `serve`: the server's entry point.
//! - `connection`: how a client command reaches the gateway, and how errors read.
//! - `deliveries`: `send`, `status`, `explain`, `health` and the report's printout.
//! - `rules`: `block`, `quiet` and `limits`, one shape for the three kinds of rule.
//! - `diagnose`: an account's diagnosis as a support agent reads it.
//! - `keys`: API keys (create, ls, revoke), and `erase-account`.
//! - `fraud`: the fraud guard's quarantines (ls, lift, pin).

mod args;
mod connection;
mod deliveries;
mod diagnose;
mod fraud;
mod keys;
mod rules;
mod serve;

use std::process::ExitCode;

pub use args::Cli;
use args::Command;
use connection::{describe_error, describe_status};

/// EX_USAGE: the configuration (or a command's input) is wrong.
pub const EXIT_CONFIG: u8 = 64;
/// EX_UNAVAILABLE: the gateway could not be reached.
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Runs the parsed command line to its exit code.
pub fn run(cli: Cli) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let tls = connection::ClientTls {
        ca_file: cli.ca_file,
        client_cert: cli.client_cert.zip(cli.client_key),
    };
    let server = connection::Server::new(cli.server.as_deref(), cli.key, tls);
    let server = &server;
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve => serve::serve(cli.config.as_deref(), cli.log_json).await,
            Command::Send(args) => deliveries::send(args, server).await,
            Command::Status { id } => deliveries::status(&id, server).await,
            Command::Verify { id, failed, at } => {
                deliveries::verify(&id, !failed, at, server).await
            }
            Command::Explain { file, at } => deliveries::explain(&file, at, server).await,
            Command::Health => deliveries::health(server).await,
            Command::Block { command } => rules::run(command.into(), server).await,
            Command::Quiet { command } => rules::run(command.into(), server).await,
            Command::Limits { command } => rules::run(command.into(), server).await,
            Command::Keys { command } => keys::run(command, server).await,
            Command::Fraud { command } => fraud::run(command, server).await,
            Command::Diagnose { tenant, account } => {
                diagnose::diagnose(&tenant, &account, server).await
            }
            Command::EraseAccount { tenant, account } => {
                keys::erase_account(&tenant, &account, server).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            // A refusal from the gateway reads as a person would say it, not as a dump.
            match error.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("otp-gateway: {}", describe_status(status)),
                None => eprintln!("otp-gateway: {}", describe_error(&error)),
            }
            ExitCode::FAILURE
        }
    }
}
