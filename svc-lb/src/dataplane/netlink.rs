//! Just enough rtnetlink (NETLINK_ROUTE) to follow the interfaces of the network namespace:
//! dump the links (RTM_GETLINK) and receive RTM_NEWLINK/RTM_DELLINK from the RTMGRP_LINK group.
//! A raw socket with libc instead of a netlink crate: two message types and one attribute are
//! all we read.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd},
};

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const RTA_HDRLEN: usize = 4;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_IFNAME: u16 = 3;
const RTMGRP_LINK: u32 = 0x1;

/// Large enough for a whole dump batch of links (the kernel fills up to 32 KiB per recv).
const RECV_BUF: usize = 64 * 1024;

/// A link that exists (RTM_NEWLINK, also sent for every state change) or went away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    New { index: u32, name: String },
    Del { index: u32, name: String },
}

/// What one received buffer held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub events: Vec<LinkEvent>,
    /// NLMSG_DONE seen: the dump is complete.
    pub done: bool,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Parses the netlink messages in `buf` (as read from the socket, host byte order). Messages
/// other than links are skipped; a link without IFLA_IFNAME is skipped (it cannot be matched);
/// an NLMSG_ERROR with a non-zero code is returned as that errno.
pub fn parse(buf: &[u8]) -> io::Result<Parsed> {
    let mut out = Parsed::default();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32_at(buf, off) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("truncated netlink message (length {len} at offset {off})"),
            ));
        }
        let ty = u16_at(buf, off + 4);
        let body = &buf[off + NLMSG_HDRLEN..off + len];
        match ty {
            NLMSG_DONE => out.done = true,
            NLMSG_ERROR if body.len() >= 4 => {
                let code = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
            RTM_NEWLINK | RTM_DELLINK if body.len() >= IFINFOMSG_LEN => {
                let index = u32_at(body, 4);
                if let Some(name) = ifname(&body[IFINFOMSG_LEN..]) {
                    out.events.push(if ty == RTM_NEWLINK {
                        LinkEvent::New { index, name }
                    } else {
                        LinkEvent::Del { index, name }
                    });
                }
            }
            _ => {}
        }
        off += align4(len);
    }
    Ok(out)
}

/// The IFLA_IFNAME attribute (NUL-terminated) among the rtattrs in `attrs`.
fn ifname(attrs: &[u8]) -> Option<String> {
    let mut off = 0;
    while off + RTA_HDRLEN <= attrs.len() {
        let len = u16_at(attrs, off) as usize;
        if len < RTA_HDRLEN || off + len > attrs.len() {
            return None;
        }
        if u16_at(attrs, off + 2) == IFLA_IFNAME {
            let v = &attrs[off + RTA_HDRLEN..off + len];
            let v = v.split(|&b| b == 0).next().unwrap_or(v);
            return Some(String::from_utf8_lossy(v).into_owned());
        }
        off += align4(len);
    }
    None
}

/// A NETLINK_ROUTE socket bound to `groups`.
pub struct NlSocket {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl NlSocket {
    fn open(groups: u32) -> io::Result<NlSocket> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        sa.nl_groups = groups;
        // SAFETY: `sa` is a valid sockaddr_nl of the given length.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(NlSocket {
            fd,
            buf: vec![0; RECV_BUF],
        })
    }

    /// A socket receiving RTM_NEWLINK/RTM_DELLINK for every link change of this namespace.
    pub fn subscribe_links() -> io::Result<NlSocket> {
        NlSocket::open(RTMGRP_LINK)
    }

    /// Receives one datagram (blocking) and parses it. ENOBUFS means the kernel dropped events
    /// because we were slow: the caller must resynchronise with [`dump_links`].
    pub fn recv(&mut self) -> io::Result<Parsed> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr().cast(),
                self.buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        parse(&self.buf[..n as usize])
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The RTM_GETLINK dump request: nlmsghdr + an all-zero ifinfomsg (family AF_UNSPEC).
fn dump_request(seq: u32) -> [u8; NLMSG_HDRLEN + IFINFOMSG_LEN] {
    let mut req = [0u8; NLMSG_HDRLEN + IFINFOMSG_LEN];
    req[0..4].copy_from_slice(&((NLMSG_HDRLEN + IFINFOMSG_LEN) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
    req
}

/// Every link of the current network namespace as (ifindex, name).
pub fn dump_links() -> io::Result<Vec<(u32, String)>> {
    let mut sock = NlSocket::open(0)?;
    let req = dump_request(1);
    // SAFETY: `req` is valid for reads of its length; the kernel is the default destination.
    let n = unsafe { libc::send(sock.fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut links = Vec::new();
    loop {
        let parsed = sock.recv()?;
        for ev in parsed.events {
            if let LinkEvent::New { index, name } = ev {
                links.push((index, name));
            }
        }
        if parsed.done {
            return Ok(links);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One netlink message of type `ty` with an ifinfomsg for `index` and the given rtattrs.
    fn link_msg(ty: u16, index: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        for (t, v) in attrs {
            let len = RTA_HDRLEN + v.len();
            body.extend_from_slice(&(len as u16).to_ne_bytes());
            body.extend_from_slice(&t.to_ne_bytes());
            body.extend_from_slice(v);
            body.resize(align4(body.len()), 0);
        }
        msg(ty, &body)
    }

    fn msg(ty: u16, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        m.resize(align4(m.len()), 0);
        m
    }

    #[test]
    fn parses_new_and_del_links_with_names() {
        let mut buf = link_msg(
            RTM_NEWLINK,
            7,
            &[(4, &1500u32.to_ne_bytes()), (IFLA_IFNAME, b"lxc1\0")],
        );
        buf.extend(link_msg(RTM_DELLINK, 9, &[(IFLA_IFNAME, b"n-p12\0")]));
        // A link without a name is skipped, an unrelated message type too.
        buf.extend(link_msg(RTM_NEWLINK, 3, &[(4, &[0; 4])]));
        buf.extend(msg(20, &[0; 8]));
        let p = parse(&buf).unwrap();
        assert_eq!(
            p.events,
            [
                LinkEvent::New {
                    index: 7,
                    name: "lxc1".into()
                },
                LinkEvent::Del {
                    index: 9,
                    name: "n-p12".into()
                }
            ]
        );
        assert!(!p.done);
    }

    #[test]
    fn done_and_errors() {
        let p = parse(&msg(NLMSG_DONE, &0i32.to_ne_bytes())).unwrap();
        assert!(p.done && p.events.is_empty());
        let err = parse(&msg(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes())).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        // An ack (error 0) is not an error.
        assert!(
            parse(&msg(NLMSG_ERROR, &[0; 20]))
                .unwrap()
                .events
                .is_empty()
        );
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let mut m = link_msg(RTM_NEWLINK, 1, &[(IFLA_IFNAME, b"eth0\0")]);
        m.truncate(m.len() - 4);
        assert!(parse(&m).is_err());
        // A bad attribute length ends the attribute walk without a name.
        let bad = link_msg(RTM_NEWLINK, 1, &[(IFLA_IFNAME, b"x\0")]);
        let mut bad2 = bad.clone();
        bad2[NLMSG_HDRLEN + IFINFOMSG_LEN] = 200;
        assert!(parse(&bad2).unwrap().events.is_empty());
    }

    #[test]
    fn dump_of_this_namespace_has_loopback() {
        let links = dump_links().unwrap();
        assert!(links.iter().any(|(i, n)| *i == 1 && n == "lo"), "{links:?}");
    }
}
