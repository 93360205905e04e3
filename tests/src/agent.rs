//! Runs the real `svc-lb run` agent inside a test topology's node namespace.
//!
//! [`AgentProcess`] is the process handling both modes share (spawn with a log file, restart,
//! stop, `svc-lb` CLI calls, cleanup on drop); [`AgentGuard`] starts it in manifest mode and
//! [`crate::kube_agent::KubeAgent`] in API mode.

use std::{
    ffi::OsString,
    fs,
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{bin_path, cgroup::MountSetup, ensure_bpffs, netns::Topology};

/// A running `svc-lb run` in the node namespace of a topology, pinning under its own directory.
/// Drop stops it (SIGTERM, then SIGKILL) and runs `svc-lb uninstall` on its pin directory, so no
/// programs or pins outlive the test. On a failing test the agent log is printed.
pub struct AgentProcess<'t> {
    topo: &'t Topology,
    bin: PathBuf,
    pub pin_dir: PathBuf,
    /// The mode's `svc-lb run` arguments; `--pin-dir` and one `--iface` per node interface of
    /// the topology are added to them.
    args: Vec<OsString>,
    log: PathBuf,
    /// RUST_LOG of the next spawn; `None` = the test's own RUST_LOG, else `info,svc_lb=debug`.
    log_filter: Option<String>,
    child: Option<Child>,
    starts: usize,
    /// A mount namespace of its own for the agent (see [`AgentProcess::start_in`]).
    mount_setup: Option<MountSetup>,
}

impl<'t> AgentProcess<'t> {
    /// Starts `svc-lb run <args> --pin-dir /sys/fs/bpf/<prefix> --iface <each node iface>`.
    pub fn start(topo: &'t Topology, args: Vec<OsString>) -> AgentProcess<'t> {
        Self::start_with_mounts(topo, args, None)
    }

    /// [`AgentProcess::start`] in a private mount namespace set up by `setup` (at every start),
    /// which confines the socket LB to a test cgroup: the agent runs with the default socket LB
    /// (no `--cgroup-path`, no `--no-socket-lb`) and finds that cgroup as the node's.
    pub fn start_in(
        topo: &'t Topology,
        args: Vec<OsString>,
        setup: MountSetup,
    ) -> AgentProcess<'t> {
        Self::start_with_mounts(topo, args, Some(setup))
    }

    fn start_with_mounts(
        topo: &'t Topology,
        args: Vec<OsString>,
        mount_setup: Option<MountSetup>,
    ) -> AgentProcess<'t> {
        ensure_bpffs();
        let mut agent = AgentProcess {
            topo,
            bin: bin_path("svc-lb", "SVC_LB_BIN"),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)),
            args,
            log: topo.dir.join("agent.log"),
            log_filter: None,
            child: None,
            starts: 0,
            mount_setup,
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        self.starts += 1;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .args(&self.args)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            // Not inherited from the test's environment: the arguments alone choose the mode
            // and the node.
            .env_remove("NODE_NAME")
            .env_remove("KUBECONFIG");
        for iface in self.topo.node_ifaces() {
            cmd.args(["--iface", &iface]);
        }
        // The socket LB attaches to a cgroup, by default the machine's root one: it would
        // balance every process of the machine (other tests included) into this test's
        // Services. Only tests that give their own child cgroup get it.
        if self.mount_setup.is_none() && !self.args.iter().any(|a| a == "--cgroup-path") {
            cmd.arg("--no-socket-lb");
        }
        // Standalone mode keeps its allocation record in a state directory: one per test, never
        // the machine's /var/lib/svc-lb.
        if self.args.iter().any(|a| a == "--manifests")
            && !self.args.iter().any(|a| a == "--state-dir")
        {
            cmd.arg("--state-dir").arg(self.topo.dir.join("state"));
        }
        if let Some(filter) = &self.log_filter {
            cmd.env("RUST_LOG", filter);
        } else if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,svc_lb=debug");
        }
        self.topo.node.enter(&mut cmd);
        if let Some(setup) = &self.mount_setup {
            setup.apply(&mut cmd);
        }
        // Append: a restarted agent's log follows the first one's.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log.display()));
        let log2 = log.try_clone().expect("clone log fd");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// Panics (with the log) if the agent exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!(
                "svc-lb run exited early ({status}); log:\n{}",
                self.log_text()
            );
        }
    }

    /// The agent's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits up to `timeout` for the agent to exit on its own, returning its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Some(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// `kill -9`: the agent gets no chance to clean up; pinned programs and maps stay.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the agent again with the same arguments and pin directory.
    pub fn restart(&mut self) {
        self.kill_hard();
        self.spawn();
    }

    /// The `svc-lb run` arguments of the next [`AgentProcess::restart`] (tests that change a
    /// flag across a restart, keeping the pin directory).
    pub fn args_mut(&mut self) -> &mut Vec<OsString> {
        &mut self.args
    }

    /// The RUST_LOG of the next [`AgentProcess::restart`].
    pub fn set_log_filter(&mut self, filter: &str) {
        self.log_filter = Some(filter.to_owned());
    }

    /// Graceful stop: SIGTERM, up to 5 s to exit, then SIGKILL.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_gracefully(child);
        }
    }

    /// Runs `svc-lb <args> --pin-dir <pin_dir>` in the node namespace.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).arg("--pin-dir").arg(&self.pin_dir);
        self.topo.node.enter(&mut cmd);
        cmd.output()
            .unwrap_or_else(|e| panic!("run svc-lb {}: {e}", args.join(" ")))
    }

    /// Stops the agent and uninstalls, returning the uninstall output (for tests that check it).
    pub fn shutdown(&mut self) -> Output {
        self.stop();
        self.cli(&["uninstall"])
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess<'_> {
    fn drop(&mut self) {
        let failing = thread::panicking();
        self.stop();
        remove_pins(&self.pin_dir, || self.cli(&["uninstall"]));
        if failing {
            eprintln!(
                "---- svc-lb agent log ({} start(s), {}) ----\n{}---- end of agent log ----",
                self.starts,
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// A running manifest-mode agent; the process handling (restart, stop, `cli`, cleanup on drop)
/// is [`AgentProcess`]'s.
pub struct AgentGuard<'t> {
    pub manifests: PathBuf,
    process: AgentProcess<'t>,
}

impl<'t> AgentGuard<'t> {
    /// Starts the agent on every node interface of `topo`, reading `manifests`.
    pub fn start(topo: &'t Topology, manifests: &Path) -> AgentGuard<'t> {
        Self::start_with(topo, manifests, &[])
    }

    /// [`AgentGuard::start`] with further `svc-lb run` arguments (e.g. `--metrics-addr`).
    pub fn start_with(topo: &'t Topology, manifests: &Path, extra_args: &[&str]) -> AgentGuard<'t> {
        AgentGuard {
            manifests: manifests.to_path_buf(),
            process: AgentProcess::start(topo, Self::args(manifests, extra_args)),
        }
    }

    /// [`AgentGuard::start_with`] with the default socket LB, in a mount namespace set up by
    /// `setup` (see [`AgentProcess::start_in`]).
    pub fn start_in(
        topo: &'t Topology,
        manifests: &Path,
        extra_args: &[&str],
        setup: MountSetup,
    ) -> AgentGuard<'t> {
        AgentGuard {
            manifests: manifests.to_path_buf(),
            process: AgentProcess::start_in(topo, Self::args(manifests, extra_args), setup),
        }
    }

    fn args(manifests: &Path, extra_args: &[&str]) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--manifests".into(),
            manifests.into(),
            "--node-ip".into(),
            crate::netns::NODE_IP.to_string().into(),
        ];
        args.extend(extra_args.iter().map(OsString::from));
        args
    }
}

impl<'t> Deref for AgentGuard<'t> {
    type Target = AgentProcess<'t>;
    fn deref(&self) -> &AgentProcess<'t> {
        &self.process
    }
}

impl DerefMut for AgentGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.process
    }
}

/// Stops an agent like its DaemonSet would be: SIGTERM, up to 5 s to exit, then SIGKILL.
pub fn stop_gracefully(mut child: Child) {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Cleanup of a stopped agent's pin directory: `uninstall` (run by the caller in the agent's
/// namespace), then, as a last resort so a broken uninstall cannot leak pins into later runs,
/// removing the directory (removing pinned links from bpffs also detaches them).
pub fn remove_pins(pin_dir: &Path, uninstall: impl FnOnce() -> Output) {
    if !pin_dir.exists() {
        return;
    }
    let out = uninstall();
    if !out.status.success() {
        eprintln!(
            "warning: svc-lb uninstall --pin-dir {} failed: {}",
            pin_dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if pin_dir.exists() {
        eprintln!(
            "warning: {} still exists after uninstall; removing it",
            pin_dir.display()
        );
        let _ = fs::remove_dir_all(pin_dir);
        // The agent lock and sysctl record `uninstall` would have removed.
        if let Ok(state) = svc_lb::dataplane::state::state_dir(pin_dir) {
            let _ = fs::remove_dir_all(state);
        }
    }
}
