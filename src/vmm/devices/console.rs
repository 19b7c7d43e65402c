//! Where guest console bytes go: the sink the UART and the PRINT hypercall
//! share, and a capture buffer for tests and demos.
//!
//! vm-superio writes and flushes one byte at a time; the sink buffers them
//! and writes the whole buffer once per exit (`commit`), so a guest's
//! `rep outsb` of a line costs one `write(2)`.

use std::io::{self, Write};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::vmm::kvm::stats::VmStats;

/// Where guest console bytes go.
pub type ConsoleOut = Box<dyn Write + Send>;

/// The console output failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the guest's console output: {0}")]
pub struct ConsoleError(#[source] pub io::Error);

/// Buffers console bytes until `commit`.
pub struct ConsoleSink {
    out: ConsoleOut,
    pending: Vec<u8>,
    stats: Arc<VmStats>,
}

impl ConsoleSink {
    /// A sink writing to `out`, counting bytes in `stats`.
    pub fn new(out: ConsoleOut, stats: Arc<VmStats>) -> Self {
        ConsoleSink {
            out,
            pending: Vec::with_capacity(4096),
            stats,
        }
    }

    /// Writes what was buffered.
    pub fn commit(&mut self) -> Result<(), ConsoleError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let r = self
            .out
            .write_all(&self.pending)
            .and_then(|_| self.out.flush());
        self.pending.clear();
        r.map_err(ConsoleError)
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stats.serial_output(buf.len());
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // vm-superio flushes after every byte; the real flush is `commit`.
        Ok(())
    }
}

/// A console that keeps everything the guest wrote, for whoever watches
/// the guest from the host (tests, demos). Clones share the buffer.
#[derive(Clone, Default)]
pub struct ConsoleBuffer(Arc<Mutex<Vec<u8>>>);

impl ConsoleBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// What the guest wrote so far (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }
}

impl Write for ConsoleBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
