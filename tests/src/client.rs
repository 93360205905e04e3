//! A tiny HTTP/1.1 and UDP client for tests. Sockets are created inside a namespace (see
//! [`Netns::in_ns`]) and then used from the test thread. Every operation has a timeout.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use crate::netns::Netns;

pub const TIMEOUT: Duration = Duration::from_secs(3);

/// Connects to `addr` from inside `ns`.
pub fn connect(ns: &Netns, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    ns.in_ns(move || TcpStream::connect_timeout(&addr, timeout))
}

/// One GET on a new connection (`Connection: close`); returns the trimmed body, i.e. the name of
/// the backend that answered.
pub fn http_get(ns: &Netns, addr: SocketAddr) -> io::Result<String> {
    http_get_within(ns, addr, TIMEOUT)
}

/// [`http_get`] with a shorter connect and read timeout, for polling until something starts
/// working: a SYN dropped before the Service was programmed would otherwise cost the 1 s SYN
/// retransmission (the node rate-limits its ICMP unreachables, so not every probe fails fast).
pub fn http_get_within(ns: &Netns, addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    let mut conn = HttpConn::connect_within(ns, addr, timeout)?;
    conn.request(true)
}

/// A keep-alive HTTP connection: many requests over the same TCP connection.
pub struct HttpConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    pub local: SocketAddr,
}

impl HttpConn {
    pub fn connect(ns: &Netns, addr: SocketAddr) -> io::Result<HttpConn> {
        Self::connect_within(ns, addr, TIMEOUT)
    }

    pub fn connect_within(ns: &Netns, addr: SocketAddr, timeout: Duration) -> io::Result<HttpConn> {
        let stream = connect(ns, addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            local: stream.local_addr()?,
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// GET / and return the trimmed body.
    pub fn get(&mut self) -> io::Result<String> {
        self.request(false)
    }

    fn request(&mut self, close: bool) -> io::Result<String> {
        let conn = if close { "close" } else { "keep-alive" };
        write!(
            self.writer,
            "GET / HTTP/1.1\r\nHost: svc-lb-test\r\nConnection: {conn}\r\n\r\n"
        )?;
        self.writer.flush()?;
        let mut status = String::new();
        if self.reader.read_line(&mut status)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the response",
            ));
        }
        if !status.starts_with("HTTP/1.1 200") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected status line {status:?}"),
            ));
        }
        let mut len = None;
        loop {
            let mut h = String::new();
            if self.reader.read_line(&mut h)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "eof in headers",
                ));
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.trim().eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse::<usize>().ok();
            }
        }
        let len = len.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no length"))?;
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body)?;
        Ok(String::from_utf8_lossy(&body).trim().to_string())
    }
}

/// Sends one datagram to `addr` from a connected socket in `ns` and returns the trimmed reply.
/// A connected socket only accepts replies from `addr`, so this also checks the reverse NAT.
pub fn udp_request(ns: &Netns, addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    let sock = ns.in_ns(move || -> io::Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(addr)?;
        Ok(s)
    })?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send(b"ping\n")?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}
