//! Synthetic Services: `n` ClusterIP Services (TCP port 80 → 8080) with `eps` endpoints each,
//! drawn from a pool of pod addresses. The same data feeds svc-lb (a `DesiredState`) and the
//! kube-proxy rule generators, so both sides program exactly the same Services.

use std::net::{Ipv4Addr, SocketAddrV4};

use svc_lb::model::{
    BackendAddr, DesiredState, Frontend, FrontendKey, FrontendKind, LbPolicy, Proto, ServicePortRef,
};

pub const NAMESPACE: &str = "bench";
pub const PORT_NAME: &str = "http";
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// kube-proxy's `--cluster-cidr` in the baselines (pod traffic is not masqueraded).
pub const CLUSTER_CIDR: &str = "10.244.0.0/14";
/// The Service CIDR (nftables mode drops traffic to unallocated ClusterIPs in it).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
const SERVICE_BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);
const POD_BASE: u32 = u32::from_be_bytes([10, 244, 0, 0]);
/// Addresses handed out by [`Scenario::change_one`], outside the pod pool.
const CHURN_BASE: u32 = u32::from_be_bytes([10, 250, 0, 0]);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub endpoints: Vec<SocketAddrV4>,
}

impl Service {
    /// `namespace/name:port`, kube-proxy's ServicePortName string.
    pub fn port_name(&self) -> String {
        format!("{NAMESPACE}/{}:{PORT_NAME}", self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    pub services: Vec<Service>,
    churn: u32,
}

impl Scenario {
    /// `n` Services with `eps` endpoints each from a pool of `pods` pod addresses: endpoint `j`
    /// of Service `i` is pod `(i * eps + j) % pods` (so with fewer pods than endpoints, each pod
    /// backs several Services, as pods behind several Services do).
    pub fn synthetic(n: usize, eps: usize, pods: usize) -> Scenario {
        assert!(pods > 0 && n < (1 << 20) - 2, "scenario out of range");
        let services = (0..n)
            .map(|i| Service {
                name: format!("svc-{i}"),
                cluster_ip: Ipv4Addr::from(SERVICE_BASE + 1 + i as u32),
                endpoints: (0..eps)
                    .map(|j| {
                        let pod = ((i * eps + j) % pods) as u32;
                        SocketAddrV4::new(Ipv4Addr::from(POD_BASE + 2 + pod), TARGET_PORT)
                    })
                    .collect(),
            })
            .collect();
        Scenario { services, churn: 0 }
    }

    /// `n` Services whose one endpoint is the same real backend (B2/B3: traffic must reach it).
    pub fn single_backend(n: usize, backend: SocketAddrV4) -> Scenario {
        let mut sc = Scenario::synthetic(n, 1, 1);
        for s in &mut sc.services {
            s.endpoints = vec![backend];
        }
        sc
    }

    pub fn endpoint_count(&self) -> usize {
        self.services.iter().map(|s| s.endpoints.len()).sum()
    }

    /// Distinct pod addresses (svc-lb backend ids).
    pub fn distinct_backends(&self) -> usize {
        let mut all: Vec<_> = self
            .services
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .collect();
        all.sort();
        all.dedup();
        all.len()
    }

    /// One endpoint change, as a rolling update makes it: Service `i`'s first endpoint is
    /// replaced by a new pod address. Returns the index of the changed Service.
    pub fn change_one(&mut self, i: usize) -> usize {
        self.churn += 1;
        let ip = Ipv4Addr::from(CHURN_BASE + self.churn);
        let svc = &mut self.services[i];
        svc.endpoints[0] = SocketAddrV4::new(ip, TARGET_PORT);
        svc.endpoints.sort();
        i
    }

    pub fn desired(&self) -> DesiredState {
        let mut st = DesiredState::default();
        for s in &self.services {
            let key = FrontendKey {
                ip: s.cluster_ip,
                port: SERVICE_PORT,
                proto: Proto::Tcp,
                internal: false,
            };
            let mut backends: Vec<BackendAddr> = s
                .endpoints
                .iter()
                .map(|e| BackendAddr {
                    ip: *e.ip(),
                    port: e.port(),
                })
                .collect();
            backends.sort();
            backends.dedup();
            st.frontends.insert(
                key,
                Frontend {
                    key,
                    kind: FrontendKind::ClusterIp,
                    service: ServicePortRef {
                        namespace: NAMESPACE.into(),
                        name: s.name.clone(),
                        port: PORT_NAME.into(),
                    },
                    backends,
                    policy: LbPolicy::default(),
                },
            );
        }
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_addresses_and_sharing() {
        let s = Scenario::synthetic(3, 2, 4);
        assert_eq!(s.services[0].cluster_ip, Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(s.services[2].cluster_ip, Ipv4Addr::new(10, 96, 0, 3));
        assert_eq!(
            s.services[0].endpoints,
            vec![
                "10.244.0.2:8080".parse().unwrap(),
                "10.244.0.3:8080".parse().unwrap()
            ]
        );
        // Endpoints 4 and 5 wrap around the pool of 4 pods.
        assert_eq!(s.services[2].endpoints, s.services[0].endpoints);
        assert_eq!(s.endpoint_count(), 6);
        assert_eq!(s.distinct_backends(), 4);
        assert_eq!(s.desired().frontends.len(), 3);
    }

    #[test]
    fn change_one_replaces_an_endpoint() {
        let mut s = Scenario::synthetic(2, 3, 100);
        let before = s.clone();
        s.change_one(1);
        assert_eq!(s.services[0], before.services[0]);
        assert_ne!(s.services[1].endpoints, before.services[1].endpoints);
        assert_eq!(s.services[1].endpoints.len(), 3);
        assert!(
            s.services[1]
                .endpoints
                .contains(&"10.250.0.1:8080".parse().unwrap())
        );
    }
}
