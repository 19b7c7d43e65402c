//! A read-only look at the sptes for observers (`--timeline`): which guest
//! frames a present spte maps with its Accessed bit set. Nothing is
//! changed, counted or traced, unlike the `test_young` callback.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::{ShadowMmu, spte};
use crate::mm::FrameAccess;

impl ShadowMmu {
    /// The gfns in `gfns` that some present leaf spte maps with its
    /// Accessed bit set (the CPU set it since it was installed or last
    /// cleared), ascending. Takes the MMU lock once and walks that part of
    /// the rmap: callers go through a big guest in slices.
    pub fn accessed_gfns(&self, gfns: Range<u64>) -> Vec<u64> {
        let st = self.inner.state.lock();
        let mem = self.inner.mm.memory();
        st.rmap
            .range(gfns)
            .filter(|(_, locs)| {
                locs.iter().any(|&(sp, idx)| {
                    mem.frame_word(sp, usize::from(idx)).is_ok_and(|w| {
                        let v = w.load(Ordering::Acquire);
                        spte::is_present(v) && spte::is_accessed(v)
                    })
                })
            })
            .map(|(&gfn, _)| gfn)
            .collect()
    }
}
