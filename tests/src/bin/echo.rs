//! `svc-lb-echo`: the backend used by the demo and the end-to-end tests.
//!
//! Every HTTP request and every UDP datagram is answered with the server's name, so a test can
//! tell which backend a load-balanced request reached. Plain std threads: one per listener, one
//! per TCP connection (tests open a few dozen connections at most).

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    thread,
};

const USAGE: &str = "usage: svc-lb-echo --name NAME [--tcp ADDR]... [--udp ADDR]...";

struct Args {
    name: String,
    tcp: Vec<SocketAddr>,
    udp: Vec<SocketAddr>,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut name = None;
    let (mut tcp, mut udp) = (Vec::new(), Vec::new());
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--name" => name = Some(value()?),
            "--tcp" => tcp.push(parse_addr(&value()?)?),
            "--udp" => udp.push(parse_addr(&value()?)?),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let name = name.ok_or_else(|| format!("--name is required\n{USAGE}"))?;
    if tcp.is_empty() && udp.is_empty() {
        return Err(format!("give at least one --tcp or --udp address\n{USAGE}"));
    }
    Ok(Args { name, tcp, udp })
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| format!("bad address {s:?}: {e}"))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // Bind everything before announcing readiness: tests start sending as soon as they see it.
    let mut listeners = Vec::new();
    for addr in &args.tcp {
        match TcpListener::bind(addr) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                eprintln!("svc-lb-echo: bind tcp {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut sockets = Vec::new();
    for addr in &args.udp {
        match UdpSocket::bind(addr) {
            Ok(s) => sockets.push(s),
            Err(e) => {
                eprintln!("svc-lb-echo: bind udp {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let body = format!("{}\n", args.name);
    let mut handles = Vec::new();
    for l in listeners {
        let body = body.clone();
        handles.push(thread::spawn(move || accept_loop(l, body)));
    }
    for s in sockets {
        let body = body.clone();
        handles.push(thread::spawn(move || udp_loop(s, body)));
    }
    println!("ready");
    // Flush explicitly: stdout is a pipe in tests, so it is block-buffered.
    let _ = io::stdout().flush();
    for h in handles {
        let _ = h.join();
    }
    ExitCode::SUCCESS
}

fn accept_loop(listener: TcpListener, body: String) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let body = body.clone();
                thread::spawn(move || {
                    if let Err(e) = serve_http(stream, &body) {
                        // Resets are expected when tests kill clients; only worth a note.
                        eprintln!("svc-lb-echo: connection: {e}");
                    }
                });
            }
            Err(e) => eprintln!("svc-lb-echo: accept: {e}"),
        }
    }
}

/// Serves HTTP/1.x requests on one connection until the client closes it or asks to.
fn serve_http(stream: TcpStream, body: &str) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let Some(req) = read_request(&mut reader)? else {
            return Ok(()); // clean close between requests
        };
        let close = req.wants_close();
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{}",
            body.len(),
            if close { "close" } else { "keep-alive" },
            if req.head_only { "" } else { body },
        );
        writer.write_all(response.as_bytes())?;
        writer.flush()?;
        if close {
            return Ok(());
        }
    }
}

struct Request {
    http10: bool,
    head_only: bool,
    connection: Option<String>,
}

impl Request {
    fn wants_close(&self) -> bool {
        match self.connection.as_deref() {
            Some(c) if c.eq_ignore_ascii_case("close") => true,
            Some(c) if c.eq_ignore_ascii_case("keep-alive") => false,
            _ => self.http10,
        }
    }
}

/// Reads one request (line, headers, and a Content-Length body which is discarded).
/// Returns `None` on EOF before a request started.
fn read_request<R: BufRead>(reader: &mut R) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let _target = parts.next();
    let version = parts.next().unwrap_or("HTTP/1.0");
    let mut req = Request {
        http10: version == "HTTP/1.0",
        head_only: method == "HEAD",
        connection: None,
    };
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "eof inside headers",
            ));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                content_length = v.parse().map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "bad content-length")
                })?;
            } else if k.eq_ignore_ascii_case("connection") {
                req.connection = Some(v.to_string());
            }
        }
    }
    io::copy(
        &mut reader.by_ref().take(content_length as u64),
        &mut io::sink(),
    )?;
    Ok(Some(req))
}

fn udp_loop(socket: UdpSocket, body: String) {
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                if let Err(e) = socket.send_to(body.as_bytes(), peer) {
                    eprintln!("svc-lb-echo: udp send to {peer}: {e}");
                }
            }
            Err(e) => eprintln!("svc-lb-echo: udp recv: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_and_keep_alive() {
        let raw = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nConnection: close\r\n\r\n";
        let mut r = BufReader::new(&raw[..]);
        let first = read_request(&mut r).unwrap().unwrap();
        assert!(!first.wants_close());
        let second = read_request(&mut r).unwrap().unwrap();
        assert!(second.wants_close());
        assert!(read_request(&mut r).unwrap().is_none());
    }

    #[test]
    fn http10_closes_by_default() {
        let mut r = BufReader::new(&b"GET / HTTP/1.0\r\n\r\n"[..]);
        assert!(read_request(&mut r).unwrap().unwrap().wants_close());
    }

    #[test]
    fn args_need_name_and_socket() {
        let a = |v: &[&str]| parse_args(v.iter().map(|s| s.to_string()));
        assert!(a(&["--tcp", "127.0.0.1:1"]).is_err());
        assert!(a(&["--name", "x"]).is_err());
        let ok = a(&["--name", "x", "--udp", "0.0.0.0:53", "--tcp", "0.0.0.0:80"]).unwrap();
        assert_eq!((ok.tcp.len(), ok.udp.len()), (1, 1));
    }
}
