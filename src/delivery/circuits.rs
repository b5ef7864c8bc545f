//! The breaker registry: one circuit per provider and one per provider × route, admission
//! through both, and the health snapshot the status page shows.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::breaker::{Admission, BreakerSnapshot, CallResult, CircuitBreaker, CircuitState};
use super::engine::Dispatcher;
use crate::domain::{Channel, RetryClass};
use crate::providers::{ProviderAccept, ProviderEntry, ProviderError};

/// The route key of a channel's default route (prefix routes use their prefix).
pub(super) const DEFAULT_ROUTE: &str = "*";

/// The state of one provider as the status page shows it.
#[derive(Debug, Clone)]
pub struct ProviderHealth {
    /// Configured name.
    pub name: String,
    /// Adapter kind.
    pub kind: &'static str,
    /// The provider-wide circuit.
    pub circuit: BreakerSnapshot,
    /// Circuits of its routes, by route key (`*` or a prefix).
    pub routes: Vec<(String, Channel, BreakerSnapshot)>,
}

/// Circuit breakers per provider and per provider × route.
#[derive(Debug)]
pub(super) struct Breakers {
    pub(super) providers: BTreeMap<String, Arc<CircuitBreaker>>,
    /// By (provider, channel, route key); created on first use. The lock is never held
    /// across an await.
    pub(super) routes: Mutex<BTreeMap<(String, Channel, String), Arc<CircuitBreaker>>>,
}

impl Dispatcher {
    pub(super) fn route_breaker(
        &self,
        entry: &ProviderEntry,
        channel: Channel,
        route: &str,
    ) -> Arc<CircuitBreaker> {
        let mut routes = self
            .breakers
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Arc::clone(
            routes
                .entry((entry.name().to_owned(), channel, route.to_owned()))
                .or_insert_with(|| Arc::new(CircuitBreaker::new(&entry.breaker))),
        )
    }

    /// The status page: every provider's circuit and recent figures, and its routes'.
    pub fn provider_health(&self) -> Vec<ProviderHealth> {
        let now = Instant::now();
        let routes = self
            .breakers
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.providers
            .entries()
            .map(|entry| ProviderHealth {
                name: entry.name().to_owned(),
                kind: entry.kind,
                circuit: self.breakers.providers[entry.name()].snapshot(now),
                routes: routes
                    .iter()
                    .filter(|((name, _, _), _)| name == entry.name())
                    .map(|((_, channel, route), breaker)| {
                        (route.clone(), *channel, breaker.snapshot(now))
                    })
                    .collect(),
            })
            .collect()
    }

    /// The circuit a call through `entry` on this route would meet (the worse of the
    /// provider's and the route's).
    pub(crate) fn circuit_of(
        &self,
        entry: &ProviderEntry,
        channel: Channel,
        route: &str,
        now: Instant,
    ) -> CircuitState {
        let provider = self.breakers.providers[entry.name()].snapshot(now).state;
        let route = self
            .route_breaker(entry, channel, route)
            .snapshot(now)
            .state;
        match (provider, route) {
            (CircuitState::Open, _) | (_, CircuitState::Open) => CircuitState::Open,
            (CircuitState::HalfOpen, _) | (_, CircuitState::HalfOpen) => CircuitState::HalfOpen,
            _ => CircuitState::Closed,
        }
    }

    /// Records a call's result on the provider's circuit and the route's, saying when one
    /// opened. A refusal that is about the recipient counts as a working provider.
    pub(super) fn record_call(
        &self,
        entry: &ProviderEntry,
        route_breaker: &CircuitBreaker,
        channel: Channel,
        route_key: &str,
        result: &Result<ProviderAccept, ProviderError>,
        latency: Duration,
    ) {
        let name = entry.name();
        let verdict = match result {
            Err(error) if error.class != RetryClass::PermanentForTarget => CallResult::Failure,
            _ => CallResult::Success,
        };
        let message = result.as_ref().err().map(ToString::to_string);
        let now = Instant::now();
        if self.breakers.providers[name].record(now, verdict, latency, message.as_deref()) {
            tracing::warn!(
                provider = name,
                error = message.as_deref(),
                "circuit opened for the provider as a whole (every route)"
            );
        }
        if route_breaker.record(now, verdict, latency, message.as_deref()) {
            tracing::warn!(
                provider = name,
                channel = %channel,
                route = route_key,
                error = message.as_deref(),
                "circuit opened for the provider on this route"
            );
        }
    }

    /// Admits a call through both the provider's and the route's breaker.
    pub(super) fn admit(provider: &CircuitBreaker, route: &CircuitBreaker, now: Instant) -> bool {
        match provider.admit(now) {
            Admission::Rejected => false,
            granted => match route.admit(now) {
                Admission::Rejected => {
                    if granted == Admission::Probe {
                        provider.release_probe();
                    }
                    false
                }
                _ => true,
            },
        }
    }
}
