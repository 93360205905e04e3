//! What svc-lb keeps about a pin directory outside bpffs: the one-agent lock and the sysctl
//! record, in `/run/svc-lb/<key>/` where `<key>` is the pin directory's canonical path escaped
//! like systemd unit names (`/sys/fs/bpf/svc-lb` → `sys-fs-bpf-svc\x2dlb`).
//!
//! Why `/run` (tmpfs): bpffs cannot hold regular files, and this state must live exactly as long
//! as what it describes. Pins, attached programs and sysctl values all vanish at reboot, and so
//! does `/run`; a record in `/var/lib` would outlive them and make the next uninstall "restore"
//! values from a previous boot over what the node's configuration set since.

use std::{
    fs::File,
    io::{self, Read as _, Seek as _, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Component, Path, PathBuf},
};

use super::DataplaneError;

/// Parent of every pin directory's state directory.
pub const STATE_ROOT: &str = "/run/svc-lb";
/// The lock file inside a state directory; it holds the pid of the agent holding the lock.
const LOCK_FILE: &str = "agent.lock";
/// File names are at most 255 bytes; longer keys are shortened and made unique by a hash.
const MAX_KEY: usize = 200;

/// The pin directory as an absolute path without symlinks or `.`/`..`: the deepest existing
/// ancestor is canonicalized and the rest appended (the pin directory itself may not exist yet),
/// so two spellings of one directory share one lock.
pub fn canonical_pin_dir(pin_dir: &Path) -> io::Result<PathBuf> {
    let abs = if pin_dir.is_absolute() {
        pin_dir.to_path_buf()
    } else {
        std::env::current_dir()?.join(pin_dir)
    };
    let mut rest = Vec::new();
    let mut p = abs.as_path();
    loop {
        match p.canonicalize() {
            Ok(mut c) => {
                for part in rest.iter().rev() {
                    match part {
                        Component::ParentDir => {
                            c.pop();
                        }
                        Component::Normal(n) => c.push(n),
                        _ => {}
                    }
                }
                return Ok(c);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match (p.components().next_back(), p.parent()) {
            (Some(last), Some(parent)) => {
                rest.push(last);
                p = parent;
            }
            _ => return Ok(abs),
        }
    }
}

/// systemd's path escaping (`systemd-escape --path`): readable and injective, so two pin
/// directories never share state.
pub fn escape_key(canonical: &Path) -> String {
    let s = canonical.as_os_str().as_bytes();
    let trimmed = s
        .strip_prefix(b"/")
        .unwrap_or(s)
        .strip_suffix(b"/")
        .unwrap_or(s.strip_prefix(b"/").unwrap_or(s));
    if trimmed.is_empty() {
        return "-".into();
    }
    let mut out = String::new();
    for (i, &b) in trimmed.iter().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b':' | b'_' | b'.' => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    if out.len() > MAX_KEY {
        // FNV-1a of the whole path keeps long keys distinct.
        let hash = trimmed.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let mut cut = MAX_KEY - 17;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out = format!("{}-{hash:016x}", &out[..cut]);
    }
    out
}

/// `/run/svc-lb/<key>` for `pin_dir` under `root` (tests pass their own root).
pub fn state_dir_in(root: &Path, pin_dir: &Path) -> Result<PathBuf, DataplaneError> {
    let canonical = canonical_pin_dir(pin_dir).map_err(|source| DataplaneError::State {
        path: pin_dir.to_path_buf(),
        source,
    })?;
    Ok(root.join(escape_key(&canonical)))
}

/// `/run/svc-lb/<key>` for `pin_dir`.
pub fn state_dir(pin_dir: &Path) -> Result<PathBuf, DataplaneError> {
    state_dir_in(Path::new(STATE_ROOT), pin_dir)
}

/// An exclusive flock on `<state dir>/agent.lock`, held for as long as this value lives. The
/// kernel drops it when the process dies (kill -9 included), so a crashed agent never blocks its
/// successor, and the file holds the holder's pid for error messages.
#[derive(Debug)]
pub struct AgentLock {
    file: File,
    path: PathBuf,
}

/// Who holds a pin directory's lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The pid written by the holder (in its pid namespace), `None` if it wrote none yet.
    pub pid: Option<u32>,
    pub lock: PathBuf,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "pid {pid} (lock {})", self.lock.display()),
            None => write!(f, "unknown pid (lock {})", self.lock.display()),
        }
    }
}

fn state_err(path: &Path) -> impl Fn(io::Error) -> DataplaneError + '_ {
    move |source| DataplaneError::State {
        path: path.to_path_buf(),
        source,
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

fn flock(file: &File, op: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock on a valid fd owned by `file`.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

impl AgentLock {
    /// Takes the lock of the state directory `dir` (created if missing), writing our pid into
    /// it. Fails at once with [`DataplaneError::AgentRunning`] when another process holds it.
    pub fn acquire_in(dir: &Path, pin_dir: &Path) -> Result<AgentLock, DataplaneError> {
        std::fs::create_dir_all(dir).map_err(state_err(dir))?;
        let path = dir.join(LOCK_FILE);
        loop {
            let mut file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(state_err(&path))?;
            if !flock(&file, libc::LOCK_EX).map_err(state_err(&path))? {
                return Err(DataplaneError::AgentRunning {
                    pin_dir: pin_dir.to_path_buf(),
                    holder: Holder {
                        pid: read_pid(&mut file),
                        lock: path,
                    },
                });
            }
            // An uninstall may have removed the file between our open and flock; a lock on
            // an unlinked file would not exclude the next agent, so take the new file.
            let same = std::fs::metadata(&path)
                .map(|m| m.ino() == file.metadata().map(|f| f.ino()).unwrap_or(0))
                .unwrap_or(false);
            if !same {
                continue;
            }
            file.set_len(0).map_err(state_err(&path))?;
            file.rewind().map_err(state_err(&path))?;
            writeln!(file, "{}", std::process::id()).map_err(state_err(&path))?;
            return Ok(AgentLock { file, path });
        }
    }

    /// Takes the lock of `pin_dir` (see [`AgentLock::acquire_in`]).
    pub fn acquire(pin_dir: &Path) -> Result<AgentLock, DataplaneError> {
        Self::acquire_in(&state_dir(pin_dir)?, pin_dir)
    }

    /// The state directory this lock lives in.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new(STATE_ROOT))
    }

    /// Removes the state directory while holding the lock (uninstall: nothing of this pin dir
    /// is left), then releases it.
    pub fn remove_state(self) -> Result<(), DataplaneError> {
        let dir = self.dir().to_path_buf();
        // The lock file goes first while we hold it: an agent that opened it meanwhile sees a
        // different inode after its flock and retries on a fresh file.
        let r = std::fs::remove_dir_all(&dir);
        drop(self.file);
        match r {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(state_err(&dir)(e)),
            _ => Ok(()),
        }
    }
}

/// The process holding the lock of state directory `dir`, if any (a shared flock that fails
/// means someone holds the exclusive one).
pub fn holder_in(dir: &Path) -> Result<Option<Holder>, DataplaneError> {
    let path = dir.join(LOCK_FILE);
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(state_err(&path)(e)),
    };
    if flock(&file, libc::LOCK_SH).map_err(state_err(&path))? {
        return Ok(None);
    }
    Ok(Some(Holder {
        pid: read_pid(&mut file),
        lock: path,
    }))
}

/// The agent running on `pin_dir`, if any (`svc-lb debug` and `uninstall` report it).
pub fn running_agent(pin_dir: &Path) -> Result<Option<Holder>, DataplaneError> {
    holder_in(&state_dir(pin_dir)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_readable_and_distinct() {
        assert_eq!(
            escape_key(Path::new("/sys/fs/bpf/svc-lb")),
            "sys-fs-bpf-svc\\x2dlb"
        );
        // Without escaping '-', these two would collide.
        assert_ne!(
            escape_key(Path::new("/a-b/c")),
            escape_key(Path::new("/a/b-c"))
        );
        assert_eq!(escape_key(Path::new("/")), "-");
        assert_eq!(escape_key(Path::new("/.x/y z")), "\\x2ex-y\\x20z");
        let long = PathBuf::from(format!("/{}", "d/".repeat(150)));
        let longer = PathBuf::from(format!("/{}e", "d/".repeat(150)));
        let (a, b) = (escape_key(&long), escape_key(&longer));
        assert!(a.len() <= MAX_KEY && b.len() <= MAX_KEY, "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn canonical_pin_dir_resolves_what_exists() {
        let tmp = std::env::temp_dir().canonicalize().unwrap();
        let dir = canonical_pin_dir(&tmp.join("no-such-svc-lb/./x/../pins")).unwrap();
        assert_eq!(dir, tmp.join("no-such-svc-lb/pins"));
        assert_eq!(
            canonical_pin_dir(Path::new("/proc/self/..")).unwrap(),
            PathBuf::from("/proc")
        );
    }

    struct TmpDir(PathBuf);
    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_second_lock_names_the_first_holder_and_dies_with_it() {
        let root = TmpDir(std::env::temp_dir().join(format!(
            "svc-lb-unit-lock-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        )));
        let dir = root.0.join("k");
        let pin = Path::new("/sys/fs/bpf/x");
        assert_eq!(holder_in(&dir).unwrap(), None);
        let lock = AgentLock::acquire_in(&dir, pin).unwrap();
        let holder = holder_in(&dir).unwrap().expect("held");
        assert_eq!(holder.pid, Some(std::process::id()));
        // flock locks belong to the open file description: a second open conflicts even in
        // the same process, as a second agent process would.
        match AgentLock::acquire_in(&dir, pin).unwrap_err() {
            DataplaneError::AgentRunning { holder, .. } => {
                assert_eq!(holder.pid, Some(std::process::id()));
            }
            e => panic!("{e}"),
        }
        drop(lock);
        assert_eq!(holder_in(&dir).unwrap(), None);
        let lock = AgentLock::acquire_in(&dir, pin).unwrap();
        lock.remove_state().unwrap();
        assert!(!dir.exists());
    }
}
