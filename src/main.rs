//! The `otp-gateway` command: `serve` runs the gateway; `send` and `status` are gRPC clients
//! for trying it out. Exits 64 on a bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use jiff::{SignedDuration, Timestamp};
use otp_gateway::app::Application;
use otp_gateway::config::{Config, LogFormat};
use otp_gateway::proto::v1::code_delivery_client::CodeDeliveryClient;
use otp_gateway::proto::v1::{self, DeliveryReport};
use otp_gateway::proto::{is_terminal, reason_from_proto, status_from_proto, timestamp_to_proto};
use tokio_util::sync::CancellationToken;

/// EX_USAGE: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;
/// EX_UNAVAILABLE: the gateway could not be reached.
const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Parser)]
#[command(
    name = "otp-gateway",
    version,
    about = "Delivers one-time codes by push, SMS and voice, and explains every failure"
)]
struct Cli {
    /// A TOML file layered over the embedded defaults (then OTP_GATEWAY_* variables).
    #[arg(long, short, global = true, env = "OTP_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Log as JSON lines instead of readable text.
    #[arg(long, global = true)]
    log_json: bool,
    /// The gateway's gRPC address for the client commands, before or after the verb
    /// (default: grpc.listen of the configuration).
    #[arg(long, global = true, env = "OTP_GATEWAY_SERVER")]
    server: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Exit 0 if the gateway reports SERVING on gRPC health (for container health checks).
    Health,
    /// Print the report of a delivery.
    Status {
        /// The delivery id, "<tenant>/<job_id>".
        id: String,
    },
}

#[derive(Subcommand)]
enum BlockCommand {
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
enum QuietCommand {
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
enum LimitsCommand {
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
struct BlockTarget {
    /// An E.164 number.
    #[arg(long)]
    number: Option<String>,
    /// A number prefix, e.g. +882.
    #[arg(long)]
    prefix: Option<String>,
    /// A push token.
    #[arg(long)]
    token: Option<String>,
    /// An account.
    #[arg(long)]
    account: Option<String>,
}

#[derive(clap::Args)]
struct SendArgs {
    /// A trusted phone number (E.164); repeat for several.
    #[arg(long = "to")]
    numbers: Vec<String>,
    /// A trusted device as PLATFORM:TOKEN or PLATFORM:TOKEN@TOPIC (apns or fcm; the topic is
    /// the APNs bundle id or the FCM project); repeat for several.
    #[arg(long = "device")]
    devices: Vec<String>,
    /// The code to send (default: six random digits).
    #[arg(long)]
    code: Option<String>,
    /// How long the code stays valid.
    #[arg(long, default_value = "5m")]
    ttl: SignedDuration,
    /// Escalation order, e.g. "sms,voice" (default: push, sms, voice).
    #[arg(long, value_delimiter = ',')]
    channels: Vec<String>,
    #[arg(long, default_value = "demo")]
    tenant: String,
    #[arg(long, default_value = "demo-user")]
    account: String,
    /// The job id (default: a new UUID).
    #[arg(long)]
    job_id: Option<String>,
    /// Follow the delivery and print the final report; exit 1 if it failed.
    #[arg(long)]
    wait: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The client commands need the configuration only to find the gateway when no --server is
    // given: a server configuration they cannot load never stops them otherwise.
    let needs_config = matches!(cli.command, Command::Serve) || cli.server.is_none();
    let config = if needs_config {
        match Config::load(cli.config.as_deref()) {
            Ok(config) => Some(config),
            Err(error) => {
                eprintln!("otp-gateway: {error}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    } else {
        None
    };
    let server = server_address(cli.server.as_deref(), config.as_ref());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve => {
                let config = config.expect("loaded for serve");
                let format = if cli.log_json {
                    LogFormat::Json
                } else {
                    config.log.format
                };
                otp_gateway::telemetry::init(format, &config.log.level);
                serve(config).await
            }
            Command::Send(args) => send(args, server).await,
            Command::Block { command } => block(command, server).await,
            Command::Explain { file, at } => explain(&file, at, server).await,
            Command::Quiet { command } => quiet(command, server).await,
            Command::Limits { command } => limits(command, server).await,
            Command::Health => health(server).await,
            Command::Status { id } => status(&id, server).await,
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

/// An error and its causes, each said once: libraries often repeat their cause in their own
/// message (sqlx: "error communicating with database: <the io error>"), which the chain
/// would print again.
fn describe_error(error: &anyhow::Error) -> String {
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
fn describe_status(status: &tonic::Status) -> String {
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

async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    let app = match Application::build(config).await {
        Ok(app) => app,
        // A key file that cannot be read or does not hold a key is a configuration error.
        Err(error) if error.is::<otp_gateway::providers::ProviderBuildError>() => {
            eprintln!("otp-gateway: {}", describe_error(&error));
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
        Err(error) => return Err(error),
    };
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signal(stop.clone()));
    app.run_until_stopped(stop).await?;
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

fn server_address(explicit: Option<&str>, config: Option<&Config>) -> String {
    if let Some(server) = explicit {
        return if server.contains("://") {
            server.to_owned()
        } else {
            format!("http://{server}")
        };
    }
    let Some(config) = config else {
        return "http://127.0.0.1:50051".to_owned();
    };
    let mut addr = config.grpc.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}")
}

/// Says why the gateway refused a request and gives the exit code to end with.
fn refused(status: &tonic::Status, code: u8) -> ExitCode {
    eprintln!("otp-gateway: {}", status.message());
    ExitCode::from(code)
}

/// After a removal: "removed #id", or why the gateway refused it (exit 1).
fn removed<T>(id: i64, result: Result<T, tonic::Status>) -> ExitCode {
    match result {
        Ok(_) => {
            println!("removed #{id}");
            ExitCode::SUCCESS
        }
        Err(status) => refused(&status, 1),
    }
}

/// A channel to the gateway at `server`, or the exit code after saying why there is none.
async fn gateway(server: &str) -> Result<tonic::transport::Channel, ExitCode> {
    let endpoint = tonic::transport::Channel::from_shared(server.to_owned()).map_err(|error| {
        eprintln!("otp-gateway: `{server}` is not a gateway address: {error}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    endpoint.connect().await.map_err(|error| {
        eprintln!("otp-gateway: cannot reach the gateway at {server} (is `otp-gateway serve` running?): {error}");
        ExitCode::from(EXIT_UNAVAILABLE)
    })
}

fn random_code() -> String {
    format!("{:06}", uuid::Uuid::new_v4().as_u128() % 1_000_000)
}

fn channel_from_name(name: &str) -> anyhow::Result<v1::Channel> {
    v1::Channel::from_str_name(&format!("CHANNEL_{}", name.trim().to_ascii_uppercase()))
        .filter(|c| *c != v1::Channel::Unspecified)
        .with_context(|| format!("unknown channel `{name}` (push, sms or voice)"))
}

async fn send(args: SendArgs, server: String) -> anyhow::Result<ExitCode> {
    let mut targets = Vec::new();
    for (i, device) in args.devices.iter().enumerate() {
        let (platform, token) = device
            .split_once(':')
            .context("--device takes PLATFORM:TOKEN[@TOPIC], e.g. apns:a1b2c3@com.example.app")?;
        let (token, topic) = token.split_once('@').unwrap_or((token, ""));
        let platform =
            v1::Platform::from_str_name(&format!("PLATFORM_{}", platform.to_ascii_uppercase()))
                .filter(|p| *p != v1::Platform::Unspecified)
                .with_context(|| format!("unknown platform `{platform}` (apns or fcm)"))?;
        targets.push(v1::Target {
            kind: Some(v1::target::Kind::Device(v1::DeviceTarget {
                id: format!("device-{}", i + 1),
                platform: platform as i32,
                token: token.to_owned(),
                topic: topic.to_owned(),
                ..Default::default()
            })),
        });
    }
    for number in &args.numbers {
        targets.push(v1::Target {
            kind: Some(v1::target::Kind::Phone(v1::PhoneTarget {
                number: number.clone(),
            })),
        });
    }
    let channels = args
        .channels
        .iter()
        .map(|c| channel_from_name(c).map(|c| c as i32))
        .collect::<Result<_, _>>()?;
    let job = v1::SendCodeJob {
        job_id: args
            .job_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        tenant: args.tenant,
        account: args.account,
        code: args.code.unwrap_or_else(random_code),
        expires_at: Some(timestamp_to_proto(Timestamp::now() + args.ttl)),
        purpose: "sign_in".into(),
        locale: "en".into(),
        user_initiated: true,
        channels,
        targets,
        ..Default::default()
    };
    let mut client = match gateway(&server).await {
        Ok(channel) => CodeDeliveryClient::new(channel),
        Err(code) => return Ok(code),
    };
    let response = client
        .send_code(v1::SendCodeRequest { job: Some(job) })
        .await?
        .into_inner();
    println!(
        "{}  {}{}",
        response.delivery_id,
        status_name(response.status),
        if response.duplicate {
            "  (duplicate: nothing new sent)"
        } else {
            ""
        }
    );
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let mut stream = client
        .watch_delivery(v1::WatchDeliveryRequest {
            delivery_id: response.delivery_id,
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(report) = stream.message().await? {
        let terminal = is_terminal(&report);
        last = Some(report);
        if terminal {
            break;
        }
    }
    let report = last.context("the gateway closed the stream without a report")?;
    print_report(&report);
    Ok(exit_for(&report))
}

async fn status(id: &str, server: String) -> anyhow::Result<ExitCode> {
    let mut client = match gateway(&server).await {
        Ok(channel) => CodeDeliveryClient::new(channel),
        Err(code) => return Ok(code),
    };
    let report = client
        .get_delivery(v1::GetDeliveryRequest {
            delivery_id: id.to_owned(),
        })
        .await?
        .into_inner();
    print_report(&report);
    Ok(ExitCode::SUCCESS)
}

async fn block(command: BlockCommand, server: String) -> anyhow::Result<ExitCode> {
    use otp_gateway::proto::v1::policy_admin_client::PolicyAdminClient;
    let channel = match gateway(&server).await {
        Ok(channel) => channel,
        Err(code) => return Ok(code),
    };
    let mut client = PolicyAdminClient::new(channel);
    match command {
        BlockCommand::Add {
            what,
            tenant,
            note,
            ttl,
        } => {
            let (kind, pattern) = match what {
                BlockTarget {
                    number: Some(p), ..
                } => (v1::BlockKind::Number, p),
                BlockTarget {
                    prefix: Some(p), ..
                } => (v1::BlockKind::Prefix, p),
                BlockTarget { token: Some(p), .. } => (v1::BlockKind::DeviceToken, p),
                BlockTarget {
                    account: Some(p), ..
                } => (v1::BlockKind::Account, p),
                _ => anyhow::bail!("give one of --number, --prefix, --token, --account"),
            };
            let request = v1::AddBlockEntryRequest {
                tenant: tenant.unwrap_or_default(),
                kind: kind as i32,
                pattern,
                note,
                expires_at: ttl.map(|ttl| timestamp_to_proto(Timestamp::now() + ttl)),
                source: v1::BlockSource::Admin as i32,
            };
            let response = match client.add_block_entry(request).await {
                Ok(response) => response.into_inner(),
                Err(status) => return Ok(refused(&status, EXIT_CONFIG)),
            };
            let entry = response.entry.context("the gateway returned no entry")?;
            println!(
                "{}{}",
                block_line(&entry),
                if response.created {
                    ""
                } else {
                    "  (already there)"
                }
            );
        }
        BlockCommand::Rm { id } => {
            let result = client
                .remove_block_entry(v1::RemoveBlockEntryRequest { id })
                .await;
            return Ok(removed(id, result));
        }
        BlockCommand::Ls { tenant } => {
            let request = v1::ListBlockEntriesRequest {
                tenant: tenant.unwrap_or_default(),
            };
            for entry in client
                .list_block_entries(request)
                .await?
                .into_inner()
                .entries
            {
                println!("{}", block_line(&entry));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn explain(
    file: &std::path::Path,
    at: Option<Timestamp>,
    server: String,
) -> anyhow::Result<ExitCode> {
    let body = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let job = match otp_gateway::domain::Job::from_json(&body) {
        Ok(job) => job,
        Err(error) => {
            eprintln!(
                "otp-gateway: {} is not a valid job: {error}",
                file.display()
            );
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let mut client = match gateway(&server).await {
        Ok(channel) => CodeDeliveryClient::new(channel),
        Err(code) => return Ok(code),
    };
    let request = v1::ExplainRequest {
        job: Some(otp_gateway::proto::job_to_proto(&job)),
        at: at.map(timestamp_to_proto),
    };
    let plan = client.explain(request).await?.into_inner();
    let name = channel_name;
    let stages: Vec<String> = plan.stages.iter().map(|c| name(*c)).collect();
    println!("{}  stages: {}", plan.delivery_id, stages.join(" → "));
    if let Some(reason) = reason_from_proto(plan.blocked_reason) {
        println!("  nothing would be sent: {reason}: {}", plan.blocked_detail);
    }
    for target in &plan.targets {
        let verdict = match reason_from_proto(target.reason) {
            Some(reason) => reason.as_str().to_owned(),
            None if target.eligible => "eligible".to_owned(),
            None => "not tried".to_owned(),
        };
        println!(
            "  target {} {}: {verdict}: {}",
            target.index, target.target, target.decision
        );
        for channel in &target.channels {
            let providers: Vec<String> = channel
                .providers
                .iter()
                .map(|p| {
                    let circuit =
                        v1::CircuitState::try_from(p.circuit).map_or("?", |c| c.as_str_name());
                    format!(
                        "{} ({})",
                        p.name,
                        circuit
                            .trim_start_matches("CIRCUIT_STATE_")
                            .to_ascii_lowercase()
                    )
                })
                .collect();
            let refused = reason_from_proto(channel.refused_reason)
                .map(|r| format!("  refused: {r}: {}", channel.refused_detail))
                .unwrap_or_default();
            println!(
                "    {} via route {}: {}{refused}",
                name(channel.channel),
                channel.route,
                providers.join(", then ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn quiet(command: QuietCommand, server: String) -> anyhow::Result<ExitCode> {
    use otp_gateway::proto::v1::policy_admin_client::PolicyAdminClient;
    let mut client = match gateway(&server).await {
        Ok(channel) => PolicyAdminClient::new(channel),
        Err(code) => return Ok(code),
    };
    let line = |rule: &v1::QuietHours| {
        let action = v1::QuietAction::try_from(rule.action).map_or("?".into(), |a| {
            // As `--action` takes it: allow-user-initiated.
            a.as_str_name()
                .trim_start_matches("QUIET_ACTION_")
                .to_ascii_lowercase()
                .replace('_', "-")
        });
        let tenant = if rule.tenant.is_empty() {
            "*"
        } else {
            &rule.tenant
        };
        let account = if rule.account.is_empty() {
            String::new()
        } else {
            format!("/{}", rule.account)
        };
        let channels: Vec<String> = rule.channels.iter().map(|c| channel_name(*c)).collect();
        let channels = if channels.is_empty() {
            "all channels".to_owned()
        } else {
            channels.join(",")
        };
        let days = if rule.days.is_empty() {
            "every day".to_owned()
        } else {
            rule.days.join(",")
        };
        format!(
            "#{}  {tenant}{account}  {}–{} {}  {days}  {channels}  {action}",
            rule.id, rule.start, rule.end, rule.default_zone
        )
    };
    match command {
        QuietCommand::Set {
            from,
            to,
            action,
            zone,
            days,
            channels,
            tenant,
            account,
            id,
        } => {
            let action = v1::QuietAction::from_str_name(&format!(
                "QUIET_ACTION_{}",
                action.to_ascii_uppercase().replace('-', "_")
            ))
            .filter(|a| *a != v1::QuietAction::Unspecified)
            .with_context(|| {
                format!("--action takes defer, suppress or allow-user-initiated, not `{action}`")
            })?;
            let channels = channels
                .iter()
                .map(|c| channel_from_name(c).map(|c| c as i32))
                .collect::<Result<_, _>>()?;
            let rule = v1::QuietHours {
                id,
                tenant: tenant.unwrap_or_default(),
                account: account.unwrap_or_default(),
                channels,
                start: from,
                end: to,
                days,
                action: action as i32,
                default_zone: zone,
            };
            match client
                .set_quiet_hours(v1::SetQuietHoursRequest { rule: Some(rule) })
                .await
            {
                Ok(rule) => println!("{}", line(&rule.into_inner())),
                Err(status) => return Ok(refused(&status, EXIT_CONFIG)),
            }
        }
        QuietCommand::Rm { id } => {
            let result = client
                .remove_quiet_hours(v1::RemoveQuietHoursRequest { id })
                .await;
            return Ok(removed(id, result));
        }
        QuietCommand::Ls { tenant } => {
            let request = v1::ListQuietHoursRequest {
                tenant: tenant.unwrap_or_default(),
            };
            for rule in client.list_quiet_hours(request).await?.into_inner().rules {
                println!("{}", line(&rule));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn channel_name(value: i32) -> String {
    v1::Channel::try_from(value).map_or("?".into(), |c| {
        c.as_str_name()
            .trim_start_matches("CHANNEL_")
            .to_ascii_lowercase()
    })
}

async fn limits(command: LimitsCommand, server: String) -> anyhow::Result<ExitCode> {
    use otp_gateway::proto::v1::policy_admin_client::PolicyAdminClient;
    let channel = match gateway(&server).await {
        Ok(channel) => channel,
        Err(code) => return Ok(code),
    };
    let mut client = PolicyAdminClient::new(channel);
    let line = |rule: &v1::RateLimit| {
        let scope = v1::RateScope::try_from(rule.scope).map_or("?".into(), |s| {
            s.as_str_name()
                .trim_start_matches("RATE_SCOPE_")
                .to_ascii_lowercase()
        });
        let tenant = if rule.tenant.is_empty() {
            "*"
        } else {
            &rule.tenant
        };
        let window = rule.window.as_ref().map_or(0, |w| w.seconds);
        let window = SignedDuration::from_secs(window);
        let target = if rule.prefix.is_empty() {
            format!("per {scope}")
        } else {
            format!("to {}", rule.prefix)
        };
        format!(
            "#{}  {tenant}  {} per {window:#} {target}",
            rule.id, rule.limit
        )
    };
    match command {
        LimitsCommand::Set {
            per,
            prefix,
            limit,
            window,
            tenant,
        } => {
            let scope =
                v1::RateScope::from_str_name(&format!("RATE_SCOPE_{}", per.to_ascii_uppercase()))
                    .filter(|s| *s != v1::RateScope::Unspecified)
                    .with_context(|| {
                        format!("--per takes recipient, account, tenant or prefix, not `{per}`")
                    })?;
            let request = v1::SetRateLimitRequest {
                tenant: tenant.unwrap_or_default(),
                scope: scope as i32,
                prefix,
                limit,
                window: Some(otp_gateway::proto::duration_to_proto(window.unsigned_abs())),
            };
            match client.set_rate_limit(request).await {
                Ok(rule) => println!("{}", line(&rule.into_inner())),
                Err(status) => return Ok(refused(&status, EXIT_CONFIG)),
            }
        }
        LimitsCommand::Rm { id } => {
            let result = client
                .remove_rate_limit(v1::RemoveRateLimitRequest { id })
                .await;
            return Ok(removed(id, result));
        }
        LimitsCommand::Ls { tenant } => {
            let request = v1::ListRateLimitsRequest {
                tenant: tenant.unwrap_or_default(),
            };
            for rule in client.list_rate_limits(request).await?.into_inner().limits {
                println!("{}", line(&rule));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A duration that may be given in days ("30d" is 30 × 24 hours).
fn parse_ttl(text: &str) -> Result<SignedDuration, String> {
    let span: jiff::Span = text.parse().map_err(|e| format!("{e}"))?;
    span.to_duration(jiff::SpanRelativeTo::days_are_24_hours())
        .map_err(|e| format!("{e}"))
}

fn block_line(entry: &v1::BlockEntry) -> String {
    let name = |text: &str, prefix: &str| text.trim_start_matches(prefix).to_ascii_lowercase();
    let kind = v1::BlockKind::try_from(entry.kind)
        .map_or("?".into(), |k| name(k.as_str_name(), "BLOCK_KIND_"));
    let source = v1::BlockSource::try_from(entry.source)
        .map_or("?".into(), |s| name(s.as_str_name(), "BLOCK_SOURCE_"));
    let tenant = if entry.tenant.is_empty() {
        "*"
    } else {
        &entry.tenant
    };
    let until = entry
        .expires_at
        .as_ref()
        .and_then(otp_gateway::proto::timestamp_from_proto)
        .map(|t| format!("  until {t}"))
        .unwrap_or_default();
    let note = if entry.note.is_empty() {
        String::new()
    } else {
        format!("  {}", entry.note)
    };
    format!(
        "#{}  {tenant}  {kind} {}  {source}{until}{note}",
        entry.id, entry.pattern
    )
}

async fn health(server: String) -> anyhow::Result<ExitCode> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let channel = match gateway(&server).await {
        Ok(channel) => channel,
        Err(code) => return Ok(code),
    };
    let response = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    let status = ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown);
    println!("{}", status.as_str_name());
    Ok(if status == ServingStatus::Serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_UNAVAILABLE)
    })
}

fn exit_for(report: &DeliveryReport) -> ExitCode {
    match status_from_proto(report.status) {
        Some(otp_gateway::domain::DeliveryStatus::Failed) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

fn status_name(value: i32) -> &'static str {
    status_from_proto(value).map_or("UNKNOWN", |s| s.as_str())
}

fn print_report(report: &DeliveryReport) {
    let reason = reason_from_proto(report.reason)
        .map(|r| r.as_str())
        .unwrap_or("");
    println!(
        "{}  {}  {reason}",
        report.delivery_id,
        status_name(report.status)
    );
    if !report.hint.is_empty() {
        println!("  what to do: {}", report.hint);
    }
    if !report.summary.is_empty() {
        println!("  {}", report.summary);
    }
    for target in &report.targets {
        let status = v1::TargetStatus::try_from(target.status).map_or("?", |s| s.as_str_name());
        let reason = reason_from_proto(target.reason)
            .map(|r| format!(" {r}"))
            .unwrap_or_default();
        println!(
            "  target {} {}: {}{reason}",
            target.index,
            target.target,
            status.trim_start_matches("TARGET_STATUS_")
        );
        for attempt in &target.attempts {
            let outcome =
                v1::AttemptOutcome::try_from(attempt.outcome).map_or("?", |o| o.as_str_name());
            let code = if attempt.provider_code.is_empty() {
                String::new()
            } else {
                format!(" [{}]", attempt.provider_code)
            };
            let sms = match v1::SmsEncoding::try_from(attempt.sms_encoding) {
                Ok(v1::SmsEncoding::Unspecified) | Err(_) => String::new(),
                Ok(encoding) => format!(
                    ", {}, {} segment{}",
                    encoding.as_str_name(),
                    attempt.sms_segments,
                    if attempt.sms_segments == 1 { "" } else { "s" }
                ),
            };
            println!(
                "    via {} ({}{sms}): {}{code} {}",
                attempt.provider,
                v1::Channel::try_from(attempt.channel)
                    .map_or("?", |c| c.as_str_name())
                    .trim_start_matches("CHANNEL_")
                    .to_lowercase(),
                outcome.trim_start_matches("ATTEMPT_OUTCOME_"),
                attempt.provider_message,
            );
        }
    }
}
