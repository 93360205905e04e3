//! Scratch network namespaces and pin directories that are removed on drop (also when a
//! benchmark fails halfway). Names follow the test harness (`slb<pid>-<n>-...`), so
//! `cargo xtask test` reaps them if this process is killed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use svc_lb_tests::netns::{Netns, unique_prefix};

#[derive(Debug, thiserror::Error)]
pub enum NsError {
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("`{cmd}` did not finish within {limit:?}: stopped")]
    TimedOut { cmd: String, limit: Duration },
    #[error("run `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `cmd`, failing with its stderr; returns stdout and the wall time from spawn to exit.
pub fn run_timed(cmd: Command, input: Option<&Path>) -> Result<(String, Duration), NsError> {
    run_limited(cmd, input, None)
}

/// [`run_timed`], killing the command after `limit` (a baseline that does not finish in
/// reasonable time is reported as such, not waited for).
pub fn run_limited(
    mut cmd: Command,
    input: Option<&Path>,
    limit: Option<Duration>,
) -> Result<(String, Duration), NsError> {
    let desc = format!("{cmd:?}");
    let spawn_err = |source| NsError::Spawn {
        cmd: desc.clone(),
        source,
    };
    match input {
        Some(p) => {
            cmd.stdin(Stdio::from(fs::File::open(p).map_err(spawn_err)?));
        }
        None => {
            cmd.stdin(Stdio::null());
        }
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let err_t = drain(child.stderr.take().map(|r| Box::new(r) as _));
    let status = loop {
        if let Some(st) = child.try_wait().map_err(spawn_err)? {
            break st;
        }
        if let Some(limit) = limit
            && start.elapsed() > limit
        {
            let _ = child.kill();
            let _ = child.wait();
            return Err(NsError::TimedOut {
                cmd: desc.clone(),
                limit,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let took = start.elapsed();
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    if !status.success() {
        let mut stderr = String::from_utf8_lossy(&stderr).into_owned();
        stderr.truncate(2000);
        return Err(NsError::Failed {
            cmd: desc,
            status: status.to_string(),
            stderr,
        });
    }
    Ok((String::from_utf8_lossy(&stdout).into_owned(), took))
}

/// The longest a single rule load may take before it is reported as not finishing.
pub const LOAD_LIMIT: Duration = Duration::from_secs(180);

/// A network namespace of our own.
pub struct TempNetns {
    pub ns: Netns,
}

impl TempNetns {
    pub fn new(tag: &str) -> Result<TempNetns, NsError> {
        let name = format!("{}-{tag}", unique_prefix());
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "add", &name]);
        run_timed(cmd, None)?;
        let ns = TempNetns { ns: Netns { name } };
        ns.run("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args);
        self.ns.enter(&mut cmd);
        cmd
    }

    /// Runs to completion inside the namespace; stdout on success.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String, NsError> {
        Ok(run_timed(self.command(program, args), None)?.0)
    }

    /// Runs with `input` as stdin and returns the wall time (what kube-proxy pays per exec).
    /// Stopped after [`LOAD_LIMIT`].
    pub fn run_input(
        &self,
        program: &str,
        args: &[&str],
        input: &Path,
    ) -> Result<Duration, NsError> {
        Ok(run_limited(self.command(program, args), Some(input), Some(LOAD_LIMIT))?.1)
    }
}

impl Drop for TempNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A directory (bpffs pins or scratch files) removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn pins(tag: &str) -> std::io::Result<TempDir> {
        svc_lb_tests::ensure_bpffs();
        let p = PathBuf::from(format!("/sys/fs/bpf/{}-{tag}", unique_prefix()));
        fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    pub fn scratch(tag: &str) -> std::io::Result<TempDir> {
        let p = std::env::temp_dir().join(format!("svc-lb-bench-{}-{tag}", unique_prefix()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_limited_stops_a_command_that_runs_too_long() {
        let mut cmd = Command::new("sleep");
        cmd.arg("5");
        let start = Instant::now();
        let err = run_limited(cmd, None, Some(Duration::from_millis(100))).unwrap_err();
        assert!(matches!(err, NsError::TimedOut { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(2));
        let mut ok = Command::new("echo");
        ok.arg("hi");
        let (out, _) = run_limited(ok, None, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(out, "hi\n");
    }
}
