//! The samples: one column of page states per sample, in units of one or
//! more guest pages. Memory stays bounded whatever the run's length: when
//! the columns reach their maximum, neighbours are merged in pairs (each
//! cell keeping the higher-ranked state) and the sampling interval
//! doubles, so the columns stay evenly spaced.

use std::time::Duration;

use super::state::PageState;

/// Columns kept at most (an even number).
pub const MAX_COLUMNS: usize = 512;
/// Units (rows of the finest picture) at most: a larger guest is sampled
/// in units of several pages.
pub const MAX_UNITS: u64 = 1 << 16;

/// The sampled page states of one run.
#[derive(Clone, Debug)]
pub struct Grid {
    unit_pages: u64,
    units: usize,
    /// When each column was sampled, since the run started.
    times: Vec<Duration>,
    /// Column-major: `cells[c * units + u]`.
    cells: Vec<u8>,
    interval: Duration,
    max_columns: usize,
    /// When the last column ends: one interval after it was sampled.
    end: Duration,
}

impl Grid {
    /// A grid for `pages` guest pages, sampled every `interval` until
    /// `max_columns` (rounded up to even, at least 2) columns fill up.
    pub fn new(pages: u64, interval: Duration, max_columns: usize) -> Grid {
        let unit_pages = pages.div_ceil(MAX_UNITS).max(1);
        Grid {
            unit_pages,
            units: pages.div_ceil(unit_pages) as usize,
            times: Vec::new(),
            cells: Vec::new(),
            interval,
            max_columns: max_columns.max(2).next_multiple_of(2),
            end: Duration::ZERO,
        }
    }

    /// Guest pages per unit.
    pub fn unit_pages(&self) -> u64 {
        self.unit_pages
    }

    /// Units (rows before any grouping).
    pub fn units(&self) -> usize {
        self.units
    }

    /// The interval the next sample should come after.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Columns so far.
    pub fn columns(&self) -> usize {
        self.times.len()
    }

    /// Column `c` spans `[start(c), start(c + 1))`; the last one ends at
    /// [`Grid::end`].
    pub fn start(&self, c: usize) -> Duration {
        self.times.get(c).copied().unwrap_or(self.end)
    }

    /// The end of the last column.
    pub fn end(&self) -> Duration {
        self.end
    }

    /// The state of unit `u` in column `c`.
    pub fn state(&self, c: usize, u: usize) -> PageState {
        self.cells
            .get(c * self.units + u)
            .map_or(PageState::NotPresent, |v| PageState::from_u8(*v))
    }

    /// Adds the column sampled at `t` (one state per unit; missing units
    /// are not present), merging the columns in pairs first when full.
    pub fn push(&mut self, t: Duration, column: &[PageState]) {
        if self.times.len() == self.max_columns {
            self.halve();
        }
        self.times.push(t);
        self.cells.extend(
            (0..self.units).map(|u| column.get(u).copied().unwrap_or(PageState::NotPresent) as u8),
        );
        self.end = t + self.interval;
    }

    fn halve(&mut self) {
        let n = self.units;
        let half = self.times.len() / 2;
        for c in 0..half {
            for u in 0..n {
                let a = self.cells[2 * c * n + u];
                let b = self.cells[(2 * c + 1) * n + u];
                self.cells[c * n + u] = a.max(b);
            }
            self.times[c] = self.times[2 * c];
        }
        self.times.truncate(half);
        self.cells.truncate(half * n);
        self.interval *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PageState::*;

    #[test]
    fn a_full_grid_merges_pairs_keeping_the_higher_rank_and_doubles_the_interval() {
        let ms = Duration::from_millis;
        let mut g = Grid::new(2, ms(10), 4);
        let cols = [
            [Young, NotPresent],
            [Cold, SwappedOut],
            [Present, NotPresent],
            [KsmShared, Present],
            [Young, Young],
        ];
        for (i, c) in cols.iter().enumerate() {
            assert_eq!(g.interval(), ms(10));
            g.push(ms(10 * i as u64), c);
        }
        assert_eq!(g.columns(), 3);
        assert_eq!(g.interval(), ms(20));
        assert_eq!(
            (g.start(0), g.start(1), g.start(2)),
            (ms(0), ms(20), ms(40))
        );
        assert_eq!(g.end(), ms(60));
        let col = |c| (g.state(c, 0), g.state(c, 1));
        assert_eq!(col(0), (Young, SwappedOut));
        assert_eq!(col(1), (KsmShared, Present));
        assert_eq!(col(2), (Young, Young));
    }

    #[test]
    fn big_guests_are_sampled_in_units_of_several_pages() {
        let g = Grid::new(MAX_UNITS * 3 + 1, Duration::from_millis(1), 8);
        assert_eq!(g.unit_pages(), 4);
        assert!(g.units() as u64 <= MAX_UNITS);
        let g = Grid::new(100, Duration::from_millis(1), 8);
        assert_eq!((g.unit_pages(), g.units()), (1, 100));
    }
}
