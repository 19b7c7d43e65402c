//! `--timeline FILE.svg`: a picture of guest RAM over time (time across,
//! guest pages down, a colour per page state, marks for invalidations and
//! shootdowns; docs/observability.md).
//!
//! A sampler thread reads every page's state from the host mm and the
//! shadow MMU, without changing anything, every few milliseconds
//! (`sampler.rs`, into `grid.rs`); a `tracing` layer collects the
//! invalidations and shootdowns as they happen (`marks.rs`); at the end
//! the picture is drawn with plotters (`render.rs`).

mod grid;
mod marks;
mod render;
mod sampler;
mod state;

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use marks::{Marks, MarksLayer};
pub use render::{DrawError, MAX_ROWS, TimelineSummary};
pub use sampler::{FIRST_INTERVAL, SamplerError};
pub use state::PageState;

use crate::vmm::paging::ShadowPaging;
use grid::Grid;
use sampler::Sampler;

/// Why the timeline could not be written.
#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    /// The file could not be created or written.
    #[error("cannot write the timeline {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The sampler failed.
    #[error(transparent)]
    Sampler(#[from] SamplerError),
    /// Drawing failed.
    #[error("cannot draw the timeline: {0}")]
    Draw(#[from] DrawError),
}

/// A timeline being recorded: its file (created up front, so a bad path
/// fails before the guest starts), its marks and its sampler.
pub struct Timeline {
    path: PathBuf,
    file: File,
    t0: Instant,
    marks: MarksLayer,
    sampler: Option<Sampler>,
    grid: Option<Grid>,
    /// Host address of guest-physical 0.
    base: u64,
    title: String,
}

impl Timeline {
    /// Creates `path` (truncating it); times count from now.
    pub fn create(path: &Path) -> Result<Timeline, TimelineError> {
        let file = File::create(path).map_err(|source| TimelineError::File {
            path: path.to_path_buf(),
            source,
        })?;
        let t0 = Instant::now();
        Ok(Timeline {
            path: path.to_path_buf(),
            file,
            t0,
            marks: MarksLayer::new(t0),
            sampler: None,
            grid: None,
            base: 0,
            title: String::new(),
        })
    }

    /// The layer that collects the marks (install it before the guest
    /// starts).
    pub fn layer(&self) -> MarksLayer {
        self.marks.clone()
    }

    /// Starts sampling `paging`'s guest RAM. A page seen young before but
    /// not for `cold_after` is cold. `title` heads the picture.
    pub fn attach(
        &mut self,
        paging: Arc<ShadowPaging>,
        cold_after: Duration,
        title: &str,
    ) -> Result<(), TimelineError> {
        self.detach()?;
        self.base = paging.ram().base();
        self.title = title.to_string();
        self.sampler = Some(Sampler::start(paging, self.t0, cold_after)?);
        Ok(())
    }

    /// Takes the last sample and stops sampling: call it when the guest
    /// stopped, before its memory is torn down.
    pub fn detach(&mut self) -> Result<(), TimelineError> {
        if let Some(s) = self.sampler.take() {
            self.grid = Some(s.stop()?);
        }
        Ok(())
    }

    /// Draws the picture into the file.
    pub fn write(mut self) -> Result<TimelineSummary, TimelineError> {
        self.detach()?;
        let grid = self
            .grid
            .take()
            .unwrap_or_else(|| Grid::new(0, FIRST_INTERVAL, 2));
        let mut svg = String::new();
        let summary = render::render(&grid, &self.marks.marks(), self.base, &self.title, &mut svg)?;
        self.file
            .write_all(svg.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|source| TimelineError::File {
                path: self.path.clone(),
                source,
            })?;
        Ok(summary)
    }
}
