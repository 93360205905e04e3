//! `svc_lb::maps::BpfLbMaps` and `svc_lb::dataplane::capacity` against real kernel maps: the embedded
//! object's maps are created and pinned in a bpffs directory of the test's own (see
//! [`svc_lb_tests::prog::PinDir`]), then driven through the agent's API.
//!
//! These were unit tests of the `svc-lb` crate; they need root and bpffs, so they live with the
//! privileged tests and `cargo test -p svc-lb` passes without either. Needs root; fails, never
//! skips.

use std::{fs, net::Ipv4Addr, path::Path};

use aya::{
    EbpfLoader,
    maps::{HashMap, Map, MapData, PerCpuArray, PerCpuValues},
};
use svc_lb::{
    dataplane::capacity::MapCapacity,
    maps::{BpfLbMaps, FakeLbMaps, LbMaps, LbStats, MapsError, Op, Purge},
    model::LbAlgorithm,
    model::{
        BackendAddr, DesiredState, Frontend, FrontendKey, FrontendKind, Proto, ServicePortRef,
    },
    reconcile::{Limits, Reconciler},
};
use svc_lb_common::{
    BACKENDS_MAP, BE_STATS_MAP, CT_MAP, Counter, CtEntry, CtKeyV4, MAX_BACKENDS, STAT_COUNT,
    STATS_MAP, ServiceKeyV4,
};
use svc_lb_tests::prog::{PinDir, load_object, open_map};

/// A pin directory with every map of the embedded object created and pinned in it (the loader
/// is dropped; the pins keep the maps).
fn pinned_maps(kind: &str) -> PinDir {
    let dir = PinDir::new(kind);
    drop(load_object(&dir.0));
    dir
}

fn desired(backends: &[[u8; 4]]) -> DesiredState {
    let f = Frontend {
        key: FrontendKey {
            ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            proto: Proto::Tcp,
            internal: false,
        },
        kind: FrontendKind::ClusterIp,
        service: ServicePortRef {
            namespace: "default".into(),
            name: "frontend-svc".into(),
            port: "http".into(),
        },
        backends: backends
            .iter()
            .map(|ip| BackendAddr {
                ip: (*ip).into(),
                port: 5000,
            })
            .collect(),
        policy: Default::default(),
    };
    DesiredState {
        frontends: [(f.key, f)].into_iter().collect(),
    }
}

fn nr_cpus() -> usize {
    aya::util::nr_cpus().expect("possible CPUs")
}

/// The pinned per-CPU array `name` of `dir`, typed.
fn per_cpu<V: aya::Pod>(dir: &Path, name: &str) -> PerCpuArray<MapData, V> {
    PerCpuArray::try_from(Map::from_map_data(open_map(dir, name)).unwrap()).unwrap()
}

#[test]
fn reconcile_dump_and_reopen_against_kernel_maps() {
    let pins = pinned_maps("maps-roundtrip");
    let mut maps = BpfLbMaps::open(&pins.0).unwrap();
    let want = desired(&[[10, 244, 1, 2], [10, 244, 2, 2], [10, 244, 3, 2]]);
    let outcome = Reconciler::new(Limits::default())
        .full(&mut maps, &want)
        .unwrap();
    assert_eq!((outcome.frontends, outcome.backends), (1, 3));
    // The kernel holds what the in-memory maps hold after the same reconcile.
    let mut fake = FakeLbMaps::default();
    Reconciler::new(Limits::default())
        .full(&mut fake, &want)
        .unwrap();
    assert_eq!(maps.dump().unwrap(), fake.state);

    // A second process (restarted agent, `svc-lb debug`) sees the same state and has nothing to
    // do.
    drop(maps);
    let mut maps = BpfLbMaps::open(&pins.0).unwrap();
    assert_eq!(maps.dump().unwrap(), fake.state);
    let mut restarted = Reconciler::new(Limits::default());
    assert_eq!(restarted.full(&mut maps, &want).unwrap().ops, 0);

    // Scale down: the kernel agrees with the plan.
    let fewer = desired(&[[10, 244, 1, 2]]);
    restarted.full(&mut maps, &fewer).unwrap();
    assert_eq!(maps.dump().unwrap().backends.len(), 1);
    assert_eq!(restarted.full(&mut maps, &fewer).unwrap().ops, 0);
}

#[test]
fn deleting_missing_keys_succeeds_and_other_errors_do_not() {
    let pins = pinned_maps("maps-enoent");
    let mut maps = BpfLbMaps::open(&pins.0).unwrap();
    for op in [
        Op::DeleteService(ServiceKeyV4::default()),
        Op::DeleteBackend(12345),
        Op::DeleteRevNat(4321),
        Op::DeleteName(4321),
    ] {
        maps.apply(&op)
            .unwrap_or_else(|e| panic!("{op:?}: {}", svc_lb::error::chain(&e)));
    }
    // Out of range for the per-CPU array: a real error, reported with the map's name.
    let err = maps.apply(&Op::ZeroBackendStats(MAX_BACKENDS)).unwrap_err();
    assert!(
        matches!(
            err,
            MapsError::Map {
                map: BE_STATS_MAP,
                op: "zero",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn counters_are_summed_over_cpus_and_zeroed() {
    let pins = pinned_maps("maps-stats");
    let mut maps = BpfLbMaps::open(&pins.0).unwrap();
    let cpus = nr_cpus();
    // Play the datapath: every CPU counted 2 packets / 100 bytes for backend 7.
    let mut be: PerCpuArray<MapData, Counter> = per_cpu(&pins.0, BE_STATS_MAP);
    let per_cpu_counter = Counter {
        packets: 2,
        bytes: 100,
    };
    be.set(
        7,
        PerCpuValues::try_from(vec![per_cpu_counter; cpus]).unwrap(),
        0,
    )
    .unwrap();
    let mut g: PerCpuArray<MapData, u64> = per_cpu(&pins.0, STATS_MAP);
    g.set(1, PerCpuValues::try_from(vec![5u64; cpus]).unwrap(), 0)
        .unwrap();

    assert_eq!(
        maps.backend_counter(7).unwrap(),
        Counter {
            packets: 2 * cpus as u64,
            bytes: 100 * cpus as u64
        }
    );
    let global = maps.global_counters().unwrap();
    assert_eq!(global.len(), STAT_COUNT as usize);
    assert_eq!(global[1], 5 * cpus as u64);

    maps.apply(&Op::ZeroBackendStats(7)).unwrap();
    assert_eq!(maps.backend_counter(7).unwrap(), Counter::default());
    assert_eq!(maps.svc_counter(3).unwrap(), Counter::default());
    assert!(maps.conntrack().unwrap().is_empty());
}

#[test]
fn purge_removes_only_flows_of_the_given_backends() {
    let pins = pinned_maps("maps-purge");
    let mut maps = BpfLbMaps::open(&pins.0).unwrap();
    let mut ct: HashMap<MapData, CtKeyV4, CtEntry> =
        HashMap::try_from(Map::from_map_data(open_map(&pins.0, CT_MAP)).unwrap()).unwrap();
    for (sport, backend_id, rev_nat_id) in [
        (1u16, 4u32, 1u32),
        (2, 5, 1),
        (3, 4, 2),
        (4, 6, 2),
        (5, 5, 3),
    ] {
        let k = CtKeyV4 {
            sport,
            ..Default::default()
        };
        let e = CtEntry {
            backend_id,
            rev_nat_id,
            ..Default::default()
        };
        ct.insert(k, e, 0).unwrap();
    }
    maps.apply(&Op::PurgeFlows(Box::new(Purge {
        backend_ids: vec![4, 6],
        rev_nat_ids: vec![3],
        ..Purge::default()
    })))
    .unwrap();
    let left: Vec<_> = maps
        .conntrack()
        .unwrap()
        .iter()
        .map(|(_, e)| (e.backend_id, e.rev_nat_id))
        .collect();
    assert_eq!(left, [(5, 1)]);
}

#[test]
fn partial_pins_name_the_missing_map() {
    let pins = pinned_maps("maps-partial");
    fs::remove_file(pins.0.join(CT_MAP)).unwrap();
    let err = BpfLbMaps::open(&pins.0).unwrap_err();
    assert!(
        matches!(&err, MapsError::PinMissing { path } if path.ends_with(CT_MAP)),
        "{err:?}"
    );
}

/// Creates (or adopts) the object's maps in `dir` with `capacity` applied to the loader.
fn load_with(dir: &Path, capacity: &MapCapacity) {
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(dir);
    capacity.apply(&mut loader);
    loader
        .load(svc_lb::dataplane::ebpf_object())
        .expect("load the embedded eBPF object's maps");
}

#[test]
fn maps_get_the_requested_sizes_and_adopted_pins_keep_theirs() {
    let dir = PinDir::new("capacity");
    let small = MapCapacity {
        max_services: 1_024,
        max_backends: 4_096,
        max_conntrack: 8_192,
    };
    assert!(small.warn_adopted(&dir.0).is_empty(), "nothing pinned yet");
    load_with(&dir.0, &small);
    assert_eq!(MapCapacity::from_pins(&dir.0).unwrap(), small);
    // The reconcile limits follow the pinned sizes and keep the other settings.
    let base = Limits {
        default_algorithm: LbAlgorithm::Maglev,
        ..Limits::default()
    };
    assert_eq!(
        base.pinned(&dir.0),
        Limits {
            max_revnat: 1_024,
            max_backends: 4_096,
            max_service_entries: 1_024 + 4_096,
            ..base
        }
    );
    // Without pins the limits stay as they were (writes beyond the real sizes fail on the map).
    assert_eq!(base.pinned(&dir.0.join("missing")), base);

    // A second load asking for more adopts the pins: their sizes stay and are reported.
    let bigger = MapCapacity {
        max_backends: 8_192,
        ..small
    };
    let differ = bigger.warn_adopted(&dir.0);
    assert!(differ.contains(&(BACKENDS_MAP, 4_096, 8_192)), "{differ:?}");
    assert!(differ.contains(&(BE_STATS_MAP, 4_096, 8_192)), "{differ:?}");
    assert!(!differ.iter().any(|d| d.0 == CT_MAP), "{differ:?}");
    load_with(&dir.0, &bigger);
    assert_eq!(MapCapacity::from_pins(&dir.0).unwrap(), small);
}
