//! What `svc-lb run` mounts on a node, and what happens when the mounts are not the host's
//! (issue 12 items 8 and 9):
//!
//! - the default socket LB (no `--cgroup-path`) finds the node's cgroup v2 mount in
//!   /proc/self/mountinfo (`/sys/fs/cgroup/unified` on this kind of hybrid machine) and says so;
//!   with no cgroup v2 mounted at all it mounts one on /run/svc-lb/cgroupv2, which `svc-lb
//!   uninstall` unmounts; a `--cgroup-path` that is not cgroup v2 is refused, naming it;
//! - an agent that mounts bpffs itself inside a private mount namespace (`ip netns exec`) warns
//!   that its pins vanish with it, and they do.
//!
//! The agents with the default socket LB run in a mount namespace of their own where the
//! test's child cgroup stands in for the node's cgroup v2 root (never the machine's real root:
//! that would balance every process of the machine). Needs root; fails, never skips.

use std::{
    fs::{self, File},
    io,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use svc_lb::dataplane::cgroup::{OWN_MOUNT, OWN_SOURCE, parse_mountinfo};
use svc_lb_tests::{
    agent::{AgentGuard, stop_gracefully},
    bin_path,
    cgroup::{MountSetup, TestCgroup, attached_progs, cgroup2_mount},
    client, fixture,
    netns::NODE_IP,
    wait_for,
};

const HOOKS: [&str; 4] = ["connect4", "getpeername4", "recvmsg4", "sendmsg4"];

fn hooks() -> Vec<String> {
    HOOKS.map(String::from).to_vec()
}

/// Runs `cmd` with its mount namespace switched to `mnt` (an open `/proc/<pid>/ns/mnt`).
fn in_mount_ns(mnt: &File, mut cmd: Command) -> Output {
    let fd = mnt.as_raw_fd();
    // SAFETY: only setns(2) between fork and exec; `mnt` outlives the command.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output()
        .expect("run a command in the agent's mount namespace")
}

#[test]
fn the_default_socket_lb_finds_the_nodes_cgroup2_mount_and_says_which() {
    let (topo, dir) = fixture::standard();
    let cg = TestCgroup::new(&topo.prefix);
    // Where the agent's discovery will look: the node's cgroup v2 mount point, with the test's
    // cgroup bind-mounted over it in the agent's own mount namespace.
    let at = cgroup2_mount().mount_point;
    let mut agent = AgentGuard::start_in(
        &topo,
        &dir.path,
        &[],
        MountSetup::BindOver {
            cgroup: cg.path.clone(),
            at: at.clone(),
        },
    );
    fixture::wait_serving(&topo, &mut agent);
    let log = agent.log_text();
    let said = log
        .lines()
        .find(|l| l.contains("socket LB cgroup: the cgroup v2 mount found in /proc/self/mountinfo"))
        .unwrap_or_else(|| panic!("the agent did not say which cgroup it uses:\n{log}"));
    assert!(
        said.contains(&format!("cgroup={}", at.display())),
        "expected {}: {said}",
        at.display()
    );
    // The programs are on the test's cgroup (what the agent saw at `at`), one per hook.
    assert_eq!(attached_progs(&cg.path), hooks(), "{log}");
    assert!(
        !log.contains("private mount namespace"),
        "bpffs was mounted before the agent started: no warning expected\n{log}"
    );
    // Uninstall detaches them and leaves the node's cgroup v2 mount alone (not svc-lb's).
    let out = agent.shutdown();
    assert!(out.status.success(), "{out:?}");
    assert!(attached_progs(&cg.path).is_empty());
    assert!(
        parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap())
            .iter()
            .any(|m| m.mount_point == at && m.fs_type == "cgroup2"),
        "{} was unmounted",
        at.display()
    );
}

#[test]
fn without_any_cgroup2_the_agent_mounts_its_own_and_uninstall_unmounts_only_that() {
    let (topo, dir) = fixture::standard();
    let cg = TestCgroup::new(&topo.prefix);
    // The agent starts in `cg`, as the root of a cgroup namespace of its own, in a mount
    // namespace without any cgroup v2: a cgroup v1 only node. What it mounts is `cg`.
    let mut agent = AgentGuard::start_in(
        &topo,
        &dir.path,
        &[],
        MountSetup::NoCgroup2 {
            cgroup: cg.path.clone(),
        },
    );
    fixture::wait_serving(&topo, &mut agent);
    let log = agent.log_text();
    assert!(
        log.contains("no cgroup v2 was mounted on this node, svc-lb mounted it")
            && log.contains(&format!("cgroup={OWN_MOUNT}")),
        "{log}"
    );
    assert_eq!(attached_progs(&cg.path), hooks(), "{log}");

    // The mount is the agent's namespace's: keep that namespace after the agent stops.
    let pid = agent.pid().expect("agent running");
    let mnt = File::open(format!("/proc/{pid}/ns/mnt")).expect("open the agent's mount ns");
    let mountinfo = || {
        let mut cat = Command::new("cat");
        cat.arg("/proc/self/mountinfo");
        parse_mountinfo(&String::from_utf8_lossy(&in_mount_ns(&mnt, cat).stdout))
    };
    let own: Vec<_> = mountinfo()
        .into_iter()
        .filter(|m| m.mount_point == Path::new(OWN_MOUNT))
        .collect();
    assert_eq!(own.len(), 1, "{own:?}");
    assert_eq!(
        (own[0].fs_type.as_str(), own[0].source.as_str()),
        ("cgroup2", OWN_SOURCE)
    );
    agent.stop();
    // Still attached: the links are pinned, the agent's exit changes nothing.
    assert_eq!(attached_progs(&cg.path), hooks());

    let mut uninstall = Command::new(bin_path("svc-lb", "SVC_LB_BIN"));
    uninstall
        .args(["uninstall", "--pin-dir"])
        .arg(&agent.pin_dir);
    let out = in_mount_ns(&mnt, uninstall);
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("unmounted the cgroup v2 svc-lb mounted"),
        "{text}"
    );
    assert!(attached_progs(&cg.path).is_empty());
    assert!(
        !mountinfo()
            .iter()
            .any(|m| m.mount_point == Path::new(OWN_MOUNT)),
        "{OWN_MOUNT} still mounted"
    );
    // A second uninstall has nothing of svc-lb's to unmount.
    let mut again = Command::new(bin_path("svc-lb", "SVC_LB_BIN"));
    again.args(["uninstall", "--pin-dir"]).arg(&agent.pin_dir);
    let out = in_mount_ns(&mnt, again);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("unmounted the cgroup v2"));
}

#[test]
fn a_cgroup_path_that_is_not_cgroup2_is_refused_naming_it() {
    let (topo, dir) = fixture::standard();
    // A plain directory; on a hybrid node /sys/fs/cgroup (cgroup v1 controllers) is refused too.
    let not_cg = topo.dir.join("not-a-cgroup");
    fs::create_dir(&not_cg).unwrap();
    for path in [not_cg.as_path(), Path::new("/sys/fs/cgroup")] {
        if path == Path::new("/sys/fs/cgroup") && cgroup2_mount().mount_point == path {
            continue; // a unified node: /sys/fs/cgroup is cgroup v2
        }
        let mut cmd = Command::new(bin_path("svc-lb", "SVC_LB_BIN"));
        cmd.args(["run", "--manifests"])
            .arg(&dir.path)
            .args(["--node-ip", &NODE_IP.to_string(), "--iface", "n-c"])
            .arg("--pin-dir")
            .arg(format!("/sys/fs/bpf/{}-refused", topo.prefix))
            .arg("--cgroup-path")
            .arg(path)
            // Never the machine's /var/lib/svc-lb.
            .arg("--state-dir")
            .arg(topo.dir.join("state"))
            .stdin(Stdio::null());
        topo.node.enter(&mut cmd);
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains(&path.display().to_string())
                && err.contains("--cgroup-path is not cgroup v2"),
            "{err}"
        );
        // On a hybrid node the error says where cgroup v2 is.
        let v2 = cgroup2_mount().mount_point;
        if path == Path::new("/sys/fs/cgroup") {
            assert!(err.contains(&v2.display().to_string()), "{err}");
        }
        // Refused before anything was created.
        assert!(!Path::new(&format!("/sys/fs/bpf/{}-refused", topo.prefix)).exists());
    }
}

/// `ip netns exec` unshares the mount namespace and remounts /sys: the agent finds no bpffs,
/// mounts one that only its namespace sees, and must say that its pins die with it.
#[test]
fn an_agent_mounting_bpffs_in_a_private_mount_namespace_warns_and_its_pins_vanish() {
    let (topo, dir) = fixture::standard();
    let pin_dir = format!("/sys/fs/bpf/{}-netns-exec", topo.prefix);
    let log_path = topo.dir.join("agent-netns-exec.log");
    let log = File::create(&log_path).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &topo.node.name])
        .arg(bin_path("svc-lb", "SVC_LB_BIN"))
        .args(["run", "--manifests"])
        .arg(&dir.path)
        .args(["--node-ip", &NODE_IP.to_string(), "--no-socket-lb"])
        .args(["--pin-dir", &pin_dir])
        // Never the machine's /var/lib/svc-lb.
        .arg("--state-dir")
        .arg(topo.dir.join("state"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for iface in topo.node_ifaces() {
        cmd.args(["--iface", &iface]);
    }
    let mut child = cmd.spawn().expect("spawn ip netns exec svc-lb run");
    let text = || fs::read_to_string(&log_path).unwrap_or_default();
    let warned = wait_for(
        "the agent's warning about its private mount namespace",
        Duration::from_secs(20),
        || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("the agent exited ({st}):\n{}", text());
            }
            text()
                .lines()
                .find(|l| l.contains("WARN") && l.contains("private mount namespace"))
                .map(str::to_owned)
        },
    );
    for hint in [
        "vanish",
        "mount -t bpf bpf /sys/fs/bpf",
        "--pin-dir",
        "nsenter",
    ] {
        assert!(warned.contains(hint), "no {hint:?} in: {warned}");
    }
    let get = || {
        client::http_get_within(
            &topo.client,
            fixture::frontend(),
            Duration::from_millis(300),
        )
    };
    wait_for(
        "frontend-svc to answer through the agent",
        Duration::from_secs(20),
        || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("the agent exited ({st}):\n{}", text());
            }
            get().ok()
        },
    );
    // Its pins are not on the bpffs everyone else sees ...
    assert!(!Path::new(&pin_dir).exists());
    stop_gracefully(child);
    // The agent lock and sysctl record in /run/svc-lb (the host's /run): no uninstall can reach
    // the vanished pins, so remove them here.
    if let Ok(state) = svc_lb::dataplane::state::state_dir(Path::new(&pin_dir)) {
        let _ = fs::remove_dir_all(state);
    }
    // ... and when it is gone, so is its datapath (no uninstall ran: the pins died with the
    // namespace's bpffs, and the links with them).
    wait_for(
        "frontend-svc to stop answering once the agent and its bpffs are gone",
        Duration::from_secs(10),
        || get().is_err().then_some(()),
    );
}
