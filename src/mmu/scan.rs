//! The naive alternative to the rmap, kept for benchmarks only
//! (`benches/mmu.rs`, docs/PERFORMANCE.md "Shadow MMU (issue 3)"): finding
//! the sptes of a gfn by reading every shadow page instead of looking the gfn
//! up in the rmap. Nothing in the MMU uses it.

use std::sync::atomic::Ordering;

use super::pte::PT_ENTRIES;
use super::shadow_page::SpteLoc;
use super::spte;
use super::tlb::FlushReason;
use super::{MmuError, ShadowMmu};

impl ShadowMmu {
    /// The naive alternative to the rmap, for benchmarks: walks every shadow
    /// page of every root to find leaf sptes mapping `gfn`, zaps them.
    /// O(shadow pages).
    ///
    /// Every shadow page (of every root, and any page no root reaches) is
    /// visited and, for level-1 pages, all 512 spte words are read; a present
    /// leaf whose recorded gfn is `gfn` is zapped with the same
    /// `Ctx::zap_entry` the rmap path uses (so it leaves the rmap too and the
    /// MMU stays coherent), and the TLB flush is sent before returning.
    /// Returns the number of sptes zapped.
    pub fn zap_gfn_by_scan(&self, gfn: u64) -> Result<usize, MmuError> {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        let mut ctx = inner.ctx(&mut st);
        let mut found: Vec<SpteLoc> = Vec::new();
        for (&p, page) in &ctx.st.pages {
            if page.role.level != 1 {
                continue;
            }
            for idx in 0..PT_ENTRIES {
                let Ok(w) = ctx.word(p, idx) else { break };
                if spte::is_present(w.load(Ordering::Acquire)) && page.leaf_gfns[idx] == gfn {
                    found.push((p, idx as u16));
                }
            }
        }
        let zapped = found.len();
        for (p, idx) in found {
            ctx.zap_entry(p, usize::from(idx), FlushReason::Zapped)?;
        }
        ctx.flush_now(inner.tlb.as_ref())?;
        Ok(zapped)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::mm::{Mm, MmapFlags, PAGE_SIZE, Prot, Pte};
    use crate::mmu::{
        FaultOutcome, Memslot, Memslots, PfErrorCode, RecordingFlush, ShadowMmu, ShadowMmuConfig,
    };

    const P: u64 = 1;
    const RW: u64 = 2;
    const US: u64 = 4;
    const D: u64 = 1 << 6;

    /// 64 pages of guest RAM at gpa 0; guest tables in the top four pages
    /// (PML4, PDPT, PD, PT), mapping gva `0x40_0000 + i * 4 KiB` → page `i`.
    struct Guest {
        mm: Arc<Mm>,
        mmu: ShadowMmu,
        flush: Arc<RecordingFlush>,
        ram: u64,
        pt: u64,
    }

    const GVA: u64 = 0x40_0000;

    impl Guest {
        fn new() -> Self {
            let mm = Mm::new_anonymous(256).unwrap();
            let ram = mm
                .mmap(
                    None,
                    64 * PAGE_SIZE,
                    Prot::READ | Prot::WRITE,
                    MmapFlags::empty(),
                )
                .unwrap();
            let mut slots = Memslots::default();
            slots
                .add(Memslot {
                    base_gfn: 0,
                    npages: 64,
                    userspace_addr: ram,
                })
                .unwrap();
            let flush = Arc::new(RecordingFlush::default());
            let mmu = ShadowMmu::new(mm.clone(), slots, flush.clone(), ShadowMmuConfig::default())
                .unwrap();
            let (pml4, pdpt, pd, pt) = (
                63 * PAGE_SIZE,
                62 * PAGE_SIZE,
                61 * PAGE_SIZE,
                60 * PAGE_SIZE,
            );
            let g = Guest {
                mm,
                mmu,
                flush,
                ram,
                pt,
            };
            for t in [pml4, pdpt, pd, pt] {
                g.mm.write(ram + t, &[0u8; PAGE_SIZE as usize]).unwrap();
            }
            g.write_u64(pml4, pdpt | P | RW | US);
            g.write_u64(pdpt, pd | P | RW | US);
            g.write_u64(pd + 8 * 2, pt | P | RW | US);
            g.mmu.load_cr3(0, pml4).unwrap();
            g
        }

        fn write_u64(&self, gpa: u64, v: u64) {
            self.mm.write(self.ram + gpa, &v.to_le_bytes()).unwrap();
        }

        /// Maps gva page `i` to guest page `gfn`.
        fn map(&self, i: u64, gfn: u64) {
            self.write_u64(self.pt + 8 * i, (gfn * PAGE_SIZE) | P | RW | US | D);
        }

        fn fault(&self, i: u64) {
            let r = self
                .mmu
                .page_fault(0, GVA + i * PAGE_SIZE, PfErrorCode::WRITE)
                .unwrap();
            assert_eq!(r, FaultOutcome::Fixed);
        }

        fn spte(&self, i: u64) -> Option<u64> {
            self.mmu.lookup_spte(0, GVA + i * PAGE_SIZE).unwrap()
        }

        fn host_pfn(&self, gfn: u64) -> u64 {
            match self.mm.pte(self.ram + gfn * PAGE_SIZE) {
                Some(Pte::Present(p)) => p.pfn,
                other => panic!("gfn {gfn} not present: {other:?}"),
            }
        }
    }

    #[test]
    fn scan_zaps_every_alias_of_the_gfn_and_nothing_else() {
        let g = Guest::new();
        // gva pages 0 and 1 both map gfn 5 (aliases); page 2 maps gfn 6.
        g.map(0, 5);
        g.map(1, 5);
        g.map(2, 6);
        for i in 0..3 {
            g.fault(i);
        }
        assert_eq!(g.mmu.nr_sptes(), 3);
        let frame = g.host_pfn(5);
        g.flush.take();

        assert_eq!(g.mmu.zap_gfn_by_scan(5).unwrap(), 2);
        assert_eq!(g.spte(0), None);
        assert_eq!(g.spte(1), None);
        assert!(g.spte(2).is_some(), "another gfn's spte was zapped");
        assert_eq!(g.mmu.nr_sptes(), 1, "the zapped sptes must leave the rmap");
        assert!(g.flush.flushed(frame), "the zapped frame was not flushed");
        g.mmu.check_coherence().unwrap();

        // Nothing left to find; a gfn never mapped finds nothing either.
        assert_eq!(g.mmu.zap_gfn_by_scan(5).unwrap(), 0);
        assert_eq!(g.mmu.zap_gfn_by_scan(40).unwrap(), 0);
        assert_eq!(g.mmu.nr_sptes(), 1);

        // The zapped pages fault back in as usual.
        g.fault(0);
        assert_eq!(g.spte(0).map(crate::mmu::spte_bits::pfn), Some(frame));
        g.mmu.check_coherence().unwrap();
        g.mm.check_consistency().unwrap();
    }

    #[test]
    fn scan_finds_the_same_sptes_as_the_rmap() {
        let g = Guest::new();
        for i in 0..32 {
            g.map(i, i);
            g.fault(i);
        }
        // Zap half by scan, then the rest through the notifier (the rmap):
        // both must agree on what is mapped, and the checker must pass.
        for i in (0..32).step_by(2) {
            assert_eq!(g.mmu.zap_gfn_by_scan(i).unwrap(), 1, "gfn {i}");
        }
        assert_eq!(g.mmu.nr_sptes(), 16);
        g.mmu.check_coherence().unwrap();
        g.mm.madvise_dontneed(g.ram, 32 * PAGE_SIZE).unwrap();
        assert_eq!(g.mmu.nr_sptes(), 0);
        g.mmu.check_coherence().unwrap();
    }
}
