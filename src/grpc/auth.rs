//! Who is calling: every gRPC call but health checks and reflection presents an API key
//! (`authorization: Bearer otpk_…`); the layer here checks it against the store (or the
//! bootstrap admin key), checks the method's scope, and hands the services a [`Caller`] that
//! says which tenant the key acts in. A missing, malformed, unknown, wrong or revoked key is
//! UNAUTHENTICATED with one message for all; a key without the method's scope is
//! PERMISSION_DENIED. Keys read from the store are kept for [`KEY_TTL`], so a key revoked at
//! another replica stops opening anything within that time (at once at the replica that
//! revoked it).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http;
use subtle::ConstantTimeEq;
use tonic::Status;

use crate::config::{AuthConfig, AuthMode, SecretString};
use crate::domain::{ApiKey, DeliveryId, KeyText, Scope};
use crate::store::PolicyStore;

/// How long a key read from the store is trusted before it is read again.
pub const KEY_TTL: Duration = Duration::from_secs(1);

/// Keys kept in memory at most (beyond, the cache starts again empty).
const CACHED_KEYS: usize = 10_000;

/// The one answer to a call without a valid key: it does not say which part was wrong.
const NOT_AUTHENTICATED: &str =
    "a valid API key is required (metadata `authorization: Bearer otpk_…`)";

/// Services open to anyone who reaches the port.
const OPEN_SERVICES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Who made a call: the tenant the key acts in and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `None`: every tenant (a global key, or no authentication).
    tenant: Option<String>,
    /// The key's id, for logs (`None` without authentication or for the bootstrap key).
    key: Option<String>,
}

impl Caller {
    /// No authentication (`auth.mode = "none"`): everything, for every tenant.
    pub(crate) fn unrestricted() -> Caller {
        Caller {
            tenant: None,
            key: None,
        }
    }

    /// Whether the caller acts for every tenant (a global key, the bootstrap key, or no
    /// authentication).
    pub fn is_global(&self) -> bool {
        self.tenant.is_none()
    }

    /// The caller a service sees for `request`. A request that did not pass the layer has
    /// none, and may do nothing inside any tenant.
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(|| Caller {
                tenant: Some(String::new()),
                key: None,
            })
    }

    /// The tenant the key is limited to (`None`: every tenant).
    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// Whether the caller sees `tenant`'s data.
    pub fn sees(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|own| own == tenant)
    }

    /// Whether the caller sees the delivery `id` (another tenant's is "not found").
    pub fn sees_delivery(&self, id: &DeliveryId) -> bool {
        self.sees(&id.tenant)
    }

    /// PERMISSION_DENIED unless the caller acts for `tenant` (`None`: every tenant, which
    /// only a global key does).
    pub fn acts_for(&self, tenant: Option<&str>) -> Result<(), Status> {
        match (&self.tenant, tenant) {
            (None, _) => Ok(()),
            (Some(own), Some(tenant)) if own == tenant => Ok(()),
            (Some(own), Some(tenant)) => Err(Status::permission_denied(format!(
                "this API key acts for tenant `{own}` only, not `{tenant}`"
            ))),
            (Some(own), None) => Err(Status::permission_denied(format!(
                "this API key acts for tenant `{own}` only: name the tenant (a rule or entry for every tenant needs a global key)"
            ))),
        }
    }

    /// The tenant a listing is limited to: the caller's own (when the request names none or
    /// the same), or what the request names for a global key.
    pub fn listing(&self, requested: &str) -> Result<Option<String>, Status> {
        let requested = Some(requested).filter(|t| !t.is_empty());
        match (&self.tenant, requested) {
            (None, requested) => Ok(requested.map(str::to_owned)),
            (Some(own), None) => Ok(Some(own.clone())),
            (Some(_), Some(tenant)) => self.acts_for(Some(tenant)).map(|()| Some(tenant.into())),
        }
    }

    /// Whether a stored row of `tenant` (`None`: every tenant's) may be changed by the caller:
    /// a tenant's key changes only its tenant's rows.
    pub fn owns(&self, tenant: Option<&str>) -> bool {
        match &self.tenant {
            None => true,
            Some(own) => tenant == Some(own.as_str()),
        }
    }

    /// The key's id, for logs.
    pub fn key_id(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

/// The scopes a method takes, any one of them (`None`: a method this gateway does not have:
/// any valid key reaches it, and it answers UNIMPLEMENTED).
fn scope_of(path: &str) -> Option<&'static [Scope]> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    match (service, method) {
        ("otpgateway.v1.CodeDelivery", "SendCode" | "Explain") => Some(&[Scope::Send]),
        (
            "otpgateway.v1.CodeDelivery",
            "GetDelivery" | "WatchDelivery" | "ListDeliveries" | "DiagnoseAccount",
        ) => Some(&[Scope::Read]),
        ("otpgateway.v1.CodeDelivery", "AcknowledgeDelivery") => Some(&[Scope::Ack]),
        // The service that sent the code or the app's backend that checks it.
        ("otpgateway.v1.CodeDelivery", "ReportVerification") => Some(&[Scope::Send, Scope::Ack]),
        ("otpgateway.v1.PolicyAdmin", _) => Some(&[Scope::Admin]),
        ("otpgateway.v1.Providers", _) => Some(&[Scope::Status]),
        _ => None,
    }
}

/// Checks API keys for the gRPC layer.
#[derive(Debug)]
pub struct Authenticator {
    mode: AuthMode,
    /// SHA-256 of the bootstrap admin key.
    bootstrap: Option<[u8; 32]>,
    policy: Arc<dyn PolicyStore>,
    /// Keys read lately, by id (`None`: there is no such key), with when they were read.
    cache: Mutex<HashMap<String, (Instant, Option<ApiKey>)>>,
}

fn sha256(text: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

impl Authenticator {
    /// Checks keys as `settings` say, against the keys in `policy`.
    pub fn new(
        settings: &AuthConfig,
        bootstrap: Option<SecretString>,
        policy: Arc<dyn PolicyStore>,
    ) -> Self {
        Authenticator {
            mode: settings.mode,
            bootstrap: bootstrap.map(|key| sha256(key.expose())),
            policy,
            cache: Mutex::default(),
        }
    }

    /// Whether calls need keys.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Forgets what is known of key `id` (after it was revoked here).
    pub fn forget(&self, id: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// The caller of a request to `path` with `headers`, or the status to answer with.
    /// `Ok(None)`: an open service (health, reflection).
    pub async fn admit(
        &self,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Result<Option<Caller>, Status> {
        if OPEN_SERVICES.iter().any(|open| path.starts_with(open)) {
            return Ok(None);
        }
        if self.mode == AuthMode::None {
            return Ok(Some(Caller::unrestricted()));
        }
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                let (scheme, token) = value.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or_else(|| Status::unauthenticated(NOT_AUTHENTICATED))?;
        let needed = scope_of(path);
        if let Some(bootstrap) = &self.bootstrap
            && bool::from(sha256(presented).ct_eq(bootstrap))
        {
            // The bootstrap key administers (and reads the provider status): it makes keys.
            return match needed {
                Some(scopes)
                    if !scopes
                        .iter()
                        .any(|s| matches!(s, Scope::Admin | Scope::Status)) =>
                {
                    Err(missing_scope(path, scopes))
                }
                _ => Ok(Some(Caller::unrestricted())),
            };
        }
        let text =
            KeyText::parse(presented).ok_or_else(|| Status::unauthenticated(NOT_AUTHENTICATED))?;
        let key = self
            .key(&text.id)
            .await?
            .filter(|key| key.revoked_at.is_none() && key.opens_with(&text.secret))
            .ok_or_else(|| Status::unauthenticated(NOT_AUTHENTICATED))?;
        if let Some(scopes) = needed
            && !scopes.iter().any(|scope| key.allows(*scope))
        {
            return Err(missing_scope(path, scopes));
        }
        Ok(Some(Caller {
            tenant: key.tenant,
            key: Some(key.id),
        }))
    }

    /// The stored key `id`, from memory when read within [`KEY_TTL`].
    async fn key(&self, id: &str) -> Result<Option<ApiKey>, Status> {
        if let Some((at, key)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(id)
            && at.elapsed() < KEY_TTL
        {
            return Ok(key.clone());
        }
        let key = self.policy.api_key(id).await.map_err(|error| {
            tracing::warn!(%error, "an API key could not be read");
            Status::unavailable("the API key cannot be checked now: try again")
        })?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHED_KEYS {
            cache.clear();
        }
        cache.insert(id.to_owned(), (Instant::now(), key.clone()));
        Ok(key)
    }
}

fn missing_scope(path: &str, scopes: &[Scope]) -> Status {
    let method = path.trim_start_matches('/');
    let names: Vec<String> = scopes.iter().map(|s| format!("`{s}`")).collect();
    Status::permission_denied(format!(
        "this API key may not call {method}: that needs the {} scope",
        names.join(" or the ")
    ))
}

/// The tower layer that admits calls (see the module's documentation).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
}

impl AuthLayer {
    /// A layer admitting calls through `auth`.
    pub fn new(auth: Arc<Authenticator>) -> Self {
        AuthLayer { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            auth: Arc::clone(&self.auth),
        }
    }
}

/// A service that answers only admitted calls (see [`AuthLayer`]).
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

type Admitted<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AuthService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Admitted<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        // The clone is not ready: keep the one that is (tower's convention).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = Arc::clone(&self.auth);
        Box::pin(async move {
            match auth.admit(request.uri().path(), request.headers()).await {
                Ok(caller) => {
                    if let Some(caller) = caller {
                        request.extensions_mut().insert(caller);
                    }
                    inner.call(request).await
                }
                Err(status) => {
                    // Debug only: a flood of bad keys must not flood the log.
                    if status.code() == tonic::Code::Unauthenticated {
                        tracing::debug!(
                            method = request.uri().path(),
                            "call refused: no valid API key"
                        );
                    }
                    Ok(status.into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_method_needs_its_scope() {
        let cases = [
            (
                "/otpgateway.v1.CodeDelivery/SendCode",
                Some(&[Scope::Send][..]),
            ),
            (
                "/otpgateway.v1.CodeDelivery/Explain",
                Some(&[Scope::Send][..]),
            ),
            (
                "/otpgateway.v1.CodeDelivery/GetDelivery",
                Some(&[Scope::Read][..]),
            ),
            (
                "/otpgateway.v1.CodeDelivery/WatchDelivery",
                Some(&[Scope::Read][..]),
            ),
            (
                "/otpgateway.v1.CodeDelivery/ListDeliveries",
                Some(&[Scope::Read][..]),
            ),
            (
                "/otpgateway.v1.CodeDelivery/DiagnoseAccount",
                Some(&[Scope::Read][..]),
            ),
            (
                "/otpgateway.v1.CodeDelivery/AcknowledgeDelivery",
                Some(&[Scope::Ack][..]),
            ),
            (
                "/otpgateway.v1.PolicyAdmin/CreateApiKey",
                Some(&[Scope::Admin][..]),
            ),
            (
                "/otpgateway.v1.Providers/ListProviders",
                Some(&[Scope::Status][..]),
            ),
            (
                "/otpgateway.v1.CodeDelivery/ReportVerification",
                Some(&[Scope::Send, Scope::Ack][..]),
            ),
            ("/otpgateway.v1.Nothing/Else", None),
        ];
        for (path, scope) in cases {
            assert_eq!(scope_of(path), scope, "{path}");
        }
    }

    #[test]
    fn a_tenant_key_acts_lists_and_changes_only_inside_its_tenant() {
        let acme = Caller {
            tenant: Some("acme".into()),
            key: Some("k".into()),
        };
        assert!(acme.acts_for(Some("acme")).is_ok());
        let denied = acme.acts_for(Some("globex")).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(acme.acts_for(None).is_err());
        assert_eq!(acme.listing("").unwrap().as_deref(), Some("acme"));
        assert!(acme.listing("globex").is_err());
        assert!(acme.owns(Some("acme")) && !acme.owns(None) && !acme.owns(Some("globex")));
        let global = Caller::unrestricted();
        assert!(global.acts_for(None).is_ok() && global.owns(Some("globex")));
        assert_eq!(global.listing("").unwrap(), None);
        // A request that did not pass the layer may do nothing inside a tenant.
        let stray = Caller::of(&tonic::Request::new(()));
        assert!(!stray.sees("acme") && stray.acts_for(Some("acme")).is_err());
    }
}
