//! `shadowvm stress`: issue 6's bounded reliability run (the library's
//! `vmm::stress`), from the command line.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use shadowvm::scenario::observe::{ObserveOptions, Observer};
use shadowvm::scenario::stress;
use shadowvm::vmm;

/// Exit status when the run cannot start (bad arguments, no KVM).
const EXIT_USAGE: u8 = 2;
/// Exit status when the run found a problem.
const EXIT_FAILED: u8 = 1;

#[derive(clap::Args)]
pub struct StressArgs {
    /// How long to run, in seconds: whole `verify` runs until then.
    #[arg(long, default_value_t = 10, value_name = "N")]
    seconds: u64,

    /// vCPUs of the verify guest.
    #[arg(long, default_value_t = 2, value_name = "N")]
    vcpus: u32,

    /// Guest RAM (verify uses the lower half, the host thread the upper).
    #[arg(long, default_value = "32M", value_name = "SIZE")]
    mem: String,

    /// Machine memory: smaller than what is touched, so reclaim works.
    #[arg(long, default_value = "10M", value_name = "SIZE")]
    machine_mem: String,

    /// verify's pages (they must fit in the lower half of RAM).
    #[arg(long, default_value_t = 2048, value_name = "N")]
    pages: u64,

    #[command(flatten)]
    folios: super::folios::FolioArgs,

    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,

    /// Write a Perfetto trace of every verify run to FILE.
    ///
    /// Chrome trace-event JSON for the Perfetto UI (docs/observability.md).
    /// Large: it holds every exit, fault and host operation of the run.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,

    /// Tests only: inject a fault into the host TLB flush of every run
    /// (`skip-zapped`: the negative control, which must report corruption).
    #[cfg(feature = "test-hooks")]
    #[arg(long, hide = true, value_name = "FAULT")]
    test_flush_fault: Option<vmm::host::tlb::FlushFault>,
}

/// Runs `shadowvm stress`: 0 if everything held, 1 if not, 2 if it could
/// not run.
pub fn main(args: StressArgs) -> ExitCode {
    let config = match config_from(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shadowvm: error: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let json = args.json;
    let observer = match Observer::open(&ObserveOptions {
        trace: args.trace.clone(),
        timeline: None,
    })
    .and_then(|mut o| o.install().map(|()| o))
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("shadowvm: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let progress = if super::progress::wanted(json) {
        super::progress::Progress::timed(config.duration, "stress")
    } else {
        super::progress::Progress::none()
    };
    let mut runs = 0;
    let report = stress::stress(&config, |console| {
        runs += 1;
        progress.message(format!("{runs} verify run(s) done"));
        if !json {
            progress.print(console);
        }
    });
    progress.finish();
    let written = observer.finish();
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shadowvm: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let text = if json {
        format!("{}\n", serde_json::to_string(&report).unwrap_or_default())
    } else {
        report_text(&report)
    };
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        eprintln!("shadowvm: error: writing the report: {e}");
        return ExitCode::from(EXIT_FAILED);
    }
    eprintln!("{}", report.verdict());
    if let Err(e) = written {
        eprintln!("shadowvm: error: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

/// The report for a terminal: one line per run (with where each vCPU was
/// if it overran), the operation counts and rates, the mean timings.
fn report_text(report: &stress::StressReport) -> String {
    let mut out = String::new();
    for (i, r) in report.runs.iter().enumerate() {
        out += &format!(
            "run {i}: {} rounds in {:.2}s (budget {:.2}s): {}; corrupted bytes {}; check {}; frames returned {}\n",
            r.rounds,
            r.seconds,
            r.budget_seconds,
            r.outcome,
            r.corrupted_bytes
                .map_or_else(|| "unknown".to_string(), |n| n.to_string()),
            r.check,
            r.frames_returned
        );
        for where_ in r.overrun.iter().flatten() {
            out += &format!("  {where_}\n");
        }
    }
    for (k, v) in &report.ops {
        let rate = report.ops_per_sec.get(k).copied().unwrap_or(0.0);
        out += &format!("{k:>24}: {v:>10} ({rate:.1}/s)\n");
    }
    for (k, v) in &report.timings_ns {
        out += &format!("{k:>24}: {:>10.1} us mean\n", v / 1000.0);
    }
    if report.host_op_errors > 0 {
        out += &format!(
            "host operations failed: {} (last: {})\n",
            report.host_op_errors,
            report
                .host_op_last_error
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default()
        );
    }
    out
}

fn config_from(args: &StressArgs) -> anyhow::Result<stress::StressConfig> {
    anyhow::ensure!(args.seconds >= 1, "--seconds must be at least 1");
    anyhow::ensure!((1..=32).contains(&args.vcpus), "--vcpus must be 1 to 32");
    let mut c = stress::StressConfig::new(Duration::from_secs(args.seconds));
    c.vcpus = args.vcpus;
    c.mem_size = vmm::parse_mem_size(&args.mem).map_err(|e| anyhow::anyhow!("--mem: {e}"))?;
    c.machine_mem = vmm::parse_mem_size(&args.machine_mem)
        .map_err(|e| anyhow::anyhow!("--machine-mem: {e}"))?;
    c.pages = args.pages;
    (c.host_thp, c.pte_prefetch) = args.folios.config()?;
    #[cfg(feature = "test-hooks")]
    {
        c.flush_fault = args.test_flush_fault;
    }
    Ok(c)
}
