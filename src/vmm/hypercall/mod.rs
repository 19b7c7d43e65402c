//! Hypercalls (docs/guest-abi.md): the port that raises them, decoding and
//! validation (pure), and dispatch to the console, the switcher (trap
//! table, stacks), the paging operations and the DMA device.

pub mod decode;
pub mod dispatch;
pub mod dma;
pub mod port;

pub use decode::{Hypercall, Limits};
pub use dispatch::{HypercallError, HypercallHandler};
pub use port::HypercallPort;
