//! A read-only look at the host page table for observers (`--timeline`):
//! what each populated page is, taken under one page-table lock. Nothing is
//! changed, counted or traced, unlike `test_young`, which calls the
//! notifiers.

use super::pgtable::Pte;
use super::{Hva, Mm, MmError, Pfn};

/// What the host page table says about one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSnapshot {
    /// Mapped to `pfn`.
    Present {
        /// The frame.
        pfn: Pfn,
        /// The host PTE's Accessed bit (`_PAGE_ACCESSED`). A secondary
        /// MMU's Accessed bits are its own to report.
        young: bool,
        /// A stable KSM page shared read-only (`PageKsm`).
        ksm: bool,
    },
    /// A swap entry: the page lives in swap.
    Swapped,
}

impl Mm {
    /// Every populated page of `[start, end)` in address order (pages with
    /// no PTE are not present). `MmError::Exited` once the mm is gone.
    pub fn snapshot(&self, start: Hva, end: Hva) -> Result<Vec<(Hva, PageSnapshot)>, MmError> {
        self.check_alive()?;
        let pt = self.pt.lock();
        Ok(pt
            .entries_in(start, end)
            .into_iter()
            .map(|(hva, pte)| {
                let page = match pte {
                    Pte::Present(p) => PageSnapshot::Present {
                        pfn: p.pfn,
                        young: p.young,
                        ksm: pt.folio(p.pfn).is_some_and(|f| f.ksm),
                    },
                    Pte::Swap(_) => PageSnapshot::Swapped,
                };
                (hva, page)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::{MmapFlags, PAGE_SIZE, Prot};

    #[test]
    fn snapshot_sees_present_young_ksm_and_swapped_pages() {
        let mm = Mm::new_anonymous(64).unwrap();
        let rw = Prot::READ | Prot::WRITE;
        let base = mm
            .mmap(None, 8 * PAGE_SIZE, rw, MmapFlags::empty())
            .unwrap();
        assert_eq!(mm.snapshot(base, base + 8 * PAGE_SIZE).unwrap(), vec![]);
        // Pages 0 and 1 identical (KSM merges them), page 2 different.
        for (i, byte) in [(0, 7u8), (1, 7), (2, 9)] {
            mm.write(base + i * PAGE_SIZE, &[byte; 16]).unwrap();
        }
        mm.madvise_mergeable(base, 8 * PAGE_SIZE).unwrap();
        for _ in 0..3 {
            mm.ksm_scan(8).unwrap();
        }
        let snap = mm.snapshot(base, base + 8 * PAGE_SIZE).unwrap();
        let ksm = |i: u64| {
            snap.iter().any(|(h, s)| {
                *h == base + i * PAGE_SIZE && matches!(s, PageSnapshot::Present { ksm: true, .. })
            })
        };
        assert_eq!(snap.len(), 3, "{snap:?}");
        assert!(ksm(0) && ksm(1) && !ksm(2), "{snap:?}");
        // Twice: the first pass clears the young bit, the second evicts.
        mm.reclaim(64).unwrap();
        mm.reclaim(64).unwrap();
        let page2 = mm
            .snapshot(base + 2 * PAGE_SIZE, base + 3 * PAGE_SIZE)
            .unwrap();
        assert_eq!(page2, vec![(base + 2 * PAGE_SIZE, PageSnapshot::Swapped)]);
        mm.exit_mmap();
        assert_eq!(mm.snapshot(base, base + PAGE_SIZE), Err(MmError::Exited));
    }
}
