//! The text that carries the code to the recipient, per channel. (Per-locale templates and
//! autofill formats come with the providers issue; this is the plain English default.)

use jiff::{SignedDuration, Timestamp};

use super::{Channel, Code};

/// Renders the message for `channel`. The only function that puts the code into text.
pub fn render_message(
    channel: Channel,
    app_name: &str,
    code: &Code,
    expires_at: Timestamp,
    now: Timestamp,
) -> String {
    let minutes = (expires_at
        .duration_since(now)
        .max(SignedDuration::ZERO)
        .as_secs()
        + 59)
        / 60;
    let code = code.expose();
    match channel {
        Channel::Sms => format!(
            "{code} is your {app_name} verification code. It expires in {minutes} min. Don't share it with anyone."
        ),
        Channel::Push => format!("Your {app_name} verification code is {code}"),
        Channel::Voice => {
            let spoken: Vec<String> = code.chars().map(|c| c.to_string()).collect();
            let spoken = spoken.join(", ");
            format!("Your {app_name} verification code is: {spoken}. Again: {spoken}.")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voice_reads_the_code_digit_by_digit_twice() {
        let now = Timestamp::UNIX_EPOCH;
        let text = render_message(
            Channel::Voice,
            "Example",
            &Code::new("4829"),
            now + SignedDuration::from_mins(5),
            now,
        );
        assert_eq!(
            text,
            "Your Example verification code is: 4, 8, 2, 9. Again: 4, 8, 2, 9."
        );
    }

    #[test]
    fn sms_rounds_the_remaining_minutes_up() {
        let now = Timestamp::UNIX_EPOCH;
        let text = render_message(
            Channel::Sms,
            "Example",
            &Code::new("482913"),
            now + SignedDuration::from_secs(61),
            now,
        );
        assert!(text.starts_with("482913 is your Example verification code. It expires in 2 min."));
    }
}
