//! Each scenario's host operation on the counter guest's page, and what
//! the guest saw.

use std::time::{Duration, Instant};

use super::counter::{Guest, wait_for};
use super::{DemoError, Result};
use crate::mm::{PAGE_SIZE, Prot, Pte};

/// Runs scenario `name`'s host operation on `g` and narrates the outcome.
pub(super) fn run(name: &str, g: &Guest) -> Result<()> {
    let page = PAGE_SIZE;
    match name {
        "dontneed" => {
            let old_pfn = g.pfn().unwrap_or_default();
            let before = g.read(old_pfn);
            g.mm.madvise_dontneed(g.hva, page)?;
            let new = wait_for(Duration::from_secs(5), || g.pfn());
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
            match wait_for(Duration::from_secs(5), || g.fault_line()) {
                Some(line) => guest_saw!("the guest's next write faulted; it reported: {line}"),
                None => return Err(DemoError::NoFaultReported),
            }
        }
        "aging" => {
            let young = g.mm.clear_flush_young(g.hva)?;
            demo_note!("clear_flush_young returned young={young}");
            std::thread::sleep(Duration::from_millis(50));
            let again = g.mm.test_young(g.hva)?;
            guest_saw!("the guest kept writing: 50 ms later the page is young again ({again})");
            if !again {
                return Err(DemoError::NotYoungAgain);
            }
        }
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
                let pfn = wait_for(Duration::from_secs(5), || g.pfn());
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
