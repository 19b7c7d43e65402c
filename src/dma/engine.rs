//! The device's own thread: DMA requests are queued to it (a doorbell and a
//! descriptor ring, reduced to a channel) and run there, concurrently with
//! vCPUs and host operations.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle};

use super::DmaError;
use super::device::DmaDevice;

/// One DMA request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DmaOp {
    /// Read `len` bytes at `iova` (device ← memory).
    Read { iova: u64, len: usize },
    /// Write `data` at `iova` (device → memory).
    Write { iova: u64, data: Vec<u8> },
    /// Read `len` bytes at `src`, then write them at `dst`: a copy inside
    /// the buffer with memmove's semantics, in one request.
    Copy { src: u64, dst: u64, len: usize },
    /// Write `len` bytes of `byte` at `iova`.
    Fill { iova: u64, len: usize, byte: u8 },
}

/// A completed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DmaDone {
    Read(Vec<u8>),
    /// Bytes written (by a write, a copy or a fill).
    Written(usize),
}

type Request = (DmaOp, Sender<Result<DmaDone, DmaError>>);

/// The engine thread of one device; dropping it lets the queued requests
/// finish and joins the thread.
pub struct DmaEngine {
    tx: Option<Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl DmaEngine {
    /// Starts the engine thread of `device`.
    pub fn spawn(device: Arc<DmaDevice>) -> Result<Self, DmaError> {
        let (tx, rx) = mpsc::channel::<Request>();
        let thread = thread::Builder::new()
            .name("dma-engine".into())
            .spawn(move || {
                for (op, done) in rx {
                    // The submitter may have stopped waiting: its loss.
                    let _submitter_gone = done.send(run(&device, op));
                }
            })
            .map_err(DmaError::Spawn)?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues `op`; the completion arrives on the returned channel.
    pub fn submit(&self, op: DmaOp) -> Receiver<Result<DmaDone, DmaError>> {
        let (done_tx, done_rx) = mpsc::channel();
        if let Some(tx) = &self.tx
            && let Err(mpsc::SendError((_, done_tx))) = tx.send((op, done_tx))
        {
            let _receiver_is_ours = done_tx.send(Err(DmaError::EngineStopped));
        }
        done_rx
    }

    /// Runs `op` on the engine thread and waits for it.
    pub fn run(&self, op: DmaOp) -> Result<DmaDone, DmaError> {
        self.submit(op)
            .recv()
            .map_err(|_| DmaError::EngineStopped)?
    }
}

fn run(device: &DmaDevice, op: DmaOp) -> Result<DmaDone, DmaError> {
    match op {
        DmaOp::Read { iova, len } => {
            let mut buf = vec![0u8; len];
            device.read(iova, &mut buf)?;
            Ok(DmaDone::Read(buf))
        }
        DmaOp::Write { iova, data } => {
            device.write(iova, &data)?;
            Ok(DmaDone::Written(data.len()))
        }
        DmaOp::Copy { src, dst, len } => {
            // Both ranges first: nothing is read for a copy that cannot be
            // written.
            device.check_range(src, len as u64)?;
            device.check_range(dst, len as u64)?;
            let mut buf = vec![0u8; len];
            device.read(src, &mut buf)?;
            device.write(dst, &buf)?;
            Ok(DmaDone::Written(len))
        }
        DmaOp::Fill { iova, len, byte } => {
            device.write(iova, &vec![byte; len])?;
            Ok(DmaDone::Written(len))
        }
    }
}

impl Drop for DmaEngine {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take()
            && let Err(payload) = t.join()
        {
            std::panic::resume_unwind(payload);
        }
    }
}
