//! svc-lb agent: turns Kubernetes Services and endpoints into the eBPF dataplane's maps.

pub mod cli;
pub mod dataplane;
pub mod model;
