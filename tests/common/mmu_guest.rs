//! A guest for shadow-MMU tests without KVM: guest RAM in a host mm,
//! bound to gpa 0 by one memslot, and a builder for the guest's own
//! 4-level page tables, written into guest RAM through the mm as a guest
//! kernel would.

use std::sync::Arc;

use shadowvm::mm::{Mm, MmapFlags, PAGE_SIZE, Pfn, Prot, Pte};
use shadowvm::mmu::{
    FaultOutcome, FlushFrame, Memslot, Memslots, PfErrorCode, RecordingFlush, ShadowMmu,
    ShadowMmuConfig, TlbFlush, TlbFlushError,
};

pub const P: u64 = 1;
pub const RW: u64 = 2;
pub const US: u64 = 4;
pub const A: u64 = 1 << 5;
pub const D: u64 = 1 << 6;
pub const PS: u64 = 1 << 7;
pub const NX: u64 = 1 << 63;
pub const ADDR: u64 = 0x000f_ffff_ffff_f000;

pub struct Guest {
    pub mm: Arc<Mm>,
    pub mmu: ShadowMmu,
    pub flush: Arc<RecordingFlush>,
    pub ram_hva: u64,
    pub ram_pages: u64,
    next_table: u64,
    pub cr3: u64,
}

impl Guest {
    /// `ram_pages` of guest RAM over `frames` frames of machine memory;
    /// tables are allocated downwards from the top of RAM.
    pub fn new(ram_pages: u64, frames: u64) -> Self {
        Self::with_config(
            ram_pages,
            frames,
            ShadowMmuConfig::default(),
            MmapFlags::MERGEABLE,
        )
    }

    pub fn with_config(
        ram_pages: u64,
        frames: u64,
        cfg: ShadowMmuConfig,
        flags: MmapFlags,
    ) -> Self {
        Self::build(ram_pages, frames, cfg, flags, None)
    }

    /// Like [`Guest::with_config`], but every flush the MMU asks for also
    /// goes to `tlb` (a test's model of the vCPUs' TLBs), after `flush`
    /// recorded it.
    pub fn with_tlb(
        ram_pages: u64,
        frames: u64,
        cfg: ShadowMmuConfig,
        flags: MmapFlags,
        tlb: Arc<dyn TlbFlush>,
    ) -> Self {
        Self::build(ram_pages, frames, cfg, flags, Some(tlb))
    }

    fn build(
        ram_pages: u64,
        frames: u64,
        cfg: ShadowMmuConfig,
        flags: MmapFlags,
        tlb: Option<Arc<dyn TlbFlush>>,
    ) -> Self {
        let mm = Mm::new_anonymous(frames).unwrap();
        let ram_hva = mm
            .mmap(None, ram_pages * PAGE_SIZE, Prot::READ | Prot::WRITE, flags)
            .unwrap();
        let mut slots = Memslots::default();
        slots
            .add(Memslot {
                base_gfn: 0,
                npages: ram_pages,
                userspace_addr: ram_hva,
            })
            .unwrap();
        let flush = Arc::new(RecordingFlush::default());
        let mmu_flush: Arc<dyn TlbFlush> = match tlb {
            Some(tlb) => Arc::new(TeeFlush(flush.clone(), tlb)),
            None => flush.clone(),
        };
        let mmu = ShadowMmu::new(mm.clone(), slots, mmu_flush, cfg).unwrap();
        let mut g = Guest {
            mm,
            mmu,
            flush,
            ram_hva,
            ram_pages,
            next_table: ram_pages,
            cr3: 0,
        };
        g.cr3 = g.alloc_table();
        g.mmu.load_cr3(0, g.cr3).unwrap();
        g
    }

    /// The lowest guest page handed out by [`Guest::alloc_table`] so far:
    /// pages from here to the top of RAM hold page tables.
    pub fn first_table_page(&self) -> u64 {
        self.next_table
    }

    pub fn hva(&self, gpa: u64) -> u64 {
        self.ram_hva + gpa
    }

    /// A zeroed guest page for a page table.
    pub fn alloc_table(&mut self) -> u64 {
        self.next_table -= 1;
        let gpa = self.next_table * PAGE_SIZE;
        self.mm
            .write(self.hva(gpa), &[0u8; PAGE_SIZE as usize])
            .unwrap();
        gpa
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        self.mm.read_u64(self.hva(gpa)).unwrap()
    }

    pub fn write_u64(&self, gpa: u64, v: u64) {
        self.mm.write(self.hva(gpa), &v.to_le_bytes()).unwrap();
    }

    /// The gpa of the PTE for `gva` at `level` under `cr3`, creating missing
    /// tables with `P|RW|US` entries above.
    pub fn pte_gpa(&mut self, cr3: u64, gva: u64, level: u8) -> u64 {
        let mut table = cr3 & ADDR;
        for l in (level + 1..=4).rev() {
            let e_gpa = table + 8 * ((gva >> (12 + 9 * (l as u64 - 1))) & 511);
            let e = self.read_u64(e_gpa);
            table = if e & P == 0 {
                let t = self.alloc_table();
                self.write_u64(e_gpa, t | P | RW | US);
                t
            } else {
                e & ADDR
            };
        }
        table + 8 * ((gva >> (12 + 9 * (level as u64 - 1))) & 511)
    }

    /// Maps `gva` to `gpa` with leaf `flags` (P is not implied).
    pub fn map(&mut self, gva: u64, gpa: u64, flags: u64) {
        let cr3 = self.cr3;
        self.map_in(cr3, gva, gpa, flags);
    }

    pub fn map_in(&mut self, cr3: u64, gva: u64, gpa: u64, flags: u64) {
        let e = self.pte_gpa(cr3, gva, 1);
        self.write_u64(e, gpa | flags);
    }

    pub fn fault(&self, gva: u64, ec: PfErrorCode) -> FaultOutcome {
        self.mmu.page_fault(0, gva, ec).unwrap()
    }

    pub fn read_fault(&self, gva: u64) -> FaultOutcome {
        self.fault(gva, PfErrorCode::empty())
    }

    pub fn write_fault(&self, gva: u64) -> FaultOutcome {
        self.fault(gva, PfErrorCode::WRITE)
    }

    /// The host frame behind a gpa.
    pub fn host_pfn(&self, gpa: u64) -> Option<Pfn> {
        match self.mm.pte(self.hva(gpa)) {
            Some(Pte::Present(p)) => Some(p.pfn),
            _ => None,
        }
    }

    pub fn spte(&self, gva: u64) -> Option<u64> {
        self.mmu.lookup_spte(0, gva).unwrap()
    }

    pub fn check(&self) {
        self.mm.check_consistency().unwrap();
        self.mmu.check_coherence().unwrap();
    }
}

/// Sends every flush to a recorder first, then to a second backend.
pub struct TeeFlush(pub Arc<RecordingFlush>, pub Arc<dyn TlbFlush>);

impl TlbFlush for TeeFlush {
    fn flush_frames(&self, frames: &[FlushFrame]) -> Result<(), TlbFlushError> {
        self.0.flush_frames(frames)?;
        self.1.flush_frames(frames)
    }
}

pub fn spte_pfn(spte: u64) -> Pfn {
    (spte & ADDR) >> 12
}
