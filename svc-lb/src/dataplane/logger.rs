//! Forwards aya-log records from the programs into `log` (bridged into `tracing` by the agent's
//! subscriber) on a small thread, so it works whether or not the caller runs tokio.

use std::{
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use aya::Ebpf;
use aya_log::EbpfLogger;
use tracing::warn;

/// Targets of the programs' log records: the module paths of the eBPF binary, whose crate
/// name is `svc_lb` like the agent's (so `RUST_LOG=svc_lb=debug` covers both).
const KERNEL_TARGETS: [&str; 3] = ["svc_lb::lb", "svc_lb::tc", "svc_lb::sock"];

/// The most verbose level the agent's log filter lets through for the programs' records, as
/// aya-log's `AYA_LOG_LEVEL` (0 = none, 1 = error .. 5 = trace). Set at load so records nobody
/// would see are never written: the datapath logs every new connection at debug level, which
/// at the default `info` filter would otherwise cost a ring-buffer write per connection.
pub fn kernel_level() -> u8 {
    [
        (log::Level::Trace, aya_log::Level::Trace),
        (log::Level::Debug, aya_log::Level::Debug),
        (log::Level::Info, aya_log::Level::Info),
        (log::Level::Warn, aya_log::Level::Warn),
        (log::Level::Error, aya_log::Level::Error),
    ]
    .into_iter()
    .find(|(level, _)| {
        KERNEL_TARGETS
            .iter()
            .any(|&target| log::log_enabled!(target: target, *level))
    })
    .map_or(0, |(_, aya)| aya as u8)
}

/// How long one poll waits, i.e. the worst-case delay before the thread notices shutdown.
const POLL_TIMEOUT_MS: i32 = 200;

pub struct LogForwarder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LogForwarder {
    /// Starts forwarding; a missing log ring buffer only loses kernel log lines, so it is a
    /// warning and the dataplane still loads.
    pub fn start(ebpf: &mut Ebpf) -> Option<LogForwarder> {
        let mut logger = match EbpfLogger::init(ebpf) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "eBPF log forwarding disabled");
                return None;
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop_thread = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("ebpf-log".into())
            .spawn(move || {
                let fd = logger.as_raw_fd();
                while !stop_thread.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd; the fd stays open as long as `logger` lives.
                    let ret = unsafe { libc::poll(&mut pfd, 1, POLL_TIMEOUT_MS) };
                    if ret < 0
                        && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                    {
                        warn!(error = %std::io::Error::last_os_error(), "eBPF log poll failed");
                        return;
                    }
                    logger.flush();
                }
            });
        match spawned {
            Ok(thread) => Some(LogForwarder {
                stop,
                thread: Some(thread),
            }),
            Err(e) => {
                warn!(error = %e, "could not start the eBPF log thread");
                None
            }
        }
    }
}

impl Drop for LogForwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
