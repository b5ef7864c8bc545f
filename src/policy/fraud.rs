//! The fraud guard's view of destinations: a phone number's range (its country calling code
//! and the first digits after it, the unit SMS pumping works in), its country calling code,
//! and the counts of sends and conversions per tenant, range and bucket (hours for a range's
//! normal, 10-second buckets for its last minutes: `guard`) that the guard judges from.

use jiff::{SignedDuration, Timestamp};

/// The longest a range may be, in digits after the country calling code.
pub const MAX_RANGE_DEPTH: u8 = 6;

/// The range of `number` (E.164): `+`, its country calling code, then `depth` more digits
/// (`+447700` for +447700900123 at depth 4). `None` for a number that is not `+` and digits,
/// whose calling code is unknown, or that is too short to have `depth` digits after it.
pub fn destination_range(number: &str, depth: u8) -> Option<String> {
    let digits = number.strip_prefix('+')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Country calling codes are a prefix code (ITU-T E.164): the first of one, two or three
    // leading digits that libphonenumber knows is the code.
    let code_len = (1..=3).find(|&len| {
        digits
            .get(..len)
            .and_then(|code| code.parse::<u16>().ok())
            .is_some_and(|code| phonenumber::metadata::DATABASE.by_code(&code).is_some())
    })?;
    let end = code_len + usize::from(depth);
    // A range must leave subscriber digits after it.
    (digits.len() > end).then(|| format!("+{}", &digits[..end]))
}

/// The country calling code a number or range starts with (`+44` for +447700900123 or
/// +44770), as the fraud guard names a country.
pub fn calling_code(number_or_range: &str) -> Option<String> {
    destination_range(&format!("{number_or_range}0"), 0)
}

/// The length of one counting bucket.
pub const BUCKET: SignedDuration = SignedDuration::from_hours(1);

/// The start of the bucket `at` falls in.
pub fn bucket_of(at: Timestamp) -> Timestamp {
    let hour = BUCKET.as_secs();
    Timestamp::from_second(at.as_second().div_euclid(hour) * hour).unwrap_or(at)
}

/// A tenant's sends to a range, and how many of their codes were used, in one bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationCount {
    /// The tenant.
    pub tenant: String,
    /// The range ([`destination_range`]).
    pub range: String,
    /// The bucket's start ([`bucket_of`]).
    pub bucket: Timestamp,
    /// SMS and calls a provider accepted.
    pub sends: u64,
    /// Of those, the ones whose code the user entered (`ReportVerification`).
    pub conversions: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_the_calling_code_and_the_next_digits() {
        assert_eq!(
            destination_range("+447700900123", 4).as_deref(),
            Some("+447700")
        );
        assert_eq!(
            destination_range("+14155550101", 3).as_deref(),
            Some("+1415")
        );
        // Three-digit calling codes (Latvia 371, Gambia 220) and a two-digit one (Germany).
        assert_eq!(
            destination_range("+37120000000", 2).as_deref(),
            Some("+37120")
        );
        assert_eq!(
            destination_range("+2203000000", 2).as_deref(),
            Some("+22030")
        );
        assert_eq!(
            destination_range("+4915123456789", 3).as_deref(),
            Some("+49151")
        );
        assert_eq!(destination_range("+1415", 3), None, "no subscriber digits");
        assert_eq!(destination_range("14155550101", 3), None, "not E.164");
        assert_eq!(destination_range("+1 415 555", 3), None);
        assert_eq!(calling_code("+44770").as_deref(), Some("+44"));
        assert_eq!(calling_code("+220301").as_deref(), Some("+220"));
        assert_eq!(calling_code("+14155550101").as_deref(), Some("+1"));
    }

    #[test]
    fn buckets_start_on_the_hour() {
        let at: Timestamp = "2026-12-07T10:42:13Z".parse().unwrap();
        assert_eq!(
            bucket_of(at),
            "2026-12-07T10:00:00Z".parse::<Timestamp>().unwrap()
        );
    }
}
