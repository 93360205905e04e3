//! The kernel–user contract: the eBPF object's maps and programs are exactly the names
//! `svc-lb-common` lists (`ALL_MAPS`, `ALL_PROGRAMS`), both ways. `#[map(name = ...)]` in
//! `svc-lb-ebpf/src/maps.rs` needs literals, so this is what catches a renamed, added or
//! dropped map or program on one side only. Needs root (loading creates the maps); fails,
//! never skips.

use std::collections::BTreeSet;

use svc_lb_common::{ALL_MAPS, ALL_PROGRAMS};
use svc_lb_tests::prog::{PinDir, load_object};

/// Maps the object has that are not svc-lb's: aya-log's record buffer, and the maps aya makes
/// for global data sections (`.rodata`, `.bss`, `.data`, e.g. aya-log's level filter). They
/// are never pinned.
fn aya_internal(name: &str) -> bool {
    name == "AYA_LOGS" || name.starts_with('.')
}

#[test]
fn object_maps_and_programs_are_svc_lb_commons_lists() {
    let dir = PinDir::new("contract");
    let ebpf = load_object(&dir.0);

    let object_maps: BTreeSet<&str> = ebpf
        .maps()
        .map(|(name, _)| name)
        .filter(|name| !aya_internal(name))
        .collect();
    let listed_maps: BTreeSet<&str> = ALL_MAPS.into_iter().collect();
    assert_eq!(ALL_MAPS.len(), listed_maps.len(), "ALL_MAPS has duplicates");
    assert_eq!(
        object_maps.difference(&listed_maps).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "maps in the eBPF object missing from svc_lb_common::ALL_MAPS"
    );
    assert_eq!(
        listed_maps.difference(&object_maps).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "svc_lb_common::ALL_MAPS names missing from the eBPF object"
    );
    for name in ALL_MAPS {
        assert!(
            dir.0.join(name).exists(),
            "map {name} is not pinned by name"
        );
    }

    let object_progs: BTreeSet<&str> = ebpf.programs().map(|(name, _)| name).collect();
    let listed_progs: BTreeSet<&str> = ALL_PROGRAMS.into_iter().collect();
    assert_eq!(
        ALL_PROGRAMS.len(),
        listed_progs.len(),
        "ALL_PROGRAMS has duplicates"
    );
    assert_eq!(
        object_progs.difference(&listed_progs).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "programs in the eBPF object missing from svc_lb_common::ALL_PROGRAMS"
    );
    assert_eq!(
        listed_progs.difference(&object_progs).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "svc_lb_common::ALL_PROGRAMS names missing from the eBPF object"
    );
}
