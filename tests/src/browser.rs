//! Headless Chromium (Debian's `chromium` package) driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: requests on fd 3, replies on fd 4, NUL-terminated JSON), so a
//! test can load a page, let it run in real time, read its DOM and take a screenshot. No
//! WebDriver, no Node.js.

use std::{
    fs::File,
    io::{Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::process::CommandExt,
    },
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::netns::Netns;

/// A whole test's worth of browser time; the watchdog kills Chromium after it.
const LIFETIME: Duration = Duration::from_secs(90);
/// Longest wait for the reply to one DevTools call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Browser {
    child: Child,
    to: File,
    from: File,
    /// Bytes read from `from` that do not make a whole message yet.
    pending: Vec<u8>,
    next_id: u64,
    session: String,
    done: Arc<AtomicBool>,
    /// Chromium's stderr, for failure messages.
    log: std::path::PathBuf,
}

/// A pipe whose ends are moved above the low fds the child needs (3 and 4), close-on-exec.
fn pipe_high() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    assert_eq!(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
        0,
        "pipe2"
    );
    let high = |fd: RawFd| {
        // SAFETY: F_DUPFD_CLOEXEC returns a new fd >= 10 or -1; the old one is closed after.
        let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        assert!(new >= 10, "fcntl F_DUPFD_CLOEXEC");
        // SAFETY: fd came from pipe2 above and is closed exactly once here.
        unsafe { libc::close(fd) };
        // SAFETY: `new` is a freshly duplicated fd we own.
        unsafe { OwnedFd::from_raw_fd(new) }
    };
    (high(fds[0]), high(fds[1]))
}

impl Browser {
    /// Starts Chromium inside `ns` with a fresh profile under `profile` (its stderr goes to
    /// `<profile>.log`).
    pub fn launch(ns: &Netns, profile: &Path) -> Browser {
        let log = profile.with_extension("log");
        let log_file =
            File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let (req_read, req_write) = pipe_high();
        let (resp_read, resp_write) = pipe_high();
        let (child_in, child_out) = (req_read.as_raw_fd(), resp_write.as_raw_fd());
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        // Its own process group, so Drop can stop the renderer and GPU helpers too.
        .process_group(0);
        ns.enter(&mut cmd);
        // SAFETY: only async-signal-safe dup2 calls between fork and exec; dup2 clears
        // close-on-exec on the targets.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(child_in, 3) < 0 || libc::dup2(child_out, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .expect("run chromium (Debian's chromium package; `cargo xtask setup` installs it)");
        drop((req_read, resp_write));
        let done = Arc::new(AtomicBool::new(false));
        let (pid, watch_done) = (child.id() as libc::pid_t, done.clone());
        thread::spawn(move || {
            let end = Instant::now() + LIFETIME;
            while Instant::now() < end {
                if watch_done.load(Ordering::Relaxed) {
                    return;
                }
                thread::sleep(Duration::from_millis(200));
            }
            // SAFETY: kill(2) on the process group we created.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        });
        let mut b = Browser {
            child,
            to: File::from(req_write),
            from: File::from(resp_read),
            pending: Vec::new(),
            next_id: 0,
            session: String::new(),
            done,
            log,
        };
        let targets = b.call("Target.getTargets", json!({}));
        let page = targets["targetInfos"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["targetId"].as_str())
            .unwrap_or_else(|| panic!("no page target: {targets}"))
            .to_owned();
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": page, "flatten": true}),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_owned();
        b
    }

    /// One DevTools call (on the page session once attached); returns its `result`.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to
            .write_all(&bytes)
            .unwrap_or_else(|e| panic!("send {method} to chromium: {e}"));
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let buf = self.next_message(method, deadline);
            let reply: Value = serde_json::from_slice(&buf).expect("DevTools JSON");
            // Events (no id) and replies to other calls are skipped.
            if reply["id"] != json!(id) {
                continue;
            }
            if let Some(err) = reply.get("error") {
                panic!("{method} failed: {err}");
            }
            return reply["result"].clone();
        }
    }

    /// The next NUL-terminated message, waiting at most until `deadline` (a hung browser
    /// must fail the test, not hang it).
    fn next_message(&mut self, method: &str, deadline: Instant) -> Vec<u8> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == 0) {
                let mut msg: Vec<u8> = self.pending.drain(..=end).collect();
                msg.pop();
                return msg;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.from.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one valid fd we own.
            let ready =
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            assert!(
                ready > 0,
                "no reply from chromium to {method} within {CALL_TIMEOUT:?}; its log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            let mut chunk = [0u8; 65536];
            let n = self
                .from
                .read(&mut chunk)
                .unwrap_or_else(|e| panic!("read chromium's reply to {method}: {e}"));
            assert!(
                n > 0,
                "chromium closed the pipe while waiting for {method}; its log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            self.pending.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn navigate(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({"url": url}));
        assert!(r.get("errorText").is_none(), "navigate {url}: {r}");
    }

    /// Evaluates `expression` in the page and returns its value.
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"].clone()
    }

    /// Polls `expression` every 100 ms until it is `true`, or panics after `timeout`.
    pub fn wait_for(&mut self, expression: &str, timeout: Duration) {
        let end = Instant::now() + timeout;
        while self.eval(expression) != json!(true) {
            assert!(Instant::now() < end, "timed out waiting for {expression}");
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// A PNG of the viewport at `width` x `height` CSS pixels.
    pub fn screenshot(&mut self, width: u32, height: u32) -> Vec<u8> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        base64_decode(r["data"].as_str().expect("screenshot data"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        // SAFETY: kill(2) on the process group we created.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Standard base64 (the screenshot's encoding).
pub fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c:#x}"),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let pad = chunk.iter().filter(|&&c| c == b'=').count();
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= if c == b'=' { 0 } else { val(c) } << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::base64_decode;

    #[test]
    fn decodes_base64() {
        assert_eq!(base64_decode("aGVsbG8="), b"hello");
        assert_eq!(base64_decode("aGk="), b"hi");
        assert_eq!(base64_decode("YWJj"), b"abc");
        assert_eq!(base64_decode("iVBO\nRw=="), [0x89, b'P', b'N', b'G']);
    }
}
