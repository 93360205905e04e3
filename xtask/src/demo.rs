//! `cargo xtask demo`: the topology of `notes/common.md` with svc-lb in the node namespace,
//! the manifests in `examples/`, and a few requests from the client namespace.
//!
//! Everything the demo creates is owned by [`Demo`], whose Drop tears it down: on success, on
//! error, on panic and on Ctrl-C (the SIGINT handler turns it into an error).

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    run::{self, Steps},
    setup,
};

const PREFIX: &str = "svc-lb-demo";
const PIN_DIR: &str = "/sys/fs/bpf/svc-lb-demo";
const PODS: [&str; 3] = ["pod-a", "pod-b", "pod-c"];
const VIPS: [&str; 3] = ["10.96.0.10", "10.96.0.20", "10.96.0.53"];

fn ns(name: &str) -> String {
    format!("{PREFIX}-{name}")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

pub fn demo() -> Result<()> {
    let started = Instant::now();
    let mut steps = Steps::new(9);
    let res = run_demo(&mut steps);
    steps.summary(started);
    res
}

fn run_demo(steps: &mut Steps) -> Result<()> {
    std::env::set_current_dir(workspace_root())?;
    setup::run_setup(steps)?;
    steps.step("build svc-lb and svc-lb-echo", || {
        run::run_ok(
            "cargo build",
            run::cargo().args(["build", "-p", "svc-lb", "-p", "svc-lb-tests", "--bins"]),
        )
    })?;
    let bin = target_dir().join("debug");
    let mut demo = Demo {
        svc_lb: bin.join("svc-lb"),
        echo: bin.join("svc-lb-echo"),
        log: target_dir().join("svc-lb-demo.log"),
        namespaces: Vec::new(),
        procs: Vec::new(),
        agent: None,
    };
    let res = demo_steps(steps, &mut demo);
    if res.is_err() {
        demo.print_log_tail();
    }
    // Teardown is its own step (its failure must be visible too), then Drop has nothing left.
    let torn = steps.step("teardown", || demo.teardown());
    res.and(torn)
}

fn demo_steps(steps: &mut Steps, demo: &mut Demo) -> Result<()> {
    steps.step("create namespaces, veths and echo servers", || {
        demo.cleanup_leftovers()?;
        demo.create_topology()?;
        demo.start_echo_servers()
    })?;
    steps.step("start svc-lb run in the node namespace", || {
        demo.start_agent()?;
        demo.wait_programmed()
    })?;
    // The debug output helps most when some requests failed, so it runs either way.
    let traffic = steps.step("send traffic from the client namespace", || demo.traffic());
    steps.step("svc-lb service list / debug services / stats", || {
        for args in [
            ["service", "list"],
            ["debug", "services"],
            ["debug", "stats"],
        ] {
            println!("\n$ svc-lb {} --pin-dir {PIN_DIR}", args.join(" "));
            let out = run::quiet(
                Command::new(&demo.svc_lb)
                    .args(args)
                    .args(["--pin-dir", PIN_DIR]),
            )?;
            print!("{out}");
        }
        Ok(())
    })?;
    traffic
}

struct Demo {
    svc_lb: PathBuf,
    echo: PathBuf,
    log: PathBuf,
    namespaces: Vec<String>,
    procs: Vec<(String, Child)>,
    agent: Option<Child>,
}

fn ip(args: &[&str]) -> Result<()> {
    run::quiet(Command::new("ip").args(args)).map(drop)
}

/// `ip netns exec` is fine for the echo servers and clients; the agent uses `nsenter --net`
/// instead because `ip netns exec` also gives it a private mount namespace with a fresh /sys,
/// where its bpffs pins would not outlive it.
fn in_ns(netns: &str, program: &Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns]).arg(program);
    c
}

impl Demo {
    fn cleanup_leftovers(&mut self) -> Result<()> {
        let list = run::quiet(Command::new("ip").args(["netns", "list"]))?;
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name.starts_with(&format!("{PREFIX}-")) {
                println!("    removing leftover netns {name}");
                ip(&["netns", "del", name])?;
            }
        }
        if Path::new(PIN_DIR).exists() {
            println!("    removing leftover pins in {PIN_DIR}");
            run::quiet(Command::new(&self.svc_lb).args(["uninstall", "--pin-dir", PIN_DIR]))?;
        }
        Ok(())
    }

    fn add_ns(&mut self, name: &str) -> Result<String> {
        let n = ns(name);
        ip(&["netns", "add", &n])?;
        self.namespaces.push(n.clone());
        Ok(n)
    }

    fn create_topology(&mut self) -> Result<()> {
        let client = self.add_ns("client")?;
        let node = self.add_ns("node")?;
        println!("    {client}: c0 172.31.0.2/24  <->  {node}: n-c 172.31.0.1/24");
        ip(&[
            "-n", &node, "link", "add", "n-c", "type", "veth", "peer", "name", "c0", "netns",
            &client,
        ])?;
        ip(&["-n", &node, "addr", "add", "172.31.0.1/24", "dev", "n-c"])?;
        ip(&["-n", &client, "addr", "add", "172.31.0.2/24", "dev", "c0"])?;
        for (n, dev) in [
            (&node, "n-c"),
            (&node, "lo"),
            (&client, "c0"),
            (&client, "lo"),
        ] {
            ip(&["-n", n, "link", "set", dev, "up"])?;
        }
        ip(&[
            "-n",
            &client,
            "route",
            "add",
            "10.96.0.0/12",
            "via",
            "172.31.0.1",
        ])?;
        let mut sysctls = vec![
            "net.ipv4.ip_forward=1".to_string(),
            "net.ipv4.conf.all.rp_filter=0".to_string(),
            "net.ipv4.conf.default.rp_filter=0".to_string(),
            "net.ipv4.conf.n-c.rp_filter=0".to_string(),
        ];
        for (i, pod) in PODS.iter().enumerate() {
            let n = i + 1;
            let pns = self.add_ns(pod)?;
            let nif = format!("n-p{n}");
            println!("    {node}: {nif} 10.244.{n}.1/24  <->  {pns}: eth0 10.244.{n}.2/24");
            ip(&[
                "-n", &node, "link", "add", &nif, "type", "veth", "peer", "name", "eth0", "netns",
                &pns,
            ])?;
            ip(&[
                "-n",
                &node,
                "addr",
                "add",
                &format!("10.244.{n}.1/24"),
                "dev",
                &nif,
            ])?;
            ip(&["-n", &node, "link", "set", &nif, "up"])?;
            ip(&[
                "-n",
                &pns,
                "addr",
                "add",
                &format!("10.244.{n}.2/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &pns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &pns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &pns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.244.{n}.1"),
            ])?;
            sysctls.push(format!("net.ipv4.conf.{nif}.rp_filter=0"));
        }
        let mut cmd = in_ns(&node, Path::new("sysctl"));
        cmd.args(["-q", "-w"]).args(&sysctls);
        run::quiet(&mut cmd)?;
        Ok(())
    }

    fn start_echo_servers(&mut self) -> Result<()> {
        for pod in PODS {
            let mut cmd = in_ns(&ns(pod), &self.echo);
            cmd.args([
                "--name",
                pod,
                "--tcp",
                "0.0.0.0:5000",
                "--tcp",
                "0.0.0.0:80",
            ])
            .args(["--udp", "0.0.0.0:5353"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0);
            let mut child = cmd.spawn().context("spawn svc-lb-echo")?;
            let stdout = child.stdout.take().expect("piped");
            self.procs.push((format!("echo {pod}"), child));
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                let _ = tx.send(lines.any(|l| l.is_ok_and(|l| l.trim() == "ready")));
                for _ in lines {}
            });
            if !rx.recv_timeout(Duration::from_secs(10)).unwrap_or(false) {
                bail!("svc-lb-echo in {pod} did not become ready");
            }
            println!("    {pod}: svc-lb-echo on tcp 5000, tcp 80, udp 5353");
        }
        Ok(())
    }

    fn start_agent(&mut self) -> Result<()> {
        let log =
            File::create(&self.log).with_context(|| format!("create {}", self.log.display()))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", ns("node")))
            .arg(&self.svc_lb)
            .args(["run", "--manifests", "examples"])
            .args([
                "--iface", "n-c", "--iface", "n-p1", "--iface", "n-p2", "--iface", "n-p3",
            ])
            .args(["--node-ip", "172.31.0.1", "--pin-dir", PIN_DIR])
            // The socket LB would attach to the machine's root cgroup (every process).
            .arg("--no-socket-lb")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        println!("    $ {}", run::describe(&cmd));
        println!("    agent log: {}", self.log.display());
        self.agent = Some(cmd.spawn().context("spawn svc-lb run")?);
        Ok(())
    }

    fn agent_alive(&mut self) -> Result<()> {
        if let Some(agent) = self.agent.as_mut()
            && let Some(st) = agent.try_wait()?
        {
            self.agent = None;
            bail!("svc-lb run exited ({st})");
        }
        Ok(())
    }

    /// Polls `svc-lb debug services -o json` until every demo VIP shows up.
    fn wait_programmed(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            self.agent_alive()?;
            let out = run::output(Command::new(&self.svc_lb).args([
                "debug",
                "services",
                "-o",
                "json",
                "--pin-dir",
                PIN_DIR,
            ]))?;
            let text = String::from_utf8_lossy(&out.stdout);
            if out.status.success() && VIPS.iter().all(|v| text.contains(v)) {
                println!(
                    "    services programmed after {:.1}s",
                    start.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "services not programmed after 30 s; last `svc-lb debug services`: {}{}",
                    text,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            run::sleep(Duration::from_millis(250))?;
        }
    }

    fn curl(&self, url: &str) -> Result<String> {
        let mut cmd = in_ns(&ns("client"), Path::new("curl"));
        cmd.args(["-sS", "--max-time", "3", url]);
        Ok(run::quiet(&mut cmd)?.trim().to_string())
    }

    fn udp(&self, host: &str, port: &str) -> Result<String> {
        let mut cmd = in_ns(&ns("client"), Path::new("nc"));
        cmd.args(["-u", "-w", "1", host, port])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawn nc")?;
        child.stdin.take().expect("piped").write_all(b"ping\n")?;
        let out = child.wait_with_output()?;
        let reply = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if reply.is_empty() {
            bail!(
                "no UDP reply from {host}:{port}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(reply)
    }

    fn traffic(&mut self) -> Result<()> {
        let mut failures = 0;
        let plan = [
            ("frontend-svc (ClusterIP)", "http://10.96.0.10/", 9),
            ("web-service (NodePort)", "http://172.31.0.1:30080/", 6),
        ];
        for (what, url, count) in plan {
            println!("\n    {what}: {count} x curl {url}");
            let mut tally = BTreeMap::new();
            for i in 1..=count {
                run::check_interrupted()?;
                match self.curl(url) {
                    Ok(name) => {
                        println!("      #{i}: answered by {name}");
                        *tally.entry(name).or_insert(0) += 1;
                    }
                    Err(e) => {
                        println!("      #{i}: FAILED: {e:#}");
                        failures += 1;
                    }
                }
            }
            println!("      backends: {tally:?}");
        }
        println!("\n    dns (UDP ClusterIP): nc -u 10.96.0.53 53");
        match self.udp("10.96.0.53", "53") {
            Ok(name) => println!("      answered by {name}"),
            Err(e) => {
                println!("      FAILED: {e:#}");
                failures += 1;
            }
        }
        self.agent_alive()?;
        if failures > 0 {
            bail!("{failures} request(s) failed");
        }
        Ok(())
    }

    fn print_log_tail(&self) {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        eprintln!("---- last lines of {} ----", self.log.display());
        for l in &lines[from..] {
            eprintln!("{l}");
        }
        eprintln!("----");
    }

    /// Stops processes, uninstalls, deletes namespaces. Idempotent; reports what it could not do.
    fn teardown(&mut self) -> Result<()> {
        let mut problems = Vec::new();
        if let Some(mut agent) = self.agent.take() {
            println!("    stopping svc-lb run (SIGTERM)");
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(agent.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while agent.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            let _ = agent.kill();
            let _ = agent.wait();
        }
        for (label, mut child) in self.procs.drain(..) {
            println!("    stopping {label}");
            let _ = child.kill();
            let _ = child.wait();
        }
        if Path::new(PIN_DIR).exists() {
            println!("    svc-lb uninstall --pin-dir {PIN_DIR}");
            let out = Command::new(&self.svc_lb)
                .args(["uninstall", "--pin-dir", PIN_DIR])
                .output();
            if !matches!(&out, Ok(o) if o.status.success()) || Path::new(PIN_DIR).exists() {
                problems.push(format!("uninstall left {PIN_DIR}: {out:?}"));
            }
        }
        for n in self.namespaces.drain(..).rev() {
            println!("    ip netns del {n}");
            // Not through run::quiet: teardown must also work after Ctrl-C.
            let st = Command::new("ip").args(["netns", "del", &n]).status();
            if !matches!(st, Ok(s) if s.success()) {
                problems.push(format!("ip netns del {n}: {st:?}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("teardown: {}", problems.join("; "))
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // Normally already torn down; this covers early returns and panics.
        if (self.agent.is_some() || !self.procs.is_empty() || !self.namespaces.is_empty())
            && let Err(e) = self.teardown()
        {
            eprintln!("{e:#}");
        }
    }
}
