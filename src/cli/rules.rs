//! The rule commands, `block`, `quiet` and `limits`, in one shape: each kind of rule says how
//! its `add`/`set` becomes a request, how it is removed and listed over `PolicyAdmin`, and how
//! one rule reads on a line; [`run`] does the rest the same way for all three.

use std::process::ExitCode;

use anyhow::Context;
use jiff::{SignedDuration, Timestamp};
use tonic::Status;

use super::EXIT_CONFIG;
use super::args::{BlockCommand, BlockTarget, LimitsCommand, QuietCommand};
use super::connection::{Gateway, Server, gateway, refused};
use super::deliveries::{channel_from_name, channel_name};
use crate::proto::timestamp_to_proto;
use crate::proto::v1::{self, policy_admin_client::PolicyAdminClient};

type Client = PolicyAdminClient<Gateway>;

/// What a rule command asks for, whatever the kind of rule.
pub(super) enum RuleAction<K: RuleKind> {
    /// Add a rule (or replace one), from the verb's flags.
    Put(K::Put),
    /// Remove the rule with this id.
    Remove(i64),
    /// List the rules (with a tenant: its own and the global ones).
    List(Option<String>),
}

/// One kind of rule the CLI manages.
pub(super) trait RuleKind: Sized {
    /// The flags of `add` / `set`.
    type Put;
    /// A rule as the gateway returns it.
    type Rule;
    /// Adds (or replaces) a rule; with whether it is new. Bad flags are refused before the
    /// gateway is asked.
    async fn put(
        client: &mut Client,
        put: Self::Put,
    ) -> anyhow::Result<Result<(Self::Rule, bool), Status>>;
    /// Removes rule `id`.
    async fn remove(client: &mut Client, id: i64) -> Result<(), Status>;
    /// The rules for `tenant` (its own and the global ones), or every rule.
    async fn list(client: &mut Client, tenant: String) -> Result<Vec<Self::Rule>, Status>;
    /// One rule on one line.
    fn line(rule: &Self::Rule) -> String;
}

/// Runs a rule command: `add`/`set` prints the rule (a refusal exits 64), `rm` prints
/// "removed #id" (a refusal exits 1), `ls` prints a line per rule.
pub(super) async fn run<K: RuleKind>(
    action: RuleAction<K>,
    server: &Server,
) -> anyhow::Result<ExitCode> {
    let mut client = match gateway(server).await {
        Ok(channel) => PolicyAdminClient::new(channel),
        Err(code) => return Ok(code),
    };
    match action {
        RuleAction::Put(put) => match K::put(&mut client, put).await? {
            Ok((rule, created)) => {
                let again = if created { "" } else { "  (already there)" };
                println!("{}{again}", K::line(&rule));
            }
            Err(status) => return Ok(refused(&status, EXIT_CONFIG)),
        },
        RuleAction::Remove(id) => match K::remove(&mut client, id).await {
            Ok(()) => println!("removed #{id}"),
            Err(status) => return Ok(refused(&status, 1)),
        },
        RuleAction::List(tenant) => {
            for rule in K::list(&mut client, tenant.unwrap_or_default()).await? {
                println!("{}", K::line(&rule));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `RATE_SCOPE_RECIPIENT` less `RATE_SCOPE_` → "recipient": an enum value in a rule's line.
fn short_name(proto_name: &str, prefix: &str) -> String {
    proto_name.trim_start_matches(prefix).to_ascii_lowercase()
}

/// `*` for a rule of every tenant.
fn tenant_of(tenant: &str) -> &str {
    if tenant.is_empty() { "*" } else { tenant }
}

/// Block-list entries.
pub(super) struct Blocks;

/// The flags of `block add`.
pub(super) struct NewBlock {
    what: BlockTarget,
    tenant: Option<String>,
    note: String,
    ttl: Option<SignedDuration>,
}

impl From<BlockCommand> for RuleAction<Blocks> {
    fn from(command: BlockCommand) -> Self {
        match command {
            BlockCommand::Add {
                what,
                tenant,
                note,
                ttl,
            } => RuleAction::Put(NewBlock {
                what,
                tenant,
                note,
                ttl,
            }),
            BlockCommand::Rm { id } => RuleAction::Remove(id),
            BlockCommand::Ls { tenant } => RuleAction::List(tenant),
        }
    }
}

impl RuleKind for Blocks {
    type Put = NewBlock;
    type Rule = v1::BlockEntry;

    async fn put(
        client: &mut Client,
        put: NewBlock,
    ) -> anyhow::Result<Result<(v1::BlockEntry, bool), Status>> {
        let (kind, pattern) = match put.what {
            BlockTarget {
                number: Some(p), ..
            } => (v1::BlockKind::Number, p),
            BlockTarget {
                prefix: Some(p), ..
            } => (v1::BlockKind::Prefix, p),
            BlockTarget { token: Some(p), .. } => (v1::BlockKind::DeviceToken, p),
            BlockTarget {
                account: Some(p), ..
            } => (v1::BlockKind::Account, p),
            _ => anyhow::bail!("give one of --number, --prefix, --token, --account"),
        };
        let request = v1::AddBlockEntryRequest {
            tenant: put.tenant.unwrap_or_default(),
            kind: kind as i32,
            pattern,
            note: put.note,
            expires_at: put
                .ttl
                .map(|ttl| timestamp_to_proto(Timestamp::now() + ttl)),
            source: v1::BlockSource::Admin as i32,
        };
        Ok(match client.add_block_entry(request).await {
            Ok(response) => {
                let response = response.into_inner();
                let entry = response.entry.context("the gateway returned no entry")?;
                Ok((entry, response.created))
            }
            Err(status) => Err(status),
        })
    }

    async fn remove(client: &mut Client, id: i64) -> Result<(), Status> {
        let request = v1::RemoveBlockEntryRequest { id };
        client.remove_block_entry(request).await.map(drop)
    }

    async fn list(client: &mut Client, tenant: String) -> Result<Vec<v1::BlockEntry>, Status> {
        let request = v1::ListBlockEntriesRequest { tenant };
        Ok(client
            .list_block_entries(request)
            .await?
            .into_inner()
            .entries)
    }

    fn line(entry: &v1::BlockEntry) -> String {
        let kind = v1::BlockKind::try_from(entry.kind)
            .map_or("?".into(), |k| short_name(k.as_str_name(), "BLOCK_KIND_"));
        let source = v1::BlockSource::try_from(entry.source)
            .map_or("?".into(), |s| short_name(s.as_str_name(), "BLOCK_SOURCE_"));
        let until = entry
            .expires_at
            .as_ref()
            .and_then(crate::proto::timestamp_from_proto)
            .map(|t| format!("  until {t}"))
            .unwrap_or_default();
        let note = if entry.note.is_empty() {
            String::new()
        } else {
            format!("  {}", entry.note)
        };
        format!(
            "#{}  {}  {kind} {}  {source}{until}{note}",
            entry.id,
            tenant_of(&entry.tenant),
            entry.pattern
        )
    }
}

/// Quiet-hours rules.
pub(super) struct QuietHours;

impl From<QuietCommand> for RuleAction<QuietHours> {
    fn from(command: QuietCommand) -> Self {
        match command {
            QuietCommand::Set {
                from,
                to,
                action,
                zone,
                days,
                channels,
                tenant,
                account,
                id,
            } => RuleAction::Put((
                action,
                channels,
                v1::QuietHours {
                    id,
                    tenant: tenant.unwrap_or_default(),
                    account: account.unwrap_or_default(),
                    channels: Vec::new(),
                    start: from,
                    end: to,
                    days,
                    action: 0,
                    default_zone: zone,
                },
            )),
            QuietCommand::Rm { id } => RuleAction::Remove(id),
            QuietCommand::Ls { tenant } => RuleAction::List(tenant),
        }
    }
}

impl RuleKind for QuietHours {
    /// `--action` and `--channels` as given, and the rest of the rule.
    type Put = (String, Vec<String>, v1::QuietHours);
    type Rule = v1::QuietHours;

    async fn put(
        client: &mut Client,
        (action, channels, mut rule): Self::Put,
    ) -> anyhow::Result<Result<(v1::QuietHours, bool), Status>> {
        let action = v1::QuietAction::from_str_name(&format!(
            "QUIET_ACTION_{}",
            action.to_ascii_uppercase().replace('-', "_")
        ))
        .filter(|a| *a != v1::QuietAction::Unspecified)
        .with_context(|| {
            format!("--action takes defer, suppress or allow-user-initiated, not `{action}`")
        })?;
        rule.action = action as i32;
        rule.channels = channels
            .iter()
            .map(|c| channel_from_name(c).map(|c| c as i32))
            .collect::<Result<_, _>>()?;
        let request = v1::SetQuietHoursRequest { rule: Some(rule) };
        Ok(client
            .set_quiet_hours(request)
            .await
            .map(|rule| (rule.into_inner(), true)))
    }

    async fn remove(client: &mut Client, id: i64) -> Result<(), Status> {
        let request = v1::RemoveQuietHoursRequest { id };
        client.remove_quiet_hours(request).await.map(drop)
    }

    async fn list(client: &mut Client, tenant: String) -> Result<Vec<v1::QuietHours>, Status> {
        let request = v1::ListQuietHoursRequest { tenant };
        Ok(client.list_quiet_hours(request).await?.into_inner().rules)
    }

    fn line(rule: &v1::QuietHours) -> String {
        // As `--action` takes it: allow-user-initiated.
        let action = v1::QuietAction::try_from(rule.action).map_or("?".into(), |a| {
            short_name(a.as_str_name(), "QUIET_ACTION_").replace('_', "-")
        });
        let account = if rule.account.is_empty() {
            String::new()
        } else {
            format!("/{}", rule.account)
        };
        let channels: Vec<String> = rule.channels.iter().map(|c| channel_name(*c)).collect();
        let channels = if channels.is_empty() {
            "all channels".to_owned()
        } else {
            channels.join(",")
        };
        let days = if rule.days.is_empty() {
            "every day".to_owned()
        } else {
            rule.days.join(",")
        };
        format!(
            "#{}  {}{account}  {}–{} {}  {days}  {channels}  {action}",
            rule.id,
            tenant_of(&rule.tenant),
            rule.start,
            rule.end,
            rule.default_zone
        )
    }
}

/// Rate limits.
pub(super) struct Limits;

impl From<LimitsCommand> for RuleAction<Limits> {
    fn from(command: LimitsCommand) -> Self {
        match command {
            LimitsCommand::Set {
                per,
                prefix,
                limit,
                window,
                tenant,
            } => RuleAction::Put((
                per,
                v1::SetRateLimitRequest {
                    tenant: tenant.unwrap_or_default(),
                    scope: 0,
                    prefix,
                    limit,
                    window: Some(crate::proto::duration_to_proto(window.unsigned_abs())),
                },
            )),
            LimitsCommand::Rm { id } => RuleAction::Remove(id),
            LimitsCommand::Ls { tenant } => RuleAction::List(tenant),
        }
    }
}

impl RuleKind for Limits {
    /// `--per` as given, and the rest of the request.
    type Put = (String, v1::SetRateLimitRequest);
    type Rule = v1::RateLimit;

    async fn put(
        client: &mut Client,
        (per, mut request): Self::Put,
    ) -> anyhow::Result<Result<(v1::RateLimit, bool), Status>> {
        let scope =
            v1::RateScope::from_str_name(&format!("RATE_SCOPE_{}", per.to_ascii_uppercase()))
                .filter(|s| *s != v1::RateScope::Unspecified)
                .with_context(|| {
                    format!("--per takes recipient, account, tenant or prefix, not `{per}`")
                })?;
        request.scope = scope as i32;
        Ok(client
            .set_rate_limit(request)
            .await
            .map(|rule| (rule.into_inner(), true)))
    }

    async fn remove(client: &mut Client, id: i64) -> Result<(), Status> {
        let request = v1::RemoveRateLimitRequest { id };
        client.remove_rate_limit(request).await.map(drop)
    }

    async fn list(client: &mut Client, tenant: String) -> Result<Vec<v1::RateLimit>, Status> {
        let request = v1::ListRateLimitsRequest { tenant };
        Ok(client.list_rate_limits(request).await?.into_inner().limits)
    }

    fn line(rule: &v1::RateLimit) -> String {
        let scope = v1::RateScope::try_from(rule.scope)
            .map_or("?".into(), |s| short_name(s.as_str_name(), "RATE_SCOPE_"));
        let window = SignedDuration::from_secs(rule.window.as_ref().map_or(0, |w| w.seconds));
        let target = if rule.prefix.is_empty() {
            format!("per {scope}")
        } else {
            format!("to {}", rule.prefix)
        };
        format!(
            "#{}  {}  {} per {window:#} {target}",
            rule.id,
            tenant_of(&rule.tenant),
            rule.limit
        )
    }
}
