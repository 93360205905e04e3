//! The bpf(2) commands aya 0.14 does not expose for a pinned link: get an fd from a pin path
//! (BPF_OBJ_GET), detach a link synchronously (BPF_LINK_DETACH) and swap the program of any
//! link type in place (BPF_LINK_UPDATE; aya only offers it per program type).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `union bpf_attr` member for BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` member for BPF_LINK_UPDATE.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `union bpf_attr` member for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info` (the kernel copies at most the length we pass). The union
/// after `prog_id` is 8-aligned: `tcx.ifindex`/`xdp.ifindex` (u32) or `cgroup.cgroup_id` (u64)
/// come first, and the kernel zeroes them when the link is detached.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    target: u64,
    _rest: [u64; 4],
}

const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_XDP: u32 = 6;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// `union bpf_attr` member for BPF_LINK_DETACH.
#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
    _pad: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a properly sized, zero-padded bpf_attr prefix for `cmd`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// An fd for the bpf object pinned at `pin`; `Ok(None)` when there is no such pin.
pub fn obj_get(pin: &Path) -> io::Result<Option<OwnedFd>> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    match bpf(BPF_OBJ_GET, &mut get) {
        // SAFETY: BPF_OBJ_GET returned a new fd that we now own.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether the link `fd` is still attached to its interface or cgroup (TCX, XDP and cgroup
/// links; other types are reported attached).
pub fn link_attached(fd: &OwnedFd) -> io::Result<bool> {
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: (&mut info as *mut LinkInfo) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(match info.link_type {
        // The ifindex is the u32 at the start of the union (the attach type follows it).
        BPF_LINK_TYPE_XDP | BPF_LINK_TYPE_TCX => first_u32(info.target) != 0,
        BPF_LINK_TYPE_CGROUP => info.target != 0,
        _ => true,
    })
}

/// The u32 stored first in a u64 that was written as bytes by the kernel.
fn first_u32(word: u64) -> u32 {
    let b = word.to_ne_bytes();
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

/// Makes the link pinned at `pin` run `prog` instead of its current program, atomically (no
/// packet or socket call sees neither program). Works for every link type that supports
/// updates (TCX, XDP, cgroup); fails with ENOLINK when the link is detached (e.g. its
/// interface was deleted) and NotFound when there is no pin.
pub fn update_pinned_link(pin: &Path, prog: BorrowedFd<'_>) -> io::Result<()> {
    let Some(link) = obj_get(pin)? else {
        return Err(io::Error::from(io::ErrorKind::NotFound));
    };
    let mut update = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut update).map(|_| ())
}

/// Detaches the link pinned at `pin`. A missing pin, or a link that is already detached (its
/// interface was deleted), is not an error.
pub fn detach_pinned_link(pin: &Path) -> io::Result<()> {
    let Some(fd) = obj_get(pin)? else {
        return Ok(());
    };
    let mut detach = LinkDetachAttr {
        link_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    match bpf(BPF_LINK_DETACH, &mut detach) {
        Ok(_) => Ok(()),
        // ENOLINK: the link's device is gone, nothing attached any more.
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => Ok(()),
        Err(e) => Err(e),
    }
}
