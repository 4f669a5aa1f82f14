//! C-FIND answered from the index: a query identifier parsed, matched
//! against the tables with the rules of PS3.4 C.2.2.2, and each match
//! encoded as a response identifier.
//!
//! The supported keys are one table ([`KEYS`]): tag, VR, level, the SQL
//! that yields the value and how it is matched. Identifiers are small (the
//! protocol caps them at 64 KiB), so one is parsed in memory by a plain
//! element walk in its transfer syntax (implicit or explicit VR little
//! endian; sequences skipped); its text is decoded with its own Specific
//! Character Set ([`super::charset`]) so that a query in ISO_IR 100 matches
//! the Unicode the index holds, and the answers are sent in UTF-8
//! (`ISO_IR 192`).
//!
//! Matching kinds: universal (empty value: the key is returned), single
//! value (case-insensitive for person names, with Unicode case folding),
//! UID list (backslash-separated), wildcards `*` and `?` (GLOB, or LIKE on
//! folded text for person names, every other character escaped), and
//! ranges `a-b`, `a-`, `-b` on dates and times. Derived keys (the Number of
//! ... Related counts, ModalitiesInStudy, SOPClassesInStudy) are computed
//! from the child rows; ModalitiesInStudy and SOPClassesInStudy match when
//! any child has one of the values. A key we do not know is returned empty.
//!
//! The query runs on its own read-only connection (WAL: it does not block
//! the store's inserts), on a blocking thread, and each row is encoded and
//! sent through the bounded channel as it is read: the answer is never
//! whole in memory.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use dimse::command::status;
use dimse::scp::Failure;
use dimse::uid;

use super::charset::CharacterSet;

/// The Query/Retrieve Level (0008,0052).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// PATIENT
    Patient,
    /// STUDY
    Study,
    /// SERIES
    Series,
    /// IMAGE
    Image,
}

impl Level {
    fn parse(value: &str) -> Option<Level> {
        Some(match value {
            "PATIENT" => Level::Patient,
            "STUDY" => Level::Study,
            "SERIES" => Level::Series,
            "IMAGE" => Level::Image,
            _ => return None,
        })
    }

    /// The level as written in (0008,0052).
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Patient => "PATIENT",
            Level::Study => "STUDY",
            Level::Series => "SERIES",
            Level::Image => "IMAGE",
        }
    }
}

/// How a key's value is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// text: single value or wildcard, case-sensitive
    Text,
    /// a person name: single value or wildcard, case-insensitive
    PersonName,
    /// a UID: single value or a backslash-separated list
    Uid,
    /// a date or a time: single value or range
    Range,
    /// an integer column (IS): single value
    Integer,
    /// derived, multi-valued from child rows: matches if any child has one
    /// of the values (the SQL is the child column and its table's link)
    AnyChild(&'static str),
    /// derived and returned only (a count): never matched
    ReturnOnly,
}

/// One supported key.
pub(super) struct Key {
    tag: u32,
    vr: [u8; 2],
    pub(super) level: Level,
    /// the SQL expression of its value (over aliases p, st, se, i)
    sql: &'static str,
    kind: Kind,
}

const fn key(tag: u32, vr: &[u8; 2], level: Level, sql: &'static str, kind: Kind) -> Key {
    Key {
        tag,
        vr: *vr,
        level,
        sql,
        kind,
    }
}

const TAG_SPECIFIC_CHARACTER_SET: u32 = 0x0008_0005;
const TAG_QUERY_RETRIEVE_LEVEL: u32 = 0x0008_0052;
const TAG_RETRIEVE_AE_TITLE: u32 = 0x0008_0054;
pub(super) const TAG_PATIENT_ID: u32 = 0x0010_0020;
pub(super) const TAG_STUDY_INSTANCE_UID: u32 = 0x0020_000D;
pub(super) const TAG_SERIES_INSTANCE_UID: u32 = 0x0020_000E;

/// The keys answered from the index (PS3.4 C.6.1.1 and C.6.2.1, and the
/// optional ones viewers ask for).
const KEYS: &[Key] = &[
    key(
        0x0010_0010,
        b"PN",
        Level::Patient,
        "p.patient_name",
        Kind::PersonName,
    ),
    key(
        TAG_PATIENT_ID,
        b"LO",
        Level::Patient,
        "p.patient_id",
        Kind::Text,
    ),
    key(
        0x0010_0030,
        b"DA",
        Level::Patient,
        "p.patient_birth_date",
        Kind::Range,
    ),
    key(
        0x0010_0040,
        b"CS",
        Level::Patient,
        "p.patient_sex",
        Kind::Text,
    ),
    key(
        0x0020_1200,
        b"IS",
        Level::Patient,
        "(SELECT count(*) FROM study x WHERE x.patient = p.id)",
        Kind::ReturnOnly,
    ),
    key(
        0x0020_1202,
        b"IS",
        Level::Patient,
        "(SELECT count(*) FROM study x JOIN series y ON y.study = x.id WHERE x.patient = p.id)",
        Kind::ReturnOnly,
    ),
    key(
        0x0020_1204,
        b"IS",
        Level::Patient,
        "(SELECT count(DISTINCT z.sop_instance_uid) FROM study x JOIN series y ON y.study = x.id \
         JOIN instance z ON z.series = y.id WHERE x.patient = p.id)",
        Kind::ReturnOnly,
    ),
    key(
        TAG_STUDY_INSTANCE_UID,
        b"UI",
        Level::Study,
        "st.study_instance_uid",
        Kind::Uid,
    ),
    key(
        0x0008_0020,
        b"DA",
        Level::Study,
        "st.study_date",
        Kind::Range,
    ),
    key(
        0x0008_0030,
        b"TM",
        Level::Study,
        "st.study_time",
        Kind::Range,
    ),
    key(
        0x0008_0050,
        b"SH",
        Level::Study,
        "st.accession_number",
        Kind::Text,
    ),
    key(0x0020_0010, b"SH", Level::Study, "st.study_id", Kind::Text),
    key(
        0x0008_1030,
        b"LO",
        Level::Study,
        "st.study_description",
        Kind::Text,
    ),
    key(
        0x0008_0090,
        b"PN",
        Level::Study,
        "st.referring_physician_name",
        Kind::PersonName,
    ),
    key(
        0x0008_0061,
        b"CS",
        Level::Study,
        "(SELECT group_concat(m, '\\') FROM (SELECT DISTINCT y.modality AS m FROM series y \
         WHERE y.study = st.id AND y.modality <> '' ORDER BY m))",
        Kind::AnyChild("SELECT 1 FROM series y WHERE y.study = st.id AND y.modality"),
    ),
    key(
        0x0008_0062,
        b"UI",
        Level::Study,
        "(SELECT group_concat(c, '\\') FROM (SELECT DISTINCT z.sop_class_uid AS c FROM series y \
         JOIN instance z ON z.series = y.id WHERE y.study = st.id ORDER BY c))",
        Kind::AnyChild(
            "SELECT 1 FROM series y JOIN instance z ON z.series = y.id \
             WHERE y.study = st.id AND z.sop_class_uid",
        ),
    ),
    key(
        0x0020_1206,
        b"IS",
        Level::Study,
        "(SELECT count(*) FROM series y WHERE y.study = st.id)",
        Kind::ReturnOnly,
    ),
    key(
        0x0020_1208,
        b"IS",
        Level::Study,
        "(SELECT count(DISTINCT z.sop_instance_uid) FROM series y JOIN instance z \
         ON z.series = y.id WHERE y.study = st.id)",
        Kind::ReturnOnly,
    ),
    key(
        TAG_SERIES_INSTANCE_UID,
        b"UI",
        Level::Series,
        "se.series_instance_uid",
        Kind::Uid,
    ),
    key(0x0008_0060, b"CS", Level::Series, "se.modality", Kind::Text),
    key(
        0x0020_0011,
        b"IS",
        Level::Series,
        "se.series_number",
        Kind::Integer,
    ),
    key(
        0x0008_103E,
        b"LO",
        Level::Series,
        "se.series_description",
        Kind::Text,
    ),
    key(
        0x0008_0021,
        b"DA",
        Level::Series,
        "se.series_date",
        Kind::Range,
    ),
    key(
        0x0018_0015,
        b"CS",
        Level::Series,
        "se.body_part_examined",
        Kind::Text,
    ),
    key(
        0x0020_1209,
        b"IS",
        Level::Series,
        "(SELECT count(DISTINCT z.sop_instance_uid) FROM instance z WHERE z.series = se.id)",
        Kind::ReturnOnly,
    ),
    key(
        0x0008_0018,
        b"UI",
        Level::Image,
        "i.sop_instance_uid",
        Kind::Uid,
    ),
    key(
        0x0008_0016,
        b"UI",
        Level::Image,
        "i.sop_class_uid",
        Kind::Uid,
    ),
    key(
        0x0020_0013,
        b"IS",
        Level::Image,
        "i.instance_number",
        Kind::Integer,
    ),
];

pub(super) fn known(tag: u32) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.tag == tag)
}

/// The information model of a query or retrieve (C-FIND, C-MOVE, C-GET).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// Patient Root
    PatientRoot,
    /// Study Root
    StudyRoot,
}

impl Model {
    /// The model of a FIND, MOVE or GET SOP class UID.
    pub fn of(sop_class: &str) -> Option<Model> {
        match sop_class {
            uid::PATIENT_ROOT_FIND | PATIENT_ROOT_MOVE | PATIENT_ROOT_GET => {
                Some(Model::PatientRoot)
            }
            uid::STUDY_ROOT_FIND | STUDY_ROOT_MOVE | STUDY_ROOT_GET => Some(Model::StudyRoot),
            _ => None,
        }
    }
}

/// Patient Root Query/Retrieve Information Model - MOVE
const PATIENT_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.1.2";
/// Patient Root Query/Retrieve Information Model - GET
const PATIENT_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.1.3";
/// Study Root Query/Retrieve Information Model - MOVE
const STUDY_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.2.2";
/// Study Root Query/Retrieve Information Model - GET
const STUDY_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";

/// One key of the identifier as received.
#[derive(Debug, Clone)]
pub struct Requested {
    /// its tag
    pub tag: u32,
    /// its VR in an explicit-VR identifier
    vr: Option<[u8; 2]>,
    /// its value, decoded to Unicode and trimmed of padding
    pub value: String,
    /// a sequence (returned empty, never matched)
    sequence: bool,
}

/// A parsed query.
#[derive(Debug, Clone)]
pub struct Query {
    /// the information model
    pub model: Model,
    /// the Query/Retrieve Level
    pub level: Level,
    /// the keys requested, in tag order (without the level and the
    /// character set)
    pub keys: Vec<Requested>,
    /// the identifier was explicit VR
    explicit: bool,
}

impl Query {
    /// The keys with a value (matching keys), for logs: `Tag=value`.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for k in &self.keys {
            if !out.is_empty() {
                out.push(' ');
            }
            let _ = write!(out, "({:04X},{:04X})", k.tag >> 16, k.tag & 0xFFFF);
            if !k.value.is_empty() {
                let _ = write!(out, "={}", k.value);
            }
        }
        out
    }
}

/// Why an identifier was not answered.
pub(super) fn fail(code: u16, comment: impl Into<String>) -> Failure {
    Failure::new(code, comment)
}

const ITEM: u32 = 0xFFFE_E000;
const ITEM_DELIMITATION: u32 = 0xFFFE_E00D;
const SEQUENCE_DELIMITATION: u32 = 0xFFFE_E0DD;
const UNDEFINED: u32 = 0xFFFF_FFFF;
const MAX_DEPTH: u32 = 8;

/// One element header read from an identifier.
struct Element {
    tag: u32,
    vr: Option<[u8; 2]>,
    /// value length (UNDEFINED for an undefined-length sequence)
    len: u32,
    /// where the value starts
    start: usize,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|v| u16::from_le_bytes([v[0], v[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|v| u32::from_le_bytes([v[0], v[1], v[2], v[3]]))
}

fn tag_at(b: &[u8], at: usize) -> Option<u32> {
    Some((u32::from(u16_at(b, at)?) << 16) | u32::from(u16_at(b, at + 2)?))
}

/// The element header at `at`.
fn element(b: &[u8], at: usize, explicit: bool) -> Result<Element, Failure> {
    let bad = || fail(status::UNABLE_TO_PROCESS, "identifier truncated");
    let tag = tag_at(b, at).ok_or_else(bad)?;
    if !explicit || tag >> 16 == 0xFFFE {
        let len = u32_at(b, at + 4).ok_or_else(bad)?;
        return Ok(Element {
            tag,
            vr: None,
            len,
            start: at + 8,
        });
    }
    let vr: [u8; 2] = b
        .get(at + 4..at + 6)
        .and_then(|v| v.try_into().ok())
        .ok_or_else(bad)?;
    let long = matches!(
        &vr,
        b"OB"
            | b"OW"
            | b"OF"
            | b"OD"
            | b"OL"
            | b"OV"
            | b"SQ"
            | b"UT"
            | b"UN"
            | b"UC"
            | b"UR"
            | b"SV"
            | b"UV"
    );
    let (len, start) = if long {
        (u32_at(b, at + 8).ok_or_else(bad)?, at + 12)
    } else {
        (u32::from(u16_at(b, at + 6).ok_or_else(bad)?), at + 8)
    };
    Ok(Element {
        tag,
        vr: Some(vr),
        len,
        start,
    })
}

/// Skips an undefined-length sequence whose items start at `at`; returns
/// where it ends.
fn skip_sequence(b: &[u8], mut at: usize, explicit: bool, depth: u32) -> Result<usize, Failure> {
    if depth > MAX_DEPTH {
        return Err(fail(status::UNABLE_TO_PROCESS, "sequences nested too deep"));
    }
    loop {
        let e = element(b, at, false)?;
        match (e.tag, e.len) {
            (SEQUENCE_DELIMITATION, _) => return Ok(e.start),
            (ITEM, UNDEFINED) => at = skip_item(b, e.start, explicit, depth + 1)?,
            (ITEM, len) => at = e.start + len as usize,
            _ => return Err(fail(status::UNABLE_TO_PROCESS, "malformed sequence")),
        }
        if at > b.len() {
            return Err(fail(status::UNABLE_TO_PROCESS, "identifier truncated"));
        }
    }
}

/// Skips the elements of an undefined-length item; returns where it ends.
fn skip_item(b: &[u8], mut at: usize, explicit: bool, depth: u32) -> Result<usize, Failure> {
    loop {
        let e = element(b, at, explicit)?;
        if e.tag == ITEM_DELIMITATION {
            return Ok(e.start);
        }
        at = if e.len == UNDEFINED {
            skip_sequence(b, e.start, explicit, depth + 1)?
        } else {
            e.start + e.len as usize
        };
        if at > b.len() {
            return Err(fail(status::UNABLE_TO_PROCESS, "identifier truncated"));
        }
    }
}

/// One top-level element as read: tag, explicit VR, value, is a sequence.
type RawElement<'a> = (u32, Option<[u8; 2]>, &'a [u8], bool);

/// Parses a C-FIND identifier of `model` in `transfer_syntax`.
pub fn parse(model: Model, transfer_syntax: &str, bytes: &[u8]) -> Result<Query, Failure> {
    let explicit = match transfer_syntax {
        uid::IMPLICIT_VR_LE => false,
        uid::EXPLICIT_VR_LE => true,
        other => {
            return Err(fail(
                status::UNABLE_TO_PROCESS,
                format!("identifier in transfer syntax {other}"),
            ))
        }
    };
    // Raw values first: the character set may come first, but the text is
    // decoded only once it is known.
    let mut raw: Vec<RawElement<'_>> = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let e = element(bytes, at, explicit)?;
        let sequence = e.len == UNDEFINED || e.vr == Some(*b"SQ");
        at = if e.len == UNDEFINED {
            skip_sequence(bytes, e.start, explicit, 0)?
        } else {
            let end = e.start + e.len as usize;
            if end > bytes.len() {
                return Err(fail(status::UNABLE_TO_PROCESS, "identifier truncated"));
            }
            let value = if sequence {
                &[][..]
            } else {
                &bytes[e.start..end]
            };
            raw.push((e.tag, e.vr, value, sequence));
            end
        };
        if e.len == UNDEFINED {
            raw.push((e.tag, e.vr, &[], true));
        }
    }
    let charset_value = raw
        .iter()
        .find(|r| r.0 == TAG_SPECIFIC_CHARACTER_SET)
        .map(|r| String::from_utf8_lossy(r.2).into_owned())
        .unwrap_or_default();
    let charset = CharacterSet::from_value(&charset_value);
    let mut level = None;
    let mut keys = Vec::new();
    for (tag, vr, value, sequence) in raw {
        // Group lengths and the command group are no keys.
        if tag & 0xFFFF == 0 || tag >> 16 == 0 || tag == TAG_SPECIFIC_CHARACTER_SET {
            continue;
        }
        let text = charset.decode(value);
        let text = text.trim_matches([' ', '\0']).to_string();
        if tag == TAG_QUERY_RETRIEVE_LEVEL {
            level = Some(text);
            continue;
        }
        keys.push(Requested {
            tag,
            vr,
            value: text,
            sequence,
        });
    }
    keys.sort_by_key(|k| k.tag);
    keys.dedup_by_key(|k| k.tag);
    let level = match level.as_deref().map(Level::parse) {
        None => {
            return Err(fail(
                status::IDENTIFIER_MISMATCH,
                "no Query/Retrieve Level (0008,0052)",
            ))
        }
        Some(None) => {
            return Err(fail(
                status::IDENTIFIER_MISMATCH,
                format!(
                    "Query/Retrieve Level {:?} is not PATIENT, STUDY, SERIES or IMAGE",
                    level.unwrap_or_default()
                ),
            ))
        }
        Some(Some(level)) => level,
    };
    if model == Model::StudyRoot && level == Level::Patient {
        return Err(fail(
            status::IDENTIFIER_MISMATCH,
            "PATIENT level in the Study Root model",
        ));
    }
    // Hierarchical: the unique keys of the levels above, single values.
    let mut above: Vec<(u32, &str)> = Vec::new();
    if model == Model::PatientRoot && level > Level::Patient {
        above.push((TAG_PATIENT_ID, "Patient ID"));
    }
    if level > Level::Study {
        above.push((TAG_STUDY_INSTANCE_UID, "Study Instance UID"));
    }
    if level > Level::Series {
        above.push((TAG_SERIES_INSTANCE_UID, "Series Instance UID"));
    }
    for (tag, name) in above {
        let value = keys.iter().find(|k| k.tag == tag).map(|k| k.value.as_str());
        match value {
            Some(v) if !v.is_empty() && !v.contains(['\\', '*', '?']) => {}
            _ => {
                return Err(fail(
                    status::IDENTIFIER_MISMATCH,
                    format!("{} level needs a single {name}", level.as_str()),
                ))
            }
        }
    }
    Ok(Query {
        model,
        level,
        keys,
        explicit,
    })
}

/// A key's SQL, its condition and its bound values, for one query.
struct Plan {
    sql: String,
    params: Vec<String>,
    /// for each requested key, the index of its column in the select, or
    /// None (returned empty)
    columns: Vec<Option<usize>>,
}

/// Escapes `value` for LIKE with `\` as the escape character, `*` and `?`
/// becoming `%` and `_`.
fn like_pattern(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// Escapes `value` for GLOB: `*` and `?` stay wildcards, `[` is put in a
/// class of its own (GLOB has no escape character).
fn glob_pattern(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '[' => out.push_str("[[]"),
            c => out.push(c),
        }
    }
    out
}

/// The condition one key with a value adds, and its parameters.
pub(super) fn condition(key: &Key, value: &str, params: &mut Vec<String>) -> Option<String> {
    let wild = value.contains(['*', '?']);
    let mut bind = |v: String| {
        params.push(v);
        format!("?{}", params.len())
    };
    match key.kind {
        Kind::ReturnOnly => None,
        // A lone `*` matches everything, as a universal match does.
        _ if value == "*" => None,
        Kind::PersonName if wild => Some(format!(
            "fold({}) LIKE {} ESCAPE '\\'",
            key.sql,
            bind(like_pattern(&fold(value)))
        )),
        Kind::PersonName => Some(format!("fold({}) = {}", key.sql, bind(fold(value)))),
        Kind::Text if wild => Some(format!("{} GLOB {}", key.sql, bind(glob_pattern(value)))),
        Kind::Uid | Kind::Text => {
            let list: Vec<String> = value
                .split('\\')
                .filter(|v| !v.is_empty())
                .map(|v| bind(v.trim().to_string()))
                .collect();
            Some(format!("{} IN ({})", key.sql, list.join(", ")))
        }
        Kind::Range => match value.split_once('-') {
            Some((from, to)) => {
                let mut parts = vec![format!("{} <> ''", key.sql)];
                if !from.trim().is_empty() {
                    parts.push(format!("{} >= {}", key.sql, bind(from.trim().to_string())));
                }
                if !to.trim().is_empty() {
                    // A time range ends at the end of its last unit.
                    let to = to.trim().to_string();
                    let to = if key.vr == *b"TM" {
                        format!("{to}\u{7f}")
                    } else {
                        to
                    };
                    parts.push(format!("{} <= {}", key.sql, bind(to)));
                }
                Some(parts.join(" AND "))
            }
            None => Some(format!("{} = {}", key.sql, bind(value.to_string()))),
        },
        Kind::Integer => match value.trim().parse::<i64>() {
            Ok(n) => Some(format!("{} = {}", key.sql, bind(n.to_string()))),
            // Not a number: nothing has it.
            Err(_) => Some("0".into()),
        },
        Kind::AnyChild(exists) => {
            let list: Vec<String> = value
                .split('\\')
                .filter(|v| !v.is_empty())
                .map(|v| bind(v.trim().to_string()))
                .collect();
            Some(format!("EXISTS ({exists} IN ({}))", list.join(", ")))
        }
    }
}

/// A person name as it is compared: Unicode lower case (enough for the
/// scripts a name index holds), without empty trailing components or
/// groups (`Wang^XiaoDong=王^小東=` is `Wang^XiaoDong=王^小東`).
pub(super) fn fold(text: &str) -> String {
    text.trim_end_matches(['=', '^', ' ']).to_lowercase()
}

fn plan(query: &Query) -> Plan {
    let mut selects: Vec<String> = Vec::new();
    let mut conditions: Vec<String> = Vec::new();
    let mut params = Vec::new();
    let mut columns = Vec::new();
    for k in &query.keys {
        let key = known(k.tag).filter(|key| !k.sequence && key.level <= query.level);
        let Some(key) = key else {
            columns.push(None);
            continue;
        };
        columns.push(Some(selects.len()));
        selects.push(key.sql.to_string());
        if !k.value.is_empty() {
            if let Some(c) = condition(key, &k.value, &mut params) {
                conditions.push(c);
            }
        }
    }
    if selects.is_empty() {
        selects.push("1".into());
    }
    let from = match query.level {
        Level::Patient => "patient p",
        Level::Study => "study st JOIN patient p ON p.id = st.patient",
        Level::Series => {
            "series se JOIN study st ON st.id = se.study JOIN patient p ON p.id = st.patient"
        }
        Level::Image => {
            "instance i JOIN series se ON se.id = i.series JOIN study st ON st.id = se.study \
             JOIN patient p ON p.id = st.patient"
        }
    };
    let (group, order) = match query.level {
        Level::Patient => ("", "p.id"),
        Level::Study => ("", "st.id"),
        Level::Series => ("", "se.id"),
        // Two files of one instance (overwrite off) are one match.
        Level::Image => (" GROUP BY i.sop_instance_uid", "min(i.id)"),
    };
    let mut sql = format!("SELECT {} FROM {from}", selects.join(", "));
    if !conditions.is_empty() {
        let _ = write!(sql, " WHERE {}", conditions.join(" AND "));
    }
    let _ = write!(sql, "{group} ORDER BY {order}");
    Plan {
        sql,
        params,
        columns,
    }
}

/// Appends one element to a response identifier.
fn put(out: &mut Vec<u8>, explicit: bool, tag: u32, vr: [u8; 2], value: &[u8]) {
    let pad = value.len() % 2;
    let len = value.len() + pad;
    out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
    out.extend_from_slice(&(tag as u16).to_le_bytes());
    if explicit {
        out.extend_from_slice(&vr);
        let long = matches!(&vr, b"OB" | b"OW" | b"SQ" | b"UT" | b"UN" | b"UC" | b"UR");
        if long {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(len as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(len as u16).to_le_bytes());
        }
    } else {
        out.extend_from_slice(&(len as u32).to_le_bytes());
    }
    out.extend_from_slice(value);
    if pad == 1 {
        out.push(if vr == *b"UI" { 0 } else { b' ' });
    }
}

/// Encodes one match: the requested keys (empty where unknown), the
/// level, the character set and the Retrieve AE Title, in tag order.
fn encode(query: &Query, values: &[Option<String>], retrieve_ae: &str) -> Vec<u8> {
    let mut elements: BTreeMap<u32, ([u8; 2], Vec<u8>)> = BTreeMap::new();
    elements.insert(TAG_SPECIFIC_CHARACTER_SET, (*b"CS", b"ISO_IR 192".to_vec()));
    elements.insert(
        TAG_QUERY_RETRIEVE_LEVEL,
        (*b"CS", query.level.as_str().as_bytes().to_vec()),
    );
    elements.insert(
        TAG_RETRIEVE_AE_TITLE,
        (*b"AE", retrieve_ae.as_bytes().to_vec()),
    );
    for (k, value) in query.keys.iter().zip(values) {
        let vr = if k.sequence {
            *b"SQ"
        } else {
            known(k.tag).map(|key| key.vr).or(k.vr).unwrap_or(*b"UN")
        };
        let bytes = value.as_deref().unwrap_or("").as_bytes().to_vec();
        elements.insert(k.tag, (vr, bytes));
    }
    let mut out = Vec::with_capacity(256);
    for (tag, (vr, value)) in elements {
        put(&mut out, query.explicit, tag, vr, &value);
    }
    out
}

/// Why an answer ended early.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// the receiver went away (cancel, association ended)
    Cancelled,
}

/// Runs `query` over `index` (blocking: call it on a blocking thread),
/// handing each encoded match to `send` as it is read, at most
/// `limit` of them (0: no limit). Returns the number of matches sent, or
/// the failure to end the answer with.
pub fn run(
    index: &super::Index,
    query: &Query,
    retrieve_ae: &str,
    limit: usize,
    mut send: impl FnMut(Vec<u8>) -> Result<(), Stopped>,
) -> Result<u64, Failure> {
    let db = |e: rusqlite::Error| fail(status::UNABLE_TO_PROCESS, format!("index: {e}"));
    let plan = plan(query);
    let conn = index.reader().map_err(db)?;
    let mut stmt = conn.prepare(&plan.sql).map_err(db)?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(plan.params.iter()))
        .map_err(db)?;
    let mut sent: u64 = 0;
    let mut values: Vec<Option<String>> = Vec::with_capacity(plan.columns.len());
    while let Some(row) = rows.next().map_err(db)? {
        if limit > 0 && sent as usize >= limit {
            return Err(fail(
                status::OUT_OF_RESOURCES,
                format!("more than {limit} matches (max_find_results): refine the query"),
            ));
        }
        values.clear();
        for column in &plan.columns {
            values.push(match column {
                None => None,
                Some(i) => {
                    let v: rusqlite::types::Value = row.get(*i).map_err(db)?;
                    Some(match v {
                        rusqlite::types::Value::Null => String::new(),
                        rusqlite::types::Value::Integer(n) => n.to_string(),
                        rusqlite::types::Value::Real(f) => f.to_string(),
                        rusqlite::types::Value::Text(t) => t,
                        rusqlite::types::Value::Blob(_) => String::new(),
                    })
                }
            });
        }
        if send(encode(query, &values, retrieve_ae)) == Err(Stopped::Cancelled) {
            return Ok(sent);
        }
        sent += 1;
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{Attributes, Entry, Index};

    /// An implicit-VR identifier of (tag, value) pairs.
    fn identifier(elements: &[(u32, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (tag, value) in elements {
            put(&mut out, false, *tag, *b"UN", value);
        }
        out
    }

    fn attributes(
        patient: &str,
        name: &str,
        study: &str,
        date: &str,
        series: &str,
        n: u32,
    ) -> Attributes {
        Attributes {
            transfer_syntax: uid::EXPLICIT_VR_LE.into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: format!("{series}.{n}"),
            study_instance_uid: study.into(),
            series_instance_uid: series.into(),
            patient_name: name.into(),
            patient_id: patient.into(),
            study_date: date.into(),
            modality: "CT".into(),
            ..Attributes::default()
        }
    }

    fn index() -> (tempfile::TempDir, Index) {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index.sqlite")).expect("opens");
        let rows = [
            attributes("P1", "Doe^Jane", "1.1", "20200101", "1.1.1", 1),
            attributes("P1", "Doe^Jane", "1.1", "20200101", "1.1.1", 2),
            attributes("P1", "Doe^Jane", "1.2", "20210615", "1.2.1", 1),
            attributes("P2", "Müller^Jörg", "2.1", "20191231", "2.1.1", 1),
        ];
        for (n, a) in rows.iter().enumerate() {
            let path = format!("f{n}");
            index
                .insert(&Entry {
                    path: &path,
                    size: 1,
                    received: 0,
                    attributes: a,
                })
                .expect("insert");
        }
        (dir, index)
    }

    fn answers(
        index: &Index,
        model: Model,
        elements: &[(u32, &[u8])],
    ) -> Result<Vec<Vec<u8>>, Failure> {
        let query = parse(model, uid::IMPLICIT_VR_LE, &identifier(elements))?;
        let mut out = Vec::new();
        run(index, &query, "MINIPACS", 0, |b| {
            out.push(b);
            Ok(())
        })?;
        Ok(out)
    }

    fn has(answer: &[u8], text: &str) -> bool {
        answer.windows(text.len()).any(|w| w == text.as_bytes())
    }

    #[test]
    fn studies_by_name_wildcard_date_range_and_uid_list() {
        let (_dir, index) = index();
        let level = (TAG_QUERY_RETRIEVE_LEVEL, &b"STUDY "[..]);
        let uid = (TAG_STUDY_INSTANCE_UID, &b""[..]);
        let all = answers(&index, Model::StudyRoot, &[level, uid]).expect("answers");
        assert_eq!(all.len(), 3);
        let doe = answers(
            &index,
            Model::StudyRoot,
            &[level, (0x0010_0010, b"doe*"), uid],
        )
        .expect("answers");
        assert_eq!(doe.len(), 2, "case-insensitive person name wildcard");
        let range = answers(
            &index,
            Model::StudyRoot,
            &[level, (0x0008_0020, b"20200101-20201231"), uid],
        )
        .expect("answers");
        assert_eq!(range.len(), 1);
        assert!(has(&range[0], "1.1"));
        let open = answers(
            &index,
            Model::StudyRoot,
            &[level, (0x0008_0020, b"-20200101"), uid],
        )
        .expect("answers");
        assert_eq!(open.len(), 2);
        let list = answers(
            &index,
            Model::StudyRoot,
            &[level, (TAG_STUDY_INSTANCE_UID, b"1.2\\2.1")],
        )
        .expect("answers");
        assert_eq!(list.len(), 2);
        // Latin-1 query, Unicode index.
        let latin1 = answers(
            &index,
            Model::StudyRoot,
            &[
                (TAG_SPECIFIC_CHARACTER_SET, b"ISO_IR 100"),
                level,
                (0x0010_0010, b"M\xfcller^J\xf6rg"),
                uid,
            ],
        )
        .expect("answers");
        assert_eq!(latin1.len(), 1);
        assert!(has(&latin1[0], "ISO_IR 192"));
        assert!(has(&latin1[0], "2.1"));
    }

    #[test]
    fn derived_counts_and_hierarchy() {
        let (_dir, index) = index();
        let got = answers(
            &index,
            Model::PatientRoot,
            &[
                (TAG_QUERY_RETRIEVE_LEVEL, b"PATIENT "),
                (TAG_PATIENT_ID, b"P1"),
                (0x0020_1200, b""),
                (0x0020_1204, b""),
            ],
        )
        .expect("answers");
        assert_eq!(got.len(), 1);
        // 2 studies (IS "2 " padded), 3 instances.
        assert!(has(&got[0], "2 ") && has(&got[0], "3 "));
        let images = answers(
            &index,
            Model::StudyRoot,
            &[
                (TAG_QUERY_RETRIEVE_LEVEL, b"IMAGE "),
                (0x0008_0018, b""),
                (TAG_STUDY_INSTANCE_UID, b"1.1"),
                (TAG_SERIES_INSTANCE_UID, b"1.1.1"),
            ],
        )
        .expect("answers");
        assert_eq!(images.len(), 2);
        let missing = answers(
            &index,
            Model::StudyRoot,
            &[
                (TAG_QUERY_RETRIEVE_LEVEL, b"SERIES"),
                (TAG_SERIES_INSTANCE_UID, b""),
            ],
        )
        .expect_err("needs the study");
        assert_eq!(missing.status, status::IDENTIFIER_MISMATCH);
        let no_level =
            answers(&index, Model::StudyRoot, &[(TAG_PATIENT_ID, b"")]).expect_err("no level");
        assert_eq!(no_level.status, status::IDENTIFIER_MISMATCH);
        let bad = parse(
            Model::StudyRoot,
            uid::IMPLICIT_VR_LE,
            &[8, 0, 0x52, 0, 9, 0],
        )
        .expect_err("truncated");
        assert_eq!(bad.status, status::UNABLE_TO_PROCESS);
    }

    #[test]
    fn the_limit_ends_the_answer_with_a_failure() {
        let (_dir, index) = index();
        let query = parse(
            Model::StudyRoot,
            uid::IMPLICIT_VR_LE,
            &identifier(&[
                (TAG_QUERY_RETRIEVE_LEVEL, b"STUDY "),
                (TAG_STUDY_INSTANCE_UID, b""),
            ]),
        )
        .expect("parses");
        let mut n = 0;
        let end = run(&index, &query, "MINIPACS", 2, |_| {
            n += 1;
            Ok(())
        });
        assert_eq!(n, 2);
        assert_eq!(end.expect_err("capped").status, status::OUT_OF_RESOURCES);
    }
}
