use std::path::PathBuf;

/// Errors while installing or removing the eBPF dataplane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{path} is not on a bpf filesystem and it is not under /sys/fs/bpf")]
    NotBpffs { path: PathBuf },
    #[error("mounting bpffs on {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map pin {0} missing after load")]
    MissingPin(PathBuf),
    #[error("program {0} missing from the eBPF object")]
    ProgramNotFound(&'static str),
    #[error("program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching to interface {iface}")]
    Attach {
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("link of interface {iface} is not an fd link (TCX needs kernel >= 6.6)")]
    Link {
        iface: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error(
        "attaching svc_lb_xdp in {mode} mode to interface {iface} (native XDP needs driver support for this interface; --xdp generic works on every interface)"
    )]
    XdpAttach {
        iface: String,
        mode: super::xdp::XdpMode,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "XDP attachment on interface {iface} is not a bpf_link and could not be pinned (needs kernel >= 5.9)"
    )]
    XdpLink {
        iface: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning link at {path}")]
    PinLink {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("--iface {spec:?}: {reason}")]
    InvalidIface { spec: String, reason: String },
    #[error(
        "interface {0:?} does not exist (exact --iface names must exist at start; use a pattern such as 'lxc*' for interfaces that appear later)"
    )]
    NoSuchInterface(String),
    #[error("listing or following network interfaces (rtnetlink)")]
    Netlink(#[source] std::io::Error),
    #[error("starting the interface watcher thread")]
    Watch(#[source] std::io::Error),
    #[error("socket LB cgroup {path}: {reason}")]
    Cgroup { path: PathBuf, reason: String },
    #[error("attaching {program} to cgroup {path}")]
    AttachCgroup {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("writing sysctl {path}")]
    Sysctl {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sysctl record {path} is unreadable ({reason}); fix or remove it")]
    SysctlRecord { path: PathBuf, reason: String },
    #[error("svc-lb state {path}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another svc-lb agent, {holder}, is running on pin directory {pin_dir}; two agents on one \
         pin directory overwrite each other's Services (stop it first, or give this one its own \
         --pin-dir)"
    )]
    AgentRunning {
        pin_dir: PathBuf,
        holder: super::state::Holder,
    },
    #[error(
        "an svc-lb agent, {holder}, is running on pin directory {pin_dir}: stop it first (it \
         would re-create the datapath at its next check), or pass --force"
    )]
    UninstallWhileRunning {
        pin_dir: PathBuf,
        holder: super::state::Holder,
    },
    #[error("refusing to uninstall {path}: it {reason}")]
    NotOurs { path: PathBuf, reason: String },
    #[error("reading the eBPF object's map definitions: {0}")]
    ObjectMaps(String),
    #[error(
        "map {map} with {entries} entries is larger than the kernel allows ({max} entries for \
         this map type); lower {flag}"
    )]
    MapTooBig {
        map: String,
        entries: u32,
        max: u32,
        flag: &'static str,
    },
    #[error(
        "the maps would take {need} of kernel memory at creation ({detail}), more than this node \
         can give ({budget_what}: {budget}); lower --max-services/--max-backends/--max-conntrack"
    )]
    MapsTooLarge {
        need: String,
        detail: String,
        budget: String,
        budget_what: String,
    },
    #[error("reading the node's memory (/proc/meminfo)")]
    NodeMemory(#[source] std::io::Error),
    #[error("pinning map {name} at {path}")]
    PinMap {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("the datapath is gone: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    DatapathLost(Vec<super::health::Loss>),
}
