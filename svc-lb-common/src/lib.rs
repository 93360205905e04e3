//! Types and pure logic shared by the svc-lb datapath (`svc-lb-ebpf`) and the agent (`svc-lb`).
//!
//! Everything here is `no_std` so the eBPF crate can use it, and host-testable so the logic the
//! datapath relies on (slot choice, checksum updates, key layout) is unit-tested without a kernel.
#![no_std]
// The crate is the kernel–user contract: every public item says what it means on both sides.
#![warn(missing_docs)]

pub mod csum;
pub mod flags;
pub mod maglev;
pub mod maps;
pub mod programs;
pub mod select;
pub mod sock;

pub use flags::*;
pub use maps::*;
pub use programs::*;
pub use sock::*;
