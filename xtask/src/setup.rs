//! `cargo xtask setup`: install only what is missing. Safe to run again and again.

use std::{process::Command, time::Instant};

use anyhow::{Result, bail};

use crate::run::{self, Steps};

/// apt packages bpf-linker needs (LLVM 22): enough to build svc-lb.
const BUILD_APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];

/// apt packages: LLVM 22 for bpf-linker, and the tools the tests and demo use.
pub const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // `cargo xtask image` (static musl build, buildah), which `cargo xtask test` runs, and the
    // container end-to-end test (podman with runc: crun refuses hybrid cgroup hosts).
    "musl-tools",
    "buildah",
    "podman",
    "runc",
    "iproute2",
    "curl",
    "ethtool",
    "tcpdump",
    "bpftool",
    "netcat-openbsd",
    // svc-lb-bench's tests load the kube-proxy baseline rules with these.
    "iptables",
    "nftables",
    // The DNS responder's end-to-end test queries it with dig.
    "dnsutils",
    // The dashboard's end-to-end test renders it in headless Chromium.
    "chromium",
];

/// The eBPF crate's toolchain: its LLVM major (22) must match bpf-linker's.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";
const BPF_LINKER: &str = "bpf-linker@0.13.0";

pub fn setup() -> Result<()> {
    let started = Instant::now();
    let mut steps = Steps::new(3);
    let res = run_setup(&mut steps);
    steps.summary(started);
    res
}

/// The three setup steps, numbered within `steps` (callers may add their own steps after).
pub fn run_setup(steps: &mut Steps) -> Result<()> {
    setup_steps(steps, APT_PACKAGES)
}

/// Setup for building only (`cargo xtask image`): bpf-linker's packages plus `extra`, without
/// the test tools; then the toolchain and bpf-linker as in [`run_setup`].
pub fn run_build_setup(steps: &mut Steps, extra: &[&str]) -> Result<()> {
    let packages: Vec<&str> = BUILD_APT_PACKAGES.iter().chain(extra).copied().collect();
    setup_steps(steps, &packages)
}

fn setup_steps(steps: &mut Steps, packages: &[&str]) -> Result<()> {
    steps.step("apt packages", || apt_install(packages))?;
    steps.step(
        &format!("rust toolchain {EBPF_TOOLCHAIN} + rust-src, clippy"),
        toolchain,
    )?;
    steps.step("bpf-linker 0.13 (LLVM 22)", bpf_linker)?;
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "install ok installed")
}

/// Installs those of `packages` that are missing (one `apt-get update` first) and fails unless all
/// are installed afterwards.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        println!("    all {} packages already installed", packages.len());
        return Ok(());
    }
    println!("    missing: {}", missing.join(" "));
    let noninteractive = |c: &mut Command| {
        c.env("DEBIAN_FRONTEND", "noninteractive");
    };
    let mut update = Command::new("apt-get");
    update.arg("update");
    noninteractive(&mut update);
    run::run_ok("apt-get update", &mut update)?;
    let mut install = Command::new("apt-get");
    install.args(["install", "-y"]).args(&missing);
    noninteractive(&mut install);
    run::run_ok("apt-get install", &mut install)?;
    let still: Vec<&str> = missing.into_iter().filter(|p| !installed(p)).collect();
    if !still.is_empty() {
        bail!("still not installed after apt-get: {}", still.join(" "));
    }
    Ok(())
}

/// Components of the eBPF toolchain: `rust-src` for `-Z build-std=core`, clippy for
/// [`ebpf_clippy`].
const EBPF_COMPONENTS: &[&str] = &["rust-src", "clippy"];

fn toolchain() -> Result<()> {
    let list = run::quiet(Command::new("rustup").args(["toolchain", "list"]))?;
    let have_toolchain = list.lines().any(|l| l.starts_with(EBPF_TOOLCHAIN));
    let missing: Vec<&str> = if have_toolchain {
        let installed = run::quiet(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ]))?;
        EBPF_COMPONENTS
            .iter()
            .copied()
            .filter(|c| !installed.lines().any(|l| l.trim().starts_with(c)))
            .collect()
    } else {
        EBPF_COMPONENTS.to_vec()
    };
    if missing.is_empty() {
        println!(
            "    {EBPF_TOOLCHAIN} with {} already installed",
            EBPF_COMPONENTS.join(", ")
        );
        return Ok(());
    }
    if have_toolchain {
        return run::run_ok(
            "rustup component add",
            Command::new("rustup")
                .args(["component", "add", "--toolchain", EBPF_TOOLCHAIN])
                .args(&missing),
        );
    }
    let mut install = Command::new("rustup");
    install.args([
        "toolchain",
        "install",
        EBPF_TOOLCHAIN,
        "--profile",
        "minimal",
        "--no-self-update",
    ]);
    for c in EBPF_COMPONENTS {
        install.args(["-c", c]);
    }
    run::run_ok("rustup toolchain install", &mut install)
}

/// `cargo clippy -D warnings` on `svc-lb-ebpf` the way svc-lb/build.rs (aya-build) builds it:
/// the pinned nightly, the BPF target, `-Z build-std=core`, release, `bpf_target_arch` set. Its
/// own target directory (`<target>/ebpf-clippy`): the flags differ from every host build.
pub fn ebpf_clippy() -> Result<()> {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("ebpf-clippy");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", EBPF_TOOLCHAIN, "cargo", "clippy"])
        .args(["--package", "svc-lb-ebpf", "--lib", "--bins", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .args(["--", "-D", "warnings"])
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        );
    // As aya-build does: the outer cargo's RUSTC would replace the nightly's, and its CARGO
    // would run the stable cargo under `rustup run`.
    for key in ["RUSTC", "RUSTC_WORKSPACE_WRAPPER", "CARGO"] {
        cmd.env_remove(key);
    }
    run::run_ok("cargo clippy (svc-lb-ebpf)", &mut cmd)
}

fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn bpf_linker() -> Result<()> {
    if let Some(v) = bpf_linker_version()
        && v.split_whitespace()
            .nth(1)
            .is_some_and(|v| v.starts_with("0.13."))
    {
        println!("    {v} already installed");
        return Ok(());
    }
    // The default feature links LLVM 23, which Debian does not ship: pick LLVM 22 explicitly.
    run::run_ok(
        "cargo install bpf-linker",
        run::cargo()
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args(["install", BPF_LINKER, "--no-default-features"])
            .args(["--features", "llvm-22"]),
    )?;
    match bpf_linker_version() {
        Some(v) => {
            println!("    installed {v}");
            Ok(())
        }
        None => bail!("bpf-linker still not runnable (is ~/.cargo/bin on PATH?)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cargo xtask test` runs setup, then builds the image without the build-only setup.
    #[test]
    fn full_setup_has_the_build_packages() {
        for p in BUILD_APT_PACKAGES.iter().chain(crate::image::APT_PACKAGES) {
            assert!(APT_PACKAGES.contains(p), "{p} missing from APT_PACKAGES");
        }
    }
}
