//! The attributes the index keeps, read from a stored Part-10 file by a
//! bounded streaming walk.
//!
//! The file meta group gives the transfer syntax and where the data set
//! starts; the data set's top-level elements are then walked in tag order
//! through a small fixed buffer (inflated on the way for deflate), the few
//! wanted values kept (each capped at [`VALUE_CAP`] bytes) and everything
//! else skipped unread, undefined-length sequences included. The walk stops
//! at the first tag past the last one wanted, so Pixel Data is never read:
//! memory and time do not grow with the object. Text is decoded with the
//! data set's Specific Character Set ([`super::charset`]).
//!
//! The walk is the one `store::header` does for the study layout, grown to
//! many tags and the meta group.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use dimse::uid;

use super::charset::CharacterSet;

/// Values longer than this are cut (no indexed attribute is longer: LO is
/// 64 characters, PN 64 per component group, at most 4 bytes each).
pub const VALUE_CAP: usize = 1024;
/// Give up after this many bytes of data set (inflated, for deflate).
const SCAN_LIMIT: u64 = 64 << 20;
/// Give up on sequences nested deeper than this.
const MAX_DEPTH: u32 = 16;
/// The meta group is never this long in a file the store wrote.
const META_LIMIT: u32 = 64 << 10;

const ITEM: u32 = 0xFFFE_E000;
const ITEM_DELIMITATION: u32 = 0xFFFE_E00D;
const SEQUENCE_DELIMITATION: u32 = 0xFFFE_E0DD;
const UNDEFINED: u32 = 0xFFFF_FFFF;

/// Why a file's header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// Reading the file failed.
    #[error("reading: {0}")]
    Io(#[from] io::Error),
    /// The file is not a Part-10 file (no `DICM`, no meta group length or
    /// transfer syntax).
    #[error("not a DICOM Part-10 file: {0}")]
    NotPart10(&'static str),
    /// The data set has no SOP Instance UID, Study or Series Instance UID.
    #[error("no {0} in the data set")]
    Missing(&'static str),
}

/// The wanted data set attributes, in tag order: the walk's table.
const WANTED: [(u32, Field); 21] = [
    (0x0008_0005, Field::SpecificCharacterSet),
    (0x0008_0016, Field::SopClassUid),
    (0x0008_0018, Field::SopInstanceUid),
    (0x0008_0020, Field::StudyDate),
    (0x0008_0021, Field::SeriesDate),
    (0x0008_0030, Field::StudyTime),
    (0x0008_0050, Field::AccessionNumber),
    (0x0008_0060, Field::Modality),
    (0x0008_0090, Field::ReferringPhysicianName),
    (0x0008_1030, Field::StudyDescription),
    (0x0008_103E, Field::SeriesDescription),
    (0x0010_0010, Field::PatientName),
    (0x0010_0020, Field::PatientId),
    (0x0010_0030, Field::PatientBirthDate),
    (0x0010_0040, Field::PatientSex),
    (0x0018_0015, Field::BodyPartExamined),
    (0x0020_000D, Field::StudyInstanceUid),
    (0x0020_000E, Field::SeriesInstanceUid),
    (0x0020_0010, Field::StudyId),
    (0x0020_0011, Field::SeriesNumber),
    (0x0020_0013, Field::InstanceNumber),
];

/// One wanted attribute; the discriminant indexes [`Raw::values`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Field {
    SpecificCharacterSet,
    SopClassUid,
    SopInstanceUid,
    StudyDate,
    SeriesDate,
    StudyTime,
    AccessionNumber,
    Modality,
    ReferringPhysicianName,
    StudyDescription,
    SeriesDescription,
    PatientName,
    PatientId,
    PatientBirthDate,
    PatientSex,
    BodyPartExamined,
    StudyInstanceUid,
    SeriesInstanceUid,
    StudyId,
    SeriesNumber,
    InstanceNumber,
}

/// An object's indexed attributes, as Unicode text (empty when absent),
/// trimmed of DICOM padding. Person names keep their `^` and `=`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // each field is the DICOM attribute of its name
pub struct Attributes {
    pub transfer_syntax: String,
    /// (0002,0016) Source Application Entity Title: the AE title that sent
    /// the object to us (empty when the meta group has none)
    pub source_ae: String,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub patient_name: String,
    pub patient_id: String,
    pub patient_birth_date: String,
    pub patient_sex: String,
    pub study_date: String,
    pub study_time: String,
    pub accession_number: String,
    pub study_id: String,
    pub study_description: String,
    pub referring_physician_name: String,
    pub modality: String,
    pub series_number: Option<i64>,
    pub series_description: String,
    pub series_date: String,
    pub body_part_examined: String,
    pub instance_number: Option<i64>,
}

/// Reads the attributes of the Part-10 file at `path`.
pub fn read_file(path: &Path) -> Result<Attributes, HeaderError> {
    read(BufReader::with_capacity(8192, File::open(path)?))
}

/// Reads the attributes of a Part-10 stream (preamble, `DICM`, meta group,
/// data set), reading no further than the last wanted attribute.
pub fn read(mut r: impl Read) -> Result<Attributes, HeaderError> {
    let mut preamble = [0u8; 132];
    r.read_exact(&mut preamble)?;
    if &preamble[128..] != b"DICM" {
        return Err(HeaderError::NotPart10("no DICM prefix"));
    }
    let Meta {
        transfer_syntax,
        source_ae,
    } = meta_group(&mut r)?;
    let syntax = match transfer_syntax.as_str() {
        uid::IMPLICIT_VR_LE => Syntax::IMPLICIT_LE,
        uid::EXPLICIT_VR_BE => Syntax {
            explicit: true,
            big_endian: true,
        },
        _ => Syntax::EXPLICIT_LE,
    };
    let mut raw = Raw::default();
    let limited = r.take(SCAN_LIMIT);
    if transfer_syntax == uid::DEFLATED_EXPLICIT_VR_LE {
        let inflated = flate2::read::DeflateDecoder::new(limited).take(SCAN_LIMIT);
        Walker { r: inflated }.top_level(syntax, &mut raw)?;
    } else {
        Walker { r: limited }.top_level(syntax, &mut raw)?;
    }
    let mut attributes = raw.decode(transfer_syntax)?;
    attributes.source_ae = source_ae;
    Ok(attributes)
}

/// What the index keeps of the file meta group.
struct Meta {
    /// (0002,0010) Transfer Syntax UID
    transfer_syntax: String,
    /// (0002,0016) Source Application Entity Title (empty when absent)
    source_ae: String,
}

/// Reads the meta group (explicit VR little endian, led by its group
/// length), leaving `r` at the data set.
fn meta_group(r: &mut impl Read) -> Result<Meta, HeaderError> {
    let mut w = Walker { r };
    let s = Syntax::EXPLICIT_LE;
    if w.tag(s)? != 0x0002_0000 {
        return Err(HeaderError::NotPart10("no meta group length"));
    }
    let (len, _) = w.vr_and_len(s)?;
    if len != 4 {
        return Err(HeaderError::NotPart10("bad meta group length"));
    }
    let group_len = w.u32(s)?;
    if group_len > META_LIMIT {
        return Err(HeaderError::NotPart10("meta group too long"));
    }
    let mut meta = (&mut w.r).take(u64::from(group_len));
    let mut m = Walker { r: &mut meta };
    let mut ts = None;
    let mut source_ae = String::new();
    loop {
        let tag = match m.tag(s) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        };
        let (len, _) = m.vr_and_len(s)?;
        if tag == 0x0002_0010 && (len as usize) <= 64 {
            let mut value = [0u8; 64];
            let value = &mut value[..len as usize];
            m.r.read_exact(value)?;
            ts = Some(trim(&String::from_utf8_lossy(value)).to_string());
        } else if tag == 0x0002_0016 && (len as usize) <= 16 {
            // Source AE Title: the store writes the sender's calling AE
            // title here, which forwarding rules match on.
            let mut value = [0u8; 16];
            let value = &mut value[..len as usize];
            m.r.read_exact(value)?;
            source_ae = trim(&String::from_utf8_lossy(value)).to_string();
        } else {
            m.skip(u64::from(len))?;
        }
    }
    let transfer_syntax = ts
        .filter(|t| !t.is_empty())
        .ok_or(HeaderError::NotPart10("no transfer syntax"))?;
    Ok(Meta {
        transfer_syntax,
        source_ae,
    })
}

/// The raw values of the wanted attributes, before decoding.
#[derive(Default)]
struct Raw {
    values: [Option<Vec<u8>>; WANTED.len()],
}

impl Raw {
    fn get(&self, field: Field) -> &[u8] {
        self.values[field as usize].as_deref().unwrap_or_default()
    }

    fn decode(self, transfer_syntax: String) -> Result<Attributes, HeaderError> {
        let charset = CharacterSet::from_value(&ascii(self.get(Field::SpecificCharacterSet)));
        let text = |f| trim(&charset.decode(self.get(f))).to_string();
        let code = |f| trim(&ascii(self.get(f))).to_string();
        let number = |f| code(f).parse::<i64>().ok();
        let a = Attributes {
            transfer_syntax,
            source_ae: String::new(),
            sop_class_uid: code(Field::SopClassUid),
            sop_instance_uid: code(Field::SopInstanceUid),
            study_instance_uid: code(Field::StudyInstanceUid),
            series_instance_uid: code(Field::SeriesInstanceUid),
            patient_name: text(Field::PatientName),
            patient_id: text(Field::PatientId),
            patient_birth_date: code(Field::PatientBirthDate),
            patient_sex: code(Field::PatientSex),
            study_date: code(Field::StudyDate),
            study_time: code(Field::StudyTime),
            accession_number: text(Field::AccessionNumber),
            study_id: text(Field::StudyId),
            study_description: text(Field::StudyDescription),
            referring_physician_name: text(Field::ReferringPhysicianName),
            modality: code(Field::Modality),
            series_number: number(Field::SeriesNumber),
            series_description: text(Field::SeriesDescription),
            series_date: code(Field::SeriesDate),
            body_part_examined: code(Field::BodyPartExamined),
            instance_number: number(Field::InstanceNumber),
        };
        for (value, name) in [
            (&a.sop_instance_uid, "SOP Instance UID"),
            (&a.study_instance_uid, "Study Instance UID"),
            (&a.series_instance_uid, "Series Instance UID"),
        ] {
            if value.is_empty() {
                return Err(HeaderError::Missing(name));
            }
        }
        Ok(a)
    }
}

/// Code strings, UIDs, dates and numbers are ASCII by definition.
fn ascii(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// DICOM pads with spaces (text) or NUL (UIDs).
fn trim(s: &str) -> &str {
    s.trim_matches([' ', '\0'])
}

#[derive(Clone, Copy)]
struct Syntax {
    explicit: bool,
    big_endian: bool,
}

impl Syntax {
    const IMPLICIT_LE: Syntax = Syntax {
        explicit: false,
        big_endian: false,
    };
    const EXPLICIT_LE: Syntax = Syntax {
        explicit: true,
        big_endian: false,
    };
}

/// Walks elements through whatever reader it is given.
struct Walker<R> {
    r: R,
}

impl<R: Read> Walker<R> {
    fn u16(&mut self, s: Syntax) -> io::Result<u16> {
        let mut b = [0; 2];
        self.r.read_exact(&mut b)?;
        Ok(if s.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32(&mut self, s: Syntax) -> io::Result<u32> {
        let mut b = [0; 4];
        self.r.read_exact(&mut b)?;
        Ok(if s.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    fn tag(&mut self, s: Syntax) -> io::Result<u32> {
        let group = self.u16(s)?;
        let element = self.u16(s)?;
        Ok((u32::from(group) << 16) | u32::from(element))
    }

    fn skip(&mut self, n: u64) -> io::Result<()> {
        let copied = io::copy(&mut (&mut self.r).take(n), &mut io::sink())?;
        if copied < n {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// Reads an element's VR and length; returns (length, nested syntax).
    /// An undefined-length UN holds implicit-VR little endian content.
    fn vr_and_len(&mut self, s: Syntax) -> io::Result<(u32, Syntax)> {
        if !s.explicit {
            return Ok((self.u32(s)?, s));
        }
        let mut vr = [0; 2];
        self.r.read_exact(&mut vr)?;
        let long = matches!(
            &vr,
            b"OB"
                | b"OD"
                | b"OF"
                | b"OL"
                | b"OV"
                | b"OW"
                | b"SQ"
                | b"SV"
                | b"UC"
                | b"UN"
                | b"UR"
                | b"UT"
                | b"UV"
        );
        let len = if long {
            self.skip(2)?;
            self.u32(s)?
        } else {
            u32::from(self.u16(s)?)
        };
        let nested = if &vr == b"UN" { Syntax::IMPLICIT_LE } else { s };
        Ok((len, nested))
    }

    /// Walks the top level, keeping the wanted values, until the last
    /// wanted tag is passed or the data set ends.
    fn top_level(&mut self, s: Syntax, raw: &mut Raw) -> io::Result<()> {
        let last = WANTED[WANTED.len() - 1].0;
        loop {
            let tag = match self.tag(s) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            };
            if tag > last || tag >> 16 == 0xFFFE {
                return Ok(());
            }
            let (len, nested) = self.vr_and_len(s)?;
            match WANTED.iter().find(|(t, _)| *t == tag) {
                Some(&(_, field)) if len != UNDEFINED => {
                    let keep = (len as usize).min(VALUE_CAP);
                    let mut value = vec![0; keep];
                    self.r.read_exact(&mut value)?;
                    self.skip(u64::from(len) - keep as u64)?;
                    raw.values[field as usize] = Some(value);
                }
                _ if len == UNDEFINED => self.sequence(nested, 1)?,
                _ => self.skip(u64::from(len))?,
            }
        }
    }

    /// Skips the items of an undefined-length sequence, up to and including
    /// its sequence delimitation item.
    fn sequence(&mut self, s: Syntax, depth: u32) -> io::Result<()> {
        if depth > MAX_DEPTH {
            return Err(io::ErrorKind::InvalidData.into());
        }
        loop {
            let tag = self.tag(s)?;
            let len = self.u32(s)?;
            match tag {
                SEQUENCE_DELIMITATION => return Ok(()),
                ITEM if len == UNDEFINED => while self.item_element(s, depth)? {},
                ITEM => self.skip(u64::from(len))?,
                _ => return Err(io::ErrorKind::InvalidData.into()),
            }
        }
    }

    /// Skips one element of an undefined-length item; false at its end.
    fn item_element(&mut self, s: Syntax, depth: u32) -> io::Result<bool> {
        let tag = self.tag(s)?;
        if tag == ITEM_DELIMITATION {
            self.skip(4)?;
            return Ok(false);
        }
        let (len, nested) = self.vr_and_len(s)?;
        if len == UNDEFINED {
            self.sequence(nested, depth + 1)?;
        } else {
            self.skip(u64::from(len))?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// One element in `s`'s encoding (short-length VRs only, plus SQ).
    fn element(out: &mut Vec<u8>, s: Syntax, tag: u32, vr: &[u8; 2], value: &[u8]) {
        let (g, e) = ((tag >> 16) as u16, tag as u16);
        let be = s.big_endian;
        let u16b = |v: u16| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        out.extend_from_slice(&u16b(g));
        out.extend_from_slice(&u16b(e));
        if s.explicit {
            out.extend_from_slice(vr);
            out.extend_from_slice(&u16b(value.len() as u16));
        } else {
            let len = value.len() as u32;
            out.extend_from_slice(&if be {
                len.to_be_bytes()
            } else {
                len.to_le_bytes()
            });
        }
        out.extend_from_slice(value);
    }

    fn part10(ts: &str, data_set: &[u8]) -> Vec<u8> {
        let mut ts_value = ts.as_bytes().to_vec();
        if ts_value.len() % 2 == 1 {
            ts_value.push(0);
        }
        let mut meta = Vec::new();
        element(
            &mut meta,
            Syntax::EXPLICIT_LE,
            0x0002_0010,
            b"UI",
            &ts_value,
        );
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        element(
            &mut out,
            Syntax::EXPLICIT_LE,
            0x0002_0000,
            b"UL",
            &(meta.len() as u32).to_le_bytes(),
        );
        out.extend_from_slice(&meta);
        out.extend_from_slice(data_set);
        out
    }

    fn data_set(s: Syntax) -> Vec<u8> {
        let mut ds = Vec::new();
        element(&mut ds, s, 0x0008_0005, b"CS", b"ISO_IR 100");
        element(
            &mut ds,
            s,
            0x0008_0016,
            b"UI",
            b"1.2.840.10008.5.1.4.1.1.2\0",
        );
        element(&mut ds, s, 0x0008_0018, b"UI", b"1.2.3.4.5.6\0");
        element(&mut ds, s, 0x0008_0060, b"CS", b"CT");
        // An undefined-length sequence to skip: (0008,1140), one empty item.
        let mut sq = Vec::new();
        element(&mut sq, s, 0x0008_1140, b"SQ", b"");
        sq.truncate(sq.len() - if s.explicit { 2 } else { 4 });
        if s.explicit {
            sq.extend_from_slice(&[0, 0]);
        }
        ds.extend_from_slice(&sq);
        let u32b = |v: u32| {
            if s.big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        ds.extend_from_slice(&u32b(UNDEFINED));
        for (tag, len) in [
            (ITEM, UNDEFINED),
            (ITEM_DELIMITATION, 0),
            (SEQUENCE_DELIMITATION, 0),
        ] {
            let (g, e) = ((tag >> 16) as u16, tag as u16);
            let u16b = |v: u16| {
                if s.big_endian {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                }
            };
            ds.extend_from_slice(&u16b(g));
            ds.extend_from_slice(&u16b(e));
            ds.extend_from_slice(&u32b(len));
        }
        element(&mut ds, s, 0x0010_0010, b"PN", b"Buc^J\xe9r\xf4me");
        element(&mut ds, s, 0x0010_0020, b"LO", b"ID1 ");
        element(&mut ds, s, 0x0020_000D, b"UI", b"1.2.3\0");
        element(&mut ds, s, 0x0020_000E, b"UI", b"1.2.3.4\0");
        element(&mut ds, s, 0x0020_0013, b"IS", b"7 ");
        // Past the last wanted tag: never read (a bogus length proves it).
        element(&mut ds, s, 0x7FE0_0010, b"OB", b"");
        ds.extend_from_slice(&[0xFF; 16]);
        ds
    }

    fn check(a: &Attributes) {
        assert_eq!(a.sop_instance_uid, "1.2.3.4.5.6");
        assert_eq!(a.study_instance_uid, "1.2.3");
        assert_eq!(a.series_instance_uid, "1.2.3.4");
        assert_eq!(a.patient_name, "Buc^Jérôme");
        assert_eq!(a.patient_id, "ID1");
        assert_eq!(a.modality, "CT");
        assert_eq!(a.instance_number, Some(7));
    }

    #[test]
    fn reads_every_transfer_syntax_the_store_takes() {
        let be = Syntax {
            explicit: true,
            big_endian: true,
        };
        for (ts, s) in [
            (uid::IMPLICIT_VR_LE, Syntax::IMPLICIT_LE),
            (uid::EXPLICIT_VR_LE, Syntax::EXPLICIT_LE),
            (uid::EXPLICIT_VR_BE, be),
        ] {
            let a = read(part10(ts, &data_set(s)).as_slice()).expect(ts);
            assert_eq!(a.transfer_syntax, ts);
            check(&a);
        }
        let mut deflated =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        deflated
            .write_all(&data_set(Syntax::EXPLICIT_LE))
            .expect("deflate");
        let bytes = part10(
            uid::DEFLATED_EXPLICIT_VR_LE,
            &deflated.finish().expect("deflate"),
        );
        check(&read(bytes.as_slice()).expect("deflate"));
    }

    #[test]
    fn not_part10_and_missing_uids_are_errors() {
        assert!(matches!(
            read(&[0u8; 200][..]),
            Err(HeaderError::NotPart10(_))
        ));
        let mut ds = Vec::new();
        element(&mut ds, Syntax::EXPLICIT_LE, 0x0008_0018, b"UI", b"1.2\0");
        let bytes = part10(uid::EXPLICIT_VR_LE, &ds);
        assert!(matches!(
            read(bytes.as_slice()),
            Err(HeaderError::Missing(_))
        ));
    }
}
