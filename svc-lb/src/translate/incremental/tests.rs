//! Incremental == from scratch: random sequences of Service, EndpointSlice, Pod and Node
//! changes; after each, the incremental state, rejections and changed keys must match a fresh
//! [`translate`] of the same objects.

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path, sync::Arc};

use super::*;
use crate::{
    cli::PortRange,
    k8s::manifest::Loader,
    translate::{Translation, translate},
};

struct XorShift(u64);
impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn parse(yaml: &str) -> Objects {
    let mut loader = Loader::default();
    loader.load_text(Path::new("inline.yaml"), yaml);
    assert!(loader.errors.is_empty(), "{:?}\n{yaml}", loader.errors);
    loader.objects
}

/// Service `s{i}` in namespace `ns{i % 2}`: sometimes NodePort, sometimes sharing an external
/// IP with others (contested), sometimes invalid, sometimes Local, with or without a selector.
fn service(rng: &mut XorShift, i: u64) -> String {
    let ns = i % 2;
    let ty = if rng.below(3) == 0 {
        "NodePort"
    } else {
        "ClusterIP"
    };
    let external = if rng.below(3) == 0 {
        format!(", externalIPs: [10.0.0.{}]", rng.below(2) + 1)
    } else {
        String::new()
    };
    let cluster_ip = if rng.below(12) == 0 {
        "10.96.999.1".to_string() // rejected
    } else {
        // Sometimes the same ClusterIP as another Service: contested too.
        format!("10.96.0.{}", 10 + (i + rng.below(2) * 3) % 8)
    };
    let policy = if rng.below(5) == 0 {
        ", externalTrafficPolicy: Local"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns{ns}}}\n\
         spec: {{type: {ty}, clusterIP: {cluster_ip}{external}{policy}, selector: {{app: a{i}}},\n\
         ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {np}}}]}}\n",
        np = 30000 + i
    )
}

fn slice(rng: &mut XorShift, i: u64, n: u64) -> String {
    let mut eps = String::new();
    for _ in 0..rng.below(4) {
        let ready = rng.below(4) != 0;
        let node = if rng.below(2) == 0 {
            "node-a"
        } else {
            "node-b"
        };
        let addr = if rng.below(15) == 0 {
            "10.0.0.300".to_string() // rejected
        } else {
            format!("10.244.{}.{}", i, 2 + rng.below(4))
        };
        eps += &format!(
            "- addresses: [{addr}]\n  nodeName: {node}\n  conditions: {{ready: {ready}, serving: true, terminating: {}}}\n",
            !ready
        );
    }
    let eps = if eps.is_empty() {
        "[]\n".into()
    } else {
        format!("\n{eps}")
    };
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: s{i}-{n}, namespace: ns{ns}, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: {eps}",
        ns = i % 2
    )
}

fn pod(rng: &mut XorShift, i: u64, n: u64) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}-{n}, namespace: ns{ns}, labels: {{app: a{i}}}}}\n\
         spec: {{nodeName: node-a, containers: [{{name: c, image: x}}]}}\n\
         status: {{podIP: 10.244.{i}.{ip}}}\n",
        ns = i % 2,
        ip = 10 + rng.below(3)
    )
}

fn node(rng: &mut XorShift) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: node-a}}\n\
         status: {{addresses: [{{type: InternalIP, address: 172.31.0.{}}}]}}\n",
        1 + rng.below(2)
    )
}

/// The objects as separately owned pieces, so a step can replace one of them.
#[derive(Default)]
struct World {
    services: BTreeMap<u64, Arc<Service>>,
    slices: BTreeMap<(u64, u64), Arc<EndpointSlice>>,
    pods: BTreeMap<(u64, u64), Arc<Pod>>,
    node: Option<Arc<Node>>,
}

impl World {
    fn shared(&self) -> SharedObjects {
        SharedObjects {
            services: self.services.values().cloned().collect(),
            endpoint_slices: self.slices.values().cloned().collect(),
            pods: self.pods.values().cloned().collect(),
            nodes: self.node.iter().cloned().collect(),
        }
    }

    fn step(&mut self, rng: &mut XorShift) {
        let i = rng.below(8);
        match rng.below(9) {
            0 | 1 => {
                let o = parse(&service(rng, i)).services.remove(0);
                self.services.insert(i, Arc::new(o));
            }
            2 => {
                self.services.remove(&i);
            }
            3 | 4 => {
                let n = rng.below(2);
                let o = parse(&slice(rng, i, n)).endpoint_slices.remove(0);
                self.slices.insert((i, n), Arc::new(o));
            }
            5 => {
                let n = rng.below(2);
                self.slices.remove(&(i, n));
            }
            6 => {
                let n = rng.below(2);
                let o = parse(&pod(rng, i, n)).pods.remove(0);
                self.pods.insert((i, n), Arc::new(o));
            }
            7 => {
                let n = rng.below(2);
                self.pods.remove(&(i, n));
            }
            _ => {
                self.node =
                    (rng.below(4) != 0).then(|| Arc::new(parse(&node(rng)).nodes.remove(0)));
            }
        }
    }
}

fn cfg() -> TranslateConfig {
    TranslateConfig {
        node_ips: vec![Ipv4Addr::new(172, 31, 0, 9)],
        node_name: Some("node-a".into()),
        nodeport_range: PortRange::default(),
    }
}

#[test]
fn incremental_translation_equals_translating_from_scratch() {
    for seed in [0x9e37_79b9_7f4a_7c15u64, 0x2545_f491_4f6c_dd1d, 7] {
        let mut rng = XorShift(seed);
        let mut world = World::default();
        let mut inc = IncrementalTranslator::new(cfg());
        let mut before = DesiredState::default();
        // The walk must reach the interesting cases, or the test proves little.
        let (mut conflicts, mut changes, mut backends) = (0, 0, 0);
        for step in 0..300 {
            world.step(&mut rng);
            let shared = world.shared();
            let changed = inc.update(&shared);
            let full: Translation = translate(&shared.to_objects(), &cfg());
            assert_eq!(inc.state(), &full.state, "seed {seed} step {step}");
            assert_eq!(
                inc.rejected(),
                &full.rejected[..],
                "seed {seed} step {step}"
            );
            let expected: BTreeSet<FrontendKey> = before
                .frontends
                .keys()
                .chain(full.state.frontends.keys())
                .filter(|k| before.frontends.get(k) != full.state.frontends.get(k))
                .copied()
                .collect();
            assert_eq!(changed, expected, "seed {seed} step {step}");
            conflicts += full
                .rejected
                .iter()
                .filter(|r| r.reason.contains("already used by"))
                .count();
            changes += changed.len();
            backends += full
                .state
                .frontends
                .values()
                .filter(|f| !f.backends.is_empty())
                .count();
            before = full.state;
        }
        assert!(
            conflicts > 50 && changes > 100 && backends > 100,
            "{conflicts} {changes} {backends}"
        );
    }
}

#[test]
fn an_unchanged_update_translates_nothing_and_one_slice_only_its_service() {
    let mut rng = XorShift(42);
    let mut world = World::default();
    for i in 0..8 {
        let o = parse(&service(&mut rng, i)).services.remove(0);
        world.services.insert(i, Arc::new(o));
    }
    let mut inc = IncrementalTranslator::new(cfg());
    inc.update(&world.shared());
    // Equal content in new allocations (a re-read file): nothing changes.
    let copies = SharedObjects::from(world.shared().to_objects());
    assert!(inc.update(&copies).is_empty());
    let slice = parse(&slice(&mut XorShift(5), 3, 0))
        .endpoint_slices
        .remove(0);
    let has_backends = slice.endpoints.iter().any(|e| {
        e.addresses
            .first()
            .is_some_and(|a| a.parse::<Ipv4Addr>().is_ok())
    });
    world.slices.insert((3, 0), Arc::new(slice));
    let changed = inc.update(&world.shared());
    assert!(
        changed.iter().all(|k| inc
            .state()
            .frontends
            .get(k)
            .is_none_or(|f| f.service.name == "s3")),
        "{changed:?}"
    );
    assert_eq!(!changed.is_empty(), has_backends);
}
