//! How an SMS text travels: GSM-7 (the GSM 03.38 default alphabet and its extension table) or
//! UCS-2, and how many segments it takes. Known before sending, recorded on the attempt, and used
//! by the SMPP adapter to encode the text.

use serde::Serialize;

/// The GSM 03.38 default alphabet, indexed by septet value. Position 0x1B is the escape to the
/// extension table and never matches a character of the text.
const GSM7_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\u{1b}ÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";

/// The GSM 03.38 extension table: characters sent as escape (0x1B) plus this septet.
const GSM7_EXTENSION: &[(char, u8)] = &[
    ('\u{0c}', 0x0A),
    ('^', 0x14),
    ('{', 0x28),
    ('}', 0x29),
    ('\\', 0x2F),
    ('[', 0x3C),
    ('~', 0x3D),
    (']', 0x3E),
    ('|', 0x40),
    ('€', 0x65),
];

const ESCAPE: u8 = 0x1B;

/// Marks an ASCII character that is not in the basic alphabet.
const NOT_BASIC: u8 = 0xFF;

/// The basic-alphabet septet of each ASCII character ([`NOT_BASIC`] when it has none).
static ASCII_SEPTETS: std::sync::LazyLock<[u8; 128]> = std::sync::LazyLock::new(|| {
    let mut table = [NOT_BASIC; 128];
    for (index, g) in GSM7_BASIC.chars().enumerate() {
        if g.is_ascii() && g != '\u{1b}' {
            table[g as usize] = index as u8;
        }
    }
    table
});

/// The alphabet an SMS is sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum SmsEncoding {
    /// The GSM 03.38 default alphabet: 160 characters in one segment, 153 per segment beyond.
    #[serde(rename = "GSM_7")]
    Gsm7,
    /// UCS-2 (UTF-16): 70 characters in one segment, 67 per segment beyond.
    #[serde(rename = "UCS_2")]
    Ucs2,
}

super::string_enum!(SmsEncoding { Gsm7 => "GSM_7", Ucs2 => "UCS_2" });

/// An SMS text's encoding and size, as a carrier will bill it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SmsShape {
    /// The alphabet it needs.
    pub encoding: SmsEncoding,
    /// How many segments (billed messages) it takes.
    pub segments: u32,
}

/// The septets of one character: one for the basic alphabet, escape plus one for the extension
/// table, none if GSM-7 cannot carry it.
fn septets(c: char) -> Option<([u8; 2], usize)> {
    let basic = if c.is_ascii() {
        // Most texts are ASCII: one table lookup instead of a walk through the alphabet.
        Some(ASCII_SEPTETS[c as usize]).filter(|&septet| septet != NOT_BASIC)
    } else {
        GSM7_BASIC
            .chars()
            .position(|g| g == c)
            .map(|index| index as u8)
    };
    if c != '\u{1b}'
        && let Some(septet) = basic
    {
        return Some(([septet, 0], 1));
    }
    GSM7_EXTENSION
        .iter()
        .find(|(g, _)| *g == c)
        .map(|(_, septet)| ([ESCAPE, *septet], 2))
}

/// The text as unpacked GSM-7 septets (one per octet, SMPP `data_coding` 0), or `None` when a
/// character is outside the alphabet.
pub fn gsm7_septets(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        let (units, len) = septets(c)?;
        out.extend_from_slice(&units[..len]);
    }
    Some(out)
}

/// The text as UCS-2 / UTF-16 big-endian octets (SMPP `data_coding` 8).
pub fn ucs2_octets(text: &str) -> Vec<u8> {
    text.encode_utf16().flat_map(u16::to_be_bytes).collect()
}

/// The text of unpacked GSM-7 septets (the reverse of [`gsm7_septets`]); a septet with no
/// character becomes U+FFFD.
pub fn gsm7_text(septets: &[u8]) -> String {
    let mut out = String::with_capacity(septets.len());
    let mut units = septets.iter();
    while let Some(&septet) = units.next() {
        let c = if septet == ESCAPE {
            units.next().and_then(|&extended| {
                GSM7_EXTENSION
                    .iter()
                    .find(|(_, s)| *s == extended)
                    .map(|(c, _)| *c)
            })
        } else {
            GSM7_BASIC.chars().nth(usize::from(septet))
        };
        out.push(c.unwrap_or('\u{fffd}'));
    }
    out
}

/// The text of UCS-2 / UTF-16 big-endian octets (the reverse of [`ucs2_octets`]).
pub fn ucs2_text(octets: &[u8]) -> String {
    let units: Vec<u16> = octets
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .collect();
    String::from_utf16_lossy(&units)
}

/// Segments needed for characters of the given unit sizes, never splitting a character (an
/// escape pair or a surrogate pair) across two segments.
fn count_segments(units: impl Iterator<Item = usize> + Clone, single: usize, multi: usize) -> u32 {
    let total: usize = units.clone().sum();
    if total <= single {
        return 1;
    }
    let (mut segments, mut used) = (1, 0);
    for size in units {
        if used + size > multi {
            segments += 1;
            used = 0;
        }
        used += size;
    }
    segments
}

/// The encoding `text` needs and the segments it takes.
pub fn measure(text: &str) -> SmsShape {
    let gsm = |c: char| septets(c).map_or(0, |(_, n)| n);
    if text.chars().all(|c| septets(c).is_some()) {
        SmsShape {
            encoding: SmsEncoding::Gsm7,
            segments: count_segments(text.chars().map(gsm), 160, 153),
        }
    } else {
        SmsShape {
            encoding: SmsEncoding::Ucs2,
            segments: count_segments(text.chars().map(char::len_utf16), 70, 67),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_basic_alphabet_has_128_septets_in_gsm_order() {
        assert_eq!(GSM7_BASIC.chars().count(), 128);
        assert_eq!(
            gsm7_septets("@A a0"),
            Some(vec![0x00, 0x41, 0x20, 0x61, 0x30])
        );
        assert_eq!(gsm7_septets("é¿à"), Some(vec![0x05, 0x60, 0x7F]));
        assert_eq!(gsm7_septets("€{"), Some(vec![0x1B, 0x65, 0x1B, 0x28]));
        assert_eq!(gsm7_septets("código"), None, "ó is not in GSM-7");
        assert_eq!(gsm7_septets("\u{1b}"), None);
    }

    #[test]
    fn septets_and_ucs2_octets_read_back_as_the_text() {
        for text in [
            "482913 is your Example code. @acme.example #482913",
            "Código {x} €5 ñ",
        ] {
            if let Some(septets) = gsm7_septets(text) {
                assert_eq!(gsm7_text(&septets), text);
            }
            assert_eq!(ucs2_text(&ucs2_octets(text)), text);
        }
        assert_eq!(gsm7_text(&[0x1B, 0x65, 0x41]), "€A");
        assert_eq!(gsm7_text(&[0x1B, 0x00]), "\u{fffd}", "no such extension");
        assert_eq!(ucs2_text(&ucs2_octets("日本 😀")), "日本 😀");
    }

    #[test]
    fn single_and_multipart_limits() {
        let gsm = |n| measure(&"a".repeat(n));
        assert_eq!(
            gsm(160),
            SmsShape {
                encoding: SmsEncoding::Gsm7,
                segments: 1
            }
        );
        assert_eq!(gsm(161).segments, 2);
        assert_eq!(gsm(306).segments, 2);
        assert_eq!(gsm(307).segments, 3);
        let ucs = |n| measure(&"ж".repeat(n));
        assert_eq!(
            ucs(70),
            SmsShape {
                encoding: SmsEncoding::Ucs2,
                segments: 1
            }
        );
        assert_eq!(ucs(71).segments, 2);
        assert_eq!(ucs(134).segments, 2);
        assert_eq!(ucs(135).segments, 3);
    }

    #[test]
    fn extension_characters_count_twice_and_never_split() {
        assert_eq!(measure(&"€".repeat(80)).segments, 1);
        assert_eq!(measure(&"€".repeat(81)).segments, 2);
        // 306 septets fit two segments of 153 only if the escape pair may be split; it may not:
        // the first segment ends after 152 septets.
        let text = format!("{}€{}", "a".repeat(152), "a".repeat(152));
        assert_eq!(measure(&text).segments, 3);
        let text = format!("{}€{}", "a".repeat(151), "a".repeat(153));
        assert_eq!(measure(&text).segments, 2);
    }

    #[test]
    fn one_character_outside_gsm7_makes_the_whole_text_ucs2() {
        let shape = measure("482913 es tu código de Example.");
        assert_eq!(shape.encoding, SmsEncoding::Ucs2);
        assert_eq!(shape.segments, 1);
        // An emoji is a surrogate pair: two UTF-16 units.
        assert_eq!(measure(&"😀".repeat(35)).segments, 1);
        assert_eq!(measure(&"😀".repeat(36)).segments, 2);
        assert_eq!(ucs2_octets("é😀"), vec![0x00, 0xE9, 0xD8, 0x3D, 0xDE, 0x00]);
    }
}
