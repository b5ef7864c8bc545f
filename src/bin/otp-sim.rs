//! `otp-sim`: Twilio-, SMPP-, APNs- and FCM-speaking provider simulators with fault knobs, for
//! a local stack that needs no provider accounts (see `otp_gateway::sim` and the README's
//! "A local stack"). Every flag can also be set by its `OTP_SIM_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use otp_gateway::sim::{Faults, Sim, SimSettings, apns, smpp, twilio};

/// Provider simulators for otp-gateway: Twilio's REST API with signed status callbacks, an SMPP
/// 3.4 SMSC with delivery receipts, APNs (HTTP/2, ES256 provider tokens) and FCM HTTP v1 (with
/// its OAuth token endpoint). Faults can be changed while it runs: PUT /sim/faults/NAME with the
/// fields to change as JSON (NAME: twilio, smpp, apns, fcm); GET /sim/messages lists what was
/// accepted.
#[derive(Debug, Parser)]
#[command(name = "otp-sim", version)]
struct Args {
    /// Where Twilio, APNs, FCM, the OAuth endpoint and the control routes listen (HTTP/1.1 and
    /// cleartext HTTP/2).
    #[arg(long, env = "OTP_SIM_HTTP", default_value = "127.0.0.1:8099")]
    http: SocketAddr,
    /// Where the SMSC listens.
    #[arg(long, env = "OTP_SIM_SMPP", default_value = "127.0.0.1:2775")]
    smpp: SocketAddr,
    /// The Twilio account SID the REST API accepts.
    #[arg(
        long,
        env = "OTP_SIM_TWILIO_ACCOUNT_SID",
        default_value = "AC00000000000000000000000000000000"
    )]
    twilio_account_sid: String,
    /// Its auth token (Basic auth password; signs the status callbacks).
    #[arg(
        long,
        env = "OTP_SIM_TWILIO_AUTH_TOKEN",
        default_value = "sim-auth-token"
    )]
    twilio_auth_token: String,
    /// The SMSC's system_id.
    #[arg(long, env = "OTP_SIM_SMPP_SYSTEM_ID", default_value = "otp")]
    smpp_system_id: String,
    /// The SMSC's password.
    #[arg(long, env = "OTP_SIM_SMPP_PASSWORD", default_value = "secret")]
    smpp_password: String,
    /// The APNs team id the provider tokens must carry (iss).
    #[arg(long, env = "OTP_SIM_APNS_TEAM_ID", default_value = "SIMTEAM001")]
    apns_team_id: String,
    /// The APNs key id (kid).
    #[arg(long, env = "OTP_SIM_APNS_KEY_ID", default_value = "SIMKEY0001")]
    apns_key_id: String,
    /// The team's .p8 key (PKCS#8 PEM, P-256) the gateway signs with; without it APNs refuses
    /// every push (InvalidProviderToken).
    #[arg(long, env = "OTP_SIM_APNS_KEY_FILE")]
    apns_key_file: Option<PathBuf>,
    /// The FCM service account's JSON key file the gateway uses (its token_uri must point at
    /// this simulator's /token); without it every OAuth grant is refused.
    #[arg(long, env = "OTP_SIM_FCM_SERVICE_ACCOUNT")]
    fcm_service_account: Option<PathBuf>,
    /// Share of requests (0 to 1) every simulator answers with its "unavailable" error.
    #[arg(long, env = "OTP_SIM_ERROR_RATE", default_value_t = 0.0)]
    error_rate: f64,
    /// Median answer time in milliseconds.
    #[arg(long, env = "OTP_SIM_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
    /// 99th percentile answer time in milliseconds (log-normal).
    #[arg(long, env = "OTP_SIM_LATENCY_P99_MS", default_value_t = 0)]
    latency_p99_ms: u64,
    /// A device token APNs and FCM say is no longer registered (repeat, or comma-separated).
    #[arg(long, env = "OTP_SIM_DEAD_TOKENS", value_delimiter = ',')]
    dead_token: Vec<String>,
    /// A number (E.164) whose user replied STOP (repeat, or comma-separated).
    #[arg(long, env = "OTP_SIM_OPTED_OUT", value_delimiter = ',')]
    opted_out: Vec<String>,
    /// A number (E.164) whose carrier filters messages (repeat, or comma-separated).
    #[arg(long, env = "OTP_SIM_FILTERED", value_delimiter = ',')]
    filtered: Vec<String>,
    /// Send no delivery receipts or status callbacks.
    #[arg(long, env = "OTP_SIM_NO_RECEIPTS")]
    no_receipts: bool,
    /// Milliseconds between accepting a message and its receipt.
    #[arg(long, env = "OTP_SIM_RECEIPT_DELAY_MS", default_value_t = 200)]
    receipt_delay_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .init();
    let faults = Faults {
        error_rate: args.error_rate,
        latency_ms: args.latency_ms,
        latency_p99_ms: args.latency_p99_ms,
        dead_tokens: args.dead_token.into_iter().collect(),
        opted_out: args.opted_out.into_iter().collect(),
        filtered: args.filtered.into_iter().collect(),
        receipts: !args.no_receipts,
        receipt_delay_ms: args.receipt_delay_ms,
    };
    let sim = Sim::start(SimSettings {
        http: args.http,
        smpp: args.smpp,
        faults,
        twilio: twilio::Account {
            sid: args.twilio_account_sid,
            auth_token: args.twilio_auth_token,
        },
        smpp_bind: smpp::Bind {
            system_id: args.smpp_system_id,
            password: args.smpp_password,
        },
        apns: args.apns_key_file.map(|key_file| apns::Team {
            team_id: args.apns_team_id,
            key_id: args.apns_key_id,
            key_file,
        }),
        fcm_service_account: args.fcm_service_account,
    })
    .await?;
    // On stdout, for whoever started it with port 0.
    println!("otp-sim: http {} smpp {}", sim.http, sim.smpp);
    tracing::info!(http = %sim.http, smpp = %sim.smpp, "simulators listening");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("stopping");
    drop(sim);
    Ok(())
}
