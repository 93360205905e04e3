//! IPv4 addresses of network interfaces: the default node IPs NodePort frontends listen on.

use std::{ffi::CStr, io, net::Ipv4Addr};

use thiserror::Error;

use crate::dataplane::pattern::{glob_match, is_pattern};

/// Looking up interface addresses.
#[derive(Debug, Error)]
pub enum NetifError {
    #[error("interface {0:?} does not exist")]
    NoSuchInterface(String),

    #[error("getifaddrs failed")]
    Getifaddrs(#[source] io::Error),
}

/// All (interface name, IPv4 address) pairs of this network namespace, in kernel order.
fn all_ipv4() -> Result<Vec<(String, Ipv4Addr)>, NetifError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list and stores its head in `head`; freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(NetifError::Getifaddrs(std::io::Error::last_os_error()));
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, which stays valid until
        // freeifaddrs; ifa_name is a NUL-terminated string; ifa_addr is either null or points
        // at a sockaddr whose family says how to read it.
        unsafe {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null() && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
                let name = CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned();
                out.push((name, ip));
            }
            cur = ifa.ifa_next;
        }
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

fn exists(iface: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(iface) else {
        return false;
    };
    // SAFETY: `name` is a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// IPv4 addresses of the named interfaces, in the order given, without duplicates. An
/// interface that exists but has no IPv4 address contributes nothing; one that does not exist
/// is an error (a typo in --iface should not silently drop NodePorts). A glob pattern
/// (`eth*`, see `dataplane::pattern`) contributes the addresses of the interfaces it matches
/// now, and may match none.
pub fn ipv4_addrs(ifaces: &[String]) -> Result<Vec<Ipv4Addr>, NetifError> {
    if let Some(missing) = ifaces.iter().find(|i| !is_pattern(i) && !exists(i)) {
        return Err(NetifError::NoSuchInterface(missing.clone()));
    }
    let all = all_ipv4()?;
    let mut out = Vec::new();
    for iface in ifaces {
        for (name, ip) in &all {
            let matches = if is_pattern(iface) {
                glob_match(iface, name)
            } else {
                name == iface
            };
            if matches && !out.contains(ip) {
                out.push(*ip);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_127_0_0_1() {
        assert_eq!(ipv4_addrs(&["lo".into()]).unwrap(), [Ipv4Addr::LOCALHOST]);
    }

    #[test]
    fn patterns_match_existing_interfaces_or_nothing() {
        assert_eq!(ipv4_addrs(&["l?".into()]).unwrap(), [Ipv4Addr::LOCALHOST]);
        assert_eq!(
            ipv4_addrs(&["svclb-nope*".into()]).unwrap(),
            Vec::<Ipv4Addr>::new()
        );
    }

    #[test]
    fn missing_interface_is_named() {
        let err = ipv4_addrs(&["lo".into(), "svclb-nope0".into()]).unwrap_err();
        assert_eq!(err.to_string(), "interface \"svclb-nope0\" does not exist");
    }
}
