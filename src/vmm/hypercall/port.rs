//! The hypercall port: an `outl` to it is a hypercall with the number in
//! `eax` (any other access is an unknown port, as for a port nobody
//! claims). The hypercall itself runs once the vCPU loop has released the
//! exit's data and can hand out the registers.

use crate::vmm::devices::bus::{DeviceError, PioDevice};
use crate::vmm::kvm::exit::{IoAction, le_value};

/// The device on `abi::PORT_HYPERCALL`.
pub struct HypercallPort;

impl PioDevice for HypercallPort {
    fn write(&self, _vcpu: u32, _offset: u16, data: &[u8]) -> Result<IoAction, DeviceError> {
        Ok(if data.len() == 4 {
            IoAction::Hypercall(le_value(data))
        } else {
            IoAction::Unclaimed
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_dword_out_is_a_hypercall() {
        let p = HypercallPort;
        assert_eq!(
            p.write(0, 0, &[6, 0, 0, 0]).unwrap(),
            IoAction::Hypercall(6)
        );
        assert_eq!(p.write(0, 0, &[6]).unwrap(), IoAction::Unclaimed);
        assert!(!p.read(0, &mut [0; 4]));
    }
}
