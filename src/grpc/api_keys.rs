//! `PolicyAdmin`'s API keys: make one (its text is in the answer only; the store keeps its
//! hash), list them, revoke one. A tenant's admin key manages its tenant's keys only; a key
//! for every tenant (admin and status scopes only) needs a global admin key.

use tonic::{Request, Status};

use super::auth::Caller;
use super::policy_admin::PolicyAdminApi;
use super::status::invalid_argument;
use crate::domain::{ApiKey, JobError, KeyText, Scope, check_tenant, normalize_scopes};
use crate::proto::v1;
use crate::proto::{api_key_to_proto, scope_from_proto};

/// The longest label kept.
const MAX_LABEL: usize = 200;

impl PolicyAdminApi {
    pub(super) async fn create_key(
        &self,
        request: Request<v1::CreateApiKeyRequest>,
    ) -> Result<v1::CreateApiKeyResponse, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let tenant = Some(request.tenant.trim().to_owned()).filter(|t| !t.is_empty());
        if let Some(tenant) = &tenant {
            check_tenant("tenant", tenant).map_err(|e| invalid_argument(&e))?;
        }
        let mut scopes = request
            .scopes
            .iter()
            .map(|value| {
                scope_from_proto(*value).ok_or_else(|| {
                    invalid_argument(&JobError::new(
                        "scopes",
                        format!("{value} is not a scope (SEND, READ, ACK, ADMIN, STATUS)"),
                    ))
                })
            })
            .collect::<Result<Vec<Scope>, Status>>()?;
        normalize_scopes(&mut scopes);
        if scopes.is_empty() {
            return Err(invalid_argument(&JobError::new(
                "scopes",
                "name at least one (SEND, READ, ACK, ADMIN, STATUS)",
            )));
        }
        if tenant.is_none()
            && let Some(scope) = scopes
                .iter()
                .find(|s| matches!(s, Scope::Send | Scope::Read | Scope::Ack))
        {
            return Err(invalid_argument(&JobError::new(
                "tenant",
                format!(
                    "is required for a key with the `{scope}` scope (only admin and status keys may act for every tenant)"
                ),
            )));
        }
        if request.label.chars().count() > MAX_LABEL {
            return Err(invalid_argument(&JobError::new(
                "label",
                format!("is longer than {MAX_LABEL} characters"),
            )));
        }
        caller.acts_for(tenant.as_deref())?;
        let text = KeyText::generate();
        let key = ApiKey {
            id: text.id.clone(),
            tenant,
            scopes,
            label: request.label,
            secret_hash: text.secret_hash(),
            created_at: self.clock.now(),
            revoked_at: None,
        };
        self.policy.create_api_key(&key).await?;
        tracing::info!(
            key = %key.id, tenant = key.tenant.as_deref().unwrap_or("*"),
            by = caller.key_id().unwrap_or("the bootstrap key or an unauthenticated operator"),
            "API key created"
        );
        Ok(v1::CreateApiKeyResponse {
            key: Some(api_key_to_proto(&key)),
            secret: text.reveal(),
        })
    }

    pub(super) async fn list_keys(
        &self,
        request: Request<v1::ListApiKeysRequest>,
    ) -> Result<v1::ListApiKeysResponse, Status> {
        let caller = Caller::of(&request);
        let tenant = caller.listing(&request.into_inner().tenant)?;
        let keys = self.policy.list_api_keys(tenant.as_deref()).await?;
        Ok(v1::ListApiKeysResponse {
            keys: keys.iter().map(api_key_to_proto).collect(),
        })
    }

    pub(super) async fn revoke_key(
        &self,
        request: Request<v1::RevokeApiKeyRequest>,
    ) -> Result<v1::RevokeApiKeyResponse, Status> {
        let caller = Caller::of(&request);
        let id = request.into_inner().id.trim().to_ascii_lowercase();
        let not_found = || Status::not_found(format!("no valid API key `{id}`"));
        let key = self.policy.api_key(&id).await?.ok_or_else(not_found)?;
        if !caller.owns(key.tenant.as_deref()) {
            return Err(not_found());
        }
        if !self.policy.revoke_api_key(&id, self.clock.now()).await? {
            return Err(not_found());
        }
        self.auth.forget(&id);
        tracing::info!(key = %id, "API key revoked");
        Ok(v1::RevokeApiKeyResponse {})
    }
}
