//! kube-proxy's leftovers on a node that moves to svc-lb: its iptables chains (iptables-legacy
//! or iptables-nft), its nftables tables and its IPVS virtual servers. They keep rewriting,
//! marking or dropping Service traffic by stale rules, so the agent warns at start and
//! `svc-lb debug kube-proxy` lists them, each with the command that removes it. svc-lb never
//! removes them itself: it changes nothing it did not create.
//!
//! No external tool is needed (the image has none): nf_tables (what iptables-nft and the
//! nftables mode write) is read over nfnetlink, iptables-legacy with the getsockopt calls
//! `iptables-legacy-save` uses, IPVS from /proc/net/ip_vs. Only what is already loaded is
//! read: a check never loads a kernel module (which a netlink request or a getsockopt on a
//! table that does not exist yet would do).

use std::{
    fs, io, mem,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use serde::Serialize;

/// The chain every kube-proxy iptables ruleset hooks from: its presence means kube-proxy ran
/// in iptables mode (kubelet's own chains, KUBE-FIREWALL, KUBE-KUBELET-CANARY,
/// KUBE-IPTABLES-HINT, are not kube-proxy's and are not reported).
pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
/// The table of kube-proxy's nftables mode (families ip and ip6).
pub const NFT_TABLE: &str = "kube-proxy";

#[derive(Debug, thiserror::Error)]
pub enum KubeProxyError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("nfnetlink: {0}")]
    Netlink(String),
    #[error("legacy table {table}: {msg}")]
    Legacy { table: String, msg: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> KubeProxyError {
    let what = what.into();
    move |source| KubeProxyError::Io { what, source }
}

/// One place kube-proxy left state in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Leftover {
    /// `iptables-legacy`, `iptables-nft`, `nftables` or `ipvs`.
    pub backend: String,
    /// Where: `ip nat` (family and table), `ip kube-proxy`, `/proc/net/ip_vs`, ...
    pub location: String,
    /// What was found, e.g. `KUBE-SERVICES, KUBE-NODEPORTS, 12 KUBE-SVC-*, 30 KUBE-SEP-*`.
    pub found: String,
    /// The command that removes it (after kube-proxy itself is gone).
    pub cleanup: String,
}

/// What [`detect`] found, and what it could not look at (a check that failed does not hide
/// the others).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub leftovers: Vec<Leftover>,
    /// Checks that could not run, with the reason.
    pub unchecked: Vec<String>,
}

/// Looks for kube-proxy's state in the current network namespace.
pub fn detect() -> Report {
    let mut r = Report::default();
    match nft_chains() {
        Ok(Some(chains)) => r.leftovers.extend(from_nft(&chains)),
        Ok(None) => {}
        Err(e) => r
            .unchecked
            .push(format!("nf_tables (iptables-nft, nftables): {e}")),
    }
    for family in [Family::V4, Family::V6] {
        match legacy_chains(family) {
            Ok(tables) => r.leftovers.extend(from_legacy(family, &tables)),
            Err(e) => r.unchecked.push(format!("{}: {e}", family.legacy_tool())),
        }
    }
    match fs::read_to_string("/proc/net/ip_vs") {
        Ok(text) => r.leftovers.extend(from_ipvs(&text)),
        // No ip_vs module loaded: no IPVS state can exist.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => r.unchecked.push(format!("IPVS (/proc/net/ip_vs): {e}")),
    }
    if Path::new("/sys/class/net/kube-ipvs0").exists() {
        r.leftovers.push(Leftover {
            backend: "ipvs".into(),
            location: "interface kube-ipvs0".into(),
            found: "kube-proxy's dummy interface holding the Service addresses".into(),
            cleanup: "kube-proxy --cleanup   (or: ip link delete kube-ipvs0)".into(),
        });
    }
    r
}

/// The agent's start-up check: one warning per leftover, with its cleanup command.
pub fn warn_leftovers() {
    let r = detect();
    for l in &r.leftovers {
        tracing::warn!(
            backend = %l.backend,
            location = %l.location,
            found = %l.found,
            cleanup = %l.cleanup,
            "kube-proxy's rules are still on this node: they keep matching Service traffic with \
             stale state; once kube-proxy is removed, clean up with the command given \
             (`svc-lb debug kube-proxy` lists everything)"
        );
    }
    for u in &r.unchecked {
        tracing::debug!(check = %u, "could not check for kube-proxy leftovers");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn legacy_tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables-legacy",
            Family::V6 => "ip6tables-legacy",
        }
    }
}

/// A (family, table, chain) of nf_tables.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NftChain {
    /// `ip`, `ip6`, `inet`, ...
    pub family: String,
    pub table: String,
    pub chain: String,
}

/// `KUBE-SERVICES, KUBE-NODEPORTS, 3 KUBE-SVC-*, 6 KUBE-SEP-*` for kube-proxy's chains among
/// `chains` (its fixed ones by name, the per-Service/endpoint ones counted by prefix).
fn summarize<'a>(chains: impl Iterator<Item = &'a str>) -> String {
    const FIXED: &[&str] = &[
        KUBE_SERVICES,
        "KUBE-NODEPORTS",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
        "KUBE-PROXY-CANARY",
    ];
    const COUNTED: &[&str] = &[
        "KUBE-SVC-",
        "KUBE-SEP-",
        "KUBE-EXT-",
        "KUBE-FW-",
        "KUBE-SVL-",
    ];
    let chains: Vec<&str> = chains.collect();
    let mut parts: Vec<String> = FIXED
        .iter()
        .filter(|f| chains.contains(f))
        .map(|f| f.to_string())
        .collect();
    for prefix in COUNTED {
        let n = chains.iter().filter(|c| c.starts_with(prefix)).count();
        if n > 0 {
            parts.push(format!("{n} {prefix}*"));
        }
    }
    parts.join(", ")
}

fn from_nft(chains: &[NftChain]) -> Vec<Leftover> {
    let mut out = Vec::new();
    let mut tables: Vec<(&str, &str)> = chains
        .iter()
        .map(|c| (c.family.as_str(), c.table.as_str()))
        .collect();
    tables.dedup();
    tables.sort();
    tables.dedup();
    for (family, table) in tables {
        let names = || {
            chains
                .iter()
                .filter(move |c| c.family == family && c.table == table)
                .map(|c| c.chain.as_str())
        };
        if table == NFT_TABLE {
            out.push(Leftover {
                backend: "nftables".into(),
                location: format!("{family} {table}"),
                found: format!("table with {} chains", names().count()),
                cleanup: format!("kube-proxy --cleanup   (or: nft delete table {family} {table})"),
            });
        } else if names().any(|c| c == KUBE_SERVICES) {
            // iptables-nft keeps iptables' tables (nat, filter) as nf_tables tables.
            let tool = if family == "ip6" {
                "ip6tables-nft"
            } else {
                "iptables-nft"
            };
            out.push(Leftover {
                backend: "iptables-nft".into(),
                location: format!("{family} {table}"),
                found: summarize(names()),
                cleanup: iptables_cleanup(tool),
            });
        }
    }
    out
}

fn iptables_cleanup(tool: &str) -> String {
    format!("kube-proxy --cleanup   (or: {tool}-save | grep -v KUBE | {tool}-restore)")
}

fn from_legacy(family: Family, tables: &[(String, Vec<String>)]) -> Vec<Leftover> {
    let fam = match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    };
    tables
        .iter()
        .filter(|(_, chains)| chains.iter().any(|c| c == KUBE_SERVICES))
        .map(|(table, chains)| Leftover {
            backend: "iptables-legacy".into(),
            location: format!("{fam} {table}"),
            found: summarize(chains.iter().map(String::as_str)),
            cleanup: iptables_cleanup(family.legacy_tool()),
        })
        .collect()
}

/// Virtual servers in /proc/net/ip_vs (lines `TCP  0A60000A:0050 rr`, each followed by its
/// `  -> RemoteAddress:Port` lines).
fn from_ipvs(text: &str) -> Vec<Leftover> {
    let services = text
        .lines()
        .filter(|l| {
            let first = l.split_whitespace().next().unwrap_or_default();
            matches!(first, "TCP" | "UDP" | "SCTP" | "FWM")
        })
        .count();
    if services == 0 {
        return Vec::new();
    }
    vec![Leftover {
        backend: "ipvs".into(),
        location: "/proc/net/ip_vs".into(),
        found: format!("{services} virtual servers"),
        cleanup: "kube-proxy --cleanup   (or: ipvsadm --clear, after checking nothing else \
                  uses IPVS on this node)"
            .into(),
    }]
}

// ---- nf_tables over nfnetlink ----

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;

fn family_name(f: u8) -> String {
    match i32::from(f) {
        libc::NFPROTO_INET => "inet".into(),
        libc::NFPROTO_IPV4 => "ip".into(),
        libc::NFPROTO_ARP => "arp".into(),
        libc::NFPROTO_NETDEV => "netdev".into(),
        libc::NFPROTO_BRIDGE => "bridge".into(),
        libc::NFPROTO_IPV6 => "ip6".into(),
        other => format!("family {other}"),
    }
}

/// Whether nf_tables is in the running kernel without loading it: a loaded module shows in
/// /sys/module; a kernel without module support (no /proc/modules) has it built in if at all;
/// a modular kernel lists built-in modules in modules.builtin (absent in a container: then a
/// built-in nf_tables without a /sys/module entry is missed, and the check says nothing).
fn nf_tables_present() -> bool {
    if Path::new("/sys/module/nf_tables").exists() || !Path::new("/proc/modules").exists() {
        return true;
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    fs::read_to_string(format!("/lib/modules/{}/modules.builtin", release.trim()))
        .is_ok_and(|b| b.lines().any(|l| l.ends_with("/nf_tables.ko")))
}

/// Every nf_tables chain of the namespace, `None` when nf_tables is not in the kernel (then
/// there can be none, and asking would load the module).
pub fn nft_chains() -> Result<Option<Vec<NftChain>>, KubeProxyError> {
    if !nf_tables_present() {
        return Ok(None);
    }
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io_err("netlink socket")(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // nlmsghdr (16) + nfgenmsg (4): dump every chain of every family.
    let mut req = Vec::with_capacity(20);
    req.extend_from_slice(&20u32.to_ne_bytes());
    req.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN).to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    req.extend_from_slice(&[libc::NFPROTO_UNSPEC as u8, 0, 0, 0]);
    // SAFETY: sockaddr_nl zeroed is the kernel's address (pid 0, no groups).
    let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: req and addr are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&raw const addr).cast(),
            mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io_err("netlink send")(io::Error::last_os_error()));
    }
    let mut chains = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io_err("netlink recv")(io::Error::last_os_error()));
        }
        if parse_chain_dump(&buf[..n as usize], &mut chains)? {
            return Ok(Some(chains));
        }
    }
}

/// Parses one datagram of a GETCHAIN dump into `chains`; `true` once NLMSG_DONE was seen.
fn parse_chain_dump(mut data: &[u8], chains: &mut Vec<NftChain>) -> Result<bool, KubeProxyError> {
    let u16_at = |d: &[u8], o: usize| u16::from_ne_bytes([d[o], d[o + 1]]);
    let u32_at = |d: &[u8], o: usize| u32::from_ne_bytes([d[o], d[o + 1], d[o + 2], d[o + 3]]);
    while data.len() >= 16 {
        let len = u32_at(data, 0) as usize;
        let kind = u16_at(data, 4);
        if len < 16 || len > data.len() {
            return Err(KubeProxyError::Netlink(format!("bad message length {len}")));
        }
        let msg = &data[16..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = if msg.len() >= 4 {
                    -(u32_at(msg, 0) as i32)
                } else {
                    0
                };
                if errno != 0 {
                    return Err(KubeProxyError::Netlink(
                        io::Error::from_raw_os_error(errno).to_string(),
                    ));
                }
            }
            k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN && msg.len() >= 4 => {
                let family = family_name(msg[0]);
                let (mut table, mut chain) = (None, None);
                let mut attrs = &msg[4..];
                while attrs.len() >= 4 {
                    let alen = u16_at(attrs, 0) as usize;
                    if alen < 4 || alen > attrs.len() {
                        break;
                    }
                    let value = &attrs[4..alen];
                    let text = || {
                        String::from_utf8_lossy(value.split(|b| *b == 0).next().unwrap_or(value))
                            .into_owned()
                    };
                    match u16_at(attrs, 2) & NLA_TYPE_MASK {
                        NFTA_CHAIN_TABLE => table = Some(text()),
                        NFTA_CHAIN_NAME => chain = Some(text()),
                        _ => {}
                    }
                    let step = (alen + 3) & !3;
                    attrs = &attrs[step.min(attrs.len())..];
                }
                if let (Some(table), Some(chain)) = (table, chain) {
                    chains.push(NftChain {
                        family,
                        table,
                        chain,
                    });
                }
            }
            _ => {}
        }
        let step = (len + 3) & !3;
        data = &data[step.min(data.len())..];
    }
    Ok(false)
}

// ---- iptables-legacy over getsockopt ----

/// IPT_SO_GET_INFO / IP6T_SO_GET_INFO (IPT_BASE_CTL 64); GET_ENTRIES is the next one.
const SO_GET_INFO: libc::c_int = 64;
const SO_GET_ENTRIES: libc::c_int = 65;
const TABLE_NAME_LEN: usize = 32;
/// `struct ipt_getinfo`: name[32], valid_hooks, hook_entry[5], underflow[5], num_entries, size.
const GETINFO_LEN: usize = 32 + 4 + 20 + 20 + 4 + 4;
/// Offset of `entrytable` in `struct ipt_get_entries` (name[32], size, 8-byte aligned entries).
const ENTRIES_OFFSET: usize = 40;

/// Offsets of `target_offset` and `next_offset` in `struct ipt_entry` / `struct ip6t_entry`.
fn entry_offsets(family: Family) -> (usize, usize) {
    match family {
        // struct ipt_ip (84) + nfcache (4)
        Family::V4 => (88, 90),
        // struct ip6t_ip6 (136) + nfcache (4)
        Family::V6 => (140, 142),
    }
}

/// The user-defined chains of every legacy table that exists in this namespace (listed in
/// /proc/net/ip_tables_names: asking for another one would load its module).
fn legacy_chains(family: Family) -> Result<Vec<(String, Vec<String>)>, KubeProxyError> {
    let (names_file, domain, level) = match family {
        Family::V4 => ("/proc/net/ip_tables_names", libc::AF_INET, libc::IPPROTO_IP),
        Family::V6 => (
            "/proc/net/ip6_tables_names",
            libc::AF_INET6,
            libc::IPPROTO_IPV6,
        ),
    };
    let names = match fs::read_to_string(names_file) {
        Ok(n) => n,
        // The legacy tables module is not loaded: no legacy rules exist.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(names_file)(e)),
    };
    // Any socket of the family reaches the netfilter getsockopt (CAP_NET_ADMIN, no raw socket).
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io_err("socket")(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut out = Vec::new();
    for table in names.lines().map(str::trim).filter(|t| !t.is_empty()) {
        let legacy = |msg: String| KubeProxyError::Legacy {
            table: table.to_string(),
            msg,
        };
        if table.len() >= TABLE_NAME_LEN {
            return Err(legacy("name too long".into()));
        }
        let mut info = vec![0u8; GETINFO_LEN];
        info[..table.len()].copy_from_slice(table.as_bytes());
        getsockopt(&sock, level, SO_GET_INFO, &mut info).map_err(|e| legacy(e.to_string()))?;
        let size = u32::from_ne_bytes(info[GETINFO_LEN - 4..].try_into().expect("4 bytes"));
        let mut entries = vec![0u8; ENTRIES_OFFSET + size as usize];
        entries[..table.len()].copy_from_slice(table.as_bytes());
        entries[TABLE_NAME_LEN..TABLE_NAME_LEN + 4].copy_from_slice(&size.to_ne_bytes());
        getsockopt(&sock, level, SO_GET_ENTRIES, &mut entries)
            .map_err(|e| legacy(e.to_string()))?;
        let chains = user_chains(&entries[ENTRIES_OFFSET..], family).map_err(legacy)?;
        out.push((table.to_string(), chains));
    }
    Ok(out)
}

fn getsockopt(
    sock: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    buf: &mut [u8],
) -> io::Result<()> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buf is valid for len bytes; the kernel writes at most len.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// User-defined chains of a legacy table blob: each starts with an entry whose target is
/// `ERROR` with the chain name as its data (the table's last entry is `ERROR` named "ERROR").
fn user_chains(blob: &[u8], family: Family) -> Result<Vec<String>, String> {
    let (target_off, next_off) = entry_offsets(family);
    let u16_at = |o: usize| -> Result<usize, String> {
        blob.get(o..o + 2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]) as usize)
            .ok_or_else(|| format!("truncated entry at {o}"))
    };
    let mut chains = Vec::new();
    let mut pos = 0;
    while pos < blob.len() {
        let target = pos + u16_at(pos + target_off)?;
        let next = u16_at(pos + next_off)?;
        if next == 0 {
            return Err(format!("entry at {pos} has length 0"));
        }
        // struct xt_entry_target: target_size (2), name[29], revision (1), then the data.
        let name = blob
            .get(target + 2..target + 31)
            .ok_or_else(|| format!("truncated target at {target}"))?;
        let name = name.split(|b| *b == 0).next().unwrap_or_default();
        if name == b"ERROR" {
            let data = blob
                .get(target + 32..(target + 64).min(pos + next))
                .ok_or_else(|| format!("truncated ERROR target at {target}"))?;
            let chain = data.split(|b| *b == 0).next().unwrap_or_default();
            if chain != b"ERROR" {
                chains.push(String::from_utf8_lossy(chain).into_owned());
            }
        }
        pos += next;
    }
    Ok(chains)
}

/// `svc-lb debug kube-proxy` as a table.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    if r.leftovers.is_empty() {
        s.push_str(
            "no kube-proxy leftovers found (iptables-legacy, iptables-nft, nftables, IPVS)\n",
        );
    } else {
        let w =
            |f: fn(&Leftover) -> &str| r.leftovers.iter().map(|l| f(l).len()).max().unwrap_or(0);
        let (wb, wl) = (w(|l| &l.backend).max(7), w(|l| &l.location).max(5));
        s.push_str(&format!("{:<wb$}  {:<wl$}  FOUND\n", "BACKEND", "WHERE"));
        for l in &r.leftovers {
            s.push_str(&format!(
                "{:<wb$}  {:<wl$}  {}\n",
                l.backend, l.location, l.found
            ));
            s.push_str(&format!(
                "{:<wb$}  {:<wl$}  cleanup: {}\n",
                "", "", l.cleanup
            ));
        }
    }
    for u in &r.unchecked {
        s.push_str(&format!("not checked: {u}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(family: &str, table: &str, chain: &str) -> NftChain {
        NftChain {
            family: family.into(),
            table: table.into(),
            chain: chain.into(),
        }
    }

    #[test]
    fn nft_chains_are_reported_per_table() {
        let chains = vec![
            chain("ip", "nat", "PREROUTING"),
            chain("ip", "nat", KUBE_SERVICES),
            chain("ip", "nat", "KUBE-SVC-AAAA"),
            chain("ip", "nat", "KUBE-SEP-BBBB"),
            chain("ip", "nat", "KUBE-SEP-CCCC"),
            // kubelet's, not kube-proxy's
            chain("ip", "mangle", "KUBE-IPTABLES-HINT"),
            chain("ip", "filter", "KUBE-FIREWALL"),
            chain("ip", NFT_TABLE, "services"),
            chain("ip6", NFT_TABLE, "services"),
            chain("ip6", NFT_TABLE, "nat-prerouting"),
        ];
        let l = from_nft(&chains);
        assert_eq!(l.len(), 3, "{l:?}");
        assert_eq!(l[0].backend, "nftables");
        assert_eq!(l[0].location, "ip kube-proxy");
        assert_eq!(l[0].found, "table with 1 chains");
        assert!(l[0].cleanup.contains("nft delete table ip kube-proxy"));
        assert_eq!(l[1].backend, "iptables-nft");
        assert_eq!(l[1].location, "ip nat");
        assert_eq!(l[1].found, "KUBE-SERVICES, 1 KUBE-SVC-*, 2 KUBE-SEP-*");
        assert_eq!(l[2].location, "ip6 kube-proxy");
        assert_eq!(l[2].found, "table with 2 chains");
        assert!(from_nft(&[chain("ip", "filter", "KUBE-FIREWALL")]).is_empty());
    }

    #[test]
    fn legacy_tables_with_kube_services_are_reported() {
        let tables = vec![
            ("filter".to_string(), vec!["KUBE-FIREWALL".to_string()]),
            (
                "nat".to_string(),
                vec![KUBE_SERVICES.to_string(), "KUBE-NODEPORTS".to_string()],
            ),
        ];
        let l = from_legacy(Family::V4, &tables);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].backend, "iptables-legacy");
        assert_eq!(l[0].location, "ip nat");
        assert_eq!(l[0].found, "KUBE-SERVICES, KUBE-NODEPORTS");
        assert!(l[0].cleanup.contains("iptables-legacy-save | grep -v KUBE"));
        let l6 = from_legacy(Family::V6, &tables);
        assert_eq!(l6[0].backend, "iptables-legacy");
        assert_eq!(l6[0].location, "ip6 nat");
        assert!(l6[0].cleanup.contains("ip6tables-legacy-save"));
    }

    #[test]
    fn ipvs_virtual_servers_are_counted() {
        let text = "IP Virtual Server version 1.2.1 (size=4096)\n\
                    Prot LocalAddress:Port Scheduler Flags\n\
                    \x20 -> RemoteAddress:Port Forward Weight ActiveConn InActConn\n\
                    TCP  0A60000A:0050 rr\n\
                    \x20 -> 0AF40102:1388      Masq    1      0          0\n\
                    UDP  0A60000A:0035 rr\n";
        let l = from_ipvs(text);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].found, "2 virtual servers");
        assert!(from_ipvs(&text.lines().take(3).collect::<Vec<_>>().join("\n")).is_empty());
    }

    /// A legacy IPv4 table blob: a standard entry, a user chain head, the final ERROR.
    #[test]
    fn user_chains_come_from_error_targets() {
        fn entry(family: Family, target: &[u8], data: &[u8]) -> Vec<u8> {
            let (to, no) = entry_offsets(family);
            let base = match family {
                Family::V4 => 112,
                Family::V6 => 168,
            };
            let tsize = 32 + data.len();
            let mut e = vec![0u8; base + tsize];
            e[to..to + 2].copy_from_slice(&(base as u16).to_ne_bytes());
            e[no..no + 2].copy_from_slice(&((base + tsize) as u16).to_ne_bytes());
            e[base..base + 2].copy_from_slice(&(tsize as u16).to_ne_bytes());
            e[base + 2..base + 2 + target.len()].copy_from_slice(target);
            e[base + 32..].copy_from_slice(data);
            e
        }
        let name = |n: &[u8]| {
            let mut d = [0u8; 32];
            d[..n.len()].copy_from_slice(n);
            d
        };
        for family in [Family::V4, Family::V6] {
            let mut blob = entry(family, b"", &[0u8; 8]);
            blob.extend(entry(family, b"ERROR", &name(KUBE_SERVICES.as_bytes())));
            blob.extend(entry(family, b"", &[0u8; 8]));
            blob.extend(entry(family, b"ERROR", &name(b"KUBE-SEP-XYZ")));
            blob.extend(entry(family, b"ERROR", &name(b"ERROR")));
            assert_eq!(
                user_chains(&blob, family).unwrap(),
                [KUBE_SERVICES, "KUBE-SEP-XYZ"]
            );
            assert!(user_chains(&blob[..blob.len() - 10], family).is_err());
        }
    }

    #[test]
    fn table_lists_findings_and_cleanups() {
        let r = Report {
            leftovers: from_nft(&[chain("ip", NFT_TABLE, "services")]),
            unchecked: vec!["IPVS (/proc/net/ip_vs): permission denied".into()],
        };
        let t = table(&r);
        assert!(
            t.starts_with(
                "BACKEND   WHERE          FOUND\nnftables  ip kube-proxy  table with 1 chains\n"
            ),
            "{t}"
        );
        assert!(t.contains("cleanup: kube-proxy --cleanup   (or: nft delete table ip kube-proxy)"));
        assert!(t.ends_with("not checked: IPVS (/proc/net/ip_vs): permission denied\n"));
        assert!(table(&Report::default()).starts_with("no kube-proxy leftovers found"));
    }
}
