//! `cargo xtask image`: the svc-lb container image, built with Debian's buildah.
//!
//! 1. svc-lb for `x86_64-unknown-linux-musl`, release: one static binary (the eBPF object is
//!    embedded by svc-lb/build.rs as for every build), checked to need no program interpreter.
//! 2. `buildah build` of the repository's `Containerfile`, whose `build` stage is replaced by a
//!    build context holding that binary, so Docker users and this task build the same last stage
//!    (`FROM scratch`, the binary, the `org.opencontainers.image.*` labels, the entrypoint).
//! 3. `buildah push` to an OCI archive and a `docker load`-able archive under `target/image/`.
//!
//! buildah runs on a private store under `target/image/` (vfs: no mounts to clean up), removed
//! afterwards, so the machine's own container storage is never touched.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    launch::target_dir,
    run::{self, Steps},
    setup,
};

/// The target of the static binary.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// What the image needs besides the eBPF toolchain: musl-gcc for the C parts (ring) of the
/// static build, and the image tool.
pub const APT_PACKAGES: &[&str] = &["musl-tools", "buildah"];
/// Workspace version; svc-lb and xtask both inherit `workspace.package.version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The name the image is built and archived under. `localhost/` keeps it from ever resolving to
/// a registry image of the same name: containerd, CRI-O and podman all keep it as is, which is
/// what deploy/daemonset.yaml refers to.
pub const REPOSITORY: &str = "localhost/svc-lb";

/// `localhost/svc-lb:<version>`.
pub fn reference() -> String {
    format!("{REPOSITORY}:{VERSION}")
}

/// Where the archives go: `<target>/image/`.
pub fn image_dir(target: &Path) -> PathBuf {
    target.join("image")
}

/// `svc-lb-<version>.oci.tar` (OCI image layout archive: `skopeo copy oci-archive:…`,
/// `ctr images import`).
pub fn oci_archive(target: &Path) -> PathBuf {
    image_dir(target).join(format!("svc-lb-{VERSION}.oci.tar"))
}

/// `svc-lb-<version>.docker.tar` (`docker load -i`, `podman load -i`, `kind load image-archive`,
/// `ctr -n k8s.io images import`).
pub fn docker_archive(target: &Path) -> PathBuf {
    image_dir(target).join(format!("svc-lb-{VERSION}.docker.tar"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// `cargo xtask image [--binary-only]`: setup for the build, then the image steps.
pub fn image(binary_only: bool) -> Result<()> {
    let started = Instant::now();
    let mut steps = Steps::new(if binary_only { 5 } else { 7 });
    let res = setup::run_build_setup(&mut steps, APT_PACKAGES).and_then(|()| {
        let target = target_dir();
        steps.step(&format!("rust target {MUSL_TARGET}"), musl_target)?;
        steps.step(
            &format!("cargo build -p svc-lb --release --target {MUSL_TARGET}"),
            || build_static(&target),
        )?;
        steps.step("check the binary is static, stage it", || {
            stage_binary(&target)
        })?;
        if binary_only {
            return Ok(());
        }
        steps.step("buildah build (Containerfile, last stage)", || {
            build_image(&target)
        })?;
        steps.step("archives under target/image/", || report(&target))
    });
    steps.summary(started);
    res
}

/// The staged copy of the static binary: the build context of the Containerfile's last stage.
fn context_dir(target: &Path) -> PathBuf {
    image_dir(target).join("context")
}

fn stage_binary(target: &Path) -> Result<()> {
    let bin = static_binary(target);
    check_static(&bin)?;
    let context = context_dir(target);
    fs::create_dir_all(&context).with_context(|| format!("create {}", context.display()))?;
    let staged = context.join("svc-lb");
    fs::copy(&bin, &staged)
        .with_context(|| format!("copy {} to {}", bin.display(), staged.display()))?;
    let size = fs::metadata(&staged)?.len();
    println!(
        "    {} ({:.1} MiB) is static",
        staged.display(),
        size as f64 / 1048576.0
    );
    Ok(())
}

fn report(target: &Path) -> Result<()> {
    let (oci, docker) = (oci_archive(target), docker_archive(target));
    for f in [&oci, &docker] {
        let len = fs::metadata(f)
            .with_context(|| format!("{}", f.display()))?
            .len();
        println!("    {} ({:.1} MiB)", f.display(), len as f64 / 1048576.0);
    }
    println!("    image {}", reference());
    println!("    load it: docker load -i {}", docker.display());
    println!("             podman load -i {}", docker.display());
    println!("             kind load image-archive {}", docker.display());
    println!(
        "             ctr -n k8s.io images import {}   (containerd nodes)",
        docker.display()
    );
    Ok(())
}

fn musl_target() -> Result<()> {
    let installed = run::quiet(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l.trim() == MUSL_TARGET) {
        println!("    {MUSL_TARGET} already installed");
        return Ok(());
    }
    run::run_ok(
        "rustup target add",
        Command::new("rustup").args(["target", "add", MUSL_TARGET]),
    )
}

fn static_binary(target: &Path) -> PathBuf {
    target.join(MUSL_TARGET).join("release").join("svc-lb")
}

fn build_static(target: &Path) -> Result<()> {
    run::run_ok(
        "cargo build",
        run::cargo()
            // Explicit: target_dir() is where the binary is looked for afterwards.
            .env("CARGO_TARGET_DIR", target)
            .args([
                "build",
                "-p",
                "svc-lb",
                "--release",
                "--target",
                MUSL_TARGET,
            ]),
    )
}

/// ELF program header type of the dynamic loader request.
const PT_INTERP: u32 = 3;

/// Fails unless `path` is a 64-bit little-endian ELF executable without a `PT_INTERP` header,
/// i.e. it runs in an empty image with no dynamic loader (static or static-pie).
pub fn check_static(path: &Path) -> Result<()> {
    let data = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    match interpreter(&data) {
        Ok(None) => Ok(()),
        Ok(Some(interp)) => bail!(
            "{} is dynamically linked (interpreter {interp}); it would not run FROM scratch",
            path.display()
        ),
        Err(e) => bail!("{}: {e}", path.display()),
    }
}

/// The `PT_INTERP` path of an ELF64 little-endian file, `None` if it has none.
fn interpreter(data: &[u8]) -> Result<Option<String>, String> {
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if data.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    // EI_CLASS = ELFCLASS64, EI_DATA = little endian.
    if data.get(4..6) != Some(&[2, 1]) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let short = || "truncated ELF header".to_string();
    let phoff = u64_at(0x20).ok_or_else(short)? as usize;
    let phentsize = u16_at(0x36).ok_or_else(short)? as usize;
    let phnum = u16_at(0x38).ok_or_else(short)? as usize;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph).ok_or_else(short)? == PT_INTERP {
            let off = u64_at(ph + 8).ok_or_else(short)? as usize;
            let size = u64_at(ph + 32).ok_or_else(short)? as usize;
            let raw = data.get(off..off + size).ok_or_else(short)?;
            let path = raw.split(|b| *b == 0).next().unwrap_or_default();
            return Ok(Some(String::from_utf8_lossy(path).into_owned()));
        }
    }
    Ok(None)
}

/// `git rev-parse HEAD` (with `-dirty` if the work tree has changes), or "unknown" without git.
fn revision() -> String {
    let root = workspace_root();
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(head) if git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty()) => {
            format!("{head}-dirty")
        }
        Some(head) => head,
        None => "unknown".into(),
    }
}

/// The commit's time (seconds since the epoch) for `--timestamp`: the same commit gives the
/// same image digest. `None` without git.
fn commit_time() -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(workspace_root())
        .args(["log", "-1", "--format=%ct"])
        .output()
        .ok()?;
    let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !t.is_empty()).then_some(t)
}

/// buildah on the private store under `<image dir>/storage`.
fn buildah(store: &Path) -> Command {
    let mut cmd = Command::new("buildah");
    cmd.arg("--root")
        .arg(store.join("root"))
        .arg("--runroot")
        .arg(store.join("run"))
        .args(["--storage-driver", "vfs"]);
    cmd
}

/// Removes the private store (vfs layers are plain directories: nothing is mounted).
fn remove_store(store: &Path) -> Result<()> {
    if store.exists() {
        fs::remove_dir_all(store).with_context(|| format!("remove {}", store.display()))?;
    }
    Ok(())
}

fn build_image(target: &Path) -> Result<()> {
    let context = context_dir(target);
    let dir = image_dir(target);
    let store = dir.join("storage");
    // A store left by an interrupted run holds nothing worth keeping.
    remove_store(&store)?;
    let res = build_in_store(target, &context, &store);
    let removed = remove_store(&store);
    res.and(removed)
}

fn build_in_store(target: &Path, context: &Path, store: &Path) -> Result<()> {
    let reference = reference();
    let mut build = buildah(store);
    build
        .arg("build")
        .arg("--file")
        .arg(workspace_root().join("Containerfile"))
        // Replaces the Containerfile's `build` stage (which would compile in a Rust image pulled
        // from a registry) with the binary built above; that stage is then never run.
        .arg("--build-context")
        .arg(format!("build={}", context.display()))
        .args(["--build-arg", &format!("VERSION={VERSION}")])
        .args(["--build-arg", &format!("REVISION={}", revision())])
        .args(["--tag", &reference]);
    if let Some(t) = commit_time() {
        build.args(["--timestamp", &t]);
    }
    // The build context of the last stage is unused (it copies from `build` only): give the
    // empty-but-for-the-binary context directory rather than the whole repository.
    build.arg(context);
    run::run_ok("buildah build", &mut build)?;

    let (oci, docker) = (oci_archive(target), docker_archive(target));
    for (archive, transport) in [(&oci, "oci-archive"), (&docker, "docker-archive")] {
        // buildah refuses to overwrite some archive kinds: start from nothing.
        if archive.exists() {
            fs::remove_file(archive).with_context(|| format!("remove {}", archive.display()))?;
        }
        run::run_ok(
            "buildah push",
            buildah(store).args([
                "push",
                &reference,
                &format!("{transport}:{}:{reference}", archive.display()),
            ]),
        )?;
    }
    // What a runtime will see: the labels and the entrypoint, read back from the archive.
    let config = run::quiet(
        buildah(store)
            .args(["inspect", "--type", "image", "--format"])
            .arg("{{.OCIv1.Config.Entrypoint}} {{.OCIv1.Config.Labels}}")
            .arg(&reference),
    )?;
    println!("    {}", config.trim());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_cargo_version() {
        assert_eq!(reference(), format!("localhost/svc-lb:{VERSION}"));
        let t = Path::new("/t");
        assert_eq!(
            oci_archive(t),
            Path::new(&format!("/t/image/svc-lb-{VERSION}.oci.tar"))
        );
        assert_eq!(
            docker_archive(t),
            Path::new(&format!("/t/image/svc-lb-{VERSION}.docker.tar"))
        );
    }

    /// The Containerfile's default VERSION (used by `docker build` without build args) is the
    /// Cargo version, and the DaemonSet runs exactly the image this task produces.
    #[test]
    fn containerfile_and_daemonset_name_this_version() {
        let root = workspace_root();
        let cf = fs::read_to_string(root.join("Containerfile")).unwrap();
        assert!(
            cf.lines()
                .any(|l| l.trim() == format!("ARG VERSION={VERSION}")),
            "Containerfile: `ARG VERSION={VERSION}` expected"
        );
        let ds = fs::read_to_string(root.join("deploy/daemonset.yaml")).unwrap();
        let images: Vec<&str> = ds
            .lines()
            .filter_map(|l| l.trim().strip_prefix("image:"))
            .map(str::trim)
            .collect();
        assert_eq!(images, [reference().as_str()], "deploy/daemonset.yaml");
    }

    /// A minimal ELF64 image: header plus `phnum` program headers of the given types, the
    /// interpreter string right after them.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut d = vec![0u8; 64];
        d[..4].copy_from_slice(b"\x7fELF");
        d[4] = 2;
        d[5] = 1;
        d[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        d[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        d[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        let interp = b"/lib/ld-musl-x86_64.so.1\0";
        let interp_off = 64 + 56 * types.len();
        for t in types {
            let mut ph = [0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            ph[8..16].copy_from_slice(&(interp_off as u64).to_le_bytes());
            ph[32..40].copy_from_slice(&(interp.len() as u64).to_le_bytes());
            d.extend_from_slice(&ph);
        }
        d.extend_from_slice(interp);
        d
    }

    #[test]
    fn finds_the_interpreter_of_dynamic_binaries_only() {
        // PT_LOAD, PT_DYNAMIC: static-pie.
        assert_eq!(interpreter(&elf(&[1, 2])), Ok(None));
        assert_eq!(
            interpreter(&elf(&[6, PT_INTERP, 1])),
            Ok(Some("/lib/ld-musl-x86_64.so.1".into()))
        );
        assert!(interpreter(b"#!/bin/sh\n").is_err());
        assert!(interpreter(&elf(&[PT_INTERP])[..70]).is_err());
        // The test binary itself is dynamically linked (gnu target).
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(interpreter(&me).unwrap().is_some());
    }
}
