//! A VM's counters: exits by reason, I/O exits by port, hypercalls, time in
//! the guest and in hypercalls, kicks, console bytes. Named atomic counters
//! (Firecracker's metrics habit), snapshotted into a serde struct.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::exit::ExitReason;
use crate::vmm::abi::hc;

const NR_REASONS: usize = ExitReason::ALL.len();
const NR_HYPERCALLS: usize = hc::ALL.len() + 1; // + "unknown"

/// Counters shared by every vCPU thread of one VM.
#[derive(Debug)]
pub struct VmStats {
    /// When VM creation began.
    start: Instant,
    /// KVM_RUN exits, by [`ExitReason`].
    exits: [AtomicU64; NR_REASONS],
    /// KVM_EXIT_IO exits on the UART.
    io_serial: AtomicU64,
    /// KVM_EXIT_IO exits on the hypercall port.
    io_hypercall: AtomicU64,
    /// KVM_EXIT_IO exits on the exit port.
    io_exit_port: AtomicU64,
    /// Hypercalls by number (the last slot: numbers the ABI does not know).
    hypercalls: [AtomicU64; NR_HYPERCALLS],
    /// Nanoseconds spent in each hypercall number.
    hypercall_nr_ns: [AtomicU64; NR_HYPERCALLS],
    /// Nanoseconds inside KVM_RUN.
    guest_ns: AtomicU64,
    /// Nanoseconds handling hypercalls.
    hypercall_ns: AtomicU64,
    /// vCPU kicks sent.
    kicks_sent: AtomicU64,
    /// Bytes the guest wrote to its console.
    serial_bytes: AtomicU64,
    /// Nanoseconds from `start` to the first serial byte, plus one (0: none yet).
    first_serial_ns: AtomicU64,
    /// Nanoseconds from `start` until the VM and its vCPUs were ready to run.
    vm_create_ns: AtomicU64,
}

impl VmStats {
    /// Counters starting now; `start` is the moment VM creation began.
    pub fn new(start: Instant) -> Self {
        VmStats {
            start,
            exits: Default::default(),
            io_serial: AtomicU64::new(0),
            io_hypercall: AtomicU64::new(0),
            io_exit_port: AtomicU64::new(0),
            hypercalls: Default::default(),
            hypercall_nr_ns: Default::default(),
            guest_ns: AtomicU64::new(0),
            hypercall_ns: AtomicU64::new(0),
            kicks_sent: AtomicU64::new(0),
            serial_bytes: AtomicU64::new(0),
            first_serial_ns: AtomicU64::new(0),
            vm_create_ns: AtomicU64::new(0),
        }
    }

    /// When VM creation began.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// One exit of `reason`.
    pub fn exit(&self, reason: ExitReason) {
        self.exits[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// One I/O exit on the serial port.
    pub fn io_serial(&self) {
        self.io_serial.fetch_add(1, Ordering::Relaxed);
    }

    /// One I/O exit on the exit port.
    pub fn io_exit_port(&self) {
        self.io_exit_port.fetch_add(1, Ordering::Relaxed);
    }

    /// One hypercall `nr`.
    pub fn hypercall(&self, nr: u64) {
        self.io_hypercall.fetch_add(1, Ordering::Relaxed);
        self.hypercalls[Self::hypercall_index(nr)].fetch_add(1, Ordering::Relaxed);
    }

    fn hypercall_index(nr: u64) -> usize {
        hc::index(nr).unwrap_or(NR_HYPERCALLS - 1)
    }

    /// The name of counter `i`.
    fn hypercall_name(i: usize) -> &'static str {
        hc::ALL.get(i).map_or("unknown", |&nr| hc::name(nr))
    }

    /// Time spent inside KVM_RUN.
    pub fn guest_time(&self, ns: u64) {
        self.guest_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Time spent handling hypercall `nr` in the VMM (register access
    /// included).
    pub fn hypercall_time(&self, nr: u64, ns: u64) {
        self.hypercall_ns.fetch_add(ns, Ordering::Relaxed);
        self.hypercall_nr_ns[Self::hypercall_index(nr)].fetch_add(ns, Ordering::Relaxed);
    }

    /// One vCPU kick sent.
    pub fn kick_sent(&self) {
        self.kicks_sent.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` bytes of guest console output.
    pub fn serial_output(&self, n: usize) {
        if n == 0 {
            return;
        }
        if self.first_serial_ns.load(Ordering::Relaxed) == 0 {
            let ns = self.start.elapsed().as_nanos() as u64 + 1;
            // Losing the race means another vCPU's byte was first.
            let _first =
                self.first_serial_ns
                    .compare_exchange(0, ns, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.serial_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The VM and its vCPUs are ready to run.
    pub fn vm_created(&self) {
        self.vm_create_ns
            .store(self.start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// A consistent-enough copy for printing.
    pub fn snapshot(&self, vcpus: u32, paging: &'static str) -> VmStatsSnapshot {
        let us = |ns: u64| ns as f64 / 1000.0;
        let first = self.first_serial_ns.load(Ordering::Relaxed);
        VmStatsSnapshot {
            vcpus,
            paging,
            wall_us: us(self.start.elapsed().as_nanos() as u64),
            vm_create_us: us(self.vm_create_ns.load(Ordering::Relaxed)),
            first_serial_byte_us: (first != 0).then(|| us(first - 1)),
            time_in_guest_us: us(self.guest_ns.load(Ordering::Relaxed)),
            time_in_hypercalls_us: us(self.hypercall_ns.load(Ordering::Relaxed)),
            exits: ExitReason::ALL
                .iter()
                .map(|r| (r.name(), self.exits[r.index()].load(Ordering::Relaxed)))
                .collect(),
            io_exits: [
                ("serial", self.io_serial.load(Ordering::Relaxed)),
                ("hypercall", self.io_hypercall.load(Ordering::Relaxed)),
                ("exit_port", self.io_exit_port.load(Ordering::Relaxed)),
            ]
            .into_iter()
            .collect(),
            hypercalls: (0..NR_HYPERCALLS)
                .map(|i| {
                    (
                        Self::hypercall_name(i),
                        self.hypercalls[i].load(Ordering::Relaxed),
                    )
                })
                .filter(|(_, n)| *n != 0)
                .collect(),
            hypercall_us: (0..NR_HYPERCALLS)
                .filter(|&i| self.hypercalls[i].load(Ordering::Relaxed) != 0)
                .map(|i| {
                    (
                        Self::hypercall_name(i),
                        us(self.hypercall_nr_ns[i].load(Ordering::Relaxed)),
                    )
                })
                .collect(),
            kicks: self.kicks_sent.load(Ordering::Relaxed),
            serial_bytes: self.serial_bytes.load(Ordering::Relaxed),
        }
    }
}

/// The VM's counters at one moment (the part of `--stats` / `--json` every
/// run has).
#[derive(Clone, Debug, serde::Serialize)]
pub struct VmStatsSnapshot {
    /// vCPU count.
    pub vcpus: u32,
    /// Paging mode.
    pub paging: &'static str,
    /// From the start of VM creation to now.
    pub wall_us: f64,
    /// From the start of VM creation (opening /dev/kvm) until every vCPU
    /// was configured.
    pub vm_create_us: f64,
    /// From the start of VM creation to the guest's first console byte.
    pub first_serial_byte_us: Option<f64>,
    /// Sum over vCPUs of the time spent inside KVM_RUN.
    pub time_in_guest_us: f64,
    /// Sum over vCPUs of the time the VMM spent handling hypercalls.
    pub time_in_hypercalls_us: f64,
    /// Exits by KVM exit reason.
    pub exits: BTreeMap<&'static str, u64>,
    /// I/O exits by port.
    pub io_exits: BTreeMap<&'static str, u64>,
    /// Hypercalls by name (only those made).
    pub hypercalls: BTreeMap<&'static str, u64>,
    /// VMM time handling them, by name (register access included).
    pub hypercall_us: BTreeMap<&'static str, f64>,
    /// vCPU kicks sent.
    pub kicks: u64,
    /// Console bytes from the guest.
    pub serial_bytes: u64,
}

impl VmStatsSnapshot {
    /// Total exits.
    pub fn total_exits(&self) -> u64 {
        self.exits.values().sum()
    }
}

impl fmt::Display for VmStatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "shadowvm stats ({} vCPU{}, {} paging):",
            self.vcpus,
            if self.vcpus == 1 { "" } else { "s" },
            self.paging
        )?;
        writeln!(f, "  wall time            {:>12.1} us", self.wall_us)?;
        writeln!(f, "  VM creation          {:>12.1} us", self.vm_create_us)?;
        match self.first_serial_byte_us {
            Some(t) => writeln!(f, "  first serial byte    {t:>12.1} us")?,
            None => writeln!(f, "  first serial byte    {:>12}", "none")?,
        }
        writeln!(
            f,
            "  time in guest        {:>12.1} us",
            self.time_in_guest_us
        )?;
        writeln!(
            f,
            "  time in hypercalls   {:>12.1} us",
            self.time_in_hypercalls_us
        )?;
        writeln!(f, "  exits                {:>12}", self.total_exits())?;
        for (name, n) in self.exits.iter().filter(|(_, n)| **n != 0) {
            writeln!(f, "    {name:<22} {n:>8}")?;
        }
        for (name, n) in self.io_exits.iter().filter(|(_, n)| **n != 0) {
            writeln!(f, "    io {name:<19} {n:>8}")?;
        }
        for (name, n) in &self.hypercalls {
            let t = self.hypercall_us.get(name).copied().unwrap_or(0.0);
            writeln!(
                f,
                "    hypercall {name:<12} {n:>8}  {t:>10.1} us ({:.2} us each)",
                t / (*n).max(1) as f64
            )?;
        }
        writeln!(f, "  kicks                {:>12}", self.kicks)?;
        write!(f, "  serial bytes         {:>12}", self.serial_bytes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_json() {
        let s = VmStats::new(Instant::now());
        s.exit(ExitReason::Io);
        s.exit(ExitReason::Io);
        s.exit(ExitReason::Hlt);
        s.hypercall(hc::EXIT);
        s.hypercall(1000);
        s.hypercall(hc::HALT);
        s.hypercall(1 << 32 | hc::HALT);
        s.hypercall_time(hc::EXIT, 2500);
        s.serial_output(5);
        s.serial_output(3);
        let snap = s.snapshot(1, "kvm");
        assert_eq!(snap.exits["io"], 2);
        assert_eq!(snap.exits["hlt"], 1);
        assert_eq!(snap.total_exits(), 3);
        assert_eq!(snap.hypercalls["exit"], 1);
        assert_eq!(snap.hypercalls["unknown"], 2, "bits above 31: no hypercall");
        assert_eq!(snap.hypercalls["halt"], 1);
        assert_eq!(snap.io_exits["hypercall"], 4);
        assert_eq!(snap.serial_bytes, 8);
        assert!(snap.first_serial_byte_us.is_some());
        let json: serde_json::Value = serde_json::to_value(&snap).unwrap();
        assert_eq!(json["exits"]["io"], 2);
        assert_eq!(json["paging"], "kvm");
        assert_eq!(snap.hypercall_us["exit"], 2.5);
        assert!(snap.to_string().contains("hypercall exit"));
    }
}
