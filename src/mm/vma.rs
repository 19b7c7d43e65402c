//! Virtual memory areas (`struct vm_area_struct`) and the tree of them.

use std::collections::BTreeMap;

use bitflags::bitflags;

use super::{Hva, MmError};

bitflags! {
    /// `PROT_*`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Prot: u32 {
        const READ = 1;
        const WRITE = 2;
        const EXEC = 4;
    }
}

impl Prot {
    pub const NONE: Prot = Prot::empty();
}

bitflags! {
    /// The `VM_*` flags we model.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct MmapFlags: u32 {
        /// `VM_MERGEABLE` (madvise(MADV_MERGEABLE)): KSM may merge its pages.
        const MERGEABLE = 1;
        /// `VM_LOCKED` (mlock): never reclaimed, never dropped by
        /// MADV_DONTNEED, never merged.
        const LOCKED = 2;
        /// `VM_HUGEPAGE` (madvise(MADV_HUGEPAGE)): THP policies set to
        /// `madvise` apply here.
        const HUGEPAGE = 4;
        /// `VM_NOHUGEPAGE` (madvise(MADV_NOHUGEPAGE)): no new large folio
        /// here, whatever the policy.
        const NOHUGEPAGE = 8;
    }
}

/// One VMA: `[start, end)` with one protection and one set of flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vma {
    pub start: Hva,
    pub end: Hva,
    pub prot: Prot,
    pub flags: MmapFlags,
}

impl Vma {
    pub fn contains(&self, addr: Hva) -> bool {
        addr >= self.start && addr < self.end
    }
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// The VMAs of an mm, keyed by start (`mm->mm_rb`).
#[derive(Default, Debug)]
pub struct VmaTree {
    vmas: BTreeMap<Hva, Vma>,
}

impl VmaTree {
    /// `find_vma` restricted to containment: the VMA that contains `addr`.
    pub fn find(&self, addr: Hva) -> Option<&Vma> {
        self.vmas
            .range(..=addr)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| v.contains(addr))
    }

    /// The VMAs that overlap `[start, end)`, in order.
    pub fn overlapping(&self, start: Hva, end: Hva) -> Vec<Vma> {
        let first = self.find(start).map(|v| v.start).unwrap_or(start);
        self.vmas
            .range(first..end)
            .map(|(_, v)| *v)
            .filter(|v| v.end > start)
            .collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Vma> {
        self.vmas.values()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.vmas.len()
    }

    /// `get_unmapped_area`: the lowest gap of `len` bytes at or above `base`.
    pub fn unmapped_area(&self, base: Hva, len: u64, limit: Hva) -> Result<Hva, MmError> {
        let mut at = base;
        for v in self.vmas.values() {
            if v.end <= at {
                continue;
            }
            if v.start >= at && v.start - at >= len {
                break;
            }
            at = at.max(v.end);
        }
        match at.checked_add(len) {
            Some(e) if e <= limit => Ok(at),
            _ => Err(MmError::NoMemory),
        }
    }

    /// Inserts a VMA over a range that must be free.
    pub fn insert(&mut self, vma: Vma) {
        debug_assert!(self.overlapping(vma.start, vma.end).is_empty());
        self.vmas.insert(vma.start, vma);
    }

    /// `__split_vma` at both ends: after this, no VMA straddles `start` or
    /// `end`.
    pub fn split_at(&mut self, start: Hva, end: Hva) {
        for addr in [start, end] {
            if let Some(v) = self.find(addr).copied()
                && v.start != addr
            {
                self.vmas.insert(v.start, Vma { end: addr, ..v });
                self.vmas.insert(addr, Vma { start: addr, ..v });
            }
        }
    }

    /// Removes every VMA inside `[start, end)` (split first) and returns them.
    pub fn remove_range(&mut self, start: Hva, end: Hva) -> Vec<Vma> {
        self.split_at(start, end);
        let keys: Vec<Hva> = self.vmas.range(start..end).map(|(k, _)| *k).collect();
        keys.into_iter()
            .filter_map(|k| self.vmas.remove(&k))
            .collect()
    }

    /// Applies `f` to every VMA inside `[start, end)` (split first), then
    /// merges neighbours that became identical (`vma_merge`).
    pub fn modify_range(&mut self, start: Hva, end: Hva, mut f: impl FnMut(&mut Vma)) {
        self.split_at(start, end);
        for (_, v) in self.vmas.range_mut(start..end) {
            f(v);
        }
        self.merge_around(start, end);
    }

    fn merge_around(&mut self, start: Hva, end: Hva) {
        let lo = self
            .vmas
            .range(..start)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(start);
        let keys: Vec<Hva> = self.vmas.range(lo..=end).map(|(k, _)| *k).collect();
        let mut prev: Option<Hva> = None;
        for k in keys {
            let Some(cur) = self.vmas.get(&k).copied() else {
                continue;
            };
            if let Some(p) = prev
                && let Some(pv) = self.vmas.get(&p).copied()
                && pv.end == cur.start
                && pv.prot == cur.prot
                && pv.flags == cur.flags
            {
                self.vmas.remove(&k);
                self.vmas.insert(p, Vma { end: cur.end, ..pv });
                continue;
            }
            prev = Some(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vma(start: u64, end: u64, prot: Prot) -> Vma {
        Vma {
            start,
            end,
            prot,
            flags: MmapFlags::empty(),
        }
    }

    #[test]
    fn split_modify_and_merge_back() {
        let mut t = VmaTree::default();
        t.insert(vma(0x1000, 0x9000, Prot::READ | Prot::WRITE));
        t.modify_range(0x3000, 0x5000, |v| v.prot = Prot::READ);
        assert_eq!(t.len(), 3);
        assert_eq!(t.find(0x3000).unwrap().prot, Prot::READ);
        assert_eq!(t.find(0x5000).unwrap().prot, Prot::READ | Prot::WRITE);
        t.modify_range(0x3000, 0x5000, |v| v.prot = Prot::READ | Prot::WRITE);
        assert_eq!(t.len(), 1);
        assert_eq!(
            *t.find(0x4000).unwrap(),
            vma(0x1000, 0x9000, Prot::READ | Prot::WRITE)
        );
    }

    #[test]
    fn remove_middle_leaves_two() {
        let mut t = VmaTree::default();
        t.insert(vma(0x1000, 0x9000, Prot::READ));
        let removed = t.remove_range(0x2000, 0x3000);
        assert_eq!(removed, vec![vma(0x2000, 0x3000, Prot::READ)]);
        assert!(t.find(0x2000).is_none());
        assert_eq!(
            t.overlapping(0x1000, 0x4000),
            vec![
                vma(0x1000, 0x2000, Prot::READ),
                vma(0x3000, 0x9000, Prot::READ)
            ]
        );
        assert_eq!(t.unmapped_area(0x1000, 0x1000, 1 << 47).unwrap(), 0x2000);
        assert_eq!(t.unmapped_area(0x1000, 0x2000, 1 << 47).unwrap(), 0x9000);
    }
}
