//! Application Entity titles (PS3.5 §6.2, VR AE).
//!
//! An AE title names a DICOM node in every association; it is checked when a
//! configuration is read and compared when a request arrives, so the rule
//! lives in one place and the value travels as a type that cannot break it.

use std::fmt;

/// The longest AE title (16 characters, PS3.5 Table 6.2-1).
pub const MAX_LEN: usize = 16;

/// Why a string is not an AE title.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AeTitleError {
    /// Empty, or only spaces (spaces are padding, not significant).
    #[error("must not be empty")]
    Empty,
    /// More than 16 characters.
    #[error("\"{0}\" is longer than 16 characters")]
    TooLong(String),
    /// A control character, a backslash (the value separator) or a byte
    /// outside ASCII.
    #[error("\"{0}\" may hold only printable ASCII without backslash")]
    BadCharacter(String),
}

/// A valid AE title, without its padding spaces.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AeTitle(heapless::String<MAX_LEN>);

impl AeTitle {
    /// Validates `s` (leading and trailing spaces are padding and dropped).
    pub fn new(s: &str) -> Result<Self, AeTitleError> {
        if s.len() > MAX_LEN {
            return Err(AeTitleError::TooLong(s.to_string()));
        }
        if !s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\') {
            return Err(AeTitleError::BadCharacter(s.to_string()));
        }
        let trimmed = s.trim_matches(' ');
        if trimmed.is_empty() {
            return Err(AeTitleError::Empty);
        }
        heapless::String::try_from(trimmed)
            .map(AeTitle)
            .map_err(|_| AeTitleError::TooLong(s.to_string()))
    }

    /// The title as text, without padding.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for AeTitle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for AeTitle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AeTitle({})", self.as_str())
    }
}

impl std::str::FromStr for AeTitle {
    type Err = AeTitleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AeTitle::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        assert_eq!(
            AeTitle::new("MINIPACS").map(|a| a.to_string()),
            Ok("MINIPACS".into())
        );
        assert_eq!(
            AeTitle::new(" CT 1 ").map(|a| a.to_string()),
            Ok("CT 1".into())
        );
        assert_eq!(
            AeTitle::new(&"A".repeat(16)).map(|a| a.as_str().len()),
            Ok(16)
        );
        assert_eq!(AeTitle::new(""), Err(AeTitleError::Empty));
        assert_eq!(AeTitle::new("   "), Err(AeTitleError::Empty));
        assert!(matches!(
            AeTitle::new(&"A".repeat(17)),
            Err(AeTitleError::TooLong(_))
        ));
        assert!(matches!(
            AeTitle::new("A\\B"),
            Err(AeTitleError::BadCharacter(_))
        ));
        assert!(matches!(
            AeTitle::new("A\tB"),
            Err(AeTitleError::BadCharacter(_))
        ));
        assert!(matches!(
            AeTitle::new("ÄRZTE"),
            Err(AeTitleError::BadCharacter(_))
        ));
    }
}
