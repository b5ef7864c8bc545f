//! Grpc: SendCode at a fixed rate.

use std::time::{Duration, Instant};

use otp_gateway::proto::v1;
use otp_gateway::queue::Topology;

use crate::broker::{progress, remove, topology};
use crate::gateway::{GatewayProcess, SmsProvider};
use crate::{Bench, mib, ms, quantile};

pub(crate) async fn grpc(bench: &Bench) -> anyhow::Result<()> {
    let amqp = topology(&bench.prefix("grpc", 1));
    let topology = Topology::from(&amqp);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut setup = bench.setup(&amqp, SmsProvider::Sandbox);
    setup.grpc_port = port;
    topology.declare(&bench.channel).await?;
    let mut gateway = GatewayProcess::start(&setup, &format!("{}-grpc", bench.run))?;
    gateway
        .consuming(&bench.channel, &topology.jobs_queue)
        .await?;
    let client = loop {
        match v1::code_delivery_client::CodeDeliveryClient::connect(format!(
            "http://127.0.0.1:{port}"
        ))
        .await
        {
            Ok(client) => break client,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let count = (bench.args.grpc_rate * bench.args.grpc_secs) as usize;
    let interval = Duration::from_secs(1) / bench.args.grpc_rate;
    let start = Instant::now() + Duration::from_millis(100);
    let mut calls = Vec::with_capacity(count);
    for n in 0..count {
        let due = start + interval * n as u32;
        tokio::time::sleep_until(due.into()).await;
        let mut client = client.clone();
        let job = grpc_job(n);
        calls.push(tokio::spawn(async move {
            let sent = client
                .send_code(v1::SendCodeRequest { job: Some(job) })
                .await;
            (sent.is_ok(), due.elapsed())
        }));
        if (n + 1) % 500 == 0 {
            progress("grpc: SendCode", n + 1, count, start);
        }
    }
    let mut latencies = Vec::with_capacity(count);
    let mut failed = 0;
    let warm_up = bench.args.grpc_rate as usize;
    for (n, call) in calls.into_iter().enumerate() {
        let (ok, latency) = call.await?;
        if !ok {
            failed += 1;
        } else if n >= warm_up {
            latencies.push(latency);
        }
    }
    eprintln!();
    let peak = gateway.peak_rss_kib();
    gateway.stop().await;
    remove(&bench.channel, &topology, &[]).await;
    println!(
        "\n## gRPC SendCode (open loop, {} calls/s for {} s, first second left out; accepted = ledger commit + confirmed publish)\n",
        bench.args.grpc_rate, bench.args.grpc_secs
    );
    println!("| calls | failed | p50 | p99 | gateway peak RSS |");
    println!("|---|---|---|---|---|");
    let (p50, p99) = (
        quantile(&mut latencies, 0.5),
        quantile(&mut latencies, 0.99),
    );
    println!(
        "| {count} | {failed} | {} | {} | {} |",
        ms(p50),
        ms(p99),
        mib(peak)
    );
    Ok(())
}

pub(crate) fn grpc_job(n: usize) -> v1::SendCodeJob {
    v1::SendCodeJob {
        job_id: format!("grpc-{n:07}"),
        tenant: "bench".into(),
        account: format!("user-{n}"),
        code: "482913".into(),
        expires_at: Some(otp_gateway::proto::timestamp_to_proto(
            jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1),
        )),
        purpose: "sign_in".into(),
        targets: vec![v1::Target {
            kind: Some(v1::target::Kind::Phone(v1::PhoneTarget {
                number: format!("+1415555{:04}", n % 10_000),
            })),
        }],
        ..Default::default()
    }
}
