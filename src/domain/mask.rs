//! Masking of phone numbers and device tokens for logs and reports.

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
    fn tokens_keep_only_their_ends() {
        assert_eq!(mask_token("a1b2c3d4e5f6a7b8c9d0"), "a1b2•••c9d0");
        assert_eq!(mask_token("short"), "•••");
    }
}
