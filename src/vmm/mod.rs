//! The VMM: KVM VM and vCPUs, guest RAM, boot, exits, serial, hypercalls,
//! vCPU kicks, and the built-in guests.
//!
//! ```text
//! run::run ─> config (validate) ─> guests / loader (check the ELF)
//!          ─> vm (KVM, RAM as memslot 0) ─> loader (copy) ─> boot (GDT, TSS, tables, boot info)
//!          ─> vcpu threads: KVM_RUN ─> exit::VmExit ─> pio (serial, exit port)
//!                                                   └─> hypercall (PagingOps: kvm or shadow)
//!          ─> kick (signal + immediate_exit) for stop and TLB shootdowns
//! ```
//!
//! The guest ABI is in `docs/guest-abi.md` and [`abi`].
//!
//! # Example
//!
//! ```no_run
//! use shadowvm::vmm::{self, GuestSource, VmConfig};
//!
//! let config = VmConfig::new(GuestSource::Builtin("hello".into()));
//! let report = vmm::run(&config, Box::new(std::io::stdout())).unwrap();
//! println!("{}", report.outcome);
//! ```

pub mod abi;
pub mod boot;
pub mod config;
pub mod cpu_state;
pub mod demo;
pub mod error;
pub mod exit;
pub mod guests;
pub mod hostops;
pub mod hypercall;
pub mod kick;
pub mod ksmd;
pub mod kswapd;
pub mod loader;
pub mod memory;
pub mod pio;
pub mod run;
pub mod serial;
pub mod shadow;
pub mod stats;
pub mod stress;
pub mod tlb;
pub mod trace_fmt;
pub mod vcpu;
pub mod vm;

pub use config::{GuestSource, Paging, VmConfig, parse_duration, parse_mem_size};
pub use error::VmmError;
pub use kick::VcpuRequest;
pub use run::{Outcome, RunReport, RunningVm, run};
pub use stats::StatsSnapshot;
