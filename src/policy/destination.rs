//! Destination permissions: per tenant and channel (SMS, voice), the countries a code may be
//! sent to, as an allow list (only these) and/or a deny list (all but these). The country of
//! a number comes from libphonenumber's metadata (the `phonenumber` crate), so NANP numbers
//! resolve to the right country by area code.

use serde::Deserialize;

use crate::domain::Channel;

/// Per channel, the countries a tenant may send to.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationRules {
    /// For SMS.
    #[serde(default)]
    pub sms: CountryRule,
    /// For voice calls.
    #[serde(default)]
    pub voice: CountryRule,
}

impl DestinationRules {
    /// The rule for `channel` (none for push).
    pub fn for_channel(&self, channel: Channel) -> Option<&CountryRule> {
        match channel {
            Channel::Push => None,
            Channel::Sms => Some(&self.sms),
            Channel::Voice => Some(&self.voice),
        }
    }
}

/// Countries as ISO 3166 alpha-2 codes: `allow` (if not empty) lists the only ones permitted,
/// `deny` the ones refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountryRule {
    /// The only countries permitted (empty: all).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Countries refused.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// The ISO 3166 alpha-2 country of an E.164 number: the region libphonenumber assigns it, or,
/// for a number in no known range, the main country of its calling code (GB for +44).
pub fn country_of(number: &str) -> Option<String> {
    let parsed = phonenumber::parse(None, number).ok()?;
    if let Some(id) = parsed.country().id() {
        return Some(id.as_ref().to_owned());
    }
    let regions = phonenumber::metadata::DATABASE.by_code(&parsed.code().value())?;
    let main = regions
        .iter()
        .find(|m| m.is_main_country_for_code())
        .or(regions.first())?;
    Some(main.id().to_owned())
}

/// Whether `code` is a country libphonenumber knows (for validating configuration).
pub fn is_known_country(code: &str) -> bool {
    code.parse::<phonenumber::country::Id>().is_ok()
}

/// Why `number` may not receive `channel` messages for `tenant` under `rule`, if it may not.
pub fn destination_refusal(
    tenant: &str,
    channel: Channel,
    rule: &CountryRule,
    number: &str,
) -> Option<String> {
    if rule.allow.is_empty() && rule.deny.is_empty() {
        return None;
    }
    let key = format!("tenants.{tenant}.destinations.{channel}");
    let Some(country) = country_of(number) else {
        return (!rule.allow.is_empty()).then(|| {
            format!("the number's country is unknown and {key}.allow lists the countries permitted")
        });
    };
    if rule.deny.iter().any(|c| c.eq_ignore_ascii_case(&country)) {
        return Some(format!(
            "{channel} to {country} is denied for tenant {tenant} ({key}.deny)"
        ));
    }
    if !rule.allow.is_empty() && !rule.allow.iter().any(|c| c.eq_ignore_ascii_case(&country)) {
        return Some(format!(
            "{channel} to {country} is not among the countries permitted for tenant {tenant} ({key}.allow)"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(allow: &[&str], deny: &[&str]) -> CountryRule {
        CountryRule {
            allow: allow.iter().map(|c| c.to_string()).collect(),
            deny: deny.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn countries_come_from_libphonenumber() {
        assert_eq!(country_of("+14155550101").as_deref(), Some("US"));
        assert_eq!(
            country_of("+14165550101").as_deref(),
            Some("CA"),
            "NANP by area code"
        );
        assert_eq!(country_of("+4930123456789").as_deref(), Some("DE"));
        assert_eq!(
            country_of("+447700900123").as_deref(),
            Some("GB"),
            "no known range: the main country of +44"
        );
        assert_eq!(
            country_of("+447911123456").as_deref(),
            Some("GG"),
            "a Guernsey range within +44"
        );
        assert!(is_known_country("DE") && !is_known_country("XX"));
    }

    #[test]
    fn allow_and_deny_lists() {
        let sms = Channel::Sms;
        assert_eq!(
            destination_refusal("acme", sms, &rule(&[], &[]), "+4930123456789"),
            None
        );
        let only_na = rule(&["US", "CA"], &[]);
        assert_eq!(
            destination_refusal("acme", sms, &only_na, "+14165550101"),
            None
        );
        let refusal = destination_refusal("acme", sms, &only_na, "+4930123456789").unwrap();
        assert!(
            refusal.contains("DE") && refusal.contains("tenants.acme.destinations.sms.allow"),
            "{refusal}"
        );
        let no_uk = rule(&[], &["gb"]);
        assert!(
            destination_refusal("acme", Channel::Voice, &no_uk, "+447700900123")
                .unwrap()
                .contains("denied")
        );
        assert_eq!(
            destination_refusal("acme", Channel::Voice, &no_uk, "+14155550101"),
            None
        );
    }
}
