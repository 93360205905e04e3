//! Prometheus text exposition (format 0.0.4) of the datapath counters, map occupancy and the
//! agent's own telemetry. Hand-written: a dozen families do not need a metrics crate, and the
//! values are read from the maps at scrape time rather than mirrored into a registry.

use std::fmt::Write as _;

use svc_lb_common::{BACKENDS_MAP, CT_MAP, REVNAT_MAP, SERVICES_MAP, STAT_NAMES, SVC_NAMES_MAP};

use super::telemetry::{SYNC_BUCKETS, State};
use crate::{
    inspect::{
        list::split_name,
        rows::{backend_rows, service_reports},
    },
    maps::{LbMaps, LbStats, MapsError},
};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Escapes a label value (backslash, double quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.0, "{name}{labels} {value}");
    }
}

/// The whole exposition for one scrape.
pub fn render(maps: &(impl LbMaps + LbStats), t: &State) -> Result<String, MapsError> {
    let mut o = Out(String::new());
    let services = service_reports(maps)?;
    let backends = backend_rows(maps)?;
    let state = maps.dump()?;
    let ct = maps.conntrack()?.len();

    o.family(
        "svc_lb_service_packets_total",
        "counter",
        "Packets the datapath sent to a Service frontend (summed over CPUs).",
    );
    let service_labels: Vec<String> = services
        .iter()
        .map(|r| {
            let (ns, name, port) = split_name(&r.service).unwrap_or(("", &r.service, ""));
            labels(&[
                ("namespace", ns),
                ("service", name),
                ("port", port),
                ("frontend", &r.frontend),
                ("protocol", &r.protocol),
                ("type", &r.kind),
            ])
        })
        .collect();
    for (r, l) in services.iter().zip(&service_labels) {
        o.sample("svc_lb_service_packets_total", l, r.packets);
    }
    o.family(
        "svc_lb_service_bytes_total",
        "counter",
        "Bytes the datapath sent to a Service frontend (summed over CPUs).",
    );
    for (r, l) in services.iter().zip(&service_labels) {
        o.sample("svc_lb_service_bytes_total", l, r.bytes);
    }

    let backend_labels: Vec<String> = backends
        .iter()
        .map(|b| {
            labels(&[
                ("backend", &format!("{}:{}", b.address, b.port)),
                ("protocol", &b.protocol),
                ("state", &b.state),
            ])
        })
        .collect();
    o.family(
        "svc_lb_backend_packets_total",
        "counter",
        "Packets the datapath sent to a backend (pod address:port), all Services together.",
    );
    for (b, l) in backends.iter().zip(&backend_labels) {
        o.sample("svc_lb_backend_packets_total", l, b.packets);
    }
    o.family(
        "svc_lb_backend_bytes_total",
        "counter",
        "Bytes the datapath sent to a backend (pod address:port), all Services together.",
    );
    for (b, l) in backends.iter().zip(&backend_labels) {
        o.sample("svc_lb_backend_bytes_total", l, b.bytes);
    }

    o.family(
        "svc_lb_conntrack_entries",
        "gauge",
        "Conntrack entries (one per flow direction) in LB4_CT.",
    );
    o.sample("svc_lb_conntrack_entries", "", ct);
    o.family(
        "svc_lb_map_entries",
        "gauge",
        "Entries in each LB map (read at scrape time).",
    );
    let cap = maps.capacity();
    let maps_used = [
        (SERVICES_MAP, state.services.len(), cap.service_entries()),
        (BACKENDS_MAP, state.backends.len(), cap.max_backends),
        (REVNAT_MAP, state.revnat.len(), cap.max_services),
        (SVC_NAMES_MAP, state.names.len(), cap.max_services),
        (CT_MAP, ct, cap.max_conntrack),
    ];
    for (m, n, _) in maps_used {
        o.sample("svc_lb_map_entries", &labels(&[("map", m)]), n);
    }
    o.family(
        "svc_lb_map_capacity",
        "gauge",
        "Maximum entries of each LB map.",
    );
    for (m, _, cap) in maps_used {
        o.sample("svc_lb_map_capacity", &labels(&[("map", m)]), cap);
    }

    o.family(
        "svc_lb_datapath_events_total",
        "counter",
        "Datapath events by kind (LB_STATS, summed over CPUs).",
    );
    let global = maps.global_counters()?;
    for (i, name) in STAT_NAMES.iter().enumerate() {
        let v = global.get(i).copied().unwrap_or(0);
        o.sample(
            "svc_lb_datapath_events_total",
            &labels(&[("event", name)]),
            v,
        );
    }

    o.family(
        "svc_lb_sync_duration_seconds",
        "histogram",
        "Time to reconcile the maps with the objects (one observation per sync).",
    );
    let h = &t.sync_latency;
    let mut cumulative = 0;
    for (le, n) in SYNC_BUCKETS.iter().zip(h.buckets) {
        cumulative += n;
        o.sample(
            "svc_lb_sync_duration_seconds_bucket",
            &labels(&[("le", &le.to_string())]),
            cumulative,
        );
    }
    o.sample(
        "svc_lb_sync_duration_seconds_bucket",
        &labels(&[("le", "+Inf")]),
        h.count,
    );
    o.sample("svc_lb_sync_duration_seconds_sum", "", h.sum_seconds);
    o.sample("svc_lb_sync_duration_seconds_count", "", h.count);
    o.family(
        "svc_lb_syncs_total",
        "counter",
        "Reconciles by result (failed ones are retried).",
    );
    o.sample(
        "svc_lb_syncs_total",
        &labels(&[("result", "ok")]),
        t.syncs_ok,
    );
    o.sample(
        "svc_lb_syncs_total",
        &labels(&[("result", "error")]),
        t.syncs_failed,
    );
    o.family(
        "svc_lb_last_sync_timestamp_seconds",
        "gauge",
        "Unix time of the last successful reconcile (0 = none yet).",
    );
    o.sample("svc_lb_last_sync_timestamp_seconds", "", t.last_sync_unix);

    o.family(
        "svc_lb_rejected_objects",
        "gauge",
        "Objects (or parts of them) the last translation skipped, with the reason (1 each).",
    );
    for r in &t.rejected {
        o.sample(
            "svc_lb_rejected_objects",
            &labels(&[("object", &r.object), ("reason", &r.reason)]),
            1,
        );
    }
    Ok(o.0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use svc_lb_common::{Counter, CtEntry, CtKeyV4, STAT_DNAT};

    use super::*;
    use crate::{
        inspect::fixtures::frontend,
        maps::FakeLbMaps,
        model::{DesiredState, FrontendKind, Proto},
        reconcile::{Limits, Reconciler},
        translate::Rejected,
    };

    fn maps() -> FakeLbMaps {
        let fe = |ip: [u8; 4], port, kind, svc: (&str, &str, &str), be: &[[u8; 4]]| {
            let be: Vec<_> = be.iter().map(|ip| (*ip, 80)).collect();
            let svc = format!("{}/{}:{}", svc.0, svc.1, svc.2);
            frontend(ip, port, Proto::Tcp, kind, &svc, &be)
        };
        let desired = DesiredState {
            frontends: [
                fe(
                    [10, 96, 0, 20],
                    8080,
                    FrontendKind::ClusterIp,
                    ("default", "web", "http"),
                    &[[10, 244, 1, 2], [10, 244, 2, 2]],
                ),
                fe(
                    [172, 31, 0, 1],
                    30080,
                    FrontendKind::NodePort,
                    ("default", "web", "http"),
                    &[[10, 244, 1, 2], [10, 244, 2, 2]],
                ),
            ]
            .into_iter()
            .map(|f| (f.key, f))
            .collect(),
        };
        let mut m = FakeLbMaps::default();
        Reconciler::new(Limits::default())
            .full(&mut m, &desired)
            .unwrap();
        m.svc_stats.insert(
            1,
            Counter {
                packets: 10,
                bytes: 1000,
            },
        );
        m.be_stats.insert(
            2,
            Counter {
                packets: 4,
                bytes: 400,
            },
        );
        m.global = vec![0; STAT_NAMES.len()];
        m.global[STAT_DNAT as usize] = 14;
        m.ct = vec![(CtKeyV4::default(), CtEntry::default()); 3];
        m
    }

    /// Maps created with `--max-*` flags report their real sizes, not the defaults.
    #[test]
    fn capacity_follows_the_maps_in_use() {
        let mut m = maps();
        m.capacity = crate::dataplane::capacity::MapCapacity {
            max_services: 131_072,
            max_backends: 1_048_576,
            max_conntrack: 1_000,
        };
        let out = render(&m, &State::default()).unwrap();
        for line in [
            r#"svc_lb_map_capacity{map="LB4_CT"} 1000"#,
            r#"svc_lb_map_capacity{map="LB4_BACKENDS"} 1048576"#,
            r#"svc_lb_map_capacity{map="LB4_REVNAT"} 131072"#,
            r#"svc_lb_map_capacity{map="LB4_SERVICES"} 1179648"#,
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
    }

    #[test]
    fn exposition() {
        let m = maps();
        let mut t = State::default();
        t.sync_latency.observe(Duration::from_micros(800));
        t.sync_latency.observe(Duration::from_millis(20));
        t.syncs_ok = 2;
        t.rejected = vec![Rejected {
            object: "Service default/bad".into(),
            reason: "spec.clusterIPs: invalid IP address \"x\"; Service skipped".into(),
        }];
        let out = render(&m, &t).unwrap();
        let has =
            |line: &str| assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        has("# TYPE svc_lb_service_packets_total counter");
        has(
            r#"svc_lb_service_packets_total{namespace="default",service="web",port="http",frontend="10.96.0.20:8080",protocol="TCP",type="ClusterIP"} 10"#,
        );
        has(
            r#"svc_lb_service_bytes_total{namespace="default",service="web",port="http",frontend="172.31.0.1:30080",protocol="TCP",type="NodePort"} 0"#,
        );
        has(
            r#"svc_lb_backend_packets_total{backend="10.244.2.2:80",protocol="TCP",state="active"} 4"#,
        );
        has(
            r#"svc_lb_backend_bytes_total{backend="10.244.1.2:80",protocol="TCP",state="active"} 0"#,
        );
        has("svc_lb_conntrack_entries 3");
        has(r#"svc_lb_map_entries{map="LB4_CT"} 3"#);
        has(r#"svc_lb_map_capacity{map="LB4_CT"} 262144"#);
        // 2 frontends + 2 slots each.
        has(r#"svc_lb_map_entries{map="LB4_SERVICES"} 6"#);
        has(r#"svc_lb_map_entries{map="LB4_BACKENDS"} 2"#);
        has(r#"svc_lb_datapath_events_total{event="dnat"} 14"#);
        has("# TYPE svc_lb_sync_duration_seconds histogram");
        has(r#"svc_lb_sync_duration_seconds_bucket{le="0.001"} 1"#);
        has(r#"svc_lb_sync_duration_seconds_bucket{le="0.01"} 1"#);
        has(r#"svc_lb_sync_duration_seconds_bucket{le="0.025"} 2"#);
        has(r#"svc_lb_sync_duration_seconds_bucket{le="+Inf"} 2"#);
        has("svc_lb_sync_duration_seconds_count 2");
        has(r#"svc_lb_syncs_total{result="ok"} 2"#);
        has(
            r#"svc_lb_rejected_objects{object="Service default/bad",reason="spec.clusterIPs: invalid IP address \"x\"; Service skipped"} 1"#,
        );
        // Every sample line belongs to a family announced before it.
        let mut declared = Vec::new();
        for l in out.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap().to_string());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(
                    declared.iter().any(|d| name == d
                        || name
                            .strip_prefix(d.as_str())
                            .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))),
                    "undeclared sample {l}"
                );
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(labels(&[("a", "x\"y\\z\nw")]), r#"{a="x\"y\\z\nw"}"#);
    }
}
