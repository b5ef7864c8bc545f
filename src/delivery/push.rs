//! The push stage: every open device at once, then a wait for a device to confirm it showed
//! the code (or deny the request).

use futures_util::future::join_all;
use jiff::Timestamp;
use tokio::time::Instant;

use super::decisions::Standing;
use super::engine::{Dispatcher, Run, StageEnd, TargetEnd};
use super::gate::Gate;
use super::progress::Progress;
use crate::domain::{Acknowledgement, Channel, FailureReason, Job, Target, TargetStatus};
use crate::store::StoreError;

/// What the push stage's wait for acknowledgements saw.
pub(super) enum AckEnd {
    Shown(usize),
    Denied(usize),
    TimedOut,
}

impl Dispatcher {
    /// Push stage: every open device at once, then (unless the tenant switched it off) a wait
    /// for a device to confirm it showed the code.
    pub(super) async fn push_stage(
        &self,
        run: Run<'_>,
        standing: &mut [Standing],
        progress: &Progress<'_>,
    ) -> Result<StageEnd, StoreError> {
        let Run {
            job,
            prior,
            deadline,
            ..
        } = run;
        let mut open = Vec::new();
        for (index, target) in job.targets.iter().enumerate() {
            if standing[index] == Standing::Open && matches!(target, Target::Device(_)) {
                match self.gate(run, index, Channel::Push, progress).await? {
                    Gate::Go => open.push(index),
                    Gate::NotThisChannel | Gate::Closed => standing[index] = Standing::Closed,
                    Gate::JobLimited => return Ok(StageEnd::JobLimited),
                }
            }
        }
        if open.is_empty() {
            return Ok(StageEnd::NotReached);
        }
        let ends = join_all(open.iter().map(|&index| {
            self.deliver_to_target(job, prior, index, Channel::Push, deadline, progress)
        }))
        .await;
        let mut accepted = Vec::new();
        let mut expired = false;
        for (index, end) in open.into_iter().zip(ends) {
            standing[index] = Standing::Closed;
            match end? {
                TargetEnd::Accepted { .. } => accepted.push(index),
                TargetEnd::Recipient { .. } => {}
                TargetEnd::Providers { reason, detail } => {
                    self.fail(index, Channel::Push, reason, detail, progress)
                        .await?;
                }
                TargetEnd::Expired { detail } => {
                    expired = true;
                    self.fail(
                        index,
                        Channel::Push,
                        FailureReason::CodeExpired,
                        detail,
                        progress,
                    )
                    .await?;
                }
            }
        }
        if accepted.is_empty() {
            return Ok(if expired {
                StageEnd::Expired
            } else {
                StageEnd::NotReached
            });
        }
        self.conclude_push(job, accepted, deadline, standing, progress)
            .await
    }

    /// After pushes were accepted: done for tenants without acknowledgements, otherwise wait
    /// for a device to confirm (DELIVERED), deny (USER_DENIED) or stay silent (escalate).
    pub(super) async fn conclude_push(
        &self,
        job: &Job,
        accepted: Vec<usize>,
        deadline: Timestamp,
        standing: &mut [Standing],
        progress: &Progress<'_>,
    ) -> Result<StageEnd, StoreError> {
        if self.settings.tenants_without_ack.contains(&job.tenant) {
            for index in accepted {
                standing[index] = Standing::Reached;
            }
            return Ok(StageEnd::Reached);
        }
        match self.await_acknowledgement(job, deadline, progress).await? {
            AckEnd::Shown(index) => {
                let detail = "the device confirmed it showed the code".to_owned();
                self.settle(
                    index,
                    Channel::Push,
                    TargetStatus::Delivered,
                    None,
                    Some(detail),
                    progress,
                )
                .await?;
                standing[index] = Standing::Reached;
                Ok(StageEnd::Reached)
            }
            AckEnd::Denied(index) => {
                let detail = "the user tapped \"Don't Allow\" on this device".to_owned();
                self.fail(
                    index,
                    Channel::Push,
                    FailureReason::UserDenied,
                    detail,
                    progress,
                )
                .await?;
                Ok(StageEnd::Denied)
            }
            AckEnd::TimedOut => {
                let waited = self.settings.push_ack_timeout;
                for index in accepted {
                    let detail = format!(
                        "accepted by the push service, but the device did not confirm within {waited:?}"
                    );
                    self.fail(
                        index,
                        Channel::Push,
                        FailureReason::PushNotAcknowledged,
                        detail,
                        progress,
                    )
                    .await?;
                }
                Ok(StageEnd::NotReached)
            }
        }
    }

    /// Waits for `AcknowledgeDelivery` from any device of the job, up to the push
    /// acknowledgement timeout and never past the deadline.
    pub(super) async fn await_acknowledgement(
        &self,
        job: &Job,
        deadline: Timestamp,
        progress: &Progress<'_>,
    ) -> Result<AckEnd, StoreError> {
        let left = progress.time_left(deadline);
        let until = Instant::now() + self.settings.push_ack_timeout.min(left);
        // The accepted pushes are on disk while we wait: a worker that takes over after a
        // power cut waits for the acknowledgement again instead of pushing again.
        progress.flush().await?;
        let mut changes = progress.watch();
        loop {
            let acks = progress.ledger.acknowledgements(progress.key).await?;
            let acknowledged = |wanted: Acknowledgement| {
                acks.iter()
                    .find(|(index, ack)| {
                        *ack == wanted
                            && matches!(job.targets.get(*index as usize), Some(Target::Device(_)))
                    })
                    .map(|(index, _)| *index as usize)
            };
            if let Some(index) = acknowledged(Acknowledgement::Denied) {
                return Ok(AckEnd::Denied(index));
            }
            if let Some(index) = acknowledged(Acknowledgement::Shown) {
                return Ok(AckEnd::Shown(index));
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return Ok(AckEnd::TimedOut),
                _ = changes.changed() => {}
            }
        }
    }
}
