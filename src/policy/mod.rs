//! Policy (block lists, rate limits, destination permissions): pure decisions about a job's targets, taken from (job, rules, now) with no I/O.
//! The rules themselves live in the store; the delivery engine loads them and asks here.

pub mod block;
pub mod destination;
pub mod rate;

pub use block::{BlockEntry, BlockKind, BlockSource, NewBlockEntry, blocking_entry};
pub use destination::{country_of, destination_refusal};
pub use rate::{RateKey, RateLimitRule, RateLimited, RateScope, job_keys, target_keys};
