//! Hypercalls (docs/guest-abi.md): the port that raises them, decoding and
//! validation (pure), and dispatch to the console and the paging
//! operations.

pub mod decode;
pub mod dispatch;
pub mod port;

pub use decode::Hypercall;
pub use dispatch::{HypercallError, HypercallHandler, HypercallOutcome};
pub use port::HypercallPort;
