//! The real `svc-lb run` agent in API mode inside a test topology's node namespace, talking to
//! a [`FakeApi`] that listens on 127.0.0.1 inside that same namespace (so nothing listens on a
//! root-namespace address and parallel tests never share a port).

use std::{
    ffi::OsString,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    ops::{Deref, DerefMut},
    path::PathBuf,
    time::Duration,
};

use crate::{agent::AgentProcess, kube_api::FakeApi, netns::Topology};

/// Where the fake API server listens inside the node namespace.
pub const API_ADDR: &str = "127.0.0.1:6443";
/// The agent's default health address (kube-proxy's healthz port), inside the node namespace.
pub const HEALTH_ADDR: &str = "127.0.0.1:10256";
/// The Node object name the agent is told it runs on.
pub const NODE_NAME: &str = "node-1";

/// Binds [`API_ADDR`] in the node namespace and serves `api` there.
pub fn serve_in_node(topo: &Topology, api: &FakeApi) {
    let listener = topo
        .node
        .in_ns(|| TcpListener::bind(API_ADDR))
        .unwrap_or_else(|e| panic!("bind {API_ADDR} in the node netns: {e}"));
    api.serve(listener);
}

/// A running API-mode agent; the process handling (restart, stop, `cli`, cleanup on drop) is
/// [`AgentProcess`]'s.
pub struct KubeAgent<'t> {
    topo: &'t Topology,
    pub kubeconfig: PathBuf,
    process: AgentProcess<'t>,
}

impl<'t> KubeAgent<'t> {
    /// Writes a kubeconfig for [`API_ADDR`] and starts `svc-lb run` (API mode) on every node
    /// interface of `topo`, with `extra` arguments.
    pub fn start(topo: &'t Topology, extra: &[&str]) -> KubeAgent<'t> {
        let kubeconfig = FakeApi::write_kubeconfig(
            &topo.dir.join("kubeconfig"),
            &format!("http://{API_ADDR}"),
            &[],
        );
        let mut args: Vec<OsString> = vec![
            "--kubeconfig".into(),
            kubeconfig.clone().into(),
            "--node-name".into(),
            NODE_NAME.into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        KubeAgent {
            topo,
            kubeconfig,
            process: AgentProcess::start(topo, args),
        }
    }

    /// GET `path` on the agent's health endpoint; the HTTP status code, None if unreachable.
    pub fn health(&self, path: &str) -> Option<u16> {
        let addr: SocketAddr = HEALTH_ADDR.parse().unwrap();
        let mut conn = self
            .topo
            .node
            .in_ns(move || TcpStream::connect_timeout(&addr, Duration::from_millis(500)))
            .ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        conn.read_to_string(&mut out).ok()?;
        out.split_whitespace().nth(1)?.parse().ok()
    }
}

impl<'t> Deref for KubeAgent<'t> {
    type Target = AgentProcess<'t>;
    fn deref(&self) -> &AgentProcess<'t> {
        &self.process
    }
}

impl DerefMut for KubeAgent<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.process
    }
}
