//! Running external commands with step numbers, elapsed time and Ctrl-C awareness.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// How long the step running now took last time (set by [`Steps::step`]), so the heartbeat of
/// a long command can say how far along it probably is.
static LAST_TIME: Mutex<Option<Duration>> = Mutex::new(None);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C sets a flag instead of killing us, so the tasks unwind and their guards clean up.
/// Long-running children are started in their own process group (see [`spawn_quiet_group`]) so
/// the terminal's SIGINT reaches only us.
pub fn install_sigint_handler() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
}

/// Fails with "interrupted" once Ctrl-C was pressed.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted (Ctrl-C)");
    }
    Ok(())
}

/// Sleeps in small slices so Ctrl-C is noticed quickly.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
    Ok(())
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited stdio, printing a heartbeat with the elapsed time every 15 s
/// (cargo install or apt can be silent for a long time). Returns the exit status.
pub fn run_progress(label: &str, cmd: &mut Command) -> Result<ExitStatus> {
    run_with_limit(label, cmd, None)
}

/// Like [`run_progress`], but kills the command's whole process group (it runs in its own)
/// after `limit`, so a hung test cannot hang CI.
pub fn run_with_limit(
    label: &str,
    cmd: &mut Command,
    limit: Option<Duration>,
) -> Result<ExitStatus> {
    println!("    $ {}", describe(cmd));
    let start = Instant::now();
    let mut child = cmd
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawn {}", describe(cmd)))?;
    let kill_group = |child: &mut std::process::Child| {
        // SAFETY: kill(2) on the process group we created for this child.
        unsafe {
            libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = child.wait();
    };
    let mut next_beat = Duration::from_secs(15);
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            kill_group(&mut child);
            bail!("interrupted (Ctrl-C) during {label}");
        }
        if let Some(limit) = limit
            && start.elapsed() > limit
        {
            kill_group(&mut child);
            bail!("{label} still running after {}s: killed", limit.as_secs());
        }
        if start.elapsed() >= next_beat {
            let last = *LAST_TIME.lock().unwrap_or_else(|e| e.into_inner());
            println!("    ... {}", heartbeat(label, start.elapsed(), last));
            next_beat += Duration::from_secs(15);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// "cargo test: still running, 45s (last time the step took 72s)".
pub fn heartbeat(label: &str, elapsed: Duration, last: Option<Duration>) -> String {
    let mut s = format!("{label}: still running, {}s", elapsed.as_secs());
    match last {
        Some(l) if l > elapsed => {
            s += &format!(" (the step took {}s last time)", l.as_secs());
        }
        Some(l) => s += &format!(" (longer than last time, {}s)", l.as_secs()),
        None => {}
    }
    s
}

/// Step durations of the last successful runs, `name<TAB>seconds` per line, so a long step
/// can show how long it took before.
fn timings_file() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("xtask-step-times.tsv")
}

pub fn load_timings(path: &Path) -> BTreeMap<String, f64> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (name, secs) = l.rsplit_once('\t')?;
            Some((name.to_owned(), secs.parse().ok()?))
        })
        .collect()
}

/// Best effort: a read-only target dir only costs the hint.
pub fn save_timing(path: &Path, name: &str, took: Duration) {
    let mut all = load_timings(path);
    all.insert(name.to_owned(), took.as_secs_f64());
    let text: String = all.iter().map(|(n, s)| format!("{n}\t{s:.1}\n")).collect();
    let _ = fs::write(path, text);
}

/// Like [`run_progress`] but fails on a non-zero exit.
pub fn run_ok(label: &str, cmd: &mut Command) -> Result<()> {
    let st = run_progress(label, cmd)?;
    if !st.success() {
        bail!("{label} failed ({st}): {}", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` capturing its output (no failure on non-zero exit; callers decide).
pub fn output(cmd: &mut Command) -> Result<Output> {
    check_interrupted()?;
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", describe(cmd)))
}

/// Runs `cmd` quietly and fails with its stderr on a non-zero exit.
pub fn quiet(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The cargo that runs us (so nested builds use the same toolchain).
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Numbered steps with their durations, for the summary at the end.
pub struct Steps {
    total: usize,
    done: Vec<(String, Duration, StepResult)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepResult {
    Ok,
    Failed,
    Skipped,
}

impl Steps {
    pub fn new(total: usize) -> Steps {
        Steps {
            total,
            done: Vec::new(),
        }
    }

    /// Runs one step, printing "[n/N] name" before and its duration after.
    pub fn step(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let n = self.done.len() + 1;
        let timings = timings_file();
        let last = load_timings(&timings)
            .get(name)
            .map(|s| Duration::from_secs_f64(*s));
        match last {
            // Only worth saying for steps that take a while.
            Some(l) if l >= Duration::from_secs(5) => println!(
                "\n[{n}/{}] {name} (took {:.0}s last time)",
                self.total,
                l.as_secs_f64()
            ),
            _ => println!("\n[{n}/{}] {name}", self.total),
        }
        *LAST_TIME.lock().unwrap_or_else(|e| e.into_inner()) = last;
        let start = Instant::now();
        let res = f();
        let took = start.elapsed();
        *LAST_TIME.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if res.is_ok() {
            save_timing(&timings, name, took);
        }
        let (mark, r) = match &res {
            Ok(()) => ("ok", StepResult::Ok),
            Err(_) => ("FAILED", StepResult::Failed),
        };
        println!(
            "[{n}/{}] {name}: {mark} in {:.1}s",
            self.total,
            took.as_secs_f64()
        );
        self.done.push((name.to_string(), took, r));
        res
    }

    pub fn skip(&mut self, name: &str, why: &str) {
        let n = self.done.len() + 1;
        println!("\n[{n}/{}] {name}: skipped ({why})", self.total);
        self.done
            .push((name.to_string(), Duration::ZERO, StepResult::Skipped));
    }

    pub fn failed(&self) -> bool {
        self.done.iter().any(|(_, _, r)| *r == StepResult::Failed)
    }

    pub fn summary(&self, started: Instant) {
        println!("\nsummary:");
        for (name, took, r) in &self.done {
            let mark = match r {
                StepResult::Ok => "ok",
                StepResult::Failed => "FAILED",
                StepResult::Skipped => "skipped",
            };
            println!("  {mark:<8} {:>7.1}s  {name}", took.as_secs_f64());
        }
        println!("  total    {:>7.1}s", started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_says_how_long_the_step_took_last_time() {
        let s = Duration::from_secs;
        assert_eq!(
            heartbeat("cargo test", s(45), Some(s(72))),
            "cargo test: still running, 45s (the step took 72s last time)"
        );
        assert_eq!(
            heartbeat("cargo test", s(90), Some(s(72))),
            "cargo test: still running, 90s (longer than last time, 72s)"
        );
        assert_eq!(heartbeat("apt", s(15), None), "apt: still running, 15s");
    }

    #[test]
    fn timings_round_trip() {
        let path = std::env::temp_dir().join(format!("xtask-times-{}.tsv", std::process::id()));
        let _ = fs::remove_file(&path);
        assert!(load_timings(&path).is_empty());
        save_timing(&path, "cargo build --bins", Duration::from_millis(21_340));
        save_timing(
            &path,
            "cargo test (unit, program, e2e)",
            Duration::from_secs(72),
        );
        save_timing(&path, "cargo build --bins", Duration::from_secs(3));
        let t = load_timings(&path);
        assert_eq!(t.len(), 2);
        assert_eq!(t["cargo build --bins"], 3.0);
        assert_eq!(t["cargo test (unit, program, e2e)"], 72.0);
        let _ = fs::remove_file(&path);
    }
}
