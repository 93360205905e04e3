//! Loading Service, EndpointSlice, Pod and Node objects from a directory of manifests, as users
//! write them or as `kubectl get -o yaml|json` prints them.
//!
//! Every problem is reported against its file, document and object, and only that document (or
//! List item) is dropped: one typo must not take every Service of the node down.

use std::{
    collections::{BTreeSet, HashMap},
    fmt, fs, io,
    path::{Path, PathBuf},
    sync::Mutex,
};

use k8s_openapi::{
    api::{
        core::v1::{Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::{debug, warn};

use super::{
    describe,
    documents::{Document, json_documents, yaml_documents},
};

/// The objects svc-lb understands, in file order (sorted file names, then document order).
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
}

/// Where an object came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    /// 1-based index among the file's non-empty documents.
    pub document: usize,
    /// 1-based line where the document starts.
    pub line: usize,
    /// Index in a List's `items`.
    pub item: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: document {} (line {})",
            self.file.display(),
            self.document,
            self.line
        )?;
        if let Some(i) = self.item {
            write!(f, ", items[{i}]")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest directory {}: {source}", dir.display())]
    ReadDir { dir: PathBuf, source: io::Error },
    #[error("cannot read manifest {}: {source}", file.display())]
    ReadFile { file: PathBuf, source: io::Error },
    /// The document is not valid YAML/JSON.
    #[error("{at}: malformed document: {reason}")]
    Malformed { at: Location, reason: String },
    /// The document parses but is not a valid object (no apiVersion/kind, wrong field types…).
    #[error("{at}: {object}: {reason}")]
    Invalid {
        at: Location,
        object: String,
        reason: String,
    },
    /// Same kind, namespace and name as an object loaded before; the first one is kept.
    #[error("{at}: {object}: duplicate of the object at {first}, which is kept")]
    Duplicate {
        at: Location,
        object: String,
        first: Box<Location>,
    },
}

impl ManifestError {
    /// The file the problem is in.
    pub fn file(&self) -> &Path {
        match self {
            ManifestError::ReadDir { dir, .. } => dir,
            ManifestError::ReadFile { file, .. } => file,
            ManifestError::Malformed { at, .. }
            | ManifestError::Invalid { at, .. }
            | ManifestError::Duplicate { at, .. } => &at.file,
        }
    }
}

/// A field present in a manifest that the object's schema does not know (usually a typo).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownField {
    pub at: Location,
    pub object: String,
    /// Dotted path, e.g. `spec.selecter`.
    pub path: String,
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file of `dir` (not recursive, sorted by name;
/// hidden files are ignored). `Err` only when the directory itself cannot be read.
pub fn load_dir(dir: &Path) -> Result<(Objects, Vec<ManifestError>), ManifestError> {
    let loaded = Loader::load_dir(dir)?;
    Ok((loaded.objects, loaded.errors))
}

/// The files [`load_dir`] reads, in the order it reads them: `*.yaml`, `*.yml`, `*.json`
/// regular files (following symlinks), not hidden, sorted by name.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read_dir_err = |source| ManifestError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_dir_err)? {
        let path = entry.map_err(read_dir_err)?.path();
        // fs::metadata follows symlinks (ConfigMap volumes are symlink farms).
        if is_manifest_name(&path) && fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Everything a load produced, including warnings (tests look at those).
#[derive(Debug, Default)]
pub(crate) struct Loader {
    pub objects: Objects,
    pub errors: Vec<ManifestError>,
    pub unknown_fields: Vec<UnknownField>,
    /// First location of each (kind, namespace, name); the manifest cache reads it to find
    /// duplicates across files it did not re-read.
    pub(crate) seen: HashMap<(&'static str, String, String), Location>,
}

impl Loader {
    pub(crate) fn load_dir(dir: &Path) -> Result<Loader, ManifestError> {
        let mut loader = Loader::default();
        for file in manifest_files(dir)? {
            loader.load_file(&file);
        }
        Ok(loader)
    }

    pub(crate) fn load_file(&mut self, file: &Path) {
        let text = match fs::read_to_string(file) {
            Ok(t) => t,
            Err(source) => {
                self.error(ManifestError::ReadFile {
                    file: file.to_path_buf(),
                    source,
                });
                return;
            }
        };
        self.load_text(file, &text);
    }

    /// Loads manifest text as if read from `file` (whose extension picks JSON or YAML).
    pub(crate) fn load_text(&mut self, file: &Path, text: &str) {
        let is_json = file
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let docs = if is_json {
            json_documents(text)
        } else {
            yaml_documents(text)
        };
        for Document { index, line, value } in docs {
            let at = Location {
                file: file.to_path_buf(),
                document: index,
                line,
                item: None,
            };
            match value {
                Ok(value) => self.load_value(value, at),
                Err(reason) => self.error(ManifestError::Malformed { at, reason }),
            }
        }
    }

    fn load_value(&mut self, value: Value, at: Location) {
        if value.is_null() {
            return; // `~` or `null` alone: nothing to load.
        }
        let (api_version, kind) = match type_meta(&value) {
            Ok(tm) => tm,
            Err(reason) => {
                let object = describe_value("object", &value);
                return self.error(ManifestError::Invalid { at, object, reason });
            }
        };
        if kind.ends_with("List") && value.get("items").is_some() {
            return self.load_list(value, &api_version, &kind, at);
        }
        self.load_object(value, &api_version, &kind, at);
    }

    /// `kind: List` (kubectl) or a typed list such as `ServiceList` (the API), whose items omit
    /// apiVersion and kind.
    fn load_list(&mut self, value: Value, api_version: &str, kind: &str, at: Location) {
        let Some(Value::Array(items)) = value.get("items").cloned() else {
            let object = describe_value(kind, &value);
            let reason = "items: expected a sequence".to_string();
            return self.error(ManifestError::Invalid { at, object, reason });
        };
        let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
        for (i, mut item) in items.into_iter().enumerate() {
            let at = Location {
                item: Some(i),
                ..at.clone()
            };
            if let (Some(item_kind), Value::Object(map)) = (item_kind, &mut item) {
                map.entry("apiVersion")
                    .or_insert_with(|| api_version.into());
                map.entry("kind").or_insert_with(|| item_kind.into());
            }
            match type_meta(&item) {
                Ok((api_version, kind)) => self.load_object(item, &api_version, &kind, at),
                Err(reason) => {
                    let object = describe_value("object", &item);
                    self.error(ManifestError::Invalid { at, object, reason });
                }
            }
        }
    }

    fn load_object(&mut self, value: Value, api_version: &str, kind: &str, at: Location) {
        match (api_version, kind) {
            ("v1", "Service") => {
                if let Some(mut svc) = self.decode::<Service>(value, kind, &at) {
                    default_namespace(&mut svc.metadata);
                    if self.first_of_its_name("Service", &svc.metadata, &at) {
                        self.objects.services.push(svc);
                    }
                }
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                if let Some(mut slice) = self.decode::<EndpointSlice>(value, kind, &at) {
                    default_namespace(&mut slice.metadata);
                    if self.first_of_its_name("EndpointSlice", &slice.metadata, &at) {
                        self.objects.endpoint_slices.push(slice);
                    }
                }
            }
            ("v1", "Pod") => {
                if let Some(mut pod) = self.decode::<Pod>(value, kind, &at) {
                    default_namespace(&mut pod.metadata);
                    if self.first_of_its_name("Pod", &pod.metadata, &at) {
                        self.objects.pods.push(pod);
                    }
                }
            }
            ("v1", "Node") => {
                if let Some(node) = self.decode::<Node>(value, kind, &at)
                    && self.first_of_its_name("Node", &node.metadata, &at)
                {
                    self.objects.nodes.push(node);
                }
            }
            _ => debug!(
                at = %at,
                object = %describe_value(kind, &value),
                api_version,
                "skipping a kind svc-lb does not use"
            ),
        }
    }

    /// Decodes into the typed object, reporting wrong types with their field path and logging
    /// fields the schema does not have.
    fn decode<T: DeserializeOwned>(
        &mut self,
        value: Value,
        kind: &str,
        at: &Location,
    ) -> Option<T> {
        let object = describe_value(kind, &value);
        let mut unknown = Vec::new();
        let mut record = |path: serde_ignored::Path<'_>| unknown.push(field_path(&path));
        let de = serde_ignored::Deserializer::new(value, &mut record);
        let decoded: Result<T, _> = serde_path_to_error::deserialize(de);
        match decoded {
            Ok(obj) => {
                unknown.sort();
                for path in unknown {
                    if first_warning(&at.file, &object, &path) {
                        warn!(at = %at, object = %object, field = %path, "unknown field ignored (typo?)");
                    } else {
                        debug!(at = %at, object = %object, field = %path, "unknown field ignored (typo?)");
                    }
                    self.unknown_fields.push(UnknownField {
                        at: at.clone(),
                        object: object.clone(),
                        path,
                    });
                }
                Some(obj)
            }
            Err(e) => {
                let path = e.path().to_string();
                let reason = if path == "." {
                    e.into_inner().to_string()
                } else {
                    format!("{path}: {}", e.into_inner())
                };
                self.error(ManifestError::Invalid {
                    at: at.clone(),
                    object,
                    reason,
                });
                None
            }
        }
    }

    /// Records the object's identity; false (and an error) when it was already loaded.
    fn first_of_its_name(&mut self, kind: &'static str, meta: &ObjectMeta, at: &Location) -> bool {
        // Unnamed objects cannot collide; translate reports them.
        let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
            return true;
        };
        let ns = meta.namespace.clone().unwrap_or_default();
        let object = describe(kind, (kind != "Node").then_some(ns.as_str()), Some(&name));
        match self.seen.get(&(kind, ns.clone(), name.clone())) {
            Some(first) => {
                let first = Box::new(first.clone());
                self.error(ManifestError::Duplicate {
                    at: at.clone(),
                    object,
                    first,
                });
                false
            }
            None => {
                self.seen.insert((kind, ns, name), at.clone());
                true
            }
        }
    }

    fn error(&mut self, e: ManifestError) {
        // Returned to the caller, which reports it (once, not on every rescan).
        debug!(error = %e, "manifest problem; skipping");
        self.errors.push(e);
    }
}

/// Whether this unknown field has not been warned about yet in this process: the agent reloads
/// the directory on every change and periodically, and one typo should be one warning.
fn first_warning(file: &Path, object: &str, path: &str) -> bool {
    static WARNED: Mutex<BTreeSet<(PathBuf, String, String)>> = Mutex::new(BTreeSet::new());
    let mut warned = WARNED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    warned.insert((file.to_path_buf(), object.to_owned(), path.to_owned()))
}

fn is_manifest_name(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    // Hidden files include editor swap/lock files (.x.swp, .#x) and `..data` of ConfigMaps.
    if name.starts_with('.') {
        return false;
    }
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        ["yaml", "yml", "json"]
            .iter()
            .any(|x| e.eq_ignore_ascii_case(x))
    })
}

fn type_meta(value: &Value) -> Result<(String, String), String> {
    let Value::Object(map) = value else {
        return Err(format!("expected an object, found {}", value_type(value)));
    };
    let field = |name: &str| match map.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        None | Some(Value::Null) => Err(format!("missing {name}")),
        Some(Value::String(_)) => Err(format!("empty {name}")),
        Some(other) => Err(format!(
            "{name}: expected a string, found {}",
            value_type(other)
        )),
    };
    Ok((field("apiVersion")?, field("kind")?))
}

fn value_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a sequence",
        Value::Object(_) => "a mapping",
    }
}

/// `Kind ns/name` from an undecoded value, as far as it can be known.
fn describe_value(kind: &str, value: &Value) -> String {
    if !value.is_object() {
        return "top level".into();
    }
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or(kind);
    let meta = value.get("metadata");
    let field = |f: &str| meta.and_then(|m| m.get(f)).and_then(Value::as_str);
    let ns = match kind {
        "Node" | "List" | "Namespace" => None,
        _ => Some(
            field("namespace")
                .filter(|n| !n.is_empty())
                .unwrap_or("default"),
        ),
    };
    describe(kind, ns, field("name"))
}

/// `spec.ports[0].targetport`, the notation of the type errors (serde_path_to_error).
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => match field_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

fn default_namespace(meta: &mut ObjectMeta) {
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some("default".into());
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn data(dir: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(dir)
    }

    fn names<'a>(metas: impl Iterator<Item = &'a ObjectMeta>) -> Vec<String> {
        metas
            .map(|m| {
                format!(
                    "{}/{}",
                    m.namespace.as_deref().unwrap_or("-"),
                    m.name.as_deref().unwrap_or("-")
                )
            })
            .collect()
    }

    #[test]
    fn loads_a_kubectl_get_list() {
        let (objects, errors) = load_dir(&data("kubectl-list")).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            names(objects.services.iter().map(|s| &s.metadata)),
            ["default/kubernetes", "shop/cart"]
        );
        assert_eq!(
            names(objects.endpoint_slices.iter().map(|s| &s.metadata)),
            ["default/kubernetes", "shop/cart-x7k2p", "shop/cart-v6q9z"]
        );
        assert_eq!(
            names(objects.pods.iter().map(|p| &p.metadata)),
            ["shop/cart-7d9f8b6c5-abcde", "shop/cart-7d9f8b6c5-zzzzz"]
        );
        let slice = &objects.endpoint_slices[1];
        let conditions = slice.endpoints[1].conditions.as_ref().unwrap();
        assert_eq!(
            (conditions.ready, conditions.serving, conditions.terminating),
            (Some(false), Some(true), Some(true))
        );
        assert!(objects.nodes.is_empty());
    }

    #[test]
    fn loads_multi_document_yaml_and_json_and_skips_other_kinds() {
        let loaded = Loader::load_dir(&data("services")).unwrap();
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        assert!(
            loaded.unknown_fields.is_empty(),
            "{:?}",
            loaded.unknown_fields
        );
        let objects = loaded.objects;
        // ext.json sorts before services.yaml; Namespace, ConfigMap and Deployment are skipped.
        assert_eq!(
            names(objects.services.iter().map(|s| &s.metadata)),
            [
                "demo/ext",
                "demo/db-alias",
                "demo/db",
                "demo/web",
                "demo/lb",
                "demo/dual",
                "demo/v6only",
                "demo/mixed",
                "demo/manual",
                "demo/noslice"
            ]
        );
        assert_eq!(objects.endpoint_slices.len(), 1);
        assert_eq!(objects.pods.len(), 10);
        assert_eq!(
            names(objects.nodes.iter().map(|n| &n.metadata)),
            ["-/node-1", "-/node-2"]
        );
    }

    #[test]
    fn objects_without_namespace_land_in_default() {
        let (objects, _) = load_dir(&data("broken")).unwrap();
        let ok1 = objects
            .services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some("ok1"));
        assert_eq!(ok1.unwrap().metadata.namespace.as_deref(), Some("default"));
    }

    #[test]
    fn broken_documents_are_reported_and_the_rest_loads() {
        let loaded = Loader::load_dir(&data("broken")).unwrap();
        // Hidden, `~` backup and non-manifest files are not read at all.
        assert_eq!(
            names(loaded.objects.services.iter().map(|s| &s.metadata)),
            [
                "default/ok1",
                "prod/ok2",
                "default/typo",
                "default/from-list"
            ]
        );
        let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        let dir = data("broken");
        let f = |name: &str| dir.join(name).display().to_string();
        assert_eq!(errors.len(), 6, "{errors:#?}");
        // The line is the file's (the unclosed `[` is noticed at the next key).
        assert_eq!(
            errors[0],
            format!(
                "{}: document 2 (line 10): malformed document: line 17: did not find expected \
                 ',' or ']'",
                f("01-multi.yaml")
            )
        );
        assert_eq!(
            errors[1],
            format!(
                "{}: document 5 (line 38): object default/no-kind: missing apiVersion",
                f("01-multi.yaml")
            )
        );
        assert_eq!(
            errors[2],
            format!(
                "{}: document 6 (line 43): Service default/wrong-type: spec.ports[0].port: \
                 invalid type: string \"eighty\", expected i32",
                f("01-multi.yaml")
            )
        );
        assert_eq!(
            errors[3],
            format!(
                "{}: document 1 (line 1), items[1]: Service default/ok1: duplicate of the object \
                 at {}: document 1 (line 1), which is kept",
                f("03-list.json"),
                f("01-multi.yaml")
            )
        );
        assert!(
            errors[4].starts_with(&format!(
                "{}: document 1 (line 1): malformed document: EOF",
                f("04-truncated.json")
            )),
            "{}",
            errors[4]
        );
        assert_eq!(
            errors[5],
            format!(
                "{}: document 1 (line 1): top level: expected an object, found a string",
                f("05-scalar.yaml")
            )
        );
        assert!(matches!(loaded.errors[0], ManifestError::Malformed { .. }));
        assert!(matches!(loaded.errors[3], ManifestError::Duplicate { .. }));
        assert_eq!(loaded.errors[4].file(), dir.join("04-truncated.json"));
    }

    #[test]
    fn unknown_fields_are_reported_and_the_object_still_loads() {
        let mut loader = Loader::default();
        loader.load_file(&data("broken").join("02-typo.yaml"));
        assert!(loader.errors.is_empty());
        let paths: Vec<&str> = loader
            .unknown_fields
            .iter()
            .map(|u| u.path.as_str())
            .collect();
        assert_eq!(
            paths,
            [
                "metadata.lables",
                "spec.ports[0].targetport",
                "spec.selecter"
            ]
        );
        assert_eq!(loader.unknown_fields[0].object, "Service default/typo");
        let svc = &loader.objects.services[0];
        assert_eq!(svc.spec.as_ref().unwrap().selector, None);
    }

    #[test]
    fn only_visible_manifest_files_are_read_in_name_order() {
        let files: Vec<String> = manifest_files(&data("broken"))
            .unwrap()
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        // Not .hidden.yaml, 02-typo.yaml~ (editor backup) or notes.txt.
        assert_eq!(
            files,
            [
                "01-multi.yaml",
                "02-typo.yaml",
                "03-list.json",
                "04-truncated.json",
                "05-scalar.yaml"
            ]
        );
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let err = load_dir(&data("does-not-exist")).unwrap_err();
        assert!(matches!(err, ManifestError::ReadDir { .. }), "{err}");
    }

    #[test]
    fn examples_load_without_problems() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let loaded = Loader::load_dir(&dir).unwrap();
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        assert!(
            loaded.unknown_fields.is_empty(),
            "{:?}",
            loaded.unknown_fields
        );
        let o = loaded.objects;
        assert_eq!(
            names(o.services.iter().map(|s| &s.metadata)),
            [
                "default/frontend-svc",
                "default/web-service",
                "default/dns-echo"
            ]
        );
        assert_eq!(
            names(o.pods.iter().map(|p| &p.metadata)),
            ["default/pod-a", "default/pod-b", "default/pod-c"]
        );
        assert_eq!(names(o.nodes.iter().map(|n| &n.metadata)), ["-/node-1"]);
        assert!(o.endpoint_slices.is_empty());
    }
}
