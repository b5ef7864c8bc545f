//! Masking of phone numbers and device tokens for logs and reports, and scrubbing them out of
//! texts that providers send back (error messages quote the number they refused).

/// Masks the middle of a phone number: `+14155550101` becomes `+1415•••0101`.
pub fn mask_phone(number: &str) -> String {
    let chars: Vec<char> = number.chars().collect();
    if chars.len() <= 8 {
        let keep = chars.len().min(2);
        return chars[..keep].iter().collect::<String>() + "•••";
    }
    let head: String = chars[..5].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}•••{tail}")
}

/// Masks a device token, keeping only its first and last four characters.
pub fn mask_token(token: &str) -> String {
    let chars: Vec<char> = token.chars().collect();
    if chars.len() <= 12 {
        return "•••".to_owned();
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}•••{tail}")
}

/// The fewest digits a `+`-led run needs to be taken for a phone number (E.164 numbers have
/// at least 7 with the country code); a run without `+` needs [`BARE_NUMBER_DIGITS`] in a row.
const PLUS_NUMBER_DIGITS: usize = 7;
/// The fewest digits in a row, with no `+`, taken for a phone number: national numbers and
/// E.164 without the plus (Twilio error codes have 5, SMPP statuses fewer).
const BARE_NUMBER_DIGITS: usize = 8;
/// The shortest run of hex digits taken for a device token (APNs tokens have 64).
const HEX_TOKEN_LEN: usize = 40;
/// The shortest run of token characters (letters, digits, `_`, `-`, `:`) taken for an FCM
/// registration token (they run to 150 and more).
const FCM_TOKEN_LEN: usize = 100;

/// `text` with every phone number and device token in it masked as [`mask_phone`] and
/// [`mask_token`] mask them: a `+` and at least 7 digits (spaces, dots, dashes and brackets
/// between them allowed), 8 or more digits in a row, 40 or more hex digits in a row, or 100
/// or more token characters in a row. Provider error texts go through this before they are
/// stored, logged or published.
pub fn scrub(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let word_start = i == 0 || !is_token_char(chars[i - 1]);
        if word_start && let Some((end, masked)) = number_at(&chars, i) {
            out.push_str(&masked);
            i = end;
            continue;
        }
        if word_start && is_token_char(chars[i]) {
            let end = (i..chars.len())
                .find(|&j| !is_token_char(chars[j]))
                .unwrap_or(chars.len());
            let word: String = chars[i..end].iter().collect();
            let hex = word.chars().all(|c| c.is_ascii_hexdigit());
            let token = (hex && word.len() >= HEX_TOKEN_LEN) || word.len() >= FCM_TOKEN_LEN;
            if token {
                out.push_str(&mask_token(&word));
            } else {
                out.push_str(&word);
            }
            i = end;
            continue;
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':')
}

/// A phone number starting at `start`: where it ends and its mask.
fn number_at(chars: &[char], start: usize) -> Option<(usize, String)> {
    let plus = chars[start] == '+';
    let mut digits = String::new();
    let mut end = start + usize::from(plus);
    let mut last_digit_end = end;
    while end < chars.len() {
        let c = chars[end];
        if c.is_ascii_digit() {
            digits.push(c);
            end += 1;
            last_digit_end = end;
        } else if plus && matches!(c, ' ' | '-' | '.' | '(' | ')') && !digits.is_empty() {
            end += 1;
        } else {
            break;
        }
    }
    let end = last_digit_end;
    // A number ends at a word boundary: `SM12345678abc` is an identifier, not a number.
    if end < chars.len() && chars[end].is_ascii_alphabetic() {
        return None;
    }
    let enough = if plus {
        digits.len() >= PLUS_NUMBER_DIGITS
    } else {
        digits.len() >= BARE_NUMBER_DIGITS
    };
    if !enough {
        return None;
    }
    let number = if plus { format!("+{digits}") } else { digits };
    Some((end, mask_phone(&number)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_numbers_keep_country_prefix_and_last_four() {
        assert_eq!(mask_phone("+14155550101"), "+1415•••0101");
        assert_eq!(mask_phone("+4930123456789"), "+4930•••6789");
        assert_eq!(mask_phone("12345"), "12•••");
    }

    #[test]
    fn a_mask_shows_at_most_nine_characters_of_any_input() {
        // Found by the `identifiers` fuzz target: an input that already looks masked.
        let odd = "N\0/\0\0•••\0\0\0\0";
        assert!(mask_phone(odd).chars().count() <= 12);
        for input in ["", "+1", "+1415555010199999999", "••••••••••••••••••"]
        {
            assert!(mask_phone(input).chars().count() <= 12, "{input}");
            assert!(mask_token(input).chars().count() <= 11, "{input}");
        }
    }

    #[test]
    fn tokens_keep_only_their_ends() {
        assert_eq!(mask_token("a1b2c3d4e5f6a7b8c9d0"), "a1b2•••c9d0");
        assert_eq!(mask_token("short"), "•••");
    }

    #[test]
    fn provider_texts_are_scrubbed_of_numbers_and_tokens() {
        assert_eq!(
            scrub("The 'To' number +14155551211 is not a valid phone number."),
            "The 'To' number +1415•••1211 is not a valid phone number."
        );
        assert_eq!(
            scrub("Invalid destination 14155551211, error 21211"),
            "Invalid destination 14155•••1211, error 21211"
        );
        assert_eq!(
            scrub("number +1 (415) 555-1211: landline"),
            "number +1415•••1211: landline"
        );
        let apns = "a".repeat(32) + &"0123456789".repeat(4);
        assert_eq!(
            scrub(&format!("token {apns} is bad")),
            format!("token {} is bad", mask_token(&apns))
        );
        let fcm = format!("dXk3{}:APA91b{}", "x".repeat(10), "Q_-z".repeat(30));
        assert!(!scrub(&format!("registration {fcm}")).contains(&fcm));
        // What is no number stays: codes, SIDs, dates, short figures.
        for kept in [
            "error 30006 (landline)",
            "SM0123456789abcdef0123456789abcdef",
            "at 2026-11-21T10:05:00Z",
            "0x0000000B",
            "HTTP 503",
        ] {
            assert_eq!(scrub(kept), kept);
        }
    }
}
