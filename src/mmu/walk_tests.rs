//! Walker tests in the spirit of kvm-unit-tests `x86/access.c`: generators
//! enumerate every combination of page-table bits, control-register bits and
//! access types, and compare the walker against a reference model written
//! separately from the Intel SDM (vol. 3, §4.5 entry formats, §4.6 access
//! rights, §4.7 error codes, §4.8 A/D flags), not from the walker's helpers.
//!
//! The reference encodes KVM's (not bare hardware's) choices where the two
//! may differ, because shadow mode must match kvm mode (docs/design.md rule 6):
//! A/D bits are written only by a walk that succeeds, and a table pointer
//! outside guest RAM is a not-present fault.

use std::cell::{Cell, RefCell};

use super::*;

// Entry bits, spelled out here so the reference does not lean on `pte.rs`.
const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const G: u64 = 1 << 8;
const AVL9: u64 = 1 << 9;
const PAT_LARGE: u64 = 1 << 12;
const NX: u64 = 1 << 63;

// Error-code bits (SDM §4.7).
const EC_P: u32 = 1 << 0;
const EC_W: u32 = 1 << 1;
const EC_U: u32 = 1 << 2;
const EC_RSVD: u32 = 1 << 3;
const EC_ID: u32 = 1 << 4;

/// Guest RAM ends at 4 GiB; only the first `STORED_PAGES` pages have
/// backing words (the rest reads as zero), so a 1 GiB page can sit in RAM.
const RAM_END: u64 = 1 << 32;
const STORED_PAGES: usize = 16;

/// Guest RAM test double: dense words for the low pages, a log of every
/// word the walker wrote, and a cmpxchg counter.
struct TestRam {
    words: Vec<Cell<u64>>,
    ram_end: u64,
    written: RefCell<Vec<u64>>,
    cmpxchg_calls: Cell<u32>,
}

impl TestRam {
    fn new() -> Self {
        TestRam {
            words: (0..STORED_PAGES * 512).map(|_| Cell::new(0)).collect(),
            ram_end: RAM_END,
            written: RefCell::new(Vec::new()),
            cmpxchg_calls: Cell::new(0),
        }
    }

    fn get(&self, gpa: u64) -> u64 {
        self.word(gpa).map_or(0, Cell::get)
    }

    fn set(&self, gpa: u64, val: u64) {
        self.word(gpa)
            .expect("test bug: entry outside the stored pages")
            .set(val);
    }

    fn word(&self, gpa: u64) -> Option<&Cell<u64>> {
        self.words.get(usize::try_from(gpa / 8).ok()?)
    }

    fn reset_log(&self) {
        self.written.borrow_mut().clear();
        self.cmpxchg_calls.set(0);
    }
}

impl GuestPtMemory for TestRam {
    fn read_gpte(&self, gpa: u64) -> Option<u64> {
        assert_eq!(gpa % 8, 0, "walker read a misaligned PTE");
        (gpa < self.ram_end).then(|| self.get(gpa))
    }

    fn cmpxchg_gpte(&self, gpa: u64, old: u64, new: u64) -> Option<Result<(), u64>> {
        assert_eq!(gpa % 8, 0, "walker wrote a misaligned PTE");
        self.cmpxchg_calls.set(self.cmpxchg_calls.get() + 1);
        if gpa >= self.ram_end {
            return None;
        }
        let cur = self.get(gpa);
        if cur != old {
            return Some(Err(cur));
        }
        self.set(gpa, new);
        self.written.borrow_mut().push(gpa);
        Some(Ok(()))
    }
}

/// Wraps [`TestRam`] so that the next `races` cmpxchg calls find the entry
/// changed by `mutate` (another vCPU writing the guest page table between
/// the walker's read and its cmpxchg).
struct RacyRam<'a> {
    ram: &'a TestRam,
    races: Cell<u32>,
    mutate: fn(u64) -> u64,
}

impl GuestPtMemory for RacyRam<'_> {
    fn read_gpte(&self, gpa: u64) -> Option<u64> {
        self.ram.read_gpte(gpa)
    }

    fn cmpxchg_gpte(&self, gpa: u64, old: u64, new: u64) -> Option<Result<(), u64>> {
        if self.races.get() > 0 {
            self.races.set(self.races.get() - 1);
            self.ram.set(gpa, (self.mutate)(self.ram.get(gpa)));
        }
        self.ram.cmpxchg_gpte(gpa, old, new)
    }
}

/// Walks `GVA` (4 KiB layout, every entry P|RW|US) for `access` while
/// another vCPU applies `mutate` to the entry before each of the walker's
/// next `races` cmpxchgs; returns guest RAM afterwards and the result.
fn racy_walk(
    races: u32,
    mutate: fn(u64) -> u64,
    access: Access,
) -> (TestRam, Result<GuestWalk, WalkError>) {
    let ram = TestRam::new();
    setup_4k(&ram, DATA | P | RW | US);
    let racy = RacyRam {
        ram: &ram,
        races: Cell::new(races),
        mutate,
    };
    let r = walk_addr(&racy, &base_cpu().paging_state(), GVA, access);
    (ram, r)
}

/// Memory whose entries read fine but vanish before A/D can be written.
struct VanishingRam<'a>(&'a TestRam);

impl GuestPtMemory for VanishingRam<'_> {
    fn read_gpte(&self, gpa: u64) -> Option<u64> {
        self.0.read_gpte(gpa)
    }
    fn cmpxchg_gpte(&self, _gpa: u64, _old: u64, _new: u64) -> Option<Result<(), u64>> {
        None
    }
}

// ---------------------------------------------------------------------------
// The reference model.
// ---------------------------------------------------------------------------

/// CPU state the reference reads.
#[derive(Clone, Copy, Debug)]
struct Cpu {
    cr3: u64,
    wp: bool,
    nxe: bool,
    smep: bool,
    smap: bool,
    ac: bool,
    maxphyaddr: u32,
    gbpages: bool,
    amd: bool,
}

impl Cpu {
    fn paging_state(&self) -> PagingState {
        PagingState {
            cr3: self.cr3,
            cr0_wp: self.wp,
            cr4_smep: self.smep,
            cr4_smap: self.smap,
            efer_nx: self.nxe,
            maxphyaddr: self.maxphyaddr as u8,
            gbpages: self.gbpages,
            amd: self.amd,
        }
    }
}

/// The access, as the SDM classifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Fetch,
}

#[derive(Clone, Copy, Debug)]
struct RefAccess {
    kind: Kind,
    cpl3: bool,
    implicit: bool,
}

impl RefAccess {
    /// An explicit access of `kind` from CPL3 or CPL0.
    fn explicit(kind: Kind, cpl3: bool) -> Self {
        RefAccess {
            kind,
            cpl3,
            implicit: false,
        }
    }

    fn to_access(self, ac: bool) -> Access {
        Access {
            write: self.kind == Kind::Write,
            // An implicit supervisor access is not a user-mode access even
            // when made at CPL 3.
            user: self.cpl3 && !self.implicit,
            fetch: self.kind == Kind::Fetch,
            implicit: self.implicit,
            eflags_ac: ac,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Fault { error_code: u32 },
    Translated { gpa: u64, level: u8, in_ram: bool },
    GaveUp,
}

/// What the reference expects: the outcome, and the value every entry on
/// the walked path must hold afterwards.
#[derive(Clone, Debug)]
struct Expected {
    outcome: Outcome,
    path: Vec<(u64, u64)>,
}

fn bit(v: u64, n: u32) -> bool {
    (v >> n) & 1 == 1
}

/// SDM tables 4-14..4-20: is any reserved bit of `e`, a present entry at
/// `level`, set?
fn sdm_reserved(e: u64, level: u8, cpu: &Cpu) -> bool {
    // Physical-address bits at or above MAXPHYADDR, up to bit 51.
    if (cpu.maxphyaddr..=51).any(|b| bit(e, b)) {
        return true;
    }
    // XD without IA32_EFER.NXE.
    if !cpu.nxe && bit(e, 63) {
        return true;
    }
    let ps = bit(e, 7);
    match level {
        // PML4E: bit 7 must be 0; AMD also reserves bit 8 there.
        4 => ps || (cpu.amd && bit(e, 8)),
        // PDPTE: PS needs 1-GByte page support; a 1 GiB page has bits 29:13
        // reserved (bit 12 is PAT).
        3 => ps && (!cpu.gbpages || (13..=29).any(|b| bit(e, b))),
        // PDE mapping 2 MiB: bits 20:13 reserved.
        2 => ps && (13..=20).any(|b| bit(e, b)),
        // PTE: bit 7 is PAT, nothing else reserved below MAXPHYADDR.
        _ => false,
    }
}

/// Walks the tables the way the SDM describes, then applies the access
/// rules of §4.6.1 and the error-code rules of §4.7.
fn reference(ram: &TestRam, cpu: &Cpu, gva: u64, acc: RefAccess) -> Expected {
    let addr_bits = |e: u64| e & 0x000f_ffff_ffff_f000;
    let mut table = addr_bits(cpu.cr3);
    let mut path: Vec<(u64, u64, u8)> = Vec::with_capacity(4);
    let mut leaf_base = 0;
    let mut leaf_level = 0;

    let mut fault_code: Option<u32> = None;
    for level in [4u8, 3, 2, 1] {
        let shift = 12 + 9 * (u32::from(level) - 1);
        let gpa = table + ((gva >> shift) & 511) * 8;
        if gpa >= ram.ram_end {
            // KVM: a table outside every memslot is a not-present fault.
            fault_code = Some(0);
            break;
        }
        let e = ram.get(gpa);
        if !bit(e, 0) {
            fault_code = Some(0);
            break;
        }
        if sdm_reserved(e, level, cpu) {
            fault_code = Some(EC_P | EC_RSVD);
            break;
        }
        path.push((gpa, e, level));
        if level == 1 || bit(e, 7) {
            // A page: its base is the entry's address bits with the low bits
            // of the page size cleared (for 2M/1G this drops PAT, bit 12).
            let size = 1u64 << shift;
            leaf_base = addr_bits(e) & !(size - 1);
            leaf_base |= gva & (size - 1) & !0xfff;
            leaf_level = level;
            break;
        }
        table = addr_bits(e);
    }

    if fault_code.is_none() {
        let user_page = path.iter().all(|&(_, e, _)| bit(e, 2));
        let writable = path.iter().all(|&(_, e, _)| bit(e, 1));
        let xd = cpu.nxe && path.iter().any(|&(_, e, _)| bit(e, 63));
        let user_mode = acc.cpl3 && !acc.implicit;
        let allowed = if user_mode {
            // §4.6.1, user-mode accesses: only to user-mode addresses; writes
            // need R/W everywhere; fetches need XD clear (if NXE).
            user_page
                && match acc.kind {
                    Kind::Read => true,
                    Kind::Write => writable,
                    Kind::Fetch => !xd,
                }
        } else {
            match acc.kind {
                // Supervisor fetches: never from user pages under SMEP;
                // otherwise XD (if NXE) decides.
                Kind::Fetch => {
                    let smep_denies = cpu.smep && user_page;
                    !smep_denies && !xd
                }
                Kind::Read | Kind::Write => {
                    // SMAP: no supervisor data access to user pages unless
                    // EFLAGS.AC=1 and the access is explicit.
                    let smap_denies = cpu.smap && user_page && (acc.implicit || !cpu.ac);
                    if smap_denies {
                        false
                    } else if acc.kind == Kind::Write {
                        // CR0.WP=0: supervisor writes ignore R/W.
                        writable || !cpu.wp
                    } else {
                        true
                    }
                }
            }
        };
        if !allowed {
            fault_code = Some(EC_P);
        }
    }

    let mut expected_path: Vec<(u64, u64)> = path.iter().map(|&(g, e, _)| (g, e)).collect();
    let outcome = match fault_code {
        Some(mut ec) => {
            if acc.kind == Kind::Write {
                ec |= EC_W;
            }
            if user_mode_bit(acc) {
                ec |= EC_U;
            }
            if acc.kind == Kind::Fetch && (cpu.nxe || cpu.smep) {
                ec |= EC_ID;
            }
            Outcome::Fault { error_code: ec }
        }
        None => {
            // §4.8: A on every entry used, D on the entry that maps the page
            // for a write. Entries may alias (self-referencing tables), so
            // apply each update to the latest value at that address.
            for i in 0..expected_path.len() {
                let gpa = expected_path[i].0;
                let mut set = A;
                if i + 1 == expected_path.len() && acc.kind == Kind::Write {
                    set |= D;
                }
                for entry in expected_path.iter_mut().filter(|(g, _)| *g == gpa) {
                    entry.1 |= set;
                }
            }
            Outcome::Translated {
                gpa: leaf_base | (gva & 0xfff),
                level: leaf_level,
                in_ram: leaf_base < ram.ram_end,
            }
        }
    };
    Expected {
        outcome,
        path: expected_path,
    }
}

fn user_mode_bit(acc: RefAccess) -> bool {
    acc.cpl3 && !acc.implicit
}

/// Runs the walker on `ram`, compares outcome, walk details and memory with
/// the reference, and restores the path entries. Returns a description of
/// the first mismatch.
fn check(ram: &TestRam, cpu: &Cpu, gva: u64, acc: RefAccess) -> Result<(), String> {
    let expected = reference(ram, cpu, gva, acc);
    ram.reset_log();
    let mmu = GuestMmu::new(cpu.paging_state());
    let result = mmu.walk_addr(ram, gva, acc.to_access(cpu.ac));
    let outcome = match &result {
        Ok(w) => Outcome::Translated {
            gpa: w.gpa(),
            level: w.level,
            in_ram: w.leaf_in_ram,
        },
        Err(WalkError::PageFault(f)) => Outcome::Fault {
            error_code: f.error_code.bits(),
        },
        Err(WalkError::AdRetriesExhausted { .. }) => Outcome::GaveUp,
    };
    let mut problems = Vec::new();
    if outcome != expected.outcome {
        problems.push(format!(
            "outcome {outcome:x?}, expected {:x?}",
            expected.outcome
        ));
    }
    if let Err(WalkError::PageFault(f)) = &result
        && f.address != gva
    {
        problems.push(format!("fault address {:#x}", f.address));
    }
    for &(gpa, want) in &expected.path {
        let got = ram.get(gpa);
        if got != want {
            problems.push(format!("entry at {gpa:#x} is {got:#x}, expected {want:#x}"));
        }
    }
    for &gpa in ram.written.borrow().iter() {
        if !expected.path.iter().any(|&(g, _)| g == gpa) {
            problems.push(format!("walker wrote {gpa:#x}, off the walked path"));
        }
    }
    if let Ok(w) = &result
        && expected.path.len() == usize::from(5 - w.level)
    {
        for (i, &(gpa, want)) in expected.path.iter().enumerate() {
            let level = 4 - i;
            if w.pte_gpa[level - 1] != gpa {
                problems.push(format!(
                    "pte_gpa[{}] = {:#x}",
                    level - 1,
                    w.pte_gpa[level - 1]
                ));
            }
            if w.table_gfn[level - 1] != gpa >> 12 {
                problems.push(format!("table_gfn[{}] wrong", level - 1));
            }
            // Aliased entries may have been updated after the walker's copy
            // was taken; only the last occurrence is guaranteed current.
            if !expected.path[i + 1..].iter().any(|&(g, _)| g == gpa) && w.ptes[level - 1] != want {
                problems.push(format!(
                    "ptes[{}] = {:#x}, expected {want:#x}",
                    level - 1,
                    w.ptes[level - 1]
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "gva {gva:#x} {acc:?} {cpu:x?}: {}",
            problems.join("; ")
        ))
    }
}

/// Checks every access kind, explicit and from CPL3 or CPL0 (`cpl3`), at
/// `gva`; panics with the first mismatch.
fn check_every_kind(ram: &TestRam, cpu: &Cpu, gva: u64, cpl3: bool) {
    for kind in ACCESSES {
        check(ram, cpu, gva, RefAccess::explicit(kind, cpl3)).unwrap();
    }
}

/// Collects mismatches across a generator and fails with the first few.
#[derive(Default)]
struct Tally {
    cases: u64,
    failures: u64,
    first: Vec<String>,
}

impl Tally {
    fn record(&mut self, r: Result<(), String>, what: impl FnOnce() -> String) {
        self.cases += 1;
        if let Err(msg) = r {
            self.failures += 1;
            if self.first.len() < 8 {
                self.first.push(format!("{}: {msg}", what()));
            }
        }
    }

    /// Writes `entries`, then checks every access kind from CPL0 and CPL3
    /// at `GVA` (entries written again before each: a walk sets A/D).
    fn every_access(
        &mut self,
        ram: &TestRam,
        cpu: &Cpu,
        entries: &[(u64, u64)],
        what: impl Fn() -> String,
    ) {
        for kind in ACCESSES {
            for cpl3 in [false, true] {
                for &(gpa, e) in entries {
                    ram.set(gpa, e);
                }
                let acc = RefAccess::explicit(kind, cpl3);
                self.record(check(ram, cpu, GVA, acc), &what);
            }
        }
    }

    fn assert_clean(&self, name: &str, expected_cases: u64) {
        assert_eq!(self.cases, expected_cases, "{name}: case count");
        assert!(
            self.failures == 0,
            "{name}: {} of {} cases differ from the reference:\n{}",
            self.failures,
            self.cases,
            self.first.join("\n")
        );
    }
}

// Fixed layout for the generators: PML4, PDPT, PD, PT, data page.
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: u64 = 0x4000;
const DATA: u64 = 0x5000;
/// Indices 1, 2, 3, 4 at levels 4..1, offset 0xabc.
const GVA: u64 = (1 << 39) | (2 << 30) | (3 << 21) | (4 << 12) | 0xabc;

fn slot(table: u64, level: u32) -> u64 {
    table + ((GVA >> (12 + 9 * (level - 1))) & 511) * 8
}

const ACCESSES: [Kind; 3] = [Kind::Read, Kind::Write, Kind::Fetch];

fn base_cpu() -> Cpu {
    Cpu {
        cr3: PML4,
        wp: true,
        nxe: true,
        smep: false,
        smap: false,
        ac: false,
        maxphyaddr: 36,
        gbpages: true,
        amd: false,
    }
}

/// [`base_cpu`] in the mode combination `flags`: bit 0 CR0.WP, 1 EFER.NXE,
/// 2 CR4.SMEP, 3 CR4.SMAP, 4 EFLAGS.AC.
fn mode_cpu(flags: u32) -> Cpu {
    Cpu {
        wp: flags & 1 != 0,
        nxe: flags & 2 != 0,
        smep: flags & 4 != 0,
        smap: flags & 8 != 0,
        ac: flags & 16 != 0,
        ..base_cpu()
    }
}

/// Picks the entry bits selected by `combo` out of `bits`, in order.
fn pick(combo: u64, bits: &[u64]) -> u64 {
    bits.iter()
        .enumerate()
        .filter(|(i, _)| bit(combo, *i as u32))
        .fold(0, |acc, (_, b)| acc | b)
}

/// The `access.c` generator for 4 KiB pages: every combination of leaf
/// {P, RW, US, NX, A, D} × PDE {P, RW, US, NX} × A on the upper levels ×
/// CR0.WP × EFER.NX × CR4.SMEP × CR4.SMAP × EFLAGS.AC × {read, write,
/// fetch} × {CPL0, CPL3}. PML4E and PDPTE are fully permissive.
#[test]
fn generator_4k_every_combination() {
    let ram = TestRam::new();
    let leaf_bits = [P, RW, US, NX, A, D];
    let pde_bits = [P, RW, US, NX];
    let mut tally = Tally::default();
    for leaf in 0..1u64 << leaf_bits.len() {
        for pde in 0..1u64 << pde_bits.len() {
            for upper_a in [false, true] {
                let a = if upper_a { A } else { 0 };
                let entries = [
                    (slot(PML4, 4), PDPT | P | RW | US | a),
                    (slot(PDPT, 3), PD | P | RW | US | a),
                    (slot(PD, 2), PT | pick(pde, &pde_bits) | a),
                    (slot(PT, 1), DATA | pick(leaf, &leaf_bits)),
                ];
                for flags in 0..1u32 << 5 {
                    let cpu = mode_cpu(flags);
                    tally.every_access(&ram, &cpu, &entries, || {
                        format!("leaf {leaf:#b} pde {pde:#b} upper_a {upper_a}")
                    });
                }
            }
        }
    }
    tally.assert_clean("4K generator", 64 * 16 * 2 * 32 * 3 * 2);
}

/// 2 MiB pages: PDE with PS and every combination of {P, RW, US, NX, A, D,
/// PAT} × one extra bit {none, 13, 20 (reserved), MAXPHYADDR-1 (an address
/// bit), MAXPHYADDR (reserved)} × CR0.WP × EFER.NX × CR4.SMEP × access ×
/// CPL. The PT page holds garbage the walker must not read.
#[test]
fn generator_2m_pages() {
    let ram = TestRam::new();
    for i in 0..512 {
        ram.set(PT + i * 8, P | RW | US | (0x7000 + i));
    }
    let pde_bits = [P, RW, US, NX, A, D, PAT_LARGE];
    let cpu0 = base_cpu();
    let extras = [
        0,
        1 << 13,
        1 << 20,
        1 << (cpu0.maxphyaddr - 1),
        1 << cpu0.maxphyaddr,
    ];
    let mut tally = Tally::default();
    for pde in 0..1u64 << pde_bits.len() {
        for extra in extras {
            let entries = [
                (slot(PML4, 4), PDPT | P | RW | US),
                (slot(PDPT, 3), PD | P | RW | US),
                (slot(PD, 2), 0x60_0000 | PS | pick(pde, &pde_bits) | extra),
            ];
            // CR0.WP × EFER.NX × CR4.SMEP.
            for flags in 0..1u32 << 3 {
                let cpu = mode_cpu(flags);
                tally.every_access(&ram, &cpu, &entries, || {
                    format!("pde {pde:#b} extra {extra:#x}")
                });
            }
        }
    }
    tally.assert_clean("2M generator", 128 * 5 * 8 * 6);

    // Spot-check the arithmetic the reference shares with the walker: the
    // 4 KiB sub-page, with PAT set, and D on the large leaf.
    ram.set(slot(PD, 2), 0x60_0000 | PS | P | RW | US | PAT_LARGE);
    let w = walk_addr(&ram, &base_cpu().paging_state(), GVA, Access::write(true)).unwrap();
    assert_eq!(w.level, 2);
    assert_eq!(w.gfn, 0x600 + 4);
    assert_eq!(w.gpa(), 0x60_4abc);
    assert_eq!(
        ram.get(slot(PD, 2)),
        0x60_0000 | PS | P | RW | US | PAT_LARGE | A | D
    );
}

/// 1 GiB pages: PDPTE with PS and every combination of {P, RW, US, NX, A,
/// D, PAT} × one extra bit {none, 13, 29 (reserved), 30 (address)} × 1 GiB
/// pages supported or not × CR0.WP × EFER.NX × access × CPL.
#[test]
fn generator_1g_pages() {
    let ram = TestRam::new();
    let pdpte_bits = [P, RW, US, NX, A, D, PAT_LARGE];
    let extras = [0, 1 << 13, 1 << 29, 1 << 30];
    let mut tally = Tally::default();
    for pdpte in 0..1u64 << pdpte_bits.len() {
        for extra in extras {
            let entries = [
                (slot(PML4, 4), PDPT | P | RW | US),
                (
                    slot(PDPT, 3),
                    0x4000_0000 | PS | pick(pdpte, &pdpte_bits) | extra,
                ),
            ];
            for flags in 0..1u32 << 3 {
                // Bit 0: 1 GiB pages; bits 1 and 2: CR0.WP × EFER.NX.
                let cpu = Cpu {
                    gbpages: flags & 1 != 0,
                    ..mode_cpu(flags >> 1)
                };
                tally.every_access(&ram, &cpu, &entries, || {
                    format!("pdpte {pdpte:#b} extra {extra:#x}")
                });
            }
        }
    }
    tally.assert_clean("1G generator", 128 * 4 * 8 * 6);

    ram.set(slot(PDPT, 3), 0x4000_0000 | PS | P | RW | US | PAT_LARGE);
    let w = walk_addr(&ram, &base_cpu().paging_state(), GVA, Access::read(false)).unwrap();
    assert_eq!((w.level, w.gfn), (3, 0x40000 + (3 << 9) + 4));
    assert!(w.leaf_in_ram);
}

/// Implicit supervisor accesses (CPL3 descriptor-table reads): SMAP applies
/// whatever EFLAGS.AC, and U/S is clear in the error code.
#[test]
fn generator_implicit_supervisor_accesses() {
    let ram = TestRam::new();
    let mut tally = Tally::default();
    for leaf in 0..1u64 << 4 {
        let leaf = pick(leaf, &[P, RW, US, NX]);
        for flags in 0..1u32 << 4 {
            let cpu = Cpu {
                wp: flags & 1 != 0,
                smap: flags & 2 != 0,
                ac: flags & 4 != 0,
                nxe: flags & 8 != 0,
                ..base_cpu()
            };
            for kind in [Kind::Read, Kind::Write] {
                setup_4k(&ram, leaf | DATA);
                let acc = RefAccess {
                    kind,
                    cpl3: true,
                    implicit: true,
                };
                tally.record(check(&ram, &cpu, GVA, acc), || format!("leaf {leaf:#x}"));
            }
        }
    }
    tally.assert_clean("implicit generator", 16 * 16 * 2);

    setup_4k(&ram, DATA | P | RW | US);
    let cpu = Cpu {
        smap: true,
        ac: true,
        ..base_cpu()
    };
    let acc = Access {
        implicit: true,
        eflags_ac: true,
        ..Access::read(false)
    };
    let err = GuestMmu::new(cpu.paging_state())
        .walk_addr(&ram, GVA, acc)
        .unwrap_err();
    let WalkError::PageFault(f) = err else {
        panic!("{err}")
    };
    assert_eq!(f.error_code, PfErrorCode::PRESENT);
    assert_eq!(f.kind, FaultKind::Protection);
}

/// Fills the generator layout with permissive upper levels and `leaf` as
/// the PTE.
fn setup_4k(ram: &TestRam, leaf: u64) {
    ram.set(slot(PML4, 4), PDPT | P | RW | US);
    ram.set(slot(PDPT, 3), PD | P | RW | US);
    ram.set(slot(PD, 2), PT | P | RW | US);
    ram.set(slot(PT, 1), leaf);
}

fn page_fault(r: Result<GuestWalk, WalkError>) -> PageFault {
    match r {
        Err(WalkError::PageFault(f)) => f,
        other => panic!("expected a page fault, got {other:?}"),
    }
}

/// The page fault a walk of `gva` must end in.
fn walk_fault<M: GuestPtMemory + ?Sized>(
    mem: &M,
    state: &PagingState,
    gva: u64,
    access: Access,
) -> PageFault {
    page_fault(walk_addr(mem, state, gva, access))
}

/// Bits 51:MAXPHYADDR are reserved at every level; the bit just below
/// MAXPHYADDR is an ordinary address bit.
#[test]
fn reserved_bits_above_maxphyaddr_at_every_level() {
    let slots = [slot(PML4, 4), slot(PDPT, 3), slot(PD, 2), slot(PT, 1)];
    for maxphyaddr in [36u32, 39, 40, 46, 48, 51, 52] {
        let cpu = Cpu {
            maxphyaddr,
            ..base_cpu()
        };
        for (i, &entry) in slots.iter().enumerate() {
            let level = 4 - i as u8;
            for b in [maxphyaddr - 1, maxphyaddr, 45, 51] {
                let ram = TestRam::new();
                setup_4k(&ram, DATA | P | RW | US);
                ram.set(entry, ram.get(entry) | 1 << b);
                check_every_kind(&ram, &cpu, GVA, true);
                if (maxphyaddr..=51).contains(&b) {
                    ram.reset_log();
                    let f = walk_fault(&ram, &cpu.paging_state(), GVA, Access::write(true));
                    assert_eq!(
                        f.kind,
                        FaultKind::ReservedBits,
                        "maxphyaddr {maxphyaddr} bit {b}"
                    );
                    assert_eq!(f.level, level);
                    assert_eq!(
                        f.error_code,
                        PfErrorCode::PRESENT
                            | PfErrorCode::RSVD
                            | PfErrorCode::WRITE
                            | PfErrorCode::USER
                    );
                    assert!(ram.written.borrow().is_empty());
                }
            }
        }
    }
}

/// PS in a PML4E is reserved (there are no 512 GiB pages); bit 8 of a PML4E
/// is reserved on AMD only; bit 8 is G, legal, in a leaf.
#[test]
fn pml4_ps_and_amd_bit8_are_reserved() {
    for amd in [false, true] {
        let cpu = Cpu { amd, ..base_cpu() };
        let ram = TestRam::new();
        setup_4k(&ram, DATA | P | RW | US | G);
        ram.set(slot(PML4, 4), PDPT | P | RW | US | PS);
        let f = walk_fault(&ram, &cpu.paging_state(), GVA, Access::read(false));
        assert_eq!((f.kind, f.level), (FaultKind::ReservedBits, 4));
        assert_eq!(f.error_code, PfErrorCode::PRESENT | PfErrorCode::RSVD);

        ram.set(slot(PML4, 4), PDPT | P | RW | US | G);
        let r = walk_addr(&ram, &cpu.paging_state(), GVA, Access::fetch(true));
        if amd {
            let f = page_fault(r);
            assert_eq!((f.kind, f.level), (FaultKind::ReservedBits, 4));
            assert_eq!(
                f.error_code,
                PfErrorCode::PRESENT | PfErrorCode::RSVD | PfErrorCode::USER | PfErrorCode::FETCH
            );
        } else {
            assert_eq!(r.unwrap().gpa(), DATA | 0xabc);
        }
        check_every_kind(&ram, &cpu, GVA, false);
    }
}

/// A table pointer (CR3 or a non-leaf entry) outside guest RAM: a
/// not-present #PF naming the unreadable entry, nothing written.
#[test]
fn table_pointer_outside_ram_is_a_not_present_fault() {
    let outside = RAM_END + 0x5000;
    let cases: [(Option<u64>, u8); 4] = [
        (None, 4),
        (Some(slot(PML4, 4)), 3),
        (Some(slot(PDPT, 3)), 2),
        (Some(slot(PD, 2)), 1),
    ];
    for (entry, faulting_level) in cases {
        let ram = TestRam::new();
        setup_4k(&ram, DATA | P | RW | US);
        let mut cpu = base_cpu();
        match entry {
            None => cpu.cr3 = outside,
            Some(e) => ram.set(e, outside | P | RW | US),
        }
        let f = walk_fault(&ram, &cpu.paging_state(), GVA, Access::write(true));
        let level_shift = 12 + 9 * (u32::from(faulting_level) - 1);
        let gpa = outside + ((GVA >> level_shift) & 511) * 8;
        assert_eq!(f.kind, FaultKind::TableNotRam { gpa });
        assert_eq!(f.level, faulting_level);
        assert_eq!(f.error_code, PfErrorCode::WRITE | PfErrorCode::USER);
        assert_eq!(f.address, GVA);
        assert!(ram.written.borrow().is_empty(), "A/D set on a failed walk");
        check_every_kind(&ram, &cpu, GVA, true);
    }
}

/// A leaf outside guest RAM still translates (the shadow MMU turns it into
/// MMIO) and gets its A/D bits, as KVM's walker does; it is marked.
#[test]
fn leaf_outside_ram_translates_and_is_marked() {
    let ram = TestRam::new();
    let far = 0x8_0000_0000u64;
    setup_4k(&ram, far | P | RW | US);
    let w = walk_addr(&ram, &base_cpu().paging_state(), GVA, Access::write(true)).unwrap();
    assert!(!w.leaf_in_ram);
    assert_eq!(w.gpa(), far | 0xabc);
    assert_eq!(ram.get(slot(PT, 1)), far | P | RW | US | A | D);
    assert!(w.is_dirty());
    assert_eq!(w.ad_written, 0b1111);
    // No write is ever allowed to turn an MMIO leaf into a CR0.WP=0 mapping.
    let ro = TestRam::new();
    setup_4k(&ro, far | P | US | D | A);
    let state = PagingState {
        cr0_wp: false,
        ..base_cpu().paging_state()
    };
    let w = walk_addr(&ro, &state, GVA, Access::write(false)).unwrap();
    assert!(!w.shadow_pte_access(&state).contains(PteAccess::WRITE));
}

/// Self-referencing tables (a recursive PML4 slot, and a two-table cycle)
/// terminate after four levels; the A/D updates of aliased entries converge.
#[test]
fn self_referencing_tables_terminate() {
    let idx = 0x1ffu64;
    let gva = (idx << 39) | (idx << 30) | (idx << 21) | (idx << 12) | 0x10;
    for kind in ACCESSES {
        let ram = TestRam::new();
        ram.set(PML4 + idx * 8, PML4 | P | RW | US);
        let cpu = base_cpu();
        check(&ram, &cpu, gva, RefAccess::explicit(kind, true)).unwrap();
        let w = walk_addr(&ram, &cpu.paging_state(), gva, Access::read(true)).unwrap();
        assert_eq!((w.level, w.gpa()), (1, PML4 | 0x10));
        assert!(w.pte_gpa.iter().all(|&g| g == PML4 + idx * 8));
    }
    // The write case needs a restart: the walker's copies of the aliased
    // entry go stale once the first A bit lands.
    let ram = TestRam::new();
    ram.set(PML4 + idx * 8, PML4 | P | RW | US);
    let w = walk_addr(&ram, &base_cpu().paging_state(), gva, Access::write(false)).unwrap();
    assert!(w.retries >= 1 && w.retries <= 2, "retries {}", w.retries);
    assert_eq!(ram.get(PML4 + idx * 8), PML4 | P | RW | US | A | D);

    // A PS bit on the recursive entry is reserved at the PML4.
    ram.set(PML4 + idx * 8, PML4 | P | RW | US | PS);
    let f = walk_fault(&ram, &base_cpu().paging_state(), gva, Access::read(true));
    assert_eq!((f.kind, f.level), (FaultKind::ReservedBits, 4));

    // PDPT and PD pointing at each other.
    let ram = TestRam::new();
    ram.set(slot(PML4, 4), PDPT | P | RW | US);
    ram.set(slot(PDPT, 3), PD | P | RW | US);
    ram.set(slot(PD, 2), PDPT | P | RW | US);
    ram.set(PDPT + 4 * 8, PD | P | RW | US);
    check_every_kind(&ram, &base_cpu(), GVA, false);
}

/// A vCPU changes the entry between the walker's read and its cmpxchg once:
/// the walker restarts and succeeds, keeping the other writer's change.
#[test]
fn ad_race_once_restarts_and_succeeds() {
    let (ram, r) = racy_walk(1, |e| e | AVL9, Access::write(true));
    let w = r.unwrap();
    assert_eq!(w.retries, 1);
    assert_eq!(w.gpa(), DATA | 0xabc);
    // The first cmpxchg was on the PML4E, which the other writer changed.
    assert_eq!(ram.get(slot(PML4, 4)), PDPT | P | RW | US | AVL9 | A);
    assert_eq!(ram.get(slot(PT, 1)), DATA | P | RW | US | A | D);
    assert_eq!(w.ptes[3], PDPT | P | RW | US | AVL9 | A);
}

/// A race that clears P: the restarted walk sees the entry gone and faults.
#[test]
fn ad_race_that_clears_present_faults_on_restart() {
    let (_, r) = racy_walk(1, |e| e & !P, Access::read(true));
    let f = page_fault(r);
    assert_eq!((f.kind, f.level), (FaultKind::NotPresent, 4));
    assert_eq!(f.error_code, PfErrorCode::USER);
}

/// A writer that changes the entry before every cmpxchg: the walker gives up
/// after a bounded number of walks instead of spinning.
#[test]
fn ad_race_forever_is_bounded() {
    let (ram, r) = racy_walk(u32::MAX, |e| e ^ AVL9, Access::write(false));
    let err = r.unwrap_err();
    assert_eq!(
        err,
        WalkError::AdRetriesExhausted {
            gva: GVA,
            attempts: MAX_AD_RETRIES + 1
        }
    );
    assert_eq!(ram.cmpxchg_calls.get(), MAX_AD_RETRIES + 1);
    assert!(!err.to_string().is_empty());
}

/// Guest RAM holding an entry vanishes before its A bit can be set: a
/// not-present fault, as KVM's `-EFAULT` from the cmpxchg.
#[test]
fn ad_update_on_vanished_memory_faults() {
    let ram = TestRam::new();
    setup_4k(&ram, DATA | P | RW | US);
    let f = walk_fault(
        &VanishingRam(&ram),
        &base_cpu().paging_state(),
        GVA,
        Access::fetch(true),
    );
    assert_eq!(f.kind, FaultKind::AdUpdateFailed { gpa: slot(PML4, 4) });
    assert_eq!(f.error_code, PfErrorCode::USER | PfErrorCode::FETCH);
}

/// No cmpxchg at all when A (and D for a write) are already set.
#[test]
fn no_writes_when_accessed_and_dirty_already_set() {
    let ram = TestRam::new();
    setup_4k(&ram, DATA | P | RW | US | A | D);
    for s in [slot(PML4, 4), slot(PDPT, 3), slot(PD, 2)] {
        ram.set(s, ram.get(s) | A);
    }
    ram.reset_log();
    let w = walk_addr(&ram, &base_cpu().paging_state(), GVA, Access::write(true)).unwrap();
    assert_eq!(
        (ram.cmpxchg_calls.get(), w.ad_written, w.retries),
        (0, 0, 0)
    );
    // A read needs A everywhere but not D.
    ram.set(slot(PT, 1), DATA | P | RW | US | A);
    walk_addr(&ram, &base_cpu().paging_state(), GVA, Access::read(true)).unwrap();
    assert_eq!(ram.cmpxchg_calls.get(), 0);
}

/// The walk records what the fault path needs: table gfns, entry gpas, and
/// the access accumulated above each level (the shadow pages' roles).
#[test]
fn walk_records_tables_and_accumulated_access() {
    let ram = TestRam::new();
    setup_4k(&ram, DATA | P | RW | US);
    ram.set(slot(PDPT, 3), PD | P | US | NX);
    let w = walk_addr(&ram, &base_cpu().paging_state(), GVA, Access::read(true)).unwrap();
    assert_eq!(w.table_gfn, [PT >> 12, PD >> 12, PDPT >> 12, PML4 >> 12]);
    assert_eq!(
        w.pte_gpa,
        [slot(PT, 1), slot(PD, 2), slot(PDPT, 3), slot(PML4, 4)]
    );
    assert_eq!(w.pt_access[3], PteAccess::ALL);
    assert_eq!(w.pt_access[2], PteAccess::ALL);
    assert_eq!(w.pt_access[1], PteAccess::USER);
    assert_eq!(w.pt_access[0], PteAccess::USER);
    assert_eq!(w.pte_access, PteAccess::USER);
    assert_eq!(w.leaf_pte_gpa(), slot(PT, 1));
    assert_eq!(w.leaf_pte(), DATA | P | RW | US | A);
}

/// `shadow_pte_access`: W withheld from a clean leaf on a read walk; the
/// CR0.WP=0 supervisor-write conversion to a supervisor-only, (under SMEP)
/// non-executable mapping.
#[test]
fn shadow_pte_access_mirrors_kvm() {
    let ram = TestRam::new();
    let state = base_cpu().paging_state();
    setup_4k(&ram, DATA | P | RW | US);
    let w = walk_addr(&ram, &state, GVA, Access::read(true)).unwrap();
    assert_eq!(
        w.shadow_pte_access(&state),
        PteAccess::USER | PteAccess::EXEC
    );
    let w = walk_addr(&ram, &state, GVA, Access::write(true)).unwrap();
    assert_eq!(w.shadow_pte_access(&state), PteAccess::ALL);
    let w = walk_addr(&ram, &state, GVA, Access::read(true)).unwrap();
    assert_eq!(w.shadow_pte_access(&state), PteAccess::ALL, "dirty now");

    setup_4k(&ram, DATA | P | US);
    for smep in [false, true] {
        let state = PagingState {
            cr0_wp: false,
            cr4_smep: smep,
            ..state
        };
        let w = walk_addr(&ram, &state, GVA, Access::write(false)).unwrap();
        let want = if smep {
            PteAccess::WRITE
        } else {
            PteAccess::WRITE | PteAccess::EXEC
        };
        assert_eq!(w.shadow_pte_access(&state), want);
    }
}

/// `Access::from_error_code` inverts `Access::pfec`, and a hardware error
/// code re-walks to the same fault.
#[test]
fn error_code_round_trip() {
    for kind in ACCESSES {
        for user in [false, true] {
            let acc = RefAccess::explicit(kind, user).to_access(false);
            assert_eq!(Access::from_error_code(acc.pfec()), acc);
        }
    }
    let ram = TestRam::new();
    setup_4k(&ram, DATA | P | US | NX);
    let state = base_cpu().paging_state();
    let f = walk_fault(&ram, &state, GVA, Access::fetch(true));
    let again = walk_fault(&ram, &state, GVA, Access::from_error_code(f.error_code));
    assert_eq!(f, again);
    assert_eq!(
        f.error_code,
        PfErrorCode::PRESENT | PfErrorCode::USER | PfErrorCode::FETCH
    );
}

/// xorshift64*, so the fuzz test is reproducible without dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random page tables: entries with random flag and reserved bits pointing
/// at each other, at themselves, and outside RAM, walked with random modes
/// and accesses. The walker must never panic or hang and must agree with
/// the reference on every walk.
#[test]
fn random_tables_agree_with_reference() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let tables = [PML4, PDPT, PD, PT, DATA, 0x6000];
    let mut tally = Tally::default();
    let rounds = 3000;
    let walks_per_round = 8;
    for round in 0..rounds {
        let ram = TestRam::new();
        // Dense enough that walks get deep: fill the slots a few gvas use.
        let gvas: Vec<u64> = (0..4)
            .map(|_| {
                let mut gva = 0;
                for level in (1..=4).rev() {
                    gva |= rng.below(4) << (12 + 9 * (level - 1));
                }
                gva | rng.below(4096)
            })
            .collect();
        for &t in &tables {
            for i in 0..4 {
                let target = match rng.below(10) {
                    0 => RAM_END + rng.below(8) * 0x1000,
                    1 => rng.below(1 << 20) << 12,
                    _ => tables[rng.below(tables.len() as u64) as usize],
                };
                let mut flags = rng.next() & (P | RW | US | A | D | PS | G | NX | PAT_LARGE);
                if rng.below(4) != 0 {
                    flags |= P;
                }
                if rng.below(3) != 0 {
                    flags &= !PS;
                }
                if rng.below(6) == 0 {
                    flags |= 1 << (13 + rng.below(39));
                }
                ram.set(t + i * 8, target | flags);
            }
        }
        for _ in 0..walks_per_round {
            let cpu = Cpu {
                cr3: if rng.below(50) == 0 { RAM_END } else { PML4 },
                wp: rng.below(2) == 0,
                nxe: rng.below(2) == 0,
                smep: rng.below(2) == 0,
                smap: rng.below(2) == 0,
                ac: rng.below(2) == 0,
                maxphyaddr: [36, 39, 46, 52][rng.below(4) as usize],
                gbpages: rng.below(3) != 0,
                amd: rng.below(4) == 0,
            };
            let cpl3 = rng.below(2) == 0;
            let acc = RefAccess {
                kind: ACCESSES[rng.below(3) as usize],
                cpl3,
                implicit: !cpl3 && rng.below(8) == 0,
            };
            let acc = RefAccess {
                cpl3: acc.cpl3 || acc.implicit,
                ..acc
            };
            let gva = gvas[rng.below(gvas.len() as u64) as usize];
            tally.record(check(&ram, &cpu, gva, acc), || format!("round {round}"));
        }
    }
    tally.assert_clean("random tables", rounds * walks_per_round);
}

/// The permission bitmap against the reference rules for every access-right
/// combination, error code and mode bit.
#[test]
fn permission_bitmap_matches_sdm_rules() {
    for flags in 0..1u32 << 5 {
        let cpu = mode_cpu(flags);
        let mmu = GuestMmu::new(cpu.paging_state());
        for rights in 0..8u8 {
            let pte_access = PteAccess::from_bits_truncate(rights);
            // The same rights as a one-level path for the reference: a 4K
            // leaf whose upper levels grant everything.
            let mut leaf = DATA | P | A | D;
            if pte_access.contains(PteAccess::WRITE) {
                leaf |= RW;
            }
            if pte_access.contains(PteAccess::USER) {
                leaf |= US;
            }
            if !pte_access.contains(PteAccess::EXEC) && cpu.nxe {
                leaf |= NX;
            }
            let ram = TestRam::new();
            setup_4k(&ram, leaf);
            for kind in ACCESSES {
                for (cpl3, implicit) in [(false, false), (true, false), (true, true)] {
                    let acc = RefAccess {
                        kind,
                        cpl3,
                        implicit,
                    };
                    let expected = reference(&ram, &cpu, GVA, acc);
                    let faults = mmu.permission_fault(pte_access, acc.to_access(cpu.ac));
                    assert_eq!(
                        faults,
                        matches!(expected.outcome, Outcome::Fault { .. }),
                        "{cpu:?} rights {rights:#b} {acc:?}"
                    );
                }
            }
        }
    }
}
