//! The one mapping from the layers' errors to gRPC statuses.

use tonic::Status;

use crate::delivery::{AckError, VerifyError};
use crate::domain::JobError;
use crate::queue::PublishError;
use crate::store::StoreError;

/// INVALID_ARGUMENT naming the field (also in the `x-otp-field` metadata).
pub fn invalid_argument(error: &JobError) -> Status {
    let mut status =
        Status::invalid_argument(format!("invalid `{}`: {}", error.field, error.problem));
    if let Ok(field) = error.field.parse() {
        status.metadata_mut().insert("x-otp-field", field);
    }
    status
}

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Self {
        tracing::error!(%error, "ledger failure while serving a request");
        match error {
            StoreError::NotFound(id) => Status::not_found(format!("no delivery {id}")),
            other => Status::unavailable(format!("the ledger is unavailable: {other}")),
        }
    }
}

impl From<PublishError> for Status {
    /// Says only what is known: a job the broker may have taken must be retried with the same
    /// job_id (idempotent), never with a new one (that would send a second code).
    fn from(error: PublishError) -> Self {
        if error.surely_not_queued() {
            Status::unavailable(format!(
                "the job was not queued and nothing was sent; retry later ({error})"
            ))
        } else {
            Status::unavailable(format!(
                "the job may have been queued: retry with the same job_id, which is safe (a job id is sent at most once), never with a new one ({error})"
            ))
        }
    }
}

impl From<VerifyError> for Status {
    fn from(error: VerifyError) -> Self {
        match error {
            VerifyError::Store(error) => error.into(),
            VerifyError::UnknownDelivery(_) => Status::not_found(error.to_string()),
            VerifyError::Invalid(error) => invalid_argument(&error),
        }
    }
}

impl From<AckError> for Status {
    fn from(error: AckError) -> Self {
        match error {
            AckError::Store(error) => error.into(),
            AckError::UnknownDelivery(_) => Status::not_found(error.to_string()),
            AckError::UnknownDevice { .. } => {
                let mut status = Status::invalid_argument(error.to_string());
                status
                    .metadata_mut()
                    .insert("x-otp-field", "device_id".parse().expect("ascii"));
                status
            }
            AckError::NotAwaiting { .. } | AckError::NotPushed { .. } => {
                Status::failed_precondition(error.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_publish_says_only_what_is_known() {
        for surely_not in [
            PublishError::Unavailable,
            PublishError::Unroutable {
                exchange: "otp.jobs".into(),
                routing_key: "send-code".into(),
            },
        ] {
            let status = Status::from(surely_not);
            assert_eq!(status.code(), tonic::Code::Unavailable);
            assert!(
                status
                    .message()
                    .starts_with("the job was not queued and nothing was sent")
            );
        }
        for maybe in [
            PublishError::Nacked,
            PublishError::Timeout(std::time::Duration::from_secs(10)),
        ] {
            let status = Status::from(maybe);
            assert_eq!(status.code(), tonic::Code::Unavailable);
            assert!(
                status.message().contains("may have been queued")
                    && status.message().contains("same job_id")
                    && !status.message().contains("nothing was sent"),
                "{}",
                status.message()
            );
        }
    }
}
