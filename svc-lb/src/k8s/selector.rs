//! Service selectors: plain label equality, as the EndpointSlice controller applies them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Service};

/// Whether `selector` selects an object with `labels`. An absent or empty selector selects
/// nothing: a Service without one has its endpoints managed externally (EndpointSlices),
/// unlike label-selector queries where empty means everything.
pub fn matches(
    selector: Option<&BTreeMap<String, String>>,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return false;
    };
    let Some(labels) = labels else { return false };
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether the Service's selector picks the Pod (namespaces are compared too).
pub fn selects(service: &Service, pod: &Pod) -> bool {
    super::namespace(&service.metadata) == super::namespace(&pod.metadata)
        && matches(
            service.spec.as_ref().and_then(|s| s.selector.as_ref()),
            pod.metadata.labels.as_ref(),
        )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{Pod, Service};

    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn equality_on_every_selector_key() {
        let labels = map(&[
            ("app", "web"),
            ("tier", "front"),
            ("pod-template-hash", "7d9f"),
        ]);
        assert!(matches(Some(&map(&[("app", "web")])), Some(&labels)));
        assert!(matches(
            Some(&map(&[("app", "web"), ("tier", "front")])),
            Some(&labels)
        ));
        assert!(!matches(
            Some(&map(&[("app", "web"), ("tier", "back")])),
            Some(&labels)
        ));
        assert!(!matches(Some(&map(&[("app", "Web")])), Some(&labels)));
        assert!(!matches(Some(&map(&[("version", "")])), Some(&labels)));
        assert!(!matches(Some(&map(&[("app", "web")])), None));
    }

    #[test]
    fn empty_or_absent_selector_selects_nothing() {
        let labels = map(&[("app", "web")]);
        assert!(!matches(None, Some(&labels)));
        assert!(!matches(Some(&BTreeMap::new()), Some(&labels)));
        assert!(!matches(Some(&BTreeMap::new()), None));
    }

    #[test]
    fn service_selects_pods_of_its_namespace_only() {
        let svc: Service = serde_yaml::from_str(
            "metadata: {name: web, namespace: shop}\nspec: {selector: {app: web}}",
        )
        .unwrap();
        let pod = |ns: &str| -> Pod {
            serde_yaml::from_str(&format!(
                "metadata: {{name: p, namespace: {ns}, labels: {{app: web, x: y}}}}"
            ))
            .unwrap()
        };
        assert!(selects(&svc, &pod("shop")));
        assert!(!selects(&svc, &pod("default")));
        let default_svc: Service =
            serde_yaml::from_str("metadata: {name: web}\nspec: {selector: {app: web}}").unwrap();
        assert!(selects(&default_svc, &pod("default")));
    }
}
