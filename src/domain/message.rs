//! The text that carries the code to the recipient: templates per purpose and locale (built in
//! for en, de, fr, es and ja, overridable from the configuration), the tenant's app name, and the
//! autofill formats that let phones fill the code in by themselves. The only module that puts
//! the code into text.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use serde::Deserialize;

use super::sms::{SmsShape, measure};
use super::{Channel, Code};

/// How a tenant's SMS lets the phone fill the code in by itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case", deny_unknown_fields)]
pub enum Autofill {
    /// No autofill line.
    #[default]
    None,
    /// The origin-bound last line `@example.com #123456` (iOS and Safari autofill, WebOTP).
    OriginBound {
        /// The web origin's host the code is bound to, e.g. `example.com`.
        domain: String,
    },
    /// Android's SMS Retriever: the app's 11-character hash as the last line.
    AndroidAppHash {
        /// The hash Android computed from the app's package name and signing key.
        hash: String,
    },
}

impl Autofill {
    /// What is wrong with the settings, if anything.
    pub fn problem(&self) -> Option<String> {
        match self {
            Autofill::None => None,
            Autofill::OriginBound { domain } => {
                let label_ok = |l: &str| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                };
                (domain.len() > 253 || !domain.contains('.') || !domain.split('.').all(label_ok))
                    .then(|| format!("`{domain}` is not a host name like example.com"))
            }
            Autofill::AndroidAppHash { hash } => (hash.len() != 11
                || !hash
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/'))
            .then(|| "must be the 11-character app hash Android computed (base64)".to_owned()),
        }
    }
}

/// Templates for one purpose and locale; a channel left out falls back to the next candidate.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelTemplates {
    /// The SMS text.
    pub sms: Option<String>,
    /// The text a voice call reads out.
    pub voice: Option<String>,
    /// The push notification's body.
    pub push: Option<String>,
}

impl ChannelTemplates {
    fn for_channel(&self, channel: Channel) -> Option<&str> {
        match channel {
            Channel::Sms => self.sms.as_deref(),
            Channel::Voice => self.voice.as_deref(),
            Channel::Push => self.push.as_deref(),
        }
    }
}

/// The placeholders a template may use.
pub const PLACEHOLDERS: &[&str] = &["code", "code_spoken", "app_name", "minutes"];

/// Replaces every `{{name}}` in `template` by `value(name)` in one pass (a value is never
/// scanned again); a name `value` does not know is left as written.
pub fn fill_placeholders(template: &str, mut value: impl FnMut(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                let name = after[..end].trim();
                match value(name) {
                    Some(v) => out.push_str(&v),
                    None => out.push_str(&rest[start..start + 2 + end + 2]),
                }
                rest = &after[end + 2..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The `{{name}}` placeholders in `template`.
pub fn placeholders(template: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        names.push(after[..end].trim());
        rest = &after[end + 2..];
    }
    names
}

/// The built-in languages.
const BUILT_IN: &[&str] = &["en", "de", "fr", "es", "ja"];

/// The built-in phrase for what the code is for, per language and purpose.
fn what_for(lang: &str, purpose: &str) -> &'static str {
    match (lang, purpose) {
        ("de", "sign_in") => "Anmeldecode",
        ("de", "sign_up") => "Registrierungscode",
        ("de", "password_reset") => "Code zum Zurücksetzen des Passworts",
        ("de", "verify_phone") => "Code zur Bestätigung der Telefonnummer",
        ("de", "transaction") => "Freigabecode",
        ("de", _) => "Bestätigungscode",
        ("fr", "sign_in") => "code de connexion",
        ("fr", "sign_up") => "code d'inscription",
        ("fr", "password_reset") => "code de réinitialisation du mot de passe",
        ("fr", "verify_phone") => "code de vérification du numéro",
        ("fr", "transaction") => "code de validation du paiement",
        ("fr", _) => "code de vérification",
        ("es", "sign_in") => "código de inicio de sesión",
        ("es", "sign_up") => "código de registro",
        ("es", "password_reset") => "código para restablecer la contraseña",
        ("es", "verify_phone") => "código de verificación del teléfono",
        ("es", "transaction") => "código de confirmación del pago",
        ("es", _) => "código de verificación",
        ("ja", "sign_in") => "ログインコード",
        ("ja", "sign_up") => "登録コード",
        ("ja", "password_reset") => "パスワード再設定コード",
        ("ja", "verify_phone") => "電話番号確認コード",
        ("ja", "transaction") => "取引確認コード",
        ("ja", _) => "認証コード",
        (_, "sign_in") => "sign-in code",
        (_, "sign_up") => "sign-up code",
        (_, "password_reset") => "password reset code",
        (_, "verify_phone") => "phone number verification code",
        (_, "transaction") => "transaction approval code",
        _ => "verification code",
    }
}

/// The built-in template of a built-in language (`{{what}}` is the purpose phrase).
fn built_in(lang: &str, channel: Channel) -> &'static str {
    match (lang, channel) {
        ("de", Channel::Sms) => {
            "{{code}} ist Ihr {{what}} für {{app_name}}. Gültig für {{minutes}} Min. Bitte nicht weitergeben."
        }
        ("de", Channel::Push) => "Ihr {{what}} für {{app_name}}: {{code}}",
        ("de", Channel::Voice) => {
            "Ihr {{what}} für {{app_name}} lautet: {{code_spoken}}. Noch einmal: {{code_spoken}}."
        }
        ("fr", Channel::Sms) => {
            "{{code}} est votre {{what}} {{app_name}}. Il expire dans {{minutes}} min. Ne le partagez avec personne."
        }
        ("fr", Channel::Push) => "Votre {{what}} {{app_name}} : {{code}}",
        ("fr", Channel::Voice) => {
            "Votre {{what}} {{app_name}} est : {{code_spoken}}. Je répète : {{code_spoken}}."
        }
        ("es", Channel::Sms) => {
            "{{code}} es tu {{what}} de {{app_name}}. Caduca en {{minutes}} min. No lo compartas con nadie."
        }
        ("es", Channel::Push) => "Tu {{what}} de {{app_name}} es {{code}}",
        ("es", Channel::Voice) => {
            "Tu {{what}} de {{app_name}} es: {{code_spoken}}. Repito: {{code_spoken}}."
        }
        ("ja", Channel::Sms) => {
            "{{app_name}}の{{what}}は{{code}}です。有効期限は{{minutes}}分です。他の人に教えないでください。"
        }
        ("ja", Channel::Push) => "{{app_name}}の{{what}}: {{code}}",
        ("ja", Channel::Voice) => {
            "{{app_name}}の{{what}}は、{{code_spoken}}です。もう一度、{{code_spoken}}です。"
        }
        (_, Channel::Sms) => {
            "{{code}} is your {{app_name}} {{what}}. It expires in {{minutes}} min. Don't share it with anyone."
        }
        (_, Channel::Push) => "Your {{app_name}} {{what}} is {{code}}",
        (_, Channel::Voice) => {
            "Your {{app_name}} {{what}} is: {{code_spoken}}. Again: {{code_spoken}}."
        }
    }
}

/// The language a voice call uses for a built-in language, when the job's locale names no
/// region of it.
fn default_region(lang: &str) -> &'static str {
    match lang {
        "de" => "de-DE",
        "fr" => "fr-FR",
        "es" => "es-ES",
        "ja" => "ja-JP",
        _ => "en-US",
    }
}

/// A template set could not be built from the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct TemplateError {
    /// The configuration key, e.g. `templates.sign_in.de.sms`.
    pub key: String,
    /// What is wrong.
    pub problem: String,
}

/// The built-in templates plus the configured overrides (`templates.<purpose>.<locale>`, with
/// `*` as a purpose that matches any).
#[derive(Debug, Clone, Default)]
pub struct MessageTemplates {
    overrides: BTreeMap<(String, String), ChannelTemplates>,
}

impl MessageTemplates {
    /// Validates and keeps the overrides: each must carry the code and use known placeholders.
    pub fn new(
        overrides: &BTreeMap<String, BTreeMap<String, ChannelTemplates>>,
    ) -> Result<Self, TemplateError> {
        let mut kept = BTreeMap::new();
        for (purpose, locales) in overrides {
            for (locale, templates) in locales {
                for channel in Channel::ALL {
                    let Some(template) = templates.for_channel(*channel) else {
                        continue;
                    };
                    let key = format!("templates.{purpose}.{locale}.{}", channel.as_str());
                    let names = placeholders(template);
                    if let Some(unknown) = names.iter().find(|n| !PLACEHOLDERS.contains(n)) {
                        return Err(TemplateError {
                            key,
                            problem: format!(
                                "unknown placeholder {{{{{unknown}}}}}; known: {}",
                                PLACEHOLDERS.join(", ")
                            ),
                        });
                    }
                    if !names.iter().any(|n| *n == "code" || *n == "code_spoken") {
                        return Err(TemplateError {
                            key,
                            problem: "must contain {{code}} (or {{code_spoken}})".to_owned(),
                        });
                    }
                }
                kept.insert(
                    (purpose.clone(), locale.to_ascii_lowercase()),
                    templates.clone(),
                );
            }
        }
        Ok(MessageTemplates { overrides: kept })
    }

    /// The text for `channel`, in the best language for the job's locale.
    pub fn render(&self, channel: Channel, context: &MessageContext<'_>) -> RenderedMessage {
        let locale = context.locale.trim().replace('_', "-").to_ascii_lowercase();
        let lang = locale.split('-').next().unwrap_or_default().to_owned();
        let purpose = context.purpose;
        let custom = [
            (purpose, &locale),
            (purpose, &lang),
            ("*", &locale),
            ("*", &lang),
        ]
        .into_iter()
        .filter(|_| !self.overrides.is_empty())
        .find_map(|(p, l)| {
            let found = self.overrides.get(&(p.to_owned(), l.clone()))?;
            Some((found.for_channel(channel)?, l.clone()))
        });
        let (template, chosen) = match custom {
            Some((template, chosen)) => (template, chosen),
            None => {
                let lang = if BUILT_IN.contains(&lang.as_str()) {
                    lang.clone()
                } else {
                    "en".to_owned()
                };
                (built_in(&lang, channel), lang)
            }
        };
        let chosen_lang = chosen.split('-').next().unwrap_or_default().to_owned();
        let language = if chosen_lang == lang && locale.contains('-') {
            canonical_locale(&locale)
        } else if chosen.contains('-') {
            canonical_locale(&chosen)
        } else if BUILT_IN.contains(&chosen_lang.as_str()) {
            default_region(&chosen_lang).to_owned()
        } else {
            chosen_lang.clone()
        };

        let minutes = (context
            .expires_at
            .duration_since(context.now)
            .max(SignedDuration::ZERO)
            .as_secs()
            + 59)
            / 60;
        let code = context.code.expose();
        let separator = if chosen_lang == "ja" { "、" } else { ", " };
        let what = what_for(&chosen_lang, purpose);
        let mut text = fill_placeholders(template, |name| match name {
            "code" => Some(code.to_owned()),
            "code_spoken" => {
                let digits: Vec<String> = code.chars().map(|c| c.to_string()).collect();
                Some(digits.join(separator))
            }
            "app_name" => Some(context.app_name.to_owned()),
            "minutes" => Some(minutes.to_string()),
            "what" => Some(what.to_owned()),
            _ => None,
        });
        if channel == Channel::Sms {
            match context.autofill {
                Autofill::None => {}
                Autofill::OriginBound { domain } => {
                    text.push_str(&format!("\n\n@{domain} #{code}"));
                }
                Autofill::AndroidAppHash { hash } => {
                    text.push_str(&format!("\n\n{hash}"));
                }
            }
        }
        let sms = (channel == Channel::Sms).then(|| measure(&text));
        RenderedMessage {
            text,
            language,
            sms,
        }
    }
}

/// `de-at` → `de-AT`.
fn canonical_locale(locale: &str) -> String {
    let mut parts = locale.split('-');
    let lang = parts.next().unwrap_or_default().to_ascii_lowercase();
    let rest: Vec<String> = parts
        .map(|p| {
            if p.len() == 2 {
                p.to_ascii_uppercase()
            } else {
                p.to_owned()
            }
        })
        .collect();
    std::iter::once(lang)
        .chain(rest)
        .collect::<Vec<_>>()
        .join("-")
}

/// What a message is rendered from.
#[derive(Debug)]
pub struct MessageContext<'a> {
    /// The tenant's app name.
    pub app_name: &'a str,
    /// The job's purpose, e.g. `sign_in`.
    pub purpose: &'a str,
    /// The job's locale, e.g. `de-AT`.
    pub locale: &'a str,
    /// The tenant's autofill format (SMS only).
    pub autofill: &'a Autofill,
    /// The code.
    pub code: &'a Code,
    /// When the code expires.
    pub expires_at: Timestamp,
    /// Now (for the minutes left).
    pub now: Timestamp,
}

/// A rendered message.
#[derive(Debug, Clone)]
pub struct RenderedMessage {
    /// The text (contains the code).
    pub text: String,
    /// The language it is in, as a BCP 47 tag with region (`de-DE`), for text-to-speech.
    pub language: String,
    /// For SMS: the encoding and segment count.
    pub sms: Option<SmsShape>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::sms::SmsEncoding;

    fn render(
        templates: &MessageTemplates,
        channel: Channel,
        purpose: &str,
        locale: &str,
        autofill: &Autofill,
    ) -> RenderedMessage {
        let now = Timestamp::UNIX_EPOCH;
        templates.render(
            channel,
            &MessageContext {
                app_name: "Example",
                purpose,
                locale,
                autofill,
                code: &Code::new("482913"),
                expires_at: now + SignedDuration::from_secs(61),
                now,
            },
        )
    }

    #[test]
    fn every_built_in_locale_renders_with_the_app_name_and_code() {
        let t = MessageTemplates::default();
        let none = Autofill::None;
        let cases = [
            (
                "en",
                "482913 is your Example sign-in code. It expires in 2 min. Don't share it with anyone.",
                SmsEncoding::Gsm7,
                1,
            ),
            (
                "de-DE",
                "482913 ist Ihr Anmeldecode für Example. Gültig für 2 Min. Bitte nicht weitergeben.",
                SmsEncoding::Gsm7,
                1,
            ),
            (
                "fr",
                "482913 est votre code de connexion Example. Il expire dans 2 min. Ne le partagez avec personne.",
                SmsEncoding::Gsm7,
                1,
            ),
            (
                "es-MX",
                "482913 es tu código de inicio de sesión de Example. Caduca en 2 min. No lo compartas con nadie.",
                SmsEncoding::Ucs2,
                2,
            ),
            (
                "ja",
                "Exampleのログインコードは482913です。有効期限は2分です。他の人に教えないでください。",
                SmsEncoding::Ucs2,
                1,
            ),
        ];
        for (locale, text, encoding, segments) in cases {
            let m = render(&t, Channel::Sms, "sign_in", locale, &none);
            assert_eq!(m.text, text, "{locale}");
            assert_eq!(
                m.sms,
                Some(crate::domain::SmsShape { encoding, segments }),
                "{locale}"
            );
        }
        let m = render(&t, Channel::Sms, "password_reset", "de", &none);
        assert!(m.text.contains("Code zum Zurücksetzen des Passworts"));
    }

    #[test]
    fn unknown_locales_fall_back_to_english_and_voice_gets_a_region() {
        let t = MessageTemplates::default();
        let none = Autofill::None;
        let m = render(&t, Channel::Voice, "sign_in", "pt-BR", &none);
        assert_eq!(
            m.text,
            "Your Example sign-in code is: 4, 8, 2, 9, 1, 3. Again: 4, 8, 2, 9, 1, 3."
        );
        assert_eq!(m.language, "en-US");
        assert!(m.sms.is_none());
        assert_eq!(
            render(&t, Channel::Voice, "x", "de_at", &none).language,
            "de-AT"
        );
        assert_eq!(
            render(&t, Channel::Voice, "x", "ja", &none).language,
            "ja-JP"
        );
        let ja = render(&t, Channel::Voice, "x", "ja", &none).text;
        assert!(ja.contains("4、8、2、9、1、3"), "{ja}");
    }

    #[test]
    fn autofill_lines_end_the_sms_only() {
        let t = MessageTemplates::default();
        let origin = Autofill::OriginBound {
            domain: "example.com".into(),
        };
        let sms = render(&t, Channel::Sms, "sign_in", "en", &origin).text;
        assert!(sms.ends_with("\n\n@example.com #482913"), "{sms}");
        let push = render(&t, Channel::Push, "sign_in", "en", &origin).text;
        assert!(!push.contains('@'));
        let android = Autofill::AndroidAppHash {
            hash: "FA+9qCX9VSu".into(),
        };
        let sms = render(&t, Channel::Sms, "sign_in", "de", &android).text;
        assert!(sms.ends_with("weitergeben.\n\nFA+9qCX9VSu"), "{sms}");
        assert!(origin.problem().is_none() && android.problem().is_none());
        assert!(
            Autofill::OriginBound {
                domain: "https://x".into()
            }
            .problem()
            .is_some()
        );
        assert!(
            Autofill::AndroidAppHash {
                hash: "short".into()
            }
            .problem()
            .is_some()
        );
    }

    #[test]
    fn overrides_win_per_purpose_and_locale_and_are_validated() {
        let mut locales = BTreeMap::new();
        locales.insert(
            "de".to_owned(),
            ChannelTemplates {
                sms: Some("{{app_name}}: {{code}}".into()),
                ..Default::default()
            },
        );
        let mut overrides = BTreeMap::new();
        overrides.insert("sign_in".to_owned(), locales.clone());
        let t = MessageTemplates::new(&overrides).unwrap();
        let none = Autofill::None;
        assert_eq!(
            render(&t, Channel::Sms, "sign_in", "de-CH", &none).text,
            "Example: 482913"
        );
        assert_eq!(
            render(&t, Channel::Sms, "sign_in", "de-CH", &none).language,
            "de-CH"
        );
        // Another purpose and another channel use the built-in text.
        assert!(
            render(&t, Channel::Sms, "sign_up", "de", &none)
                .text
                .contains("Registrierungscode")
        );
        assert!(
            render(&t, Channel::Push, "sign_in", "de", &none)
                .text
                .starts_with("Ihr Anmeldecode")
        );

        locales.get_mut("de").unwrap().sms = Some("{{app_name}} {{cod}}".into());
        overrides.insert("sign_in".to_owned(), locales.clone());
        let error = MessageTemplates::new(&overrides).unwrap_err();
        assert_eq!(error.key, "templates.sign_in.de.sms");
        assert!(error.problem.contains("{{cod}}"), "{}", error.problem);
        locales.get_mut("de").unwrap().sms = Some("{{app_name}}".into());
        overrides.insert("sign_in".to_owned(), locales);
        assert!(
            MessageTemplates::new(&overrides)
                .unwrap_err()
                .problem
                .contains("{{code}}")
        );
    }

    #[test]
    fn placeholders_are_filled_in_one_pass() {
        let out = fill_placeholders("a {{x}} b {{ y }} {{z}} {{", |n| match n {
            "x" => Some("{{y}}".to_owned()),
            "y" => Some("Y".to_owned()),
            _ => None,
        });
        assert_eq!(out, "a {{y}} b Y {{z}} {{");
    }
}
