//! Configuration: embedded defaults (`config/default.toml`), an optional file, then
//! `OTP_GATEWAY_*` environment variables; validated once at start with errors that name the key
//! (exit 64). Secrets are redacted in `Debug` output.
//!
//! Each layer owns its settings and their validation (`queue::AmqpConfig`, the providers'
//! `ProviderSettings` next to each adapter, `policy::DestinationRules`, `telemetry::LogFormat`);
//! this module assembles them into [`Config`], checks what spans layers (routes name configured
//! providers that carry the channel, templates, tenants), and turns the whole into what the
//! layers take ([`EngineSettings::from_config`], [`ProviderRegistry::from_config`]).
//!
//! - `sections`: the service's own sections (`grpc`, `store`, `delivery`, `receipts`, `log`).
//! - `tenants`: per-tenant settings.

mod fraud;
mod sections;
mod tenants;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use jiff::SignedDuration;
use serde::Deserialize;

pub use crate::domain::{InvalidSetting, SecretString, SecretUrl};
pub use crate::policy::{CountryRule, DestinationRules};
pub use crate::providers::{
    ApnsEnvironment, ApnsSettings, BreakerConfig, DEFAULT_MAX_CONCURRENT_CALLS, FcmSettings,
    HttpSettings, KindSettings, PrefixRoutes, ProviderSettings, RetryConfig, RoutesConfig,
    SandboxSettings, SharedSettings, SmppSettings, TwilioSettings,
};
pub use crate::queue::AmqpConfig;
pub use crate::store::StoreSettings as StoreConfig;
pub use crate::telemetry::LogFormat;
pub use fraud::{FraudConfig, TenantFraudConfig};
pub use sections::{
    AuthConfig, AuthMode, BOOTSTRAP_KEY_MIN_LEN, DeliveryConfig, GrpcConfig, GrpcTlsConfig,
    LogConfig, OpsConfig, ReceiptsConfig, RetentionConfig,
};
pub use tenants::TenantConfig;

use crate::delivery::EngineSettings;
use crate::domain::{Channel, ChannelTemplates, MessageTemplates};
use crate::providers::{Provider, ProviderBuildError, ProviderRegistry};

/// The defaults compiled into the binary.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// The prefix of environment overrides; nested keys are joined with `__`.
pub const ENV_PREFIX: &str = "OTP_GATEWAY_";

/// The command line's own variables (`OTP_GATEWAY_CONFIG`, the client commands' connection):
/// not settings, so the environment layer leaves them alone (keys without the prefix).
const COMMAND_LINE_VARIABLES: [&str; 6] = [
    "CONFIG",
    "SERVER",
    "KEY",
    "CA_FILE",
    "CLIENT_CERT",
    "CLIENT_KEY",
];

/// A configuration that could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or a value has the wrong type.
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    /// A value parsed but makes no sense (the error names its dotted key).
    #[error(transparent)]
    Invalid(#[from] InvalidSetting),
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(InvalidSetting::new(key, problem))
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The gRPC listener.
    pub grpc: GrpcConfig,
    /// Who may call the gRPC API.
    pub auth: AuthConfig,
    /// The broker and its topology.
    pub amqp: AmqpConfig,
    /// The ledger.
    pub store: StoreConfig,
    /// Delivery behaviour.
    pub delivery: DeliveryConfig,
    /// Providers per channel.
    pub routes: RoutesConfig,
    /// Named providers.
    pub providers: BTreeMap<String, ProviderSettings>,
    /// Logging.
    pub log: LogConfig,
    /// Per-tenant settings, by tenant name.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// The receipt (provider callback) listener.
    pub receipts: ReceiptsConfig,
    /// How long personal data is kept.
    pub retention: RetentionConfig,
    /// The ops listener (health, readiness, metrics).
    pub ops: OpsConfig,
    /// Traces to an OpenTelemetry collector (off unless an endpoint is set).
    #[serde(default)]
    pub traces: crate::telemetry::TracesConfig,
    /// The fraud guard.
    pub fraud: FraudConfig,
    /// Message templates overriding the built-in ones: `templates.<purpose>.<locale>.<channel>`
    /// (`*` as the purpose matches any).
    #[serde(default)]
    pub templates: BTreeMap<String, BTreeMap<String, ChannelTemplates>>,
}

impl Config {
    /// Loads defaults, then `file` (if given), then the environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::from_figment(Self::figment(file))
    }

    /// The layered sources, for callers that add their own (tests).
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment.merge(
            Env::prefixed(ENV_PREFIX)
                .ignore(&COMMAND_LINE_VARIABLES)
                .split("__"),
        )
    }

    /// Extracts and validates a configuration from `figment`.
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// A route (at `key`) for `channel`: not empty, only configured providers, each able to
    /// carry the channel.
    fn validate_route(
        &self,
        key: &str,
        channel: Channel,
        route: &[String],
    ) -> Result<(), ConfigError> {
        if route.is_empty() {
            return Err(invalid(key, "names no provider"));
        }
        for name in route {
            match self.providers.get(name) {
                None => {
                    return Err(invalid(
                        key,
                        format!("names `{name}`, which is not under [providers]"),
                    ));
                }
                Some(provider) if !provider.carries(channel) => {
                    return Err(invalid(
                        key,
                        format!("`{name}` is {}", provider.carries_only()),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.amqp.validate()?;
        self.fraud.validate(&self.tenants)?;
        self.auth.bootstrap_admin_key()?;
        if let Some(tls) = &self.grpc.tls {
            crate::grpc::tls_server_config(tls)?;
        }
        if self.auth.mode == AuthMode::None {
            let listeners = [
                ("grpc.listen", self.grpc.listen),
                ("receipts.listen", self.receipts.listen),
                ("ops.listen", self.ops.listen),
            ];
            if let Some((key, address)) = listeners.iter().find(|(_, a)| !a.ip().is_loopback()) {
                return Err(invalid(
                    "auth.mode",
                    format!(
                        "\"none\" (no API keys) is only accepted while every listener is on a loopback address, \
                         but {key} = {address}: set auth.mode = \"keys\" and give callers keys, or listen on 127.0.0.1"
                    ),
                ));
            }
        }
        self.store.validate()?;
        if self.retention.batch == 0 {
            return Err(invalid("retention.batch", "must be at least 1"));
        }
        if self.delivery.max_in_flight == 0 {
            return Err(invalid("delivery.max_in_flight", "must be at least 1"));
        }
        for channel in Channel::DEFAULT_ORDER {
            let key = format!("routes.{channel}");
            self.validate_route(&key, channel, self.routes.for_channel(channel))?;
        }
        for (name, provider) in &self.providers {
            provider.validate(name)?;
        }
        for channel in [Channel::Sms, Channel::Voice] {
            let routes = self
                .routes
                .by_prefix
                .for_channel(channel)
                .into_iter()
                .flatten();
            for (prefix, providers) in routes {
                let key = format!("routes.by_prefix.{channel}.\"{prefix}\"");
                let digits = prefix.strip_prefix('+').unwrap_or_default();
                if digits.is_empty()
                    || digits.len() > 7
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(invalid(
                        key,
                        "a prefix is + and 1 to 7 digits, e.g. \"+1\" or \"+4915\"",
                    ));
                }
                self.validate_route(&key, channel, providers)?;
            }
        }
        MessageTemplates::new(&self.templates).map_err(|e| invalid(e.key, e.problem))?;
        for (tenant, settings) in &self.tenants {
            if let Some(problem) = settings.autofill.problem() {
                return Err(invalid(format!("tenants.{tenant}.autofill"), problem));
            }
            if settings
                .app_name
                .as_deref()
                .is_some_and(|n| n.trim().is_empty())
            {
                return Err(invalid(
                    format!("tenants.{tenant}.app_name"),
                    "must not be empty",
                ));
            }
            for channel in [Channel::Sms, Channel::Voice] {
                let rule = settings
                    .destinations
                    .for_channel(channel)
                    .expect("sms and voice have rules");
                for (list, codes) in [("allow", &rule.allow), ("deny", &rule.deny)] {
                    if let Some(bad) = codes.iter().find(|c| {
                        !crate::policy::destination::is_known_country(&c.to_ascii_uppercase())
                    }) {
                        return Err(invalid(
                            format!("tenants.{tenant}.destinations.{channel}.{list}"),
                            format!(
                                "`{bad}` is not an ISO 3166 country code (e.g. \"US\", \"DE\")"
                            ),
                        ));
                    }
                }
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        Ok(())
    }
}
impl EngineSettings {
    /// The engine's settings from a validated configuration.
    pub fn from_config(config: &Config) -> Self {
        let (delivery, tenants) = (&config.delivery, &config.tenants);
        EngineSettings {
            app_name: delivery.app_name.clone(),
            provider_timeout: delivery.provider_timeout,
            push_ack_timeout: delivery.push_ack_timeout,
            expiry_margin: SignedDuration::try_from(delivery.expiry_margin)
                .unwrap_or(SignedDuration::MAX),
            retry_after_max: delivery.retry_after_max,
            receipt_wait: delivery.receipt_wait,
            circuit_wait: delivery.circuit_wait,
            tenants_without_ack: tenants
                .iter()
                .filter(|(_, tenant)| !tenant.push_acknowledgement)
                .map(|(name, _)| name.clone())
                .collect::<HashSet<_>>(),
            destinations: tenants
                .iter()
                .map(|(name, tenant)| (name.clone(), tenant.destinations.clone()))
                .collect(),
            templates: MessageTemplates::new(&config.templates)
                .expect("templates are checked by Config::validate"),
            app_names: tenants
                .iter()
                .filter_map(|(name, t)| Some((name.clone(), t.app_name.clone()?)))
                .collect(),
            autofill: tenants
                .iter()
                .map(|(name, t)| (name.clone(), t.autofill.clone()))
                .collect(),
            range_depth: config.fraud.range_depth,
            fraud: config.fraud.policy(tenants),
            fraud_evaluate_every: config.fraud.evaluate_every,
        }
    }
}

impl ProviderRegistry {
    /// Builds every configured provider and takes the routes (validated by `Config`).
    pub async fn from_config(config: &Config) -> Result<Self, ProviderBuildError> {
        Self::from_config_with(config, BTreeMap::new()).await
    }

    /// Like [`ProviderRegistry::from_config`], but the providers named in `replacements` use the
    /// given implementations (with the configured settings and routes): tests plug in here.
    pub async fn from_config_with(
        config: &Config,
        replacements: BTreeMap<String, std::sync::Arc<dyn Provider>>,
    ) -> Result<Self, ProviderBuildError> {
        Self::build(
            &config.providers,
            &config.routes,
            config.delivery.provider_timeout,
            &config.receipts.public_url,
            replacements,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    #[test]
    fn the_embedded_defaults_are_valid() {
        let config = Config::from_figment(Figment::from(Toml::string(DEFAULT_TOML))).unwrap();
        assert_eq!(config.amqp.jobs_queue, "otp.send-code");
        assert_eq!(config.routes.sms, ["sandbox"]);
        assert_eq!(
            config.delivery.shutdown_grace,
            std::time::Duration::from_secs(10)
        );
    }

    #[test]
    fn errors_name_the_key() {
        let bad = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Serialized::default("amqp.prefetch", 0));
        let err = Config::from_figment(bad).unwrap_err().to_string();
        assert!(err.contains("amqp.prefetch"), "{err}");

        let bad = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Serialized::default("routes.sms", ["twilio"]));
        let err = Config::from_figment(bad).unwrap_err().to_string();
        assert!(
            err.contains("routes.sms") && err.contains("twilio"),
            "{err}"
        );

        let tls = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Serialized::default("amqp.url", "amqps://u:p@broker/%2f"));
        Config::from_figment(tls).expect("amqps:// with the system's roots");
        let bad = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Serialized::default("amqp.client_key_file", "client.key"));
        let err = Config::from_figment(bad).unwrap_err().to_string();
        assert!(err.contains("amqp.client_cert_file"), "{err}");

        let bad = Figment::from(Toml::string(DEFAULT_TOML)).merge(Serialized::default(
            "providers.sandbox.retry.multiplier",
            0.5,
        ));
        let err = Config::from_figment(bad).unwrap_err().to_string();
        assert!(err.contains("providers.sandbox.retry.multiplier"), "{err}");

        let bad = Figment::from(Toml::string(DEFAULT_TOML)).merge(Serialized::default(
            "routes.by_prefix.sms",
            serde_json::json!({"1": ["sandbox"]}),
        ));
        let err = Config::from_figment(bad).unwrap_err().to_string();
        assert!(err.contains("routes.by_prefix.sms"), "{err}");

        let bad = Figment::from(Toml::string(DEFAULT_TOML)).merge(Serialized::default(
            "tenants.acme.destinations.sms.allow",
            ["US", "Germany"],
        ));
        let err = Config::from_figment(bad).unwrap_err().to_string();
        assert!(
            err.contains("tenants.acme.destinations.sms.allow") && err.contains("Germany"),
            "{err}"
        );

        let bad = Figment::from(Toml::string(DEFAULT_TOML)).merge(Serialized::default(
            "providers.sandbox.max_concurrent_calls",
            0,
        ));
        let err = Config::from_figment(bad).unwrap_err().to_string();
        assert!(
            err.contains("providers.sandbox.max_concurrent_calls"),
            "{err}"
        );

        let bad = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Serialized::default("amqp.prefetch", "many"));
        let err = Config::from_figment(bad).unwrap_err().to_string();
        assert!(err.contains("prefetch"), "{err}");
    }

    #[test]
    fn postgres_needs_a_hash_key_of_its_own() {
        let postgres = |key: Option<&str>| {
            let mut figment = Figment::from(Toml::string(DEFAULT_TOML))
                .merge(Serialized::default("store.url", "postgres://otp@db/otp"));
            if let Some(key) = key {
                figment = figment.merge(Serialized::default("store.hash_key", key));
            }
            Config::from_figment(figment)
        };
        let err = postgres(None).unwrap_err().to_string();
        assert!(
            err.contains("store.hash_key") && err.contains("PostgreSQL"),
            "{err}"
        );
        let err = postgres(Some("short")).unwrap_err().to_string();
        assert!(
            err.contains("store.hash_key") && err.contains("32"),
            "{err}"
        );
        assert!(postgres(Some(&"k".repeat(32))).is_ok());
        let err = Config::from_figment(Figment::from(Toml::string(DEFAULT_TOML)).merge(
            Serialized::default("store.hash_key_file", "/nonexistent/key"),
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("store.hash_key_file"), "{err}");
    }

    #[test]
    fn push_providers_are_checked_and_kept_to_push() {
        let apns = serde_json::json!({
            "kind": "apns", "team_id": "TEAM123456", "key_id": "KEY1234567",
            "key_file": "/run/secrets/AuthKey.p8", "topics": ["com.example.app"],
        });
        let with = |key: &str, value: serde_json::Value| {
            let mut provider = apns.clone();
            provider[key] = value;
            Figment::from(Toml::string(DEFAULT_TOML))
                .merge(Serialized::default("providers.apns", provider))
        };
        let config = Config::from_figment(with("environment", "sandbox".into())).unwrap();
        match &config.providers["apns"].kind {
            KindSettings::Apns(apns) => {
                assert_eq!(apns.endpoint(), "https://api.sandbox.push.apple.com")
            }
            other => panic!("{other:?}"),
        }
        for (key, value, named) in [
            ("team_id", "TEAM".into(), "providers.apns.team_id"),
            (
                "key_file",
                serde_json::Value::Null,
                "providers.apns.key_file",
            ),
            (
                "key",
                "-----BEGIN PRIVATE KEY-----".into(),
                "providers.apns.key",
            ),
            ("topics", serde_json::json!([]), "providers.apns.topics"),
            ("environment", "staging".into(), "staging"),
        ] {
            let err = Config::from_figment(with(key, value))
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{key}: {err}");
        }
        let err = Config::from_figment(
            with("environment", "production".into())
                .merge(Serialized::default("routes.sms", ["apns"])),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("routes.sms") && err.contains("carries push only"),
            "{err}"
        );
        let err = Config::from_figment(Figment::from(Toml::string(DEFAULT_TOML)).merge(
            Serialized::default("providers.fcm", serde_json::json!({"kind": "fcm"})),
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("providers.fcm.service_account_file"), "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn environment_overrides_nested_keys() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("OTP_GATEWAY_AMQP__PREFETCH", "7");
            jail.set_env("OTP_GATEWAY_DELIVERY__MAX_IN_FLIGHT", "3");
            let config = Config::load(None).unwrap();
            assert_eq!(config.amqp.prefetch, 7);
            assert_eq!(config.delivery.max_in_flight, 3);
            Ok(())
        });
    }

    #[test]
    fn fraud_settings_are_checked_by_key_and_turned_into_the_guard_s_policy() {
        use crate::policy::GuardMode;
        for (key, value, says) in [
            ("fraud.mode", serde_json::json!("block"), "block"),
            ("fraud.window", serde_json::json!("2h"), "at most"),
            (
                "fraud.min_conversion",
                serde_json::json!(1.5),
                "between 0 and 1",
            ),
            ("fraud.volume_factor", serde_json::json!(0.5), "at least 1"),
            ("fraud.range_depth", serde_json::json!(9), "between 1 and 6"),
            (
                "fraud.safe_numbers",
                serde_json::json!(["0044770090012"]),
                "E.164",
            ),
            (
                "tenants.acme.fraud.safe_numbers",
                serde_json::json!(["447700900123"]),
                "E.164",
            ),
            (
                "tenants.acme.fraud.mode",
                serde_json::json!("strict"),
                "strict",
            ),
        ] {
            let bad = Figment::from(Toml::string(DEFAULT_TOML))
                .merge(Serialized::default(key, value.clone()));
            let err = Config::from_figment(bad).unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains(says),
                "{key} = {value}: {err}"
            );
            assert!(!err.contains("447700900123"), "numbers are masked: {err}");
        }
        let good = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Serialized::default("tenants.acme.fraud.mode", "enforce"))
            .merge(Serialized::default(
                "tenants.acme.fraud.safe_accounts",
                ["qa-bot"],
            ));
        let config = Config::from_figment(good).unwrap();
        let policy = config.fraud.policy(&config.tenants);
        assert_eq!(policy.mode("acme"), GuardMode::Enforce);
        assert_eq!(policy.mode("other"), GuardMode::Monitor, "the default");
        assert!(policy.safe("acme", "qa-bot", "+447700900123"));
        assert!(!policy.safe("other", "qa-bot", "+447700900123"));
        assert_eq!(policy.thresholds, crate::policy::GuardThresholds::default());
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn the_command_line_s_own_variables_are_not_settings() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("gateway.toml", "[amqp]\nprefetch = 9\n")?;
            jail.set_env("OTP_GATEWAY_CONFIG", "gateway.toml");
            jail.set_env("OTP_GATEWAY_KEY", "otpk_for_the_client_commands");
            jail.set_env("OTP_GATEWAY_SERVER", "127.0.0.1:50051");
            let config = Config::load(Some(Path::new("gateway.toml"))).unwrap();
            assert_eq!(config.amqp.prefetch, 9);
            Ok(())
        });
    }

    #[test]
    fn the_broker_password_never_shows() {
        let url = SecretUrl::new("amqp://guest:hunter2@broker:5672/%2f");
        assert_eq!(url.redacted(), "amqp://guest:•••@broker:5672/%2f");
        let config = Config::from_figment(
            Figment::from(Toml::string(DEFAULT_TOML))
                .merge(Serialized::default("amqp.url", "amqp://u:hunter2@h/%2f")),
        )
        .unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(SecretUrl::new("amqp://h:5672").redacted(), "amqp://h:5672");
    }
}
