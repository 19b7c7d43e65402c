//! Scenarios built on the VMM, above the library's core: the narrated
//! demos of host memory operations (`shadowvm demo`), the reliability run
//! (`shadowvm stress`), the narrator that renders the trace events, and
//! the observers (`--trace`, `--timeline`).

pub mod demo;
pub mod narrate;
pub mod observe;
pub mod stress;
mod stress_dma;
