//! SMPP frames as the carrier session reads them (rusmpp's codec): any bytes decode to a
//! command or an error without panicking, and a deliver_sm among them is read as a receipt or
//! none without panicking.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use otp_gateway::providers::smpp::parse_receipt;
use rusmpp::Pdu;
use rusmpp::tokio_codec::CommandCodec;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = CommandCodec::new();
    let mut buffer = BytesMut::from(data);
    while let Ok(Some(command)) = codec.decode(&mut buffer) {
        if let Some(Pdu::DeliverSm(deliver)) = command.pdu() {
            let _ = parse_receipt("smpp", deliver);
        }
    }
});
