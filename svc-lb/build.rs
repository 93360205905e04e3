//! Builds `svc-lb-ebpf` for the BPF target with a date-pinned nightly and places the object in
//! OUT_DIR, where `dataplane` embeds it.

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// The nightly's LLVM major must equal bpf-linker's (LLVM 22 from Debian); a newer nightly with
/// LLVM 23 fails in the linker with "Invalid record". Override with SVC_LB_EBPF_TOOLCHAIN.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "svc-lb-ebpf")
        .ok_or_else(|| anyhow!("svc-lb-ebpf package not found"))?;
    let cargo_metadata::Package {
        name,
        manifest_path,
        ..
    } = ebpf_package;
    let ebpf_package = aya_build::Package {
        name: name.as_str(),
        root_dir: manifest_path
            .parent()
            .ok_or_else(|| anyhow!("no parent for {manifest_path}"))?
            .as_str(),
        ..Default::default()
    };
    println!("cargo:rerun-if-env-changed=SVC_LB_EBPF_TOOLCHAIN");
    let pinned = std::env::var("SVC_LB_EBPF_TOOLCHAIN").ok();
    let toolchain = match pinned.as_deref() {
        Some(t) if !t.is_empty() => t,
        _ => EBPF_TOOLCHAIN,
    };
    aya_build::build_ebpf([ebpf_package], Toolchain::Custom(toolchain))
}
