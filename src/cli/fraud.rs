//! `otp-gateway fraud`: the fraud guard's quarantines. `ls` prints one line per range, `lift`
//! and `pin` the quarantine as it is afterwards.

use std::process::ExitCode;

use super::args::FraudCommand;
use super::connection::{Server, gateway, refused};
use crate::proto::timestamp_from_proto;
use crate::proto::v1::{self, policy_admin_client::PolicyAdminClient};

pub(super) async fn run(command: FraudCommand, server: &Server) -> anyhow::Result<ExitCode> {
    let mut client = match gateway(server).await {
        Ok(channel) => PolicyAdminClient::new(channel),
        Err(code) => return Ok(code),
    };
    let shown = match command {
        FraudCommand::Ls { tenant, held } => {
            let request = v1::ListQuarantinesRequest {
                tenant: tenant.unwrap_or_default(),
                in_force_only: held,
            };
            match client.list_quarantines(request).await {
                Ok(list) => list.into_inner().quarantines,
                Err(status) => return Ok(refused(&status, 1)),
            }
        }
        FraudCommand::Lift {
            tenant,
            range,
            note,
        } => {
            let request = v1::LiftQuarantineRequest {
                tenant,
                range,
                note,
            };
            match client.lift_quarantine(request).await {
                Ok(lifted) => vec![lifted.into_inner()],
                Err(status) => return Ok(refused(&status, 1)),
            }
        }
        FraudCommand::Pin {
            tenant,
            range,
            note,
        } => {
            let request = v1::PinQuarantineRequest {
                tenant,
                range,
                note,
            };
            match client.pin_quarantine(request).await {
                Ok(pinned) => vec![pinned.into_inner()],
                Err(status) => return Ok(refused(&status, 1)),
            }
        }
    };
    for quarantine in &shown {
        println!("{}", line(quarantine));
    }
    Ok(ExitCode::SUCCESS)
}

/// `acme  +44770  HOLDING  since 2026-12-07T10:00:00Z  until …  (monitor)  84 sends in …`
fn line(quarantine: &v1::Quarantine) -> String {
    let state = if quarantine.in_force {
        "HOLDING"
    } else if quarantine.state == v1::quarantine::State::Lifted as i32 {
        "lifted"
    } else {
        "not holding"
    };
    let time = |at: &Option<prost_types::Timestamp>| {
        at.as_ref()
            .and_then(timestamp_from_proto)
            .map_or_else(|| "-".to_owned(), |at| at.to_string())
    };
    let until = if quarantine.pinned {
        "until lifted (pinned)".to_owned()
    } else {
        format!("until {}", time(&quarantine.until))
    };
    let why = match &quarantine.evidence {
        Some(e) => format!(
            "{} sends in {} min ({:.0}/h, usually {:.1}/h), {} of {} codes used",
            e.window_sends,
            e.window_seconds / 60,
            e.hourly_rate,
            e.baseline_hourly,
            e.judged_conversions,
            e.judged_sends
        ),
        None => String::new(),
    };
    format!(
        "{}  {}  {state}  since {}  {until}  mode {}  {}  {why}",
        quarantine.tenant,
        quarantine.range,
        time(&quarantine.since),
        quarantine.mode,
        quarantine.note,
    )
}
