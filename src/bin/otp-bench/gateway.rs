//! The gateway under test, as its own process: `otp-bench --serve CONFIG` runs the same
//! `Application` as `otp-gateway serve`, on a configuration written for the run (its own
//! topology names, a fresh SQLite ledger, the sandbox or the local provider).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lapin::Channel;
use otp_gateway::config::{AmqpConfig, Config};
use tokio_util::sync::CancellationToken;

/// The service side: the gateway exactly as `otp-gateway serve` runs it, until SIGTERM.
pub async fn serve(config: &Path) -> anyhow::Result<()> {
    let config = Config::load(Some(config))?;
    otp_gateway::telemetry::init(config.log.format, &config.log.level);
    let app = otp_gateway::app::Application::build(config).await?;
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        term.recv().await;
        on_signal.cancel();
    });
    app.run_until_stopped(stop).await
}

/// The SMPP bind's window in the smpp part (submit_sm awaiting their response at once).
pub const SMPP_WINDOW: u32 = 256;
/// The SMPP bind's throughput cap in the smpp part (submits per second): far above what one
/// process reaches, so that nothing but the bind itself limits it.
pub const SMPP_THROUGHPUT: f64 = 1_000_000.0;

/// Which provider carries the SMS jobs.
pub enum SmsProvider {
    /// The built-in sandbox (0 ms, appends to an outbox file).
    Sandbox,
    /// The local provider server at this address, through the generic `http` adapter.
    Http(std::net::SocketAddr),
    /// The local SMSC at this address, through one SMPP bind (window 256, no throughput cap to
    /// speak of, enquire_link at its default).
    Smpp(std::net::SocketAddr),
}

/// One gateway run's settings.
pub struct GatewaySetup<'a> {
    pub amqp_url: &'a str,
    pub amqp: &'a AmqpConfig,
    pub prefetch: u16,
    pub max_in_flight: usize,
    pub provider: SmsProvider,
    pub provider_timeout: Duration,
    /// The local provider's `max_concurrent_calls` (`None`: the default).
    pub max_concurrent_calls: Option<usize>,
    /// The gRPC port (0: any).
    pub grpc_port: u16,
    /// The ledger's URL (`None`: a fresh SQLite file of the process's own).
    pub store: Option<String>,
    /// The CPUs the process is pinned to with `taskset -c` (`None`: not pinned).
    pub cpus: Option<String>,
}

/// The gateway's process: killed, and its directory removed, when dropped.
pub struct GatewayProcess {
    child: Option<std::process::Child>,
    pid: u32,
    dir: PathBuf,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl GatewayProcess {
    /// Writes the configuration and starts the gateway.
    pub fn start(setup: &GatewaySetup<'_>, id: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("otp-bench-{id}"));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("gateway.toml");
        std::fs::write(&config, config_toml(setup, &dir))?;
        let mut command = match (&setup.cpus, std::env::var("OTP_BENCH_WRAP")) {
            (Some(cpus), _) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus]).arg(std::env::current_exe()?);
                c
            }
            (None, Ok(wrap)) => {
                let mut c = Command::new(wrap);
                c.arg(std::env::current_exe()?);
                c
            }
            (None, Err(_)) => Command::new(std::env::current_exe()?),
        };
        let child = command
            .arg("--serve")
            .arg(&config)
            .stdin(Stdio::null())
            .spawn()?;
        Ok(GatewayProcess {
            pid: child.id(),
            child: Some(child),
            dir,
        })
    }

    /// Waits until the gateway's consumer is attached to `queue`; that instant is returned.
    pub async fn consuming(&mut self, channel: &Channel, queue: &str) -> anyhow::Result<Instant> {
        loop {
            if crate::broker::queue_state(channel, queue)
                .await?
                .consumer_count()
                > 0
            {
                return Ok(Instant::now());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .map(|c| c.try_wait())
                .transpose()?
                .flatten()
            {
                anyhow::bail!("the gateway exited before consuming: {status}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Peak resident set so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        proc_status_kib(self.pid, "VmHWM:")
    }

    /// CPU time it has used so far (user and system, every thread).
    pub fn cpu_time(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // The fields after the command name (which is in parentheses and may hold spaces):
        // utime and stime are the 14th and 15th fields of the line, in clock ticks.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // Linux reports them in USER_HZ, 100 per second on every architecture it exports.
        Some(Duration::from_millis(ticks * 10))
    }

    /// Resident set now (VmRSS), in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        proc_status_kib(self.pid, "VmRSS:")
    }

    /// Stops it with SIGTERM, as an operator would, and waits for it.
    pub async fn stop(mut self) {
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
        if let Some(mut child) = self.child.take() {
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
    }
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A TOML string value.
fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("strings serialize")
}

/// The gateway's configuration for one run (on top of the embedded defaults).
fn config_toml(setup: &GatewaySetup<'_>, dir: &Path) -> String {
    let amqp = setup.amqp;
    let (route, provider) = match setup.provider {
        SmsProvider::Sandbox => ("sandbox", String::new()),
        SmsProvider::Http(addr) => (
            "bench",
            format!(
                "[providers.bench]\nkind = \"http\"\nurl = {}\nbody = {}\nmessage_id_field = \"/id\"\n{}",
                quoted(&format!("http://{addr}/send")),
                quoted(r#"{"to": "{{to}}", "text": "{{text}}", "delivery_id": "{{delivery_id}}"}"#),
                setup
                    .max_concurrent_calls
                    .map_or(String::new(), |calls| format!(
                        "max_concurrent_calls = {calls}\n"
                    )),
            ),
        ),
        SmsProvider::Smpp(addr) => (
            "bench",
            format!(
                "[providers.bench]\nkind = \"smpp\"\naddress = {}\nsystem_id = {}\npassword = {}\nsource_addr = \"OTP\"\nwindow = {SMPP_WINDOW}\nthroughput = {SMPP_THROUGHPUT:.1}\n",
                quoted(&addr.to_string()),
                quoted(crate::smsc::SYSTEM_ID),
                quoted(crate::smsc::PASSWORD),
            ),
        ),
    };
    format!(
        r#"[grpc]
listen = "127.0.0.1:{grpc_port}"

[amqp]
url = {url}
prefetch = {prefetch}
jobs_exchange = {jobs_exchange}
jobs_queue = {jobs_queue}
dead_letter_exchange = {dead_letter_exchange}
dead_letter_queue = {dead_letter_queue}
events_exchange = {events_exchange}

[store]
url = {store}
# Replicas share it (required with PostgreSQL).
hash_key = "otp-bench-block-list-hash-key-0123456789"

[delivery]
max_in_flight = {max_in_flight}
provider_timeout = "{timeout_ms}ms"

[routes]
sms = ["{route}"]

[providers.sandbox]
kind = "sandbox"
outbox = {outbox}

{provider}
[receipts]
listen = "127.0.0.1:0"

[ops]
listen = "127.0.0.1:0"

[log]
level = "warn"
"#,
        grpc_port = setup.grpc_port,
        url = quoted(setup.amqp_url),
        prefetch = setup.prefetch,
        jobs_exchange = quoted(&amqp.jobs_exchange),
        jobs_queue = quoted(&amqp.jobs_queue),
        dead_letter_exchange = quoted(&amqp.dead_letter_exchange),
        dead_letter_queue = quoted(&amqp.dead_letter_queue),
        events_exchange = quoted(&amqp.events_exchange),
        store = quoted(
            &setup
                .store
                .clone()
                .unwrap_or_else(|| format!("sqlite://{}/ledger.db", dir.display()))
        ),
        max_in_flight = setup.max_in_flight,
        timeout_ms = setup.provider_timeout.as_millis(),
        outbox = quoted(&dir.join("outbox.jsonl").display().to_string()),
    )
}
