//! Integration tests against the machine's real RabbitMQ (and PostgreSQL for the replicas),
//! with the gateway started in-process on port 0 (or as the real binary). Each test declares uniquely named exchanges and queues
//! and removes them. Without a broker the tests skip, unless CI=true: then they fail.

mod helpers;

mod auth;
mod broker_outage;
mod broker_tls;
mod cli;
mod diagnose;
mod engine;
mod fraud;
mod grpc_api;
mod http_provider;
mod logs;
mod ops;
mod policy;
mod producers;
mod push;
mod queue_jobs;
mod quiet;
mod receipts_limits;
mod replicas;
mod restart;
mod retention;
mod smpp;
mod stack;
mod status_page;
mod tls;
mod traces;
mod twilio;
mod verification;
