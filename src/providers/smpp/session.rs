//! One SMPP 3.4 session over a TCP stream, on `rusmpp`'s codec: sequence numbers, matching
//! responses to requests, enquire_link both ways, and the SMSC's own operations.
//!
//! The session owns its loop (the client crate's connection left queued submits unsent until the
//! SMSC next spoke): a writer task drains every queued PDU and flushes once the queue is empty,
//! and a reader task answers the SMSC. Nothing a caller queues waits for input from the SMSC.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rusmpp::pdus::{DeliverSm, DeliverSmResp};
use rusmpp::tokio_codec::CommandCodec;
use rusmpp::{Command, CommandStatus, Pdu};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

/// Why a request got no usable answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    /// No response within the timeout.
    #[error("no {command} within {timeout:?}")]
    Timeout {
        /// The response that was awaited (`submit_sm_resp`, …).
        command: &'static str,
        /// How long it was awaited.
        timeout: Duration,
    },
    /// The session ended before the response came (or was already over).
    #[error("the SMPP session ended: {0}")]
    Closed(String),
}

/// An answer of the SMSC: its command_status and the response PDU (absent when the SMSC sent
/// only a header, as many do with an error status).
#[derive(Debug)]
pub struct Response {
    /// The command_status (0 is ESME_ROK).
    pub status: u32,
    /// The response body, when there was one.
    pub pdu: Option<Pdu>,
}

struct Inner {
    outgoing: mpsc::UnboundedSender<Command>,
    pending: Mutex<HashMap<u32, oneshot::Sender<Command>>>,
    sequence: AtomicU32,
    /// Cancelled when the session is over; `ended` says why.
    over: CancellationToken,
    ended: Mutex<Option<String>>,
}

impl Inner {
    fn end(&self, why: impl Into<String>) {
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        if ended.is_none() {
            *ended = Some(why.into());
        }
        drop(ended);
        self.over.cancel();
        // Requests still waiting hear that the session is gone.
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn why_ended(&self) -> String {
        self.ended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "the connection closed".to_owned())
    }
}

/// A handle on a running session; clones share it.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

/// Session timing.
#[derive(Debug, Clone, Copy)]
pub struct SessionTiming {
    /// How often the session is checked with enquire_link.
    pub enquire_link_interval: Duration,
    /// How long any request (enquire_link included) may wait for its response.
    pub response_timeout: Duration,
}

impl Session {
    /// Starts the session's reader and writer on `stream`. Delivery receipts and other
    /// deliver_sm the SMSC sends are answered ESME_ROK and handed to `delivered`.
    pub fn start(
        stream: TcpStream,
        timing: SessionTiming,
        delivered: mpsc::UnboundedSender<DeliverSm>,
    ) -> Session {
        let (read, write) = stream.into_split();
        let (outgoing, queue) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            outgoing,
            pending: Mutex::new(HashMap::new()),
            sequence: AtomicU32::new(0),
            over: CancellationToken::new(),
            ended: Mutex::new(None),
        });
        let session = Session { inner };
        let writer = FramedWrite::new(write, CommandCodec::new());
        tokio::spawn(tracing::Instrument::in_current_span(write_loop(
            Arc::clone(&session.inner),
            writer,
            queue,
        )));
        let reader = FramedRead::new(read, CommandCodec::new());
        tokio::spawn(tracing::Instrument::in_current_span(read_loop(
            session.clone(),
            reader,
            delivered,
        )));
        tokio::spawn(tracing::Instrument::in_current_span(keep_alive(
            session.clone(),
            timing,
        )));
        session
    }

    /// Whether the session is over.
    pub fn is_over(&self) -> bool {
        self.inner.over.is_cancelled()
    }

    /// Waits until the session is over and says why.
    pub async fn ended(&self) -> String {
        self.inner.over.cancelled().await;
        self.inner.why_ended()
    }

    /// Ends the session (the connection closes once the writer has sent what was queued).
    pub fn close(&self, why: &str) {
        self.inner.end(why);
    }

    /// The next sequence number: 1 to 0x7FFFFFFF, wrapping.
    fn next_sequence(&self) -> u32 {
        self.inner
            .sequence
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(if n >= 0x7FFF_FFFF { 1 } else { n + 1 })
            })
            .map_or(1, |n| if n >= 0x7FFF_FFFF { 1 } else { n + 1 })
    }

    /// Sends `pdu` and waits up to `timeout` for its response.
    pub async fn request(
        &self,
        pdu: impl Into<Pdu>,
        response: &'static str,
        timeout: Duration,
    ) -> Result<Response, RequestError> {
        if self.is_over() {
            return Err(RequestError::Closed(self.inner.why_ended()));
        }
        let sequence = self.next_sequence();
        let (tx, rx) = oneshot::channel();
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sequence, tx);
        let command = Command::new(CommandStatus::EsmeRok, sequence, pdu);
        if self.inner.outgoing.send(command).is_err() {
            self.forget(sequence);
            return Err(RequestError::Closed(self.inner.why_ended()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(command)) => Ok(Response {
                status: command.status().into(),
                pdu: command.pdu().cloned(),
            }),
            Ok(Err(_)) => Err(RequestError::Closed(self.inner.why_ended())),
            Err(_) => {
                self.forget(sequence);
                Err(RequestError::Timeout {
                    command: response,
                    timeout,
                })
            }
        }
    }

    fn forget(&self, sequence: u32) {
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&sequence);
    }

    /// Queues a response (or other PDU that awaits no answer).
    fn reply(&self, status: CommandStatus, sequence: u32, pdu: impl Into<Pdu>) {
        let _ = self
            .inner
            .outgoing
            .send(Command::new(status, sequence, pdu));
    }
}

/// Writes queued PDUs: everything queued goes into the buffer, then one flush.
async fn write_loop(
    inner: Arc<Inner>,
    mut writer: FramedWrite<tokio::net::tcp::OwnedWriteHalf, CommandCodec>,
    mut queue: mpsc::UnboundedReceiver<Command>,
) {
    loop {
        let command = tokio::select! {
            biased;
            command = queue.recv() => command,
            // Once over, what is already queued (an unbind, its response) still goes out.
            _ = inner.over.cancelled() => queue.try_recv().ok(),
        };
        let Some(command) = command else { break };
        let mut written = writer.feed(command).await;
        while written.is_ok()
            && let Ok(command) = queue.try_recv()
        {
            written = writer.feed(command).await;
        }
        if let Err(e) = written.and(SinkExt::<Command>::flush(&mut writer).await) {
            inner.end(format!("writing to the SMSC failed: {e}"));
            break;
        }
    }
    let _ = SinkExt::<Command>::close(&mut writer).await;
}

/// Reads what the SMSC sends until the connection ends or the session is over.
async fn read_loop(
    session: Session,
    mut reader: FramedRead<tokio::net::tcp::OwnedReadHalf, CommandCodec>,
    delivered: mpsc::UnboundedSender<DeliverSm>,
) {
    let inner = &session.inner;
    loop {
        let next = tokio::select! {
            _ = inner.over.cancelled() => return,
            next = reader.next() => next,
        };
        let command = match next {
            Some(Ok(command)) => command,
            Some(Err(e)) => return inner.end(format!("an unreadable PDU from the SMSC: {e}")),
            None => return inner.end("the SMSC closed the connection"),
        };
        let (id, sequence) = (command.id(), command.sequence_number());
        if id.is_response() {
            let waiting = inner
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&sequence);
            match waiting {
                Some(waiting) => {
                    let _ = waiting.send(command);
                }
                None => tracing::debug!(?id, sequence, "SMPP response nobody waits for"),
            }
            continue;
        }
        match command.pdu() {
            Some(Pdu::EnquireLink) => {
                session.reply(CommandStatus::EsmeRok, sequence, Pdu::EnquireLinkResp)
            }
            Some(Pdu::DeliverSm(deliver)) => {
                session.reply(CommandStatus::EsmeRok, sequence, DeliverSmResp::default());
                let _ = delivered.send(deliver.clone());
            }
            Some(Pdu::Unbind) => {
                session.reply(CommandStatus::EsmeRok, sequence, Pdu::UnbindResp);
                return inner.end("the SMSC unbound");
            }
            _ => {
                // An operation this ESME does not take: generic_nack, as SMPP 3.4 §3.3 says.
                tracing::debug!(command = ?id, "SMPP operation not supported; generic_nack");
                session.reply(CommandStatus::EsmeRinvcmdid, sequence, Pdu::GenericNack);
            }
        }
    }
}

/// Sends enquire_link every interval; a missing answer ends the session.
async fn keep_alive(session: Session, timing: SessionTiming) {
    let mut ticks = tokio::time::interval(timing.enquire_link_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = session.inner.over.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match session
            .request(
                Pdu::EnquireLink,
                "enquire_link_resp",
                timing.response_timeout,
            )
            .await
        {
            Ok(_) => {}
            Err(RequestError::Closed(_)) => return,
            Err(e) => return session.close(&format!("the SMSC stopped answering: {e}")),
        }
    }
}
