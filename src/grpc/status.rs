//! The one mapping from the layers' errors to gRPC statuses.

use tonic::Status;

use crate::delivery::AckError;
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
    fn from(error: PublishError) -> Self {
        Status::unavailable(format!(
            "the job could not be queued, nothing was sent; retry later ({error})"
        ))
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
