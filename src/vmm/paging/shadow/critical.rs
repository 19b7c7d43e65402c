//! The always-mapped pages: exception delivery needs the stacks and the
//! handler code mapped before any exception, so they are prefaulted into
//! every vCPU's root at boot, after every CR3 load, and whenever sptes were
//! zapped. (The GDT, IDTs and TSSes are the switcher's, linked into every
//! root by the MMU itself.)

use std::sync::atomic::Ordering;

use super::ShadowPaging;
use crate::mmu::{FaultOutcome, PfErrorCode};
use crate::vmm::abi::{self, PAGE_SIZE, percpu_gpa};
use crate::vmm::boot::loader::ImageLayout;
use crate::vmm::paging::PagingError;

/// Walks of one critical page whose guest tables changed under them
/// before it is left for the next call.
const PREFAULT_RETRIES: u32 = 100;

/// One page exception delivery may touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CriticalPage {
    gva: u64,
    /// Written during delivery (stacks), so prefaulted writable.
    write: bool,
}

/// The pages vCPU `cpu` needs mapped to take an exception: the boot info,
/// its per-vCPU area (per-vCPU page and every stack SET_STACK may name),
/// and the image (every handler SET_TRAP_TABLE may name). All
/// identity-mapped by the boot tables (docs/guest-abi.md §3).
pub(super) fn critical_pages(cpu: u32, image: &ImageLayout) -> Vec<CriticalPage> {
    let page = |gva: u64, write: bool| CriticalPage {
        gva: gva & !(PAGE_SIZE - 1),
        write,
    };
    let mut v = vec![page(abi::BOOT_INFO_GPA, false)];
    let area = percpu_gpa(cpu);
    v.extend((0..abi::PERCPU_STRIDE / PAGE_SIZE).map(|i| page(area + i * PAGE_SIZE, true)));
    let start = image.start & !(PAGE_SIZE - 1);
    let end = image.end.next_multiple_of(PAGE_SIZE);
    v.extend(
        (start..end)
            .step_by(PAGE_SIZE as usize)
            .map(|g| page(g, false)),
    );
    v.dedup();
    v
}

impl CriticalPage {
    /// Its guest-physical address (the boot tables identity-map it).
    pub(super) fn gpa(&self) -> u64 {
        self.gva
    }
}

impl ShadowPaging {
    /// Maps vCPU `vcpu`'s critical pages in its root; with `only_missing`,
    /// only those whose spte is gone. Returns false if a page was left
    /// unmapped because its guest tables kept changing under the walk
    /// (`FaultOutcome::Retry`): the caller tries again later.
    pub(super) fn prefault(&self, vcpu: usize, only_missing: bool) -> Result<bool, PagingError> {
        let mut complete = true;
        for p in &self.critical[vcpu] {
            if only_missing
                && self
                    .mmu
                    .lookup_spte(vcpu, p.gva)
                    .map_err(|e| self.mmu_err(e))?
                    .is_some()
            {
                continue;
            }
            // Supervisor accesses, as exception delivery makes them. A write
            // the guest's tables refuse (a read-only page) is tried as a read.
            let mut tries = vec![PfErrorCode::empty()];
            if p.write {
                tries.insert(0, PfErrorCode::WRITE);
            }
            'page: for ec in tries {
                for _ in 0..PREFAULT_RETRIES {
                    match self
                        .mmu
                        .page_fault(vcpu, p.gva, ec)
                        .map_err(|e| self.mmu_err(e))?
                    {
                        FaultOutcome::Fixed => break 'page,
                        // Nothing installed: a guest table changed under
                        // the walk. Walk again.
                        FaultOutcome::Retry => continue,
                        // Not mapped by the guest's tables, or not RAM:
                        // nothing to prefault (kvm mode would fault the
                        // same way).
                        FaultOutcome::Guest(_)
                        | FaultOutcome::Mmio { .. }
                        | FaultOutcome::HostFault { .. } => continue 'page,
                    }
                }
                complete = false;
                break;
            }
        }
        Ok(complete)
    }

    /// After anything that may have zapped sptes: puts back every vCPU's
    /// critical pages (roots are shared between vCPUs with the same CR3,
    /// so one vCPU's guest page-table write can empty another's root; an
    /// exception the other vCPU takes before this runs is not covered, see
    /// docs/shadow-mmu.md).
    pub(super) fn ensure_critical(&self) -> Result<(), PagingError> {
        let now = self.mmu.zap_generation();
        if self.zaps_seen.load(Ordering::Acquire) == now {
            return Ok(());
        }
        let mut complete = true;
        for vcpu in 0..self.critical.len() {
            complete &= self.prefault(vcpu, true)?;
        }
        // Zaps made by the prefaults themselves (replacing a stale entry)
        // are covered: everything was re-checked after `now` was read.
        if complete {
            self.zaps_seen.fetch_max(now, Ordering::AcqRel);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn critical_pages_cover_delivery() {
        let image = ImageLayout {
            start: 0x20_0000,
            end: 0x20_3010,
            entry: 0x20_0000,
        };
        let v = critical_pages(1, &image);
        let has = |gva: u64, write: bool| v.contains(&CriticalPage { gva, write });
        assert!(has(abi::BOOT_INFO_GPA, false));
        assert!(has(percpu_gpa(1) + 0x3000, true)); // trap stack
        assert!(has(0x20_1000, false)); // exception stubs
        assert!(has(0x20_3000, false));
        assert!(!has(percpu_gpa(0), true));
    }
}
