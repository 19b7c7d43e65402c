//! The host side of a shadow-mode run: guest RAM as a VMA of the host mm,
//! the TLB shootdown through the host kernel's own MMU notifier, and the
//! host's memory threads (ksmd, kswapd, the scripted operations), all on
//! one thread scaffold.

pub mod aging;
pub mod ksmd;
pub mod kswapd;
pub mod ops;
pub mod ram;
pub mod thread;
pub mod timed_ops;
pub mod tlb;

pub use ram::ShadowRam;
pub use thread::{StartError, ThreadError};
pub use tlb::HostTlbFlush;
