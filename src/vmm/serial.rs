//! The 16550 UART at 0x3f8 (vm-superio), whose output goes to the console
//! sink (stdout for the CLI), plus the PRINT hypercall's path to the same
//! sink so both stay in order.
//!
//! vm-superio writes and flushes one byte at a time; the sink buffers them
//! and writes the whole buffer once per exit (`commit`), so a guest's
//! `rep outsb` of a line costs one `write(2)`.

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::stats::VmStats;

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Creating its interrupt eventfd failed.
    #[error("cannot create the serial interrupt eventfd: {0}")]
    EventFd(io::Error),
    /// Writing the console failed.
    #[error("cannot write the guest's console output: {0}")]
    Output(io::Error),
}

/// The UART's interrupt line: an eventfd that an irqchip would consume
/// (our guests poll; nothing is connected yet).
#[derive(Debug)]
pub struct SerialIrq(EventFd);

impl Trigger for SerialIrq {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest console bytes go.
pub type ConsoleOut = Box<dyn Write + Send>;

/// Buffers console bytes until `commit`.
pub struct ConsoleSink {
    out: ConsoleOut,
    pending: Vec<u8>,
    stats: Arc<VmStats>,
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

impl ConsoleSink {
    fn commit(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let r = self
            .out
            .write_all(&self.pending)
            .and_then(|_| self.out.flush());
        self.pending.clear();
        r
    }
}

/// The serial port plus the console sink.
pub struct SerialDevice {
    uart: Serial<SerialIrq, NoEvents, ConsoleSink>,
}

impl SerialDevice {
    /// A UART writing to `out`.
    pub fn new(out: ConsoleOut, stats: Arc<VmStats>) -> Result<Self, SerialError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let sink = ConsoleSink {
            out,
            pending: Vec::with_capacity(4096),
            stats,
        };
        Ok(SerialDevice {
            uart: Serial::new(SerialIrq(irq), sink),
        })
    }

    /// `out` of `data` to register `offset` (string I/O repeats the port).
    pub fn write(&mut self, offset: u8, data: &[u8]) -> Result<(), SerialError> {
        for &b in data {
            // Errors here are only the unconnected irq eventfd overflowing or
            // the (buffering, infallible) sink: neither is the guest's fault.
            let _ = self.uart.write(offset, b);
        }
        self.uart.writer_mut().commit().map_err(SerialError::Output)
    }

    /// `in` from register `offset`.
    pub fn read(&mut self, offset: u8, data: &mut [u8]) {
        for b in data.iter_mut() {
            *b = self.uart.read(offset);
        }
    }

    /// Console bytes that bypass the UART (the PRINT hypercall).
    pub fn write_console(&mut self, bytes: &[u8]) -> Result<(), SerialError> {
        let sink = self.uart.writer_mut();
        let _ = sink.write(bytes);
        sink.commit().map_err(SerialError::Output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Instant;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn thr_writes_reach_the_sink() {
        let cap = Capture::default();
        let stats = Arc::new(VmStats::new(Instant::now()));
        let mut dev = SerialDevice::new(Box::new(cap.clone()), stats.clone()).unwrap();
        dev.write(0, b"hi\n").unwrap();
        dev.write_console(b"there").unwrap();
        assert_eq!(&*cap.0.lock().unwrap(), b"hi\nthere");
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
        assert_eq!(stats.snapshot(1, "kvm").serial_bytes, 8);
    }
}
