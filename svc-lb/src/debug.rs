//! `svc-lb debug services|backends|conntrack|stats`: reads only the pinned maps, so it works
//! while an agent runs and after it stopped. Reports are built from `LbMaps + LbStats` (tested
//! against the fake) and rendered as aligned tables or JSON.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::Serialize;
use svc_lb_common::RevNatId;
use svc_lb_common::{
    CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_CLOSING, CT_F_SNAT, CtEntry, CtKeyV4, SCOPE_EXTERNAL,
    STAT_NAMES, SVC_F_LOCAL, SVC_F_MAGLEV, SVC_F_SOURCE_RANGES, ip_from_net, port_from_net,
};

use crate::{
    cli::{DebugArgs, DebugCommand, OutputFormat},
    error::{DebugError, MapsError},
    maps::{BpfLbMaps, LbMaps, LbStats, MapState, dump},
};

/// Runs one `svc-lb debug` subcommand and returns what to print.
pub fn run(cmd: &DebugCommand) -> Result<String, DebugError> {
    let open = |a: &DebugArgs| BpfLbMaps::open(&a.pin.pin_dir);
    match cmd {
        DebugCommand::Services(a) if a.list => {
            let rows = crate::views::list::rows(&open(&a.common)?.dump()?);
            let rows = crate::views::list::filter(rows, a.namespaces.namespace.as_deref());
            Ok(crate::views::list::render(&rows, a.common.output)?)
        }
        DebugCommand::Services(a) => services(
            &open(&a.common)?,
            a.namespaces.namespace.as_deref(),
            a.common.output,
        ),
        DebugCommand::Backends(a) => backends(&open(a)?, a.output),
        DebugCommand::Conntrack(a) => conntrack(&open(a)?, monotonic_now_ns()?, a.output),
        DebugCommand::Stats(a) => stats(&open(a)?, a.output),
        // Reads manifests, not pins.
        DebugCommand::Env(a) => Ok(crate::views::env::run(a)?),
    }
}

/// `bpf_ktime_get_ns()` is CLOCK_MONOTONIC, so conntrack ages are computed against it.
fn monotonic_now_ns() -> Result<u64, DebugError> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(DebugError::Clock(std::io::Error::last_os_error()));
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// A left-aligned text table with two spaces between columns; numeric columns right-aligned.
pub struct Table {
    headers: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// `(header, right_aligned)` per column.
    pub fn new(columns: &[(&'static str, bool)]) -> Self {
        Self {
            headers: columns.iter().map(|c| c.0).collect(),
            right: columns.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = widths[i] - cell.chars().count();
                if self.right[i] {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn json<T: Serialize>(v: &T) -> Result<String, DebugError> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    Ok(s)
}

fn name_of(state: &MapState, rev_nat_id: RevNatId) -> String {
    state.names.get(&rev_nat_id).map_or_else(
        || format!("<rev-nat {rev_nat_id}>"),
        |n| n.as_str().to_string(),
    )
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BackendReport {
    pub address: Ipv4Addr,
    pub port: u16,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ServiceReport {
    pub service: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// `ip:port`.
    pub frontend: String,
    pub protocol: String,
    pub backends: Vec<BackendReport>,
    pub packets: u64,
    pub bytes: u64,
    /// sessionAffinity ClientIP timeout, when the Service has affinity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_affinity_timeout_s: Option<u32>,
    /// `maglev` when new flows use the Maglev table (absent: random).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lb_algorithm: Option<String>,
    /// loadBalancerSourceRanges enforced on this frontend (`a.b.c.d/n`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<String>,
    /// Traffic policy Local (node-local endpoints only).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub traffic_policy_local: bool,
}

/// One report per programmed frontend, in address order.
pub fn service_reports(maps: &(impl LbMaps + LbStats)) -> Result<Vec<ServiceReport>, MapsError> {
    let state = maps.dump()?;
    let mut frontends: Vec<_> = state
        .services
        .iter()
        .filter(|(k, _)| k.backend_slot == 0 && k.scope == SCOPE_EXTERNAL)
        .collect();
    frontends.sort_by_key(|(k, _)| (k.ip(), k.port(), k.proto));
    let mut out = Vec::new();
    for (k, v) in frontends {
        let mut backends = Vec::new();
        for slot in 1..=v.count {
            let Some(e) = state.services.get(&k.with_slot(slot)) else {
                continue;
            };
            let Some(b) = state.backends.get(&e.backend_id) else {
                continue;
            };
            let c = maps.backend_counter(e.backend_id)?;
            backends.push(BackendReport {
                address: b.ip(),
                port: b.port_host(),
                packets: c.packets,
                bytes: c.bytes,
            });
        }
        let mut c = maps.svc_counter(v.rev_nat_id)?;
        // In-cluster traffic to a traffic-policy-Local frontend runs through its twin (scope
        // internal, own rev-NAT id): it is still this frontend's traffic.
        let twin = svc_lb_common::ServiceKeyV4 {
            scope: svc_lb_common::SCOPE_INTERNAL,
            ..*k
        };
        if let Some(t) = state.services.get(&twin) {
            let tc = maps.svc_counter(t.rev_nat_id)?;
            c.packets += tc.packets;
            c.bytes += tc.bytes;
        }
        out.push(ServiceReport {
            service: name_of(&state, v.rev_nat_id),
            kind: dump::flags_name(v.flags & !(SVC_F_MAGLEV | SVC_F_SOURCE_RANGES | SVC_F_LOCAL)),
            traffic_policy_local: v.flags & SVC_F_LOCAL != 0,
            frontend: format!("{}:{}", k.ip(), k.port()),
            protocol: dump::proto_name(k.proto),
            backends,
            packets: c.packets,
            bytes: c.bytes,
            session_affinity_timeout_s: (v.affinity_timeout_s != 0).then_some(v.affinity_timeout_s),
            lb_algorithm: (v.flags & SVC_F_MAGLEV != 0).then(|| "maglev".to_string()),
            source_ranges: if v.flags & SVC_F_SOURCE_RANGES != 0 {
                state
                    .src_ranges
                    .iter()
                    .filter(|r| r.rev_nat_id == v.rev_nat_id)
                    .map(|r| format!("{}/{}", r.addr, r.len))
                    .collect()
            } else {
                Vec::new()
            },
        });
    }
    Ok(out)
}

/// `namespace`: only frontends of Services in it (`None` = all).
pub fn services(
    maps: &(impl LbMaps + LbStats),
    namespace: Option<&str>,
    format: OutputFormat,
) -> Result<String, DebugError> {
    let mut reports = service_reports(maps)?;
    if let Some(ns) = namespace {
        reports.retain(|r| {
            crate::views::list::split_name(&r.service).is_some_and(|(n, _, _)| n == ns)
        });
    }
    if format == OutputFormat::Json {
        return json(&reports);
    }
    let mut t = Table::new(&[
        ("SERVICE", false),
        ("TYPE", false),
        ("FRONTEND", false),
        ("BACKENDS", false),
        ("PACKETS", true),
        ("BYTES", true),
    ]);
    for r in &reports {
        let summary = match r.backends.len() {
            0 => "none (rejects)".to_string(),
            1 => "1 backend".to_string(),
            n => format!("{n} backends"),
        };
        let mut kind = r.kind.clone();
        if let Some(t) = r.session_affinity_timeout_s {
            kind += &format!(" affinity={t}s");
        }
        if let Some(a) = &r.lb_algorithm {
            kind += &format!(" {a}");
        }
        if !r.source_ranges.is_empty() {
            kind += &format!(" from={}", r.source_ranges.join(","));
        }
        if r.traffic_policy_local {
            kind += " local";
        }
        t.row(vec![
            r.service.clone(),
            kind,
            format!("{}/{}", r.frontend, r.protocol),
            summary,
            r.packets.to_string(),
            r.bytes.to_string(),
        ]);
        // One row per backend under its frontend, with its own counters.
        for b in &r.backends {
            t.row(vec![
                String::new(),
                String::new(),
                String::new(),
                format!("{}:{}", b.address, b.port),
                b.packets.to_string(),
                b.bytes.to_string(),
            ]);
        }
    }
    Ok(t.render())
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BackendRow {
    pub id: u32,
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    pub state: String,
    /// Services (`namespace/name:port`) with a frontend balancing over this backend.
    pub services: Vec<String>,
    pub packets: u64,
    pub bytes: u64,
}

pub fn backend_rows(maps: &(impl LbMaps + LbStats)) -> Result<Vec<BackendRow>, MapsError> {
    let state = maps.dump()?;
    let mut users: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (k, v) in &state.services {
        if k.backend_slot == 0 {
            continue;
        }
        let name = name_of(&state, v.rev_nat_id);
        let list = users.entry(v.backend_id).or_default();
        if !list.contains(&name) {
            list.push(name);
        }
    }
    let mut rows = Vec::new();
    for (id, b) in &state.backends {
        let c = maps.backend_counter(*id)?;
        let mut services = users.remove(id).unwrap_or_default();
        services.sort();
        rows.push(BackendRow {
            id: *id,
            address: b.ip(),
            port: b.port_host(),
            protocol: dump::proto_name(b.proto),
            state: dump::state_name(b.state),
            services,
            packets: c.packets,
            bytes: c.bytes,
        });
    }
    Ok(rows)
}

pub fn backends(
    maps: &(impl LbMaps + LbStats),
    format: OutputFormat,
) -> Result<String, DebugError> {
    let rows = backend_rows(maps)?;
    if format == OutputFormat::Json {
        return json(&rows);
    }
    let mut t = Table::new(&[
        ("ID", true),
        ("BACKEND", false),
        ("STATE", false),
        ("SERVICES", false),
        ("PACKETS", true),
        ("BYTES", true),
    ]);
    for r in &rows {
        t.row(vec![
            r.id.to_string(),
            format!("{}:{}/{}", r.address, r.port, r.protocol),
            r.state.clone(),
            if r.services.is_empty() {
                "-".into()
            } else {
                r.services.join(",")
            },
            r.packets.to_string(),
            r.bytes.to_string(),
        ]);
    }
    Ok(t.render())
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct FlowRow {
    pub protocol: String,
    pub client: String,
    pub frontend: String,
    pub backend: String,
    pub service: String,
    /// Seconds since the last packet of the flow (either direction).
    pub age_seconds: u64,
    pub closing: bool,
}

fn endpoint(ip: Ipv4Addr, port: u16) -> String {
    format!("{ip}:{port}")
}

/// One row per flow. A flow has a forward entry (client -> frontend) and a reply entry
/// (backend -> client); either may be missing (LRU eviction), so both are folded into rows.
pub fn flow_rows(maps: &(impl LbMaps + LbStats), now_ns: u64) -> Result<Vec<FlowRow>, MapsError> {
    let state = maps.dump()?;
    // (proto, client, frontend, backend) -> (rev-NAT id, last seen, closing)
    type Flow = (String, String, String, String);
    let mut flows: BTreeMap<Flow, (RevNatId, u64, bool)> = BTreeMap::new();
    for (k, e) in maps.conntrack()? {
        let Some((client, frontend, backend)) = flow_ends(&state, &k, &e) else {
            continue;
        };
        let proto = dump::proto_name(k.proto);
        let entry =
            flows
                .entry((proto, client, frontend, backend))
                .or_insert((e.rev_nat_id, 0, false));
        entry.1 = entry.1.max(e.last_seen_ns);
        entry.2 |= e.flags & CT_F_CLOSING != 0;
    }
    Ok(flows
        .into_iter()
        .map(
            |((protocol, client, frontend, backend), (rev, last_seen, closing))| FlowRow {
                protocol,
                client,
                frontend,
                backend,
                service: state
                    .names
                    .get(&rev)
                    .map_or_else(|| "-".to_string(), |n| n.as_str().to_string()),
                age_seconds: now_ns.saturating_sub(last_seen) / 1_000_000_000,
                closing,
            },
        )
        .collect())
}

/// (client, frontend, backend) of a conntrack entry, in whichever direction it was keyed.
fn flow_ends(state: &MapState, k: &CtKeyV4, e: &CtEntry) -> Option<(String, String, String)> {
    let (s, d) = k.ips();
    let (sp, dp) = k.ports();
    match k.dir {
        CT_DIR_FORWARD => {
            let backend = state.backends.get(&e.backend_id).map_or_else(
                || format!("<backend {} gone>", e.backend_id),
                |b| endpoint(b.ip(), b.port_host()),
            );
            Some((endpoint(s, sp), endpoint(d, dp), backend))
        }
        CT_DIR_REPLY => {
            let frontend = state.revnat.get(&e.rev_nat_id).map_or_else(
                || format!("<rev-nat {} gone>", e.rev_nat_id),
                |r| endpoint(r.ip(), r.port_host()),
            );
            // A SNATed flow's reply is keyed by the node's address: the client is in the entry.
            let client = if e.flags & CT_F_SNAT != 0 {
                endpoint(ip_from_net(e.nat_addr), port_from_net(e.nat_port))
            } else {
                endpoint(d, dp)
            };
            Some((client, frontend, endpoint(s, sp)))
        }
        _ => None,
    }
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn conntrack(
    maps: &(impl LbMaps + LbStats),
    now_ns: u64,
    format: OutputFormat,
) -> Result<String, DebugError> {
    let rows = flow_rows(maps, now_ns)?;
    if format == OutputFormat::Json {
        return json(&rows);
    }
    let mut t = Table::new(&[
        ("PROTO", false),
        ("CLIENT", false),
        ("", false),
        ("FRONTEND", false),
        ("", false),
        ("BACKEND", false),
        ("SERVICE", false),
        ("AGE", true),
        ("STATE", false),
    ]);
    for r in &rows {
        t.row(vec![
            r.protocol.clone(),
            r.client.clone(),
            "->".into(),
            r.frontend.clone(),
            "=>".into(),
            r.backend.clone(),
            r.service.clone(),
            human_age(r.age_seconds),
            if r.closing { "closing" } else { "open" }.into(),
        ]);
    }
    Ok(t.render())
}

pub fn stats(maps: &impl LbStats, format: OutputFormat) -> Result<String, DebugError> {
    let values = maps.global_counters()?;
    let named: Vec<(&str, u64)> = STAT_NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, values.get(i).copied().unwrap_or(0)))
        .collect();
    if format == OutputFormat::Json {
        let obj: serde_json::Map<String, serde_json::Value> = named
            .iter()
            .map(|(n, v)| (n.to_string(), (*v).into()))
            .collect();
        return json(&obj);
    }
    let mut t = Table::new(&[("STAT", false), ("VALUE", true)]);
    for (n, v) in named {
        t.row(vec![n.to_string(), v.to_string()]);
    }
    Ok(t.render())
}

#[cfg(test)]
pub(crate) mod tests {
    use svc_lb_common::{
        BE_STATE_TERMINATING, Counter, IPPROTO_TCP, IPPROTO_UDP, STAT_CT_NEW, STAT_DNAT,
        STAT_PACKETS, ip_to_net, port_to_net,
    };

    use super::*;
    use crate::{
        cli::DebugArgs,
        maps::FakeLbMaps,
        model::{
            BackendAddr, DesiredState, Frontend, FrontendKey, FrontendKind, Proto, ServicePortRef,
        },
        reconcile::{Limits, reconcile},
    };

    /// A frontend of Service port `svc` (`namespace/name:port`) with `be` as its backends
    /// (also used by the views' tests).
    pub(crate) fn frontend(
        ip: [u8; 4],
        port: u16,
        proto: Proto,
        kind: FrontendKind,
        svc: &str,
        be: &[([u8; 4], u16)],
    ) -> Frontend {
        let (ns, rest) = svc.split_once('/').unwrap();
        let (name, p) = rest.split_once(':').unwrap();
        Frontend {
            key: FrontendKey {
                ip: ip.into(),
                port,
                proto,
                internal: false,
            },
            kind,
            service: ServicePortRef {
                namespace: ns.into(),
                name: name.into(),
                port: p.into(),
            },
            backends: be
                .iter()
                .map(|(ip, port)| BackendAddr {
                    ip: (*ip).into(),
                    port: *port,
                })
                .collect(),
            policy: Default::default(),
        }
    }

    /// ClusterIP with 2 backends (ids 1, 2; rev-NAT 1), an empty ClusterIP (rev-NAT 2) and a UDP
    /// service with one backend (id 3, rev-NAT 3).
    fn fake() -> FakeLbMaps {
        let desired = DesiredState {
            frontends: [
                frontend(
                    [10, 96, 0, 10],
                    80,
                    Proto::Tcp,
                    FrontendKind::ClusterIp,
                    "default/frontend-svc:80",
                    &[([10, 244, 1, 2], 5000), ([10, 244, 2, 2], 5000)],
                ),
                frontend(
                    [10, 96, 0, 11],
                    80,
                    Proto::Tcp,
                    FrontendKind::ClusterIp,
                    "default/empty:http",
                    &[],
                ),
                frontend(
                    [10, 96, 0, 53],
                    53,
                    Proto::Udp,
                    FrontendKind::ClusterIp,
                    "kube-system/dns-like:dns",
                    &[([10, 244, 1, 2], 5353)],
                ),
            ]
            .into_iter()
            .map(|f| (f.key, f))
            .collect(),
        };
        let mut maps = FakeLbMaps::default();
        reconcile(&mut maps, &desired, Limits::default()).unwrap();
        maps.svc_stats.insert(
            1,
            Counter {
                packets: 12,
                bytes: 3456,
            },
        );
        maps.be_stats.insert(
            1,
            Counter {
                packets: 5,
                bytes: 1000,
            },
        );
        maps.be_stats.insert(
            2,
            Counter {
                packets: 7,
                bytes: 2456,
            },
        );
        maps
    }

    #[test]
    fn services_table() {
        let out = services(&fake(), None, OutputFormat::Table).unwrap();
        assert_eq!(
            out,
            "\
SERVICE                   TYPE       FRONTEND           BACKENDS         PACKETS  BYTES
default/frontend-svc:80   ClusterIP  10.96.0.10:80/TCP  2 backends            12   3456
                                                        10.244.1.2:5000        5   1000
                                                        10.244.2.2:5000        7   2456
default/empty:http        ClusterIP  10.96.0.11:80/TCP  none (rejects)         0      0
kube-system/dns-like:dns  ClusterIP  10.96.0.53:53/UDP  1 backend              0      0
                                                        10.244.1.2:5353        0      0
"
        );
    }

    #[test]
    fn services_namespace_filter() {
        let out = services(&fake(), Some("kube-system"), OutputFormat::Table).unwrap();
        assert_eq!(
            out,
            "\
SERVICE                   TYPE       FRONTEND           BACKENDS         PACKETS  BYTES
kube-system/dns-like:dns  ClusterIP  10.96.0.53:53/UDP  1 backend              0      0
                                                        10.244.1.2:5353        0      0
"
        );
    }

    #[test]
    fn services_json_has_stable_fields() {
        let out = services(&fake(), None, OutputFormat::Json).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v[0],
            serde_json::json!({
                "service": "default/frontend-svc:80",
                "type": "ClusterIP",
                "frontend": "10.96.0.10:80",
                "protocol": "TCP",
                "backends": [
                    {"address": "10.244.1.2", "port": 5000, "packets": 5, "bytes": 1000},
                    {"address": "10.244.2.2", "port": 5000, "packets": 7, "bytes": 2456},
                ],
                "packets": 12,
                "bytes": 3456,
            })
        );
        assert_eq!(v.as_array().unwrap().len(), 3);
        assert_eq!(v[1]["backends"], serde_json::json!([]));
    }

    #[test]
    fn backends_table_names_the_services_using_each_backend() {
        let mut maps = fake();
        maps.state.backends.get_mut(&2).unwrap().state = BE_STATE_TERMINATING;
        let out = backends(&maps, OutputFormat::Table).unwrap();
        assert_eq!(
            out,
            "\
ID  BACKEND              STATE        SERVICES                  PACKETS  BYTES
 1  10.244.1.2:5000/TCP  active       default/frontend-svc:80         5   1000
 2  10.244.2.2:5000/TCP  terminating  default/frontend-svc:80         7   2456
 3  10.244.1.2:5353/UDP  active       kube-system/dns-like:dns        0      0
"
        );
        let json: serde_json::Value =
            serde_json::from_str(&backends(&maps, OutputFormat::Json).unwrap()).unwrap();
        assert_eq!(json[1]["state"], "terminating");
        assert_eq!(
            json[1]["services"],
            serde_json::json!(["default/frontend-svc:80"])
        );
    }

    fn ct_key(s: [u8; 4], sp: u16, d: [u8; 4], dp: u16, proto: u8, dir: u8) -> CtKeyV4 {
        CtKeyV4 {
            saddr: ip_to_net(s.into()),
            daddr: ip_to_net(d.into()),
            sport: port_to_net(sp),
            dport: port_to_net(dp),
            proto,
            dir,
            _pad: [0; 2],
        }
    }

    #[test]
    fn conntrack_folds_both_directions_into_one_flow() {
        let mut maps = fake();
        let sec = 1_000_000_000u64;
        let entry = |backend_id, rev_nat_id, last_seen_ns, flags| CtEntry {
            backend_id,
            rev_nat_id,
            flags,
            last_seen_ns,
            ..Default::default()
        };
        maps.ct = vec![
            (
                ct_key(
                    [172, 31, 0, 2],
                    40000,
                    [10, 96, 0, 10],
                    80,
                    IPPROTO_TCP,
                    CT_DIR_FORWARD,
                ),
                entry(2, 1, 90 * sec, 0),
            ),
            (
                ct_key(
                    [10, 244, 2, 2],
                    5000,
                    [172, 31, 0, 2],
                    40000,
                    IPPROTO_TCP,
                    CT_DIR_REPLY,
                ),
                entry(2, 1, 95 * sec, CT_F_CLOSING),
            ),
            // Only the reply side survived, and it points at a removed backend id.
            (
                ct_key(
                    [10, 244, 1, 2],
                    5353,
                    [172, 31, 0, 2],
                    5555,
                    IPPROTO_UDP,
                    CT_DIR_REPLY,
                ),
                entry(3, 3, 0, 0),
            ),
            (
                ct_key(
                    [172, 31, 0, 2],
                    41000,
                    [10, 96, 0, 10],
                    80,
                    IPPROTO_TCP,
                    CT_DIR_FORWARD,
                ),
                entry(9, 1, 100 * sec, 0),
            ),
        ];
        let out = conntrack(&maps, 100 * sec, OutputFormat::Table).unwrap();
        assert_eq!(
            out,
            "\
PROTO  CLIENT                FRONTEND           BACKEND           SERVICE                     AGE  STATE
TCP    172.31.0.2:40000  ->  10.96.0.10:80  =>  10.244.2.2:5000   default/frontend-svc:80      5s  closing
TCP    172.31.0.2:41000  ->  10.96.0.10:80  =>  <backend 9 gone>  default/frontend-svc:80      0s  open
UDP    172.31.0.2:5555   ->  10.96.0.53:53  =>  10.244.1.2:5353   kube-system/dns-like:dns  1m40s  open
"
        );
    }

    #[test]
    fn conntrack_shows_a_snated_flow_once_with_its_client() {
        let mut maps = fake();
        let e = |nat_addr: [u8; 4], nat_port| CtEntry {
            backend_id: 2,
            rev_nat_id: 1,
            flags: CT_F_SNAT,
            nat_addr: ip_to_net(nat_addr.into()),
            nat_port: port_to_net(nat_port),
            ..Default::default()
        };
        let (client, frontend, node) = ([172, 31, 0, 2], [10, 96, 0, 10], [172, 30, 0, 1]);
        maps.ct = vec![
            (
                ct_key(client, 40000, frontend, 80, IPPROTO_TCP, CT_DIR_FORWARD),
                e(node, 61234),
            ),
            // The reply entry is keyed by backend -> node:SNAT port.
            (
                ct_key(
                    [10, 244, 2, 2],
                    5000,
                    node,
                    61234,
                    IPPROTO_TCP,
                    CT_DIR_REPLY,
                ),
                e(client, 40000),
            ),
        ];
        let rows = flow_rows(&maps, 0).unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(
            (rows[0].client.as_str(), rows[0].backend.as_str()),
            ("172.31.0.2:40000", "10.244.2.2:5000")
        );
    }

    #[test]
    fn stats_sum_and_name_every_counter() {
        let mut maps = fake();
        maps.global = vec![0; 16];
        maps.global[STAT_PACKETS as usize] = 100;
        maps.global[STAT_DNAT as usize] = 40;
        maps.global[STAT_CT_NEW as usize] = 3;
        let out = stats(&maps, OutputFormat::Table).unwrap();
        assert!(
            out.starts_with(
                "STAT               VALUE\npackets              100\ndnat                  40\n"
            ),
            "{out}"
        );
        assert_eq!(out.lines().count(), 1 + STAT_NAMES.len());
        let json: serde_json::Value =
            serde_json::from_str(&stats(&maps, OutputFormat::Json).unwrap()).unwrap();
        assert_eq!(json["ct_new"], 3);
        assert_eq!(json["ct_full"], 0);
    }

    #[test]
    fn table_pads_and_trims() {
        let mut t = Table::new(&[("A", false), ("NUM", true), ("LAST", false)]);
        t.row(vec!["long-cell".into(), "7".into(), String::new()]);
        t.row(vec!["x".into(), "12345".into(), "end".into()]);
        assert_eq!(
            t.render(),
            "A            NUM  LAST\nlong-cell      7\nx          12345  end\n"
        );
    }

    #[test]
    fn missing_pins_give_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("svc-lb-debug-missing-{}", std::process::id()));
        let cmd = DebugCommand::Services(crate::cli::ServicesArgs {
            list: true,
            namespaces: crate::cli::NamespaceArgs {
                namespace: None,
                all_namespaces: false,
            },
            common: DebugArgs {
                output: OutputFormat::Table,
                pin: crate::cli::PinArgs {
                    pin_dir: dir.clone(),
                },
            },
        });
        let err = run(&cmd).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "no svc-lb maps under {} — is the agent running / was it ever started?",
                dir.display()
            )
        );
    }
}
