//! The swap device: where reclaim writes anonymous pages it evicts.
//!
//! Each slot holds one page of real bytes and a use count, like
//! `swap_map[]`: one for every swap PTE that refers to it and one while the
//! page sits in the swap cache (mapped and still identical to the slot).

use super::{MmError, PAGE_SIZE, SwapSlot};

#[derive(Default)]
pub struct SwapStore {
    data: Vec<Option<Box<[u8]>>>,
    count: Vec<u32>,
    free: Vec<SwapSlot>,
}

impl SwapStore {
    /// `get_swap_page` + `swap_writepage`: a new slot holding `page`, count 1.
    pub fn alloc(&mut self, page: &[u8]) -> SwapSlot {
        debug_assert_eq!(page.len(), PAGE_SIZE as usize);
        let boxed: Box<[u8]> = page.into();
        match self.free.pop() {
            Some(s) => {
                self.data[s as usize] = Some(boxed);
                self.count[s as usize] = 1;
                s
            }
            None => {
                self.data.push(Some(boxed));
                self.count.push(1);
                (self.data.len() - 1) as SwapSlot
            }
        }
    }

    /// `swap_duplicate`.
    pub fn dup(&mut self, slot: SwapSlot) -> Result<(), MmError> {
        match self.count.get_mut(slot as usize) {
            Some(c) if *c > 0 => {
                *c += 1;
                Ok(())
            }
            _ => Err(MmError::BadSwap(slot)),
        }
    }

    /// `swap_free`: drops one reference; the slot is freed at zero.
    pub fn put(&mut self, slot: SwapSlot) -> Result<(), MmError> {
        let c = match self.count.get_mut(slot as usize) {
            Some(c) if *c > 0 => c,
            _ => return Err(MmError::BadSwap(slot)),
        };
        *c -= 1;
        if *c == 0 {
            self.data[slot as usize] = None;
            self.free.push(slot);
        }
        Ok(())
    }

    /// `swap_readpage`.
    pub fn read(&self, slot: SwapSlot) -> Result<&[u8], MmError> {
        self.data
            .get(slot as usize)
            .and_then(|d| d.as_deref())
            .ok_or(MmError::BadSwap(slot))
    }

    /// Use count of a slot (0 when free).
    pub fn count(&self, slot: SwapSlot) -> u32 {
        self.count.get(slot as usize).copied().unwrap_or(0)
    }

    /// Slots in use.
    pub fn used(&self) -> usize {
        self.count.iter().filter(|c| **c > 0).count()
    }
}
