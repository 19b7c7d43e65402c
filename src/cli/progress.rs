//! Progress bars (indicatif) for long work: `shadowvm stress` and long
//! `shadowvm run`s. Drawn on stderr, and only when both stdout and stderr
//! are terminals and no `--json` was asked for: nothing ever reaches a
//! pipe, a file or JSON output. Guest console lines go through the bar
//! ([`Progress::console`]), so a line is never torn by a redraw.

use std::io::{IsTerminal as _, Write};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parking_lot::Mutex;
use shadowvm::scenario::observe;

/// A `run` shorter than this shows no bar.
const SHOW_AFTER: Duration = Duration::from_secs(1);
/// How often a bar driven by time moves.
const TICK: Duration = Duration::from_millis(100);

/// Whether a bar may be drawn: a person watches both streams, and the
/// output is not JSON.
pub fn wanted(json: bool) -> bool {
    !json && std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
}

/// A progress bar, or nothing.
pub struct Progress {
    bar: Option<ProgressBar>,
    /// Stops the thread that moves a bar driven by time.
    ticker: Option<(Sender<()>, JoinHandle<()>)>,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl Progress {
    /// No bar.
    pub fn none() -> Progress {
        Progress {
            bar: None,
            ticker: None,
        }
    }

    /// `shadowvm stress`: a bar over `total`, moved by the clock, shown
    /// at once.
    pub fn timed(total: Duration, prefix: &'static str) -> Progress {
        let len = total.as_millis() as u64;
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
            .with_style(
                style("{prefix} [{bar:32}] {elapsed_precise} of {len_secs} {msg}").with_key(
                    "len_secs",
                    |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{}s", s.len().unwrap_or(0) / 1000);
                    },
                ),
            )
            .with_prefix(prefix);
        let (stop, stopped) = mpsc::channel::<()>();
        let start = Instant::now();
        let b = bar.clone();
        let ticker = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                    b.set_position((start.elapsed().as_millis() as u64).min(len));
                }
            })
            .ok()
            .map(|t| (stop, t));
        Progress {
            bar: Some(bar),
            ticker,
        }
    }

    /// `shadowvm run`: a bar up to `timeout`, or a spinner without one,
    /// shown once the run has lasted [`SHOW_AFTER`] and moved by
    /// [`Progress::tick`].
    pub fn for_run(timeout: Option<Duration>) -> Progress {
        let bar = match timeout {
            Some(t) => ProgressBar::with_draw_target(
                Some(t.as_millis() as u64),
                ProgressDrawTarget::hidden(),
            )
            .with_style(style("run [{bar:32}] {elapsed_precise} {msg}")),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden())
                .with_style(style("run {spinner} {elapsed_precise} {msg}")),
        };
        Progress {
            bar: Some(bar),
            ticker: None,
        }
    }

    /// A running guest's progress: elapsed time and what the shadow MMU
    /// did so far.
    pub fn tick(&self, p: &observe::Progress) {
        let Some(bar) = &self.bar else { return };
        if p.elapsed < SHOW_AFTER {
            return;
        }
        if bar.is_hidden() {
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        if let Some(s) = &p.shadow {
            bar.set_message(format!(
                "{} faults fixed, {} shootdowns, {} of {} frames free",
                s.mmu.pf_fixed, s.host_invalidate.flushes, s.machine_frames_free, s.machine_frames
            ));
        }
        if p.timeout.is_some() {
            bar.set_position(p.elapsed.as_millis() as u64);
        } else {
            bar.tick();
        }
    }

    /// Sets the text after the bar.
    pub fn message(&self, msg: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(msg);
        }
    }

    /// Writes `text` to stdout without tearing the bar.
    pub fn print(&self, text: &str) {
        let write = || {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        };
        match &self.bar {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }

    /// `out` for the guest console: with a bar, whole lines are written
    /// with the bar out of the way (a partial line waits for its end while
    /// the bar shows); without one, `out` itself.
    pub fn console(&self, out: Box<dyn Write + Send>) -> Box<dyn Write + Send> {
        match &self.bar {
            Some(bar) => Box::new(BarConsole {
                bar: bar.clone(),
                out: Arc::new(Mutex::new(out)),
                pending: Vec::new(),
            }),
            None => out,
        }
    }

    /// Removes the bar.
    pub fn finish(mut self) {
        if let Some((stop, t)) = self.ticker.take() {
            drop(stop);
            let _ = t.join();
        }
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// The guest console behind a bar.
struct BarConsole {
    bar: ProgressBar,
    out: Arc<Mutex<Box<dyn Write + Send>>>,
    pending: Vec<u8>,
}

impl BarConsole {
    fn emit(&mut self, upto: usize) -> std::io::Result<()> {
        let bytes: Vec<u8> = self.pending.drain(..upto).collect();
        let out = self.out.clone();
        self.bar.suspend(|| {
            let mut o = out.lock();
            o.write_all(&bytes).and_then(|()| o.flush())
        })
    }
}

impl Write for BarConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        if let Some(i) = self.pending.iter().rposition(|b| *b == b'\n') {
            self.emit(i + 1)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Before the bar shows, a partial line goes out at once.
        if self.bar.is_hidden() && !self.pending.is_empty() {
            self.emit(self.pending.len())?;
        }
        Ok(())
    }
}

impl Drop for BarConsole {
    fn drop(&mut self) {
        if !self.pending.is_empty()
            && let Err(e) = self.emit(self.pending.len())
        {
            eprintln!("shadowvm: error: writing the guest console: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowvm::vmm::ConsoleBuffer;

    /// Tests run with their output captured: never a terminal.
    #[test]
    fn no_bar_without_a_terminal_or_with_json() {
        assert!(!wanted(true));
        if !std::io::stdout().is_terminal() {
            assert!(!wanted(false));
        }
    }

    #[test]
    fn the_console_behind_a_bar_writes_whole_lines_and_the_rest_at_the_end() {
        let buf = ConsoleBuffer::new();
        let p = Progress::for_run(None);
        let mut c = p.console(Box::new(buf.clone()));
        c.write_all(b"hello ").unwrap();
        c.write_all(b"wor").unwrap();
        assert_eq!(buf.text(), "", "a partial line waits");
        c.write_all(b"ld\nbye").unwrap();
        assert_eq!(buf.text(), "hello world\n");
        c.flush().unwrap(); // the bar is hidden: out at once
        assert_eq!(buf.text(), "hello world\nbye");
        c.write_all(b"!").unwrap();
        drop(c);
        assert_eq!(buf.text(), "hello world\nbye!");
        p.finish();
    }
}
