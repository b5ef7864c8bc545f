//! The application: builds every part from the configuration, binds the gRPC port, and runs
//! until stopped. Owns shutdown: stop consuming, drain in-flight jobs within the grace period,
//! then stop the API.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{AuthMode, Config};
use crate::delivery::{DeliveryService, Dispatcher, EngineSettings};
use crate::domain::{Clock, SystemClock};
use crate::grpc::{Authenticator, GrpcPort, GrpcTls};
use crate::providers::KindSettings;
use crate::providers::{ProviderReceipt, ProviderRegistry};
use crate::queue::{BrokerLink, JobConsumer, LinkState, Publisher};
use crate::receipts::ReceiptsState;
use crate::store::PolicyStore;

/// A built, not yet running, gateway.
#[derive(Debug)]
pub struct Application {
    config: Config,
    listener: TcpListener,
    grpc_addr: SocketAddr,
    receipts_listener: TcpListener,
    receipts_addr: SocketAddr,
    ops_listener: TcpListener,
    ops_addr: SocketAddr,
    service: Arc<DeliveryService>,
    policy: Arc<dyn PolicyStore>,
    auth: Arc<Authenticator>,
    /// TLS on the gRPC port.
    tls: Option<GrpcTls>,
    publisher: Publisher,
    link: BrokerLink,
    link_state: watch::Receiver<LinkState>,
    provider_receipts: Option<mpsc::UnboundedReceiver<ProviderReceipt>>,
}

impl Application {
    /// Builds the gateway with the system clock and the configured providers.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let providers = ProviderRegistry::from_config(&config).await?;
        Self::build_with(config, providers, Arc::new(SystemClock)).await
    }

    /// Builds the gateway with the given providers and clock (tests use their own).
    pub async fn build_with(
        config: Config,
        providers: ProviderRegistry,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        let crate::store::Stores { ledger, policy } = crate::store::open(&config.store)
            .await
            .with_context(|| format!("opening the ledger at {}", config.store.url))?;
        let bootstrap = config.auth.bootstrap_admin_key()?;
        if config.auth.mode == AuthMode::Keys
            && bootstrap.is_none()
            && policy.list_api_keys(None).await?.is_empty()
        {
            tracing::warn!(
                "no API key exists and no bootstrap admin key is set: every gRPC call but health checks will be refused (UNAUTHENTICATED). Set auth.bootstrap_admin_key (or OTP_GATEWAY_AUTH__BOOTSTRAP_ADMIN_KEY) and make keys with `otp-gateway keys create`"
            );
        }
        let auth = Arc::new(Authenticator::new(
            &config.auth,
            bootstrap,
            Arc::clone(&policy),
        ));
        let settings = EngineSettings::from_config(&config);
        let provider_receipts = providers.take_receipts();
        let dispatcher = Dispatcher::new(providers, Arc::clone(&policy), settings);
        let worker = format!(
            "{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let service = Arc::new(DeliveryService::new(
            ledger,
            dispatcher,
            clock,
            worker.clone(),
        ));
        let (link, publisher, link_state) = BrokerLink::new(config.amqp.clone(), &worker);
        let listener = TcpListener::bind(config.grpc.listen)
            .await
            .with_context(|| {
                format!(
                    "binding the gRPC port (grpc.listen = {})",
                    config.grpc.listen
                )
            })?;
        let grpc_addr = listener.local_addr()?;
        let tls = config.grpc.tls.as_ref().map(GrpcTls::load).transpose()?;
        let receipts_listener = TcpListener::bind(config.receipts.listen)
            .await
            .with_context(|| {
                format!(
                    "binding the receipts port (receipts.listen = {})",
                    config.receipts.listen
                )
            })?;
        let receipts_addr = receipts_listener.local_addr()?;
        let ops_listener = TcpListener::bind(config.ops.listen)
            .await
            .with_context(|| {
                format!("binding the ops port (ops.listen = {})", config.ops.listen)
            })?;
        let ops_addr = ops_listener.local_addr()?;
        Ok(Application {
            config,
            listener,
            grpc_addr,
            receipts_listener,
            receipts_addr,
            ops_listener,
            ops_addr,
            service,
            policy,
            auth,
            tls,
            publisher,
            link,
            link_state,
            provider_receipts,
        })
    }

    /// The address the gRPC API listens on (useful with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The address of the receipts (provider callback) listener.
    pub fn receipts_addr(&self) -> SocketAddr {
        self.receipts_addr
    }

    /// The fraud guard (a simulation waits for its rounds).
    pub fn fraud_guard(&self) -> Arc<crate::delivery::FraudGuard> {
        Arc::clone(self.service.fraud())
    }

    /// The address of the ops listener (health, readiness, metrics).
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// The broker link's state (Up while consuming).
    pub fn link_state(&self) -> watch::Receiver<LinkState> {
        self.link_state.clone()
    }

    /// Runs until `stop` is cancelled, then shuts down in order.
    pub async fn run_until_stopped(self, stop: CancellationToken) -> anyhow::Result<()> {
        let grace = self.config.delivery.shutdown_grace;
        let api_stop = CancellationToken::new();
        tracing::info!(
            grpc = %self.grpc_addr, grpc_tls = self.tls.is_some(), receipts = %self.receipts_addr,
            ops = %self.ops_addr, auth = ?self.config.auth.mode, "otp-gateway serving"
        );
        let ops = tokio::spawn(crate::ops::serve(
            self.ops_listener,
            crate::ops::OpsState {
                service: Arc::clone(&self.service),
                link_state: self.link_state.clone(),
                auth: Arc::clone(&self.auth),
            },
            api_stop.clone(),
        ));
        let api = tokio::spawn(crate::grpc::serve(
            GrpcPort {
                listener: self.listener,
                tls: self.tls,
            },
            Arc::clone(&self.service),
            Arc::clone(&self.policy),
            self.auth,
            self.publisher.clone(),
            self.link_state.clone(),
            api_stop.clone(),
        ));
        let public_url = match self.config.receipts.public_url.as_str() {
            "" => format!("http://{}", self.receipts_addr),
            url => url.to_owned(),
        };
        let twilio_tokens = self
            .config
            .providers
            .iter()
            .filter_map(|(name, provider)| match &provider.kind {
                KindSettings::Twilio(twilio) => {
                    let expected = crate::providers::twilio_callback_url(&public_url, name);
                    match &twilio.status_callback {
                        Some(set) if *set != expected => tracing::warn!(
                            provider = %name, status_callback = %set, verified_at = %expected,
                            "Twilio's status_callback is not the URL the receipts listener verifies signatures against: every genuine callback will be refused (403) and deliveries stay SENT. Leave status_callback unset (it is derived from receipts.public_url) or make them agree"
                        ),
                        Some(_) => {}
                        None if self.config.receipts.public_url.is_empty() => tracing::info!(
                            provider = %name,
                            "Twilio status callbacks are off: set receipts.public_url (the base URL Twilio reaches the receipts listener at) to get delivery receipts"
                        ),
                        None => {}
                    }
                    Some((name.clone(), twilio.auth_token.clone()))
                }
                _ => None,
            })
            .collect();
        let receipts = tokio::spawn(crate::receipts::serve(
            self.receipts_listener,
            ReceiptsState {
                service: Arc::clone(&self.service),
                publisher: self.publisher.clone(),
                twilio_tokens,
                public_url,
                stop: api_stop.clone(),
            },
            self.config.receipts.clone(),
            api_stop.clone(),
        ));
        let forwarder = self.provider_receipts.map(|receipts| {
            tokio::spawn(crate::receipts::forward(
                receipts,
                Arc::clone(&self.service),
                Some(self.publisher.clone()),
                api_stop.clone(),
            ))
        });
        let retention = tokio::spawn(crate::store::purge_old_deliveries(
            Arc::clone(self.service.ledger()),
            self.config.retention.clone(),
            Arc::clone(self.service.clock()),
            api_stop.clone(),
        ));
        // The fraud guard stores its counts and judges ranges every round (and stores the
        // counts once more at the end); the ranges it holds are announced as fraud.suspected.
        let (suspected, mut suspicions) = tokio::sync::mpsc::unbounded_channel();
        let counting = tokio::spawn(Arc::clone(self.service.fraud()).run(
            Arc::clone(self.service.clock()),
            suspected,
            api_stop.clone(),
        ));
        let announcer = self.publisher.clone();
        let announcing = tokio::spawn(async move {
            while let Some(suspicion) = suspicions.recv().await {
                if let Err(error) = announcer.publish_fraud_suspected(&suspicion).await {
                    tracing::warn!(%error, range = %suspicion.range, "fraud.suspected not published");
                }
            }
        });
        let consumer = JobConsumer::new(
            self.service,
            self.publisher,
            self.config.delivery.max_in_flight,
        )
        .with_producers(self.config.amqp.producer_tenants()?);
        let linked = self.link.run(consumer, stop, grace).await;
        api_stop.cancel();
        api.await
            .context("the gRPC server task failed")?
            .context("the gRPC server failed")?;
        receipts
            .await
            .context("the receipts server task failed")?
            .context("the receipts server failed")?;
        if let Some(forwarder) = forwarder {
            forwarder
                .await
                .context("the receipt forwarder task failed")?;
        }
        let _ = retention.await;
        let _ = counting.await;
        let _ = announcing.await;
        ops.await
            .context("the ops server task failed")?
            .context("the ops server failed")?;
        linked?;
        tracing::info!("otp-gateway stopped");
        Ok(())
    }
}
