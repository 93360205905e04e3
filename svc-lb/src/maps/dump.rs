//! Canonical one-line-per-entry text of a `MapState` (in the spirit of Cilium's `lb/maps-dump`),
//! for golden tests and for logs. Sorted by host-order address so the output reads naturally
//! and does not depend on map iteration order.

use std::fmt::Write as _;

use svc_lb_common::{
    BE_F_REMOTE, BE_STATE_ACTIVE, BE_STATE_MASK, BE_STATE_TERMINATING, SCOPE_EXTERNAL,
    SCOPE_INTERNAL, SVC_F_LOCAL, SVC_F_MAGLEV, SVC_F_SOURCE_RANGES, ServiceKeyV4,
};

use super::MapState;
use crate::model::{FrontendKind, Proto};

pub(crate) fn proto_name(n: u8) -> String {
    Proto::from_number(n).map_or_else(|| format!("proto{n}"), |p| p.to_string())
}

/// `ClusterIP`, `NodePort|ExternalIP`, plus the raw value of any unknown bits.
pub(crate) fn flags_name(flags: u16) -> String {
    let kinds = [
        FrontendKind::ClusterIp,
        FrontendKind::NodePort,
        FrontendKind::ExternalIp,
        FrontendKind::LoadBalancer,
    ];
    let mut parts: Vec<String> = kinds
        .iter()
        .filter(|k| flags & k.flag() != 0)
        .map(|k| k.to_string())
        .collect();
    if flags & SVC_F_MAGLEV != 0 {
        parts.push("Maglev".into());
    }
    if flags & SVC_F_SOURCE_RANGES != 0 {
        parts.push("SourceRanges".into());
    }
    if flags & SVC_F_LOCAL != 0 {
        parts.push("Local".into());
    }
    let known = kinds.iter().fold(
        SVC_F_MAGLEV | SVC_F_SOURCE_RANGES | SVC_F_LOCAL,
        |acc, k| acc | k.flag(),
    );
    if flags & !known != 0 {
        parts.push(format!("{:#x}", flags & !known));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join("|")
    }
}

pub(crate) fn state_name(state: u8) -> String {
    if state & BE_F_REMOTE != 0 {
        return format!("{} remote", state_name(state & BE_STATE_MASK));
    }
    match state {
        BE_STATE_ACTIVE => "active".into(),
        BE_STATE_TERMINATING => "terminating".into(),
        n => format!("state{n}"),
    }
}

fn frontend_sort_key(k: &ServiceKeyV4) -> (std::net::Ipv4Addr, u16, u8, u8, u16) {
    (k.ip(), k.port(), k.proto, k.scope, k.backend_slot)
}

/// The dump text: `SVC:` lines, then `BE:`, `REV:` and `NAME:` lines, one entry per line.
pub fn dump_text(state: &MapState) -> String {
    let mut out = String::new();
    let mut services: Vec<_> = state.services.iter().collect();
    services.sort_by_key(|(k, _)| frontend_sort_key(k));
    for (k, v) in services {
        let _ = write!(
            out,
            "SVC: ADDR={}:{}/{} SLOT={}",
            k.ip(),
            k.port(),
            proto_name(k.proto),
            k.backend_slot
        );
        match k.scope {
            SCOPE_EXTERNAL => {}
            SCOPE_INTERNAL => out.push_str(" SCOPE=internal"),
            s => {
                let _ = write!(out, " SCOPE={s}");
            }
        }
        if k.backend_slot == 0 {
            let _ = write!(
                out,
                " COUNT={} REVNAT={} FLAGS={}",
                v.count,
                v.rev_nat_id,
                flags_name(v.flags)
            );
            if v.affinity_timeout_s != 0 {
                let _ = write!(out, " AFFINITY={}s", v.affinity_timeout_s);
            }
        } else {
            let _ = write!(out, " BACKEND={} REVNAT={}", v.backend_id, v.rev_nat_id);
        }
        out.push('\n');
    }
    for (id, b) in &state.backends {
        let _ = writeln!(
            out,
            "BE: ID={id} ADDR={}:{}/{} STATE={}",
            b.ip(),
            b.port_host(),
            proto_name(b.proto),
            state_name(b.state)
        );
    }
    for (id, r) in &state.revnat {
        let _ = writeln!(out, "REV: ID={id} ADDR={}:{}", r.ip(), r.port_host());
    }
    for (id, n) in &state.names {
        let _ = writeln!(out, "NAME: ID={id} NAME={}", n.as_str());
    }
    for (id, t) in &state.maglev {
        // Positions per backend id: shows the table's balance at a glance.
        let mut share = std::collections::BTreeMap::new();
        for b in t.backend_ids {
            *share.entry(b).or_insert(0usize) += 1;
        }
        let share: Vec<String> = share.iter().map(|(b, n)| format!("{b}:{n}")).collect();
        let _ = writeln!(out, "MAGLEV: REVNAT={id} POSITIONS={}", share.join(","));
    }
    for r in &state.src_ranges {
        let _ = writeln!(
            out,
            "SRCRANGE: REVNAT={} CIDR={}/{}",
            r.rev_nat_id, r.addr, r.len
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use svc_lb_common::{
        BackendV4, IPPROTO_TCP, RevNatV4, SVC_F_CLUSTER_IP, SVC_F_NODE_PORT, ServiceEntry, SvcName,
    };

    use super::*;

    #[test]
    fn dump_is_sorted_by_host_order_and_shows_every_field() {
        let mut s = MapState::default();
        // 10.96.0.10 sorts before 10.96.0.9 as a network-order u32 on little endian; the dump
        // must use the address order a reader expects.
        let a = ServiceKeyV4::new(Ipv4Addr::new(10, 96, 0, 10), 80, IPPROTO_TCP, 0, 0);
        let b = ServiceKeyV4::new(Ipv4Addr::new(10, 96, 0, 9), 80, IPPROTO_TCP, 0, 0);
        s.services.insert(
            a,
            ServiceEntry {
                count: 1,
                rev_nat_id: 2,
                flags: SVC_F_CLUSTER_IP | SVC_F_NODE_PORT | 0x1000,
                ..Default::default()
            },
        );
        s.services.insert(
            a.with_slot(1),
            ServiceEntry {
                backend_id: 7,
                rev_nat_id: 2,
                ..Default::default()
            },
        );
        s.services.insert(b, ServiceEntry::default());
        s.backends.insert(
            7,
            BackendV4::new(Ipv4Addr::new(10, 244, 1, 2), 5000, IPPROTO_TCP, 1),
        );
        s.revnat
            .insert(2, RevNatV4::new(Ipv4Addr::new(10, 96, 0, 10), 80));
        s.names.insert(2, SvcName::new("default/web:http"));
        assert_eq!(
            dump_text(&s),
            "SVC: ADDR=10.96.0.9:80/TCP SLOT=0 COUNT=0 REVNAT=0 FLAGS=none\n\
             SVC: ADDR=10.96.0.10:80/TCP SLOT=0 COUNT=1 REVNAT=2 FLAGS=ClusterIP|NodePort|0x1000\n\
             SVC: ADDR=10.96.0.10:80/TCP SLOT=1 BACKEND=7 REVNAT=2\n\
             BE: ID=7 ADDR=10.244.1.2:5000/TCP STATE=terminating\n\
             REV: ID=2 ADDR=10.96.0.10:80\n\
             NAME: ID=2 NAME=default/web:http\n"
        );
    }
}
