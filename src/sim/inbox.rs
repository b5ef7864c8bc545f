//! What the simulators accepted: the "phones" a developer reads the codes from.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

/// One message a simulator accepted, as the phone (or device) would show it.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    /// When it was accepted (RFC 3339).
    pub at: String,
    /// The simulator that took it: twilio, smpp, apns or fcm.
    pub via: &'static str,
    /// sms, voice or push.
    pub channel: &'static str,
    /// The number (E.164) or device token it went to.
    pub to: String,
    /// The text (SMS), the spoken script (voice) or the alert body (push).
    pub text: String,
    /// The simulator's id for it (message SID, SMSC message id, apns-id, FCM name).
    pub id: String,
    /// What its receipt said, once one was sent (delivered, undelivered, rejected).
    pub receipt: Option<String>,
}

/// The most messages the inbox keeps (the oldest go first).
const INBOX_SIZE: usize = 1000;

/// What the simulators accepted, newest last.
#[derive(Debug, Default)]
pub struct Inbox {
    messages: Mutex<VecDeque<Received>>,
    accepted: std::sync::atomic::AtomicU64,
}

impl Inbox {
    /// Keeps `message` and logs it (masked, without its text).
    pub fn push(&self, message: Received) {
        let masked = if message.to.starts_with('+') {
            crate::domain::mask_phone(&message.to)
        } else {
            crate::domain::mask_token(&message.to)
        };
        tracing::info!(via = message.via, channel = message.channel, to = %masked, id = %message.id, "accepted");
        self.accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut messages = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        if messages.len() == INBOX_SIZE {
            messages.pop_front();
        }
        messages.push_back(message);
    }

    /// Notes the receipt sent for message `id` of `via`.
    pub fn receipt(&self, via: &str, id: &str, receipt: &str) {
        let mut messages = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(message) = messages
            .iter_mut()
            .rev()
            .find(|m| m.via == via && m.id == id)
        {
            message.receipt = Some(receipt.to_owned());
        }
    }

    /// How many messages were accepted since the start (also those no longer kept).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every message kept, oldest first.
    pub fn messages(&self) -> Vec<Received> {
        let messages = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        messages.iter().cloned().collect()
    }
}
