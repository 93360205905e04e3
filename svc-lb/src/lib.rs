//! svc-lb agent: turns Kubernetes Services and endpoints into the eBPF dataplane's maps.

pub mod cli;
pub mod dataplane;
pub mod k8s;
pub mod model;
pub mod error;
pub mod maps;
pub mod reconcile;
pub mod translate;
pub mod debug;
pub mod netif;
pub mod run;
