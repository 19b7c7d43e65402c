//! What to run and how: the VM configuration and the checks of what a
//! user can get wrong.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::abi;
use super::host::kswapd::ReclaimConfig;
use super::host::ops::HostOpScript;
use super::units::{UnitError, check_mem_size};
use crate::mm::KsmConfig;

/// Errors in user-supplied configuration values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size or duration that does not parse or is out of range.
    #[error(transparent)]
    Unit(#[from] UnitError),
    /// Bad vCPU count.
    #[error("{0} vCPUs is out of range: shadowvm runs 1 to {max} vCPUs", max = abi::MAX_VCPUS)]
    VcpusOutOfRange(u32),
    /// The command line does not fit its page.
    #[error("the guest command line is {0} bytes; at most {max} fit", max = abi::CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    /// The command line contains a NUL byte.
    #[error("the guest command line contains a NUL byte")]
    CmdlineNul,
    /// A host memory feature asked for in kvm mode.
    #[error("{0} needs --paging shadow")]
    NeedsShadow(&'static str),
    /// More prefetched PTEs than a page table has.
    #[error("--prefetch {0} is more than the 512 entries of a page table")]
    PrefetchTooLarge(usize),
}

/// Who builds the guest's second-level translation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Paging {
    /// The guest's own page tables, KVM does the second level.
    Kvm,
    /// The VMM's shadow page tables (the default).
    #[default]
    Shadow,
}

impl Paging {
    /// The value of `svm_boot_info.paging_mode`.
    pub fn abi_mode(self) -> u32 {
        match self {
            Paging::Kvm => abi::PAGING_MODE_KVM,
            Paging::Shadow => abi::PAGING_MODE_SHADOW,
        }
    }

    /// Lower-case name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Paging::Kvm => "kvm",
            Paging::Shadow => "shadow",
        }
    }
}

/// Which guest image to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestSource {
    /// A built-in guest, by name.
    Builtin(String),
    /// An ELF file.
    File(PathBuf),
}

/// Everything `vmm::run` needs.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The guest image.
    pub guest: GuestSource,
    /// Bytes of guest RAM.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Paging mode.
    pub paging: Paging,
    /// Stop the guest after this long.
    pub timeout: Option<Duration>,
    /// The guest command line.
    pub cmdline: String,
    /// Bytes of machine memory in shadow mode (`None`: guest RAM plus
    /// overhead, `paging::shadow::default_machine_mem`). Ignored in kvm
    /// mode.
    pub machine_mem: Option<u64>,
    /// Shadow mode: invalidate flushed frames in the real host mm
    /// (`host::tlb::HostTlbFlush`). Only tests turn it off, to show that
    /// without it a vCPU keeps using stale translations.
    pub host_tlb_flush: bool,
    /// Shadow mode: after the guest stops, check the shadow MMU's coherence
    /// and the host mm's consistency (`RunReport::check`).
    pub check: bool,
    /// Shadow mode: run ksmd over guest RAM with these tunables (`--ksm`).
    pub ksm: Option<KsmConfig>,
    /// Shadow mode: run kswapd (aging, working set, reclaim) (`--reclaim`).
    pub reclaim: Option<ReclaimConfig>,
    /// Shadow mode: scripted host operations (`--host-ops`).
    pub host_ops: Option<Arc<HostOpScript>>,
    /// Transparent huge pages for guest RAM (`--host-thp`, `--host-mthp`).
    /// Shadow mode: the host mm's settings; guest RAM is given
    /// `MADV_HUGEPAGE` when any size is on, as a VMM asking for huge pages
    /// does. Kvm mode: the real host's THP, `MADV_HUGEPAGE` on guest RAM
    /// (its sizes are the host kernel's), so both modes compare fairly.
    pub host_thp: crate::mm::ThpConfig,
    /// Shadow mode: guest PTEs prefetched around a fault
    /// (`FNAME(pte_prefetch)`; KVM's `PTE_PREFETCH_NUM` is 8, 0 turns it off).
    pub pte_prefetch: usize,
    /// Shadow mode: a fault injected into the host TLB flush (tests only).
    #[cfg(feature = "test-hooks")]
    pub flush_fault: Option<crate::vmm::host::tlb::FlushFault>,
    /// Shadow mode: the guest's first DMA ATTACH leaves a stale IOTLB entry
    /// (tests only: the VMM-bug path, which must stop the VM).
    #[cfg(feature = "test-hooks")]
    pub dma_stale_entry: bool,
}

impl VmConfig {
    /// A configuration with the defaults: 64 MiB, one vCPU, shadow paging, no
    /// timeout, an empty command line.
    pub fn new(guest: GuestSource) -> Self {
        VmConfig {
            guest,
            mem_size: 64 << 20,
            vcpus: 1,
            paging: Paging::Shadow,
            timeout: None,
            cmdline: String::new(),
            machine_mem: None,
            host_tlb_flush: true,
            check: false,
            ksm: None,
            reclaim: None,
            host_ops: None,
            host_thp: crate::mm::ThpConfig::off(),
            pte_prefetch: crate::mmu::PTE_PREFETCH_NUM,
            #[cfg(feature = "test-hooks")]
            flush_fault: None,
            #[cfg(feature = "test-hooks")]
            dma_stale_entry: false,
        }
    }

    /// Checks the values a user can get wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_mem_size(self.mem_size)?;
        if self.vcpus == 0 || self.vcpus > abi::MAX_VCPUS {
            return Err(ConfigError::VcpusOutOfRange(self.vcpus));
        }
        if self.cmdline.len() >= abi::CMDLINE_MAX {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        if self.paging == Paging::Kvm {
            if self.ksm.is_some() {
                return Err(ConfigError::NeedsShadow("--ksm"));
            }
            if self.host_ops.is_some() {
                return Err(ConfigError::NeedsShadow("--host-ops"));
            }
            if self.reclaim.is_some() {
                return Err(ConfigError::NeedsShadow("--reclaim"));
            }
            // The real host's folio sizes are its own (sysfs), not ours.
            let pmd_only = crate::mm::ThpConfig::pmd(self.host_thp.enabled);
            if self.host_thp.orders != pmd_only.orders {
                return Err(ConfigError::NeedsShadow("--host-mthp"));
            }
        }
        if self.pte_prefetch > 512 {
            return Err(ConfigError::PrefetchTooLarge(self.pte_prefetch));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate() {
        let mut c = VmConfig::new(GuestSource::Builtin("hello".into()));
        assert_eq!(c.validate(), Ok(()));
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::VcpusOutOfRange(0)));
        c.vcpus = abi::MAX_VCPUS + 1;
        assert!(c.validate().is_err());
        c.vcpus = 2;
        c.cmdline = "x".repeat(abi::CMDLINE_MAX);
        assert!(matches!(c.validate(), Err(ConfigError::CmdlineTooLong(_))));
        c.cmdline = "a\0b".into();
        assert_eq!(c.validate(), Err(ConfigError::CmdlineNul));
        c.cmdline.clear();
        c.ksm = Some(KsmConfig::default());
        assert_eq!(c.validate(), Ok(()));
        c.paging = Paging::Kvm;
        assert_eq!(c.validate(), Err(ConfigError::NeedsShadow("--ksm")));
        c.ksm = None;
        c.reclaim = Some(ReclaimConfig::default());
        assert_eq!(c.validate(), Err(ConfigError::NeedsShadow("--reclaim")));
    }
}
