//! Delivery: takes a validated job through idempotency (the ledger claim), the engine
//! ([`Dispatcher`]: stages, retries, failover, breakers, acknowledgements) and the final report.
//! [`DeliveryService::handle`] is what the queue consumer calls per job;
//! [`DeliveryService::acknowledge`] records what a device said.
//!
//! The flow, by file:
//! - [`service`](self): a job's claim, its policy context loaded once, the engine, the final
//!   report (`DeliveryService`).
//! - `progress`: one delivery's writes to the ledger and its own copy of the report.
//! - `engine`: the stages in order (push, SMS, voice), resuming what a previous worker began.
//! - `gate`: the policy gate (eligibility, quiet hours, destinations, rate counting).
//! - `push`: the push stage and its wait for a device's acknowledgement.
//! - `phone`: the SMS and voice stages and their wait for a failure receipt.
//! - `failover`: one target through its route's providers (retries, failover, circuit waits).
//! - `call`: one provider call, recorded before and after.
//! - `feedback`: learning from what providers said (block entries for opt-outs, dead tokens).
//! - `circuits`: the breaker registry (per provider, per route) and its health snapshot.
//! - `decisions`: the decisions that need no I/O (standing after a failure, what follows a
//!   failed call, how a chain ended, the final outcome), unit-tested without a ledger.
//! - `acknowledge`, `receipts`: what devices and providers report afterwards; `verification`:
//!   what upstream reports of the user entering the code (the conversion signal).
//! - `destinations`, `fraud_guard`: the fraud guard's counts per number range, and the loop
//!   that judges ranges and keeps the holds the gate consults.
//! - `explain`: the dry run, deciding exactly as the engine does.

mod acknowledge;
mod breaker;
mod call;
mod changes;
mod circuits;
mod decisions;
mod destinations;
mod diagnose;
mod engine;
mod explain;
mod failover;
mod feedback;
mod fraud_guard;
mod gate;
mod phone;
mod progress;
mod push;
mod receipt_waiters;
mod receipts;
mod retry;
mod service;
mod settings;
mod verification;

pub use acknowledge::{AckError, AckOutcome};
pub use breaker::{BreakerSnapshot, CircuitState};
pub use changes::{ChangeNotices, ChangeWatch};
pub use circuits::ProviderHealth;
pub use destinations::DestinationCounter;
pub use diagnose::{DIAGNOSIS_DELIVERIES, Diagnosis, FailureSeen, Fix, TargetDiagnosis, diagnose};
pub use engine::{Dispatcher, Verdict};
pub use explain::{ChannelPlan, Explanation, ProviderChoice, TargetPlan};
pub use fraud_guard::{FraudGuard, Suspicion};
pub use receipts::ReceiptApplied;
pub use retry::RetryPolicy;
pub use service::{DeliveryService, Handled, new_delivery};
pub use settings::EngineSettings;
pub use verification::VerifyError;
