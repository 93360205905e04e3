//! What standalone mode handed out, kept across agent restarts so that a Service never moves
//! while it exists: a JSON file in the state directory (`--state-dir`, default
//! `/var/lib/svc-lb`; not bpffs, which holds only BPF objects), replaced atomically (written to
//! a temporary file, synced, renamed over the old one, directory synced).

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Default `--state-dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/svc-lb";
/// The record's file name inside the state directory.
pub const RECORD_FILE: &str = "allocations.json";
/// Bumped when the format changes incompatibly.
pub const RECORD_VERSION: u32 = 1;

/// Every Service standalone mode has seen and still exists, and what it holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    /// By `namespace/name`.
    #[serde(default)]
    pub services: BTreeMap<String, RecordEntry>,
}

/// What one Service holds. Explicit (user-given) values are recorded too: they decide who had
/// an address first when another Service asks for it later.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordEntry {
    /// When the Service was first seen, as a sequence number (ties between Services without
    /// creationTimestamp are broken by it: the one seen first keeps a contested value).
    pub seen: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_ports: Vec<RecordedNodePort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
    /// externalIP frontends it was granted (`ip`, `port`, `protocol`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external: Vec<RecordedExternal>,
}

/// A node port of one Service port. Found again by the port's name, like kube-apiserver
/// patches omitted node ports back in on update (`patchAllocatedValues`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RecordedNodePort {
    /// The Service port's name (`""` for the single unnamed port).
    #[serde(default)]
    pub name: String,
    pub port: u16,
    pub protocol: String,
    pub node_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RecordedExternal {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: String,
}

impl Record {
    pub fn new() -> Self {
        Record {
            version: RECORD_VERSION,
            services: BTreeMap::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot read the allocation record {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("the allocation record {} is not valid: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot write the allocation record {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// The record's file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordStore {
    path: PathBuf,
}

impl RecordStore {
    /// The record in `state_dir` (created on the first save).
    pub fn new(state_dir: &Path) -> Self {
        RecordStore {
            path: state_dir.join(RECORD_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record as last saved; empty if there is none yet.
    pub fn load(&self) -> Result<Record, RecordError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Record::new()),
            Err(source) => {
                return Err(RecordError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let invalid = |reason: String| RecordError::Invalid {
            path: self.path.clone(),
            reason,
        };
        let record: Record = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if record.version != RECORD_VERSION {
            return Err(invalid(format!(
                "version {} (this svc-lb reads version {RECORD_VERSION})",
                record.version
            )));
        }
        Ok(record)
    }

    /// Moves an unreadable record aside (to `allocations.json.invalid`) so that a fresh one
    /// can be written without losing it; returns where it went.
    pub fn set_aside(&self) -> Result<PathBuf, RecordError> {
        let mut aside = self.path.clone().into_os_string();
        aside.push(".invalid");
        let aside = PathBuf::from(aside);
        fs::rename(&self.path, &aside).map_err(|source| RecordError::Write {
            path: aside.clone(),
            source,
        })?;
        Ok(aside)
    }

    /// Replaces the record atomically: readers (and a crash at any point) see the old record
    /// or the new one, never a mix.
    pub fn save(&self, record: &Record) -> Result<(), RecordError> {
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RecordError::Write { path, source }
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(write_err(dir))?;
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(format!(".tmp.{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let mut json = serde_json::to_vec_pretty(record).expect("the record serializes");
        json.push(b'\n');
        let result = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            // The rename itself is durable only once the directory is synced.
            fs::File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(write_err(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "svc-lb-record-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn sample() -> Record {
        let mut r = Record::new();
        r.services.insert(
            "default/web".into(),
            RecordEntry {
                seen: 3,
                cluster_ips: vec!["10.96.12.34".parse().unwrap(), "fd00::1:2".parse().unwrap()],
                node_ports: vec![RecordedNodePort {
                    name: String::new(),
                    port: 8080,
                    protocol: "TCP".into(),
                    node_port: 30045,
                }],
                health_check_node_port: Some(31000),
                external: vec![RecordedExternal {
                    ip: "192.0.2.7".parse().unwrap(),
                    port: 80,
                    protocol: "UDP".into(),
                }],
            },
        );
        r
    }

    #[test]
    fn missing_record_is_empty_and_a_saved_one_reads_back() {
        let dir = TempDir::new("roundtrip");
        // The state directory does not exist yet: save creates it.
        let store = RecordStore::new(&dir.0.join("nested"));
        assert_eq!(store.load().unwrap(), Record::new());
        store.save(&sample()).unwrap();
        assert_eq!(store.load().unwrap(), sample());
        // Saving again replaces it and leaves no temporary file behind.
        let mut changed = sample();
        changed.services.clear();
        store.save(&changed).unwrap();
        assert_eq!(store.load().unwrap(), changed);
        let names: Vec<_> = fs::read_dir(dir.0.join("nested"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(RECORD_FILE)]);
    }

    #[test]
    fn invalid_records_are_reported_and_can_be_set_aside() {
        let dir = TempDir::new("invalid");
        fs::create_dir_all(&dir.0).unwrap();
        let store = RecordStore::new(&dir.0);
        fs::write(store.path(), "{not json").unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, RecordError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("allocations.json"), "{err}");
        let aside = store.set_aside().unwrap();
        assert_eq!(fs::read_to_string(&aside).unwrap(), "{not json");
        assert_eq!(store.load().unwrap(), Record::new());
        // A future format is not silently misread.
        fs::write(store.path(), r#"{"version": 99, "services": {}}"#).unwrap();
        let err = store.load().unwrap_err();
        assert!(err.to_string().contains("version 99"), "{err}");
    }

    #[test]
    fn unwritable_state_dir_is_an_error_naming_the_file() {
        let dir = TempDir::new("unwritable");
        fs::create_dir_all(&dir.0).unwrap();
        // A regular file where the state directory should be.
        let not_a_dir = dir.0.join("file");
        fs::write(&not_a_dir, "").unwrap();
        let err = RecordStore::new(&not_a_dir).save(&sample()).unwrap_err();
        assert!(matches!(err, RecordError::Write { .. }), "{err}");
    }
}
