//! The `access` guest (guests/access.c, in the spirit of kvm-unit-tests'
//! x86/access.c): every combination of leaf PTE {P, W, U, NX, A, D} and PDE
//! {P, W, U, NX} bits, read/write/fetch from ring 1 and ring 3, in the four
//! paging modes CR0.WP x EFER.NX, and from ring 1 in five modes with
//! CR4.SMEP and CR4.SMAP (EFLAGS.AC clear and set; CR0.WP=0, KVM's
//! `smep_andnot_wp`; EFER.NX=0), all switched with the SET_PAGING
//! hypercall, one output line each with the fault, the #PF error code and
//! the leaf's A/D bits.
//!
//! In kvm mode the output is spot-checked against the SDM by hand (the guest
//! checks every line against its own model of the rules, too); shadow mode
//! must print exactly the same bytes (docs/design.md rule 6).

mod common;

use std::collections::HashMap;

use common::{Run, require_kvm, shadowvm_in};

/// Leaf combinations x PDE combinations x accesses, per ring and mode.
const COMBINATIONS_PER_RING: usize = 64 * 16 * 3;
/// The paging modes the guest covers, in its order; the first
/// `BOTH_RINGS` from rings 1 and 3, the others (SMEP) from ring 1 only.
const MODES: [&str; 9] = [
    "cr0.wp=1 efer.nx=1",
    "cr0.wp=0 efer.nx=1",
    "cr0.wp=1 efer.nx=0",
    "cr0.wp=0 efer.nx=0",
    "cr0.wp=1 efer.nx=1 cr4.smep=1 cr4.smap=1 eflags.ac=0",
    "cr0.wp=1 efer.nx=1 cr4.smep=1 cr4.smap=1 eflags.ac=1",
    "cr0.wp=0 efer.nx=1 cr4.smep=1 cr4.smap=1 eflags.ac=1",
    "cr0.wp=0 efer.nx=1 cr4.smep=1 cr4.smap=0",
    "cr0.wp=1 efer.nx=0 cr4.smep=1 cr4.smap=0",
];
const BOTH_RINGS: usize = 4;

fn run_access(paging: &str) -> Run {
    run_access_with(paging, &[])
}

fn run_access_with(paging: &str, options: &[&str]) -> Run {
    let mut o = vec!["--timeout", "120s"];
    o.extend_from_slice(options);
    shadowvm_in(paging, &["run", "access"], &o)
}

/// The run without its table lines (which `Run::check` would print):
/// exit status, the other lines, the first lines the guest flagged, stderr.
fn brief(r: &Run) -> String {
    let other: Vec<&str> = r.stdout.lines().filter(|l| !l.starts_with("L=")).collect();
    let flagged: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.contains("MISMATCH") || l.contains("escaped"))
        .take(20)
        .collect();
    format!(
        "exit: {:?}\n--- stdout (table lines left out)\n{}\n--- first flagged lines\n{}\n--- stderr\n{}",
        r.code,
        other.join("\n"),
        flagged.join("\n"),
        r.stderr
    )
}

/// Panics with `what` and a brief account of the run unless `cond`.
fn check(r: &Run, cond: bool, what: &str) {
    assert!(cond, "{what}\n{}", brief(r));
}

/// One output line: `L=P.W.U.N.A.D U=P.W.U.N r/s: ok ad=A-` or
/// `... fault ec=0x15 ad=--`, under the last `mode ...` line. The key is
/// (mode, leaf bits, PDE bits, access and ring), the value what follows the
/// colon.
fn table(r: &Run) -> HashMap<(String, String, String, String), String> {
    let mut t = HashMap::new();
    let mut mode = String::new();
    for line in r.stdout.lines() {
        if let Some(m) = line.strip_prefix("mode ") {
            mode = m.to_string();
            continue;
        }
        if !line.starts_with("L=") {
            continue;
        }
        let (key, result) = line
            .split_once(": ")
            .unwrap_or_else(|| panic!("malformed line {line:?}"));
        let mut f = key.split(' ');
        let (leaf, pde, access) = (f.next(), f.next(), f.next());
        let (Some(leaf), Some(pde), Some(access), None) = (leaf, pde, access, f.next()) else {
            panic!("malformed line {line:?}");
        };
        let old = t.insert(
            (
                mode.clone(),
                leaf.to_string(),
                pde.to_string(),
                access.to_string(),
            ),
            result.to_string(),
        );
        check(r, old.is_none(), &format!("{line:?} printed once"));
    }
    t
}

/// The line-by-line differences between `a` and `b`, diff style.
fn differing_lines(a: &str, b: &str) -> Vec<String> {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out = Vec::new();
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (a.get(i), b.get(i));
        if x != y {
            out.push(format!("@@ line {} @@", i + 1));
            if let Some(x) = x {
                out.push(format!("-{x}"));
            }
            if let Some(y) = y {
                out.push(format!("+{y}"));
            }
        }
    }
    out
}

#[test]
fn access_matches_the_sdm_in_kvm_mode() {
    if !require_kvm() {
        return;
    }
    let r = run_access("kvm");
    check(&r, r.code == Some(0), "access exits 0");
    check(
        &r,
        r.stdout
            .contains(&format!("access: modes covered: [{}]\n", MODES.join("] ["))),
        "the header names the modes covered",
    );
    // Successes need P in both entries, then per 64 W/U/NX combinations of
    // the two: r/s all 64, w/s W 16 (CR0.WP=0: 64), f/s no NX 16, r/u U 16,
    // w/u U and W 4, f/u U and no NX 4: 120 (WP=0: 168), times 4 for the
    // leaf's A and D: 480 and 672. With EFER.NX=0 an NX bit in either entry
    // is a reserved-bit fault, leaving the 16 NX-free combinations: r/s 16,
    // w/s 4 (WP=0: 16), f/s 16, r/u 4, w/u 1, f/u 4: 45 (57), times 4: 180
    // and 228. 480 + 672 + 180 + 228 = 1560 of 4 x 6144.
    // Ring 1 under SMEP and SMAP: a user page (U in both entries, 16 of the
    // 64) cannot be fetched, nor read or written unless EFLAGS.AC is set.
    // AC=0: r/s 48, w/s 12, f/s 12: 72; AC=1: r/s 64, w/s 16, f/s 12: 92;
    // CR0.WP=0 and AC=1, or WP=0 without SMAP: 64 + 64 + 12 = 140 each;
    // EFER.NX=0 with SMEP: r/s 16, w/s 4, f/s 12: 32. Times 4: 288 + 368 +
    // 560 + 560 + 128 = 1904 of 5 x 3072.
    let total =
        BOTH_RINGS * 2 * COMBINATIONS_PER_RING + (MODES.len() - BOTH_RINGS) * COMBINATIONS_PER_RING;
    let ok = 1560 + 1904;
    check(
        &r,
        r.stdout.contains(&format!(
            "\naccess: {total} combinations in 9 of 9 modes: {} faults, {ok} ok, \
             0 escaped, 0 differ from the SDM\n",
            total - ok
        )),
        "summary: every combination ran, agrees with the guest's model, 3464 succeeded",
    );
    check(&r, !r.stdout.contains("MISMATCH"), "no line disagrees");
    let t = table(&r);
    check(&r, t.len() == total, "one line per combination and mode");
    for mode in MODES {
        check(
            &r,
            r.stdout.contains(&format!("\nmode {mode}\n")),
            &format!("mode {mode} ran"),
        );
    }

    // Hand-derived from the SDM (vol. 3, 4.6 access rights, 4.7 the #PF
    // error code: P=0x1 W=0x2 U=0x4 RSVD=0x8 I=0x10, 4.8 A/D), CR0.WP=1, EFER.NX=1,
    // no SMEP/SMAP. Access `r|w|f` from `s` (ring 1) or `u` (ring 3).
    let spot = [
        // Leaf not present: P=0, W/U/I from the access; A/D untouched.
        ("-.W.U.-.A.D", "P.W.U.-", "r/s", "fault ec=0x0 ad=AD"),
        ("-.W.U.-.A.D", "P.W.U.-", "w/s", "fault ec=0x2 ad=AD"),
        ("-.W.U.-.A.D", "P.W.U.-", "r/u", "fault ec=0x4 ad=AD"),
        ("-.W.U.-.A.D", "P.W.U.-", "w/u", "fault ec=0x6 ad=AD"),
        ("-.W.U.-.-.-", "P.W.U.-", "f/s", "fault ec=0x10 ad=--"),
        ("-.W.U.-.-.-", "P.W.U.-", "f/u", "fault ec=0x14 ad=--"),
        // PDE not present: the same, whatever the leaf says.
        ("P.W.U.-.-.-", "-.W.U.-", "r/u", "fault ec=0x4 ad=--"),
        ("P.W.U.-.-.-", "-.W.U.-", "w/s", "fault ec=0x2 ad=--"),
        // User read of a supervisor page (leaf or PDE U=0): P|U.
        ("P.W.-.-.-.-", "P.W.U.-", "r/u", "fault ec=0x5 ad=--"),
        ("P.W.U.-.-.-", "P.W.-.-", "r/u", "fault ec=0x5 ad=--"),
        ("P.W.-.-.-.-", "P.W.U.-", "f/u", "fault ec=0x15 ad=--"),
        // User write of a read-only page (leaf or PDE W=0): P|W|U.
        ("P.-.U.-.-.-", "P.W.U.-", "w/u", "fault ec=0x7 ad=--"),
        ("P.W.U.-.-.-", "P.-.U.-", "w/u", "fault ec=0x7 ad=--"),
        // ... the fault leaves a set A alone and does not set D.
        ("P.-.U.-.A.-", "P.W.U.-", "w/u", "fault ec=0x7 ad=A-"),
        // Supervisor write of a read-only page: CR0.WP=1 forbids it.
        ("P.-.U.-.-.-", "P.W.U.-", "w/s", "fault ec=0x3 ad=--"),
        // Fetch of an NX page (leaf or PDE NX): P|I, plus U from ring 3.
        ("P.W.U.N.-.-", "P.W.U.-", "f/s", "fault ec=0x11 ad=--"),
        ("P.W.U.N.-.-", "P.W.U.-", "f/u", "fault ec=0x15 ad=--"),
        ("P.W.U.-.-.-", "P.W.U.N", "f/u", "fault ec=0x15 ad=--"),
        // ... while reads and writes of it are fine.
        ("P.W.U.N.-.-", "P.W.U.-", "r/u", "ok ad=A-"),
        // A success sets A, and D for a write, in both rings.
        ("P.W.U.-.-.-", "P.W.U.-", "r/s", "ok ad=A-"),
        ("P.W.U.-.-.-", "P.W.U.-", "r/u", "ok ad=A-"),
        ("P.W.U.-.-.-", "P.W.U.-", "f/u", "ok ad=A-"),
        ("P.W.U.-.-.-", "P.W.U.-", "w/s", "ok ad=AD"),
        ("P.W.U.-.-.-", "P.W.U.-", "w/u", "ok ad=AD"),
        ("P.W.U.-.A.D", "P.W.U.-", "r/u", "ok ad=AD"),
        // Ring 1 may read, write and run a supervisor page, and (no SMAP,
        // no SMEP) a user page.
        ("P.W.-.-.-.-", "P.W.-.-", "w/s", "ok ad=AD"),
        ("P.W.-.-.-.-", "P.W.-.-", "f/s", "ok ad=A-"),
        ("P.W.U.-.-.-", "P.W.U.-", "f/s", "ok ad=A-"),
    ];
    let spot = spot.iter().map(|&(l, d, a, w)| (MODES[0], l, d, a, w));

    // CR0.WP=0: ring 1 may write a read-only page, user or supervisor, and
    // the write sets D; ring 3 still may not.
    let wp0 = [
        ("P.-.U.-.-.-", "P.W.U.-", "w/s", "ok ad=AD"),
        ("P.-.-.-.-.-", "P.-.-.-", "w/s", "ok ad=AD"),
        ("P.W.U.-.A.-", "P.-.U.-", "w/s", "ok ad=AD"),
        ("P.-.U.-.-.-", "P.W.U.-", "w/u", "fault ec=0x7 ad=--"),
        ("P.-.U.N.-.-", "P.W.U.-", "f/s", "fault ec=0x11 ad=--"),
    ];
    let wp0 = wp0.iter().map(|&(l, d, a, w)| (MODES[1], l, d, a, w));
    // EFER.NX=0: bit 63 in a present leaf or PDE is reserved: P|RSVD (0x9)
    // plus W and U from the access, and no I for a fetch (I/D is reported
    // only with NX or SMEP on); A/D untouched. Not-present entries fault
    // before their reserved bits count. Without the bit, fetches are fine.
    let nx0 = [
        ("P.W.U.N.-.-", "P.W.U.-", "r/s", "fault ec=0x9 ad=--"),
        ("P.W.U.N.-.-", "P.W.U.-", "w/s", "fault ec=0xb ad=--"),
        ("P.W.U.N.-.-", "P.W.U.-", "f/s", "fault ec=0x9 ad=--"),
        ("P.W.U.N.-.-", "P.W.U.-", "r/u", "fault ec=0xd ad=--"),
        ("P.W.U.N.A.D", "P.W.U.-", "w/u", "fault ec=0xf ad=AD"),
        ("P.W.U.N.-.-", "P.W.U.-", "f/u", "fault ec=0xd ad=--"),
        ("P.W.U.-.-.-", "P.W.U.N", "r/u", "fault ec=0xd ad=--"),
        ("-.W.U.N.-.-", "P.W.U.-", "r/s", "fault ec=0x0 ad=--"),
        ("-.W.U.-.-.-", "P.W.U.-", "f/u", "fault ec=0x4 ad=--"),
        ("P.W.-.-.-.-", "P.W.U.-", "f/u", "fault ec=0x5 ad=--"),
        ("P.W.U.-.-.-", "P.W.U.-", "f/u", "ok ad=A-"),
        ("P.-.U.-.-.-", "P.W.U.-", "w/s", "fault ec=0x3 ad=--"),
    ];
    let nx0 = nx0.iter().map(|&(l, d, a, w)| (MODES[2], l, d, a, w));
    // Both off.
    let both = [
        ("P.-.U.-.-.-", "P.W.U.-", "w/s", "ok ad=AD"),
        ("P.-.U.N.-.-", "P.W.U.-", "w/s", "fault ec=0xb ad=--"),
        ("P.W.U.-.-.-", "P.W.U.N", "f/s", "fault ec=0x9 ad=--"),
    ];
    let both = both.iter().map(|&(l, d, a, w)| (MODES[3], l, d, a, w));
    // SMEP: ring 1 may not run a user page (P|I); SMAP: nor read or write
    // one (P, P|W) unless EFLAGS.AC is set; supervisor pages are fine.
    let smap = [
        ("P.W.U.-.-.-", "P.W.U.-", "f/s", "fault ec=0x11 ad=--"),
        ("P.W.U.-.-.-", "P.W.U.-", "r/s", "fault ec=0x1 ad=--"),
        ("P.W.U.-.-.-", "P.W.U.-", "w/s", "fault ec=0x3 ad=--"),
        ("P.W.-.-.-.-", "P.W.U.-", "f/s", "ok ad=A-"),
        ("P.W.U.-.-.-", "P.W.-.-", "r/s", "ok ad=A-"),
        ("-.W.U.-.-.-", "P.W.U.-", "r/s", "fault ec=0x0 ad=--"),
    ];
    let smap = smap.iter().map(|&(l, d, a, w)| (MODES[4], l, d, a, w));
    let ac = [
        ("P.W.U.-.-.-", "P.W.U.-", "r/s", "ok ad=A-"),
        ("P.W.U.-.-.-", "P.W.U.-", "w/s", "ok ad=AD"),
        ("P.W.U.-.-.-", "P.W.U.-", "f/s", "fault ec=0x11 ad=--"),
        ("P.-.U.-.-.-", "P.W.U.-", "w/s", "fault ec=0x3 ad=--"),
    ];
    let ac = ac.iter().map(|&(l, d, a, w)| (MODES[5], l, d, a, w));
    // CR0.WP=0 with SMEP: the write to a read-only user page succeeds (the
    // shadow entry becomes supervisor-only and non-executable).
    let wp0_smep = [
        ("P.-.U.-.-.-", "P.W.U.-", "w/s", "ok ad=AD"),
        ("P.-.U.-.-.-", "P.W.U.-", "f/s", "fault ec=0x11 ad=--"),
    ];
    let wp0_smep = wp0_smep
        .iter()
        .flat_map(|&(l, d, a, w)| [(MODES[6], l, d, a, w), (MODES[7], l, d, a, w)]);
    // SMEP without EFER.NX: a fetch fault reports I anyway.
    let nx0_smep = [
        ("P.W.U.-.-.-", "P.W.U.-", "f/s", "fault ec=0x11 ad=--"),
        ("P.W.U.N.-.-", "P.W.U.-", "f/s", "fault ec=0x19 ad=--"),
        ("P.W.-.-.-.-", "P.W.U.-", "f/s", "ok ad=A-"),
    ];
    let nx0_smep = nx0_smep.iter().map(|&(l, d, a, w)| (MODES[8], l, d, a, w));

    for (mode, leaf, pde, access, want) in spot
        .chain(wp0)
        .chain(nx0)
        .chain(both)
        .chain(smap)
        .chain(ac)
        .chain(wp0_smep)
        .chain(nx0_smep)
    {
        let key = (
            mode.to_string(),
            format!("L={leaf}"),
            format!("U={pde}"),
            access.to_string(),
        );
        let got = t.get(&key).map(String::as_str);
        check(
            &r,
            got == Some(want),
            &format!("[{mode}] L={leaf} U={pde} {access}: got {got:?}, want {want:?}"),
        );
    }
}

#[test]
fn access_shadow_output_equals_kvm() {
    if !require_kvm() {
        return;
    }
    let shadow = run_access("shadow");
    check(
        &shadow,
        shadow.code == Some(0),
        "access exits 0 in shadow mode",
    );
    let kvm = run_access("kvm");
    check(&kvm, kvm.code == Some(0), "access exits 0 in kvm mode");
    let diff = differing_lines(&kvm.stdout, &shadow.stdout);
    check(
        &shadow,
        diff.is_empty(),
        &format!(
            "shadow mode prints what kvm mode prints (-kvm +shadow, {} differences):\n{}",
            diff.len() / 3,
            diff.iter().take(60).cloned().collect::<Vec<_>>().join("\n")
        ),
    );
    check(
        &shadow,
        shadow.code == kvm.code,
        "same exit status as kvm mode",
    );
}

/// The same matrix over large host folios (THP and multi-size THP), with a
/// wide prefetch and with none: neither may change what the guest sees.
#[test]
fn access_is_the_same_over_large_folios_and_prefetch() {
    if !require_kvm() {
        return;
    }
    let kvm = run_access_with("kvm", &["--host-thp", "always"]);
    check(&kvm, kvm.code == Some(0), "access exits 0 in kvm mode");
    for options in [
        &[
            "--host-thp",
            "always",
            "--host-mthp",
            "16K,64K",
            "--prefetch",
            "16",
        ][..],
        &["--host-thp", "always", "--prefetch", "0"][..],
    ] {
        let shadow = run_access_with("shadow", options);
        let diff = differing_lines(&kvm.stdout, &shadow.stdout);
        check(
            &shadow,
            shadow.code == Some(0) && diff.is_empty(),
            &format!(
                "with {options:?}, shadow mode prints what kvm mode prints ({} differences):\n{}",
                diff.len() / 3,
                diff.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
            ),
        );
    }
}

#[test]
fn differing_lines_lists_changed_and_missing_lines() {
    assert!(differing_lines("a\nb\n", "a\nb\n").is_empty());
    assert_eq!(
        differing_lines("a\nb\nc\n", "a\nB\n"),
        ["@@ line 2 @@", "-b", "+B", "@@ line 3 @@", "-c"]
    );
}
