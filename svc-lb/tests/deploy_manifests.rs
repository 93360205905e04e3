//! deploy/: every manifest parses into its k8s-openapi type without unknown fields (also as
//! `kubectl kustomize deploy/` renders them), the ClusterRole grants exactly what the agent
//! calls (svc_lb::k8s::watch::API_ACCESS x READ_VERBS), and the DaemonSet's image, arguments,
//! mounts, probes, identity and node name fit the agent and the image `cargo xtask image`
//! builds.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use clap::Parser as _;
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::ServiceAccount,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::de::DeserializeOwned;
use svc_lb::{
    cli::{Cli, Command},
    k8s::watch::{API_ACCESS, READ_VERBS},
};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[derive(Default)]
struct Deploy {
    daemonsets: Vec<DaemonSet>,
    service_accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    files: Vec<String>,
}

/// Deserializes strictly: unknown fields (typos like `mountPropogation`) are errors.
fn typed<T: DeserializeOwned>(doc: serde_yaml::Value, at: &str) -> T {
    let mut unknown = Vec::new();
    let v: T = serde_ignored::deserialize(doc, |path| unknown.push(path.to_string()))
        .unwrap_or_else(|e| panic!("{at}: {e}"));
    assert!(unknown.is_empty(), "{at}: unknown fields {unknown:?}");
    v
}

fn load() -> Deploy {
    let mut d = Deploy::default();
    let mut entries: Vec<_> = fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.ends_with(".yaml"),
            "unexpected file deploy/{name} (only .yaml manifests)"
        );
        if name == "kustomization.yaml" {
            continue;
        }
        d.files.push(name.clone());
        let text = fs::read_to_string(&path).unwrap();
        d.add_documents(&text, &format!("deploy/{name}"));
    }
    d
}

impl Deploy {
    /// Parses every document of `text` as its kind (`at` names the source in failures).
    fn add_documents(&mut self, text: &str, at: &str) {
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let at = format!("{at} document {}", i + 1);
            let doc: serde_yaml::Value =
                serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{at}: {e}"));
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            match kind.as_str() {
                "DaemonSet" => self.daemonsets.push(typed(doc, &at)),
                "ServiceAccount" => self.service_accounts.push(typed(doc, &at)),
                "ClusterRole" => self.roles.push(typed(doc, &at)),
                "ClusterRoleBinding" => self.bindings.push(typed(doc, &at)),
                other => panic!("{at}: unexpected kind {other:?}"),
            }
        }
    }
}

#[test]
fn cluster_role_grants_exactly_what_the_agent_calls() {
    let d = load();
    assert_eq!(d.roles.len(), 1);
    let role = &d.roles[0];
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none(), "resourceNames in {rule:?}");
        assert!(
            rule.non_resource_urls.is_none(),
            "nonResourceURLs in {rule:?}"
        );
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    assert!(g != "*" && r != "*" && v != "*", "wildcard in {rule:?}");
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    let used: BTreeSet<(String, String, String)> = API_ACCESS
        .iter()
        .flat_map(|a| {
            READ_VERBS
                .iter()
                .map(|v| (a.group.to_string(), a.resource.to_string(), v.to_string()))
        })
        .collect();
    assert_eq!(granted, used);
}

#[test]
fn binding_ties_the_role_to_the_daemonsets_service_account() {
    let d = load();
    let (role, sa, ds) = (&d.roles[0], &d.service_accounts[0], &d.daemonsets[0]);
    assert_eq!(d.bindings.len(), 1);
    let b = &d.bindings[0];
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert_eq!(b.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(Some(&b.role_ref.name), role.metadata.name.as_ref());
    let subjects = b.subjects.as_ref().expect("subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
    let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(spec.service_account_name, sa.metadata.name);
    assert_eq!(ds.metadata.namespace, sa.metadata.namespace);
}

#[test]
fn daemonset_runs_the_agent_in_api_mode_with_probes_on_its_health_endpoint() {
    let d = load();
    assert_eq!(d.daemonsets.len(), 1);
    let ds = &d.daemonsets[0];
    let ds_spec = ds.spec.as_ref().unwrap();
    let labels = ds_spec.selector.match_labels.as_ref().unwrap();
    let tmpl_labels = ds_spec.template.metadata.as_ref().unwrap().labels.as_ref();
    for (k, v) in labels {
        assert_eq!(tmpl_labels.and_then(|l| l.get(k)), Some(v), "selector {k}");
    }
    let spec = ds_spec.template.spec.as_ref().unwrap();
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        spec.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "must tolerate every taint, like kube-proxy"
    );
    assert_eq!(spec.containers.len(), 1);
    let c = &spec.containers[0];

    // The arguments are valid for this agent, and select API mode.
    let mut argv = vec!["svc-lb".to_string()];
    argv.extend(c.args.iter().flatten().cloned());
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let Command::Run(run) = cli.command else {
        panic!("not `svc-lb run`: {argv:?}")
    };
    assert!(run.manifests.is_none(), "DaemonSet must use API mode");
    assert!(run.kube.kubeconfig.is_none(), "in-cluster config expected");
    let health = run.kube.health_addr;

    let env = c.env.as_ref().expect("env");
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME from the downward API");
    assert_eq!(field.field_path, "spec.nodeName");
    for var in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        assert!(
            env.iter().any(|e| e.name == var && e.value.is_some()),
            "{var} must point at the real API server (the kubernetes Service needs svc-lb)"
        );
    }

    for (probe, path) in [
        (c.readiness_probe.as_ref(), "/healthz"),
        (c.liveness_probe.as_ref(), "/livez"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("httpGet probe for {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::Int(health.port().into()));
        assert_eq!(get.host.as_deref(), Some(health.ip().to_string().as_str()));
    }

    // Exactly what `cargo xtask image` builds and names (xtask/src/image.rs), run through the
    // image's entrypoint (svc-lb) with these arguments.
    assert_eq!(
        c.image.as_deref(),
        Some(format!("localhost/svc-lb:{}", env!("CARGO_PKG_VERSION")).as_str())
    );
    assert!(c.command.is_none(), "use the image's entrypoint");

    // Why privileged (docs/kube-proxy-replacement.md, "Deploying"; tests/tests/e2e_container.rs
    // runs the image with this security context).
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.privileged, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));

    // The socket LB attaches to the host's cgroup v2 root: no --cgroup-path (the pod's own
    // /sys/fs/cgroup is its cgroup namespace), the host's /sys/fs/cgroup mounted elsewhere, where
    // the agent's discovery finds it above the pod's namespace (dataplane/cgroup.rs).
    assert_eq!(
        run.cgroup_path, None,
        "the agent finds the host's cgroup v2 itself"
    );
    let cgroup = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "cgroup")
        .expect("a mount of the host's cgroup hierarchy");
    assert_ne!(cgroup.mount_path, "/sys/fs/cgroup", "that is the pod's own");
    assert_eq!(cgroup.read_only, Some(true));
    let cg_vol = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == cgroup.name)
        .expect("cgroup volume");
    assert_eq!(
        cg_vol.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/sys/fs/cgroup")
    );
    let bpf = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("bpffs mount");
    assert_eq!(bpf.mount_propagation.as_deref(), Some("Bidirectional"));
    let vol = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == bpf.name)
        .expect("bpffs volume");
    assert_eq!(
        vol.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/sys/fs/bpf")
    );
    // The agent lock and the sysctl record must be the host's, shared by every svc-lb pod.
    let state = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == svc_lb::dataplane::state::STATE_ROOT)
        .expect("/run/svc-lb mount");
    let vol = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == state.name)
        .expect("state volume");
    assert_eq!(
        vol.host_path.as_ref().map(|h| h.path.as_str()),
        Some(svc_lb::dataplane::state::STATE_ROOT)
    );
}

#[test]
fn kustomization_lists_every_manifest() {
    let d = load();
    let text = fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap();
    let k: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let listed: BTreeSet<String> = k["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, d.files.iter().cloned().collect());
}

/// `kubectl kustomize deploy/` renders exactly the documents of the files, each valid as its
/// kind.
#[test]
fn kubectl_kustomize_builds_the_same_documents() {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy_dir())
        .output()
        .unwrap_or_else(|e| panic!("run kubectl (needed for this test): {e}"));
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut built = Deploy::default();
    built.add_documents(
        &String::from_utf8_lossy(&out.stdout),
        "kubectl kustomize deploy/",
    );
    let files = load();
    let names = |d: &Deploy| {
        let mut n: Vec<String> = d
            .daemonsets
            .iter()
            .map(|x| format!("DaemonSet {:?}", x.metadata.name))
            .chain(
                d.service_accounts
                    .iter()
                    .map(|x| format!("ServiceAccount {:?}", x.metadata.name)),
            )
            .chain(
                d.roles
                    .iter()
                    .map(|x| format!("ClusterRole {:?}", x.metadata.name)),
            )
            .chain(
                d.bindings
                    .iter()
                    .map(|x| format!("ClusterRoleBinding {:?}", x.metadata.name)),
            )
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&built), names(&files));
    assert_eq!(built.daemonsets, files.daemonsets);
}
