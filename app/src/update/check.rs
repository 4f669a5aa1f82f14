//! What makes a dropped package acceptable: a minisign signature by the
//! device's update key, then (read from the signed package itself) the
//! right name, the device's architecture, and a version newer than the
//! installed one.
//!
//! These are pure decisions on bytes and fields, so they are tested
//! without dpkg. The signature is checked first, before anything (dpkg-deb
//! included) parses the package: unsigned bytes are never looked into.
//! `minisign-verify` checks it: a small, dependency-free verifier by
//! minisign's author, for the signatures Debian's `minisign` tool makes
//! (pre-hashed Ed25519; the legacy non-hashed form is refused).

use std::cmp::Ordering;
use std::fmt;

use minisign_verify::{PublicKey, Signature};

use super::version;

/// The package name an update must carry.
pub const PACKAGE: &str = "minipacs";

/// A package's identity, from its control fields (`dpkg-deb -f`) or from
/// dpkg's database (`dpkg-query`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    /// `Package:`
    pub name: String,
    /// `Version:`
    pub version: String,
    /// `Architecture:`
    pub architecture: String,
}

/// Why a dropped package is refused: said in the result file, the journal
/// and the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No `.minisig` beside it.
    Unsigned {
        /// the signature file that was looked for
        signature: String,
    },
    /// The signature file is not a minisign signature.
    UnreadableSignature(String),
    /// The signature does not verify with the device's key.
    BadSignature(String),
    /// The device has no update key (or cannot read it).
    NoKey(String),
    /// Another package than minipacs.
    WrongPackage(String),
    /// Built for another architecture.
    WrongArchitecture {
        /// the package's
        package: String,
        /// the installed package's
        device: String,
    },
    /// Not newer than what is installed.
    NotNewer {
        /// the package's version
        version: String,
        /// the installed version
        installed: String,
    },
    /// Anything else that stops it (unreadable, too large, no copy of the
    /// installed package to fall back to, dpkg cannot read it).
    Other(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Unsigned { signature } => write!(
                f,
                "not signed: there is no {signature} beside it (sign it with image-build/sign-update)"
            ),
            Refusal::UnreadableSignature(why) => {
                write!(f, "the signature file is not a minisign signature: {why}")
            }
            Refusal::BadSignature(why) => write!(
                f,
                "bad signature: {why} (it was not signed with this device's update key, or the package was changed after signing)"
            ),
            Refusal::NoKey(why) => write!(f, "this device has no update key: {why}"),
            Refusal::WrongPackage(name) => {
                write!(f, "the package is {name:?}, not {PACKAGE:?}")
            }
            Refusal::WrongArchitecture { package, device } => write!(
                f,
                "the package is built for {package}, this device runs {device}"
            ),
            Refusal::NotNewer { version, installed } => {
                let how = if version::compare(version, installed) == Ordering::Equal {
                    "the same as"
                } else {
                    "older than"
                };
                write!(
                    f,
                    "version {version} is {how} the installed {installed}: only a newer version is installed"
                )
            }
            Refusal::Other(why) => f.write_str(why),
        }
    }
}

/// Reads the device's update key (a minisign public key file).
pub fn read_key(text: &str) -> Result<PublicKey, Refusal> {
    PublicKey::decode(text).map_err(|e| Refusal::NoKey(format!("not a minisign public key: {e}")))
}

/// Checks that `signature` (the `.minisig` file's text, if there is one)
/// signs `package` with `key`. `signature_name` is what the refusal calls
/// a missing one.
pub fn signature(
    key: &PublicKey,
    package: &[u8],
    signature: Option<&str>,
    signature_name: &str,
) -> Result<(), Refusal> {
    let Some(text) = signature else {
        return Err(Refusal::Unsigned {
            signature: signature_name.to_string(),
        });
    };
    let signature =
        Signature::decode(text).map_err(|e| Refusal::UnreadableSignature(e.to_string()))?;
    key.verify(package, &signature, false)
        .map_err(|e| Refusal::BadSignature(e.to_string()))
}

/// Checks a (signed) package's fields against the installed package.
pub fn package(candidate: &Package, installed: &Package) -> Result<(), Refusal> {
    if candidate.name != PACKAGE {
        return Err(Refusal::WrongPackage(candidate.name.clone()));
    }
    if candidate.architecture != installed.architecture && candidate.architecture != "all" {
        return Err(Refusal::WrongArchitecture {
            package: candidate.architecture.clone(),
            device: installed.architecture.clone(),
        });
    }
    if version::compare(&candidate.version, &installed.version) != Ordering::Greater {
        return Err(Refusal::NotNewer {
            version: candidate.version.clone(),
            installed: installed.version.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A key pair made for the test: the public key file's text and a
    /// signer that makes `.minisig` texts, as Debian's `minisign -S` does.
    pub(crate) struct TestKey {
        pair: minisign::KeyPair,
    }

    impl TestKey {
        pub(crate) fn new() -> TestKey {
            TestKey {
                pair: minisign::KeyPair::generate_unencrypted_keypair().expect("key pair"),
            }
        }

        pub(crate) fn public_file(&self) -> String {
            self.pair.pk.to_box().expect("public key box").to_string()
        }

        pub(crate) fn sign(&self, bytes: &[u8]) -> String {
            minisign::sign(
                Some(&self.pair.pk),
                &self.pair.sk,
                std::io::Cursor::new(bytes),
                Some("minipacs test package"),
                None,
            )
            .expect("sign")
            .to_string()
        }
    }

    fn installed() -> Package {
        Package {
            name: PACKAGE.into(),
            version: "0.1.0".into(),
            architecture: "arm64".into(),
        }
    }

    #[test]
    fn a_good_signature_verifies() {
        let key = TestKey::new();
        let public = read_key(&key.public_file()).expect("key");
        let deb = b"!<arch>\nnot really a package, but signed".to_vec();
        let sig = key.sign(&deb);
        assert_eq!(signature(&public, &deb, Some(&sig), "x.minisig"), Ok(()));
    }

    #[test]
    fn unsigned_badly_signed_and_changed_packages_are_refused() {
        let key = TestKey::new();
        let public = read_key(&key.public_file()).expect("key");
        let deb = b"package bytes".to_vec();
        assert!(matches!(
            signature(&public, &deb, None, "p.deb.minisig"),
            Err(Refusal::Unsigned { signature }) if signature == "p.deb.minisig"
        ));
        // Signed by another key.
        let other = TestKey::new();
        let refusal =
            signature(&public, &deb, Some(&other.sign(&deb)), "s").expect_err("other key");
        assert!(matches!(refusal, Refusal::BadSignature(_)), "{refusal}");
        assert!(refusal.to_string().contains("different key"), "{refusal}");
        // Signed by the key, changed afterwards.
        let sig = key.sign(&deb);
        let mut changed = deb.clone();
        changed[0] ^= 1;
        let refusal = signature(&public, &changed, Some(&sig), "s").expect_err("changed");
        assert!(matches!(refusal, Refusal::BadSignature(_)), "{refusal}");
        // Not a signature at all.
        let refusal = signature(&public, &deb, Some("hello\n"), "s").expect_err("garbage");
        assert!(
            matches!(refusal, Refusal::UnreadableSignature(_)),
            "{refusal}"
        );
    }

    #[test]
    fn a_key_file_that_is_not_a_key_is_said_so() {
        assert!(matches!(read_key("nothing here"), Err(Refusal::NoKey(_))));
    }

    #[test]
    fn only_a_newer_minipacs_for_this_architecture_is_accepted() {
        let newer = Package {
            version: "0.1.0+update1".into(),
            ..installed()
        };
        assert_eq!(package(&newer, &installed()), Ok(()));
        let all = Package {
            architecture: "all".into(),
            ..newer.clone()
        };
        assert_eq!(package(&all, &installed()), Ok(()));
        for (version, how) in [("0.1.0", "the same as"), ("0.0.9", "older than")] {
            let refusal = package(
                &Package {
                    version: version.into(),
                    ..installed()
                },
                &installed(),
            )
            .expect_err("not newer");
            assert!(matches!(refusal, Refusal::NotNewer { .. }), "{refusal}");
            assert!(refusal.to_string().contains(how), "{refusal}");
        }
        let refusal = package(
            &Package {
                name: "orthanc".into(),
                ..newer.clone()
            },
            &installed(),
        )
        .expect_err("other package");
        assert_eq!(refusal, Refusal::WrongPackage("orthanc".into()));
        let refusal = package(
            &Package {
                architecture: "amd64".into(),
                ..newer
            },
            &installed(),
        )
        .expect_err("other architecture");
        assert!(refusal.to_string().contains("built for amd64"), "{refusal}");
    }
}
