//! The guest every scenario but `cow` watches: `test-counter` in shadow
//! mode, counting on a page of its own, and how the host side sees that
//! page.

use std::sync::Arc;
use std::time::Duration;

use super::{DemoError, Result};
use crate::mm::{FrameAccess, Mm, Pte};
use crate::scenario::poll;
use crate::vmm::{ConsoleBuffer, GuestSource, Paging, RunningVm, VmConfig, guests};

/// The running guest and its counter page.
pub(super) struct Guest {
    pub(super) vm: RunningVm,
    pub(super) console: ConsoleBuffer,
    pub(super) mm: Arc<Mm>,
    pub(super) base: u64,
    pub(super) size: u64,
    pub(super) gpa: u64,
    pub(super) hva: u64,
}

impl Guest {
    /// Waits until the counter on frame `pfn` moved by `n` (the guest ran).
    pub(super) fn progress_on(&self, pfn: u64, n: u64) -> bool {
        let v = self.read(pfn);
        poll(Duration::from_secs(5), || {
            (self.read(pfn).wrapping_sub(v) >= n).then_some(())
        })
        .is_some()
    }

    pub(super) fn pfn(&self) -> Option<u64> {
        match self.mm.pte(self.hva) {
            Some(Pte::Present(p)) => Some(p.pfn),
            _ => None,
        }
    }

    pub(super) fn read(&self, pfn: u64) -> u64 {
        self.mm
            .memory()
            .frame_word(pfn, 0)
            .map(|w| w.load(std::sync::atomic::Ordering::SeqCst))
            .unwrap_or_default()
    }

    pub(super) fn fault_line(&self) -> Option<String> {
        let text = self.console.text();
        text.lines()
            .find(|l| l.contains(": fault vector"))
            .map(str::to_string)
    }
}

/// Boots `test-counter` (with host huge pages for guest RAM if `thp`) and
/// waits until its counter moves.
pub(super) fn boot(thp: bool) -> Result<Guest> {
    if guests::find("test-counter").is_none() {
        return Err(DemoError::NotBuiltIn("test-counter"));
    }
    let mut config = VmConfig::new(GuestSource::Builtin("test-counter".into()));
    config.mem_size = 16 << 20;
    config.paging = Paging::Shadow;
    if thp {
        // The counter in a 2 MiB page of its own, away from the image
        // (locked, so split at its ends) and the guest's own tables.
        config.host_thp = crate::mm::ThpConfig::pmd(crate::mm::ThpEnabled::Always);
        config.machine_mem = Some(32 << 20);
        config.cmdline = format!("at={:#x}", 8 << 20);
    }
    config.validate()?;
    let console = ConsoleBuffer::new();
    let vm = RunningVm::start(&config, Box::new(console.clone()))?;
    let gpa = poll(Duration::from_secs(5), || {
        let text = console.text();
        let line = text.lines().find(|l| l.starts_with("counter 0 at "))?;
        u64::from_str_radix(line.trim_start_matches("counter 0 at ").trim(), 16).ok()
    });
    let Some(gpa) = gpa else {
        vm.stop();
        let r = vm.wait(Some(Duration::from_secs(5)));
        return Err(DemoError::NotCounting(Box::new(r.outcome)));
    };
    let sp = vm.shadow().ok_or(DemoError::NotShadow)?.clone();
    let mm = sp.ram().mm().clone();
    let base = sp.ram().base();
    let size = sp.ram().size_bytes();
    let g = Guest {
        vm,
        console,
        mm,
        base,
        size,
        gpa,
        hva: base + gpa,
    };
    let counting = poll(Duration::from_secs(5), || {
        let pfn = g.pfn()?;
        let v = g.read(pfn);
        poll(Duration::from_millis(200), || {
            (g.read(pfn) != v).then_some(())
        })
    });
    if counting.is_none() {
        return Err(DemoError::CounterStill);
    }
    Ok(g)
}
