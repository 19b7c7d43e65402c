//! A read-only look at the sptes for observers (`--timeline`): which guest
//! frames a present spte maps with its Accessed bit set. Nothing is
//! changed, counted or traced, unlike the `test_young` callback.

use std::sync::atomic::Ordering;

use super::{ShadowMmu, spte};
use crate::mm::FrameAccess;

impl ShadowMmu {
    /// The gfns that some present leaf spte maps with its Accessed bit set
    /// (the CPU set it since it was installed or last cleared), ascending.
    /// Takes the MMU lock once and walks the rmap.
    pub fn accessed_gfns(&self) -> Vec<u64> {
        let st = self.inner.state.lock();
        let mem = self.inner.mm.memory();
        st.rmap
            .iter()
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
