//! Reads the Study and Series Instance UIDs from a stored data set, for the
//! `study` layout.
//!
//! The data set is already on disk, exactly as received, so the header is
//! read back after the fact (dcmtk cannot sort in bit-preserving mode; we
//! can). Top-level elements are walked in tag order and skipped without
//! being kept; the walk stops at the first tag past (0020,000E), so pixel
//! data is never read. Memory is a small fixed buffer whatever the object.
//!
//! Not yet one walker with [`crate::index::header`], which does the same
//! walk for many more tags from the file's start: this one reads the data
//! set at an offset with the presentation context's syntax, falls back to
//! `_unsorted` where that one fails (no UIDs), and is the `stored_header`
//! fuzz target. Merging them means the commit reads the header once and
//! hands the attributes to both the layout and the index (one header read
//! per object instead of two in the study layout): left for later.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};

use dimse::uid::{self, Uid};

const STUDY_INSTANCE_UID: u32 = 0x0020_000D;
const SERIES_INSTANCE_UID: u32 = 0x0020_000E;
const ITEM: u32 = 0xFFFE_E000;
const ITEM_DELIMITATION: u32 = 0xFFFE_E00D;
const SEQUENCE_DELIMITATION: u32 = 0xFFFE_E0DD;
const UNDEFINED: u32 = 0xFFFF_FFFF;
/// Give up (and file the object as unsorted) after this many bytes.
const SCAN_LIMIT: u64 = 64 << 20;
/// Give up on sequences nested deeper than this.
const MAX_DEPTH: u32 = 16;

/// Returns the Study and Series Instance UIDs of the data set that starts at
/// `offset` in `file`, each `None` when absent, invalid or unreadable.
pub fn study_and_series(file: &mut File, offset: u64, ts: &Uid) -> (Option<Uid>, Option<Uid>) {
    let Ok(mut handle) = file.try_clone() else {
        return (None, None);
    };
    if handle.seek(SeekFrom::Start(offset)).is_err() {
        return (None, None);
    }
    study_and_series_in(BufReader::with_capacity(8192, handle), ts)
}

/// Returns the Study and Series Instance UIDs of the data set `data` (in
/// transfer syntax `ts`), reading at most 64 MiB of it (decompressed, for
/// deflate). Whatever the bytes, it returns: the fuzz target
/// `stored_header` holds it to that.
pub fn study_and_series_in(data: impl Read, ts: &Uid) -> (Option<Uid>, Option<Uid>) {
    let syntax = match ts.as_str() {
        uid::IMPLICIT_VR_LE => Syntax {
            explicit: false,
            big_endian: false,
        },
        uid::EXPLICIT_VR_BE => Syntax {
            explicit: true,
            big_endian: true,
        },
        _ => Syntax {
            explicit: true,
            big_endian: false,
        },
    };
    let buffered = data.take(SCAN_LIMIT);
    let mut found = Found::default();
    if ts.as_str() == uid::DEFLATED_EXPLICIT_VR_LE {
        let mut scanner = Scanner {
            r: flate2::read::DeflateDecoder::new(buffered).take(SCAN_LIMIT),
        };
        let _ = scanner.top_level(syntax, &mut found);
    } else {
        let mut scanner = Scanner { r: buffered };
        let _ = scanner.top_level(syntax, &mut found);
    }
    (found.study, found.series)
}

#[derive(Default)]
struct Found {
    study: Option<Uid>,
    series: Option<Uid>,
}

#[derive(Clone, Copy)]
struct Syntax {
    explicit: bool,
    big_endian: bool,
}

struct Scanner<R> {
    r: R,
}

/// What a walk step saw: more to read, or the end of the region.
enum Step {
    More,
    Done,
}

impl<R: Read> Scanner<R> {
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
        let nested = if &vr == b"UN" {
            Syntax {
                explicit: false,
                big_endian: false,
            }
        } else {
            s
        };
        Ok((len, nested))
    }

    fn top_level(&mut self, s: Syntax, found: &mut Found) -> io::Result<()> {
        loop {
            let tag = match self.tag(s) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            };
            if tag > SERIES_INSTANCE_UID || tag >> 16 == 0xFFFE {
                return Ok(());
            }
            let (len, nested) = self.vr_and_len(s)?;
            if tag == STUDY_INSTANCE_UID || tag == SERIES_INSTANCE_UID {
                if len > 128 {
                    return Ok(());
                }
                let mut value = [0u8; 128];
                let value = &mut value[..len as usize];
                self.r.read_exact(value)?;
                let parsed = Uid::from_padded(value);
                if tag == STUDY_INSTANCE_UID {
                    found.study = parsed;
                } else {
                    found.series = parsed;
                    return Ok(());
                }
            } else if len == UNDEFINED {
                self.sequence(nested, 1)?;
            } else {
                self.skip(u64::from(len))?;
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
                ITEM if len == UNDEFINED => while let Step::More = self.item_element(s, depth)? {},
                ITEM => self.skip(u64::from(len))?,
                _ => return Err(io::ErrorKind::InvalidData.into()),
            }
        }
    }

    /// Skips one element of an undefined-length item.
    fn item_element(&mut self, s: Syntax, depth: u32) -> io::Result<Step> {
        let tag = self.tag(s)?;
        if tag == ITEM_DELIMITATION {
            self.skip(4)?;
            return Ok(Step::Done);
        }
        let (len, nested) = self.vr_and_len(s)?;
        if len == UNDEFINED {
            self.sequence(nested, depth + 1)?;
        } else {
            self.skip(u64::from(len))?;
        }
        Ok(Step::More)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn explicit_element(out: &mut Vec<u8>, group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) {
        out.extend_from_slice(&group.to_le_bytes());
        out.extend_from_slice(&elem.to_le_bytes());
        out.extend_from_slice(vr);
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        out.extend_from_slice(value);
    }

    #[test]
    fn finds_uids_past_an_undefined_length_sequence() {
        let mut ds = Vec::new();
        explicit_element(
            &mut ds,
            0x0008,
            0x0016,
            b"UI",
            b"1.2.840.10008.5.1.4.1.1.2\0",
        );
        // (0008,1140) SQ, undefined length, one undefined-length item.
        ds.extend_from_slice(&[0x08, 0x00, 0x40, 0x11, b'S', b'Q', 0, 0]);
        ds.extend_from_slice(&UNDEFINED.to_le_bytes());
        ds.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
        ds.extend_from_slice(&UNDEFINED.to_le_bytes());
        explicit_element(&mut ds, 0x0008, 0x1150, b"UI", b"1.2\0");
        ds.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        ds.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        explicit_element(&mut ds, 0x0020, 0x000D, b"UI", b"1.2.3.4\0");
        explicit_element(&mut ds, 0x0020, 0x000E, b"UI", b"1.2.3.4.5\0");
        explicit_element(&mut ds, 0x7FE0, 0x0010, b"OW", &[0; 4]);

        let mut f = tempfile::tempfile().expect("tempfile");
        f.write_all(&[0xAA; 10]).expect("write");
        f.write_all(&ds).expect("write");
        let ts = Uid::new(uid::EXPLICIT_VR_LE).expect("valid");
        let (study, series) = study_and_series(&mut f, 10, &ts);
        assert_eq!(study.map(|u| u.to_string()), Some("1.2.3.4".into()));
        assert_eq!(series.map(|u| u.to_string()), Some("1.2.3.4.5".into()));
    }

    #[test]
    fn garbage_yields_none() {
        let mut f = tempfile::tempfile().expect("tempfile");
        f.write_all(&[
            0x08, 0, 0x16, 0, b'S', b'Q', 0, 0, 0xff, 0xff, 0xff, 0xff, 1, 2,
        ])
        .expect("write");
        let ts = Uid::new(uid::EXPLICIT_VR_LE).expect("valid");
        assert_eq!(study_and_series(&mut f, 0, &ts), (None, None));
    }
}
