//! An SMSC speaking SMPP 3.4 over TCP (framing and PDUs from `rusmpp`'s codec). It takes
//! bind_transceiver, bind_transmitter and bind_receiver with the configured system_id and
//! password (others get `ESME_RINVSYSID` / `ESME_RINVPASWD`), answers enquire_link and unbind,
//! and answers each submit_sm with a message id. When the submit asks for a receipt
//! (registered_delivery), a deliver_sm follows, on the same session (transceiver) or on a
//! receiver bound with the same system_id: the receipt text (`id:… sub:001 dlvrd:… submit
//! date:… done date:… stat:… err:…`) and the receipted_message_id and message_state TLVs.
//! `DELIVRD`, `UNDELIV` for a filtered number, `REJECTD` for an opted-out one. Any other
//! operation (query_sm, data_sm, submit_multi, …) gets a generic_nack with `ESME_RINVCMDID`.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use rusmpp::pdus::{
    BindReceiverResp, BindTransceiverResp, BindTransmitterResp, DeliverSm, SubmitSm, SubmitSmResp,
};
use rusmpp::tlvs::{MessageDeliveryRequestTlvValue, TlvValue};
use rusmpp::tokio_codec::CommandCodec;
use rusmpp::types::{COctetString, OctetString};
use rusmpp::values::{EsmClass, MessageState};
use rusmpp::{Command, CommandStatus, Pdu};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::{Faults, Received, Shared, now_rfc3339};

/// The bind the SMSC accepts.
#[derive(Debug, Clone)]
pub struct Bind {
    /// system_id.
    pub system_id: String,
    /// password (SMPP allows at most 8 characters).
    pub password: String,
}

/// The SMSC's own state: message ids and the sessions that take receipts.
struct Smsc {
    shared: Shared,
    bind: Bind,
    next_id: AtomicU64,
    /// Senders of the sessions bound as receivers or transceivers.
    receivers: Mutex<Vec<mpsc::UnboundedSender<Command>>>,
    /// Sequence numbers of the PDUs the SMSC starts (deliver_sm).
    sequence: AtomicU64,
}

/// Binds `address` and serves SMPP sessions until `stop`; returns where it listens.
pub(crate) async fn serve(
    address: SocketAddr,
    bind: Bind,
    shared: Shared,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let local = listener.local_addr()?;
    let smsc = Arc::new(Smsc {
        shared,
        bind,
        next_id: AtomicU64::new(0),
        receivers: Mutex::default(),
        sequence: AtomicU64::new(1),
    });
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((stream, _)) = accepted else { continue };
            let _ = stream.set_nodelay(true);
            tokio::spawn(session(stream, Arc::clone(&smsc), stop.clone()));
        }
    });
    Ok(local)
}

/// What a bind asked for.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    Transmitter,
    Receiver,
    Transceiver,
}

async fn session(stream: tokio::net::TcpStream, smsc: Arc<Smsc>, stop: CancellationToken) {
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
    let mut bound: Option<Role> = None;
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
            Some(Pdu::BindTransceiver(b)) => {
                let status = smsc.bind(
                    b.system_id.as_str(),
                    b.password.as_str(),
                    Role::Transceiver,
                    &mut bound,
                    &out,
                );
                let resp = BindTransceiverResp::builder()
                    .system_id(system_id())
                    .build();
                Command::new(status, seq, resp)
            }
            Some(Pdu::BindTransmitter(b)) => {
                let status = smsc.bind(
                    b.system_id.as_str(),
                    b.password.as_str(),
                    Role::Transmitter,
                    &mut bound,
                    &out,
                );
                let resp = BindTransmitterResp::builder()
                    .system_id(system_id())
                    .build();
                Command::new(status, seq, resp)
            }
            Some(Pdu::BindReceiver(b)) => {
                let status = smsc.bind(
                    b.system_id.as_str(),
                    b.password.as_str(),
                    Role::Receiver,
                    &mut bound,
                    &out,
                );
                let resp = BindReceiverResp::builder().system_id(system_id()).build();
                Command::new(status, seq, resp)
            }
            Some(Pdu::EnquireLink) => {
                Command::new(CommandStatus::EsmeRok, seq, Pdu::EnquireLinkResp)
            }
            Some(Pdu::Unbind) => {
                let _ = out.send(Command::new(CommandStatus::EsmeRok, seq, Pdu::UnbindResp));
                return;
            }
            Some(Pdu::SubmitSm(submit)) => {
                if !matches!(bound, Some(Role::Transmitter | Role::Transceiver)) {
                    Command::new(
                        CommandStatus::EsmeRinvbndsts,
                        seq,
                        SubmitSmResp::builder().build(),
                    )
                } else {
                    let faults = smsc.shared.knobs.get("smpp");
                    if faults.latency_ms == 0 {
                        smsc.submit(seq, submit, &faults, &out)
                    } else {
                        let (smsc, out, submit) = (Arc::clone(&smsc), out.clone(), submit.clone());
                        // Answered by a task: a slow answer does not hold up the others.
                        tokio::spawn(async move {
                            faults.delay().await;
                            let reply = smsc.submit(seq, &submit, &faults, &out);
                            let _ = out.send(reply);
                        });
                        continue;
                    }
                }
            }
            // deliver_sm_resp, generic_nack and the other responses need no answer.
            _ if command.id().is_response() => continue,
            // An operation this SMSC does not offer (query_sm, data_sm, submit_multi, …).
            _ => Command::new(CommandStatus::EsmeRinvcmdid, seq, Pdu::GenericNack),
        };
        if out.send(reply).is_err() {
            return;
        }
    }
}

fn system_id() -> COctetString<1, 16> {
    COctetString::from_str("OTPSIM").expect("a valid system id")
}

impl Smsc {
    /// Answers a bind as `role`: its command_status. A successful one is the session's role
    /// from now on, and a receiving one gets the receipts.
    fn bind(
        &self,
        system_id: &str,
        password: &str,
        role: Role,
        bound: &mut Option<Role>,
        out: &mpsc::UnboundedSender<Command>,
    ) -> CommandStatus {
        if system_id != self.bind.system_id {
            return CommandStatus::EsmeRinvsysid;
        }
        if password != self.bind.password {
            return CommandStatus::EsmeRinvpaswd;
        }
        *bound = Some(role);
        if role != Role::Transmitter {
            let mut receivers = self.receivers.lock().unwrap_or_else(|p| p.into_inner());
            receivers.retain(|r| !r.is_closed());
            receivers.push(out.clone());
        }
        CommandStatus::EsmeRok
    }

    /// The answer to one submit_sm; its receipt is sent later when asked for.
    fn submit(
        self: &Arc<Self>,
        seq: u32,
        submit: &SubmitSm,
        faults: &Faults,
        session: &mpsc::UnboundedSender<Command>,
    ) -> Command {
        if faults.fails() {
            return Command::new(
                CommandStatus::EsmeRsyserr,
                seq,
                SubmitSmResp::builder().build(),
            );
        }
        let destination = submit.destination_addr.as_str();
        if destination.is_empty() || !destination.bytes().all(|b| b.is_ascii_digit()) {
            return Command::new(
                CommandStatus::EsmeRinvdstadr,
                seq,
                SubmitSmResp::builder().build(),
            );
        }
        let number = format!("+{destination}");
        let id = format!("{:08X}", self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        self.shared.inbox.push(Received {
            at: now_rfc3339(),
            via: "smpp",
            channel: "sms",
            to: number.clone(),
            text: text(submit),
            id: id.clone(),
            receipt: None,
        });
        let wants_receipt = u8::from(submit.registered_delivery) & 0x03 != 0;
        if faults.receipts && wants_receipt {
            let state = if faults.opted_out.contains(&number) {
                MessageState::Rejected
            } else if faults.filtered.contains(&number) {
                MessageState::Undeliverable
            } else {
                MessageState::Delivered
            };
            if faults.receipt_delay_ms == 0 {
                self.send_receipt(session, &id, destination, state);
            } else {
                let (smsc, session, id) = (Arc::clone(self), session.clone(), id.clone());
                let delay = std::time::Duration::from_millis(faults.receipt_delay_ms);
                let destination = destination.to_owned();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    smsc.send_receipt(&session, &id, &destination, state);
                });
            }
        }
        Command::new(
            CommandStatus::EsmeRok,
            seq,
            SubmitSmResp::builder()
                .message_id(COctetString::from_str(&id).expect("a message id"))
                .build(),
        )
    }

    /// Sends the receipt on the submitting session when it receives, else on a receiver.
    fn send_receipt(
        &self,
        session: &mpsc::UnboundedSender<Command>,
        id: &str,
        destination: &str,
        state: MessageState,
    ) {
        let (stat, err, delivered, label) = match state {
            MessageState::Delivered => ("DELIVRD", "000", 1, "delivered"),
            MessageState::Rejected => ("REJECTD", "021", 0, "rejected"),
            _ => ("UNDELIV", "034", 0, "undelivered"),
        };
        let stamp = jiff::Zoned::now().strftime("%y%m%d%H%M").to_string();
        let text = format!(
            "id:{id} sub:001 dlvrd:{delivered:03} submit date:{stamp} done date:{stamp} stat:{stat} err:{err} text:"
        );
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed) as u32;
        let receipt = DeliverSm::builder()
            .source_addr(COctetString::from_str(destination).expect("digits"))
            .esm_class(EsmClass::from(0x04))
            .short_message(OctetString::from_slice(text.as_bytes()).expect("a short receipt"))
            .tlvs(vec![
                MessageDeliveryRequestTlvValue::ReceiptedMessageId(
                    COctetString::from_str(id).expect("a message id"),
                ),
                MessageDeliveryRequestTlvValue::MessageState(state),
            ])
            .build();
        let command = Command::new(CommandStatus::EsmeRok, seq, receipt);
        let receivers = self.receivers.lock().unwrap_or_else(|p| p.into_inner());
        let target = receivers
            .iter()
            .find(|r| r.same_channel(session))
            .or_else(|| receivers.iter().find(|r| !r.is_closed()));
        if let Some(target) = target
            && target.send(command).is_ok()
        {
            self.shared.inbox.receipt("smpp", id, label);
        }
    }
}

/// The text of a submit_sm: short_message or the message_payload TLV, decoded by data_coding
/// (8: UCS-2; otherwise GSM-7 septets, one per octet), a user data header skipped.
fn text(submit: &SubmitSm) -> String {
    let short = submit.short_message().as_ref();
    let payload = submit.tlvs().iter().find_map(|tlv| match tlv.value() {
        Some(TlvValue::MessagePayload(p)) => Some(p.value.as_ref().to_vec()),
        _ => None,
    });
    let mut octets = if short.is_empty() {
        payload.unwrap_or_default()
    } else {
        short.to_vec()
    };
    if u8::from(submit.esm_class) & 0x40 != 0 && !octets.is_empty() {
        let header = usize::from(octets[0]) + 1;
        octets.drain(..header.min(octets.len()));
    }
    if u8::from(submit.data_coding) == 0x08 {
        crate::domain::ucs2_text(&octets)
    } else {
        crate::domain::gsm7_text(&octets)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::{SinkExt, StreamExt};
    use rusmpp::pdus::{BindTransceiver, QuerySm, SubmitSm};
    use rusmpp::tokio_codec::CommandCodec;
    use rusmpp::types::{COctetString, OctetString};
    use rusmpp::values::{MessageState, RegisteredDelivery};
    use rusmpp::{Command, CommandId, CommandStatus, Pdu};
    use std::str::FromStr;
    use tokio_util::codec::Framed;

    use crate::sim::tests::start;

    type Client = Framed<tokio::net::TcpStream, CommandCodec>;

    async fn next(client: &mut Client) -> Command {
        tokio::time::timeout(Duration::from_secs(5), client.next())
            .await
            .expect("an answer within 5 s")
            .expect("the session stays open")
            .expect("a well-formed PDU")
    }

    fn bind(password: &str) -> BindTransceiver {
        BindTransceiver::builder()
            .system_id(COctetString::from_str("otp").unwrap())
            .password(COctetString::from_str(password).unwrap())
            .build()
    }

    #[tokio::test]
    async fn the_smsc_checks_the_bind_nacks_what_it_lacks_and_receipts_what_it_takes() {
        let sim = start().await;
        let mut client = Framed::new(
            tokio::net::TcpStream::connect(sim.smpp).await.unwrap(),
            CommandCodec::new(),
        );
        let submit = |number: &str| {
            SubmitSm::builder()
                .destination_addr(COctetString::from_str(number).unwrap())
                .registered_delivery(RegisteredDelivery::from(0x01))
                .short_message(OctetString::from_slice(b"482913 is your code").unwrap())
                .build()
        };
        // Before a bind, a submit is out of place.
        client
            .send(Command::new(
                CommandStatus::EsmeRok,
                1,
                submit("14155550101"),
            ))
            .await
            .unwrap();
        assert_eq!(
            next(&mut client).await.status(),
            CommandStatus::EsmeRinvbndsts
        );
        client
            .send(Command::new(CommandStatus::EsmeRok, 2, bind("wrong")))
            .await
            .unwrap();
        assert_eq!(
            next(&mut client).await.status(),
            CommandStatus::EsmeRinvpaswd
        );
        client
            .send(Command::new(CommandStatus::EsmeRok, 3, bind("secret")))
            .await
            .unwrap();
        let bound = next(&mut client).await;
        assert_eq!(
            (bound.id(), bound.status()),
            (CommandId::BindTransceiverResp, CommandStatus::EsmeRok)
        );
        let query = QuerySm::builder()
            .message_id(COctetString::from_str("1").unwrap())
            .build();
        client
            .send(Command::new(CommandStatus::EsmeRok, 4, query))
            .await
            .unwrap();
        let nack = next(&mut client).await;
        assert_eq!(
            (nack.id(), nack.status(), nack.sequence_number()),
            (CommandId::GenericNack, CommandStatus::EsmeRinvcmdid, 4)
        );
        // An opted-out number: accepted, then a REJECTD receipt naming the message id.
        client
            .send(Command::new(
                CommandStatus::EsmeRok,
                5,
                submit("14155550123"),
            ))
            .await
            .unwrap();
        let accepted = next(&mut client).await;
        let Some(Pdu::SubmitSmResp(resp)) = accepted.pdu() else {
            panic!("{accepted:?}")
        };
        let id = resp.message_id().as_str().to_owned();
        let receipt = next(&mut client).await;
        let Some(Pdu::DeliverSm(deliver)) = receipt.pdu() else {
            panic!("{receipt:?}")
        };
        let text = String::from_utf8_lossy(deliver.short_message().as_ref()).into_owned();
        assert!(
            text.starts_with(&format!("id:{id} ")) && text.contains("stat:REJECTD"),
            "{text}"
        );
        assert!(deliver.tlvs().iter().any(|tlv| matches!(
            tlv.value(),
            Some(rusmpp::tlvs::TlvValue::MessageState(MessageState::Rejected))
        )));
        let inbox = sim.inbox.messages();
        assert_eq!(inbox.len(), 1, "a refused submit is not in the inbox");
        assert_eq!(
            (inbox[0].to.as_str(), inbox[0].text.as_str()),
            ("+14155550123", "482913 is your code")
        );
    }
}
