//! Booting a guest: checking and loading its ELF image, writing the boot
//! structures (GDT, TSSes, boot page tables, boot info), and the register
//! state each vCPU starts with.

pub mod loader;
pub mod regs;
pub mod structures;

pub use loader::{ImageLayout, LoaderError};
pub use structures::{BootError, BootParams, write_boot_structures};
