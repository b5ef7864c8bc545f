//! The local SMSC the smpp part drains through: SMPP 3.4 over TCP on rusmpp's codec. It binds
//! any transceiver, answers enquire_link and unbind, answers every submit_sm at once with a new
//! message id, and sends its DELIVRD receipt (deliver_sm) right after, as a fast carrier does.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{SinkExt, StreamExt};
use rusmpp::pdus::{BindTransceiverResp, DeliverSm, SubmitSmResp};
use rusmpp::tokio_codec::CommandCodec;
use rusmpp::types::{COctetString, OctetString};
use rusmpp::values::EsmClass;
use rusmpp::{Command, CommandStatus, Pdu};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

/// A running SMSC; it stops when dropped.
pub struct Smsc {
    pub addr: SocketAddr,
    submits: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Drop for Smsc {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Smsc {
    /// submit_sm received so far.
    pub fn submits(&self) -> u64 {
        self.submits.load(Ordering::Relaxed)
    }
}

/// Starts the SMSC on a free local port.
pub async fn start() -> anyhow::Result<Smsc> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let submits = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let (counter, stopped) = (Arc::clone(&submits), stop.clone());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stopped.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((stream, _)) = accepted else { return };
            let _ = stream.set_nodelay(true);
            tokio::spawn(session(stream, Arc::clone(&counter), stopped.clone()));
        }
    });
    Ok(Smsc {
        addr,
        submits,
        stop,
    })
}

async fn session(stream: tokio::net::TcpStream, submits: Arc<AtomicU64>, stop: CancellationToken) {
    let (read, write) = stream.into_split();
    let mut reader = FramedRead::new(read, CommandCodec::new());
    let mut writer = FramedWrite::new(write, CommandCodec::new());
    let (out, mut queue) = mpsc::unbounded_channel::<Command>();
    // One writer: everything queued goes out, then one flush.
    tokio::spawn(async move {
        while let Some(command) = queue.recv().await {
            let mut written = writer.feed(command).await;
            while written.is_ok()
                && let Ok(command) = queue.try_recv()
            {
                written = writer.feed(command).await;
            }
            if written
                .and(SinkExt::<Command>::flush(&mut writer).await)
                .is_err()
            {
                return;
            }
        }
    });
    let mut sequence = 0x4000_0000u32;
    loop {
        let command = tokio::select! {
            _ = stop.cancelled() => return,
            next = reader.next() => match next {
                Some(Ok(command)) => command,
                _ => return,
            },
        };
        let seq = command.sequence_number();
        let reply = match command.pdu() {
            Some(Pdu::BindTransceiver(_)) => Command::new(
                CommandStatus::EsmeRok,
                seq,
                BindTransceiverResp::builder()
                    .system_id(COctetString::from_str("BENCH").expect("a system id"))
                    .build(),
            ),
            Some(Pdu::EnquireLink) => {
                Command::new(CommandStatus::EsmeRok, seq, Pdu::EnquireLinkResp)
            }
            Some(Pdu::Unbind) => {
                let _ = out.send(Command::new(CommandStatus::EsmeRok, seq, Pdu::UnbindResp));
                return;
            }
            Some(Pdu::SubmitSm(submit)) => {
                let n = submits.fetch_add(1, Ordering::Relaxed) + 1;
                let id = format!("{n:X}");
                let _ = out.send(Command::new(
                    CommandStatus::EsmeRok,
                    seq,
                    SubmitSmResp::builder()
                        .message_id(COctetString::from_str(&id).expect("a message id"))
                        .build(),
                ));
                let text = format!(
                    "id:{id} sub:001 dlvrd:001 submit date:2612011000 done date:2612011000 stat:DELIVRD err:000 text:"
                );
                sequence = sequence.wrapping_add(1);
                let receipt = DeliverSm::builder()
                    .source_addr(submit.destination_addr.clone())
                    .esm_class(EsmClass::from(0x04))
                    .short_message(
                        OctetString::from_slice(text.as_bytes()).expect("a receipt text"),
                    )
                    .build();
                Command::new(CommandStatus::EsmeRok, sequence, receipt)
            }
            // deliver_sm_resp and anything else need no answer here.
            _ => continue,
        };
        if out.send(reply).is_err() {
            return;
        }
    }
}
