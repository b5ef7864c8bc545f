//! The local SMSC the smpp part drains through: `otp-sim`'s SMSC (SMPP 3.4 on rusmpp's codec),
//! answering every submit_sm at once and sending its DELIVRD receipt right after, as a fast
//! carrier does.

use std::net::SocketAddr;

use otp_gateway::sim::{Faults, Sim, SimSettings, smpp, twilio};

/// A running SMSC; it stops when dropped.
pub struct Smsc {
    pub addr: SocketAddr,
    sim: Sim,
}

impl Smsc {
    /// submit_sm accepted so far.
    pub fn submits(&self) -> u64 {
        self.sim.inbox.accepted()
    }
}

/// The bind the gateway's bench configuration uses.
pub const SYSTEM_ID: &str = "bench";
pub const PASSWORD: &str = "bench";

/// Starts the SMSC on a free local port.
pub async fn start() -> anyhow::Result<Smsc> {
    let local = SocketAddr::from(([127, 0, 0, 1], 0));
    let sim = Sim::start(SimSettings {
        http: local,
        smpp: local,
        faults: Faults {
            receipt_delay_ms: 0,
            ..Faults::default()
        },
        twilio: twilio::Account {
            sid: "AC00000000000000000000000000000000".into(),
            auth_token: "unused".into(),
        },
        smpp_bind: smpp::Bind {
            system_id: SYSTEM_ID.into(),
            password: PASSWORD.into(),
        },
        apns: None,
        fcm_service_account: None,
    })
    .await?;
    Ok(Smsc {
        addr: sim.smpp,
        sim,
    })
}
