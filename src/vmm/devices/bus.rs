//! The port-I/O bus: which port belongs to which device
//! (cloud-hypervisor's `Bus`). The vCPU loop hands every `in` and `out` to
//! it; a port no device claims is the guest's failure.

use std::sync::Arc;

use super::console::ConsoleError;
use crate::vmm::kvm::exit::IoAction;

/// A device failed while the guest used it (never the guest's fault).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The console could not be written.
    #[error(transparent)]
    Console(#[from] ConsoleError),
}

/// A device on the port-I/O bus. `offset` is relative to the device's
/// first port.
pub trait PioDevice: Send + Sync {
    /// `in`: fills `data`; false if the device has no such register.
    fn read(&self, _offset: u16, _data: &mut [u8]) -> bool {
        false
    }
    /// `out` by vCPU `vcpu`.
    fn write(&self, vcpu: u32, offset: u16, data: &[u8]) -> Result<IoAction, DeviceError>;
}

/// Two devices claim the same port.
#[derive(Debug, thiserror::Error)]
#[error("ports {base:#x}..+{len} overlap a device already on the bus")]
pub struct BusOverlap {
    /// First port.
    pub base: u16,
    /// Number of ports.
    pub len: u16,
}

struct Range {
    base: u16,
    len: u16,
    device: Arc<dyn PioDevice>,
}

impl Range {
    fn offset(&self, port: u16) -> Option<u16> {
        port.checked_sub(self.base).filter(|o| *o < self.len)
    }
}

/// The devices and their port ranges.
#[derive(Default)]
pub struct PioBus {
    ranges: Vec<Range>,
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` on ports `base..base + len`.
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<dyn PioDevice>,
    ) -> Result<(), BusOverlap> {
        let end = u32::from(base) + u32::from(len);
        let overlaps = self.ranges.iter().any(|r| {
            u32::from(base) < u32::from(r.base) + u32::from(r.len) && u32::from(r.base) < end
        });
        if len == 0 || end > 0x1_0000 || overlaps {
            return Err(BusOverlap { base, len });
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&dyn PioDevice, u16)> {
        self.ranges
            .iter()
            .find_map(|r| Some((&*r.device, r.offset(port)?)))
    }

    /// `in` from `port`; false if no device claims it.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        self.find(port)
            .is_some_and(|(dev, offset)| dev.read(offset, data))
    }

    /// `out` to `port` by vCPU `vcpu`; `Unclaimed` if no device claims it.
    pub fn write(&self, vcpu: u32, port: u16, data: &[u8]) -> Result<IoAction, DeviceError> {
        match self.find(port) {
            Some((dev, offset)) => dev.write(vcpu, offset, data),
            None => Ok(IoAction::Unclaimed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers with its offset.
    struct Echo;
    impl PioDevice for Echo {
        fn read(&self, offset: u16, data: &mut [u8]) -> bool {
            data.fill(offset as u8);
            true
        }
        fn write(&self, _vcpu: u32, offset: u16, _data: &[u8]) -> Result<IoAction, DeviceError> {
            Ok(IoAction::Exit(offset as u8))
        }
    }

    #[test]
    fn routes() {
        let mut bus = PioBus::new();
        bus.insert(0x3f8, 8, Arc::new(Echo)).unwrap();
        bus.insert(0xf4, 1, Arc::new(Echo)).unwrap();
        let out = |port| bus.write(0, port, &[0]).unwrap();
        assert_eq!(out(0x3f8), IoAction::Exit(0));
        assert_eq!(out(0x3fd), IoAction::Exit(5));
        assert_eq!(out(0x3ff), IoAction::Exit(7));
        assert_eq!(out(0x400), IoAction::Unclaimed);
        assert_eq!(out(0xf4), IoAction::Exit(0));
        assert_eq!(out(0xf5), IoAction::Unclaimed);
        assert_eq!(out(0x80), IoAction::Unclaimed);
        let mut b = [0u8; 2];
        assert!(bus.read(0x3f9, &mut b));
        assert_eq!(b, [1, 1]);
        assert!(!bus.read(0x1234, &mut b));
        assert!(bus.insert(0x3fc, 8, Arc::new(Echo)).is_err());
        assert!(bus.insert(0xfffe, 4, Arc::new(Echo)).is_err());
        assert!(bus.insert(0xf5, 0, Arc::new(Echo)).is_err());
    }
}
