//! The `otp-gateway` command: parses the command line and hands over to [`otp_gateway::cli`]
//! (`serve` runs the gateway; the other verbs are gRPC clients of a running one).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    otp_gateway::cli::run(otp_gateway::cli::Cli::parse())
}
