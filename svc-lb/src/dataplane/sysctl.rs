//! Per-interface IPv4 sysctls the datapath needs in the node's network namespace.
//!
//! - rp_filter=0: reverse NAT rewrites the source of replies to the frontend address, which the
//!   strict reverse-path filter would drop. The effective value is max(all, iface), so both are 0.
//! - accept_local=1 on attached interfaces: replies of a NodePort (or ExternalIP on a node
//!   address) flow are reverse-NATed, at TC ingress of the pod interface, to a source address
//!   that is the node's own; without accept_local the kernel drops such forwarded packets as
//!   martians (fib_validate_source).

use std::path::PathBuf;

use tracing::{debug, info};

use super::DataplaneError;

fn write(name: &str, key: &str, value: &str) -> Result<(), DataplaneError> {
    let path = PathBuf::from(format!("/proc/sys/net/ipv4/conf/{name}/{key}"));
    std::fs::write(&path, value).map_err(|source| DataplaneError::Sysctl { path, source })
}

/// Applies the sysctls in the current network namespace.
pub fn configure(ifaces: &[String]) -> Result<(), DataplaneError> {
    write("all", "rp_filter", "0")?;
    for iface in ifaces {
        write_iface(iface)?;
    }
    info!(
        ifaces = ?ifaces,
        "set rp_filter=0 (all + attached interfaces) and accept_local=1 (attached interfaces) \
         so reverse-NATed replies are not dropped"
    );
    Ok(())
}

fn write_iface(iface: &str) -> Result<(), DataplaneError> {
    write(iface, "rp_filter", "0")?;
    write(iface, "accept_local", "1")
}

/// The per-interface part of [`configure`], for an interface attached after startup.
pub fn configure_iface(iface: &str) -> Result<(), DataplaneError> {
    write_iface(iface)?;
    debug!(iface, "set rp_filter=0 and accept_local=1");
    Ok(())
}
