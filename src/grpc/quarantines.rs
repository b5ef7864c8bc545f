//! `PolicyAdmin`'s fraud-guard quarantines: list them, lift a hold, pin a range (held until
//! lifted). A tenant's admin key sees and changes its own tenant's only.

use tonic::{Request, Status};

use super::auth::Caller;
use super::policy_admin::PolicyAdminApi;
use super::status::invalid_argument;
use crate::domain::{JobError, check_tenant};
use crate::proto::{quarantine_to_proto, v1};

/// The longest note kept.
const MAX_NOTE: usize = 500;

impl PolicyAdminApi {
    pub(super) async fn list_quarantines(
        &self,
        request: Request<v1::ListQuarantinesRequest>,
    ) -> Result<v1::ListQuarantinesResponse, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let tenant = Some(request.tenant.trim()).filter(|t| !t.is_empty());
        if let Some(tenant) = tenant {
            check_tenant("tenant", tenant).map_err(|e| invalid_argument(&e))?;
        }
        // A tenant's key lists its own tenant's, named or not.
        let tenant = match (tenant, caller.tenant()) {
            (None, Some(own)) => Some(own.to_owned()),
            (tenant, _) => tenant.map(str::to_owned),
        };
        caller.acts_for(tenant.as_deref())?;
        let guard = self.service.fraud();
        let now = self.clock.now();
        let quarantines = guard
            .list(tenant.as_deref())
            .await?
            .iter()
            .filter(|q| !request.in_force_only || q.in_force(now))
            .map(|q| quarantine_to_proto(q, q.holds(guard.settings().mode(&q.tenant), now)))
            .collect();
        Ok(v1::ListQuarantinesResponse { quarantines })
    }

    pub(super) async fn lift_quarantine(
        &self,
        request: Request<v1::LiftQuarantineRequest>,
    ) -> Result<v1::Quarantine, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let (tenant, range, note) = self.quarantine_request(
            &caller,
            "lifted",
            &request.tenant,
            &request.range,
            &request.note,
        )?;
        let guard = self.service.fraud();
        let lifted = guard
            .lift(&tenant, &range, &note, self.clock.now())
            .await?
            .ok_or_else(|| {
                Status::not_found(format!("range {range} of tenant {tenant} is not held"))
            })?;
        tracing::info!(tenant, range, note, "fraud guard: hold lifted");
        Ok(quarantine_to_proto(&lifted, false))
    }

    pub(super) async fn pin_quarantine(
        &self,
        request: Request<v1::PinQuarantineRequest>,
    ) -> Result<v1::Quarantine, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let (tenant, range, note) = self.quarantine_request(
            &caller,
            "pinned",
            &request.tenant,
            &request.range,
            &request.note,
        )?;
        let pinned = self
            .service
            .fraud()
            .pin(&tenant, &range, &note, self.clock.now())
            .await?;
        tracing::info!(tenant, range, note, "fraud guard: range pinned");
        Ok(quarantine_to_proto(&pinned, true))
    }

    /// The checked tenant and range of a lift or pin, and its note as kept ("lifted by key
    /// 1a2b…: why").
    fn quarantine_request(
        &self,
        caller: &Caller,
        done: &str,
        tenant: &str,
        range: &str,
        note: &str,
    ) -> Result<(String, String, String), Status> {
        let tenant = tenant.trim();
        check_tenant("tenant", tenant).map_err(|e| invalid_argument(&e))?;
        caller.acts_for(Some(tenant))?;
        let range = range.trim();
        let guard = self.service.fraud();
        // What the gate looks numbers up by: a range at the configured depth exactly, or a
        // whole country's calling code.
        let padded = format!("{range}000000");
        if guard.range_of(&padded).as_deref() != Some(range)
            && crate::policy::calling_code(range).as_deref() != Some(range)
        {
            return Err(invalid_argument(&JobError::new(
                "range",
                format!(
                    "`{range}` is not a number range at fraud.range_depth (+ then the country \
                     calling code and the next digits, as `otp-gateway fraud ls` shows them, \
                     e.g. {}) nor a country calling code (e.g. +44)",
                    guard.range_of("+447700900123").unwrap_or_default()
                ),
            )));
        }
        let note = note.trim();
        if note.chars().count() > MAX_NOTE {
            return Err(invalid_argument(&JobError::new(
                "note",
                format!("is longer than {MAX_NOTE} characters"),
            )));
        }
        let by = caller
            .key_id()
            .map_or_else(|| "an operator".to_owned(), |id| format!("key {id}"));
        let note = if note.is_empty() {
            format!("{done} by {by}")
        } else {
            format!("{done} by {by}: {note}")
        };
        Ok((tenant.to_owned(), range.to_owned(), note))
    }
}
