//! otp-gateway delivers one-time verification codes and explains every failure.
//!
//! Map of the crate (data moves one way: transport → delivery → providers/store):
//! - [`cli`]: the command line: `serve`, and the client commands (their own connection
//!   setting; they never read the server's configuration). `main.rs` only hands over to it.
//! - [`config`]: loads (embedded defaults, file, `OTP_GATEWAY_*`) and validates once, naming
//!   the key; assembles the settings each layer owns and turns them into what the layers take.
//! - [`app`]: [`app::Application`] wires everything together and owns shutdown.
//! - [`domain`]: pure types — jobs, targets, reports, the failure taxonomy and its hints, and
//!   setting values (durations, secrets, an invalid setting named by its key).
//! - [`queue`]: RabbitMQ settings, topology, consumer (ack after commit, dead-lettering),
//!   publisher.
//! - [`grpc`]: the `otpgateway.v1` API, health and reflection; one error → status map.
//! - [`delivery`]: the service (claim, policy context, final report) and the engine in its
//!   steps: stages, the policy gate, push and phone stages, one target's failover, the call,
//!   feedback, the breaker registry; decisions without I/O in `decisions`.
//! - [`policy`]: pure policy decisions (block lists, quiet hours, rate limits, destinations).
//! - [`providers`]: the `Provider` trait, the registry and its routes, and one folder per
//!   provider kind owning its settings, validation and adapter.
//! - [`receipts`]: delivery receipts from providers (Twilio status callbacks).
//! - [`sim`]: provider simulators (Twilio, SMPP, APNs, FCM) with fault knobs, run by `otp-sim`
//!   for a local stack and by the benchmark; never part of the gateway's own path.
//! - [`store`]: the ledger and policy-store traits with neutral errors; [`store::open`] is the
//!   one place naming a backend (SQLite, with group commit, in `store/sqlite/`); the rules
//!   cache and the contract tests every backend runs.
//! - [`proto`]: generated protobuf types and their conversions.
//! - [`telemetry`]: logging setup (readable or JSON).
#![warn(missing_docs)]

pub mod app;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod grpc;
pub mod ops;
pub mod policy;
pub mod proto;
pub mod providers;
pub mod queue;
pub mod receipts;
pub mod sim;
pub mod store;
pub mod telemetry;
