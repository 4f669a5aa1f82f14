//! Reading the file meta group of a DICOM Part-10 file: what the sender
//! needs to propose a presentation context and to find where the data set
//! starts. Only group 0002 is read; the data set is streamed later.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use dimse::uid::Uid;

/// What a Part-10 file says about itself.
#[derive(Debug, Clone)]
pub struct Part10Info {
    /// (0002,0002) Media Storage SOP Class UID
    pub sop_class: Uid,
    /// (0002,0003) Media Storage SOP Instance UID
    pub sop_instance: Uid,
    /// (0002,0010) Transfer Syntax UID
    pub transfer_syntax: Uid,
    /// byte offset of the data set (just past the meta group)
    pub data_offset: u64,
    /// data set length in bytes
    pub data_len: u64,
}

impl Part10Info {
    /// What follows the data set on the wire: PDV fragments have even
    /// length, and a deflated data set may end on an odd byte, so PS3.5
    /// A.5's one NUL of padding goes with it. Other data sets are even by
    /// construction and go exactly as stored.
    pub fn padding(&self) -> &'static [u8] {
        let deflated = self.transfer_syntax.as_str() == dimse::uid::DEFLATED_EXPLICIT_VR_LE;
        if deflated && self.data_len % 2 == 1 {
            &[0]
        } else {
            &[]
        }
    }
}

/// Why a file is not a sendable Part-10 file.
#[derive(Debug, thiserror::Error)]
pub enum Part10Error {
    /// The file could not be read.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// No `DICM` at offset 128.
    #[error("not a DICOM Part-10 file (no DICM prefix)")]
    NotPart10,
    /// The meta group lacks an element or has a bad one.
    #[error("file meta group: {0}")]
    BadMeta(&'static str),
}

/// Reads the file meta group of `path`.
pub fn read_meta(path: &Path) -> Result<Part10Info, Part10Error> {
    read_meta_of(&File::open(path)?)
}

/// Reads the file meta group of an open file, from its start (a file
/// opened through a folder's descriptor, as the retrieve path does). The
/// file's position is left wherever reading stopped.
pub fn read_meta_of(file: &File) -> Result<Part10Info, Part10Error> {
    let file_len = file.metadata()?.len();
    let mut r = BufReader::with_capacity(4096, file);
    let mut preamble = [0u8; 132];
    r.read_exact(&mut preamble).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Part10Error::NotPart10,
        _ => Part10Error::Io(e),
    })?;
    if &preamble[128..] != b"DICM" {
        return Err(Part10Error::NotPart10);
    }
    let mut pos = 132u64;
    let (mut class, mut instance, mut ts) = (None, None, None);
    loop {
        let mut tag = [0u8; 4];
        match r.read_exact(&mut tag) {
            Ok(()) => {}
            // A file of meta group only: an empty data set.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        let group = u16::from_le_bytes([tag[0], tag[1]]);
        if group != 0x0002 {
            break;
        }
        let element = u16::from_le_bytes([tag[2], tag[3]]);
        let mut vr = [0u8; 2];
        r.read_exact(&mut vr)?;
        let (len, header_len) =
            if matches!(&vr, b"OB" | b"OW" | b"UN" | b"UT" | b"SQ" | b"UC" | b"UR") {
                let mut b = [0u8; 6];
                r.read_exact(&mut b)?;
                (u32::from_le_bytes([b[2], b[3], b[4], b[5]]), 12u64)
            } else {
                let mut b = [0u8; 2];
                r.read_exact(&mut b)?;
                (u32::from(u16::from_le_bytes(b)), 8u64)
            };
        if len == u32::MAX || u64::from(len) > 1 << 20 {
            return Err(Part10Error::BadMeta("element length out of range"));
        }
        pos += header_len + u64::from(len);
        let wanted = matches!(element, 0x0002 | 0x0003 | 0x0010);
        if wanted && len <= 128 {
            let mut value = [0u8; 128];
            r.read_exact(&mut value[..len as usize])?;
            let uid = Uid::from_padded(&value[..len as usize]);
            match element {
                0x0002 => class = uid,
                0x0003 => instance = uid,
                _ => ts = uid,
            }
        } else {
            io::copy(&mut (&mut r).take(u64::from(len)), &mut io::sink())?;
        }
    }
    let data_offset = pos.min(file_len);
    Ok(Part10Info {
        sop_class: class.ok_or(Part10Error::BadMeta("no valid Media Storage SOP Class UID"))?,
        sop_instance: instance.ok_or(Part10Error::BadMeta(
            "no valid Media Storage SOP Instance UID",
        ))?,
        transfer_syntax: ts.ok_or(Part10Error::BadMeta("no valid Transfer Syntax UID"))?,
        data_offset,
        data_len: file_len - data_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_meta_and_finds_the_data_set() {
        let mut bytes = vec![0u8; 128];
        bytes.extend_from_slice(b"DICM");
        let element = |out: &mut Vec<u8>, e: u16, vr: &[u8; 2], v: &[u8]| {
            out.extend_from_slice(&2u16.to_le_bytes());
            out.extend_from_slice(&e.to_le_bytes());
            out.extend_from_slice(vr);
            if vr == b"OB" {
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            } else {
                out.extend_from_slice(&(v.len() as u16).to_le_bytes());
            }
            out.extend_from_slice(v);
        };
        element(&mut bytes, 0x0001, b"OB", &[0, 1]);
        element(&mut bytes, 0x0002, b"UI", b"1.2.840.10008.5.1.4.1.1.7\0");
        element(&mut bytes, 0x0003, b"UI", b"1.2.3.4");
        element(&mut bytes, 0x0010, b"UI", b"1.2.840.10008.1.2\0");
        let offset = bytes.len();
        bytes.extend_from_slice(&[0x08, 0x00, 0x16, 0x00, 2, 0, 0, 0, b'1', 0]);
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        f.write_all(&bytes).expect("write");
        let info = read_meta(f.path()).expect("reads");
        assert_eq!(info.data_offset, offset as u64);
        assert_eq!(info.data_len, 10);
        assert_eq!(info.sop_instance.as_str(), "1.2.3.4");
        assert_eq!(info.transfer_syntax.as_str(), "1.2.840.10008.1.2");
    }

    #[test]
    fn rejects_non_part10() {
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        f.write_all(&[0u8; 200]).expect("write");
        assert!(matches!(read_meta(f.path()), Err(Part10Error::NotPart10)));
    }
}
