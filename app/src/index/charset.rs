//! Text of a data set, decoded to Unicode with its Specific Character Set
//! (0008,0005), so that the index matches names by what they say rather
//! than by the bytes a modality happened to use.
//!
//! One code page per data set (`ISO_IR 100`, `ISO_IR 192`, `GB18030`, ...)
//! is a straight decode. The ISO 2022 forms (`ISO 2022 IR 87`, `IR 149`,
//! `IR 58`, ...) switch sets with escape sequences inside a value, and at
//! each `^`, `=`, `\` or line end a value returns to the first set named
//! (PS3.5 6.1.2.5.3): each run between escapes is decoded with the set its
//! escape designated. Whatever cannot be decoded is kept lossily (U+FFFD),
//! never an error: an odd name must not keep an object out of the index.
//! The code pages themselves are `encoding_rs`'s.

use encoding_rs::Encoding;

/// How one run of bytes is decoded.
#[derive(Clone, Copy)]
enum Set {
    /// a single- or multi-byte code page that takes the bytes as they are
    Bytes(&'static Encoding),
    /// JIS X 0208 in G0: 7-bit byte pairs (decoded as EUC-JP, high bits set)
    Jis0208,
    /// JIS X 0212 in G0: 7-bit byte pairs (EUC-JP's 0x8F plane)
    Jis0212,
}

impl Set {
    /// Single-byte sets return to the first set at a delimiter; a
    /// two-byte G0 set cannot, its bytes may look like one.
    fn resets_at_delimiters(self) -> bool {
        matches!(self, Set::Bytes(_))
    }
}

/// The decoder for one data set's Specific Character Set.
#[derive(Clone, Copy)]
pub struct CharacterSet {
    /// the set each value starts in (the first value of (0008,0005))
    initial: Set,
    /// code extensions (escape sequences) are in use
    iso2022: bool,
}

impl Default for CharacterSet {
    /// The default repertoire (no (0008,0005)).
    fn default() -> Self {
        CharacterSet::from_value("")
    }
}

/// The code page of one defined term (without the `ISO 2022` prefix's
/// difference: the G1 half is the same set). `None` for the default
/// repertoire and for terms we do not know.
fn code_page(term: &str) -> Option<&'static Encoding> {
    let number = term
        .strip_prefix("ISO_IR ")
        .or_else(|| term.strip_prefix("ISO 2022 IR "));
    Some(match (term, number) {
        (_, Some("100")) => encoding_rs::WINDOWS_1252, // Latin-1 (its superset)
        (_, Some("101")) => encoding_rs::ISO_8859_2,
        (_, Some("109")) => encoding_rs::ISO_8859_3,
        (_, Some("110")) => encoding_rs::ISO_8859_4,
        (_, Some("144")) => encoding_rs::ISO_8859_5,
        (_, Some("127")) => encoding_rs::ISO_8859_6,
        (_, Some("126")) => encoding_rs::ISO_8859_7,
        (_, Some("138")) => encoding_rs::ISO_8859_8,
        (_, Some("148")) => encoding_rs::WINDOWS_1254, // Latin-5 (its superset)
        (_, Some("203")) => encoding_rs::ISO_8859_15,
        (_, Some("166")) => encoding_rs::WINDOWS_874, // TIS 620 (its superset)
        (_, Some("13")) => encoding_rs::SHIFT_JIS,    // JIS X 0201
        (_, Some("192")) => encoding_rs::UTF_8,
        (_, Some("149")) => encoding_rs::EUC_KR, // KS X 1001 in G1
        (_, Some("58")) => encoding_rs::GBK,     // GB 2312 in G1
        ("GB18030", _) => encoding_rs::GB18030,
        ("GBK", _) => encoding_rs::GBK,
        _ => return None,
    })
}

impl CharacterSet {
    /// The decoder for a (0008,0005) value as stored (backslash-separated
    /// defined terms, padding allowed). Unknown terms decode as the
    /// default repertoire, lossily.
    pub fn from_value(value: &str) -> Self {
        let mut terms = value.split('\\').map(|t| t.trim_matches([' ', '\0']));
        let first = terms.next().unwrap_or("");
        let iso2022 = value.contains("ISO 2022");
        let initial = match first {
            "ISO 2022 IR 87" => Set::Jis0208,
            "ISO 2022 IR 159" => Set::Jis0212,
            _ => code_page(first).map_or(Set::Bytes(encoding_rs::WINDOWS_1252), Set::Bytes),
        };
        let initial = match (first, initial) {
            // The default repertoire is ASCII; bytes beyond it are kept as
            // UTF-8 when they are valid UTF-8 (a common mislabelling), else
            // as Latin-1 (see `decode_run`).
            ("" | "ISO_IR 6" | "ISO 2022 IR 6", _) => Set::Bytes(encoding_rs::UTF_8),
            (_, set) => set,
        };
        CharacterSet { initial, iso2022 }
    }

    /// Decodes one element's value (all its values, backslashes kept).
    pub fn decode(&self, bytes: &[u8]) -> String {
        if !self.iso2022 && !bytes.contains(&ESC) {
            let mut out = String::new();
            decode_run(self.initial, bytes, &mut out);
            return out;
        }
        let mut out = String::new();
        let mut set = self.initial;
        let mut rest = bytes;
        while !rest.is_empty() {
            if rest[0] == ESC {
                let (designated, len) = escape(&rest[1..]);
                if let Some(d) = designated {
                    set = d;
                }
                rest = &rest[1 + len..];
                continue;
            }
            // A run ends at the next escape, or (in a single-byte set)
            // just after a delimiter, where the first set comes back.
            let mut end = 0;
            let mut reset = false;
            while end < rest.len() && rest[end] != ESC {
                end += 1;
                if set.resets_at_delimiters()
                    && matches!(rest[end - 1], b'^' | b'=' | b'\\' | b'\r' | b'\n')
                {
                    reset = true;
                    break;
                }
            }
            decode_run(set, &rest[..end], &mut out);
            rest = &rest[end..];
            if reset {
                set = self.initial;
            }
        }
        out
    }
}

const ESC: u8 = 0x1B;

/// The set an escape sequence (after ESC) designates and the sequence's
/// length; an unknown sequence designates nothing and only its ESC is
/// dropped.
fn escape(seq: &[u8]) -> (Option<Set>, usize) {
    let bytes = |e| Some(Set::Bytes(e));
    let known: &[(&[u8], Option<Set>)] = &[
        (b"(B", bytes(encoding_rs::WINDOWS_1252)),
        (b"(J", bytes(encoding_rs::SHIFT_JIS)),
        (b")I", bytes(encoding_rs::SHIFT_JIS)),
        (b"$B", Some(Set::Jis0208)),
        (b"$(D", Some(Set::Jis0212)),
        (b"$)C", bytes(encoding_rs::EUC_KR)),
        (b"$)A", bytes(encoding_rs::GBK)),
        (b"-A", bytes(encoding_rs::WINDOWS_1252)),
        (b"-B", bytes(encoding_rs::ISO_8859_2)),
        (b"-C", bytes(encoding_rs::ISO_8859_3)),
        (b"-D", bytes(encoding_rs::ISO_8859_4)),
        (b"-F", bytes(encoding_rs::ISO_8859_7)),
        (b"-G", bytes(encoding_rs::ISO_8859_6)),
        (b"-H", bytes(encoding_rs::ISO_8859_8)),
        (b"-L", bytes(encoding_rs::ISO_8859_5)),
        (b"-M", bytes(encoding_rs::WINDOWS_1254)),
        (b"-T", bytes(encoding_rs::WINDOWS_874)),
        (b"-b", bytes(encoding_rs::ISO_8859_15)),
    ];
    for (s, set) in known {
        if seq.starts_with(s) {
            return (*set, s.len());
        }
    }
    (None, 0)
}

/// Appends one run of bytes, decoded with `set`, to `out`.
fn decode_run(set: Set, run: &[u8], out: &mut String) {
    match set {
        Set::Bytes(e) if e == encoding_rs::UTF_8 => match std::str::from_utf8(run) {
            Ok(s) => out.push_str(s),
            Err(_) => out.push_str(&encoding_rs::WINDOWS_1252.decode_without_bom_handling(run).0),
        },
        Set::Bytes(e) => out.push_str(&e.decode_without_bom_handling(run).0),
        Set::Jis0208 | Set::Jis0212 => {
            let mut euc = Vec::with_capacity(run.len() * 3 / 2);
            for pair in run.chunks(2) {
                if matches!(set, Set::Jis0212) && pair.len() == 2 {
                    euc.push(0x8F);
                }
                euc.extend(pair.iter().map(|b| b | 0x80));
            }
            out.push_str(&encoding_rs::EUC_JP.decode_without_bom_handling(&euc).0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(scs: &str, bytes: &[u8]) -> String {
        CharacterSet::from_value(scs).decode(bytes)
    }

    #[test]
    fn default_latin1_and_utf8() {
        assert_eq!(decode("", b"Doe^John"), "Doe^John");
        assert_eq!(decode("ISO_IR 100", b"Buc^J\xe9r\xf4me"), "Buc^Jérôme");
        assert_eq!(
            decode("ISO_IR 192", "Wang^XiaoDong=王^小東".as_bytes()),
            "Wang^XiaoDong=王^小東"
        );
        // Latin-1 bytes without a character set are kept, not dropped.
        assert_eq!(decode("", b"J\xe9r\xf4me"), "Jérôme");
    }

    #[test]
    fn single_byte_code_pages() {
        assert_eq!(
            decode("ISO_IR 144", b"\xbb\xee\xdace\xdc\xd1yp\xd3"),
            "Люкceмбypг"
        );
        assert_eq!(
            decode("ISO_IR 126", b"\xc4\xe9\xef\xed\xf5\xf3\xe9\xef\xf2"),
            "Διονυσιος"
        );
        assert_eq!(
            decode("ISO_IR 138", b"\xf9\xf8\xe5\xef^\xe3\xe1\xe5\xf8\xe4"),
            "שרון^דבורה"
        );
    }

    #[test]
    fn iso2022_japanese_and_korean() {
        // pydicom's chrH31 (ISO 2022 IR 87): Yamada^Tarou=山田^太郎=やまだ^たろう
        let jp =
            b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B";
        assert_eq!(
            decode("\\ISO 2022 IR 87", jp),
            "Yamada^Tarou=山田^太郎=やまだ^たろう"
        );
        // pydicom's chrH32 (ISO 2022 IR 13 \ ISO 2022 IR 87): half-width katakana first.
        let kana = b"\xd4\xcf\xc0\xde^\xc0\xdb\xb3=\x1b$B;3ED\x1b(J^\x1b$BB@O:\x1b(J";
        assert_eq!(
            decode("ISO 2022 IR 13\\ISO 2022 IR 87", kana),
            "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎"
        );
        // pydicom's chrK (ISO 2022 IR 149): Hong^Gildong=洪^吉洞=홍^길동
        let kr = b"Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7=\x1b$)C\xc8\xab^\x1b$)C\xb1\xe6\xb5\xbf";
        assert_eq!(
            decode("\\ISO 2022 IR 149", kr),
            "Hong^Gildong=洪^吉洞=홍^길동"
        );
    }

    #[test]
    fn unknown_bytes_are_kept_lossily() {
        let s = decode("ISO_IR 999", b"A\xffB");
        assert!(s.starts_with('A') && s.ends_with('B'));
        let s = decode("\\ISO 2022 IR 87", b"A\x1b$Z\xffB");
        assert!(s.starts_with('A') && s.ends_with('B'));
    }
}
