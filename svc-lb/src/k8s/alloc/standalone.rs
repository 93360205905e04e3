//! The allocator as standalone mode's agent runs it: on every manifest read that changed a
//! Service, over all Services, with the record loaded at start and saved when it changes.
//! Unchanged Services come out as the same `Arc`s as last time, so the incremental translator
//! recognises them without comparing values.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Service;

use super::{
    AllocConfig, Allocation, DeniedFrontend, Input, Problem, Record, RecordError, RecordStore,
    ServiceKey, allocate, load_record,
};
use crate::k8s::manifest::{Loader, Location, manifest_files};

/// What one [`StandaloneAllocator::update`] produced.
#[derive(Debug, Default)]
pub struct Update {
    /// The Services to translate, in input order (see [`Allocation::services`]).
    pub services: Vec<Arc<Service>>,
    /// Every problem, with files (sorted by Service).
    pub problems: Vec<Problem>,
    pub denied: std::collections::BTreeSet<DeniedFrontend>,
    /// The record could not be saved (allocation went on; the next change retries).
    pub save_error: Option<RecordError>,
}

pub struct StandaloneAllocator {
    cfg: AllocConfig,
    store: Option<RecordStore>,
    record: Record,
    /// Whether `record` differs from what is on disk (a failed save is retried).
    dirty: bool,
    /// The last input, to skip a run when no Service changed.
    last_input: Vec<Arc<Service>>,
    last: Update,
    /// Last output by key, to hand out the same `Arc` for an unchanged result.
    last_by_key: HashMap<ServiceKey, Arc<Service>>,
    /// The manifest directory, for [`Self::update_from_dir`].
    dir: Option<PathBuf>,
    /// Where each Service named in a problem was found, for that version of it (the `Arc`'s
    /// address): a persisting problem does not re-read the directory on every change.
    located: HashMap<ServiceKey, (usize, Option<Location>)>,
}

impl StandaloneAllocator {
    /// Loads the record from `store` (None: keep it in memory only). The error says why an
    /// existing record could not be used (it was moved aside if it was invalid).
    pub fn new(cfg: AllocConfig, store: Option<RecordStore>) -> (Self, Option<RecordError>) {
        let (record, err) = match &store {
            Some(store) => load_record(store),
            None => (Record::new(), None),
        };
        let alloc = StandaloneAllocator {
            cfg,
            store,
            record,
            dirty: false,
            last_input: Vec::new(),
            last: Update::default(),
            last_by_key: HashMap::new(),
            dir: None,
            located: HashMap::new(),
        };
        (alloc, err)
    }

    /// Finds Services named in problems in the manifest directory `dir`.
    pub fn reading(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// [`Self::update`], locating problems in the directory given to [`Self::reading`]: the
    /// manifest cache does not keep where objects are (it would cost more memory than the
    /// objects' names), so files are parsed again, once per version of a Service in a problem.
    pub fn update_from_dir(&mut self, services: &[Arc<Service>]) -> Option<&Update> {
        let dir = self.dir.clone();
        let mut located = std::mem::take(&mut self.located);
        let versions: HashMap<ServiceKey, usize> = services
            .iter()
            .map(|s| (ServiceKey::of(s), Arc::as_ptr(s) as usize))
            .collect();
        let mut still = HashMap::new();
        let locate = |key: &ServiceKey| {
            let version = versions.get(key).copied().unwrap_or(0);
            let at = match located.remove(key) {
                Some((v, at)) if v == version => at,
                _ => dir.as_deref().and_then(|d| locate_in_dir(d, key)),
            };
            still.insert(key.clone(), (version, at.clone()));
            at
        };
        let ran = self.update(services, locate).is_some();
        self.located = if ran { still } else { located };
        ran.then_some(&self.last)
    }

    pub fn record(&self) -> &Record {
        &self.record
    }

    /// The result of the last [`Self::update`] that ran.
    pub fn current(&self) -> &Update {
        &self.last
    }

    /// Allocates for `services` (all of them, as read). `locate` finds where a Service was
    /// read from; it is called only for Services named in a problem. Returns None when
    /// `services` are the same objects as last time (nothing to do).
    pub fn update(
        &mut self,
        services: &[Arc<Service>],
        mut locate: impl FnMut(&ServiceKey) -> Option<Location>,
    ) -> Option<&Update> {
        let same = services.len() == self.last_input.len()
            && services
                .iter()
                .zip(&self.last_input)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if same && !self.dirty {
            return None;
        }
        if !same {
            let mut a: Allocation = allocate(
                services.iter().map(|s| Input {
                    service: s,
                    origin: None,
                }),
                &self.record,
                &self.cfg,
            );
            a.locate(&mut locate);
            let mut by_key = HashMap::with_capacity(a.services.len());
            let out: Vec<Arc<Service>> = a
                .services
                .into_iter()
                .map(|svc| {
                    let key = ServiceKey::of(&svc);
                    let arc = match self.last_by_key.get(&key) {
                        Some(prev) if **prev == svc => prev.clone(),
                        _ => Arc::new(svc),
                    };
                    by_key.insert(key, arc.clone());
                    arc
                })
                .collect();
            self.last_by_key = by_key;
            self.last_input = services.to_vec();
            if a.record != self.record {
                self.record = a.record;
                self.dirty = true;
            }
            self.last = Update {
                services: out,
                problems: a.problems,
                denied: a.denied,
                save_error: None,
            };
        }
        self.last.save_error = None;
        if self.dirty {
            match &self.store {
                Some(store) => match store.save(&self.record) {
                    Ok(()) => self.dirty = false,
                    Err(e) => self.last.save_error = Some(e),
                },
                None => self.dirty = false,
            }
        }
        Some(&self.last)
    }
}

/// Where Service `key` is defined among the manifests of `dir` (file, document, line).
pub fn locate_in_dir(dir: &Path, key: &ServiceKey) -> Option<Location> {
    let wanted = ("Service", key.namespace.clone(), key.name.clone());
    for file in manifest_files(dir).ok()? {
        let mut loader = Loader::default();
        loader.load_file(&file);
        if let Some(at) = loader.seen.get(&wanted) {
            return Some(at.clone());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, extra: &str) -> Arc<Service> {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  ports:\n  - port: \
             80\n{extra}"
        );
        Arc::new(serde_yaml::from_str(&yaml).unwrap())
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("svc-lb-standalone-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn unchanged_input_is_skipped_and_unchanged_services_keep_their_arcs() {
        let (mut alloc, err) = StandaloneAllocator::new(AllocConfig::default(), None);
        assert!(err.is_none());
        let (a, b) = (svc("a", ""), svc("b", ""));
        let first = alloc.update(&[a.clone(), b.clone()], |_| None).unwrap();
        let (a1, b1) = (first.services[0].clone(), first.services[1].clone());
        assert!(alloc.update(&[a.clone(), b.clone()], |_| None).is_none());
        // b edited: a's output is the same Arc, b's is new.
        let b2 = svc("b", "  type: NodePort\n");
        let second = alloc.update(&[a.clone(), b2], |_| None).unwrap();
        assert!(Arc::ptr_eq(&second.services[0], &a1));
        assert!(!Arc::ptr_eq(&second.services[1], &b1));
        assert_eq!(
            second.services[1].spec.as_ref().unwrap().cluster_ip,
            b1.spec.as_ref().unwrap().cluster_ip
        );
    }

    #[test]
    fn problems_name_the_file_document_and_line_found_in_the_directory() {
        let dir = temp_dir("locate");
        std::fs::create_dir_all(&dir).unwrap();
        let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: ok\nspec:\n  ports:\n  - port: \
                    80\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: zzz-dup\nspec:\n  \
                    clusterIP: 10.96.0.10\n  ports:\n  - port: 80\n";
        std::fs::write(dir.join("b.yaml"), text).unwrap();
        std::fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: owner\nspec:\n  clusterIP: \
             10.96.0.10\n  ports:\n  - port: 80\n",
        )
        .unwrap();
        let (alloc, _) = StandaloneAllocator::new(AllocConfig::default(), None);
        let mut alloc = alloc.reading(&dir);
        let (owner, ok, dup) = (
            svc("owner", "  clusterIP: 10.96.0.10\n"),
            svc("ok", ""),
            svc("zzz-dup", "  clusterIP: 10.96.0.10\n"),
        );
        let out = alloc.update_from_dir(&[owner, ok, dup]).unwrap();
        let d = dir.display();
        assert_eq!(
            out.problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec![format!(
                "{d}/b.yaml: document 2 (line 9): Service default/zzz-dup: spec.clusterIPs[0]: \
                 10.96.0.10 is already used by Service default/owner ({d}/a.yaml: document 1 \
                 (line 1)); no IPv4 ClusterIP frontends"
            )]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_record_is_saved_and_read_back_by_the_next_agent() {
        let dir = temp_dir("restart");
        let a = svc("a", "  type: NodePort\n");
        let (mut first, err) =
            StandaloneAllocator::new(AllocConfig::default(), Some(RecordStore::new(&dir)));
        assert!(err.is_none());
        let out = first.update(std::slice::from_ref(&a), |_| None).unwrap();
        assert!(out.save_error.is_none());
        let held = out.services[0].clone();
        let (mut second, err) =
            StandaloneAllocator::new(AllocConfig::default(), Some(RecordStore::new(&dir)));
        assert!(err.is_none());
        assert_eq!(second.record(), first.record());
        let again = second.update(&[a], |_| None).unwrap();
        assert_eq!(again.services[0], held);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn problems_are_located_lazily_and_an_unwritable_state_dir_is_reported_and_retried() {
        let dir = temp_dir("unwritable");
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        // A file where the state directory should be.
        std::fs::write(&dir, "").unwrap();
        let (mut alloc, _) =
            StandaloneAllocator::new(AllocConfig::default(), Some(RecordStore::new(&dir)));
        let (good, bad) = (svc("good", ""), svc("bad", "  type: Bogus\n"));
        let mut asked = Vec::new();
        let out = alloc
            .update(&[good.clone(), bad.clone()], |k| {
                asked.push(k.clone());
                Some(Location {
                    file: "/m/bad.yaml".into(),
                    document: 2,
                    line: 9,
                    item: None,
                })
            })
            .unwrap();
        assert!(out.save_error.is_some());
        assert_eq!(out.services.len(), 1);
        assert_eq!(
            out.problems[0].to_string(),
            "/m/bad.yaml: document 2 (line 9): Service default/bad: spec.type: unsupported value \
             \"Bogus\" (ClusterIP, NodePort, LoadBalancer or ExternalName); Service skipped"
        );
        assert_eq!(asked, vec![ServiceKey::new("default", "bad")]);
        // Nothing changed, but the record is not saved yet: the next update tries again.
        let out = alloc
            .update(&[good.clone(), bad.clone()], |_| None)
            .unwrap();
        assert!(out.save_error.is_some());
        std::fs::remove_file(&dir).unwrap();
        let out = alloc
            .update(&[good.clone(), bad.clone()], |_| None)
            .unwrap();
        assert!(out.save_error.is_none());
        assert!(
            RecordStore::new(&dir)
                .load()
                .unwrap()
                .services
                .contains_key("default/good")
        );
        assert!(alloc.update(&[good, bad], |_| None).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
