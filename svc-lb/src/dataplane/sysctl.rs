//! rp_filter: reverse NAT rewrites the source of replies to the frontend address, which the
//! strict reverse-path filter of the node would drop, so it is disabled where we attach.

use std::path::PathBuf;

use tracing::info;

use super::DataplaneError;

/// Sets `net.ipv4.conf.{all,<iface>}.rp_filter = 0` in the current network namespace. The
/// effective value is max(all, iface), so both must be 0.
pub fn disable_rp_filter(ifaces: &[String]) -> Result<(), DataplaneError> {
    for name in std::iter::once("all").chain(ifaces.iter().map(String::as_str)) {
        let path = PathBuf::from(format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"));
        std::fs::write(&path, b"0").map_err(|source| DataplaneError::Sysctl {
            path: path.clone(),
            source,
        })?;
    }
    info!(
        ifaces = ?ifaces,
        "set rp_filter=0 on all and attached interfaces (reverse NAT replies would be dropped otherwise)"
    );
    Ok(())
}
