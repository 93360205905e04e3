//! Shared setup of the program tests (`prog_tc`, `prog_xdp`, `prog_veth`): a bpffs pin directory
//! per test, the embedded object loaded with its maps pinned there, and Services seeded into the
//! pinned maps the way the agent writes them.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, TestRun, TestRunOptions, TestRunResult,
    maps::{HashMap, Map, MapData, PerCpuArray},
};
use svc_lb::dataplane::ebpf_object;
use svc_lb_common::RevNatId;
use svc_lb_common::{
    BackendV4, CtKeyV4, RevNatV4, SCOPE_EXTERNAL, ServiceEntry, ServiceKeyV4, ip_to_net, maps,
    port_to_net,
};

/// A bpffs directory unique to one test; removed (with the pins) on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    /// `/sys/fs/bpf/slb<pid>-<n>-<kind>`, the test resource naming `cargo xtask test` reaps
    /// when the owning process is gone; panics unless root (and mounts bpffs if needed).
    pub fn new(kind: &str) -> Self {
        crate::require_root();
        crate::ensure_bpffs();
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/{}-{kind}",
            crate::netns::unique_prefix()
        ));
        std::fs::create_dir_all(&dir).expect("create pin dir");
        PinDir(dir)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Loads the embedded svc-lb object with its maps pinned in (or reused from) `dir`; the
/// programs are left for the caller to load.
pub fn load_object(dir: &Path) -> Ebpf {
    EbpfLoader::new()
        .default_map_pin_directory(dir)
        .load(ebpf_object())
        .expect("load the svc-lb eBPF object")
}

/// One BPF_PROG_TEST_RUN of a loaded skb/XDP program (repeat 1: the kernel does not reset the
/// packet between repeats): its return value and the frame it leaves.
pub fn run_once<P>(prog: &P, frame: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.repeat = 1;
    let res = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

/// The global counter `idx` of the stats map, summed over CPUs.
pub fn stat(ebpf: &Ebpf, idx: u32) -> u64 {
    let a: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map(maps::STATS_MAP).unwrap()).unwrap();
    a.get(&idx, 0).unwrap().iter().sum()
}

/// The conntrack key of `s` → `d` in direction `dir`.
pub fn ct_key(s: SocketAddrV4, d: SocketAddrV4, proto: u8, dir: u8) -> CtKeyV4 {
    CtKeyV4 {
        saddr: ip_to_net(*s.ip()),
        daddr: ip_to_net(*d.ip()),
        sport: port_to_net(s.port()),
        dport: port_to_net(d.port()),
        proto,
        dir,
        _pad: [0; 2],
    }
}

/// Opens the pinned map `name` in `dir`.
pub fn open_map(dir: &Path, name: &str) -> MapData {
    MapData::from_pin(dir.join(name)).unwrap_or_else(|e| panic!("open pin {name}: {e}"))
}

/// The Service maps of a pin directory, opened from their pins.
pub struct Seeder {
    services: HashMap<MapData, ServiceKeyV4, ServiceEntry>,
    backends: HashMap<MapData, u32, BackendV4>,
    revnat: HashMap<MapData, RevNatId, RevNatV4>,
}

impl Seeder {
    pub fn new(dir: &Path) -> Self {
        Seeder {
            services: HashMap::try_from(Map::HashMap(open_map(dir, maps::SERVICES_MAP))).unwrap(),
            backends: HashMap::try_from(Map::HashMap(open_map(dir, maps::BACKENDS_MAP))).unwrap(),
            revnat: HashMap::try_from(Map::HashMap(open_map(dir, maps::REVNAT_MAP))).unwrap(),
        }
    }

    /// A frontend with `flags` and backends `(id, ip, port)` in slots 1..=n (in order), and its
    /// rev-NAT entry. The frontend entry goes in last, so a live datapath never sees a count
    /// without its slots.
    pub fn service(
        &mut self,
        vip: Ipv4Addr,
        port: u16,
        proto: u8,
        flags: u16,
        rev_nat_id: RevNatId,
        backends: &[(u32, Ipv4Addr, u16)],
    ) {
        self.service_in_scope(
            vip,
            port,
            proto,
            SCOPE_EXTERNAL,
            flags,
            rev_nat_id,
            backends,
        );
    }

    /// [`Seeder::service`] with the key's `scope` (`SCOPE_INTERNAL`: an in-cluster twin).
    #[allow(clippy::too_many_arguments)]
    pub fn service_in_scope(
        &mut self,
        vip: Ipv4Addr,
        port: u16,
        proto: u8,
        scope: u8,
        flags: u16,
        rev_nat_id: RevNatId,
        backends: &[(u32, Ipv4Addr, u16)],
    ) {
        let key = ServiceKeyV4::new(vip, port, proto, scope, 0);
        for (i, &(id, ip, p)) in backends.iter().enumerate() {
            self.backends
                .insert(id, BackendV4::new(ip, p, proto, 0), 0)
                .unwrap();
            let slot = ServiceEntry {
                backend_id: id,
                rev_nat_id,
                ..Default::default()
            };
            self.services
                .insert(key.with_slot(u16::try_from(i + 1).unwrap()), slot, 0)
                .unwrap();
        }
        self.revnat
            .insert(rev_nat_id, RevNatV4::new(vip, port), 0)
            .unwrap();
        let front = ServiceEntry {
            count: u16::try_from(backends.len()).unwrap(),
            rev_nat_id,
            flags,
            ..Default::default()
        };
        self.services.insert(key, front, 0).unwrap();
    }
}
