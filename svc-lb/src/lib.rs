//! svc-lb agent: turns Kubernetes Services and endpoints into the eBPF dataplane's maps.

pub mod cli;
pub mod dataplane;
pub mod error;
pub mod inspect;
pub mod k8s;
pub mod kube_proxy;
pub mod maps;
pub mod model;
pub mod netif;
pub mod reconcile;
pub mod run;
pub mod serve;
pub mod translate;
