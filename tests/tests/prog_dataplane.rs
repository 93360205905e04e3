//! `svc_lb::dataplane` on real interfaces: pinned TCX links survive the loader, a new loader
//! replaces (not stacks) the previous program, dropped interfaces lose their link, uninstall
//! detaches everything. Each test runs in a private network namespace (unshared by its own
//! thread) with a veth pair. Needs root; fails, never skips.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use aya::programs::{SchedClassifier, TcAttachType};
use svc_lb::dataplane::{Dataplane, DataplaneConfig, LINKS_DIR, TC_INGRESS_PROG, uninstall};
use svc_lb_common::ALL_MAPS;

/// Runs `f` on a new thread inside a fresh network namespace (only that thread moves).
fn in_netns(f: impl FnOnce() + Send + 'static) {
    svc_lb_tests::require_root();
    svc_lb_tests::ensure_bpffs();
    let t = std::thread::spawn(move || {
        // SAFETY: unshare affects only the calling thread, which exits afterwards.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        f();
    });
    if let Err(e) = t.join() {
        std::panic::resume_unwind(e);
    }
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {args:?} failed: {st}");
}

fn veth_pair(a: &str, b: &str) {
    ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
    ip(&["link", "set", a, "up"]);
    ip(&["link", "set", b, "up"]);
}

/// Unique pin dir; on drop, removes whatever is left (detaching leftover links).
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> Self {
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/{}-dptest",
            svc_lb_tests::netns::unique_prefix()
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Ids of the TCX ingress programs on `iface`, checking they are all ours.
fn attached(iface: &str) -> Vec<u32> {
    let (_, progs) = SchedClassifier::query_tcx(iface, TcAttachType::Ingress).expect("query tcx");
    progs
        .iter()
        .map(|p| {
            // The kernel keeps 15 bytes of a program name.
            let name = p.name_as_str().unwrap_or_default();
            assert!(
                !name.is_empty() && TC_INGRESS_PROG.starts_with(name),
                "foreign program {name:?} on {iface}"
            );
            p.id()
        })
        .collect()
}

fn sysctl(name: &str, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{name}/{key}"))
        .unwrap()
        .trim()
        .to_string()
}

fn link_pin(dir: &Path, iface: &str) -> PathBuf {
    dir.join(LINKS_DIR).join(format!("{iface}-tc-ingress"))
}

#[test]
fn load_pins_maps_and_links_and_survives_the_loader() {
    in_netns(|| {
        veth_pair("dpa0", "dpa1");
        std::fs::write("/proc/sys/net/ipv4/conf/all/rp_filter", "1").unwrap();
        std::fs::write("/proc/sys/net/ipv4/conf/dpa0/rp_filter", "2").unwrap();
        let dir = PinDir::new();
        let cfg = DataplaneConfig {
            pin_dir: dir.0.clone(),
            ifaces: vec!["dpa0".into(), "dpa1".into()],
        };
        let dp = Dataplane::load(&cfg).expect("Dataplane::load");
        for name in ALL_MAPS {
            assert!(dir.0.join(name).exists(), "map pin {name}");
        }
        for iface in ["dpa0", "dpa1"] {
            assert!(link_pin(&dir.0, iface).exists(), "link pin of {iface}");
            assert_eq!(attached(iface).len(), 1, "{iface}");
        }
        assert_eq!(sysctl("all", "rp_filter"), "0");
        assert_eq!(sysctl("dpa0", "rp_filter"), "0");
        assert_eq!(sysctl("dpa0", "accept_local"), "1");
        assert_eq!(sysctl("dpa1", "accept_local"), "1");
        let first = attached("dpa0");

        // The agent goes away (as with kill -9, nothing is cleaned up): still attached.
        drop(dp);
        assert_eq!(attached("dpa0"), first);

        // A new agent replaces the program instead of stacking a second one.
        let dp = Dataplane::load(&cfg).expect("second Dataplane::load");
        let second = attached("dpa0");
        assert_eq!(second.len(), 1);
        assert_ne!(
            second, first,
            "the new agent's program must be the one attached"
        );
        drop(dp);

        // An agent restarted without dpa1 detaches it there.
        let cfg1 = DataplaneConfig {
            pin_dir: dir.0.clone(),
            ifaces: vec!["dpa0".into()],
        };
        let dp = Dataplane::load(&cfg1).expect("third Dataplane::load");
        assert_eq!(attached("dpa0").len(), 1);
        assert!(attached("dpa1").is_empty());
        assert!(!link_pin(&dir.0, "dpa1").exists());
        drop(dp);

        uninstall(&dir.0).expect("uninstall");
        assert!(attached("dpa0").is_empty());
        assert!(!dir.0.exists());
        // Uninstalling twice is fine.
        uninstall(&dir.0).expect("second uninstall");
    });
}

#[test]
fn stale_link_of_recreated_interface_is_replaced() {
    in_netns(|| {
        veth_pair("dpb0", "dpb1");
        let dir = PinDir::new();
        let cfg = DataplaneConfig {
            pin_dir: dir.0.clone(),
            ifaces: vec!["dpb0".into()],
        };
        drop(Dataplane::load(&cfg).expect("Dataplane::load"));
        // The interface disappears and comes back: the pinned link is now defunct.
        ip(&["link", "del", "dpb0"]);
        veth_pair("dpb0", "dpb1");
        assert!(attached("dpb0").is_empty());
        drop(Dataplane::load(&cfg).expect("Dataplane::load after recreate"));
        assert_eq!(attached("dpb0").len(), 1);
        uninstall(&dir.0).expect("uninstall");
        assert!(attached("dpb0").is_empty());
    });
}

#[test]
fn pin_dir_outside_bpffs_is_refused() {
    svc_lb_tests::require_root();
    let cfg = DataplaneConfig {
        pin_dir: std::env::temp_dir().join(format!("svc-lb-not-bpffs-{}", std::process::id())),
        ifaces: vec![],
    };
    let err = Dataplane::load(&cfg).expect_err("a pin dir on tmpfs/ext4 cannot hold pins");
    assert!(err.to_string().contains("not on a bpf filesystem"), "{err}");
}

/// Dataplane::load mounts bpffs when /sys/fs/bpf is not one. Runs itself again under
/// `unshare -m -n` (private mount and network namespaces), where the child unmounts bpffs
/// and loads; the host's mounts and sysctls are never touched.
#[test]
fn load_mounts_bpffs_when_missing() {
    const CHILD_ENV: &str = "SVC_LB_MOUNT_TEST_CHILD";
    svc_lb_tests::require_root();
    if std::env::var_os(CHILD_ENV).is_none() {
        let exe = std::env::current_exe().unwrap();
        let out = Command::new("unshare")
            .args(["-m", "-n", "--propagation", "private"])
            .arg(exe)
            .args(["--exact", "load_mounts_bpffs_when_missing", "--nocapture"])
            .env(CHILD_ENV, "1")
            .output()
            .expect("run unshare");
        assert!(
            out.status.success(),
            "child failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "child did not run the test"
        );
        return;
    }
    // Child: drop every bpffs mounted on /sys/fs/bpf in this private mount namespace.
    while is_bpffs("/sys/fs/bpf") {
        let st = Command::new("umount").arg("/sys/fs/bpf").status().unwrap();
        assert!(st.success(), "umount /sys/fs/bpf");
    }
    let dir = PinDir::new();
    let cfg = DataplaneConfig {
        pin_dir: dir.0.clone(),
        ifaces: vec![],
    };
    drop(Dataplane::load(&cfg).expect("Dataplane::load without bpffs"));
    assert!(is_bpffs("/sys/fs/bpf"), "bpffs was not mounted");
    for name in ALL_MAPS {
        assert!(dir.0.join(name).exists(), "map pin {name}");
    }
    uninstall(&dir.0).unwrap();
}

fn is_bpffs(path: &str) -> bool {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T", path])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "bpf_fs"
}
