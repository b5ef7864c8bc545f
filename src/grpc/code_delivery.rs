//! `otpgateway.v1.CodeDelivery`: SendCode, GetDelivery, WatchDelivery, ListDeliveries,
//! AcknowledgeDelivery, Explain. A key sends and explains only for its tenant
//! (PERMISSION_DENIED) and sees only its tenant's deliveries: another tenant's delivery id is
//! "not found", exactly as an id that does not exist.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{Instrument, instrument};

use super::auth::Caller;
use super::status::invalid_argument;
use crate::delivery::{AckOutcome, DeliveryService};
use crate::domain::{DeliveryId, DeliveryStatus, JobError, Report};
use crate::proto::v1::code_delivery_server::CodeDelivery;
use crate::proto::v1::{
    AccountDiagnosis, AcknowledgeDeliveryRequest, DeliveryReport, DiagnoseAccountRequest,
    ExplainRequest, ExplainResponse, GetDeliveryRequest, ListDeliveriesRequest,
    ListDeliveriesResponse, ReportVerificationRequest, SendCodeRequest, SendCodeResponse,
    WatchDeliveryRequest,
};
use crate::proto::{
    acknowledgement_from_proto, diagnosis_to_proto, explanation_to_proto, job_from_proto,
    report_to_proto, status_from_proto, status_to_proto, timestamp_from_proto,
};
use crate::queue::{CONTENT_TYPE_PROTOBUF, Publisher};
use crate::store::ListQuery;

/// Default and largest page of `ListDeliveries`.
const DEFAULT_PAGE: u32 = 20;
const MAX_PAGE: u32 = 100;

/// The CodeDelivery service.
#[derive(Debug, Clone)]
pub struct CodeDeliveryApi {
    service: Arc<DeliveryService>,
    publisher: Publisher,
    watch_poll: Duration,
    /// Ends open `WatchDelivery` streams (UNAVAILABLE: reconnect) when the server stops, so
    /// that a watching client never holds the process up past its grace period.
    stop: CancellationToken,
}

impl CodeDeliveryApi {
    /// A service submitting through `publisher` and reading `service`'s ledger; its streams end
    /// when `stop` is cancelled.
    pub fn new(
        service: Arc<DeliveryService>,
        publisher: Publisher,
        watch_poll: Duration,
        stop: CancellationToken,
    ) -> Self {
        CodeDeliveryApi {
            service,
            publisher,
            watch_poll,
            stop,
        }
    }

    async fn load(&self, id: &DeliveryId) -> Result<Report, Status> {
        self.service
            .ledger()
            .get(id)
            .await?
            .ok_or_else(|| not_found(id))
    }
}

/// The answer for a delivery that does not exist or that the caller may not see.
fn not_found(id: &DeliveryId) -> Status {
    Status::not_found(format!("no delivery {id}"))
}

/// The delivery id of a request, if the caller may see it (else "not found").
fn visible_id(caller: &Caller, text: &str) -> Result<DeliveryId, Status> {
    let id = parse_id(text)?;
    if !caller.sees_delivery(&id) {
        return Err(not_found(&id));
    }
    Ok(id)
}

fn parse_id(text: &str) -> Result<DeliveryId, Status> {
    text.parse().map_err(|e: JobError| invalid_argument(&e))
}

type ReportStream = Pin<Box<dyn Stream<Item = Result<DeliveryReport, Status>> + Send>>;

impl CodeDeliveryApi {
    /// SendCode's work, inside its span.
    async fn accept_and_queue(
        &self,
        request: Request<SendCodeRequest>,
    ) -> Result<Response<SendCodeResponse>, Status> {
        let caller = Caller::of(&request);
        let job = request
            .into_inner()
            .job
            .ok_or_else(|| invalid_argument(&JobError::new("job", "is missing")))?;
        let body = job.encode_to_vec();
        let job = job_from_proto(job).map_err(|e| invalid_argument(&e))?;
        caller.acts_for(Some(&job.tenant))?;
        let id = job.delivery_id();
        tracing::Span::current().record("delivery_id", tracing::field::display(&id));
        let (report, created) = self.service.accept(&job).await?;
        // Known and already picked up: answer with what exists and send nothing.
        if !created && report.status != DeliveryStatus::Accepted {
            return Ok(Response::new(SendCodeResponse {
                delivery_id: report.delivery_id,
                status: status_to_proto(report.status) as i32,
                duplicate: true,
            }));
        }
        // New, or accepted earlier but possibly never queued: (re)publish. The consumer's
        // ledger claim makes a second copy harmless.
        if let Err(error) = self
            .publisher
            .publish_job(&body, CONTENT_TYPE_PROTOBUF, &report.delivery_id)
            .await
        {
            if created {
                self.service.forget_accepted(&id).await?;
            }
            tracing::warn!(%error, "SendCode: job not queued");
            return Err(error.into());
        }
        tracing::info!(duplicate = !created, "SendCode: job queued");
        Ok(Response::new(SendCodeResponse {
            delivery_id: report.delivery_id,
            status: status_to_proto(DeliveryStatus::Accepted) as i32,
            duplicate: !created,
        }))
    }
}

#[tonic::async_trait]
impl CodeDelivery for CodeDeliveryApi {
    async fn send_code(
        &self,
        request: Request<SendCodeRequest>,
    ) -> Result<Response<SendCodeResponse>, Status> {
        // A server span (RPC conventions) that continues the caller's trace when its metadata
        // carries a W3C traceparent; the parent is set before the span is first entered.
        let span = tracing::info_span!(
            "send_code",
            delivery_id = tracing::field::Empty,
            otel.name = tracing::field::Empty,
            otel.kind = tracing::field::Empty,
        );
        crate::telemetry::describe(
            &span,
            "server",
            || "otpgateway.v1.CodeDelivery/SendCode".into(),
            || {
                vec![
                    ("rpc.system", "grpc".into()),
                    ("rpc.service", "otpgateway.v1.CodeDelivery".into()),
                    ("rpc.method", "SendCode".into()),
                ]
            },
        );
        crate::telemetry::continue_trace(&span, |name| {
            let value = request.metadata().get(name)?.to_str().ok()?;
            Some(value.to_owned())
        });
        self.accept_and_queue(request).instrument(span).await
    }

    async fn get_delivery(
        &self,
        request: Request<GetDeliveryRequest>,
    ) -> Result<Response<DeliveryReport>, Status> {
        let caller = Caller::of(&request);
        let id = visible_id(&caller, &request.into_inner().delivery_id)?;
        Ok(Response::new(report_to_proto(&self.load(&id).await?)))
    }

    type WatchDeliveryStream = ReportStream;

    async fn watch_delivery(
        &self,
        request: Request<WatchDeliveryRequest>,
    ) -> Result<Response<Self::WatchDeliveryStream>, Status> {
        let caller = Caller::of(&request);
        let id = visible_id(&caller, &request.into_inner().delivery_id)?;
        // Subscribe before the first read so no change falls in between.
        let mut changes = self.service.watch(&id.to_string());
        let mut last = self.load(&id).await?;
        let (sender, receiver) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            if sender.send(Ok(report_to_proto(&last))).await.is_err() {
                return;
            }
            while !last.status.is_terminal() {
                tokio::select! {
                    _ = sender.closed() => return,
                    _ = this.stop.cancelled() => {
                        let _ = sender
                            .send(Err(Status::unavailable(
                                "the gateway is shutting down: reconnect and watch again (the delivery goes on)",
                            )))
                            .await;
                        return;
                    }
                    _ = tokio::time::sleep(this.watch_poll) => {}
                    _ = changes.changed() => {}
                }
                let report = match this.load(&id).await {
                    Ok(report) => report,
                    Err(status) => {
                        let _ = sender.send(Err(status)).await;
                        return;
                    }
                };
                if report != last {
                    if sender.send(Ok(report_to_proto(&report))).await.is_err() {
                        return;
                    }
                    last = report;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    #[instrument(skip_all, fields(delivery_id))]
    async fn acknowledge_delivery(
        &self,
        request: Request<AcknowledgeDeliveryRequest>,
    ) -> Result<Response<DeliveryReport>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let id = visible_id(&caller, &request.delivery_id)?;
        tracing::Span::current().record("delivery_id", tracing::field::display(&id));
        if request.device_id.is_empty() {
            return Err(invalid_argument(&JobError::new("device_id", "is required")));
        }
        let ack = acknowledgement_from_proto(request.acknowledgement).ok_or_else(|| {
            invalid_argument(&JobError::new("acknowledgement", "must be SHOWN or DENIED"))
        })?;
        // Only the device that got the push holds its token; a wrong token reads the same
        // whether or not the device is one of the delivery's.
        let tokens = self.service.ledger().ack_tokens();
        if !tokens.verify(&id.to_string(), &request.device_id, &request.ack_token) {
            return Err(Status::permission_denied(
                "the acknowledgement token is not the one this delivery's push to this device carried",
            ));
        }
        let report = match self
            .service
            .acknowledge(&id, &request.device_id, ack)
            .await?
        {
            AckOutcome::Recorded(report) => report,
            AckOutcome::Finished(report) => {
                // The delivery changed after its final event: tell upstream again.
                if let Err(error) = self.publisher.publish_event(&report).await {
                    tracing::warn!(%error, "acknowledgement recorded, but its event was not confirmed");
                }
                report
            }
        };
        // A code shown on the device is push's conversion (a second SHOWN announces it again).
        if ack == crate::domain::Acknowledgement::Shown
            && report.verification.is_some_and(|v| v.verified)
            && let Err(error) = self.publisher.publish_verified(&report).await
        {
            tracing::warn!(%error, "SHOWN recorded, but delivery.verified was not confirmed");
        }
        Ok(Response::new(report_to_proto(&report)))
    }

    #[instrument(skip_all, fields(delivery_id))]
    async fn report_verification(
        &self,
        request: Request<ReportVerificationRequest>,
    ) -> Result<Response<DeliveryReport>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let id = visible_id(&caller, &request.delivery_id)?;
        tracing::Span::current().record("delivery_id", tracing::field::display(&id));
        let at = match &request.at {
            Some(at) => Some(timestamp_from_proto(at).ok_or_else(|| {
                invalid_argument(&JobError::new("at", "is not a valid timestamp"))
            })?),
            None => None,
        };
        let (report, changed) = self
            .service
            .report_verification(&id, request.verified, at)
            .await?;
        if changed
            && request.verified
            && let Err(error) = self.publisher.publish_verified(&report).await
        {
            tracing::warn!(%error, "verification recorded, but its event was not confirmed");
        }
        Ok(Response::new(report_to_proto(&report)))
    }

    async fn explain(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let job = request
            .job
            .ok_or_else(|| invalid_argument(&JobError::new("job", "is missing")))?;
        let job = job_from_proto(job).map_err(|e| invalid_argument(&e))?;
        caller.acts_for(Some(&job.tenant))?;
        let at = match request.at.as_ref() {
            Some(at) => Some(
                timestamp_from_proto(at)
                    .ok_or_else(|| invalid_argument(&JobError::new("at", "is out of range")))?,
            ),
            None => None,
        };
        let plan = self.service.explain(&job, at).await?;
        Ok(Response::new(explanation_to_proto(&plan)))
    }

    async fn diagnose_account(
        &self,
        request: Request<DiagnoseAccountRequest>,
    ) -> Result<Response<AccountDiagnosis>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let tenant = caller
            .listing(&request.tenant)?
            .ok_or_else(|| invalid_argument(&JobError::new("tenant", "is required")))?;
        if request.account.is_empty() {
            return Err(invalid_argument(&JobError::new("account", "is required")));
        }
        let diagnosis = self.service.diagnose(&tenant, &request.account).await?;
        Ok(Response::new(diagnosis_to_proto(&diagnosis)))
    }

    async fn list_deliveries(
        &self,
        request: Request<ListDeliveriesRequest>,
    ) -> Result<Response<ListDeliveriesResponse>, Status> {
        let caller = Caller::of(&request);
        let mut request = request.into_inner();
        // A tenant's key lists its tenant (named or not); a global one must name it.
        request.tenant = caller
            .listing(&request.tenant)?
            .ok_or_else(|| invalid_argument(&JobError::new("tenant", "is required")))?;
        let status = match request.status {
            0 => None,
            value => Some(status_from_proto(value).ok_or_else(|| {
                invalid_argument(&JobError::new("status", format!("unknown status {value}")))
            })?),
        };
        let before = match request.page_token.as_str() {
            "" => None,
            token => Some(token.parse::<i64>().map_err(|_| {
                invalid_argument(&JobError::new(
                    "page_token",
                    "is not a token from a previous page",
                ))
            })?),
        };
        let limit = match request.page_size {
            0 => DEFAULT_PAGE,
            size => size.min(MAX_PAGE),
        };
        let query = ListQuery {
            tenant: request.tenant,
            account: Some(request.account).filter(|a| !a.is_empty()),
            status,
            limit,
            before,
        };
        let page = self.service.ledger().list(&query).await?;
        Ok(Response::new(ListDeliveriesResponse {
            deliveries: page.reports.iter().map(report_to_proto).collect(),
            next_page_token: page.next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }
}
