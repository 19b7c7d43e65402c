//! Scenarios built on the VMM, above the library's core: the narrated
//! demos of host memory operations (`shadowvm demo`), the reliability run
//! (`shadowvm stress`), the narrator that renders the trace events, and
//! the observers (`--trace`, `--timeline`).

pub mod demo;
pub mod narrate;
pub mod observe;
pub mod stress;
mod stress_dma;

/// Polls `f` every millisecond until it returns `Some`, for at most
/// `timeout`: how a scenario (or a test) waits for an event the VM
/// signals only through its state.
pub fn poll<T>(timeout: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
