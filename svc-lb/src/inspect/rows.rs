//! The rows every view of the maps is built from: one report per programmed frontend with its
//! backends ([`service_reports`]), one row per backend with the Services using it
//! ([`backend_rows`]) and one per conntrack flow ([`flow_rows`]). `svc-lb debug` renders them
//! as tables or JSON; the agent's metrics and dashboard (`crate::serve`) use them too, so all
//! of them count and name things the same way.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::Serialize;
use svc_lb_common::{
    CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_CLOSING, CT_F_SNAT, CtEntry, CtKeyV4, RevNatId,
    SCOPE_EXTERNAL, SVC_F_LOCAL, SVC_F_MAGLEV, SVC_F_SOURCE_RANGES, ip_from_net, port_from_net,
};

use crate::maps::{LbMaps, LbStats, MapState, MapsError, dump};

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
