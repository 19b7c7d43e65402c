//! Each scenario's host operation on the counter guest's page, and what
//! the guest saw.

use std::time::{Duration, Instant};

use super::counter::Guest;
use super::{DemoError, Result};
use crate::mm::{PAGE_SIZE, Prot, Pte};
use crate::scenario::poll;

/// Runs scenario `name`'s host operation on `g` and narrates the outcome.
pub(super) fn run(name: &str, g: &Guest) -> Result<()> {
    let page = PAGE_SIZE;
    match name {
        "dontneed" => {
            let old_pfn = g.pfn().unwrap_or_default();
            let before = g.read(old_pfn);
            g.mm.madvise_dontneed(g.hva, page)?;
            let new = poll(Duration::from_secs(5), || g.pfn());
            match new {
                Some(pfn) => {
                    let now = g.read(pfn);
                    let restarted = if now < before {
                        ", so it restarted from zero"
                    } else {
                        ""
                    };
                    guest_saw!(
                        "the guest's next write refaulted: the host gave it a zero page on frame {pfn:#x}; its counter read {now} right after (it was {before} before the discard{restarted})"
                    );
                }
                None => return Err(DemoError::NoRefault),
            }
        }
        "munmap" | "mprotect" => {
            if name == "munmap" {
                g.mm.munmap(g.hva, page)?;
            } else {
                g.mm.mprotect(g.hva, page, Prot::READ)?;
            }
            match poll(Duration::from_secs(5), || g.fault_line()) {
                Some(line) => guest_saw!("the guest's next write faulted; it reported: {line}"),
                None => return Err(DemoError::NoFaultReported),
            }
        }
        "aging" => {
            let young = g.mm.clear_flush_young(g.hva)?;
            demo_note!("clear_flush_young returned young={young}");
            let pfn = g.pfn().unwrap_or_default();
            g.progress_on(pfn, 100_000);
            let again = g.mm.test_young(g.hva)?;
            guest_saw!(
                "the guest kept writing (its counter moved on by 100000): the page is young again ({again})"
            );
            if !again {
                return Err(DemoError::NotYoungAgain);
            }
        }
        "thp" => thp(g)?,
        "dma" => dma(g)?,
        "reclaim" => {
            let nr = g.size / page;
            let mut swapped = false;
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(2) {
                g.mm.reclaim(nr)?;
                if matches!(g.mm.pte(g.hva), Some(Pte::Swap(_))) {
                    swapped = true;
                    break;
                }
            }
            if swapped {
                let pfn = poll(Duration::from_secs(5), || g.pfn());
                guest_saw!(
                    "the guest touched its page again: swapped back in on frame {:#x}, counter {}",
                    pfn.unwrap_or_default(),
                    pfn.map(|p| g.read(p)).unwrap_or_default()
                );
            } else {
                guest_saw!(
                    "the guest's hot page kept being young and was never chosen; it keeps counting"
                );
            }
        }
        "ksm" => {
            // Two pages the guest never touched, faulted in by the host as
            // zero pages: identical, so ksmd merges them.
            let a = g.base + g.size - 2 * page;
            for hva in [a, a + page] {
                drop(g.mm.get_user_page(hva, crate::mm::Access::Write)?);
            }
            demo_note!(
                "the host faulted in two identical zero pages at {a:#x} and {:#x}",
                a + page
            );
            g.mm.madvise_mergeable(g.base, g.size)?;
            let mut merged = 0;
            for _ in 0..4 {
                merged += g.mm.ksm_scan(g.size / page)?.merged;
            }
            let k = g.mm.ksm_stats();
            guest_saw!(
                "ksmd merged {merged} pages (pages_shared {}, pages_sharing {}); the guest has no spte for those pages, so change_pte had nothing to repoint; its own counter page changes all the time, is never merged, and it keeps counting",
                k.pages_shared,
                k.pages_sharing
            );
        }
        "release" => {
            demo_note!("stopping the guest; the VMM then tears its mm down");
        }
        _ => unreachable!(),
    }
    Ok(())
}

/// The `thp` scenario: the counter page lies in a guest 2 MiB page that a
/// host huge page backs, mapped by one 2 MiB spte. A DONTNEED of another
/// 4 KiB page of it must split the huge PMD first (`split_huge_pmd`), with
/// the invalidation over the whole 2 MiB range, which zaps the 2 MiB spte;
/// the guest refaults its counter page as a 4 KiB spte.
fn thp(g: &Guest) -> Result<()> {
    const HUGE: u64 = 2 << 20;
    let Some(pmd) = g.mm.huge_pmd(g.hva) else {
        return Err(DemoError::NoLargeSpte(
            "the host maps the page with 4 KiB PTEs",
        ));
    };
    let shadow = g.vm.shadow().ok_or(DemoError::NotShadow)?;
    let mmu = shadow.mmu();
    let level =
        |mmu: &crate::mmu::ShadowMmu| mmu.leaf_at(0, g.gpa).ok().flatten().map(|(_, level)| level);
    if level(mmu) != Some(2) {
        return Err(DemoError::NoLargeSpte(
            "the shadow MMU maps it with a 4 KiB spte",
        ));
    }
    demo_note!(
        "the counter page at {:#x} sits in a 2 MiB page the host maps with a huge PMD (frames {:#x}..{:#x}), and the shadow MMU maps it with one 2 MiB spte",
        g.hva,
        pmd.pfn,
        pmd.pfn + 512
    );
    // Another page of the same 2 MiB: the counter keeps its bytes.
    let victim = if (g.hva & (HUGE - 1)) >= PAGE_SIZE {
        g.hva & !(HUGE - 1)
    } else {
        (g.hva & !(HUGE - 1)) + PAGE_SIZE
    };
    g.mm.madvise_dontneed(victim, PAGE_SIZE)?;
    let pfn = poll(Duration::from_secs(5), || g.pfn()).ok_or(DemoError::NoRefault)?;
    g.progress_on(pfn, 100_000);
    guest_saw!(
        "the guest kept counting: its page is now mapped {} (the host maps the range with 512 PTEs: {}), counter {}",
        match level(mmu) {
            Some(2) => "by a 2 MiB spte again",
            Some(_) => "by a 4 KiB spte",
            None => "by no spte yet",
        },
        g.mm.huge_pmd(g.hva).is_none(),
        g.read(pfn)
    );
    Ok(())
}

/// The `dma` scenario: a DMA device (`src/dma`) attaches to the counter
/// page through an interval notifier and reads the counter by DMA (the
/// guest's writes are visible to the device). One host DONTNEED then
/// reaches both secondary MMUs: the device's interval (its IOTLB entry
/// dropped) and the shadow MMU (its spte zapped); both refault the new
/// zero page.
fn dma(g: &Guest) -> Result<()> {
    use crate::dma::{DmaConfig, DmaDevice};
    let dev = DmaDevice::attach(&g.mm, g.hva, PAGE_SIZE, DmaConfig::default())?;
    let first = dev.read_u64(0)?;
    let pfn = g.pfn().unwrap_or_default();
    g.progress_on(pfn, 100_000);
    let second = dev.read_u64(0)?;
    demo_note!(
        "the device read the guest's counter by DMA: {first}, then {second} (the guest's writes are visible to it)"
    );
    g.mm.madvise_dontneed(g.hva, PAGE_SIZE)?;
    let new = poll(Duration::from_secs(5), || g.pfn()).ok_or(DemoError::NoRefault)?;
    g.progress_on(new, 1_000);
    let after = dev.read_u64(0)?;
    guest_saw!(
        "both refaulted the page (now frame {new:#x}): the guest counts on it, and the device read {after} there"
    );
    let s = dev.stats();
    demo_note!(
        "device: {} faults, {} invalidations",
        s.faults,
        s.invalidations
    );
    dev.detach();
    Ok(())
}
