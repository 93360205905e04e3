//! Connecting to the API server: kubeconfig inference like kubectl's.
//!
//! - `--kubeconfig PATH`: that file (its current-context, or `--context`);
//! - else `$KUBECONFIG` (a list of files, merged) or `~/.kube/config`, with `--context`;
//! - else, without `--context`, the in-cluster service account (what the DaemonSet uses).
//!
//! Nothing here talks to the server: an unreachable API server is the watchers' business
//! (they retry with backoff), a missing or broken kubeconfig is a startup error.

use std::path::{Path, PathBuf};

use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig, KubeconfigError},
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot read kubeconfig {}", path.display())]
    ReadKubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error("invalid kubeconfig{}", context.as_deref().map(|c| format!(" (context {c})")).unwrap_or_default())]
    Kubeconfig {
        context: Option<String>,
        #[source]
        source: KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration: no --kubeconfig, no usable $KUBECONFIG or ~/.kube/config, \
         and not running in a pod with a service account"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes client")]
    Build(#[source] kube::Error),
}

/// Where the client configuration came from (logged at startup).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientInfo {
    pub server: String,
    pub source: String,
}

/// Loads the configuration as kubectl would and builds a client (no request is made).
pub async fn client(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
) -> Result<(Client, ClientInfo), ClientError> {
    let options = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..Default::default()
    };
    let kube_err = |source| ClientError::Kubeconfig {
        context: options.context.clone(),
        source,
    };
    let (config, source) = match (kubeconfig, context) {
        (Some(path), _) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| ClientError::ReadKubeconfig {
                path: path.to_path_buf(),
                source,
            })?;
            let config = Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(kube_err)?;
            (config, format!("kubeconfig {}", path.display()))
        }
        // An explicit context only makes sense with a kubeconfig: no in-cluster fallback.
        (None, Some(_)) => (
            Config::from_kubeconfig(&options).await.map_err(kube_err)?,
            "kubeconfig ($KUBECONFIG or ~/.kube/config)".to_string(),
        ),
        (None, None) => {
            let config = Config::infer().await.map_err(ClientError::Infer)?;
            let source = if config.root_cert_file.is_some() {
                "in-cluster service account"
            } else {
                "kubeconfig ($KUBECONFIG or ~/.kube/config)"
            };
            (config, source.to_string())
        }
    };
    let info = ClientInfo {
        server: config.cluster_url.to_string(),
        source,
    };
    let client = Client::try_from(config).map_err(ClientError::Build)?;
    Ok((client, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kubeconfig(dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: a\nclusters:\n\
             - name: a\n  cluster:\n    server: http://127.0.0.1:1111\n\
             - name: b\n  cluster:\n    server: https://10.0.0.1:6443\n    insecure-skip-tls-verify: true\n\
             contexts:\n- name: a\n  context: {cluster: a, user: u}\n\
             - name: b\n  context: {cluster: b, user: u}\n\
             users:\n- name: u\n  user: {token: t0k}\n",
        )
        .unwrap();
        path
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("svc-lb-client-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn explicit_kubeconfig_and_context() {
        let d = tempdir("ctx");
        let kc = kubeconfig(&d);
        let (_, info) = client(Some(&kc), None).await.unwrap();
        assert_eq!(info.server, "http://127.0.0.1:1111/");
        // https + rustls/ring: building the TLS connector must work too.
        let (_, info) = client(Some(&kc), Some("b")).await.unwrap();
        assert_eq!(info.server, "https://10.0.0.1:6443/");
        let err = client(Some(&kc), Some("nope")).await.err().unwrap();
        assert!(matches!(err, ClientError::Kubeconfig { .. }), "{err:?}");
        let err = client(Some(&d.join("missing")), None).await.err().unwrap();
        assert!(matches!(err, ClientError::ReadKubeconfig { .. }), "{err:?}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
