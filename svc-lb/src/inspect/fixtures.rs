//! Test fixtures of the views (here and in `crate::serve`): frontends written the way the
//! translator makes them, programmed through the real reconciler into the fake maps.

use svc_lb_common::Counter;

use crate::{
    maps::FakeLbMaps,
    model::{
        BackendAddr, DesiredState, Frontend, FrontendKey, FrontendKind, Proto, ServicePortRef,
    },
    reconcile::{Limits, Reconciler},
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
pub(crate) fn fake() -> FakeLbMaps {
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
    Reconciler::new(Limits::default())
        .full(&mut maps, &desired)
        .unwrap();
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
