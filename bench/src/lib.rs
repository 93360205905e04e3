//! `svc-lb-bench`: measures svc-lb next to faithful kube-proxy baselines (iptables mode through
//! iptables-legacy and iptables-nft, nftables mode through nft) on the same machine in one run.
//!
//! - [`scenario`]: synthetic Services/endpoints, as svc-lb's desired state and as kube-proxy
//!   would see them.
//! - [`kubeproxy`]: the rules kube-proxy's iptables and nftables proxiers write for them.
//! - The benchmarks, one module per benchmark or per pair that shares its runs: [`b1`] per-packet
//!   cost, [`b2_b3`] first-packet latency and throughput through network namespaces, [`b4`]
//!   programming cost, [`b5_b6`] convergence and memory of the real agent. [`report`] prints the
//!   table and writes JSON.

pub mod b1;
pub mod b2_b3;
pub mod b4;
pub mod b5_b6;
pub mod kubeproxy;
pub mod ns;
pub mod report;
pub mod scenario;
pub mod stats;

/// Why a benchmark could not run or produced an inconsistent result.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Ns(#[from] ns::NsError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Bpf(String),
    /// A measurement failed its own sanity check (e.g. the rules did not all load).
    #[error("check failed: {0}")]
    Check(String),
}

impl BenchError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }

    pub fn bpf(what: &str, e: impl std::fmt::Display) -> BenchError {
        BenchError::Bpf(format!("{what}: {e}"))
    }
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;
