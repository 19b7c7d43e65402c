//! The 16550 UART at 0x3f8 (vm-superio), whose output goes to the console
//! sink (stdout for the CLI), plus the PRINT hypercall's path to the same
//! sink so both stay in order.

use std::io;
use std::sync::Arc;

use parking_lot::Mutex;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::{DeviceError, PioDevice};
use super::console::{ConsoleError, ConsoleOut, ConsoleSink};
use crate::vmm::kvm::exit::IoAction;
use crate::vmm::kvm::stats::VmStats;

/// The serial device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Creating its interrupt eventfd failed.
    #[error("cannot create the serial interrupt eventfd: {0}")]
    EventFd(#[source] io::Error),
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

/// The serial port plus the console sink; one lock orders the UART's
/// bytes and PRINT's.
pub struct SerialDevice {
    uart: Mutex<Serial<SerialIrq, NoEvents, ConsoleSink>>,
    stats: Arc<VmStats>,
}

impl SerialDevice {
    /// A UART writing to `out`.
    pub fn new(out: ConsoleOut, stats: Arc<VmStats>) -> Result<Self, SerialError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let sink = ConsoleSink::new(out, stats.clone());
        Ok(SerialDevice {
            uart: Mutex::new(Serial::new(SerialIrq(irq), sink)),
            stats,
        })
    }

    /// Console bytes that bypass the UART (the PRINT hypercall).
    pub fn write_console(&self, bytes: &[u8]) -> Result<(), ConsoleError> {
        use std::io::Write as _;
        let mut uart = self.uart.lock();
        let sink = uart.writer_mut();
        // The sink buffers: its `write` cannot fail.
        sink.write_all(bytes).map_err(ConsoleError)?;
        sink.commit()
    }
}

impl PioDevice for SerialDevice {
    /// `in` from register `offset`.
    fn read(&self, offset: u16, data: &mut [u8]) -> bool {
        self.stats.io_serial();
        let mut uart = self.uart.lock();
        for b in data.iter_mut() {
            *b = uart.read(offset as u8);
        }
        true
    }

    /// `out` of `data` to register `offset` (string I/O repeats the port).
    fn write(&self, _vcpu: u32, offset: u16, data: &[u8]) -> Result<IoAction, DeviceError> {
        self.stats.io_serial();
        let mut uart = self.uart.lock();
        for &b in data {
            // Errors here are only the unconnected irq eventfd overflowing
            // or the (buffering, infallible) sink: neither is the guest's
            // fault, and the bytes are in the sink either way.
            if let Err(e) = uart.write(offset as u8, b) {
                tracing::debug!("serial register write: {e:?}");
            }
        }
        uart.writer_mut().commit()?;
        Ok(IoAction::Resume)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::devices::console::ConsoleBuffer;
    use std::time::Instant;

    #[test]
    fn thr_writes_reach_the_sink() {
        let cap = ConsoleBuffer::new();
        let stats = Arc::new(VmStats::new(Instant::now()));
        let dev = SerialDevice::new(Box::new(cap.clone()), stats.clone()).unwrap();
        dev.write(0, 0, b"hi\n").unwrap();
        dev.write_console(b"there").unwrap();
        assert_eq!(cap.text(), "hi\nthere");
        let mut lsr = [0u8];
        assert!(dev.read(5, &mut lsr));
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
        assert_eq!(stats.snapshot(1, "kvm").serial_bytes, 8);
    }
}
