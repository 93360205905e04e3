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
