//! Secret redaction: the effective configuration as it goes into the
//! bundle, with every value whose key names a secret replaced.
//!
//! The bundle leaves the device on a stick and may be mailed around; the
//! rule is by key name and errs on the side of redacting.

/// What replaces a secret's value in the bundle.
pub(super) const REDACTED: &str = "<redacted>";
/// Key words that make a key secret, when they are the whole key or one of
/// its `_`/`-` separated words (so `key`, `tls_key`, `key_file`,
/// `admin-password`, `api_token` all match).
const SECRET_WORDS: [&str; 10] = [
    "key",
    "keys",
    "password",
    "passwords",
    "passwd",
    "passphrase",
    "secret",
    "secrets",
    "token",
    "tokens",
];

/// Whether a TOML key names a secret. Broader than "named key, password,
/// secret, token or ending in _key/_password": any word of the key counts,
/// because a leaked secret costs more than a redacted harmless value.
fn is_secret_key(key: &str) -> bool {
    key.to_ascii_lowercase()
        .split(['_', '-', '.'])
        .any(|word| SECRET_WORDS.contains(&word))
}

/// The configuration text for the bundle, with every secret-named value
/// replaced by `"<redacted>"`, whatever its type and however deeply nested
/// (tables, inline tables, arrays of tables).
///
/// The text is parsed and re-serialized rather than edited line by line,
/// so multi-line strings and inline tables cannot smuggle a secret past
/// the redactor; comments and key order are lost, which is acceptable for
/// a diagnostic copy. Text that does not parse is left out entirely, and
/// so is the parser's message, which quotes the offending line.
pub(super) fn redact_config(text: &str) -> String {
    // `tls.key` is a file path (e.g. Let's Encrypt's privkey.pem), not key
    // material, but it is redacted too: the rule is by name, and a path can
    // tell an attacker where to look.
    let header = "# minipacs effective configuration, for diagnosis.\n\
                  # Values of keys named like key, password, secret or token are\n\
                  # replaced with \"<redacted>\"; this includes file paths such as\n\
                  # [tls] key, redacted to be safe.\n";
    match toml::from_str::<toml::Table>(text) {
        Ok(mut table) => {
            let count = redact_table(&mut table);
            match toml::to_string(&table) {
                Ok(body) => format!("{header}# {count} value(s) redacted.\n\n{body}"),
                Err(_) => format!("{header}# could not re-serialize; left out.\n"),
            }
        }
        Err(e) => {
            let line = e.span().map(|span| {
                let before = &text.as_bytes()[..span.start.min(text.len())];
                before.iter().filter(|&&b| b == b'\n').count() + 1
            });
            let at = line.map_or(String::new(), |l| format!(" (near line {l})"));
            format!("{header}# the configuration text did not parse as TOML{at};\n# left out so that no secret can leak.\n")
        }
    }
}

fn redact_table(table: &mut toml::Table) -> usize {
    let mut count = 0;
    for (key, value) in table.iter_mut() {
        if is_secret_key(key) {
            *value = toml::Value::String(REDACTED.to_string());
            count += 1;
        } else {
            count += redact_value(value);
        }
    }
    count
}

fn redact_value(value: &mut toml::Value) -> usize {
    match value {
        toml::Value::Table(t) => redact_table(t),
        toml::Value::Array(items) => items.iter_mut().map(redact_value).sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unparsable_config_is_left_out() {
        let text = redact_config("password = \"hunter2\"\nbroken = [\n");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("did not parse"));
        assert!(
            is_secret_key("tls_key") && is_secret_key("Admin-Password") && is_secret_key("key")
        );
        assert!(!is_secret_key("keepalive") && !is_secret_key("monkey") && !is_secret_key("port"));
    }
}
