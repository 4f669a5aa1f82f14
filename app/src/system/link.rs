//! Whether the device is on its network: the check that decides if a new
//! `[network]` stays or is rolled back.
//!
//! "On its network" means: a wired interface is up (carrier), it holds the
//! configured static address (or, with DHCP, an address that is not
//! link-local: the lease came), and the configured gateway, if any, answers
//! ARP. The last catches the usual typing error (a gateway or prefix from
//! another subnet), which leaves the link up and the device unreachable
//! from every other network. IPv6 gateways are not probed (no neighbour
//! table in /proc): an address is enough for them.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::NetworkConfig;

/// One network interface as the kernel sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// its name (`eth0`, `end0`, `enp0s1`)
    pub name: String,
    /// wired Ethernet (not loopback, wireless, a bridge or a tunnel)
    pub wired: bool,
    /// operstate `up` (the carrier is there)
    pub up: bool,
    /// its addresses
    pub addresses: Vec<IpAddr>,
}

/// What the kernel says now: the interfaces, and the ARP table's complete
/// entries.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// every interface but loopback
    pub interfaces: Vec<Interface>,
    /// IPv4 neighbours whose hardware address is known
    pub arp_complete: Vec<Ipv4Addr>,
}

/// Whether `network` is in force and working, by what was `observed`;
/// `Err` says what is missing, in a technician's words.
pub fn judge(network: &NetworkConfig, observed: &Observed) -> Result<(), String> {
    let wired: Vec<&Interface> = observed.interfaces.iter().filter(|i| i.wired).collect();
    if wired.is_empty() {
        return Err("no wired network interface".into());
    }
    let up: Vec<&&Interface> = wired.iter().filter(|i| i.up).collect();
    if up.is_empty() {
        return Err(format!(
            "no link on {} (cable unplugged, or the switch port is off)",
            names(&wired)
        ));
    }
    let has_address = |i: &&&Interface| match &network.address {
        Some(want) => i.addresses.contains(&want.ip),
        None => i.addresses.iter().any(|a| match a {
            IpAddr::V4(v4) => !v4.is_link_local() && !v4.is_loopback(),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80 && !v6.is_loopback(),
        }),
    };
    if !up.iter().any(has_address) {
        return Err(match &network.address {
            Some(want) => format!("{want} is not on {}", names_up(&up)),
            None => format!("no address from DHCP on {}", names_up(&up)),
        });
    }
    if let Some(IpAddr::V4(gateway)) = network.gateway {
        if !observed.arp_complete.contains(&gateway) {
            return Err(format!(
                "the gateway {gateway} does not answer (ARP) on {}",
                names_up(&up)
            ));
        }
    }
    Ok(())
}

fn names(interfaces: &[&Interface]) -> String {
    let names: Vec<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
    names.join(", ")
}

fn names_up(interfaces: &[&&Interface]) -> String {
    let names: Vec<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
    names.join(", ")
}

/// Reads the interfaces (sysfs, getifaddrs) and the ARP table now.
pub fn observe() -> Observed {
    let mut interfaces: Vec<Interface> = Vec::new();
    if let Ok(entries) = fs::read_dir("/sys/class/net") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "lo" {
                continue;
            }
            let dir = entry.path();
            let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap_or_default();
            // ARPHRD_ETHER, with a device behind it, and not Wi-Fi or a bridge.
            let wired = read("type").trim() == "1"
                && dir.join("device").exists()
                && !dir.join("wireless").exists()
                && !dir.join("phy80211").exists()
                && !dir.join("bridge").exists();
            interfaces.push(Interface {
                name,
                wired,
                up: read("operstate").trim() == "up",
                addresses: Vec::new(),
            });
        }
    }
    if let Ok(addresses) = nix::ifaddrs::getifaddrs() {
        for a in addresses {
            let Some(address) = a.address else { continue };
            let ip = if let Some(v4) = address.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = address.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            if let Some(i) = interfaces.iter_mut().find(|i| i.name == a.interface_name) {
                i.addresses.push(ip);
            }
        }
    }
    Observed {
        interfaces,
        arp_complete: arp_complete(&fs::read_to_string("/proc/net/arp").unwrap_or_default()),
    }
}

/// The complete entries (flags 0x2) of a /proc/net/arp text.
fn arp_complete(table: &str) -> Vec<Ipv4Addr> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let ip: Ipv4Addr = fields.next()?.parse().ok()?;
            let flags = u32::from_str_radix(fields.nth(1)?.trim_start_matches("0x"), 16).ok()?;
            (flags & 0x2 != 0).then_some(ip)
        })
        .collect()
}

/// Makes the kernel ask for `gateway`'s hardware address (ARP), by sending
/// it one datagram to the discard port.
fn probe(gateway: Ipv4Addr) {
    if let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
        let _ = socket.send_to(b"minipacs", SocketAddr::from((gateway, 9)));
    }
}

/// Waits until `network` works ([`judge`]), for at most `within`; `Err`
/// says what was still missing at the end.
pub fn wait(network: &NetworkConfig, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(IpAddr::V4(gateway)) = network.gateway {
            probe(gateway);
        }
        std::thread::sleep(Duration::from_secs(1));
        let verdict = judge(network, &observe());
        if verdict.is_ok() || Instant::now() >= deadline {
            return verdict;
        }
    }
}

/// Whether this machine has the sysfs this module reads (not in every
/// container).
pub fn observable() -> bool {
    Path::new("/sys/class/net").is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn network(text: &str) -> NetworkConfig {
        Config::from_toml(text, "t.toml")
            .expect("valid")
            .system()
            .network
    }

    fn eth(up: bool, addresses: &[&str]) -> Interface {
        Interface {
            name: "end0".into(),
            wired: true,
            up,
            addresses: addresses.iter().map(|a| a.parse().expect("ip")).collect(),
        }
    }

    #[test]
    fn dhcp_needs_a_lease_not_just_a_link_local_address() {
        let dhcp = network("");
        let mut seen = Observed {
            interfaces: vec![eth(true, &["169.254.3.4", "fe80::1"])],
            arp_complete: vec![],
        };
        let why = judge(&dhcp, &seen).expect_err("no lease yet");
        assert!(why.contains("no address from DHCP on end0"), "{why}");
        seen.interfaces[0]
            .addresses
            .push("10.0.2.15".parse().expect("ip"));
        assert_eq!(judge(&dhcp, &seen), Ok(()));
    }

    #[test]
    fn a_static_address_needs_its_address_its_link_and_its_gateway() {
        let fixed = network("[network]\naddress = \"192.0.2.10/24\"\ngateway = \"192.0.2.1\"\n");
        let mut seen = Observed {
            interfaces: vec![eth(false, &["192.0.2.10"])],
            arp_complete: vec![],
        };
        assert!(judge(&fixed, &seen)
            .expect_err("down")
            .contains("no link on end0"));
        seen.interfaces[0].up = true;
        let why = judge(&fixed, &seen).expect_err("gateway silent");
        assert!(
            why.contains("the gateway 192.0.2.1 does not answer"),
            "{why}"
        );
        seen.arp_complete.push(Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(judge(&fixed, &seen), Ok(()));
        seen.interfaces[0].addresses = vec!["10.0.2.15".parse().expect("ip")];
        let why = judge(&fixed, &seen).expect_err("other address");
        assert!(why.contains("192.0.2.10/24 is not on end0"), "{why}");
    }

    #[test]
    fn wireless_and_virtual_interfaces_do_not_count() {
        let dhcp = network("");
        let mut wifi = eth(true, &["10.0.0.5"]);
        wifi.wired = false;
        let seen = Observed {
            interfaces: vec![wifi],
            arp_complete: vec![],
        };
        assert_eq!(
            judge(&dhcp, &seen),
            Err("no wired network interface".into())
        );
    }

    #[test]
    fn only_complete_arp_entries_count() {
        let table = "IP address       HW type     Flags       HW address            Mask     Device\n\
                     10.0.2.2         0x1         0x2         52:55:0a:00:02:02     *        end0\n\
                     10.0.2.77        0x1         0x0         00:00:00:00:00:00     *        end0\n";
        assert_eq!(arp_complete(table), vec![Ipv4Addr::new(10, 0, 2, 2)]);
    }
}
