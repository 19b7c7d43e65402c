//! The end of a shadow-mode run: the teardown the VMM process's exit
//! would do, and whether every frame came back.

use super::ShadowPaging;
use crate::mm::FrameOwner;

/// The end of a shadow-mode run: exit_mmap ran `release` (the shadow MMU
/// dropped every spte and shadow page) and tore down every mapping; did
/// every frame come back?
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ExitReport {
    /// Frames of machine memory.
    pub frames_total: u64,
    /// Of which kept for the VMM (never handed out).
    pub frames_reserved: u64,
    /// Free after the teardown.
    pub frames_free: u64,
    /// Shadow pages the MMU still holds after the teardown.
    pub shadow_pages_left: u64,
    /// Pages still in swap after the teardown.
    pub swap_slots_left: u64,
    /// `frames_free == frames_total - frames_reserved`, no shadow page and
    /// no swap slot left: everything came back.
    pub frames_returned: bool,
}

impl ShadowPaging {
    /// Tears the guest's memory down as the VMM process's exit would:
    /// `exit_mmap` (if it has not run) calls the shadow MMU's `release`,
    /// which drops every spte and shadow page, then frees every page and
    /// swap slot. Reports whether every frame came back. Call it only
    /// once every vCPU and host memory thread has stopped.
    pub fn exit_mmap(&self) -> ExitReport {
        let mm = self.ram.mm();
        mm.exit_mmap();
        let frames = mm.frames();
        let frames_total = frames.nr_frames();
        let frames_reserved = frames.count(FrameOwner::Reserved);
        let frames_free = frames.nr_free();
        let shadow_pages_left = self.mmu.nr_shadow_pages() as u64;
        let swap_slots_left = mm.swap_used() as u64;
        ExitReport {
            frames_total,
            frames_reserved,
            frames_free,
            shadow_pages_left,
            swap_slots_left,
            frames_returned: frames_free == frames_total - frames_reserved
                && shadow_pages_left == 0
                && swap_slots_left == 0,
        }
    }
}
