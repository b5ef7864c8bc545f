//! RabbitMQ: the topology, the connection supervisor that keeps a link to the broker (and says
//! plainly when it cannot), the job consumer (ack only after the outcome is committed;
//! malformed jobs dead-lettered with a reason header) and the confirmed publisher.

mod consumer;
mod decode;
mod link;
mod producers;
mod publisher;
mod settings;
mod topology;

pub use consumer::JobConsumer;
pub use decode::{
    CONTENT_TYPE_JSON, CONTENT_TYPE_PROTOBUF, REDACTED_CODE, decode_job, identify, without_code,
};
pub use link::{BrokerLink, LinkError, LinkState};
pub use producers::ProducerTenants;
pub use publisher::{HEADER_ERROR, HEADER_ERROR_FIELD, PublishError, Publisher};
pub use settings::AmqpConfig;
pub use topology::Topology;
