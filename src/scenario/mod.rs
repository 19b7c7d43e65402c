//! Scenarios built on the VMM, above the library's core: the narrated
//! demos of host memory operations (`shadowvm demo`), the reliability run
//! (`shadowvm stress`), and the narrator that renders the trace events.

pub mod demo;
pub mod narrate;
pub mod stress;
mod stress_dma;
