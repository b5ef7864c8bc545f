//! Which tenants a queue producer may submit jobs for (`amqp.tenant_from_user_id`). RabbitMQ
//! itself checks that a message's `user_id` property is the user that published it (it
//! refuses the publish otherwise), so the property names the producer: a job whose tenant its
//! producer may not send for is dead-lettered with the reason, as is a job without `user_id`.
//! Jobs the gateway queues for `SendCode` carry its own user and are let through (their API
//! key was checked): give producers users of their own.

use std::collections::BTreeMap;

use crate::domain::{InvalidSetting, JobError};

/// The producers' tenants, and the gateway's own AMQP user.
#[derive(Debug, Clone)]
pub struct ProducerTenants {
    tenants: BTreeMap<String, Vec<String>>,
    own_user: String,
}

impl ProducerTenants {
    /// The mapping of `amqp.tenant_from_user_id`; `None` when it is empty (off).
    pub fn new(
        tenants: &BTreeMap<String, Vec<String>>,
        own_user: &str,
    ) -> Result<Option<Self>, InvalidSetting> {
        if tenants.is_empty() {
            return Ok(None);
        }
        for (user, allowed) in tenants {
            if allowed.is_empty() {
                return Err(InvalidSetting::new(
                    format!("amqp.tenant_from_user_id.{user}"),
                    "names no tenant (remove the user, or list its tenants; \"*\" for every tenant)",
                ));
            }
        }
        Ok(Some(ProducerTenants {
            tenants: tenants.clone(),
            own_user: own_user.to_owned(),
        }))
    }

    /// The gateway's own user, which its `SendCode` jobs carry.
    pub fn own_user(&self) -> &str {
        &self.own_user
    }

    /// Whether the producer `user_id` may send a job for `tenant`; the error says why not.
    pub fn check(&self, user_id: Option<&str>, tenant: &str) -> Result<(), JobError> {
        let Some(user) = user_id.filter(|u| !u.is_empty()) else {
            return Err(JobError::new(
                "user_id",
                "is required: jobs must carry the publishing user's user_id property (amqp.tenant_from_user_id is set)",
            ));
        };
        if user == self.own_user {
            return Ok(());
        }
        let Some(allowed) = self.tenants.get(user) else {
            return Err(JobError::new(
                "user_id",
                format!("`{user}` may not submit jobs (it is not under amqp.tenant_from_user_id)"),
            ));
        };
        if allowed.iter().any(|t| t == "*" || t == tenant) {
            Ok(())
        } else {
            Err(JobError::new(
                "tenant",
                format!("`{tenant}` is not a tenant the producer `{user}` may send for"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_producer_sends_only_for_its_tenants() {
        let map = BTreeMap::from([
            ("acme-app".to_owned(), vec!["acme".to_owned()]),
            ("ops".to_owned(), vec!["*".to_owned()]),
        ]);
        let producers = ProducerTenants::new(&map, "gateway").unwrap().unwrap();
        assert!(producers.check(Some("acme-app"), "acme").is_ok());
        assert_eq!(
            producers
                .check(Some("acme-app"), "globex")
                .unwrap_err()
                .field,
            "tenant"
        );
        assert!(producers.check(Some("ops"), "globex").is_ok());
        assert!(producers.check(Some("gateway"), "globex").is_ok());
        assert_eq!(producers.check(None, "acme").unwrap_err().field, "user_id");
        assert_eq!(
            producers.check(Some("stranger"), "acme").unwrap_err().field,
            "user_id"
        );
        assert!(
            ProducerTenants::new(&BTreeMap::new(), "gateway")
                .unwrap()
                .is_none()
        );
        let empty = BTreeMap::from([("x".to_owned(), vec![])]);
        let error = ProducerTenants::new(&empty, "gateway").unwrap_err();
        assert!(error.to_string().contains("amqp.tenant_from_user_id.x"));
    }
}
