//! Issue 14: `--trace`, `--timeline` and the progress bar.
//!
//! The trace must open in the Perfetto UI (a JSON array of trace events;
//! on every track each begin has its end, in order, and timestamps never
//! go back), have the tracks and slices the docs promise, and agree with
//! the run's own counters. The timeline must be well-formed SVG that
//! shows the page states the run's counters say occurred. A path that
//! cannot be written is a one-line error before any guest starts. The
//! progress bar shows on a terminal, and never in `--json` output or a
//! pipe.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read as _;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::Run;
use serde_json::Value;
use shadowvm::scenario::observe::timeline::PageState;

/// A fresh path in this test process's temporary directory.
fn out_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shadowvm-observe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// wss under kswapd, on less machine memory than it touches.
const WSS_RECLAIM: &[&str] = &[
    "run",
    "wss",
    "--mem",
    "16M",
    "--machine-mem",
    "4M",
    "--reclaim",
    "--reclaim-interval-ms",
    "20",
];

/// ksmd scanning fast enough to merge within a short run.
const FAST_KSM: &[&str] = &[
    "--ksm",
    "--ksm-pages-to-scan",
    "1000",
    "--ksm-sleep-ms",
    "1",
];

/// Runs `shadowvm` with `args` and `flag PATH` (before any `--`), PATH a
/// fresh file called `file`; checks it exits 0. `None` (skipped) without
/// KVM or without the built-in `guest`.
fn run_writing(guest: &str, flag: &str, file: &str, args: &[&str]) -> Option<(Run, PathBuf)> {
    if !common::require_kvm() || shadowvm::vmm::guests::find(guest).is_none() {
        return None;
    }
    let path = out_path(file);
    let mut a: Vec<&str> = args.to_vec();
    let at = a.iter().position(|s| *s == "--").unwrap_or(a.len());
    a.splice(at..at, [flag, path.to_str().expect("a UTF-8 path")]);
    let run = common::shadowvm(&a);
    run.check(run.code == Some(0), &format!("shadowvm {args:?} exits 0"));
    Some((run, path))
}

/// [`run_writing`] of `parts` joined, which name `--json`; also returns the
/// `--json` object (stderr's last line).
fn run_writing_json(
    guest: &str,
    flag: &str,
    file: &str,
    parts: &[&[&str]],
) -> Option<(Run, PathBuf, Value)> {
    let (run, path) = run_writing(guest, flag, file, &parts.concat())?;
    let v = run.json_at_end();
    Some((run, path, v))
}

fn num(v: &Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |x, p| &x[*p]).as_u64().unwrap_or(0)
}

/// What a checked trace holds.
#[derive(Debug, Default)]
struct Trace {
    /// Thread (track) names.
    threads: BTreeSet<String>,
    /// Slices by name.
    slices: BTreeMap<String, u64>,
    /// Instants by name.
    instants: BTreeMap<String, u64>,
    /// Slices by name that began before the mm's teardown (`exit_mmap`):
    /// what the run's statistics, taken just before it, can count.
    before_exit: BTreeMap<String, u64>,
    /// The end events of slices named `resolve_pf`, by `outcome`.
    pf_outcomes: BTreeMap<String, u64>,
    /// Each slice's arguments at its end, the first of each name.
    args: BTreeMap<String, Value>,
}

/// Parses the trace at `path` and checks what a viewer needs: a JSON
/// array of events, each with a phase, a pid and a tid; per track,
/// timestamps that never go back and begins and ends that nest.
fn check_trace(run: &Run, path: &Path) -> Trace {
    let text = std::fs::read_to_string(path).expect("read the trace");
    let events: Vec<Value> = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            run.check(false, &format!("the trace is a JSON array: {e}"));
            unreachable!()
        }
    };
    let mut t = Trace::default();
    let mut tracks: HashMap<(u64, u64), (f64, Vec<String>)> = HashMap::new();
    let mut names: HashMap<u64, String> = HashMap::new();
    let exit_ts = events
        .iter()
        .filter(|e| e["ph"] == "B" && e["name"] == "exit_mmap")
        .filter_map(|e| e["ts"].as_f64())
        .fold(f64::INFINITY, f64::min);
    for e in &events {
        let ph = e["ph"].as_str().unwrap_or_default();
        let (pid, tid) = (e["pid"].as_u64(), e["tid"].as_u64());
        run.check(pid.is_some() && tid.is_some(), &format!("pid and tid: {e}"));
        let key = (pid.unwrap_or(0), tid.unwrap_or(0));
        let name = e["name"].as_str().unwrap_or_default().to_string();
        if ph == "M" {
            run.check(name == "thread_name", &format!("metadata: {e}"));
            let thread = e["args"]["name"].as_str().unwrap_or_default().to_string();
            names.insert(key.1, thread.clone());
            t.threads.insert(thread);
            continue;
        }
        let ts = e["ts"].as_f64();
        run.check(ts.is_some(), &format!("a timestamp: {e}"));
        let ts = ts.unwrap_or(0.0);
        let (last, stack) = tracks.entry(key).or_insert((f64::MIN, Vec::new()));
        run.check(
            ts >= *last,
            &format!("timestamps go forward on track {key:?}: {e}"),
        );
        *last = ts;
        match ph {
            "B" => {
                stack.push(name.clone());
                *t.slices.entry(name.clone()).or_default() += 1;
                if ts < exit_ts {
                    *t.before_exit.entry(name).or_default() += 1;
                }
            }
            "E" => {
                let open = stack.pop();
                run.check(
                    open.as_deref() == Some(name.as_str()),
                    &format!("{name} ends the slice it began on track {key:?} ({open:?})"),
                );
                if name == "resolve_pf" {
                    let outcome = e["args"]["outcome"].as_str().unwrap_or("none");
                    *t.pf_outcomes.entry(outcome.to_string()).or_default() += 1;
                }
                t.args.entry(name).or_insert_with(|| e["args"].clone());
            }
            "i" => *t.instants.entry(name).or_default() += 1,
            other => run.check(false, &format!("an unexpected phase {other:?}: {e}")),
        }
    }
    for (key, (_, stack)) in &tracks {
        run.check(
            stack.is_empty(),
            &format!(
                "every slice on {:?} ({key:?}) ends: {stack:?} left open",
                names.get(&key.1)
            ),
        );
    }
    t
}

fn slices(t: &Trace, name: &str) -> u64 {
    t.slices.get(name).copied().unwrap_or(0)
}

fn slices_with_prefix(t: &Trace, prefix: &str) -> u64 {
    t.slices
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

/// The trace has a track for each of `threads`.
fn has_tracks(run: &Run, t: &Trace, threads: &[&str]) {
    for thread in threads {
        run.check(
            t.threads.contains(*thread),
            &format!("a {thread} track: {:?}", t.threads),
        );
    }
}

/// The trace has slices of each of `names`.
fn has_slices(run: &Run, t: &Trace, names: &[&str]) {
    for name in names {
        run.check(
            slices(t, name) > 0,
            &format!("{name} slices: {:?}", t.slices),
        );
    }
}

#[test]
fn a_trace_opens_in_the_viewer_and_matches_the_counters() {
    let args = [
        WSS_RECLAIM,
        FAST_KSM,
        &["--json", "--", "cold=1024", "hot=16", "duration_ms=200"],
    ];
    let Some((run, path, v)) = run_writing_json("wss", "--trace", "wss.json", &args) else {
        return;
    };
    let t = check_trace(&run, &path);
    has_tracks(&run, &t, &["vcpu0", "ksmd", "kswapd", "main"]);
    has_slices(
        &run,
        &t,
        &[
            "KVM_RUN",
            "exit io",
            "hypercall resolve_pf",
            "resolve_pf",
            "ksm_scan",
            "age_range",
            "reclaim",
            "clear_young",
            "invalidate_range_start",
            "invalidate_range_end",
            "shootdown",
            "exit_mmap",
            "release",
        ],
    );
    for name in ["swap_out", "swap_in", "spte_zapped"] {
        run.check(
            t.instants.get(name).is_some_and(|n| *n > 0),
            &format!("{name} events: {:?}", t.instants),
        );
    }
    let irs = &t.args["invalidate_range_start"];
    for arg in ["start", "end", "event", "blockable"] {
        run.check(
            irs.get(arg).is_some(),
            &format!("invalidate_range_start has {arg}: {irs}"),
        );
    }
    let sd = &t.args["shootdown"];
    run.check(
        sd["method"] == "protect_toggle" && sd.get("frames").is_some(),
        &format!("a shootdown says its method and frames: {sd}"),
    );

    // The same run, counted by the VMM.
    let sum = |key: &str| -> u64 {
        v[key]
            .as_object()
            .map(|o| o.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0)
    };
    let eq = |what: &str, trace: u64, counter: u64| {
        run.check(
            trace == counter,
            &format!("{what}: {trace} in the trace, {counter} counted"),
        );
    };
    eq(
        "KVM_RUN slices vs exits",
        slices(&t, "KVM_RUN"),
        sum("exits"),
    );
    eq(
        "exit slices vs exits",
        slices_with_prefix(&t, "exit "),
        sum("exits"),
    );
    eq(
        "hypercall slices vs hypercalls",
        slices_with_prefix(&t, "hypercall "),
        sum("hypercalls"),
    );
    eq(
        "resolve_pf outcomes vs RESOLVE_PF hypercalls",
        t.pf_outcomes.values().sum(),
        num(&v, &["hypercalls", "resolve_pf"]),
    );
    run.check(
        t.pf_outcomes
            .keys()
            .all(|k| k == "retry" || k == "guest_fault"),
        &format!("every fault has its outcome: {:?}", t.pf_outcomes),
    );
    eq(
        "ksm_scan slices vs ksmd wake-ups",
        slices(&t, "ksm_scan"),
        num(&v, &["ksm", "wakeups"]),
    );
    eq(
        "age_range slices vs aging passes",
        slices(&t, "age_range"),
        num(&v, &["reclaim", "passes"]),
    );
    eq(
        "clear_young slices vs the MMU's clear_young calls",
        slices(&t, "clear_young"),
        num(&v, &["mmu", "mn_clear_young"]),
    );
    let before = |name: &str| t.before_exit.get(name).copied().unwrap_or(0);
    eq(
        "invalidate_range_start slices vs the MMU's calls",
        before("invalidate_range_start"),
        num(&v, &["mmu", "mn_invalidate_range_start"]),
    );
    eq(
        "shootdowns vs host flushes",
        before("shootdown") + t.instants.get("shootdown").copied().unwrap_or(0),
        num(&v, &["host_invalidate", "flushes"]),
    );
    eq(
        "swap_out events vs pswpout",
        t.instants.get("swap_out").copied().unwrap_or(0),
        num(&v, &["reclaim", "pswpout"]),
    );
    eq(
        "swap_in events vs pswpin",
        t.instants.get("swap_in").copied().unwrap_or(0),
        num(&v, &["reclaim", "pswpin"]),
    );
}

/// The demo's narrator and the trace listen at once: every host
/// operation and notifier callback narrated is a slice in the trace, on
/// the threads that did them (`main` for the demo's host operation).
#[test]
fn a_demo_trace_has_every_narrated_callback_as_a_slice() {
    let args = ["demo", "dontneed", "--json"];
    let Some((run, path)) = run_writing("test-counter", "--trace", "dontneed.json", &args) else {
        return;
    };
    let mut narrated: BTreeMap<String, u64> = BTreeMap::new();
    for line in run.stdout.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_default();
        let kind = v["kind"].as_str().unwrap_or_default();
        let name = if kind == "host_op" {
            v["op"].as_str().unwrap_or_default()
        } else {
            kind
        };
        *narrated.entry(name.to_string()).or_default() += 1;
    }
    run.check(
        narrated.contains_key("madvise_dontneed"),
        &format!("the narration: {narrated:?}"),
    );
    let t = check_trace(&run, &path);
    run.check(t.threads.contains("main"), "a main track");
    run.check(t.threads.contains("vcpu0"), "a vcpu0 track");
    for name in [
        "madvise_dontneed",
        "invalidate_range_start",
        "invalidate_range_end",
        "shootdown",
    ] {
        let n = narrated.get(name).copied().unwrap_or(0);
        run.check(n > 0, &format!("{name} narrated: {narrated:?}"));
        run.check(
            slices(&t, name) >= n,
            &format!("{name}: {} slices, {n} narrated", slices(&t, name)),
        );
    }
}

/// A `--host-ops` script's timed operations get their own track.
#[test]
fn timed_host_operations_have_their_own_track() {
    let args = [
        "run",
        "hostops",
        "--host-ops",
        "builtin:hostops-timed",
        "--",
        "timed=1",
    ];
    let Some((run, path)) = run_writing("hostops", "--trace", "hostops.json", &args) else {
        return;
    };
    let t = check_trace(&run, &path);
    run.check(
        t.threads.contains("host-ops"),
        &format!("a host-ops track: {:?}", t.threads),
    );
    run.check(slices(&t, "madvise_dontneed") > 0, "the timed DONTNEED");
}

/// Everything at once at full rate (two vCPUs, ksmd every millisecond,
/// kswapd, the stress host thread's DONTNEED/mprotect/balloon, several VMs
/// one after the other): the trace still nests on every track.
#[test]
fn a_stress_trace_nests_on_every_track() {
    let args = ["stress", "--seconds", "1", "--json"];
    let Some((run, path)) = run_writing("verify", "--trace", "stress.json", &args) else {
        return;
    };
    let t = check_trace(&run, &path);
    has_tracks(
        &run,
        &t,
        &["vcpu0", "vcpu1", "ksmd", "kswapd", "stress-host"],
    );
    has_slices(
        &run,
        &t,
        &[
            "madvise_dontneed",
            "mprotect",
            "ksm_scan",
            "age_range",
            "invalidate_range_start",
            "shootdown",
            "resolve_pf",
        ],
    );
}

/// The `fill` colours of an SVG's rectangles, counted.
fn fills(run: &Run, path: &Path) -> HashMap<String, usize> {
    let text = std::fs::read_to_string(path).expect("read the timeline");
    let doc = match roxmltree::Document::parse(&text) {
        Ok(d) => d,
        Err(e) => {
            run.check(false, &format!("the timeline is well-formed XML: {e}"));
            unreachable!()
        }
    };
    run.check(doc.root_element().has_tag_name("svg"), "an <svg> document");
    let texts: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text().map(str::trim))
        .collect();
    for s in PageState::ALL {
        run.check(
            texts.contains(&s.name()),
            &format!("the legend names {}", s.name()),
        );
    }
    let mut n = HashMap::new();
    for node in doc.descendants().filter(|n| n.has_tag_name("rect")) {
        if let Some(f) = node.attribute("fill") {
            *n.entry(f.to_ascii_uppercase()).or_default() += 1;
        }
    }
    n
}

/// Rectangles drawn in `state`, its legend swatch left out.
fn drawn(fills: &HashMap<String, usize>, state: PageState) -> usize {
    fills
        .get(&state.hex())
        .copied()
        .unwrap_or(0)
        .saturating_sub(1)
}

#[test]
fn the_timeline_shows_the_states_the_counters_say_occurred() {
    // wss under reclaim: a working set, cold pages going out to swap.
    let args = [
        WSS_RECLAIM,
        &["--json", "--", "cold=1024", "hot=16", "duration_ms=300"],
    ];
    let Some((run, path, v)) = run_writing_json("wss", "--timeline", "wss.svg", &args) else {
        return;
    };
    let f = fills(&run, &path);
    run.check(num(&v, &["reclaim", "pswpout"]) > 0, "pages went to swap");
    run.check(
        drawn(&f, PageState::SwappedOut) > 0,
        &format!("swapped-out pages drawn: {f:?}"),
    );
    run.check(
        drawn(&f, PageState::Young) > 0,
        &format!("young pages drawn: {f:?}"),
    );
    run.check(
        drawn(&f, PageState::KsmShared) == 0,
        &format!("no KSM without ksmd: {f:?}"),
    );

    // ksm with ksmd: sharing appears, and breaks.
    let args = [
        &["run", "ksm", "--mem", "16M"][..],
        FAST_KSM,
        &["--json", "--", "pages=256"],
    ];
    let Some((run, path, v)) = run_writing_json("ksm", "--timeline", "ksm.svg", &args) else {
        return;
    };
    let f = fills(&run, &path);
    run.check(
        num(&v, &["ksm", "max_pages_sharing"]) > 0,
        "ksmd shared pages",
    );
    run.check(
        drawn(&f, PageState::KsmShared) > 0,
        &format!("KSM-shared pages drawn: {f:?}"),
    );
    run.check(
        drawn(&f, PageState::SwappedOut) == 0,
        &format!("nothing swapped without reclaim: {f:?}"),
    );
}

#[test]
fn the_reclaim_demo_timeline_shows_pages_going_out() {
    let args = ["demo", "reclaim", "--json"];
    let Some((run, path)) = run_writing("test-counter", "--timeline", "reclaim.svg", &args) else {
        return;
    };
    let last = run.stdout.lines().last().unwrap_or_default();
    let summary: Value = serde_json::from_str(last).unwrap_or_default();
    run.check(
        num(&summary, &["counters", "mm.pswpout"]) > 0,
        "the demo swapped pages out",
    );
    let f = fills(&run, &path);
    run.check(
        drawn(&f, PageState::SwappedOut) > 0,
        &format!("swapped-out pages drawn: {f:?}"),
    );
}

/// One line on stderr, exit status 2, and no guest output: the guest
/// never started. None of these reach KVM.
#[test]
fn unwritable_paths_fail_before_the_guest_starts() {
    let one_line_error = |r: &Run, needle: &str| {
        r.check(r.code == Some(2), "exit status 2");
        r.check(r.stderr.lines().count() == 1, "exactly one line on stderr");
        r.check(r.stderr.starts_with("shadowvm: error: "), "prefixed");
        r.check(r.stderr.contains(needle), &format!("mentions {needle:?}"));
        r.check(r.stdout.is_empty(), "nothing on stdout: no guest ran");
    };
    let nowhere = "/nonexistent-dir/out.json";
    let nowhere_svg = "/nonexistent-dir/t.svg";
    let dir = std::env::temp_dir();
    let kvm_svg = out_path("kvm.svg");
    let cases: [(&[&str], &str); 7] = [
        (
            &["run", "hello", "--trace", nowhere],
            "cannot write the trace /nonexistent-dir/out.json",
        ),
        (
            &["run", "hello", "--trace", dir.to_str().unwrap()],
            "cannot write the trace",
        ),
        (
            &["run", "hello", "--timeline", nowhere_svg],
            "cannot write the timeline /nonexistent-dir/t.svg",
        ),
        (
            &[
                "run",
                "hello",
                "--paging",
                "kvm",
                "--timeline",
                kvm_svg.to_str().unwrap(),
            ],
            "--timeline needs --paging shadow",
        ),
        (
            &["demo", "dontneed", "--trace", nowhere],
            "cannot write the trace",
        ),
        (
            &["demo", "reclaim", "--timeline", nowhere_svg],
            "cannot write the timeline",
        ),
        (
            &["stress", "--seconds", "1", "--trace", nowhere],
            "cannot write the trace",
        ),
    ];
    for (args, needle) in cases {
        one_line_error(&common::shadowvm(args), needle);
    }
}

/// Neither an ANSI escape nor a bar's characters.
fn no_bar(run: &Run, text: &str, what: &str) {
    run.check(
        !text.contains('\x1b') && !text.contains('\u{2588}') && !text.contains("stress ["),
        &format!("no progress bar in {what}"),
    );
}

#[test]
fn no_progress_bar_in_a_pipe_or_in_json() {
    if !common::require_kvm() || shadowvm::vmm::guests::find("verify").is_none() {
        return;
    }
    let run = common::shadowvm(&["stress", "--seconds", "1", "--json"]);
    run.check(run.code == Some(0), "stress exits 0");
    no_bar(&run, &run.stdout, "stdout");
    no_bar(&run, &run.stderr, "stderr");
    run.check(
        run.stdout.lines().count() == 1 && serde_json::from_str::<Value>(run.stdout.trim()).is_ok(),
        "stdout is exactly the JSON report",
    );
    let run = common::shadowvm(&["stress", "--seconds", "1"]);
    run.check(run.code == Some(0), "stress exits 0");
    no_bar(&run, &run.stdout, "stdout");
    no_bar(&run, &run.stderr, "stderr");
    run.check(!run.stderr.contains('\r'), "no carriage return on stderr");
}

/// Runs `args` with stdout and stderr on a new pseudo-terminal of 24x100
/// and returns its exit status, and everything it wrote there as stdout.
fn on_a_terminal(args: &[&str]) -> Run {
    // SAFETY: posix_openpt returns a new fd or -1; nothing else is touched.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    assert!(master >= 0, "posix_openpt");
    // SAFETY: `master` is a fresh fd that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `master` is a pty master; `name` is a writable buffer of the
    // length passed; `size` outlives the ioctl.
    unsafe {
        assert_eq!(libc::grantpt(master.as_raw_fd()), 0, "grantpt");
        assert_eq!(libc::unlockpt(master.as_raw_fd()), 0, "unlockpt");
        assert_eq!(
            libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()),
            0,
            "ptsname_r"
        );
        let size = libc::winsize {
            ws_row: 24,
            ws_col: 100,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        assert_eq!(
            libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size),
            0,
            "TIOCSWINSZ"
        );
    }
    // SAFETY: ptsname_r wrote a NUL-terminated path into `name`.
    let slave = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(slave.to_str().expect("a UTF-8 pty name"))
        .expect("open the pty");
    let mut child = Command::new(env!("CARGO_BIN_EXE_shadowvm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(slave.try_clone().expect("dup the pty"))
        .stderr(slave)
        .spawn()
        .expect("run shadowvm");
    // Only the child holds the terminal now: reading ends (EIO) when it
    // exits.
    let mut master = std::fs::File::from(master);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let status = child.wait().expect("wait for shadowvm");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::new(),
    }
}

#[test]
fn the_progress_bar_shows_on_a_terminal_but_never_with_json() {
    if !common::require_kvm() || shadowvm::vmm::guests::find("verify").is_none() {
        return;
    }
    let run = on_a_terminal(&["stress", "--seconds", "2"]);
    let text = &run.stdout;
    run.check(run.code == Some(0), "stress exits 0");
    run.check(text.contains("stress ["), "the bar shows on a terminal");
    run.check(text.contains("stress: PASS"), "the verdict follows it");

    let run = on_a_terminal(&["stress", "--seconds", "2", "--json"]);
    let text = &run.stdout;
    run.check(run.code == Some(0), "stress --json exits 0");
    no_bar(&run, text, "--json output on a terminal");
    let report = text
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_default();
    run.check(
        serde_json::from_str::<Value>(report.trim_end_matches('\r')).is_ok(),
        "the JSON report is whole",
    );
}
