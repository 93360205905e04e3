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
    #[error("run `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `cmd`, failing with its stderr; returns stdout and the wall time from spawn to exit.
pub fn run_timed(mut cmd: Command, input: Option<&Path>) -> Result<(String, Duration), NsError> {
    let desc = format!("{cmd:?}");
    match input {
        Some(p) => {
            let f = fs::File::open(p).map_err(|source| NsError::Spawn {
                cmd: desc.clone(),
                source,
            })?;
            cmd.stdin(Stdio::from(f));
        }
        None => {
            cmd.stdin(Stdio::null());
        }
    }
    let start = Instant::now();
    let out = cmd.output().map_err(|source| NsError::Spawn {
        cmd: desc.clone(),
        source,
    })?;
    let took = start.elapsed();
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        stderr.truncate(2000);
        return Err(NsError::Failed {
            cmd: desc,
            status: out.status.to_string(),
            stderr,
        });
    }
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), took))
}

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
    pub fn run_input(
        &self,
        program: &str,
        args: &[&str],
        input: &Path,
    ) -> Result<Duration, NsError> {
        Ok(run_timed(self.command(program, args), Some(input))?.1)
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
