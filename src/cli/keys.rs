//! `otp-gateway keys`: make an API key (printed once, alone on stdout, so a script can keep
//! it), list keys, revoke one; and `otp-gateway erase-account`. The gateway checks that the
//! caller's key may (admin scope, and its own tenant for a tenant's admin key).

use std::process::ExitCode;

use super::EXIT_CONFIG;
use super::args::KeysCommand;
use super::connection::{Server, gateway, refused};
use crate::domain::{Scope, parse_scopes, scopes_text};
use crate::proto::v1::{self, policy_admin_client::PolicyAdminClient};
use crate::proto::{scope_from_proto, scope_to_proto, timestamp_from_proto};

pub(super) async fn run(command: KeysCommand, server: &Server) -> anyhow::Result<ExitCode> {
    // Flags are checked before the gateway is reached.
    let create = match &command {
        KeysCommand::Create { scopes, .. } => match parse_scopes(scopes) {
            Ok(scopes) => Some(scopes),
            Err(problem) => {
                eprintln!("otp-gateway: --scopes: {problem}");
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
        },
        _ => None,
    };
    let mut client = match gateway(server).await {
        Ok(channel) => PolicyAdminClient::new(channel),
        Err(code) => return Ok(code),
    };
    match command {
        KeysCommand::Create { tenant, label, .. } => {
            let scopes = create.unwrap_or_default();
            let request = v1::CreateApiKeyRequest {
                tenant: tenant.unwrap_or_default(),
                scopes: scopes.iter().map(|s| scope_to_proto(*s) as i32).collect(),
                label,
            };
            let created = match client.create_api_key(request).await {
                Ok(created) => created.into_inner(),
                Err(status) => return Ok(refused(&status, EXIT_CONFIG)),
            };
            println!("{}", created.secret);
            if let Some(key) = &created.key {
                eprintln!(
                    "{}  (shown once: keep it now, the gateway stores only a hash)",
                    line(key)
                );
            }
        }
        KeysCommand::Ls { tenant } => {
            let request = v1::ListApiKeysRequest {
                tenant: tenant.unwrap_or_default(),
            };
            let keys = match client.list_api_keys(request).await {
                Ok(keys) => keys.into_inner().keys,
                Err(status) => return Ok(refused(&status, 1)),
            };
            for key in &keys {
                println!("{}", line(key));
            }
        }
        KeysCommand::Revoke { id } => {
            let request = v1::RevokeApiKeyRequest { id: id.clone() };
            if let Err(status) = client.revoke_api_key(request).await {
                return Ok(refused(&status, 1));
            }
            println!("revoked {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `1a2b3c4d5e6f  tenant acme  scopes send,read  created 2026-12-07T10:00:00Z  label`
fn line(key: &v1::ApiKey) -> String {
    let scopes: Vec<Scope> = key
        .scopes
        .iter()
        .filter_map(|s| scope_from_proto(*s))
        .collect();
    let tenant = if key.tenant.is_empty() {
        "*"
    } else {
        &key.tenant
    };
    let at = |at: &Option<prost_types::Timestamp>| {
        at.as_ref()
            .and_then(timestamp_from_proto)
            .map(|t| t.to_string())
    };
    let mut line = format!(
        "{}  tenant {tenant}  scopes {}  created {}",
        key.id,
        scopes_text(&scopes),
        at(&key.created_at).unwrap_or_default()
    );
    if let Some(revoked) = at(&key.revoked_at) {
        line.push_str(&format!("  REVOKED {revoked}"));
    }
    if !key.label.is_empty() {
        line.push_str(&format!("  {}", key.label));
    }
    line
}

/// `erase-account`: what was removed and what stays.
pub(super) async fn erase_account(
    tenant: &str,
    account: &str,
    server: &Server,
) -> anyhow::Result<ExitCode> {
    let mut client = match gateway(server).await {
        Ok(channel) => PolicyAdminClient::new(channel),
        Err(code) => return Ok(code),
    };
    let request = v1::EraseAccountRequest {
        tenant: tenant.to_owned(),
        account: account.to_owned(),
    };
    let erased = match client.erase_account(request).await {
        Ok(erased) => erased.into_inner(),
        Err(status) => return Ok(refused(&status, 1)),
    };
    println!(
        "erased {tenant}/{account}: {} deliveries, {} block entries ({} opt-outs kept)",
        erased.deliveries_removed, erased.block_entries_removed, erased.opt_outs_kept
    );
    Ok(ExitCode::SUCCESS)
}
