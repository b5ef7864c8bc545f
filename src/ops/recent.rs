//! What the status page shows of the last hour, kept in memory by each replica: deliveries
//! ended per minute by status and reason, and the newest dead letters.

use std::collections::{BTreeMap, VecDeque};

use jiff::Timestamp;

/// Minutes of deliveries kept.
const MINUTES: i64 = 60;

/// Dead letters kept.
const DEAD_LETTERS: usize = 50;

/// A job the gateway dead-lettered.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// When.
    pub at: Timestamp,
    /// The field its reason names.
    pub field: String,
    /// What was wrong with it (never the code).
    pub problem: String,
}

/// Deliveries ended in one minute, by (status, reason).
type MinuteCounts = BTreeMap<(String, String), u32>;

/// The last hour, minute by minute.
#[derive(Debug, Default)]
pub struct Recent {
    /// Per minute since the epoch: ended deliveries by (status, reason).
    minutes: VecDeque<(i64, MinuteCounts)>,
    /// The newest dead letters, newest last.
    dead: VecDeque<DeadLetter>,
}

fn minute(at: Timestamp) -> i64 {
    at.as_second().div_euclid(60)
}

impl Recent {
    /// A delivery ended at `at` with `status` and `reason` (empty when none).
    pub fn delivery(&mut self, at: Timestamp, status: &str, reason: &str) {
        let now = minute(at);
        let slot = match self.minutes.iter().position(|(m, _)| *m == now) {
            Some(slot) => slot,
            None => {
                // Minutes arrive in order but for a few stragglers; keep them sorted.
                let after = self.minutes.partition_point(|(m, _)| *m < now);
                self.minutes.insert(after, (now, BTreeMap::new()));
                after
            }
        };
        *self.minutes[slot]
            .1
            .entry((status.to_owned(), reason.to_owned()))
            .or_default() += 1;
        let newest = self.minutes.back().map_or(now, |(m, _)| *m);
        while self
            .minutes
            .front()
            .is_some_and(|(m, _)| *m <= newest - MINUTES)
        {
            self.minutes.pop_front();
        }
    }

    /// A job was dead-lettered.
    pub fn dead_letter(&mut self, letter: DeadLetter) {
        if self.dead.len() == DEAD_LETTERS {
            self.dead.pop_front();
        }
        self.dead.push_back(letter);
    }

    /// Deliveries ended in the hour before `now` by (status, reason), most first.
    pub fn last_hour(&self, now: Timestamp) -> Vec<(String, String, u32)> {
        let since = minute(now) - MINUTES;
        let mut counts = MinuteCounts::new();
        for (_, by) in self.minutes.iter().filter(|(m, _)| *m > since) {
            for (key, count) in by {
                *counts.entry(key.clone()).or_default() += count;
            }
        }
        let mut counts: Vec<(String, String, u32)> = counts
            .into_iter()
            .map(|((status, reason), count)| (status, reason, count))
            .collect();
        counts.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| (&a.0, &a.1).cmp(&(&b.0, &b.1))));
        counts
    }

    /// The newest dead letters, newest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.dead.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_hour_forgets_older_minutes() {
        let start = Timestamp::from_second(1_800_000_000).unwrap();
        let mut recent = Recent::default();
        recent.delivery(start, "FAILED", "RECIPIENT_OPTED_OUT");
        let later = start + jiff::SignedDuration::from_mins(30);
        recent.delivery(later, "FAILED", "RECIPIENT_OPTED_OUT");
        recent.delivery(later, "SENT", "");
        assert_eq!(
            recent.last_hour(later),
            [
                ("FAILED".into(), "RECIPIENT_OPTED_OUT".into(), 2),
                ("SENT".into(), String::new(), 1)
            ]
        );
        let much_later = start + jiff::SignedDuration::from_mins(75);
        recent.delivery(much_later, "SENT", "");
        assert_eq!(
            recent.last_hour(much_later),
            [
                ("SENT".into(), String::new(), 2),
                ("FAILED".into(), "RECIPIENT_OPTED_OUT".into(), 1)
            ]
        );
    }
}
