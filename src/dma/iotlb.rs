//! The device's page table (its IOTLB): one entry per page of the buffer,
//! iova page → frame, like an ODP memory region's `pfn_list` or dmirror's
//! xarray. Only touched under the device lock.

use crate::mm::{PAGE_SIZE, Pfn};

/// One translation of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbEntry {
    pub pfn: Pfn,
    /// DMA writes allowed (the host PTE was writable when it was looked up).
    pub writable: bool,
}

pub(crate) struct Iotlb {
    entries: Vec<Option<IotlbEntry>>,
    nr_mapped: usize,
}

impl Iotlb {
    pub(crate) fn new(npages: usize) -> Self {
        Self {
            entries: vec![None; npages],
            nr_mapped: 0,
        }
    }

    pub(crate) fn get(&self, page: usize) -> Option<IotlbEntry> {
        self.entries.get(page).copied().flatten()
    }

    pub(crate) fn install(&mut self, page: usize, e: IotlbEntry) {
        if let Some(slot) = self.entries.get_mut(page) {
            if slot.is_none() {
                self.nr_mapped += 1;
            }
            *slot = Some(e);
        }
    }

    /// Drops the entries of iova `[start, end)`; returns how many there
    /// were.
    pub(crate) fn clear_range(&mut self, start: u64, end: u64) -> usize {
        let first = (start / PAGE_SIZE) as usize;
        let last = end.div_ceil(PAGE_SIZE).min(self.entries.len() as u64) as usize;
        let mut n = 0;
        for slot in self.entries.iter_mut().take(last).skip(first) {
            if slot.take().is_some() {
                n += 1;
            }
        }
        self.nr_mapped -= n;
        n
    }

    pub(crate) fn nr_mapped(&self) -> usize {
        self.nr_mapped
    }

    /// `(page index, entry)` of every translation.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, IotlbEntry)> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.map(|e| (i, e)))
    }
}
