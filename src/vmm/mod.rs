//! The VMM: a KVM VM whose guest runs on the VMM's shadow page tables (or,
//! in kvm mode, on its own).
//!
//! ```text
//! run ─> config (validate) ─> guests / boot::loader (check the ELF)
//!     ─> kvm mode:    kvm::Vm (guest RAM as memslot 0, the switcher as read-only memslot 1)
//!                     ─> boot (load, tables, boot info)
//!        shadow mode: paging::shadow::build (machine memory, the switcher in reserved frames,
//!                     host mm, boot through the mm, MMU)
//!                     + host (ksmd, kswapd, scripted ops, the TLB shootdown)
//!     ─> vCPU threads: kvm::vcpu (KVM_RUN ─> kvm::exit::VmExit)
//!                      ─> exits::VmmExits ─> devices::PioBus (UART, exit port, hypercall port)
//!                                         ─> hypercall ─> paging (PagingOps: kvm or shadow)
//!                                                      ─> dma (the guest's DMA device, shadow mode)
//!     ─> kvm::kick (signal + immediate_exit) for stops and TLB shootdowns
//! ```
//!
//! Dependencies point down the list below (tests/layering.rs):
//! `run`, `stats`, `error` ─> `exits` ─> `hypercall` ─> `dma` ─> `paging` ─>
//! `config` ─> `host` ─> `devices`, `boot` ─> `switcher`, `kvm` ─> `abi`,
//! `units`, `x86`. The guest ABI is in `docs/guest-abi.md` and [`abi`].
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
pub mod devices;
pub mod dma;
pub mod error;
pub mod exits;
pub mod guests;
pub mod host;
pub mod hypercall;
pub mod kvm;
pub mod paging;
pub mod run;
pub mod stats;
pub mod switcher;
pub mod units;
pub mod x86;

pub use config::{GuestSource, Paging, VmConfig};
pub use devices::ConsoleBuffer;
pub use error::VmmError;
pub use exits::VmmFailure;
pub use kvm::kick::VcpuRequest;
pub use run::{Outcome, RunReport, RunningVm, run};
pub use stats::StatsSnapshot;
pub use units::{parse_duration, parse_mem_size};
