//! The receipts listener's defences: it is often reachable from the internet (providers call
//! it), so every request is bounded. A source address sending more than
//! `receipts.rate_per_source` requests in a second gets 429; a body longer than
//! `receipts.max_body` gets 413; a body not received within `receipts.read_timeout` gets 408
//! (as does a request head, see `head`). Nothing a caller sends can hold the listener or the
//! gateway up.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Sources tracked at most (beyond, the counts start again).
const TRACKED_SOURCES: usize = 10_000;

/// The peer address of a request (put in by the listener).
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer(pub(super) SocketAddr);

/// The limits, and what each source sent in the current second.
#[derive(Debug)]
pub(super) struct Guard {
    max_body: usize,
    read_timeout: Duration,
    rate_per_source: u32,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Guard {
    pub(super) fn new(max_body: usize, read_timeout: Duration, rate_per_source: u32) -> Self {
        Guard {
            max_body,
            read_timeout,
            rate_per_source,
            seen: Mutex::default(),
        }
    }

    /// Whether `source` may send one more request this second (0: no limit), and whether this
    /// is its first refusal in the second (the one worth a log line).
    fn admit(&self, source: IpAddr) -> (bool, bool) {
        if self.rate_per_source == 0 {
            return (true, false);
        }
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= TRACKED_SOURCES && !seen.contains_key(&source) {
            seen.retain(|_, (since, _)| now.duration_since(*since) < Duration::from_secs(1));
            if seen.len() >= TRACKED_SOURCES {
                seen.clear();
            }
        }
        let (since, count) = seen.entry(source).or_insert((now, 0));
        if now.duration_since(*since) >= Duration::from_secs(1) {
            (*since, *count) = (now, 0);
        }
        *count += 1;
        (
            *count <= self.rate_per_source,
            *count == self.rate_per_source + 1,
        )
    }
}

/// Admits a request within the limits, with its whole body read, or answers 429, 413 or 408.
pub(super) async fn guard(
    State(guard): State<Arc<Guard>>,
    request: Request,
    next: Next,
) -> Response {
    let peer = request.extensions().get::<Peer>().map(|p| p.0);
    if let Some(peer) = peer {
        let (admitted, first_refusal) = guard.admit(peer.ip());
        if first_refusal {
            tracing::warn!(%peer, "receipts: too many requests from one source: answering 429 for the rest of this second");
        }
        if !admitted {
            return (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "1")]).into_response();
        }
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > guard.max_body as u64) {
        return too_large(peer);
    }
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(
        guard.read_timeout,
        axum::body::to_bytes(body, guard.max_body),
    )
    .await
    {
        Err(_) => {
            tracing::warn!(?peer, "receipts: body not received in time: answered 408");
            StatusCode::REQUEST_TIMEOUT.into_response()
        }
        Ok(Err(error)) if error.to_string().contains("length limit") => too_large(peer),
        Ok(Err(error)) => {
            tracing::debug!(?peer, %error, "receipts: the body could not be read");
            StatusCode::BAD_REQUEST.into_response()
        }
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
    }
}

fn too_large(peer: Option<SocketAddr>) -> Response {
    tracing::warn!(?peer, "receipts: body over receipts.max_body: answered 413");
    StatusCode::PAYLOAD_TOO_LARGE.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_rate_per_second_and_others_theirs() {
        let guard = Guard::new(1024, Duration::from_secs(1), 3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!((0..3).all(|_| guard.admit(a).0));
        // The first refusal is the one logged; the next ones are not.
        assert_eq!(guard.admit(a), (false, true));
        assert_eq!(guard.admit(a), (false, false));
        assert!(guard.admit(b).0);
        let unlimited = Guard::new(1024, Duration::from_secs(1), 0);
        assert!((0..1000).all(|_| unlimited.admit(a).0));
    }
}
