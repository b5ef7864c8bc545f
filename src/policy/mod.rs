//! Policy (block lists, rate limits, destination permissions, quiet hours, the fraud guard's
//! destination ranges): pure decisions about a job's targets, taken from (job, rules, now) with no I/O.
//! The rules themselves live in the store; the delivery engine loads them and asks here.

pub mod block;
pub mod destination;
pub mod fraud;
pub mod guard;
pub mod number_zones;
pub mod quiet;
pub mod rate;

pub use block::{BlockEntry, BlockKind, BlockSource, NewBlockEntry, blocking_entry};
pub use destination::{CountryRule, DestinationRules, country_of, destination_refusal};
pub use fraud::{DestinationCount, bucket_of, calling_code, destination_range};
pub use guard::{
    Evidence, GuardMode, GuardPolicy, GuardThresholds, Quarantine, QuarantineState, TenantGuard,
    recent_bucket_of,
};
pub use number_zones::zones_of;
pub use quiet::{
    QuietAction, QuietDecision, QuietHoursRule, parse_time_of_day, parse_weekday, quiet_decision,
    weekday_name,
};
pub use rate::{RateKey, RateLimitRule, RateLimited, RateScope, job_keys, target_keys};
