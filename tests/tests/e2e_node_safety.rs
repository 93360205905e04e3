//! End to end: what svc-lb does to a node and how it undoes it (issue 12 items 1, 2, 3, 5, 6):
//! uninstall removes only svc-lb's pins, one agent per pin directory, a failed start leaves
//! nothing behind, the sysctls come back on uninstall, and a running agent notices when its
//! datapath is removed under it (repairing it, or exiting non-zero). Needs root.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use svc_lb::dataplane::{LINKS_DIR, state};
use svc_lb_common::ALL_MAPS;
use svc_lb_tests::{
    agent::AgentGuard, bin_path, client, ensure_bpffs, fixture, netns::Topology, require_root,
    wait_for,
};

fn svc_lb(args: &[&str]) -> Output {
    Command::new(bin_path("svc-lb", "SVC_LB_BIN"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run svc-lb")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Removes a test directory (and a symlink next to it) whatever happens.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            if p.is_symlink() || p.is_file() {
                let _ = fs::remove_file(p);
            } else {
                let _ = fs::remove_dir_all(p);
            }
        }
    }
}

/// Issue 12 item 1: `mkdir -p /tmp/x/sub; echo a > /tmp/x/f; svc-lb uninstall --pin-dir /tmp/x`
/// deleted /tmp/x and exited 0.
#[test]
fn uninstall_refuses_what_svc_lb_did_not_pin_and_deletes_nothing() {
    require_root();
    ensure_bpffs();
    let tag = format!("slb{}-uninst", std::process::id());
    let tmp = std::env::temp_dir().join(&tag);
    let link = std::env::temp_dir().join(format!("{tag}-link"));
    let bpf = PathBuf::from(format!("/sys/fs/bpf/{tag}"));
    let _cleanup = Cleanup(vec![tmp.clone(), link.clone(), bpf.clone()]);

    // Not on bpffs.
    fs::create_dir_all(tmp.join("sub")).unwrap();
    fs::write(tmp.join("f"), "a\n").unwrap();
    let out = svc_lb(&["uninstall", "--pin-dir", tmp.to_str().unwrap()]);
    assert!(!out.status.success(), "uninstall of a tmp dir succeeded");
    assert!(
        stderr(&out).contains(&tmp.display().to_string())
            && stderr(&out).contains("not on a bpf filesystem"),
        "error does not name the path and the reason: {}",
        stderr(&out)
    );
    assert!(
        tmp.join("sub").is_dir() && tmp.join("f").is_file(),
        "something was deleted"
    );

    // A symlink is not followed, even to a bpffs directory.
    fs::create_dir_all(&bpf).unwrap();
    symlink(&bpf, &link).unwrap();
    let out = svc_lb(&["uninstall", "--pin-dir", link.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
    assert!(bpf.is_dir() && link.is_symlink());

    // On bpffs, but holding something that is not svc-lb's: refused, nothing removed, even
    // the entries that look like svc-lb's.
    fs::create_dir_all(bpf.join("other-tool")).unwrap();
    fs::create_dir_all(bpf.join(LINKS_DIR).join("not-a-link")).unwrap();
    let out = svc_lb(&["uninstall", "--pin-dir", bpf.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("other-tool") && err.contains("links/not-a-link") && err.contains(&tag),
        "error does not name the unknown entries: {err}"
    );
    assert!(bpf.join("other-tool").is_dir() && bpf.join(LINKS_DIR).join("not-a-link").is_dir());

    // A missing directory is fine (nothing installed).
    let out = svc_lb(&["uninstall", "--pin-dir", &format!("/sys/fs/bpf/{tag}-none")]);
    assert!(out.status.success(), "{}", stderr(&out));
}

fn wait_for_exit(child: &mut std::process::Child, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Issue 12 item 2: a second agent on the same pin directory must not start, and `debug` and
/// `uninstall` must say that an agent runs.
#[test]
fn one_agent_per_pin_dir_and_the_cli_says_when_one_runs() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);
    let pid = agent.pid().expect("agent pid").to_string();

    let mut cmd = Command::new(bin_path("svc-lb", "SVC_LB_BIN"));
    cmd.arg("run")
        .arg("--manifests")
        .arg(&dir.path)
        .arg("--no-socket-lb")
        .arg("--pin-dir")
        .arg(&agent.pin_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for iface in topo.node_ifaces() {
        cmd.args(["--iface", &iface]);
    }
    topo.node.enter(&mut cmd);
    let mut second = cmd.spawn().expect("spawn a second agent");
    // It must fail at once; one that keeps running is the bug (killed, so the test ends).
    let exited = wait_for_exit(&mut second, Duration::from_secs(10));
    if !exited {
        let _ = second.kill();
    }
    let out = second.wait_with_output().expect("second agent output");
    assert!(
        exited && !out.status.success(),
        "a second agent started on the same pin dir: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains(&format!("pid {pid}")),
        "the error does not name the first agent's pid {pid}: {}",
        stderr(&out)
    );
    // The first agent is undisturbed.
    agent.assert_running();
    fixture::wait_serving(&topo, &mut agent);

    let out = agent.cli(&["debug", "stats"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("running") && stderr(&out).contains(&format!("pid {pid}")),
        "debug does not say the agent runs: {}",
        stderr(&out)
    );

    let out = agent.cli(&["uninstall"]);
    assert!(!out.status.success(), "uninstall ran under a live agent");
    assert!(
        stderr(&out).contains(&format!("pid {pid}")),
        "{}",
        stderr(&out)
    );
    for name in ALL_MAPS {
        assert!(
            agent.pin_dir.join(name).exists(),
            "{name} removed by a refused uninstall"
        );
    }

    // Once the agent is gone, a new one may start, and debug says none runs.
    agent.stop();
    let out = agent.cli(&["debug", "stats"]);
    assert!(stderr(&out).contains("none running"), "{}", stderr(&out));
    agent.restart();
    fixture::wait_serving(&topo, &mut agent);
}

/// Issue 12 item 5: `--max-backends 4294967295` failed with E2BIG and left LB4_LOCAL_SRC,
/// LB4_SOCK_REVNAT, LB4_SRC_RANGES and links/; a start failing after the maps were created
/// (native XDP on an interface without it) left every pin.
#[test]
fn a_failed_start_leaves_nothing_pinned() {
    let (topo, dir) = fixture::standard();
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}-failed", topo.prefix));
    let _cleanup = Cleanup(vec![pin_dir.clone()]);
    let run = |extra: &[&str]| {
        let mut cmd = Command::new(bin_path("svc-lb", "SVC_LB_BIN"));
        cmd.arg("run")
            .arg("--manifests")
            .arg(&dir.path)
            .args(["--iface", "lo", "--no-socket-lb", "--pin-dir"])
            .arg(&pin_dir)
            .args(extra)
            .stdin(Stdio::null());
        topo.node.enter(&mut cmd);
        cmd.output().expect("run svc-lb")
    };
    let state_dir = state::state_dir(&pin_dir).unwrap();

    let out = run(&["--max-backends", "4294967295"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("LB4_BACKENDS") && stderr(&out).contains("--max-backends"),
        "the error does not name the map and the flag: {}",
        stderr(&out)
    );
    assert!(
        !pin_dir.exists(),
        "pins left: {:?}",
        fs::read_dir(&pin_dir).map(|d| d.count())
    );
    assert!(!state_dir.exists(), "{} left", state_dir.display());

    // Native XDP on lo fails after the maps and the TC link were created.
    let out = run(&["--xdp", "native"]);
    assert!(!out.status.success(), "native XDP on lo attached");
    assert!(stderr(&out).contains("interface lo"), "{}", stderr(&out));
    let left: Vec<String> = fs::read_dir(&pin_dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty() && !pin_dir.exists(), "pins left: {left:?}");
    assert!(!state_dir.exists(), "{} left", state_dir.display());
}

fn read_sysctl(topo: &Topology, path: &str) -> String {
    let out = topo
        .node
        .run("cat", &[&format!("/proc/sys/net/ipv4/{path}")]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn write_sysctl(topo: &Topology, path: &str, value: &str) {
    topo.node.run(
        "sh",
        &["-c", &format!("echo {value} > /proc/sys/net/ipv4/{path}")],
    );
}

/// Issue 12 item 6: rp_filter and accept_local were changed and never restored. Sysctls under
/// /proc/sys/net are per network namespace: this runs in the topology's node namespace.
#[test]
fn uninstall_restores_the_sysctls_the_agent_changed_even_across_restarts() {
    let (topo, dir) = fixture::standard();
    let iface = topo.node_ifaces()[0].clone();
    let (all_rp, if_rp, if_al) = (
        "conf/all/rp_filter".to_string(),
        format!("conf/{iface}/rp_filter"),
        format!("conf/{iface}/accept_local"),
    );
    write_sysctl(&topo, &all_rp, "2");
    write_sysctl(&topo, &if_rp, "1");
    write_sysctl(&topo, &if_al, "0");

    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);
    assert_eq!(read_sysctl(&topo, &all_rp), "0");
    assert_eq!(read_sysctl(&topo, &if_rp), "0");
    assert_eq!(read_sysctl(&topo, &if_al), "1");

    // A restarted agent finds 0/1 already set and must keep the first old values.
    agent.restart();
    fixture::wait_serving(&topo, &mut agent);
    let out = agent.shutdown();
    assert!(out.status.success(), "uninstall: {}", stderr(&out));
    assert_eq!(
        read_sysctl(&topo, &all_rp),
        "2",
        "all.rp_filter not restored"
    );
    assert_eq!(
        read_sysctl(&topo, &if_rp),
        "1",
        "{iface} rp_filter not restored"
    );
    assert_eq!(
        read_sysctl(&topo, &if_al),
        "0",
        "{iface} accept_local not restored"
    );
    assert!(!state::state_dir(&agent.pin_dir).unwrap().exists());
}

fn frontend_answers(topo: &Topology) -> bool {
    client::http_get_within(
        &topo.client,
        fixture::frontend(),
        Duration::from_millis(300),
    )
    .is_ok()
}

/// Issue 12 item 3, repairing: after `svc-lb uninstall --force` (and after a single link pin
/// is removed) the running agent puts its datapath back, keeping its maps.
#[test]
fn a_running_agent_repairs_its_datapath_when_it_is_removed() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);
    let iface = topo.node_ifaces()[0].clone();
    let tc_pin = agent
        .pin_dir
        .join(LINKS_DIR)
        .join(format!("{iface}-tc-ingress"));

    let out = agent.cli(&["uninstall", "--force"]);
    assert!(out.status.success(), "uninstall --force: {}", stderr(&out));
    wait_for(
        "the agent to re-create its pins",
        Duration::from_secs(10),
        || {
            agent.assert_running();
            ALL_MAPS
                .iter()
                .all(|m| agent.pin_dir.join(m).exists())
                .then_some(())
        },
    );
    wait_for(
        "frontend-svc to answer after the repair",
        Duration::from_secs(10),
        || frontend_answers(&topo).then_some(()),
    );
    assert!(tc_pin.exists(), "TC link pin of {iface} not re-created");
    assert!(
        agent.log_text().contains("repairing it"),
        "no warning logged:\n{}",
        agent.log_text()
    );

    // One link pin removed (which detaches the program from that interface).
    fs::remove_file(&tc_pin).unwrap();
    wait_for(
        "the link to be re-attached",
        Duration::from_secs(10),
        || {
            agent.assert_running();
            tc_pin.exists().then_some(())
        },
    );
    fixture::wait_serving(&topo, &mut agent);
}

/// Issue 12 item 3, exiting: with `--on-datapath-loss exit` the agent exits non-zero so its
/// DaemonSet restarts it.
#[test]
fn with_on_datapath_loss_exit_the_agent_exits_non_zero() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start_with(&topo, &dir.path, &["--on-datapath-loss", "exit"]);
    fixture::wait_serving(&topo, &mut agent);
    let out = agent.cli(&["uninstall", "--force"]);
    assert!(out.status.success(), "uninstall --force: {}", stderr(&out));
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("agent still running:\n{}", agent.log_text()));
    assert!(!status.success(), "agent exited with {status}");
    assert!(
        agent.log_text().contains("datapath is gone"),
        "{}",
        agent.log_text()
    );
    // Restarted (as its DaemonSet would), it loads afresh and serves again.
    agent.restart();
    fixture::wait_serving(&topo, &mut agent);
    assert!(Path::new(&agent.pin_dir).join(ALL_MAPS[0]).exists());
}
