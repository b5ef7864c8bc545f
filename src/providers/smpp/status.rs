//! What an SMSC's answer means: command_status values (and session failures) as failure
//! reasons and retry classes.

use super::session::RequestError;
use crate::domain::{FailureReason, RetryClass};
use crate::providers::ProviderError;

/// A command_status's name and what it means for the delivery.
pub fn classify_status(status: u32) -> ProviderError {
    use FailureReason::*;
    let (reason, class, name) = match status {
        0x58 => (
            ProviderThrottled,
            None,
            "ESME_RTHROTTLED: throughput exceeded",
        ),
        0x14 => (ProviderThrottled, None, "ESME_RMSGQFUL: message queue full"),
        0x0B => (
            InvalidRecipient,
            None,
            "ESME_RINVDSTADR: invalid destination address",
        ),
        0x50 => (
            InvalidRecipient,
            None,
            "ESME_RINVDSTTON: invalid destination TON",
        ),
        0x51 => (
            InvalidRecipient,
            None,
            "ESME_RINVDSTNPI: invalid destination NPI",
        ),
        0x0A => (
            ProviderMisconfigured,
            None,
            "ESME_RINVSRCADR: invalid source address",
        ),
        0x48 => (
            ProviderMisconfigured,
            None,
            "ESME_RINVSRCTON: invalid source TON",
        ),
        0x49 => (
            ProviderMisconfigured,
            None,
            "ESME_RINVSRCNPI: invalid source NPI",
        ),
        0x0D => (ProviderMisconfigured, None, "ESME_RBINDFAIL: bind failed"),
        0x0E => (
            ProviderMisconfigured,
            None,
            "ESME_RINVPASWD: invalid password",
        ),
        0x0F => (
            ProviderMisconfigured,
            None,
            "ESME_RINVSYSID: invalid system_id",
        ),
        0x05 => (ProviderMisconfigured, None, "ESME_RALYBND: already bound"),
        0x53 => (
            ProviderMisconfigured,
            None,
            "ESME_RINVSYSTYP: invalid system_type",
        ),
        0x04 => (
            ProviderUnavailable,
            None,
            "ESME_RINVBNDSTS: incorrect bind status",
        ),
        0x08 => (ProviderUnavailable, None, "ESME_RSYSERR: system error"),
        0x45 => (
            ProviderUnavailable,
            None,
            "ESME_RSUBMITFAIL: submit_sm failed",
        ),
        0x64 => (
            ProviderUnavailable,
            None,
            "ESME_RX_T_APPN: temporary error at the SMSC",
        ),
        0xFF => (ProviderUnavailable, None, "ESME_RUNKNOWNERR: unknown error"),
        0x61 => (
            ProviderRejected,
            None,
            "ESME_RINVSCHED: invalid scheduled delivery time",
        ),
        0x62 => (
            ProviderRejected,
            None,
            "ESME_RINVEXPIRY: invalid validity period",
        ),
        0x01 => (
            ProviderRejected,
            None,
            "ESME_RINVMSGLEN: invalid message length",
        ),
        0x66 => (
            ProviderRejected,
            None,
            "ESME_RX_R_APPN: rejected by the SMSC",
        ),
        0x65 => (
            ProviderRejected,
            Some(RetryClass::PermanentForTarget),
            "ESME_RX_P_APPN: permanent error at the SMSC",
        ),
        0x400..=0x4FF => (ProviderRejected, None, "vendor-specific error"),
        _ => (ProviderRejected, None, "refused by the SMSC"),
    };
    let code = format!("0x{status:08X}");
    let mut error = ProviderError::new(reason, Some(&code), name);
    if let Some(class) = class {
        error.class = class;
    }
    error
}

/// What a request that got no answer means: a timeout, or a lost session.
pub(super) fn classify_error(e: RequestError) -> ProviderError {
    match e {
        RequestError::Timeout { .. } => {
            ProviderError::new(FailureReason::ProviderTimeout, None, e.to_string())
        }
        RequestError::Closed(_) => {
            ProviderError::new(FailureReason::ProviderUnavailable, None, e.to_string())
        }
    }
}
