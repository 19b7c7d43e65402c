//! The port I/O map: which port belongs to what.

use super::abi;

/// Who handles a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PioTarget {
    /// The UART, with the register offset.
    Serial(u8),
    /// The exit port.
    Exit,
    /// The hypercall port.
    Hypercall,
}

/// Routes `port`; `None` means no device claims it.
pub fn route(port: u16) -> Option<PioTarget> {
    match port {
        p if (abi::PORT_SERIAL..abi::PORT_SERIAL + abi::PORT_SERIAL_LEN).contains(&p) => {
            Some(PioTarget::Serial((p - abi::PORT_SERIAL) as u8))
        }
        abi::PORT_EXIT => Some(PioTarget::Exit),
        abi::PORT_HYPERCALL => Some(PioTarget::Hypercall),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route(0x3f8), Some(PioTarget::Serial(0)));
        assert_eq!(route(0x3fd), Some(PioTarget::Serial(5)));
        assert_eq!(route(0x3ff), Some(PioTarget::Serial(7)));
        assert_eq!(route(0x400), None);
        assert_eq!(route(0xf4), Some(PioTarget::Exit));
        assert_eq!(route(0xf5), Some(PioTarget::Hypercall));
        assert_eq!(route(0x1234), None);
        assert_eq!(route(0x80), None);
    }
}
