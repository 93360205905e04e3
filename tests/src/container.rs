//! The svc-lb container image (`cargo xtask image`) run by a real container runtime, podman with
//! runc, the way deploy/daemonset.yaml runs it: the DaemonSet's security context, environment,
//! host mounts and arguments become podman flags, so a change there is tested here.
//!
//! podman runs on a private store (vfs: plain directories, nothing mounted) under a scratch
//! directory removed on drop, so the machine's own images and containers are never touched.
//! runc, not the default crun: crun refuses hosts with hybrid cgroups.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Container};

use crate::{agent::remove_pins, bin_path, ensure_bpffs, netns::Topology};

/// The workspace version: the image's tag and `org.opencontainers.image.version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `docker load`-able archive `cargo xtask image` writes: `$SVC_LB_IMAGE_ARCHIVE`, else
/// `<target>/image/svc-lb-<version>.docker.tar` next to this test's target directory.
pub fn image_archive() -> PathBuf {
    if let Some(p) = std::env::var_os("SVC_LB_IMAGE_ARCHIVE") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test> -> target
    let exe = std::env::current_exe().expect("current_exe");
    let target = exe
        .ancestors()
        .find(|a| a.join("image").is_dir() || a.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workspace().join("target"));
    let path = target
        .join("image")
        .join(format!("svc-lb-{VERSION}.docker.tar"));
    assert!(
        path.is_file(),
        "{} not found: build the image first with `cargo xtask image` (`cargo xtask test` \
         does), or set SVC_LB_IMAGE_ARCHIVE",
        path.display()
    );
    path
}

/// deploy/daemonset.yaml, parsed.
pub fn daemonset() -> DaemonSet {
    let path = workspace().join("deploy/daemonset.yaml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The DaemonSet's svc-lb container and its pod's hostPath volumes (name -> host path).
pub fn daemonset_container() -> (Container, BTreeMap<String, String>) {
    let ds = daemonset();
    let spec = ds
        .spec
        .and_then(|s| s.template.spec)
        .expect("DaemonSet pod spec");
    let c = spec
        .containers
        .into_iter()
        .find(|c| c.name == "svc-lb")
        .expect("svc-lb container");
    let volumes = spec
        .volumes
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v.name, v.host_path?.path)))
        .collect();
    (c, volumes)
}

/// podman (with runc) on a private store; drop removes its containers, images and the store.
pub struct Podman {
    store: PathBuf,
}

impl Podman {
    pub fn new(prefix: &str) -> Podman {
        crate::require_root();
        let store = std::env::temp_dir().join(format!("svc-lb-podman-{prefix}"));
        let _ = fs::remove_dir_all(&store);
        fs::create_dir_all(&store).unwrap_or_else(|e| panic!("create {}: {e}", store.display()));
        Podman { store }
    }

    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(self.store.join("root"))
            .arg("--runroot")
            .arg(self.store.join("run"))
            .arg("--tmpdir")
            .arg(self.store.join("tmp"))
            .args(["--storage-driver", "vfs"])
            .args(["--runtime", "runc"])
            .args(["--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file"])
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `podman <args>`; panics with its output unless it succeeds.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "`podman {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn output(&self, args: &[&str]) -> Output {
        self.cmd()
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run podman (is it installed? cargo xtask setup): {e}"))
    }

    /// `podman load -i <archive>`; returns the image names it loaded.
    pub fn load(&self, archive: &Path) -> Vec<String> {
        let out = self.run(&["load", "-i", &archive.to_string_lossy()]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("Loaded image: "))
            .flat_map(|l| l.split(',').map(|n| n.trim().to_string()))
            .collect()
    }

    /// One label of an image.
    pub fn label(&self, image: &str, label: &str) -> String {
        let format = format!("{{{{index .Labels \"{label}\"}}}}");
        let out = self.run(&["image", "inspect", "--format", &format, image]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for args in [
            &["rm", "--all", "--force", "--time", "0"][..],
            &["rmi", "--all", "--force"][..],
        ] {
            let out = self.output(args);
            if !out.status.success() {
                eprintln!(
                    "warning: podman {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.store) {
            eprintln!("warning: remove {}: {e}", self.store.display());
        }
    }
}

/// A cgroup v2 directory for the container's socket LB (the DaemonSet mounts the host's cgroup
/// v2 root; a test uses a child of it, so it never balances the machine's other processes).
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    /// A child of the first cgroup v2 mount (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
    /// a hybrid host).
    pub fn new(prefix: &str) -> TestCgroup {
        let mounts = fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
        let root = mounts
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
            })
            .next()
            .expect("no cgroup v2 mounted: the socket LB needs one");
        let path = root.join(format!("svc-lb-test-{prefix}"));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        TestCgroup { path }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(e) = fs::remove_dir(&self.path) {
            if e.kind() == std::io::ErrorKind::NotFound {
                return;
            }
            if Instant::now() > deadline {
                eprintln!("warning: could not remove {}: {e}", self.path.display());
                return;
            }
            let _ = fs::write(self.path.join("cgroup.kill"), "1");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Where the manifests are mounted in the container (read-only, as a ConfigMap would be).
pub const MANIFESTS_IN_CONTAINER: &str = "/etc/svc-lb/manifests";

/// The agent as the DaemonSet runs it, in a podman container in the topology's node namespace,
/// in standalone mode on the test's manifests. Drop removes the container, then uninstalls its
/// pins from the host (printing the container log if the test failed).
pub struct ContainerAgent<'t> {
    topo: &'t Topology,
    podman: &'t Podman,
    pub name: String,
    pub pin_dir: PathBuf,
}

impl<'t> ContainerAgent<'t> {
    /// `podman run -d` of `image` with the DaemonSet's settings: its security context
    /// (privileged, or exactly its capabilities), `readOnlyRootFilesystem`, env (`NODE_NAME` =
    /// `node_name`), hostPath mounts (a host path found in `host_paths` is replaced by the given
    /// one, e.g. the host cgroup root by a test cgroup) and arguments, with the DaemonSet's
    /// `--iface` replaced by the topology's interfaces (the pod ones as a pattern, as the
    /// DaemonSet's `veth*`), plus `--manifests` (mounted read-only), `--node-ip` and the
    /// test's `--pin-dir`.
    pub fn start(
        topo: &'t Topology,
        podman: &'t Podman,
        image: &str,
        manifests: &Path,
        node_name: &str,
        host_paths: &BTreeMap<String, PathBuf>,
    ) -> ContainerAgent<'t> {
        ensure_bpffs();
        let name = format!("{}-svc-lb", topo.prefix);
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix));
        let agent = ContainerAgent {
            topo,
            podman,
            name,
            pin_dir,
        };
        let args = agent.run_args(image, manifests, node_name, host_paths);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        podman.run(&args);
        agent
    }

    fn run_args(
        &self,
        image: &str,
        manifests: &Path,
        node_name: &str,
        host_paths: &BTreeMap<String, PathBuf>,
    ) -> Vec<String> {
        let (c, volumes) = daemonset_container();
        let mut a: Vec<String> = ["run", "--detach", "--name", &self.name]
            .map(String::from)
            .into();
        // The DaemonSet's hostNetwork: the topology's node namespace is this test's host.
        a.push(format!("--network=ns:{}", self.topo.node.path().display()));
        // podman's default limits exceed this machine's hard limits ("setrlimit ... Operation
        // not permitted"); a kubelet gives the runtime's defaults, which fit.
        a.extend(["--ulimit=nofile=1024:1024", "--ulimit=nproc=1024:1024"].map(String::from));
        let sc = c.security_context.clone().unwrap_or_default();
        if sc.privileged == Some(true) {
            a.push("--privileged".into());
        } else {
            let caps = sc.capabilities.clone().unwrap_or_default();
            for d in caps.drop.iter().flatten() {
                a.push(format!("--cap-drop={d}"));
            }
            for add in caps.add.iter().flatten() {
                a.push(format!("--cap-add={add}"));
            }
            // Kubernetes runs containers unconfined unless seccompProfile says otherwise
            // (podman would apply its default profile).
            let seccomp = sc
                .seccomp_profile
                .as_ref()
                .map(|p| p.type_.as_str())
                .unwrap_or("Unconfined");
            if seccomp == "Unconfined" {
                a.push("--security-opt=seccomp=unconfined".into());
            }
        }
        if sc.read_only_root_filesystem == Some(true) {
            a.push("--read-only".into());
        }
        for e in c.env.iter().flatten() {
            let value = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from))
                    if from.field_ref.as_ref().map(|f| f.field_path.as_str())
                        == Some("spec.nodeName") =>
                {
                    node_name.to_string()
                }
                _ => panic!("env {}: only values and spec.nodeName are mapped", e.name),
            };
            // The test's log level wins, so a failing run shows the agent's debug lines.
            let value = match e.name.as_str() {
                "RUST_LOG" => "info,svc_lb=debug".to_string(),
                _ => value,
            };
            a.push(format!("--env={}={value}", e.name));
        }
        for m in c.volume_mounts.iter().flatten() {
            let host = volumes
                .get(&m.name)
                .unwrap_or_else(|| panic!("volume {} is not a hostPath", m.name));
            let host = host_paths
                .get(host)
                .map_or_else(|| host.clone(), |p| p.display().to_string());
            let mut opts = Vec::new();
            if m.read_only == Some(true) {
                opts.push("ro");
            }
            match m.mount_propagation.as_deref() {
                Some("Bidirectional") => opts.push("rshared"),
                Some("HostToContainer") => opts.push("rslave"),
                _ => {}
            }
            let opts = if opts.is_empty() {
                String::new()
            } else {
                format!(":{}", opts.join(","))
            };
            a.push(format!("--volume={host}:{}{opts}", m.mount_path));
        }
        a.push(format!(
            "--volume={}:{MANIFESTS_IN_CONTAINER}:ro",
            manifests.display()
        ));
        a.push(image.to_string());
        // The image's entrypoint is svc-lb; the DaemonSet gives only arguments.
        assert!(
            c.command.is_none(),
            "the DaemonSet should use the image's entrypoint"
        );
        let mut ds_args = c.args.clone().unwrap_or_default().into_iter();
        a.push(ds_args.next().expect("DaemonSet args start with `run`"));
        a.extend(ds_args.filter(|x| !x.starts_with("--iface")));
        a.push(format!("--manifests={MANIFESTS_IN_CONTAINER}"));
        a.push("--iface=n-c".into());
        a.push("--iface=n-p*".into());
        a.push(format!("--node-ip={}", crate::netns::NODE_IP));
        a.push(format!("--pin-dir={}", self.pin_dir.display()));
        a
    }

    /// `true` while the container runs.
    pub fn running(&self) -> bool {
        let out = self
            .podman
            .output(&["inspect", "--format", "{{.State.Running}}", &self.name]);
        String::from_utf8_lossy(&out.stdout).trim() == "true"
    }

    /// Panics with the container log unless it runs.
    pub fn assert_running(&self) {
        assert!(
            self.running(),
            "container {} is not running; log:\n{}",
            self.name,
            self.logs()
        );
    }

    pub fn logs(&self) -> String {
        let out = self.podman.output(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `podman stop`: SIGTERM, as the kubelet stops a pod, then SIGKILL after `grace`.
    pub fn stop(&self, grace: Duration) {
        self.podman
            .run(&["stop", "--time", &grace.as_secs().to_string(), &self.name]);
    }

    /// `podman start` of the stopped container (same arguments and mounts).
    pub fn start_again(&self) {
        self.podman.run(&["start", &self.name]);
    }

    /// The exit code of the stopped container.
    pub fn exit_code(&self) -> String {
        let out = self
            .podman
            .run(&["inspect", "--format", "{{.State.ExitCode}}", &self.name]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs the host's `svc-lb <args> --pin-dir <pin dir>` (the debug binary of this build, not
    /// the image's) in the node namespace.
    pub fn host_cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin_path("svc-lb", "SVC_LB_BIN"));
        cmd.args(args).arg("--pin-dir").arg(&self.pin_dir);
        self.topo.node.enter(&mut cmd);
        cmd.output()
            .unwrap_or_else(|e| panic!("run svc-lb {}: {e}", args.join(" ")))
    }
}

impl Drop for ContainerAgent<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- container {} log ----\n{}---- end of container log ----",
                self.name,
                self.logs()
            );
        }
        let _ = self
            .podman
            .output(&["rm", "--force", "--time", "0", &self.name]);
        remove_pins(&self.pin_dir, || self.host_cli(&["uninstall"]));
    }
}
