//! Page aging over guest RAM (`mm/vmscan.c`'s aging, for kswapd): each
//! pass tests and clears every present page's young bits, the host PTE's
//! and, through `clear_young`, the Accessed bits the CPU set in our sptes.
//! Clearing an spte's Accessed bit is not enough for the CPU to set it
//! again: the host KVM keeps its own shadow of our tables (docs/design.md,
//! "TLB shootdown"), so the pass ends with **one batched host
//! invalidation** of every frame whose bits it cleared, and the next access
//! walks our tables again and sets Accessed afresh.

use super::ram::ShadowRam;
use super::thread::ThreadError;
use crate::mm::{Hva, Mm, PAGE_SIZE, Pte};
use crate::mmu::{FlushFrame, FlushReason, TlbFlush};

/// Passes the working-set estimate looks back over.
pub const AGING_HISTORY: u32 = 4;

/// What one aging pass found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgingPass {
    /// Present pages looked at.
    pub scanned: u64,
    /// Pages that were young (bits now cleared).
    pub young: Vec<Hva>,
    /// Frames the batched host invalidation covered.
    pub flushed_frames: u64,
    /// Pages young in any of the last [`AGING_HISTORY`] passes.
    pub working_set: u64,
}

/// Page aging over one range of guest RAM, with a per-page history of the
/// last [`AGING_HISTORY`] passes (bit 0: the latest).
pub struct Aging {
    base: Hva,
    history: Vec<u8>,
    passes: u64,
}

impl Aging {
    const MASK: u8 = (1 << AGING_HISTORY) - 1;

    /// Aging for the `size` bytes of guest RAM at `base`.
    pub fn new(base: Hva, size: u64) -> Self {
        Aging {
            base,
            history: vec![0; (size / PAGE_SIZE) as usize],
            passes: 0,
        }
    }

    /// Aging for all of guest RAM.
    pub fn for_ram(ram: &ShadowRam) -> Self {
        Self::new(ram.base(), ram.size_bytes())
    }

    /// Passes made.
    pub fn passes(&self) -> u64 {
        self.passes
    }

    /// The history of the page at `hva`: bit `i` set if it was young `i`
    /// passes ago (bit 0: the latest pass). `None` outside the range.
    pub fn history(&self, hva: Hva) -> Option<u8> {
        let i = hva.checked_sub(self.base)? / PAGE_SIZE;
        self.history.get(usize::try_from(i).ok()?).copied()
    }

    /// Pages young in any of the last [`AGING_HISTORY`] passes.
    pub fn working_set(&self) -> u64 {
        self.history.iter().filter(|h| **h != 0).count() as u64
    }

    /// One aging pass: clears every present page's young bits (host PTE
    /// and sptes, `clear_young`), then invalidates every frame it found
    /// young in one batched host flush so the CPU sets Accessed afresh.
    pub fn pass(&mut self, mm: &Mm, flush: &dyn TlbFlush) -> Result<AgingPass, ThreadError> {
        let end = self.base + self.history.len() as u64 * PAGE_SIZE;
        let aged = mm.age_range(self.base, end, false)?;
        let frames: Vec<FlushFrame> = aged
            .young
            .iter()
            .filter_map(|hva| match mm.pte(*hva) {
                Some(Pte::Present(p)) => Some(FlushFrame {
                    pfn: p.pfn,
                    reason: FlushReason::AccessedCleared,
                }),
                _ => None,
            })
            .collect();
        if !frames.is_empty() {
            flush.flush_frames(&frames)?;
        }
        for h in &mut self.history {
            *h = (*h << 1) & Self::MASK;
        }
        for hva in &aged.young {
            let Some(i) = hva
                .checked_sub(self.base)
                .and_then(|off| usize::try_from(off / PAGE_SIZE).ok())
            else {
                continue;
            };
            if let Some(h) = self.history.get_mut(i) {
                *h |= 1;
            }
        }
        self.passes += 1;
        Ok(AgingPass {
            scanned: aged.scanned,
            young: aged.young,
            flushed_frames: frames.len() as u64,
            working_set: self.working_set(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::{MmapFlags, Prot};
    use crate::mmu::NoFlush;

    #[test]
    fn history_and_working_set_follow_the_young_bits() {
        let mm = Mm::new_anonymous(64).unwrap();
        let size = 8 * PAGE_SIZE;
        let base = mm
            .mmap(None, size, Prot::READ | Prot::WRITE, MmapFlags::empty())
            .unwrap();
        let (hot, cold) = (base, base + 3 * PAGE_SIZE);
        mm.write(hot, &[1]).unwrap();
        mm.write(cold, &[2]).unwrap();
        let mut aging = Aging::new(base, size);
        let p = aging.pass(&mm, &NoFlush).unwrap();
        assert_eq!((p.scanned, p.young.len(), p.working_set), (2, 2, 2));
        assert_eq!(p.flushed_frames, 2);
        for i in 1..=AGING_HISTORY {
            mm.write(hot, &[1]).unwrap();
            let p = aging.pass(&mm, &NoFlush).unwrap();
            assert_eq!(p.young, vec![hot]);
            let ws = if i < AGING_HISTORY { 2 } else { 1 };
            assert_eq!(p.working_set, ws, "pass {i}");
        }
        assert_eq!(aging.history(hot), Some(0b1111));
        assert_eq!(aging.history(cold), Some(0));
        assert_eq!(aging.history(base + size), None);
        assert_eq!(aging.history(base - 1), None);
        assert_eq!(aging.passes(), u64::from(AGING_HISTORY) + 1);
    }
}
