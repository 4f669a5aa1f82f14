//! Debian version order, as `dpkg --compare-versions` has it.
//!
//! An update must be newer than what is installed, and "newer" is dpkg's
//! notion: epochs, `~` before everything, digits compared as numbers. It is
//! written here (dpkg's `verrevcmp`, a few lines) rather than asked of
//! dpkg so that the decision is the same on a developer's machine, in the
//! unit tests and on the device; a test checks it against dpkg itself
//! where dpkg is installed.

use std::cmp::Ordering;

/// Compares two Debian versions (`[epoch:]upstream[-revision]`) as dpkg
/// does. A missing epoch is 0; a missing revision is empty.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua, ub))
        .then_with(|| verrevcmp(ra, rb))
}

/// Splits a version into epoch, upstream version and revision.
fn split(version: &str) -> (u64, &str, &str) {
    let version = version.trim();
    let (epoch, rest) = match version.split_once(':') {
        Some((epoch, rest)) if !epoch.is_empty() && epoch.bytes().all(|b| b.is_ascii_digit()) => {
            (epoch.parse().unwrap_or(u64::MAX), rest)
        }
        _ => (0, version),
    };
    match rest.rsplit_once('-') {
        Some((upstream, revision)) => (epoch, upstream, revision),
        None => (epoch, rest, ""),
    }
}

/// The weight of one character in the non-digit parts (dpkg's `order`):
/// `~` sorts before the end of the string, letters before other
/// characters.
fn order(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(b'~') => -1,
        Some(c) => i32::from(c) + 256,
    }
}

/// dpkg's `verrevcmp`: alternating non-digit parts (compared by
/// [`order`]) and digit parts (compared as numbers).
fn verrevcmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    let digit = |s: &[u8], k: usize| s.get(k).is_some_and(u8::is_ascii_digit);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !digit(a, i)) || (j < b.len() && !digit(b, j)) {
            let (ac, bc) = (order(a.get(i).copied()), order(b.get(j).copied()));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while a.get(i) == Some(&b'0') {
            i += 1;
        }
        while b.get(j) == Some(&b'0') {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while digit(a, i) && digit(b, j) {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if digit(a, i) {
            return Ordering::Greater;
        }
        if digit(b, j) {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pairs with `a < b` in dpkg's order.
    const ASCENDING: &[(&str, &str)] = &[
        ("0.1.0", "0.1.1"),
        ("0.1.0", "0.1.0+update1"),
        ("0.1.0+update2", "0.1.0+update3"),
        ("0.1.0~rc1", "0.1.0"),
        ("0.1.0~rc1", "0.1.0~rc2"),
        ("0.9", "0.10"),
        ("1.0", "1.0-1"),
        ("1.0-1", "1.0-2"),
        ("1.0-9", "1.0-10"),
        ("1:0.1", "2:0.0"),
        ("9.9", "1:0.1"),
        ("1.0a", "1.0b"),
        ("1.0", "1.0a"),
        ("1.0a", "1.0+"),
        ("1.0~~", "1.0~"),
        ("1.01", "1.2"),
        ("2.0.0", "10.0.0"),
    ];

    #[test]
    fn orders_as_dpkg_documents() {
        for (a, b) in ASCENDING {
            assert_eq!(compare(a, b), Ordering::Less, "{a} < {b}");
            assert_eq!(compare(b, a), Ordering::Greater, "{b} > {a}");
        }
        for v in ["0.1.0", "1:2.3-4", "1.01", "0.1.0+update1"] {
            assert_eq!(compare(v, v), Ordering::Equal, "{v}");
        }
        // Leading zeros are numbers, an epoch of 0 is no epoch.
        assert_eq!(compare("1.01", "1.1"), Ordering::Equal);
        assert_eq!(compare("0:1.0", "1.0"), Ordering::Equal);
    }

    /// Where dpkg is installed, it agrees with every pair above.
    #[test]
    fn agrees_with_dpkg_where_there_is_one() {
        let Ok(status) = std::process::Command::new("dpkg").arg("--version").output() else {
            return;
        };
        if !status.status.success() {
            return;
        }
        for (a, b) in ASCENDING {
            let lt = std::process::Command::new("dpkg")
                .args(["--compare-versions", a, "lt", b])
                .status()
                .expect("dpkg runs");
            assert!(lt.success(), "dpkg says {a} is not lower than {b}");
        }
    }
}
