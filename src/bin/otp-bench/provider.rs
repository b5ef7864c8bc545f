//! The local provider the gateway calls in the realistic, latency and in-flight runs: a JSON
//! endpoint for the gateway's generic `http` provider, answering in a chosen shape and counting
//! what it saw (arrivals per job, time busy, requests at once).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use otp_gateway::sim::log_normal;
use tokio_util::sync::CancellationToken;

/// How the provider answers.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// At once, 200 (the latency runs: the provider adds nothing).
    Instant,
    /// A log-normal latency with this median and 99th percentile; `error_share` of the requests
    /// answer 503 after it, `hang_share` never answer before `timeout` (the gateway's own).
    Realistic {
        median: Duration,
        p99: Duration,
        error_share: f64,
        hang_share: f64,
        timeout: Duration,
    },
    /// Every request is held this long (the in-flight probe).
    Hold(Duration),
}

impl Behaviour {
    /// How long to take and whether to fail, for one request.
    fn draw(&self) -> (Duration, StatusCode) {
        match *self {
            Behaviour::Instant => (Duration::ZERO, StatusCode::OK),
            Behaviour::Hold(hold) => (hold, StatusCode::OK),
            Behaviour::Realistic {
                median,
                p99,
                error_share,
                hang_share,
                timeout,
            } => {
                let roll = fastrand::f64();
                if roll < hang_share {
                    // Answered only after the gateway gave up on it.
                    return (timeout + Duration::from_millis(50), StatusCode::OK);
                }
                let latency = log_normal(median, p99);
                let status = if roll < hang_share + error_share {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                (latency, status)
            }
        }
    }
}

/// What the provider saw.
#[derive(Debug)]
pub struct ProviderStats {
    started: Instant,
    requests: AtomicU64,
    failed: AtomicU64,
    hung: AtomicU64,
    /// Microseconds spent answering (as the gateway waited for it: a hang counts until the
    /// gateway's timeout).
    busy_us: AtomicU64,
    in_flight: AtomicUsize,
    /// (job index, microseconds since `started`) of each first call, when recording.
    arrivals: Mutex<Vec<(usize, u64)>>,
    record: bool,
}

impl ProviderStats {
    /// Requests answered or still open.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// 5xx answers given.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Requests held until the gateway's timeout.
    pub fn hung(&self) -> u64 {
        self.hung.load(Ordering::Relaxed)
    }

    /// Total time spent on requests.
    pub fn busy(&self) -> Duration {
        Duration::from_micros(self.busy_us.load(Ordering::Relaxed))
    }

    /// Requests open right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// When each job's first call arrived, by job index.
    pub fn arrivals(&self) -> Vec<(usize, Instant)> {
        let arrivals = self.arrivals.lock().unwrap_or_else(|p| p.into_inner());
        arrivals
            .iter()
            .map(|&(job, us)| (job, self.started + Duration::from_micros(us)))
            .collect()
    }
}

/// A running provider.
pub struct ProviderServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub stats: Arc<ProviderStats>,
    stop: CancellationToken,
}

impl Drop for ProviderServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Clone)]
struct Shared {
    behaviour: Behaviour,
    stats: Arc<ProviderStats>,
    timeout: Duration,
}

/// Starts a provider answering with `behaviour`; `record` keeps each job's arrival time.
pub async fn start(behaviour: Behaviour, record: bool) -> anyhow::Result<ProviderServer> {
    let timeout = match behaviour {
        Behaviour::Realistic { timeout, .. } => timeout,
        _ => Duration::MAX,
    };
    let stats = Arc::new(ProviderStats {
        started: Instant::now(),
        requests: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        hung: AtomicU64::new(0),
        busy_us: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        arrivals: Mutex::new(Vec::new()),
        record,
    });
    let app = axum::Router::new()
        .route("/send", post(send))
        .with_state(Shared {
            behaviour,
            stats: Arc::clone(&stats),
            timeout,
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stopped.cancelled_owned())
            .await;
    });
    Ok(ProviderServer { addr, stats, stop })
}

/// The job index at the end of a delivery id (`bench/<label>-<index>`).
pub fn job_index(delivery_or_job_id: &str) -> Option<usize> {
    delivery_or_job_id.rsplit('-').next()?.parse().ok()
}

/// Counts a request as open until dropped (answered, or abandoned by the gateway).
struct Open<'a> {
    stats: &'a ProviderStats,
    since: Instant,
    cap: Duration,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        let busy = self.since.elapsed().min(self.cap);
        self.stats
            .busy_us
            .fetch_add(busy.as_micros() as u64, Ordering::Relaxed);
    }
}

async fn send(
    State(shared): State<Shared>,
    Json(body): Json<serde_json::Value>,
) -> (StatusCode, Json<serde_json::Value>) {
    let stats = &*shared.stats;
    let arrived = Instant::now();
    let number = stats.requests.fetch_add(1, Ordering::Relaxed);
    stats.in_flight.fetch_add(1, Ordering::Relaxed);
    let _open = Open {
        stats,
        since: arrived,
        cap: shared.timeout,
    };
    if stats.record
        && let Some(job) = body
            .get("delivery_id")
            .and_then(|id| id.as_str())
            .and_then(job_index)
    {
        let at = arrived.duration_since(stats.started).as_micros() as u64;
        stats
            .arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((job, at));
    }
    let (latency, status) = shared.behaviour.draw();
    if latency >= shared.timeout {
        stats.hung.fetch_add(1, Ordering::Relaxed);
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if status != StatusCode::OK {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        return (
            status,
            Json(serde_json::json!({"error": {"code": "busy", "message": "try again later"}})),
        );
    }
    (
        status,
        Json(serde_json::json!({"id": format!("bench-{number}")})),
    )
}
