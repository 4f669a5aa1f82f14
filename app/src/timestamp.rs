//! Timestamps as text: the one RFC 3339 formatter for everything the
//! appliance writes down (audit lines, the status file, result files, the
//! bundle, certificate expiry dates).
//!
//! One place, so that every file a technician reads shows time the same
//! way (UTC, `Z`, fixed width), and built on the `time` crate's formatter
//! rather than by hand.

use std::time::{SystemTime, UNIX_EPOCH};

use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

/// How much of the second to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// `2026-01-31T12:00:00Z`: certificate dates, which are whole seconds.
    Seconds,
    /// `2026-01-31T12:00:00.123Z`: log and audit lines, where ordering
    /// within a second matters.
    Millis,
}

const SECONDS: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
const MILLIS: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// Formats `t` in UTC as RFC 3339 with the given precision (digits beyond
/// it are cut, not rounded, so a time never moves into the next second).
pub fn format(t: OffsetDateTime, precision: Precision) -> String {
    let utc = t.to_offset(UtcOffset::UTC);
    let items = match precision {
        Precision::Seconds => SECONDS,
        Precision::Millis => MILLIS,
    };
    // Only a year outside 0..=9999 can fail, which no clock here reaches.
    utc.format(items)
        .unwrap_or_else(|_| "0000-00-00T00:00:00Z".to_string())
}

/// RFC 3339 in UTC with milliseconds, e.g. `2025-01-31T23:59:59.123Z`.
/// A clock before 1970 (a Pi without RTC before NTP) is shown as the epoch.
pub fn rfc3339(time: SystemTime) -> String {
    let at = if time < UNIX_EPOCH { UNIX_EPOCH } else { time };
    format(OffsetDateTime::from(at), Precision::Millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_utc_with_fixed_width() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_700_000_001)),
            "2023-11-14T22:13:21.000Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_nanos(999_999_999)),
            "1970-01-01T00:00:00.999Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn seconds_precision_and_offsets_are_normalised_to_utc() {
        let t = time::macros::datetime!(2031-02-03 05:05:06.7 +01:00);
        assert_eq!(format(t, Precision::Seconds), "2031-02-03T04:05:06Z");
        assert_eq!(format(t, Precision::Millis), "2031-02-03T04:05:06.700Z");
    }
}
