//! The `test-counter` guest on a live shadow-mode VM: every vCPU counts
//! forever on a page of its own, and prints where; the host side can then
//! age, discard or protect that page through the host mm and watch the
//! frame.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use shadowvm::mm::{FrameAccess, Mm, Pfn, Pte};
use shadowvm::vmm::paging::ShadowPaging;
use shadowvm::vmm::{ConsoleBuffer, GuestSource, Paging, RunningVm, VmConfig};

/// A running `test-counter` and vCPU `cpu`'s counter page.
pub struct CounterGuest {
    pub vm: RunningVm,
    pub cpu: u32,
    pub console: ConsoleBuffer,
    pub shadow: Arc<ShadowPaging>,
    pub mm: Arc<Mm>,
    /// The counter page's gpa and host address.
    pub gpa: u64,
    pub hva: u64,
}

impl CounterGuest {
    /// Boots `test-counter` in shadow mode with 16 MiB of RAM, `setup`
    /// applied to the configuration, and waits until vCPU `cpu` printed
    /// where it counts. `None` when KVM (after saying so) or the guest is
    /// missing.
    pub fn start(cpu: u32, setup: impl FnOnce(&mut VmConfig)) -> Option<Self> {
        if !super::require_kvm_and_guest("test-counter") {
            return None;
        }
        let mut config = VmConfig::new(GuestSource::Builtin("test-counter".into()));
        config.mem_size = 16 << 20;
        config.paging = Paging::Shadow;
        setup(&mut config);
        let console = ConsoleBuffer::new();
        let vm = RunningVm::start(&config, Box::new(console.clone())).expect("start test-counter");
        let prefix = format!("counter {cpu} at ");
        let gpa = super::wait_for("the counter address", || {
            let text = console.text();
            let line = text.lines().find(|l| l.starts_with(&prefix))?;
            u64::from_str_radix(line.trim_start_matches(&prefix).trim(), 16).ok()
        });
        let shadow = vm.shadow().expect("shadow mode").clone();
        let mm = shadow.ram().mm().clone();
        let hva = shadow.ram().base() + gpa;
        Some(CounterGuest {
            vm,
            cpu,
            console,
            shadow,
            mm,
            gpa,
            hva,
        })
    }

    /// The frame the host maps at the counter page, if any.
    pub fn pfn(&self) -> Option<Pfn> {
        match self.mm.pte(self.hva) {
            Some(Pte::Present(p)) => Some(p.pfn),
            _ => None,
        }
    }

    /// Waits until the counter on frame `pfn` has moved by `n`: an event
    /// that shows the guest ran (the ring-3 loop does millions a second).
    pub fn progress_on(&self, pfn: Pfn, n: u64) {
        let v = self.read(pfn);
        super::wait_for("the guest's counter to move on", || {
            (self.read(pfn).wrapping_sub(v) >= n).then_some(())
        });
    }

    /// The counter as frame `pfn` holds it.
    pub fn read(&self, pfn: Pfn) -> u64 {
        self.mm
            .memory()
            .frame_word(pfn, 0)
            .expect("frame")
            .load(Ordering::SeqCst)
    }
}
