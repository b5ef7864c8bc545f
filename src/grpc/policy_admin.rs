//! `otpgateway.v1.PolicyAdmin`: block-list entries, rate limits and quiet hours (add or set,
//! remove, list), and API keys (`api_keys`). A tenant's admin key sees and changes only its
//! tenant's rows (another tenant's id is "not found"); rows for every tenant need a global key.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::{Authenticator, Caller};
use super::status::invalid_argument;
use crate::delivery::DeliveryService;
use crate::domain::{Clock, JobError, check_tenant};
use crate::policy::{
    BlockKind, BlockSource, NewBlockEntry, QuietAction, QuietHoursRule, RateLimitRule, RateScope,
    parse_time_of_day, parse_weekday, weekday_name,
};
use crate::proto::v1::policy_admin_server::PolicyAdmin;
use crate::proto::v1::{
    self, AddBlockEntryRequest, AddBlockEntryResponse, ListBlockEntriesRequest,
};
use crate::proto::v1::{
    ListBlockEntriesResponse, RemoveBlockEntryRequest, RemoveBlockEntryResponse,
};
use crate::proto::v1::{ListQuietHoursRequest, ListQuietHoursResponse, RemoveQuietHoursRequest};
use crate::proto::v1::{ListRateLimitsRequest, ListRateLimitsResponse, RemoveRateLimitRequest};
use crate::proto::v1::{RemoveQuietHoursResponse, SetQuietHoursRequest};
use crate::proto::v1::{RemoveRateLimitResponse, SetRateLimitRequest};
use crate::proto::{
    channel_from_proto, channel_to_proto, duration_to_proto, entry_to_proto, timestamp_from_proto,
};
use crate::store::{PolicyStore, StoreError};

/// The PolicyAdmin service.
#[derive(Debug, Clone)]
pub struct PolicyAdminApi {
    pub(super) policy: Arc<dyn PolicyStore>,
    pub(super) clock: Arc<dyn Clock>,
    /// Told of revoked keys, so they stop opening anything here at once.
    pub(super) auth: Arc<Authenticator>,
    /// The deliveries, for `EraseAccount`.
    pub(super) service: Arc<DeliveryService>,
}

impl PolicyAdminApi {
    /// The admin API over `policy`.
    pub fn new(
        policy: Arc<dyn PolicyStore>,
        service: Arc<DeliveryService>,
        auth: Arc<Authenticator>,
    ) -> Self {
        PolicyAdminApi {
            policy,
            clock: Arc::clone(service.clock()),
            auth,
            service,
        }
    }
}

/// NOT_FOUND (the same answer as for no such row) unless `caller` may change row `id`, one of
/// the rows `list` reads for the caller's tenant, whose id and tenant `row` gives.
async fn ensure_owned<T>(
    caller: &Caller,
    id: i64,
    what: &str,
    list: impl Future<Output = Result<Vec<T>, StoreError>>,
    row: fn(&T) -> (i64, Option<&str>),
) -> Result<(), Status> {
    if caller.tenant().is_none() {
        return Ok(());
    }
    let rows = list.await?;
    match rows.iter().map(row).find(|(found, _)| *found == id) {
        Some((_, tenant)) if caller.owns(tenant) => Ok(()),
        _ => Err(Status::not_found(format!("no {what} #{id}"))),
    }
}

fn kind_from_proto(value: i32) -> Option<BlockKind> {
    match v1::BlockKind::try_from(value).ok()? {
        v1::BlockKind::Number => Some(BlockKind::Number),
        v1::BlockKind::Prefix => Some(BlockKind::Prefix),
        v1::BlockKind::DeviceToken => Some(BlockKind::DeviceToken),
        v1::BlockKind::Account => Some(BlockKind::Account),
        v1::BlockKind::Unspecified => None,
    }
}

fn scope_from_proto(value: i32) -> Option<RateScope> {
    match v1::RateScope::try_from(value).ok()? {
        v1::RateScope::Recipient => Some(RateScope::Recipient),
        v1::RateScope::Account => Some(RateScope::Account),
        v1::RateScope::Tenant => Some(RateScope::Tenant),
        v1::RateScope::Prefix => Some(RateScope::Prefix),
        v1::RateScope::Unspecified => None,
    }
}

fn rule_to_proto(rule: &RateLimitRule) -> v1::RateLimit {
    let scope = match rule.scope {
        RateScope::Recipient => v1::RateScope::Recipient,
        RateScope::Account => v1::RateScope::Account,
        RateScope::Tenant => v1::RateScope::Tenant,
        RateScope::Prefix => v1::RateScope::Prefix,
    };
    v1::RateLimit {
        id: rule.id,
        tenant: rule.tenant.clone().unwrap_or_default(),
        scope: scope as i32,
        prefix: rule.prefix.clone(),
        limit: rule.limit,
        window: Some(duration_to_proto(rule.window)),
    }
}

fn quiet_to_proto(rule: &QuietHoursRule) -> v1::QuietHours {
    let action = match rule.action {
        QuietAction::Defer => v1::QuietAction::Defer,
        QuietAction::Suppress => v1::QuietAction::Suppress,
        QuietAction::AllowUserInitiated => v1::QuietAction::AllowUserInitiated,
    };
    v1::QuietHours {
        id: rule.id,
        tenant: rule.tenant.clone().unwrap_or_default(),
        account: rule.account.clone().unwrap_or_default(),
        channels: rule
            .channels
            .iter()
            .map(|c| channel_to_proto(*c) as i32)
            .collect(),
        start: rule.start.strftime("%H:%M").to_string(),
        end: rule.end.strftime("%H:%M").to_string(),
        days: rule
            .days
            .iter()
            .map(|d| weekday_name(*d).to_owned())
            .collect(),
        action: action as i32,
        default_zone: rule.default_zone.clone(),
    }
}

/// A quiet-hours rule from its protobuf form, naming the field that is wrong.
fn quiet_from_proto(rule: v1::QuietHours) -> Result<QuietHoursRule, JobError> {
    let time = |field: &str, text: &str| {
        parse_time_of_day(text)
            .ok_or_else(|| JobError::new(field, format!("`{text}` is not a local time HH:MM")))
    };
    let action = match v1::QuietAction::try_from(rule.action) {
        Ok(v1::QuietAction::Defer) => QuietAction::Defer,
        Ok(v1::QuietAction::Suppress) => QuietAction::Suppress,
        Ok(v1::QuietAction::AllowUserInitiated) => QuietAction::AllowUserInitiated,
        _ => {
            return Err(JobError::new(
                "action",
                "must be DEFER, SUPPRESS or ALLOW_USER_INITIATED",
            ));
        }
    };
    let quiet = QuietHoursRule {
        id: rule.id,
        tenant: Some(rule.tenant).filter(|t| !t.is_empty()),
        account: Some(rule.account).filter(|a| !a.is_empty()),
        channels: rule
            .channels
            .iter()
            .map(|c| {
                channel_from_proto(*c)
                    .ok_or_else(|| JobError::new("channels", format!("unknown channel {c}")))
            })
            .collect::<Result<_, _>>()?,
        start: time("start", &rule.start)?,
        end: time("end", &rule.end)?,
        days: rule
            .days
            .iter()
            .map(|d| {
                parse_weekday(d)
                    .ok_or_else(|| JobError::new("days", format!("`{d}` is not a day (mon … sun)")))
            })
            .collect::<Result<_, _>>()?,
        action,
        default_zone: rule.default_zone,
    };
    quiet.validate()?;
    Ok(quiet)
}

#[tonic::async_trait]
impl PolicyAdmin for PolicyAdminApi {
    async fn set_quiet_hours(
        &self,
        request: Request<SetQuietHoursRequest>,
    ) -> Result<Response<v1::QuietHours>, Status> {
        let caller = Caller::of(&request);
        let rule = request
            .into_inner()
            .rule
            .ok_or_else(|| invalid_argument(&JobError::new("rule", "is missing")))?;
        let rule = quiet_from_proto(rule).map_err(|e| invalid_argument(&e))?;
        caller.acts_for(rule.tenant.as_deref())?;
        if rule.id != 0 {
            let list = self.policy.list_quiet_hours(caller.tenant());
            ensure_owned(&caller, rule.id, "quiet-hours rule", list, |r| {
                (r.id, r.tenant.as_deref())
            })
            .await?;
        }
        let stored = self.policy.set_quiet_hours(&rule).await?;
        tracing::info!(rule = stored.id, action = %stored.action, "quiet hours set");
        Ok(Response::new(quiet_to_proto(&stored)))
    }

    async fn remove_quiet_hours(
        &self,
        request: Request<RemoveQuietHoursRequest>,
    ) -> Result<Response<RemoveQuietHoursResponse>, Status> {
        let caller = Caller::of(&request);
        let id = request.into_inner().id;
        let list = self.policy.list_quiet_hours(caller.tenant());
        ensure_owned(&caller, id, "quiet-hours rule", list, |r| {
            (r.id, r.tenant.as_deref())
        })
        .await?;
        if !self.policy.remove_quiet_hours(id).await? {
            return Err(Status::not_found(format!("no quiet-hours rule #{id}")));
        }
        Ok(Response::new(RemoveQuietHoursResponse {}))
    }

    async fn list_quiet_hours(
        &self,
        request: Request<ListQuietHoursRequest>,
    ) -> Result<Response<ListQuietHoursResponse>, Status> {
        let caller = Caller::of(&request);
        let tenant = caller.listing(&request.into_inner().tenant)?;
        let rules = self.policy.list_quiet_hours(tenant.as_deref()).await?;
        Ok(Response::new(ListQuietHoursResponse {
            rules: rules.iter().map(quiet_to_proto).collect(),
        }))
    }

    async fn set_rate_limit(
        &self,
        request: Request<SetRateLimitRequest>,
    ) -> Result<Response<v1::RateLimit>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let scope = scope_from_proto(request.scope).ok_or_else(|| {
            invalid_argument(&JobError::new(
                "scope",
                "must be RECIPIENT, ACCOUNT, TENANT or PREFIX",
            ))
        })?;
        let window = request
            .window
            .and_then(|w| std::time::Duration::try_from(w).ok())
            .ok_or_else(|| {
                invalid_argument(&JobError::new("window", "is required and must be positive"))
            })?;
        let rule = RateLimitRule {
            id: 0,
            tenant: Some(request.tenant).filter(|t| !t.is_empty()),
            scope,
            prefix: request.prefix.trim().to_owned(),
            limit: request.limit,
            window,
        };
        rule.validate().map_err(|e| invalid_argument(&e))?;
        caller.acts_for(rule.tenant.as_deref())?;
        let stored = self.policy.set_rate_limit(&rule).await?;
        tracing::info!(rule = stored.id, scope = %stored.scope, limit = stored.limit, "rate limit set");
        Ok(Response::new(rule_to_proto(&stored)))
    }

    async fn remove_rate_limit(
        &self,
        request: Request<RemoveRateLimitRequest>,
    ) -> Result<Response<RemoveRateLimitResponse>, Status> {
        let caller = Caller::of(&request);
        let id = request.into_inner().id;
        let list = self.policy.list_rate_limits(caller.tenant());
        ensure_owned(&caller, id, "rate limit", list, |r| {
            (r.id, r.tenant.as_deref())
        })
        .await?;
        if !self.policy.remove_rate_limit(id).await? {
            return Err(Status::not_found(format!("no rate limit #{id}")));
        }
        Ok(Response::new(RemoveRateLimitResponse {}))
    }

    async fn list_rate_limits(
        &self,
        request: Request<ListRateLimitsRequest>,
    ) -> Result<Response<ListRateLimitsResponse>, Status> {
        let caller = Caller::of(&request);
        let tenant = caller.listing(&request.into_inner().tenant)?;
        let rules = self.policy.list_rate_limits(tenant.as_deref()).await?;
        Ok(Response::new(ListRateLimitsResponse {
            limits: rules.iter().map(rule_to_proto).collect(),
        }))
    }

    async fn add_block_entry(
        &self,
        request: Request<AddBlockEntryRequest>,
    ) -> Result<Response<AddBlockEntryResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let kind = kind_from_proto(request.kind).ok_or_else(|| {
            invalid_argument(&JobError::new(
                "kind",
                "must be NUMBER, PREFIX, DEVICE_TOKEN or ACCOUNT",
            ))
        })?;
        let source = match v1::BlockSource::try_from(request.source) {
            Ok(v1::BlockSource::Unspecified | v1::BlockSource::Admin) => BlockSource::Admin,
            Ok(v1::BlockSource::OptOut) => BlockSource::OptOut,
            Ok(v1::BlockSource::ProviderFeedback) => BlockSource::ProviderFeedback,
            Err(_) => {
                return Err(invalid_argument(&JobError::new(
                    "source",
                    "is not a known source",
                )));
            }
        };
        let expires_at = match request.expires_at.as_ref() {
            Some(at) => Some(timestamp_from_proto(at).ok_or_else(|| {
                invalid_argument(&JobError::new("expires_at", "is out of range"))
            })?),
            None => None,
        };
        let entry = NewBlockEntry {
            tenant: Some(request.tenant).filter(|t| !t.is_empty()),
            kind,
            pattern: request.pattern.trim().to_owned(),
            source,
            note: request.note,
            expires_at,
        };
        let now = self.clock.now();
        entry.validate(now).map_err(|e| invalid_argument(&e))?;
        caller.acts_for(entry.tenant.as_deref())?;
        let (stored, created) = self.policy.add_block(&entry, now).await?;
        tracing::info!(entry = stored.id, kind = %stored.kind, created, "block-list entry added by an operator");
        Ok(Response::new(AddBlockEntryResponse {
            entry: Some(entry_to_proto(&stored)),
            created,
        }))
    }

    async fn remove_block_entry(
        &self,
        request: Request<RemoveBlockEntryRequest>,
    ) -> Result<Response<RemoveBlockEntryResponse>, Status> {
        let caller = Caller::of(&request);
        let id = request.into_inner().id;
        let list = self.policy.list_blocks(caller.tenant());
        ensure_owned(&caller, id, "block-list entry", list, |e| {
            (e.id, e.tenant.as_deref())
        })
        .await?;
        if !self.policy.remove_block(id).await? {
            return Err(Status::not_found(format!("no block-list entry #{id}")));
        }
        tracing::info!(entry = id, "block-list entry removed");
        Ok(Response::new(RemoveBlockEntryResponse {}))
    }

    async fn list_block_entries(
        &self,
        request: Request<ListBlockEntriesRequest>,
    ) -> Result<Response<ListBlockEntriesResponse>, Status> {
        let caller = Caller::of(&request);
        let tenant = caller.listing(&request.into_inner().tenant)?;
        let entries = self.policy.list_blocks(tenant.as_deref()).await?;
        Ok(Response::new(ListBlockEntriesResponse {
            entries: entries.iter().map(entry_to_proto).collect(),
        }))
    }

    async fn create_api_key(
        &self,
        request: Request<v1::CreateApiKeyRequest>,
    ) -> Result<Response<v1::CreateApiKeyResponse>, Status> {
        self.create_key(request).await.map(Response::new)
    }

    async fn list_api_keys(
        &self,
        request: Request<v1::ListApiKeysRequest>,
    ) -> Result<Response<v1::ListApiKeysResponse>, Status> {
        self.list_keys(request).await.map(Response::new)
    }

    async fn revoke_api_key(
        &self,
        request: Request<v1::RevokeApiKeyRequest>,
    ) -> Result<Response<v1::RevokeApiKeyResponse>, Status> {
        self.revoke_key(request).await.map(Response::new)
    }

    async fn erase_account(
        &self,
        request: Request<v1::EraseAccountRequest>,
    ) -> Result<Response<v1::EraseAccountResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let (tenant, account) = (request.tenant.trim(), request.account.trim());
        check_tenant("tenant", tenant).map_err(|e| invalid_argument(&e))?;
        if account.is_empty() {
            return Err(invalid_argument(&JobError::new("account", "is required")));
        }
        caller.acts_for(Some(tenant))?;
        let deliveries_removed = self.service.ledger().erase_account(tenant, account).await?;
        let (block_entries_removed, opt_outs_kept) =
            self.policy.erase_account_blocks(tenant, account).await?;
        tracing::info!(
            tenant,
            deliveries_removed,
            block_entries_removed,
            opt_outs_kept,
            by = caller
                .key_id()
                .unwrap_or("the bootstrap key or an unauthenticated operator"),
            "account erased"
        );
        Ok(Response::new(v1::EraseAccountResponse {
            deliveries_removed,
            block_entries_removed,
            opt_outs_kept,
        }))
    }

    async fn list_quarantines(
        &self,
        request: Request<v1::ListQuarantinesRequest>,
    ) -> Result<Response<v1::ListQuarantinesResponse>, Status> {
        self.list_quarantines(request).await.map(Response::new)
    }

    async fn lift_quarantine(
        &self,
        request: Request<v1::LiftQuarantineRequest>,
    ) -> Result<Response<v1::Quarantine>, Status> {
        self.lift_quarantine(request).await.map(Response::new)
    }

    async fn pin_quarantine(
        &self,
        request: Request<v1::PinQuarantineRequest>,
    ) -> Result<Response<v1::Quarantine>, Status> {
        self.pin_quarantine(request).await.map(Response::new)
    }
}
