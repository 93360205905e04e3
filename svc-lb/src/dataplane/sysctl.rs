//! The IPv4 sysctls the datapath needs in the node's network namespace, recorded so that
//! `svc-lb uninstall` puts back what the node had.
//!
//! - `net.ipv4.conf.all.rp_filter=0` and `net.ipv4.conf.<iface>.rp_filter=0` on attached
//!   interfaces: reverse NAT rewrites the source of replies to the frontend address, which the
//!   reverse-path filter would drop (the effective value is max(all, iface), so both must be 0).
//! - `net.ipv4.conf.<iface>.accept_local=1` on attached interfaces: replies of a NodePort (or
//!   ExternalIP on a node address) flow are reverse-NATed, at TC ingress of the pod interface, to
//!   a source address that is the node's own; without accept_local the kernel drops such
//!   forwarded packets as martians (fib_validate_source).
//!
//! The first time svc-lb changes a value it records the old one (and the one it set) in
//! `sysctl.json` of the pin directory's state directory ([`super::state`]), before writing.
//! A restarted agent finds the record and keeps the first old value, so the record always
//! holds what the node had before svc-lb. Uninstall writes an old value back only where the
//! value is still the one svc-lb set: a value an operator changed since is theirs.
//! A value that already was what svc-lb needs is not recorded (svc-lb changed nothing).

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::DataplaneError;

/// The record file inside the state directory.
pub const RECORD_FILE: &str = "sysctl.json";

/// One changed sysctl.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The value before svc-lb first changed it.
    pub old: String,
    /// The value svc-lb wrote.
    pub set: String,
}

/// `conf/<iface>/<key>` (relative to `/proc/sys/net/ipv4`) → change.
pub type Record = BTreeMap<String, Change>;

/// Writes sysctls under a root (`/proc/sys/net/ipv4`; tests use a directory of their own),
/// recording each first change in `record` before making it.
#[derive(Debug)]
pub struct Sysctls {
    root: PathBuf,
    record: PathBuf,
    /// Keys this process recorded (a failed start restores exactly these).
    recorded_here: Mutex<Vec<String>>,
}

fn key(iface: &str, name: &str) -> String {
    format!("conf/{iface}/{name}")
}

fn read_value(path: &Path) -> io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

/// Reads the record at `path` (missing: empty). A corrupt record is an error naming the file:
/// restoring from a guess would change values svc-lb never touched.
pub fn read_record(path: &Path) -> Result<Record, DataplaneError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Record::new()),
        Err(source) => {
            return Err(DataplaneError::State {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_str(&text).map_err(|e| DataplaneError::SysctlRecord {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Replaces the record atomically (write a temporary file, rename), so a crash never leaves
/// half a record.
fn write_record(path: &Path, record: &Record) -> Result<(), DataplaneError> {
    let err = |source| DataplaneError::State {
        path: path.to_path_buf(),
        source,
    };
    if record.is_empty() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(err(e)),
            _ => Ok(()),
        };
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(record).expect("a map of strings serializes");
    std::fs::write(&tmp, text + "\n").map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

impl Sysctls {
    /// Sysctls of the current network namespace, recorded in `state_dir`.
    pub fn new(state_dir: &Path) -> Sysctls {
        Self::with_root(Path::new("/proc/sys/net/ipv4"), state_dir)
    }

    pub fn with_root(root: &Path, state_dir: &Path) -> Sysctls {
        Sysctls {
            root: root.to_path_buf(),
            record: state_dir.join(RECORD_FILE),
            recorded_here: Mutex::new(Vec::new()),
        }
    }

    /// Sets `conf/<iface>/<name>` to `value`, recording the old value first if svc-lb never
    /// changed this sysctl before.
    fn set(&self, iface: &str, name: &str, value: &str) -> Result<(), DataplaneError> {
        let key = key(iface, name);
        let path = self.root.join(&key);
        let sysctl_err = |source| DataplaneError::Sysctl {
            path: path.clone(),
            source,
        };
        let current = read_value(&path).map_err(sysctl_err)?;
        if current != value {
            let mut record = read_record(&self.record)?;
            if !record.contains_key(&key) {
                record.insert(
                    key.clone(),
                    Change {
                        old: current.clone(),
                        set: value.to_string(),
                    },
                );
                // Recorded before the write: a crash in between restores a value that is
                // still current, which is harmless.
                write_record(&self.record, &record)?;
                self.recorded_here
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(key.clone());
            }
            std::fs::write(&path, value).map_err(sysctl_err)?;
            debug!(sysctl = %key, old = %current, new = value, "changed sysctl");
        }
        Ok(())
    }

    fn set_iface(&self, iface: &str) -> Result<(), DataplaneError> {
        self.set(iface, "rp_filter", "0")?;
        self.set(iface, "accept_local", "1")
    }

    /// Applies the sysctls for the initially attached interfaces.
    pub fn configure(&self, ifaces: &[String]) -> Result<(), DataplaneError> {
        self.set("all", "rp_filter", "0")?;
        for iface in ifaces {
            self.set_iface(iface)?;
        }
        info!(
            ifaces = ?ifaces,
            record = %self.record.display(),
            "set rp_filter=0 (all + attached interfaces) and accept_local=1 (attached interfaces) \
             so reverse-NATed replies are not dropped; old values recorded for uninstall"
        );
        Ok(())
    }

    /// The per-interface part of [`Sysctls::configure`], for an interface attached later.
    pub fn configure_iface(&self, iface: &str) -> Result<(), DataplaneError> {
        self.set_iface(iface)?;
        debug!(iface, "set rp_filter=0 and accept_local=1");
        Ok(())
    }

    /// Drops the record entries of an interface that went away: its sysctls went with it, and a
    /// new interface of that name starts from the kernel's defaults, which svc-lb records anew.
    pub fn forget_iface(&self, iface: &str) -> Result<(), DataplaneError> {
        let prefix = format!("conf/{iface}/");
        let mut record = read_record(&self.record)?;
        let before = record.len();
        record.retain(|k, _| !k.starts_with(&prefix));
        if record.len() != before {
            write_record(&self.record, &record)?;
        }
        Ok(())
    }

    /// Restores what this process recorded (a start that failed leaves the node as it was).
    pub fn roll_back(&self) {
        let keys =
            std::mem::take(&mut *self.recorded_here.lock().unwrap_or_else(|e| e.into_inner()));
        if keys.is_empty() {
            return;
        }
        let result = read_record(&self.record).and_then(|mut record| {
            let mine: Record = keys.iter().filter_map(|k| record.remove_entry(k)).collect();
            restore_in(&self.root, &mine);
            write_record(&self.record, &record)
        });
        if let Err(e) = result {
            warn!(error = %crate::error::chain(&e), "could not roll back the sysctl record");
        }
    }

    /// Writes back every recorded old value (uninstall) and removes the record.
    pub fn restore(&self) -> Result<Restored, DataplaneError> {
        let record = read_record(&self.record)?;
        let restored = restore_in(&self.root, &record);
        write_record(&self.record, &Record::new())?;
        Ok(restored)
    }
}

/// What [`Sysctls::restore`] did, for the uninstall log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Sysctls set back to their old value.
    pub restored: Vec<String>,
    /// Sysctls changed by someone else since svc-lb set them: left alone.
    pub changed_since: Vec<String>,
    /// Sysctls of interfaces that no longer exist.
    pub gone: Vec<String>,
}

fn restore_in(root: &Path, record: &Record) -> Restored {
    let mut out = Restored::default();
    for (key, change) in record {
        let path = root.join(key);
        match read_value(&path) {
            Ok(v) if v == change.set => match std::fs::write(&path, &change.old) {
                Ok(()) => {
                    info!(sysctl = %key, value = %change.old, "restored sysctl");
                    out.restored.push(key.clone());
                }
                Err(e) => {
                    warn!(sysctl = %key, error = %e, "could not restore sysctl");
                }
            },
            Ok(v) => {
                warn!(
                    sysctl = %key, value = %v, svc_lb_set = %change.set, old = %change.old,
                    "sysctl changed since svc-lb set it; leaving it as it is"
                );
                out.changed_since.push(key.clone());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                debug!(sysctl = %key, "interface gone; nothing to restore");
                out.gone.push(key.clone());
            }
            Err(e) => warn!(sysctl = %key, error = %e, "could not read sysctl to restore it"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fake `/proc/sys/net/ipv4` with `all` and the given interfaces.
    fn fake(tag: &str, ifaces: &[(&str, &str, &str)]) -> (Tmp, PathBuf, PathBuf) {
        let t =
            Tmp(std::env::temp_dir()
                .join(format!("svc-lb-unit-sysctl-{tag}-{}", std::process::id())));
        let root = t.0.join("proc");
        let state = t.0.join("state");
        for (iface, rp, al) in ifaces {
            let d = root.join("conf").join(iface);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("rp_filter"), format!("{rp}\n")).unwrap();
            std::fs::write(d.join("accept_local"), format!("{al}\n")).unwrap();
        }
        (t, root, state)
    }

    fn get(root: &Path, k: &str) -> String {
        read_value(&root.join(k)).unwrap()
    }

    #[test]
    fn first_change_is_recorded_and_restored_even_across_restarts() {
        let (_t, root, state) = fake(
            "restart",
            &[("all", "2", "0"), ("eth0", "1", "0"), ("lxc1", "0", "1")],
        );
        let s = Sysctls::with_root(&root, &state);
        s.configure(&["eth0".into(), "lxc1".into()]).unwrap();
        assert_eq!(get(&root, "conf/all/rp_filter"), "0");
        assert_eq!(get(&root, "conf/eth0/accept_local"), "1");
        let record = read_record(&state.join(RECORD_FILE)).unwrap();
        // lxc1 already had what svc-lb needs: nothing changed, nothing recorded.
        assert_eq!(
            record.keys().collect::<Vec<_>>(),
            [
                "conf/all/rp_filter",
                "conf/eth0/accept_local",
                "conf/eth0/rp_filter"
            ]
        );
        // A restarted agent sees 0 and must keep the first old value (2), not record 0.
        drop(s);
        let s = Sysctls::with_root(&root, &state);
        s.configure(&["eth0".into()]).unwrap();
        assert_eq!(read_record(&state.join(RECORD_FILE)).unwrap(), record);

        // The operator set eth0's rp_filter themselves meanwhile: uninstall leaves it.
        std::fs::write(root.join("conf/eth0/rp_filter"), "2").unwrap();
        let restored = s.restore().unwrap();
        assert_eq!(
            restored.restored,
            ["conf/all/rp_filter", "conf/eth0/accept_local"]
        );
        assert_eq!(restored.changed_since, ["conf/eth0/rp_filter"]);
        assert_eq!(get(&root, "conf/all/rp_filter"), "2");
        assert_eq!(get(&root, "conf/eth0/accept_local"), "0");
        assert_eq!(get(&root, "conf/eth0/rp_filter"), "2");
        assert_eq!(get(&root, "conf/lxc1/rp_filter"), "0");
        assert!(!state.join(RECORD_FILE).exists());
    }

    #[test]
    fn vanished_interfaces_are_forgotten_and_a_failed_start_rolls_back() {
        let (_t, root, state) = fake("rollback", &[("all", "1", "0"), ("lxc9", "1", "0")]);
        let s = Sysctls::with_root(&root, &state);
        s.configure(&[]).unwrap();
        s.configure_iface("lxc9").unwrap();
        s.forget_iface("lxc9").unwrap();
        let record = read_record(&state.join(RECORD_FILE)).unwrap();
        assert_eq!(record.keys().collect::<Vec<_>>(), ["conf/all/rp_filter"]);
        s.roll_back();
        assert_eq!(get(&root, "conf/all/rp_filter"), "1");
        assert!(!state.join(RECORD_FILE).exists());

        // A record written by an earlier agent is not this process's to roll back.
        let s = Sysctls::with_root(&root, &state);
        s.configure(&[]).unwrap();
        let s2 = Sysctls::with_root(&root, &state);
        s2.configure(&[]).unwrap();
        s2.roll_back();
        assert_eq!(get(&root, "conf/all/rp_filter"), "0");
        assert!(state.join(RECORD_FILE).exists());
    }

    #[test]
    fn a_corrupt_record_names_the_file() {
        let (_t, _root, state) = fake("corrupt", &[]);
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join(RECORD_FILE), "{not json").unwrap();
        let err = read_record(&state.join(RECORD_FILE))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sysctl.json"), "{err}");
    }
}
