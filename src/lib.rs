//! otp-gateway delivers one-time verification codes and explains every failure.
//!
//! Map of the crate (data moves one way: transport → delivery → providers/store):
//! - [`config`]: layered configuration (embedded defaults, file, `OTP_GATEWAY_*`), validated.
//! - [`app`]: [`app::Application`] wires everything together and owns shutdown.
//! - [`domain`]: pure types — jobs, targets, reports, the failure taxonomy and its hints.
//! - [`queue`]: RabbitMQ topology, consumer (ack after commit, dead-lettering), publisher.
//! - [`grpc`]: the `otpgateway.v1.CodeDelivery` API, health and reflection.
//! - [`delivery`]: idempotent claim, the delivery engine, final report.
//! - [`policy`]: pure policy decisions (block lists) over rules from the store.
//! - [`providers`]: the `Provider` trait and adapters (the sandbox so far).
//! - [`receipts`]: delivery receipts from providers (Twilio status callbacks).
//! - [`store`]: the delivery ledger (`Ledger` trait, SQLite).
//! - [`proto`]: generated protobuf types and their conversions.
//! - [`telemetry`]: logging setup (readable or JSON).
#![warn(missing_docs)]

pub mod app;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod grpc;
pub mod policy;
pub mod proto;
pub mod providers;
pub mod queue;
pub mod receipts;
pub mod store;
pub mod telemetry;
