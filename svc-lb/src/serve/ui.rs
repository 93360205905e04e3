//! The web dashboard (`svc-lb run --ui [ADDR]`): one self-contained page (HTML, CSS and JS
//! embedded in the binary, no external requests) that polls `/api/state` every second and
//! shows Services grouped by namespace, their frontends, their backends with the live share of
//! traffic each gets, conntrack and map occupancy, and what was skipped.
//!
//! The JSON is built from the maps at request time (like `svc-lb debug`) plus the agent's
//! telemetry; the page computes live rates from the difference between two polls.

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use svc_lb_common::{BACKENDS_MAP, CT_MAP, REVNAT_MAP, SERVICES_MAP};

use super::telemetry::State;
use crate::{
    inspect::{
        list::{self, split_name},
        rows::{backend_rows, service_reports},
    },
    maps::{LbMaps, LbStats, MapsError},
};

/// The page itself.
pub const INDEX_HTML: &str = include_str!("ui/index.html");

#[derive(Debug, Serialize, PartialEq)]
pub struct UiState {
    pub generated_unix_ms: u64,
    pub namespaces: Vec<UiNamespace>,
    pub conntrack: Occupancy,
    pub maps: Vec<MapUse>,
    pub syncs: Syncs,
    pub rejected: Vec<UiRejected>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct UiNamespace {
    pub name: String,
    pub services: Vec<UiService>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct UiService {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Node-port URLs (as in `svc-lb service list`).
    pub urls: Vec<String>,
    pub frontends: Vec<UiFrontend>,
    /// Every backend of any of its frontends, once.
    pub backends: Vec<UiBackend>,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct UiFrontend {
    /// The Service port's name (or number).
    pub port: String,
    pub address: String,
    pub protocol: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub backends: usize,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct UiBackend {
    pub address: String,
    pub protocol: String,
    pub state: String,
    /// Counters of the backend (all Services that use it together).
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Occupancy {
    pub entries: usize,
    pub capacity: u32,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct MapUse {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Syncs {
    pub ok: u64,
    pub failed: u64,
    pub last_unix: u64,
    /// Mean sync duration in milliseconds (0 before the first).
    pub mean_ms: f64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct UiRejected {
    pub object: String,
    pub reason: String,
}

pub fn state(maps: &(impl LbMaps + LbStats), t: &State) -> Result<UiState, MapsError> {
    let dump = maps.dump()?;
    let rows = list::rows(&dump);
    let reports = service_reports(maps)?;
    let backend_info: BTreeMap<(String, String), (String, u64, u64)> = backend_rows(maps)?
        .into_iter()
        .map(|b| {
            (
                (format!("{}:{}", b.address, b.port), b.protocol),
                (b.state, b.packets, b.bytes),
            )
        })
        .collect();
    let mut services: BTreeMap<(String, String), UiService> = BTreeMap::new();
    for r in &reports {
        let Some((ns, name, port)) = split_name(&r.service) else {
            continue;
        };
        let row = rows.iter().find(|x| x.namespace == ns && x.name == name);
        let svc = services
            .entry((ns.to_owned(), name.to_owned()))
            .or_insert_with(|| UiService {
                name: name.to_owned(),
                kind: row.map_or_else(|| "ClusterIP".into(), |x| x.kind.clone()),
                urls: row
                    .map(|x| x.urls.iter().map(|u| u.url.clone()).collect())
                    .unwrap_or_default(),
                frontends: Vec::new(),
                backends: Vec::new(),
                packets: 0,
                bytes: 0,
            });
        svc.packets += r.packets;
        svc.bytes += r.bytes;
        svc.frontends.push(UiFrontend {
            port: port.to_owned(),
            address: r.frontend.clone(),
            protocol: r.protocol.clone(),
            kind: r.kind.clone(),
            backends: r.backends.len(),
            packets: r.packets,
            bytes: r.bytes,
        });
        for b in &r.backends {
            let address = format!("{}:{}", b.address, b.port);
            if svc
                .backends
                .iter()
                .any(|x| x.address == address && x.protocol == r.protocol)
            {
                continue;
            }
            let (state, packets, bytes) = backend_info
                .get(&(address.clone(), r.protocol.clone()))
                .cloned()
                .unwrap_or_else(|| ("active".into(), b.packets, b.bytes));
            svc.backends.push(UiBackend {
                address,
                protocol: r.protocol.clone(),
                state,
                packets,
                bytes,
            });
        }
    }
    let mut namespaces: Vec<UiNamespace> = Vec::new();
    for ((ns, _), svc) in services {
        match namespaces.last_mut() {
            Some(last) if last.name == ns => last.services.push(svc),
            _ => namespaces.push(UiNamespace {
                name: ns,
                services: vec![svc],
            }),
        }
    }
    let ct = maps.conntrack()?.len();
    let cap = maps.capacity();
    let h = &t.sync_latency;
    Ok(UiState {
        generated_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        namespaces,
        conntrack: Occupancy {
            entries: ct,
            capacity: cap.max_conntrack,
        },
        maps: vec![
            MapUse {
                name: SERVICES_MAP,
                entries: dump.services.len(),
                capacity: cap.service_entries(),
            },
            MapUse {
                name: BACKENDS_MAP,
                entries: dump.backends.len(),
                capacity: cap.max_backends,
            },
            MapUse {
                name: REVNAT_MAP,
                entries: dump.revnat.len(),
                capacity: cap.max_services,
            },
            MapUse {
                name: CT_MAP,
                entries: ct,
                capacity: cap.max_conntrack,
            },
        ],
        syncs: Syncs {
            ok: t.syncs_ok,
            failed: t.syncs_failed,
            last_unix: t.last_sync_unix,
            mean_ms: if h.count == 0 {
                0.0
            } else {
                h.sum_seconds * 1000.0 / h.count as f64
            },
        },
        rejected: t
            .rejected
            .iter()
            .map(|r| UiRejected {
                object: r.object.clone(),
                reason: r.reason.clone(),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use svc_lb_common::Counter;

    use super::*;
    use crate::{
        inspect::fixtures::frontend,
        maps::FakeLbMaps,
        model::{DesiredState, FrontendKind, Proto},
        reconcile::{Limits, Reconciler},
    };

    #[test]
    fn grouped_by_namespace_with_backends_once() {
        let fe = |ip: [u8; 4], port, kind, ns: &str, name: &str, be: &[[u8; 4]]| {
            let be: Vec<_> = be.iter().map(|ip| (*ip, 80)).collect();
            frontend(
                ip,
                port,
                Proto::Tcp,
                kind,
                &format!("{ns}/{name}:http"),
                &be,
            )
        };
        let b = [[10, 244, 1, 2], [10, 244, 2, 2]];
        let desired = DesiredState {
            frontends: [
                fe(
                    [10, 96, 0, 20],
                    8080,
                    FrontendKind::ClusterIp,
                    "default",
                    "web",
                    &b,
                ),
                fe(
                    [172, 31, 0, 1],
                    30080,
                    FrontendKind::NodePort,
                    "default",
                    "web",
                    &b,
                ),
                fe(
                    [10, 96, 0, 30],
                    80,
                    FrontendKind::ClusterIp,
                    "shop",
                    "cart",
                    &[],
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
        m.be_stats.insert(
            1,
            Counter {
                packets: 30,
                bytes: 3000,
            },
        );
        m.svc_stats.insert(
            1,
            Counter {
                packets: 7,
                bytes: 700,
            },
        );
        let t = State {
            syncs_ok: 3,
            ..State::default()
        };
        let s = state(&m, &t).unwrap();
        assert_eq!(
            s.namespaces
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>(),
            ["default", "shop"]
        );
        let web = &s.namespaces[0].services[0];
        assert_eq!(web.name, "web");
        assert_eq!(web.kind, "NodePort");
        assert_eq!(web.urls, ["http://172.31.0.1:30080"]);
        assert_eq!(web.frontends.len(), 2);
        assert_eq!(web.backends.len(), 2, "shared backends listed once");
        assert_eq!(web.backends[0].address, "10.244.1.2:80");
        assert_eq!(web.backends[0].packets, 30);
        assert_eq!(web.packets, 7);
        let cart = &s.namespaces[1].services[0];
        assert!(cart.backends.is_empty());
        assert_eq!(cart.frontends[0].backends, 0);
        assert_eq!(s.syncs.ok, 3);
        assert_eq!(s.maps[0].entries, 3 + 4);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["namespaces"][0]["services"][0]["type"], "NodePort");
        assert_eq!(json["conntrack"]["capacity"], 262144);
    }

    #[test]
    fn page_is_self_contained() {
        // No external scripts, styles or fonts: the dashboard must work on an air-gapped node.
        for needle in ["src=\"http", "href=\"http", "@import", "url(http"] {
            assert!(!INDEX_HTML.contains(needle), "{needle}");
        }
        assert!(INDEX_HTML.contains("/api/state"));
    }
}
