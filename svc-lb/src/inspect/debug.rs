//! `svc-lb debug services|backends|conntrack|stats`: reads only the pinned maps, so it works
//! while an agent runs and after it stopped. Reports are built from `LbMaps + LbStats` (tested
//! against the fake) and rendered as aligned tables or JSON.

use svc_lb_common::STAT_NAMES;

use super::{
    InspectError, json, list,
    rows::{backend_rows, flow_rows, service_reports},
    table::Table,
};
use crate::{
    cli::{DebugArgs, DebugCommand, OutputFormat},
    maps::{BpfLbMaps, LbMaps, LbStats},
};

/// Runs one `svc-lb debug` subcommand and returns what to print.
pub fn run(cmd: &DebugCommand) -> Result<String, InspectError> {
    let open = |a: &DebugArgs| BpfLbMaps::open(&a.pin.pin_dir);
    match cmd {
        DebugCommand::Services(a) if a.list => {
            let rows = list::rows(&open(&a.common)?.dump()?);
            let rows = list::filter(rows, a.namespaces.namespace.as_deref());
            Ok(list::render(&rows, a.common.output)?)
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
        DebugCommand::Env(a) => Ok(super::env::run(a)?),
        // Reads the node's netfilter and IPVS state, not pins.
        DebugCommand::KubeProxy(a) => {
            let report = crate::kube_proxy::detect();
            match a.output {
                OutputFormat::Table => Ok(crate::kube_proxy::table(&report)),
                OutputFormat::Json => Ok(super::json(&report)?),
            }
        }
    }
}

/// `bpf_ktime_get_ns()` is CLOCK_MONOTONIC, so conntrack ages are computed against it.
fn monotonic_now_ns() -> Result<u64, InspectError> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(InspectError::Clock(std::io::Error::last_os_error()));
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// `namespace`: only frontends of Services in it (`None` = all).
pub fn services(
    maps: &(impl LbMaps + LbStats),
    namespace: Option<&str>,
    format: OutputFormat,
) -> Result<String, InspectError> {
    let mut reports = service_reports(maps)?;
    if let Some(ns) = namespace {
        reports.retain(|r| list::split_name(&r.service).is_some_and(|(n, _, _)| n == ns));
    }
    if format == OutputFormat::Json {
        return Ok(json(&reports)?);
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

pub fn backends(
    maps: &(impl LbMaps + LbStats),
    format: OutputFormat,
) -> Result<String, InspectError> {
    let rows = backend_rows(maps)?;
    if format == OutputFormat::Json {
        return Ok(json(&rows)?);
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
) -> Result<String, InspectError> {
    let rows = flow_rows(maps, now_ns)?;
    if format == OutputFormat::Json {
        return Ok(json(&rows)?);
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

pub fn stats(maps: &impl LbStats, format: OutputFormat) -> Result<String, InspectError> {
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
        return Ok(json(&obj)?);
    }
    let mut t = Table::new(&[("STAT", false), ("VALUE", true)]);
    for (n, v) in named {
        t.row(vec![n.to_string(), v.to_string()]);
    }
    Ok(t.render())
}

#[cfg(test)]
mod tests {
    use svc_lb_common::{
        BE_STATE_TERMINATING, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_CLOSING, CT_F_SNAT, CtEntry,
        CtKeyV4, IPPROTO_TCP, IPPROTO_UDP, STAT_CT_NEW, STAT_DNAT, STAT_PACKETS, ip_to_net,
        port_to_net,
    };

    use super::*;
    use crate::inspect::fixtures::fake;

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
