//! The verbs and flags of the `otp-gateway` command.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use jiff::{SignedDuration, Timestamp};

#[derive(Parser)]
#[command(
    name = "otp-gateway",
    version,
    about = "Delivers one-time codes by push, SMS and voice, and explains every failure"
)]
/// The `otp-gateway` command line.
pub struct Cli {
    /// For `serve`: a TOML file layered over the embedded defaults (then OTP_GATEWAY_*
    /// variables).
    #[arg(long, short, global = true, env = "OTP_GATEWAY_CONFIG")]
    pub(super) config: Option<PathBuf>,
    /// Log as JSON lines instead of readable text.
    #[arg(long, global = true)]
    pub(super) log_json: bool,
    /// The gateway's gRPC address for the client commands, before or after the verb
    /// (default: 127.0.0.1:50051). They never read the server's configuration.
    #[arg(long, global = true, env = "OTP_GATEWAY_SERVER")]
    pub(super) server: Option<String>,
    /// The API key the client commands call with (`otpk_…`, from `keys create`, or the
    /// bootstrap admin key). Prefer the variable: a flag shows in the process list.
    #[arg(long, global = true, env = "OTP_GATEWAY_KEY", hide_env_values = true)]
    pub(super) key: Option<String>,
    /// The gateway's TLS: a PEM file of the CA certificates its certificate chains to (without:
    /// the system's roots, for an `https://` server). A `HOST:PORT` server is reached over TLS
    /// when this or --client-cert is given.
    #[arg(long, global = true, env = "OTP_GATEWAY_CA_FILE")]
    pub(super) ca_file: Option<PathBuf>,
    /// Mutual TLS: this client's certificate (PEM), with --client-key.
    #[arg(
        long,
        global = true,
        env = "OTP_GATEWAY_CLIENT_CERT",
        requires = "client_key"
    )]
    pub(super) client_cert: Option<PathBuf>,
    /// Mutual TLS: the private key of --client-cert (PEM).
    #[arg(
        long,
        global = true,
        env = "OTP_GATEWAY_CLIENT_KEY",
        requires = "client_cert"
    )]
    pub(super) client_key: Option<PathBuf>,
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Subcommand)]
pub(super) enum Command {
    /// Run the gateway: consume jobs from RabbitMQ and serve the gRPC API.
    Serve,
    /// Submit a job over gRPC and print its delivery id (and, with --wait, its report).
    Send(SendArgs),
    /// Manage block-list entries.
    Block {
        #[command(subcommand)]
        command: BlockCommand,
    },
    /// Dry run: what the gateway would do with a JSON job file (nothing is sent or counted).
    Explain {
        /// The job, as the JSON queue body.
        file: PathBuf,
        /// Plan for this instant (RFC 3339) instead of now.
        #[arg(long)]
        at: Option<Timestamp>,
    },
    /// Manage quiet-hours rules.
    Quiet {
        #[command(subcommand)]
        command: QuietCommand,
    },
    /// Manage rate limits.
    Limits {
        #[command(subcommand)]
        command: LimitsCommand,
    },
    /// Why an account's codes do not arrive: its numbers' and devices' recent outcomes, the
    /// block entries on them, and what to do (needs the read scope).
    Diagnose {
        /// The tenant (a tenant's own key may leave it out).
        #[arg(long, default_value = "")]
        tenant: String,
        #[arg(long)]
        account: String,
    },
    /// Delete an account's deliveries and account block entries for good (its opt-outs stay).
    EraseAccount {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        account: String,
    },
    /// Manage API keys (needs a key with the admin scope).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The fraud guard's quarantines: list, lift and pin number ranges (admin scope).
    Fraud {
        #[command(subcommand)]
        command: FraudCommand,
    },
    /// Exit 0 if the gateway reports SERVING on gRPC health (for container health checks).
    Health,
    /// Print the report of a delivery.
    Status {
        /// The delivery id, "<tenant>/<job_id>".
        id: String,
    },
    /// Report that the user entered a delivery's code (the conversion signal; needs the send
    /// or ack scope), or with --failed that they did not.
    Verify {
        /// The delivery id, "<tenant>/<job_id>".
        id: String,
        /// The user did not enter the code (wrong codes, gave up).
        #[arg(long)]
        failed: bool,
        /// When (RFC 3339; default: now).
        #[arg(long)]
        at: Option<Timestamp>,
    },
}

#[derive(Subcommand)]
pub(super) enum BlockCommand {
    /// Block a number, a prefix, a device token or an account.
    Add {
        #[command(flatten)]
        what: BlockTarget,
        /// Only for this tenant (default: every tenant).
        #[arg(long)]
        tenant: Option<String>,
        /// Why.
        #[arg(long, default_value = "")]
        note: String,
        /// Lift the block after this long, e.g. 30d or 12h (default: never).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<SignedDuration>,
    },
    /// Remove an entry by id.
    Rm {
        /// The entry id (from `block ls`).
        id: i64,
    },
    /// List entries (with --tenant: its own and the global ones).
    Ls {
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Subcommand)]
pub(super) enum KeysCommand {
    /// Make a key and print it (once: the gateway keeps only a hash of it).
    Create {
        /// The tenant it acts in (without: every tenant; admin and status scopes only).
        #[arg(long)]
        tenant: Option<String>,
        /// What it may call: send, read, ack, admin, status (comma-separated).
        #[arg(long)]
        scopes: String,
        /// What the key is for (shown by `keys ls`).
        #[arg(long, default_value = "")]
        label: String,
    },
    /// List keys (never their secrets); with --tenant, that tenant's.
    Ls {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key by id (from `keys ls`): it opens nothing from then on.
    Revoke {
        /// The key's id (the part after `otpk_`, before the next `_`).
        id: String,
    },
}

#[derive(Subcommand)]
pub(super) enum FraudCommand {
    /// List quarantines, newest first (held, expired and lifted; --held: only those holding).
    Ls {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        held: bool,
    },
    /// Lift the hold on a range (the guard leaves it alone for fraud.hold_for).
    Lift {
        tenant: String,
        /// The range as `fraud ls` shows it (e.g. +44770).
        range: String,
        /// Why (kept with the quarantine).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Hold a range until it is lifted, whatever the tenant's mode.
    Pin {
        tenant: String,
        /// + the country calling code and fraud.range_depth digits (e.g. +44770).
        range: String,
        #[arg(long, default_value = "")]
        note: String,
    },
}

#[derive(Subcommand)]
pub(super) enum QuietCommand {
    /// Add a quiet-hours rule (or replace one with --id).
    Set {
        /// Local start, HH:MM.
        #[arg(long)]
        from: String,
        /// Local end, HH:MM (before --from: the window crosses midnight).
        #[arg(long)]
        to: String,
        /// defer, suppress or allow-user-initiated.
        #[arg(long, default_value = "allow-user-initiated")]
        action: String,
        /// The zone used when the recipient's is unknown, e.g. Europe/Berlin.
        #[arg(long, default_value = "UTC")]
        zone: String,
        /// Days a window may start on, e.g. fri,sat (default: every day).
        #[arg(long, value_delimiter = ',')]
        days: Vec<String>,
        /// Channels covered, e.g. sms,voice (default: all).
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// Only for this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only for this account (with --tenant).
        #[arg(long)]
        account: Option<String>,
        /// Replace this rule instead of adding one.
        #[arg(long, default_value_t = 0)]
        id: i64,
    },
    /// Remove a rule by id.
    Rm {
        /// The rule id (from `quiet ls`).
        id: i64,
    },
    /// List rules (with --tenant: its own and the global ones).
    Ls {
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Subcommand)]
pub(super) enum LimitsCommand {
    /// Allow at most LIMIT sends per WINDOW per recipient, account, tenant or prefix.
    Set {
        /// recipient, account, tenant or prefix.
        #[arg(long)]
        per: String,
        /// For `--per prefix`: the prefix, e.g. +882.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Sends allowed per window.
        #[arg(long)]
        limit: u32,
        /// The window, e.g. 10m or 1h.
        #[arg(long, value_parser = parse_ttl)]
        window: SignedDuration,
        /// Only for this tenant (default: every tenant).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Remove a rate limit by id.
    Rm {
        /// The rule id (from `limits ls`).
        id: i64,
    },
    /// List rate limits (with --tenant: its own and the global ones).
    Ls {
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub(super) struct BlockTarget {
    /// An E.164 number.
    #[arg(long)]
    pub(super) number: Option<String>,
    /// A number prefix, e.g. +882.
    #[arg(long)]
    pub(super) prefix: Option<String>,
    /// A push token.
    #[arg(long)]
    pub(super) token: Option<String>,
    /// An account.
    #[arg(long)]
    pub(super) account: Option<String>,
}

#[derive(clap::Args)]
pub(super) struct SendArgs {
    /// A trusted phone number (E.164); repeat for several.
    #[arg(long = "to")]
    pub(super) numbers: Vec<String>,
    /// A trusted device as PLATFORM:TOKEN or PLATFORM:TOKEN@TOPIC (apns or fcm; the topic is
    /// the APNs bundle id or the FCM project); repeat for several.
    #[arg(long = "device")]
    pub(super) devices: Vec<String>,
    /// The code to send (default: six random digits).
    #[arg(long)]
    pub(super) code: Option<String>,
    /// How long the code stays valid.
    #[arg(long, default_value = "5m")]
    pub(super) ttl: SignedDuration,
    /// Escalation order, e.g. "sms,voice" (default: push, sms, voice).
    #[arg(long, value_delimiter = ',')]
    pub(super) channels: Vec<String>,
    #[arg(long, default_value = "demo")]
    pub(super) tenant: String,
    #[arg(long, default_value = "demo-user")]
    pub(super) account: String,
    /// The job id (default: a new UUID).
    #[arg(long)]
    pub(super) job_id: Option<String>,
    /// Follow the delivery and print the final report; exit 1 if it failed.
    #[arg(long)]
    pub(super) wait: bool,
}

/// A duration that may be given in days ("30d" is 30 × 24 hours).
fn parse_ttl(text: &str) -> Result<SignedDuration, String> {
    let span: jiff::Span = text.parse().map_err(|e| format!("{e}"))?;
    span.to_duration(jiff::SpanRelativeTo::days_are_24_hours())
        .map_err(|e| format!("{e}"))
}
