//! What went wrong inside a guest: the failures a vCPU reports with its
//! registers (a triple fault, an unknown port, a KVM internal error...).
//! They are the guest's, not the VMM's: a run that ends so is an outcome,
//! not an error.

use std::fmt;

use super::cpu_state::CpuState;

/// What went wrong inside the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// KVM_EXIT_SHUTDOWN.
    TripleFault,
    /// KVM_EXIT_INTERNAL_ERROR.
    InternalError {
        /// `KVM_INTERNAL_ERROR_*`.
        suberror: u32,
        /// Extra data words.
        data: Vec<u64>,
    },
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// I/O on a port no device claims (or an `in` from a write-only one).
    UnknownPort {
        /// Port.
        port: u16,
        /// `out` (true) or `in`.
        write: bool,
        /// Access size times count.
        len: usize,
        /// The value written (first 8 bytes).
        value: Option<u64>,
    },
    /// An access to unbacked guest-physical memory.
    UnknownMmio {
        /// gpa.
        addr: u64,
        /// Write (true) or read.
        write: bool,
        /// Length.
        len: usize,
    },
    /// KVM_EXIT_SYSTEM_EVENT.
    SystemEvent {
        /// `KVM_SYSTEM_EVENT_*`.
        kind: u32,
    },
    /// An exit this VMM never enables.
    UnexpectedExit(&'static str),
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureKind::TripleFault => write!(f, "triple fault (KVM_EXIT_SHUTDOWN)"),
            FailureKind::InternalError { suberror, data } => {
                let what = match suberror {
                    1 => "KVM could not emulate an instruction",
                    2 => "simultaneous exceptions",
                    3 => "failed to deliver an event",
                    4 => "unexpected exit reason",
                    _ => "unknown suberror",
                };
                write!(f, "KVM internal error {suberror} ({what})")?;
                if !data.is_empty() {
                    write!(f, ", data:")?;
                    for d in data {
                        write!(f, " {d:#x}")?;
                    }
                }
                Ok(())
            }
            FailureKind::FailEntry { reason, cpu } => {
                write!(
                    f,
                    "KVM_RUN failed to enter the guest (hardware reason {reason:#x}, host cpu {cpu})"
                )
            }
            FailureKind::UnknownPort {
                port,
                write: true,
                len,
                value,
            } => {
                write!(
                    f,
                    "write to unknown I/O port {port:#x} ({len} byte{}",
                    if *len == 1 { "" } else { "s" }
                )?;
                if let Some(v) = value {
                    write!(f, ", value {v:#x}")?;
                }
                write!(f, ")")
            }
            FailureKind::UnknownPort {
                port,
                write: false,
                len,
                ..
            } => {
                write!(f, "read from unknown I/O port {port:#x} ({len} bytes)")
            }
            FailureKind::UnknownMmio { addr, write, len } => {
                write!(
                    f,
                    "{} of {len} bytes at unbacked guest-physical address {addr:#x} (MMIO)",
                    if *write { "write" } else { "read" }
                )
            }
            FailureKind::SystemEvent { kind } => write!(f, "system event {kind}"),
            FailureKind::UnexpectedExit(what) => write!(f, "unexpected exit {what}"),
        }
    }
}

/// A guest failure with the vCPU's registers.
#[derive(Clone, Debug)]
pub struct GuestFailure {
    /// vCPU index.
    pub vcpu: u32,
    /// What happened.
    pub kind: FailureKind,
    /// Registers at the time, if they could be read.
    pub state: Option<Box<CpuState>>,
}

impl fmt::Display for GuestFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vCPU {}: {}", self.vcpu, self.kind)?;
        if let Some(s) = &self.state {
            write!(f, "\n{s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_messages() {
        let f = FailureKind::UnknownPort {
            port: 0x1234,
            write: true,
            len: 1,
            value: Some(0x42),
        };
        assert_eq!(
            f.to_string(),
            "write to unknown I/O port 0x1234 (1 byte, value 0x42)"
        );
        assert_eq!(
            FailureKind::TripleFault.to_string(),
            "triple fault (KVM_EXIT_SHUTDOWN)"
        );
        let ie = FailureKind::InternalError {
            suberror: 1,
            data: vec![0x10],
        };
        assert_eq!(
            ie.to_string(),
            "KVM internal error 1 (KVM could not emulate an instruction), data: 0x10"
        );
        let g = GuestFailure {
            vcpu: 1,
            kind: FailureKind::UnknownMmio {
                addr: 0xfee0_0000,
                write: true,
                len: 4,
            },
            state: None,
        };
        assert_eq!(
            g.to_string(),
            "vCPU 1: write of 4 bytes at unbacked guest-physical address 0xfee00000 (MMIO)"
        );
    }
}
