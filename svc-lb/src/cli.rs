//! Command-line interface (parsed here, executed in `main.rs`).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::model::LbAlgorithm;

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/svc-lb";

#[derive(Debug, Parser)]
#[command(
    name = "svc-lb",
    version,
    about = "eBPF Service load balancer: a kube-proxy replacement",
    long_about = "svc-lb programs XDP/TC eBPF maps so that Kubernetes Service frontends \
                  (ClusterIP, NodePort, externalIPs, LoadBalancer ingress) reach their pods, \
                  and lets you inspect what is programmed.",
    after_help = "Examples:\n  \
                  svc-lb run --manifests examples/ --iface eth0 --ui     # standalone, dashboard on 127.0.0.1:9964\n  \
                  svc-lb run --iface eth0 --metrics-addr 127.0.0.1:9963  # API mode, Prometheus metrics\n  \
                  svc-lb service list                                     # Services and their node-port URLs\n  \
                  svc-lb debug services                                   # frontends, backends, counters\n  \
                  svc-lb debug env -n shop --manifests examples/          # a new pod's Service variables"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the `run` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load and attach the datapath, then keep the maps in sync with the objects.
    Run(RunArgs),
    /// Inspect the pinned maps (works while the agent runs and after it stopped).
    #[command(subcommand)]
    Debug(DebugCommand),
    /// List Services and the URLs that reach them from outside, like `minikube service`.
    ///
    /// `svc-lb service list` prints one line per Service; `svc-lb service NAME --url` only the
    /// URLs of one. Reads the pinned maps only.
    Service(ServiceArgs),
    /// Detach the programs, remove what svc-lb pinned and restore the sysctls it changed.
    ///
    /// Removes only svc-lb's own map and link pins inside a bpffs pin directory; refuses
    /// (removing nothing) a path that is not on bpffs, a symlink, or a directory holding
    /// anything else, and refuses while an agent runs on the pin directory unless --force.
    Uninstall(UninstallArgs),
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// Uninstall even while an agent runs on the pin directory. That agent notices and
    /// re-creates the datapath at its next check (or exits, with --on-datapath-loss exit):
    /// stop it first to keep the node without svc-lb.
    #[arg(long)]
    pub force: bool,

    #[command(flatten)]
    pub pin: PinArgs,
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// bpffs directory where maps, programs and links are pinned.
    #[arg(long, default_value = DEFAULT_PIN_DIR, env = "SVC_LB_PIN_DIR")]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Standalone mode: read Service, EndpointSlice, Pod and Node objects (YAML or JSON, as
    /// Kubernetes writes them) from this directory and follow its changes. Without it, svc-lb
    /// watches the Kubernetes API server (API mode).
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,

    /// Interface to attach the datapath to (repeatable): a name, or a glob pattern such as
    /// 'lxc*' or 'veth[0-9]*'. Traffic to Services enters the node here, and replies from
    /// backends too. Names must exist at start; interfaces matching a pattern are attached
    /// when they appear (pod veths) and forgotten when they go away.
    #[arg(long = "iface", value_name = "IF", required = true)]
    pub ifaces: Vec<String>,

    /// Node address that NodePort frontends listen on (repeatable). Default: the IPv4
    /// addresses of the --iface interfaces.
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ips: Vec<Ipv4Addr>,

    /// This node's name: addresses of the Node object with this name feed NodePort frontends.
    /// API mode watches only this Node (default there: the host name, like kube-proxy).
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,

    /// Pod address range of the cluster (repeatable), like kube-proxy's --cluster-cidr: traffic
    /// from these sources (and from this node's addresses) to a NodePort, externalIP or
    /// LoadBalancer IP of an externalTrafficPolicy Local Service goes to any ready endpoint,
    /// not only to this node's. Without it, only the node's own traffic gets that.
    #[arg(long = "cluster-cidr", value_name = "CIDR")]
    pub cluster_cidrs: Vec<Ipv4Cidr>,

    /// Port range allowed for NodePorts, like the API server's --service-node-port-range.
    /// Standalone mode allocates nodePort and healthCheckNodePort values from it.
    #[arg(long, default_value = "30000-32767", value_name = "MIN-MAX")]
    pub nodeport_range: PortRange,

    /// Standalone mode: ClusterIP range of Services without spec.clusterIP, like the API
    /// server's --service-cluster-ip-range (repeatable: an IPv4 and an IPv6 range make a
    /// dual-stack cluster, the first is the primary family). See docs/allocation.md.
    #[arg(
        long = "service-cidr",
        value_name = "CIDR",
        default_value = crate::k8s::alloc::DEFAULT_SERVICE_CIDR
    )]
    pub service_cidrs: Vec<crate::k8s::alloc::ServiceCidr>,

    /// Standalone mode: directory of the state kept across restarts (allocations.json, which
    /// Service holds which ClusterIP and node port). Not on bpffs.
    #[arg(long, value_name = "DIR", default_value = crate::k8s::alloc::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    /// Backend selection of Services without a `svc-lb.io/lb-algorithm` annotation: `random`,
    /// or `maglev` (consistent hashing: a flow maps to the same backend on every node, and
    /// losing one of N backends moves only its ~1/N of the flows).
    #[arg(long, default_value = "random", value_name = "ALGO", value_parser = parse_lb_algorithm)]
    pub lb_algorithm: LbAlgorithm,

    /// Socket LB: cgroup v2 directory whose processes reach Services by connect()-time
    /// translation to a backend, which TC ingress cannot do for locally originated traffic.
    /// Must be cgroup v2. Default: the root of the node's cgroup v2 hierarchy (every process),
    /// found in /proc/self/mountinfo (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a
    /// hybrid cgroup v1/v2 host), or mounted by svc-lb on /run/svc-lb/cgroupv2 when cgroup v2
    /// is mounted nowhere (`svc-lb uninstall` unmounts it).
    #[arg(long, value_name = "PATH")]
    pub cgroup_path: Option<PathBuf>,

    /// Do not attach the socket LB (node processes then cannot reach Services); also detaches
    /// the one a previous agent attached.
    #[arg(long)]
    pub no_socket_lb: bool,

    /// XDP fast path for NodePort/externalIP/LoadBalancer traffic: `off`, `generic` (SKB mode,
    /// any interface) or `native` (in the driver; fails, naming the interface, when the driver
    /// has no XDP support). Attached to the same interfaces as TC; `off` removes the XDP links a
    /// previous agent attached. See docs/kube-proxy-replacement.md for which mode to use.
    #[arg(long, default_value = "off", value_name = "MODE")]
    pub xdp: crate::dataplane::XdpMode,

    /// What to do when the datapath is removed under the running agent (pins deleted, links
    /// detached, e.g. by `svc-lb uninstall --force` or bpftool), checked at every resync and
    /// after interface changes: `repair` re-pins the maps (keeping conntrack), re-attaches the
    /// links and re-applies the sysctls, with a warning; `exit` exits non-zero so the
    /// DaemonSet restarts the agent.
    #[arg(long, default_value = "repair", value_name = "ACTION")]
    pub on_datapath_loss: crate::dataplane::OnDatapathLoss,

    #[command(flatten)]
    pub pin: PinArgs,

    // Flattened last: their help headings apply to every argument after them.
    #[command(flatten)]
    pub kube: KubeArgs,

    #[command(flatten)]
    pub views: ViewArgs,

    #[command(flatten)]
    pub capacity: crate::dataplane::capacity::CapacityArgs,
}

impl RunArgs {
    /// The cgroup the socket LB attaches to (`--cgroup-path`, or found), `None` with
    /// `--no-socket-lb`.
    pub fn socket_lb_cgroup(&self) -> Option<crate::dataplane::cgroup::CgroupChoice<'_>> {
        use crate::dataplane::cgroup::CgroupChoice;
        (!self.no_socket_lb).then_some(match &self.cgroup_path {
            Some(p) => CgroupChoice::Given(p),
            None => CgroupChoice::Discover,
        })
    }
}

/// Optional servers of the agent; all off unless given.
#[derive(Debug, Default, Args)]
#[command(next_help_heading = "Optional servers")]
pub struct ViewArgs {
    /// Serve Prometheus metrics on http://ADDR/metrics (per-Service and per-backend
    /// packets/bytes, conntrack and map occupancy, sync latency, rejected objects).
    /// Off by default; e.g. 127.0.0.1:9963.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Answer DNS (UDP and TCP) on ADDR for <service>.<namespace>.svc.<cluster domain>: A for
    /// ClusterIPs, pod addresses for headless Services, CNAME for ExternalName, SRV for
    /// named ports. Off by default; e.g. 127.0.0.1:53.
    #[arg(long, value_name = "ADDR")]
    pub dns_listen: Option<SocketAddr>,

    /// The cluster domain the DNS responder is authoritative for (kubelet's --cluster-domain).
    #[arg(long, default_value = "cluster.local", value_name = "DOMAIN")]
    pub cluster_domain: String,

    /// Serve the web dashboard on http://ADDR/ (Services by namespace, backends with their
    /// live traffic share, conntrack occupancy; updates every second). `--ui` alone listens on
    /// 127.0.0.1:9964. It has no authentication: keep it on loopback (or tunnel to it).
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = DEFAULT_UI_ADDR)]
    pub ui: Option<SocketAddr>,

    /// A host name the dashboard answers to besides IP addresses and `localhost` (e.g. the
    /// node's DNS name); repeatable. Requests naming any other host get 403, so a web page
    /// of another site cannot read the dashboard through DNS rebinding.
    #[arg(long = "ui-allowed-host", value_name = "NAME")]
    pub ui_allowed_hosts: Vec<String>,
}

/// Where `--ui` without an address listens.
pub const DEFAULT_UI_ADDR: &str = "127.0.0.1:9964";

/// API mode: where the API server is and how often to re-check the maps.
#[derive(Debug, Args)]
#[command(next_help_heading = "API mode (without --manifests)")]
pub struct KubeArgs {
    /// Kubeconfig file. Default, like kubectl: $KUBECONFIG, then ~/.kube/config, then the
    /// in-cluster service account.
    #[arg(long, value_name = "PATH", conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubeconfig context to use instead of its current-context.
    #[arg(long, value_name = "NAME", conflicts_with = "manifests")]
    pub context: Option<String>,

    /// API mode: full reconcile interval (maps vs. the watched objects; repairs drift).
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// API mode: local health endpoint (/healthz: 200 once synced, /livez). Like
    /// kube-proxy's healthz address.
    #[arg(long, default_value = "127.0.0.1:10256", value_name = "ADDR")]
    pub health_addr: SocketAddr,
}

pub fn parse_lb_algorithm(s: &str) -> Result<LbAlgorithm, String> {
    LbAlgorithm::parse(s).ok_or_else(|| format!("expected random or maglev, got {s:?}"))
}

/// `500ms`, `2s`, `1m` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("expected a duration like 500ms, 30s or 1m, got {s:?}"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (ms, s, m)")),
    };
    if d.is_zero() {
        return Err("duration must be > 0".into());
    }
    Ok(d)
}

#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Frontends and the backends they balance over, with counters.
    ///
    /// With --list: one line per Service with its node-port URLs (like `svc-lb service list`).
    Services(ServicesArgs),
    /// Backends and their counters.
    Backends(DebugArgs),
    /// Conntrack entries (flows and their backend).
    Conntrack(DebugArgs),
    /// Global datapath counters.
    Stats(DebugArgs),
    /// Service environment variables kubelet would give a new pod in a namespace.
    ///
    /// {NAME}_SERVICE_HOST, {NAME}_SERVICE_PORT, {NAME}_PORT_6379_TCP_ADDR, ... exactly as
    /// kubelet builds them, from the Services of a manifest directory or the API server.
    Env(EnvArgs),
    /// kube-proxy's leftovers on this node (iptables-legacy and iptables-nft chains, the
    /// nftables `kube-proxy` tables, IPVS virtual servers), each with its cleanup command.
    ///
    /// The agent warns about them at start. Reads the current network namespace's netfilter
    /// state (needs CAP_NET_ADMIN); changes nothing.
    KubeProxy(KubeProxyArgs),
}

#[derive(Debug, Args)]
pub struct KubeProxyArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

impl DebugCommand {
    /// The pin directory the command reads (`None` for `env`, which reads manifests, and
    /// `kube-proxy`, which reads the node's packet filter).
    pub fn pin_dir(&self) -> Option<&std::path::Path> {
        match self {
            DebugCommand::Services(a) => Some(&a.common.pin.pin_dir),
            DebugCommand::Backends(a) | DebugCommand::Conntrack(a) | DebugCommand::Stats(a) => {
                Some(&a.pin.pin_dir)
            }
            DebugCommand::Env(_) | DebugCommand::KubeProxy(_) => None,
        }
    }
}

#[derive(Debug, Args)]
pub struct EnvArgs {
    /// Namespace of the pod.
    #[arg(short = 'n', long, default_value = "default", value_name = "NS")]
    pub namespace: String,

    /// Read the Services from this directory of manifests (YAML or JSON, as for
    /// `run --manifests`). Without it, list them from the API server.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,

    /// Without --manifests: kubeconfig file (default like kubectl: $KUBECONFIG,
    /// ~/.kube/config, then the in-cluster service account).
    #[arg(long, value_name = "PATH", conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,

    /// Without --manifests: kubeconfig context to use instead of its current-context.
    #[arg(long, value_name = "NAME", conflicts_with = "manifests")]
    pub context: Option<String>,

    /// As for a pod with `enableServiceLinks: false`: only the `kubernetes` Service.
    #[arg(long)]
    pub no_service_links: bool,

    /// Output format: `NAME=value` lines sorted by name, or a JSON object.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct DebugArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    #[command(flatten)]
    pub pin: PinArgs,
}

#[derive(Debug, Args)]
pub struct ServicesArgs {
    /// One line per Service: NAMESPACE, NAME, TYPE and its node-port URLs (like
    /// `minikube service list`) instead of one block per frontend.
    #[arg(long)]
    pub list: bool,

    #[command(flatten)]
    pub namespaces: NamespaceArgs,

    #[command(flatten)]
    pub common: DebugArgs,
}

/// Which namespaces a listing shows. All of them unless `-n` is given (like `minikube service
/// list`); `-A` is accepted for kubectl habits.
#[derive(Debug, Args)]
pub struct NamespaceArgs {
    /// Only Services in this namespace.
    #[arg(
        short = 'n',
        long,
        value_name = "NS",
        conflicts_with = "all_namespaces"
    )]
    pub namespace: Option<String>,

    /// Services in every namespace (the default).
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  svc-lb service list -n shop\n  svc-lb service web -n shop --url"
)]
pub struct ServiceArgs {
    #[command(subcommand)]
    pub command: Option<ServiceCommand>,

    /// The Service to show.
    #[arg(value_name = "NAME")]
    pub name: Option<String>,

    /// Namespace of NAME.
    #[arg(short = 'n', long, default_value = "default", value_name = "NS")]
    pub namespace: String,

    /// Print only the node-port URLs, one per line (fails if the Service has none).
    #[arg(long)]
    pub url: bool,

    /// Output format (without --url).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    #[command(flatten)]
    pub pin: PinArgs,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// NAMESPACE, NAME, TYPE and URL of every Service (URL: http://NODE-IP:NODEPORT, or "No
    /// node port").
    List(ServiceListArgs),
}

#[derive(Debug, Args)]
pub struct ServiceListArgs {
    #[command(flatten)]
    pub namespaces: NamespaceArgs,

    #[command(flatten)]
    pub common: DebugArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// An inclusive port range, written `MIN-MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.min..=self.max).contains(&port)
    }
}

impl Default for PortRange {
    fn default() -> Self {
        Self {
            min: 30000,
            max: 32767,
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("expected MIN-MAX, got {s:?}"))?;
        let min: u16 = a
            .trim()
            .parse()
            .map_err(|e| format!("bad MIN {a:?}: {e}"))?;
        let max: u16 = b
            .trim()
            .parse()
            .map_err(|e| format!("bad MAX {b:?}: {e}"))?;
        if min == 0 || min > max {
            return Err(format!("empty or invalid range {min}-{max}"));
        }
        Ok(Self { min, max })
    }
}

/// An IPv4 prefix, written `ADDR/LEN` (a bare address is a /32). Host bits are cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Ipv4Cidr {
    pub fn new(addr: Ipv4Addr, len: u8) -> Self {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(len.min(32)))
            .unwrap_or(0);
        Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            len: len.min(32),
        }
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, l) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a
            .trim()
            .parse()
            .map_err(|e| format!("bad address {a:?}: {e}"))?;
        let len: u8 = l
            .trim()
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("bad prefix length {l:?} (0-32)"))?;
        Ok(Self::new(addr, len))
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_run() {
        let cli = Cli::try_parse_from([
            "svc-lb",
            "run",
            "--manifests",
            "examples",
            "--iface",
            "eth0",
            "--iface",
            "veth1",
            "--node-ip",
            "10.0.0.1",
            "--nodeport-range",
            "30000-30100",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.ifaces, ["eth0", "veth1"]);
        assert_eq!(run.node_ips, [Ipv4Addr::new(10, 0, 0, 1)]);
        assert_eq!(
            run.nodeport_range,
            PortRange {
                min: 30000,
                max: 30100
            }
        );
        assert_eq!(run.pin.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        // No --cgroup-path: found (or mounted) at start.
        assert_eq!(
            run.socket_lb_cgroup(),
            Some(crate::dataplane::cgroup::CgroupChoice::Discover)
        );
    }

    #[test]
    fn xdp_flag() {
        use crate::dataplane::XdpMode;
        let parse = |extra: &[&str]| {
            let mut argv = vec!["svc-lb", "run", "--iface", "eth0"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|cli| match cli.command {
                Command::Run(run) => run.xdp,
                _ => panic!("not run"),
            })
        };
        assert_eq!(parse(&[]).unwrap(), XdpMode::Off);
        assert_eq!(parse(&["--xdp", "off"]).unwrap(), XdpMode::Off);
        assert_eq!(parse(&["--xdp", "generic"]).unwrap(), XdpMode::Generic);
        assert_eq!(parse(&["--xdp", "native"]).unwrap(), XdpMode::Native);
        let err = parse(&["--xdp", "driver"]).unwrap_err().to_string();
        assert!(err.contains("generic") && err.contains("native"), "{err}");
    }

    #[test]
    fn cluster_cidr_flag_repeats() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["svc-lb", "run", "--iface", "eth0"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|cli| match cli.command {
                Command::Run(run) => run.cluster_cidrs,
                _ => panic!("not run"),
            })
        };
        assert!(parse(&[]).unwrap().is_empty());
        let got = parse(&[
            "--cluster-cidr",
            "10.244.0.0/16",
            "--cluster-cidr",
            "100.64.3.4/10",
        ])
        .unwrap();
        assert_eq!(
            got.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.244.0.0/16", "100.64.0.0/10"]
        );
        assert!(parse(&["--cluster-cidr", "10.244.0.0/40"]).is_err());
    }

    #[test]
    fn socket_lb_flags() {
        let cli = Cli::try_parse_from([
            "svc-lb",
            "run",
            "--iface",
            "lxc*",
            "--cgroup-path",
            "/sys/fs/cgroup/kubepods",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(
            run.socket_lb_cgroup(),
            Some(crate::dataplane::cgroup::CgroupChoice::Given(
                std::path::Path::new("/sys/fs/cgroup/kubepods")
            ))
        );
        let cli =
            Cli::try_parse_from(["svc-lb", "run", "--iface", "eth0", "--no-socket-lb"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.socket_lb_cgroup(), None);
    }

    #[test]
    fn api_mode_without_manifests() {
        let cli = Cli::try_parse_from([
            "svc-lb",
            "run",
            "--iface",
            "eth0",
            "--kubeconfig",
            "/etc/kc",
            "--context",
            "prod",
            "--resync-interval",
            "500ms",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.manifests, None);
        assert_eq!(run.kube.kubeconfig, Some(PathBuf::from("/etc/kc")));
        assert_eq!(run.kube.context.as_deref(), Some("prod"));
        assert_eq!(run.kube.resync_interval, Duration::from_millis(500));
        assert_eq!(
            run.kube.health_addr,
            "127.0.0.1:10256".parse::<SocketAddr>().unwrap()
        );
        let plain = Cli::try_parse_from(["svc-lb", "run", "--iface", "eth0"]).unwrap();
        let Command::Run(run) = plain.command else {
            panic!("not run")
        };
        assert_eq!(run.kube.resync_interval, Duration::from_secs(30));
    }

    #[test]
    fn manifests_and_api_flags_are_exclusive() {
        for flag in [["--kubeconfig", "/k"], ["--context", "c"]] {
            let err = Cli::try_parse_from([
                "svc-lb",
                "run",
                "--iface",
                "eth0",
                "--manifests",
                "dir",
                flag[0],
                flag[1],
            ])
            .unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{flag:?}"
            );
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn run_needs_an_interface() {
        assert!(Cli::try_parse_from(["svc-lb", "run", "--manifests", "x"]).is_err());
    }

    #[test]
    fn parse_debug_json() {
        let cli = Cli::try_parse_from([
            "svc-lb",
            "debug",
            "services",
            "-o",
            "json",
            "--pin-dir",
            "/sys/fs/bpf/x",
        ])
        .unwrap();
        let Command::Debug(DebugCommand::Services(a)) = cli.command else {
            panic!("not debug services")
        };
        assert_eq!(a.common.output, OutputFormat::Json);
        assert_eq!(a.common.pin.pin_dir, PathBuf::from("/sys/fs/bpf/x"));
        assert!(!a.list);
        assert_eq!(a.namespaces.namespace, None);
    }

    #[test]
    fn service_list_and_url() {
        let cli = Cli::try_parse_from(["svc-lb", "service", "list", "-n", "shop"]).unwrap();
        let Command::Service(ServiceArgs {
            command: Some(ServiceCommand::List(l)),
            ..
        }) = cli.command
        else {
            panic!("not service list")
        };
        assert_eq!(l.namespaces.namespace.as_deref(), Some("shop"));

        let cli = Cli::try_parse_from(["svc-lb", "service", "web", "--url"]).unwrap();
        let Command::Service(a) = cli.command else {
            panic!("not service")
        };
        assert!(a.command.is_none());
        assert_eq!(a.name.as_deref(), Some("web"));
        assert_eq!(a.namespace, "default");
        assert!(a.url);

        let cli = Cli::try_parse_from(["svc-lb", "debug", "services", "--list", "-A"]).unwrap();
        let Command::Debug(DebugCommand::Services(a)) = cli.command else {
            panic!("not debug services")
        };
        assert!(a.list && a.namespaces.all_namespaces);
        assert!(
            Cli::try_parse_from(["svc-lb", "debug", "services", "-n", "x", "-A"]).is_err(),
            "-n and -A conflict"
        );
    }

    #[test]
    fn view_servers_are_off_unless_asked() {
        let run = |extra: &[&str]| {
            let mut argv = vec!["svc-lb", "run", "--iface", "eth0"];
            argv.extend_from_slice(extra);
            let Command::Run(r) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not run")
            };
            r.views
        };
        let v = run(&[]);
        assert_eq!((v.metrics_addr, v.dns_listen, v.ui), (None, None, None));
        assert_eq!(v.cluster_domain, "cluster.local");
        // `--ui` alone is loopback, even when another flag follows.
        let v = run(&["--ui", "--metrics-addr", "127.0.0.1:9963"]);
        assert_eq!(v.ui, Some(DEFAULT_UI_ADDR.parse().unwrap()));
        assert_eq!(v.metrics_addr, Some("127.0.0.1:9963".parse().unwrap()));
        let v = run(&["--ui", "10.0.0.1:80", "--dns-listen", "127.0.0.1:53"]);
        assert_eq!(v.ui, Some("10.0.0.1:80".parse().unwrap()));
        assert_eq!(v.dns_listen, Some("127.0.0.1:53".parse().unwrap()));
    }

    #[test]
    fn port_range_errors() {
        assert!("30000".parse::<PortRange>().is_err());
        assert_eq!(
            "10.244.1.7/16".parse::<Ipv4Cidr>(),
            Ok(Ipv4Cidr {
                addr: Ipv4Addr::new(10, 244, 0, 0),
                len: 16
            })
        );
        assert_eq!("10.0.0.1".parse::<Ipv4Cidr>().map(|c| c.len), Ok(32));
        assert_eq!("0.0.0.0/0".parse::<Ipv4Cidr>().map(|c| c.len), Ok(0));
        assert!("10.0.0.0/33".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0/8".parse::<Ipv4Cidr>().is_err());
        assert!("5-4".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("1-70000".parse::<PortRange>().is_err());
        assert!("1-1".parse::<PortRange>().unwrap().contains(1));
    }

    #[test]
    fn bad_node_ip_is_rejected() {
        assert!(
            Cli::try_parse_from([
                "svc-lb",
                "run",
                "--manifests",
                "x",
                "--iface",
                "a",
                "--node-ip",
                "300.1.1.1"
            ])
            .is_err()
        );
    }
}

#[cfg(test)]
mod lb_algorithm_tests {
    use super::*;

    fn run(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut args = vec!["svc-lb", "run", "--manifests", "m", "--iface", "eth0"];
        args.extend_from_slice(extra);
        match Cli::try_parse_from(args)?.command {
            Command::Run(run) => Ok(run),
            _ => panic!("not run"),
        }
    }

    #[test]
    fn lb_algorithm_defaults_to_random_and_accepts_maglev() {
        assert_eq!(run(&[]).unwrap().lb_algorithm, LbAlgorithm::Random);
        let maglev = run(&["--lb-algorithm", "maglev"]).unwrap();
        assert_eq!(maglev.lb_algorithm, LbAlgorithm::Maglev);
        let err = run(&["--lb-algorithm", "roundrobin"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected random or maglev"), "{err}");
    }
}
