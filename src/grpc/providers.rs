//! `otpgateway.v1.Providers`: the status page — every provider's circuit, error rate, latency
//! and last error, as this replica sees them (each replica keeps its own circuits).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::delivery::DeliveryService;
use crate::proto::provider_health_to_proto;
use crate::proto::v1::providers_server::Providers;
use crate::proto::v1::{ListProvidersRequest, ListProvidersResponse};

/// The Providers service.
#[derive(Debug, Clone)]
pub struct ProvidersApi {
    service: Arc<DeliveryService>,
}

impl ProvidersApi {
    /// A status page over `service`'s engine.
    pub fn new(service: Arc<DeliveryService>) -> Self {
        ProvidersApi { service }
    }
}

#[tonic::async_trait]
impl Providers for ProvidersApi {
    async fn list_providers(
        &self,
        _request: Request<ListProvidersRequest>,
    ) -> Result<Response<ListProvidersResponse>, Status> {
        let providers = self
            .service
            .provider_health()
            .iter()
            .map(provider_health_to_proto)
            .collect();
        Ok(Response::new(ListProvidersResponse {
            providers,
            replica: self.service.replica().to_owned(),
        }))
    }
}
