//! The system's own files made from `[time]` and `[network]`: a
//! systemd-timesyncd drop-in and a systemd-networkd `.network` file.
//!
//! Each is a pure function of the configuration, so that applying is
//! "write what differs" and a second run changes nothing. Defaults write
//! nothing: the image's own files (DHCP on every wired interface, Debian's
//! NTP pool) are then in force.

use std::fmt::Write as _;

use crate::config::{NetworkConfig, TimeConfig};

/// The host name the image ships with, in force when `[network] hostname`
/// is unset.
pub const DEFAULT_HOSTNAME: &str = "minipacs";

/// The first line of every file written here: who wrote it, from what.
const WRITTEN_BY: &str =
    "# Written by minipacs from /etc/minipacs/minipacs.toml: change it there (or drop one).\n";

/// The timesyncd drop-in for `[time]`, or `None` for the image's default.
pub fn timesyncd(time: &TimeConfig) -> Option<String> {
    if time.ntp.is_empty() {
        return None;
    }
    Some(format!("{WRITTEN_BY}[Time]\nNTP={}\n", time.ntp.join(" ")))
}

/// The networkd file for `[network]`, or `None` for the image's default
/// (DHCP, its DNS servers).
pub fn networkd(network: &NetworkConfig) -> Option<String> {
    if network.address.is_none() && network.dns.is_empty() {
        return None;
    }
    // It matches what the image's own file matches (every wired interface)
    // and sorts before it, so networkd takes it instead.
    let mut text = format!("{WRITTEN_BY}[Match]\nType=ether\n\n[Network]\n");
    match &network.address {
        None => text.push_str("DHCP=yes\n"),
        Some(address) => {
            let _ = writeln!(text, "Address={address}");
            if let Some(gateway) = network.gateway {
                let _ = writeln!(text, "Gateway={gateway}");
            }
        }
    }
    for server in &network.dns {
        let _ = writeln!(text, "DNS={server}");
    }
    Some(text)
}

/// The host name `[network]` asks for.
pub fn hostname(network: &NetworkConfig) -> &str {
    network.hostname.as_deref().unwrap_or(DEFAULT_HOSTNAME)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn system(text: &str) -> crate::config::SystemConfig {
        Config::from_toml(text, "t.toml").expect("valid").system()
    }

    #[test]
    fn defaults_write_nothing() {
        let s = system("");
        assert_eq!(timesyncd(&s.time), None);
        assert_eq!(networkd(&s.network), None);
        assert_eq!(hostname(&s.network), "minipacs");
    }

    #[test]
    fn ntp_servers_go_on_one_line() {
        let s = system("[time]\nntp = [\"ntp1.hospital.example\", \"10.1.2.3\"]\n");
        let text = timesyncd(&s.time).expect("a drop-in");
        assert!(
            text.ends_with("[Time]\nNTP=ntp1.hospital.example 10.1.2.3\n"),
            "{text}"
        );
    }

    #[test]
    fn a_static_address_with_gateway_and_dns() {
        let s = system(
            "[network]\naddress = \"192.0.2.10/24\"\ngateway = \"192.0.2.1\"\ndns = [\"192.0.2.53\", \"192.0.2.54\"]\nhostname = \"bedside-3\"\n",
        );
        let text = networkd(&s.network).expect("a .network file");
        assert!(
            text.ends_with(
                "[Match]\nType=ether\n\n[Network]\nAddress=192.0.2.10/24\nGateway=192.0.2.1\nDNS=192.0.2.53\nDNS=192.0.2.54\n"
            ),
            "{text}"
        );
        assert_eq!(hostname(&s.network), "bedside-3");
    }

    #[test]
    fn dhcp_with_extra_dns() {
        let s = system("[network]\ndns = [\"192.0.2.53\"]\n");
        let text = networkd(&s.network).expect("a .network file");
        assert!(text.contains("DHCP=yes\nDNS=192.0.2.53\n"), "{text}");
    }
}
