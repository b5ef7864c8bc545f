//! The receipts listener under abuse, spoken to over raw TCP as an attacker would: an
//! oversized body is 413 (declared or streamed), a body that trickles in is 408, headers that
//! never end are 408 too, a flooding source gets 429; the listener answers throughout.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// The status code of the answer on `stream` (0 when the connection closed without one).
async fn status(stream: &mut TcpStream) -> u16 {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return 0,
            Ok(Ok(n)) => answer.extend_from_slice(&buffer[..n]),
            Err(_) => panic!("no answer within 10 s"),
        }
    }
    let line = String::from_utf8_lossy(&answer);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

async fn post(address: &str, head_extra: &str, body: &[u8]) -> u16 {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /receipts/twilio/twilio HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/x-www-form-urlencoded\r\n{head_extra}\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let _ = stream.write_all(body).await;
    status(&mut stream).await
}

#[tokio::test]
async fn the_receipts_listener_bounds_bodies_time_and_sources() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("receipts-limits");
    let broker = Broker::connect(&names).await;
    let overrides = [
        ("receipts.max_body", json!(1024)),
        ("receipts.read_timeout", json!("1s")),
        ("receipts.rate_per_source", json!(5)),
    ];
    let gateway = Gateway::start(config(&names, dir.path(), &overrides)).await;
    let address = gateway.receipts_addr.to_string();

    // Too large, declared.
    let body = vec![b'a'; 2000];
    let declared = post(
        &address,
        &format!("Content-Length: {}\r\n", body.len()),
        &body,
    )
    .await;
    assert_eq!(declared, 413);

    // Too large, streamed in chunks without a length.
    let mut chunked = Vec::new();
    for _ in 0..3 {
        chunked.extend_from_slice(format!("{:x}\r\n", 600).as_bytes());
        chunked.extend_from_slice(&[b'a'; 600]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(
        post(&address, "Transfer-Encoding: chunked\r\n", &chunked).await,
        413
    );

    // A body that trickles in and stops: 408 after the read timeout.
    let started = Instant::now();
    assert_eq!(
        post(&address, "Content-Length: 100\r\n", b"From=%2B1").await,
        408
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // Headers that never end: 408, and the connection is closed.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut slow = TcpStream::connect(&address).await.unwrap();
    slow.write_all(b"POST /receipts/twilio/twilio HTTP/1.1\r\nHost: gat")
        .await
        .unwrap();
    let started = Instant::now();
    let answer = status(&mut slow).await;
    assert_eq!(answer, 408);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(2), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection is closed after the 408");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A flood from one source: 429 past the rate; the listener answers again a second later.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut answers = Vec::new();
    for _ in 0..7 {
        answers.push(post(&address, "Content-Length: 0\r\n", b"").await);
    }
    assert!(answers[..5].iter().all(|s| *s != 429), "{answers:?}");
    assert_eq!(answers[5..], [429, 429], "{answers:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // No Twilio provider is configured: a well-formed callback is "not found", not refused.
    assert_eq!(post(&address, "Content-Length: 0\r\n", b"").await, 404);

    gateway.stop().await;
    broker.cleanup().await;
}
