//! The picture: time across, guest pages down, one colour per page state
//! (`state.rs`), drawn with plotters' SVG backend.
//!
//! Only pages that were ever something other than not present get a row
//! (a 64 MiB guest that touches 300 pages gets rows for those 300, not
//! for 16,384), in guest-physical order, labelled with their
//! guest-physical address. Consecutive pages whose states were the same at
//! every sample share a row, which loses nothing: the guest's image and
//! page tables collapse into a few rows and the pages that did something
//! stand out. When that still leaves more than [`MAX_ROWS`] rows, such
//! runs are packed into rows of about the same number of pages, and a row
//! shows the share of its pages in each state as stacked bands (half its
//! pages KSM-shared, half private: half its height pink, half green). A
//! row's run of columns that look the same is one rectangle per band.
//! Invalidations are black lines across the rows of the range they
//! covered, shootdowns red ticks in a strip above the pages; both in the
//! column they happened in.

use std::time::Duration;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::grid::Grid;
use super::marks::Marks;
use super::state::PageState;
use crate::mm::PAGE_SIZE;

/// Rows at most.
pub const MAX_ROWS: usize = 200;
const WIDTH: u32 = 960;
const HEIGHT: u32 = 540;
const LEGEND_WIDTH: u32 = 190;
/// Height of the shootdown strip, as a part of the rows' height.
const STRIP_FRACTION: f64 = 0.05;
const SHOOTDOWN_RGB: RGBColor = RGBColor(0xd5, 0x00, 0x00);

/// The SVG backend's error.
pub type DrawError = DrawingAreaErrorKind<std::io::Error>;

/// What the picture shows.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TimelineSummary {
    /// Samples (columns).
    pub columns: usize,
    /// Rows drawn.
    pub rows: usize,
    /// Guest pages that were ever more than not present.
    pub pages_touched: u64,
    /// Guest pages in the largest row.
    pub pages_per_row: u64,
    /// Every row is a run of pages with the same history (else rows pack
    /// several runs and show their shares).
    pub runs: bool,
    /// The last sampling interval, in ms.
    pub interval_ms: u64,
    /// Page-samples (pages × columns) in each state, by
    /// [`PageState::name`], over the touched pages.
    pub cells: std::collections::BTreeMap<&'static str, u64>,
    /// Rectangles drawn in each state (the legend's swatch not counted).
    pub rects: std::collections::BTreeMap<&'static str, u64>,
    /// Invalidation lines and shootdown ticks drawn.
    pub invalidation_marks: u64,
    /// Shootdown ticks drawn.
    pub shootdown_marks: u64,
}

/// The rows: which units each one covers (see the module's comment).
struct Rows {
    /// Units ever more than not present, ascending.
    touched: Vec<usize>,
    /// Row `r` covers `touched[bounds[r]..bounds[r + 1]]`.
    bounds: Vec<usize>,
    /// Every row is one run of units with the same history.
    runs: bool,
}

impl Rows {
    fn new(grid: &Grid) -> Rows {
        let columns = grid.columns();
        let touched: Vec<usize> = (0..grid.units())
            .filter(|&u| (0..columns).any(|c| grid.state(c, u) != PageState::NotPresent))
            .collect();
        let same = |a: usize, b: usize| (0..columns).all(|c| grid.state(c, a) == grid.state(c, b));
        // Runs: adjacent units with the same history.
        let mut runs = vec![0];
        for i in 1..touched.len() {
            if touched[i] != touched[i - 1] + 1 || !same(touched[i], touched[i - 1]) {
                runs.push(i);
            }
        }
        runs.push(touched.len());
        if touched.is_empty() {
            runs = vec![0];
        }
        if runs.len() - 1 <= MAX_ROWS {
            return Rows {
                touched,
                bounds: runs,
                runs: true,
            };
        }
        // Too many: pack runs into rows of at least `per_row` units (a
        // longer run stays one row): every row but the last is that full,
        // so there are at most MAX_ROWS.
        let per_row = touched.len().div_ceil(MAX_ROWS - 1);
        let mut bounds = vec![0];
        for &b in &runs[1..] {
            let row_start = bounds[bounds.len() - 1];
            if b - row_start >= per_row || b == touched.len() {
                bounds.push(b);
            }
        }
        Rows {
            touched,
            bounds,
            runs: false,
        }
    }

    fn len(&self) -> usize {
        self.bounds.len() - 1
    }

    fn units(&self, r: usize) -> &[usize] {
        &self.touched[self.bounds[r]..self.bounds[r + 1]]
    }

    /// How many of row `r`'s units are in each state in column `c`.
    fn shares(&self, grid: &Grid, r: usize, c: usize) -> [u32; PageState::ALL.len()] {
        let mut n = [0u32; PageState::ALL.len()];
        for &u in self.units(r) {
            n[grid.state(c, u) as usize] += 1;
        }
        n
    }

    /// The rows holding touched units in `[u0, u1)`, as a range.
    fn covering(&self, u0: usize, u1: usize) -> Option<(usize, usize)> {
        let p0 = self.touched.partition_point(|&u| u < u0);
        let p1 = self.touched.partition_point(|&u| u < u1);
        let row_of = |p: usize| self.bounds.partition_point(|&b| b <= p) - 1;
        (p1 > p0).then(|| (row_of(p0), row_of(p1 - 1) + 1))
    }
}

/// The column sampled at or before `t`.
fn column_of(grid: &Grid, t: Duration) -> Option<usize> {
    let n = grid.columns();
    if n == 0 || t < grid.start(0) {
        return None;
    }
    // The last column that starts at or before `t`.
    let (mut lo, mut hi) = (1, n);
    while lo < hi {
        let m = (lo + hi) / 2;
        if grid.start(m) <= t {
            lo = m + 1;
        } else {
            hi = m;
        }
    }
    Some(lo - 1)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rgb(s: PageState) -> RGBColor {
    let (r, g, b) = s.rgb();
    RGBColor(r, g, b)
}

/// Draws `grid` and `marks` as an SVG into `out`. `base` is the host
/// address of guest-physical 0; `title` heads the picture.
pub fn render(
    grid: &Grid,
    marks: &Marks,
    base: u64,
    title: &str,
    out: &mut String,
) -> Result<TimelineSummary, DrawError> {
    let rows = Rows::new(grid);
    let nrows = rows.len();
    let mut summary = TimelineSummary {
        columns: grid.columns(),
        rows: nrows,
        pages_touched: rows.touched.len() as u64 * grid.unit_pages(),
        pages_per_row: (0..nrows).map(|r| rows.units(r).len()).max().unwrap_or(0) as u64
            * grid.unit_pages(),
        runs: rows.runs,
        interval_ms: grid.interval().as_millis() as u64,
        ..TimelineSummary::default()
    };
    let root = SVGBackend::with_string(out, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot, legend) = root.split_horizontally(WIDTH - LEGEND_WIDTH);

    // y grows upwards in plotters: row r spans [top - r - 1, top - r).
    let top = nrows.max(1) as f64;
    let strip = top * STRIP_FRACTION;
    let x_end = ms(grid.end()).max(1.0);
    let x_start = if grid.columns() > 0 {
        ms(grid.start(0))
    } else {
        0.0
    };
    let unit_bytes = grid.unit_pages() * PAGE_SIZE;
    let gpa_label = |y: &f64| -> String {
        // A label stands at the top edge of its row.
        let r = (top - y).round();
        if r < 0.0 || r >= nrows as f64 {
            return String::new();
        }
        let units = rows.units(r as usize);
        let gpa = units.first().map_or(0, |&u| u as u64 * unit_bytes);
        match units.len() as u64 * grid.unit_pages() {
            n if n > 1 && nrows <= 24 => format!("{gpa:#x} ({n} pages)"),
            _ => format!("{gpa:#x}"),
        }
    };
    let mut chart = ChartBuilder::on(&plot)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(if nrows <= 24 { 124 } else { 92 })
        .build_cartesian_2d(x_start..x_end, 0.0..top + strip)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("time since the run started (ms)")
        .y_desc("guest-physical address")
        .y_labels(if nrows <= 24 { nrows + 1 } else { 12 })
        .y_label_formatter(&gpa_label)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    chart.draw_series(std::iter::once(Rectangle::new(
        [(x_start, 0.0), (x_end, top)],
        rgb(PageState::NotPresent).filled(),
    )))?;

    // Page states: per row, per run of columns with the same shares, one
    // rectangle per state, stacked by rank (highest on top).
    let mut rects = Vec::new();
    for r in 0..nrows {
        let n = rows.units(r).len() as f64;
        let mut c = 0;
        while c < grid.columns() {
            let shares = rows.shares(grid, r, c);
            let mut e = c + 1;
            while e < grid.columns() && rows.shares(grid, r, e) == shares {
                e += 1;
            }
            let mut y = top - r as f64;
            for state in PageState::ALL.into_iter().rev() {
                let k = shares[state as usize];
                if k == 0 {
                    continue;
                }
                *summary.cells.entry(state.name()).or_default() +=
                    u64::from(k) * (e - c) as u64 * grid.unit_pages();
                let h = f64::from(k) / n;
                if state != PageState::NotPresent {
                    *summary.rects.entry(state.name()).or_default() += 1;
                    rects.push(Rectangle::new(
                        [(ms(grid.start(c)), y - h), (ms(grid.start(e)), y)],
                        rgb(state).filled(),
                    ));
                }
                y -= h;
            }
            c = e;
        }
    }
    chart.draw_series(rects)?;

    // Invalidations: per column, one line per run of rows they covered.
    let mut hit = vec![vec![false; nrows]; grid.columns()];
    for &(t, start, end) in &marks.invalidations {
        let Some(c) = column_of(grid, t) else {
            continue;
        };
        let u0 = (start.saturating_sub(base) / unit_bytes) as usize;
        let u1 = end.saturating_sub(base).div_ceil(unit_bytes) as usize;
        if let Some((r0, r1)) = rows.covering(u0, u1) {
            hit[c][r0..r1].iter_mut().for_each(|h| *h = true);
        }
    }
    let mid = |c: usize| (ms(grid.start(c)) + ms(grid.start(c + 1))) / 2.0;
    let mut lines = Vec::new();
    for (c, col) in hit.iter().enumerate() {
        let mut r = 0;
        while r < nrows {
            if !col[r] {
                r += 1;
                continue;
            }
            let r0 = r;
            while r < nrows && col[r] {
                r += 1;
            }
            lines.push(PathElement::new(
                vec![(mid(c), top - r0 as f64), (mid(c), top - r as f64)],
                BLACK.stroke_width(1),
            ));
        }
    }
    summary.invalidation_marks = lines.len() as u64;
    chart.draw_series(lines)?;

    // Shootdowns: a tick in the strip for each column that had one.
    let mut shot = vec![false; grid.columns()];
    for &(t, _) in &marks.shootdowns {
        if let Some(c) = column_of(grid, t) {
            shot[c] = true;
        }
    }
    let ticks: Vec<_> = (0..grid.columns())
        .filter(|&c| shot[c])
        .map(|c| {
            PathElement::new(
                vec![(mid(c), top + strip * 0.15), (mid(c), top + strip * 0.85)],
                SHOOTDOWN_RGB.stroke_width(2),
            )
        })
        .collect();
    summary.shootdown_marks = ticks.len() as u64;
    chart.draw_series(ticks)?;

    draw_legend(&legend, &summary)?;
    root.present()?;
    Ok(summary)
}

fn draw_legend(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    s: &TimelineSummary,
) -> Result<(), DrawError> {
    let text = ("sans-serif", 14).into_font();
    let small = ("sans-serif", 12).into_font();
    let mut y = 40;
    for state in PageState::ALL.into_iter().rev() {
        area.draw(&Rectangle::new(
            [(8, y - 6), (26, y + 6)],
            rgb(state).filled(),
        ))?;
        area.draw(&Rectangle::new(
            [(8, y - 6), (26, y + 6)],
            BLACK.stroke_width(1),
        ))?;
        area.draw(&Text::new(state.name(), (34, y - 7), text.clone()))?;
        y += 24;
    }
    area.draw(&PathElement::new(
        vec![(17, y - 7), (17, y + 7)],
        BLACK.stroke_width(1),
    ))?;
    area.draw(&Text::new("invalidation", (34, y - 7), text.clone()))?;
    y += 24;
    area.draw(&PathElement::new(
        vec![(17, y - 7), (17, y + 7)],
        SHOOTDOWN_RGB.stroke_width(2),
    ))?;
    area.draw(&Text::new("TLB shootdown", (34, y - 7), text))?;
    y += 36;
    let rows = if s.runs {
        format!("{} rows: runs of pages", s.rows)
    } else {
        format!("{} rows, up to {} pages", s.rows, s.pages_per_row)
    };
    for line in [
        format!("{} pages touched", s.pages_touched),
        rows,
        format!("{} samples, last {} ms apart", s.columns, s.interval_ms),
    ] {
        area.draw(&Text::new(line, (8, y), small.clone()))?;
        y += 18;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use PageState::*;

    fn grid(columns: &[&[PageState]]) -> Grid {
        let mut g = Grid::new(columns[0].len() as u64, Duration::from_millis(10), 64);
        for (i, c) in columns.iter().enumerate() {
            g.push(Duration::from_millis(10 * i as u64), c);
        }
        g
    }

    #[test]
    fn only_touched_pages_get_rows_and_runs_become_one_rectangle() {
        // Page 1 is never touched; page 0 goes young -> cold -> swapped.
        let g = grid(&[
            &[Young, NotPresent, KsmShared],
            &[Young, NotPresent, KsmShared],
            &[Cold, NotPresent, Young],
            &[SwappedOut, NotPresent, Young],
        ]);
        let marks = Marks {
            invalidations: vec![(Duration::from_millis(25), 0x1000, 0x2000)],
            shootdowns: vec![(Duration::from_millis(26), 1)],
            dropped: 0,
        };
        let mut svg = String::new();
        let s = render(&g, &marks, 0, "test", &mut svg).unwrap();
        assert_eq!((s.rows, s.columns, s.pages_touched), (2, 4, 2));
        assert!(s.runs, "two different histories, two rows");
        assert_eq!(s.rects.get("young"), Some(&2));
        assert_eq!(s.rects.get("cold"), Some(&1));
        assert_eq!(s.rects.get("swapped out"), Some(&1));
        assert_eq!(s.rects.get("KSM-shared"), Some(&1));
        // The invalidation covered only the untouched page 1: no line.
        assert_eq!((s.invalidation_marks, s.shootdown_marks), (0, 1));
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let fills = |hex: String| {
            doc.descendants()
                .filter(|n| n.has_tag_name("rect") && n.attribute("fill") == Some(&hex))
                .count()
        };
        // Each state's rectangles plus its legend swatch.
        assert_eq!(fills(Young.hex()), 3);
        assert_eq!(fills(SwappedOut.hex()), 2);
    }

    #[test]
    fn pages_with_the_same_history_share_a_row() {
        // 0-2 young throughout, 3 goes out, 4 untouched, 5-6 young again.
        let g = grid(&[
            &[Young, Young, Young, Young, NotPresent, Young, Young],
            &[Young, Young, Young, SwappedOut, NotPresent, Young, Young],
        ]);
        let mut svg = String::new();
        let s = render(&g, &Marks::default(), 0, "runs", &mut svg).unwrap();
        // [0, 3), [3], [5, 7): the gap at 4 splits two equal runs.
        assert_eq!((s.rows, s.pages_touched, s.pages_per_row), (3, 6, 3));
        assert!(s.runs);
        assert_eq!(s.cells.get("young"), Some(&11));
        assert!(svg.contains("0x0 (3 pages)"), "{svg}");
    }

    #[test]
    fn many_pages_share_rows_and_marks_land_on_their_rows() {
        let n = MAX_ROWS * 3;
        // Every page its own history: too many runs, an even split.
        let a: Vec<PageState> = (0..n)
            .map(|i| if i % 3 == 0 { Cold } else { Young })
            .collect();
        let b: Vec<PageState> = (0..n)
            .map(|i| if i % 2 == 0 { Cold } else { Young })
            .collect();
        let g = grid(&[&a, &b]);
        let marks = Marks {
            invalidations: vec![(Duration::from_millis(12), 0, 6 * PAGE_SIZE)],
            ..Marks::default()
        };
        let mut svg = String::new();
        let s = render(&g, &marks, 0, "big", &mut svg).unwrap();
        assert!(
            !s.runs && s.rows <= MAX_ROWS && s.pages_per_row >= 3,
            "{s:?}"
        );
        // Page-samples, each in its own state: 400 + 300 young, 200 + 300 cold.
        assert_eq!(s.cells.get("young"), Some(&700));
        assert_eq!(s.cells.get("cold"), Some(&500));
        assert_eq!(s.invalidation_marks, 1);
        assert!(roxmltree::Document::parse(&svg).is_ok());
    }

    #[test]
    fn an_empty_grid_still_draws() {
        let g = Grid::new(16, Duration::from_millis(5), 8);
        let mut svg = String::new();
        let s = render(&g, &Marks::default(), 0, "empty", &mut svg).unwrap();
        assert_eq!((s.rows, s.columns), (0, 0));
        assert!(roxmltree::Document::parse(&svg).is_ok());
    }
}
