//! `cargo xtask run [--release] -- ARGS…`: build svc-lb and run it with ARGS as root, the way
//! aya-template's runner (`sudo -E`) does, so trying it on a Linux VM is one command:
//! `cargo xtask run -- run --manifests examples --iface eth0`.

use std::{
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Result, bail};

use crate::{
    run::{self, Steps},
    setup,
};

/// Installs what is missing (like `setup`), builds, then replaces this process with svc-lb so
/// Ctrl-C and the exit status are svc-lb's own.
pub fn launch(release: bool, args: &[OsString]) -> Result<()> {
    let started = Instant::now();
    let mut steps = Steps::new(4);
    let res = setup::run_setup(&mut steps).and_then(|()| {
        steps.step("cargo build -p svc-lb", || {
            let mut cmd = run::cargo();
            cmd.args(["build", "-p", "svc-lb"]);
            if release {
                cmd.arg("--release");
            }
            run::run_ok("cargo build", &mut cmd)
        })
    });
    steps.summary(started);
    res?;
    let bin = binary(&target_dir(), release);
    if !bin.exists() {
        bail!("{} was not built", bin.display());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let mut cmd = command(&bin, args, euid == 0);
    println!("==> {}", run::describe(&cmd));
    // exec only returns on failure.
    let err = cmd.exec();
    bail!("cannot run {}: {err}", run::describe(&cmd))
}

/// `CARGO_TARGET_DIR` when set (cargo builds there), else the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    )
}

fn binary(target: &Path, release: bool) -> PathBuf {
    target
        .join(if release { "release" } else { "debug" })
        .join("svc-lb")
}

/// svc-lb needs root (BPF, bpffs, netlink): as root it runs directly, otherwise through
/// `sudo -E` (keeping RUST_LOG and the like), as aya-template's cargo runner does.
fn command(bin: &Path, args: &[OsString], root: bool) -> Command {
    let mut cmd = if root {
        Command::new(bin)
    } else {
        let mut sudo = Command::new("sudo");
        sudo.arg("-E").arg(bin);
        sudo
    };
    cmd.args(args);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(cmd: &Command) -> Vec<String> {
        std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn runs_directly_as_root_and_through_sudo_otherwise() {
        let bin = binary(Path::new("/t"), true);
        assert_eq!(bin, Path::new("/t/release/svc-lb"));
        let args: Vec<OsString> = ["run", "--manifests", "examples"].map(Into::into).into();
        assert_eq!(
            argv(&command(&bin, &args, true)),
            ["/t/release/svc-lb", "run", "--manifests", "examples"]
        );
        assert_eq!(
            argv(&command(&binary(Path::new("/t"), false), &args, false)),
            [
                "sudo",
                "-E",
                "/t/debug/svc-lb",
                "run",
                "--manifests",
                "examples"
            ]
        );
    }
}
