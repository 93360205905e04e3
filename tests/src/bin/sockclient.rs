//! `svc-lb-sockclient`: a client the socket-LB tests run as a separate process (it must be
//! placed in a test cgroup before it starts). Prints one line per attempt:
//!
//! - `tcp ADDR [N]`: connect, `peer=<getpeername> body=<HTTP body>` (GET /, Connection: close);
//! - `udp ADDR [N]`: unconnected UDP, `from=<recvfrom source> body=<reply>`;
//! - `udp-connected ADDR [N]`: connected UDP, `peer=<getpeername> body=<reply>`.
//!
//! A failing attempt prints `error=<errno name or message>` and the process exits 1 after the
//! remaining attempts.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(3);
const USAGE: &str = "usage: svc-lb-sockclient tcp|udp|udp-connected ADDR [COUNT]";

fn describe(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        _ => e.to_string(),
    }
}

fn tcp(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let peer = s.peer_addr()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: svc-lb-test\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    Ok(format!("peer={peer} body={body}"))
}

fn udp(addr: SocketAddr, connected: bool) -> std::io::Result<String> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut buf = [0u8; 512];
    if connected {
        s.connect(addr)?;
        s.send(b"ping\n")?;
        let n = s.recv(&mut buf)?;
        let peer = s.peer_addr()?;
        Ok(format!(
            "peer={peer} body={}",
            String::from_utf8_lossy(&buf[..n]).trim()
        ))
    } else {
        s.send_to(b"ping\n", addr)?;
        let (n, from) = s.recv_from(&mut buf)?;
        Ok(format!(
            "from={from} body={}",
            String::from_utf8_lossy(&buf[..n]).trim()
        ))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mode), Some(addr)) = (args.first(), args.get(1)) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        eprintln!("bad address {addr:?}\n{USAGE}");
        return ExitCode::from(2);
    };
    let count: usize = args.get(2).and_then(|c| c.parse().ok()).unwrap_or(1);
    let mut ok = true;
    for _ in 0..count {
        let r = match mode.as_str() {
            "tcp" => tcp(addr),
            "udp" => udp(addr, false),
            "udp-connected" => udp(addr, true),
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        };
        match r {
            Ok(line) => println!("{line}"),
            Err(e) => {
                println!("error={}", describe(&e));
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
