//! The sampling thread: every interval, the state of every guest page from
//! the host page table (present, swapped, KSM) and from the Accessed bits
//! of the host PTEs and of the sptes (young), read without changing
//! anything (`Mm::snapshot`, `ShadowMmu::accessed_gfns`). A last sample is
//! taken when it is stopped, before the VM's memory is torn down.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::grid::{Grid, MAX_COLUMNS};
use super::state::PageState;
use crate::mm::{PAGE_SIZE, PageSnapshot};
use crate::vmm::host::thread::StopSignal;
use crate::vmm::paging::ShadowPaging;

/// The first sampling interval (it doubles as the run goes on, `grid.rs`).
pub const FIRST_INTERVAL: Duration = Duration::from_millis(5);

/// Pages read under one lock (2 MiB).
const CHUNK_PAGES: u64 = 512;
/// Sampling takes at most about this share of one CPU: after a sample
/// that took `d`, the next waits at least `d * (SLOWDOWN - 1)`.
const SLOWDOWN: u32 = 5;

/// `last_young` of a page never seen young.
const NEVER: u32 = u32::MAX;

/// Why the sampler has no grid to give.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// The thread could not be started.
    #[error("cannot start the timeline sampler: {0}")]
    Spawn(#[source] std::io::Error),
    /// The thread panicked.
    #[error("the timeline sampler panicked")]
    Panicked,
}

/// What one sample reads and what it remembers between samples.
struct Source {
    paging: Arc<ShadowPaging>,
    t0: Instant,
    /// A page not seen young for this long is cold.
    cold_after: Duration,
    /// Per unit: when it was last seen young, in ms since `t0`.
    last_young: Vec<u32>,
}

impl Source {
    /// The state of every unit now, or `None` once the mm is gone. Guest
    /// RAM is read [`CHUNK_PAGES`] at a time, each under its own lock, so
    /// neither the lock hold time nor the memory grows with the guest.
    fn sample(&mut self, grid: &Grid) -> Option<Vec<PageState>> {
        let ram = self.paging.ram();
        let mmu = self.paging.mmu();
        let base = ram.base();
        let end = base + ram.size_bytes();
        let unit_bytes = grid.unit_pages() * PAGE_SIZE;
        let now = u32::try_from(self.t0.elapsed().as_millis()).unwrap_or(NEVER - 1);
        let mut column = vec![PageState::NotPresent; grid.units()];
        let mut young = vec![false; grid.units()];
        let unit = |hva: u64| ((hva - base) / unit_bytes) as usize;
        let young_at = |hva: u64, young: &mut [bool]| {
            if (base..end).contains(&hva)
                && let Some(y) = young.get_mut(unit(hva))
            {
                *y = true;
            }
        };
        for chunk in (base..end).step_by((CHUNK_PAGES * PAGE_SIZE) as usize) {
            let chunk_end = (chunk + CHUNK_PAGES * PAGE_SIZE).min(end);
            for (hva, page) in ram.mm().snapshot(chunk, chunk_end).ok()? {
                let state = match page {
                    PageSnapshot::Swapped => PageState::SwappedOut,
                    PageSnapshot::Present { young: y, ksm, .. } => {
                        if y {
                            young_at(hva, &mut young);
                        }
                        if ksm {
                            PageState::KsmShared
                        } else {
                            PageState::Present
                        }
                    }
                };
                let u = unit(hva);
                column[u] = column[u].max(state);
            }
        }
        // The sptes, by guest frame: guest RAM starts at guest-physical 0.
        let frames = ram.size_bytes() / PAGE_SIZE;
        for g0 in (0..frames).step_by(CHUNK_PAGES as usize) {
            for gfn in mmu.accessed_gfns(g0..(g0 + CHUNK_PAGES).min(frames)) {
                if let Some(hva) = mmu.memslots().gfn_to_hva(gfn) {
                    young_at(hva, &mut young);
                }
            }
        }
        for (u, state) in column.iter_mut().enumerate() {
            if young[u] {
                self.last_young[u] = now;
            }
            if *state != PageState::Present || self.last_young[u] == NEVER {
                continue;
            }
            let idle = Duration::from_millis(u64::from(now - self.last_young[u]));
            *state = if idle > self.cold_after {
                PageState::Cold
            } else {
                PageState::Young
            };
        }
        Some(column)
    }
}

/// A running sampler.
pub struct Sampler {
    stop: Arc<StopSignal>,
    thread: Option<JoinHandle<Grid>>,
}

impl Sampler {
    /// Starts sampling `paging`'s guest RAM; times count from `t0`.
    pub fn start(
        paging: Arc<ShadowPaging>,
        t0: Instant,
        cold_after: Duration,
    ) -> Result<Sampler, SamplerError> {
        let pages = paging.ram().size_bytes() / PAGE_SIZE;
        let mut grid = Grid::new(pages, FIRST_INTERVAL, MAX_COLUMNS);
        let mut source = Source {
            paging,
            t0,
            cold_after,
            last_young: vec![NEVER; grid.units()],
        };
        let stop = Arc::new(StopSignal::default());
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("timeline".into())
                .spawn(move || {
                    loop {
                        let t = t0.elapsed();
                        match source.sample(&grid) {
                            Some(column) => grid.push(t, &column),
                            None => break,
                        }
                        if stop.is_stopped() {
                            break;
                        }
                        // A big guest is sampled less often.
                        let took = t0.elapsed().saturating_sub(t);
                        // Woken by `stop`: one more sample, the last.
                        stop.sleep(grid.interval().max(took * (SLOWDOWN - 1)));
                    }
                    grid
                })
                .map_err(SamplerError::Spawn)?
        };
        Ok(Sampler {
            stop,
            thread: Some(thread),
        })
    }

    /// Takes a last sample, stops the thread and returns the samples.
    pub fn stop(mut self) -> Result<Grid, SamplerError> {
        self.stop.stop();
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(grid)) => Ok(grid),
            _ => Err(SamplerError::Panicked),
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the timeline sampler panicked");
        }
    }
}
