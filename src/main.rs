//! The `shadowvm` command line: parses, calls the library, prints.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use shadowvm::scenario::observe;
use shadowvm::vmm::{self, GuestSource, Outcome, Paging, VmConfig, guests};

mod cli;

/// Exit status when shadowvm itself cannot start the guest (bad input, no KVM).
const EXIT_USAGE: u8 = 2;
/// Exit status when `--timeout` expired.
const EXIT_TIMEOUT: u8 = 124;
/// Exit status when the guest crashed or the VMM failed while it ran.
const EXIT_GUEST_FAILED: u8 = 125;

#[derive(Parser)]
#[command(
    name = "shadowvm",
    version,
    about = "A small KVM hypervisor that boots tiny 64-bit guests",
    after_help = "Exit status: the guest's exit code when it exits; 0 when every vCPU halts; \
                  2 when the guest cannot be started (bad arguments, bad image, no KVM) or \
                  --trace/--timeline cannot be written; \
                  124 when --timeout expires; 125 when the guest crashes (triple fault, \
                  unknown port, KVM error)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest and print its serial console on stdout.
    Run(RunArgs),
    /// The reliability run: the verify guest and a DMA device under ksmd,
    /// kswapd and host memory operations; exit 0 if nothing was corrupted.
    Stress(cli::stress::StressArgs),
    /// Narrated demos of host memory operations on a running guest; without
    /// a scenario, list them.
    Demo(cli::demo::DemoArgs),
    /// List the built-in guests.
    Guests {
        /// Also list the test guests (test-*).
        #[arg(long)]
        all: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PagingArg {
    /// The guest's own page tables; KVM does the second level.
    Kvm,
    /// The VMM's shadow page tables.
    Shadow,
}

#[derive(clap::Args)]
struct RunArgs {
    /// A built-in guest name (see `shadowvm guests`) or the path of an ELF64
    /// guest image.
    guest: String,

    /// Guest RAM: a number with a K, M or G suffix, a multiple of 2M between
    /// 4M and 64G.
    #[arg(long, default_value = "64M", value_name = "SIZE")]
    mem: String,

    /// Number of vCPUs, each on its own thread (1 to 32). Every vCPU starts
    /// at the ELF entry point with its index in rsi.
    #[arg(long, default_value_t = 1, value_name = "N")]
    vcpus: u32,

    /// Who translates guest addresses: `shadow` (the default) runs the guest
    /// on the VMM's shadow page tables (paravirtual MMU, docs/guest-abi.md);
    /// `kvm` runs it on its own page tables with KVM doing the second level.
    #[arg(long, value_enum, default_value = "shadow")]
    paging: PagingArg,

    /// Machine memory for --paging shadow: the frame pool guest RAM (on
    /// first touch) and the shadow page tables come from. Default: --mem
    /// plus 1/16 plus 4M. Running out stops the guest with an error.
    /// Ignored with --paging kvm.
    #[arg(long, value_name = "SIZE")]
    machine_mem: Option<String>,

    /// Stop the guest and fail (exit status 124) if it still runs after
    /// this long: 500ms, 10s, 2m or plain seconds.
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,

    /// Print statistics on stderr when the guest stops: exits by reason,
    /// I/O exits by port, hypercalls, time in guest, time to first serial
    /// byte.
    #[arg(long)]
    stats: bool,

    /// Print the statistics as one JSON object on stderr (implies --stats).
    #[arg(long)]
    json: bool,

    /// After the guest stops, check the shadow MMU's coherence and the host
    /// mm's consistency; fail with status 125 if either is violated.
    #[arg(long)]
    check: bool,

    /// Run ksmd while the guest runs (--paging shadow): guest RAM is made
    /// mergeable and identical pages share one frame until written. Its
    /// counters (pages_shared, pages_sharing, ...) go to --stats/--json.
    #[arg(long)]
    ksm: bool,

    /// Pages ksmd scans per wake-up (/sys/kernel/mm/ksm/pages_to_scan).
    #[arg(long, default_value_t = 100, value_name = "N", requires = "ksm")]
    ksm_pages_to_scan: u64,

    /// Milliseconds ksmd sleeps between wake-ups
    /// (/sys/kernel/mm/ksm/sleep_millisecs).
    #[arg(long, default_value_t = 20, value_name = "N", requires = "ksm")]
    ksm_sleep_ms: u64,

    /// Run a kswapd-like thread while the guest runs (--paging shadow): it
    /// ages guest pages, estimates the working set (pages young in the last
    /// 4 passes) and, when free frames run low (a --machine-mem smaller
    /// than what the guest touches), swaps cold pages out.
    #[arg(long)]
    reclaim: bool,

    /// Milliseconds between kswapd's aging passes.
    #[arg(long, default_value_t = 50, value_name = "N", requires = "reclaim")]
    reclaim_interval_ms: u64,

    /// Scripted host operations on guest RAM (--paging shadow): a script
    /// FILE or `builtin:NAME` (docs/host-ops.md).
    #[arg(long, value_name = "FILE")]
    host_ops: Option<String>,

    #[command(flatten)]
    folios: cli::folios::FolioArgs,

    /// The guest command line (also made of ARGS after `--`, space-joined).
    #[arg(long, value_name = "STRING")]
    cmdline: Option<String>,

    #[command(flatten)]
    observe: cli::observe::ObserveArgs,

    /// More guest command-line words, after `--`.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,

    /// Tests only: inject a fault into the host TLB flush
    /// (`fail-after=N`, `skip-zapped`).
    #[cfg(feature = "test-hooks")]
    #[arg(long, hide = true, value_name = "FAULT")]
    test_flush_fault: Option<vmm::host::tlb::FlushFault>,

    /// Tests only: the guest's first DMA ATTACH leaves a stale IOTLB entry
    /// at iova 0 (a missed invalidation), which must stop the VM.
    #[cfg(feature = "test-hooks")]
    #[arg(long, hide = true)]
    test_dma_stale_entry: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Guests { all } => list_guests(all),
        Command::Stress(args) => cli::stress::main(args),
        Command::Demo(args) => cli::demo::main(args),
        Command::Run(args) => match run(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("shadowvm: error: {}", error_line(&e));
                ExitCode::from(EXIT_USAGE)
            }
        },
    }
}

/// The error and its causes on one line, skipping causes whose text the
/// message already contains (our error messages embed their sources).
fn error_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line.replace('\n', " ")
}

fn list_guests(all: bool) -> ExitCode {
    if let Some(reason) = guests::unavailable_reason() {
        eprintln!("shadowvm: no built-in guests: {reason}");
        return ExitCode::from(EXIT_USAGE);
    }
    let list: String = guests::list(all)
        .map(|g| format!("{:<18} {}\n", g.name, g.description))
        .collect();
    match std::io::stdout().lock().write_all(list.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shadowvm: error: writing the list: {e}");
            ExitCode::from(1)
        }
    }
}

fn config_from(args: &RunArgs) -> anyhow::Result<VmConfig> {
    let guest = if args.guest.contains('/') {
        GuestSource::File(PathBuf::from(&args.guest))
    } else {
        guests::resolve(&args.guest)
    };
    let mut config = VmConfig::new(guest);
    config.mem_size = vmm::parse_mem_size(&args.mem).context("--mem")?;
    config.vcpus = args.vcpus;
    config.paging = match args.paging {
        PagingArg::Kvm => Paging::Kvm,
        PagingArg::Shadow => Paging::Shadow,
    };
    config.machine_mem = args
        .machine_mem
        .as_deref()
        .map(vmm::parse_mem_size)
        .transpose()
        .context("--machine-mem")?;
    config.timeout = args
        .timeout
        .as_deref()
        .map(vmm::parse_duration)
        .transpose()
        .context("--timeout")?;
    let mut words: Vec<&str> = args.cmdline.iter().map(String::as_str).collect();
    words.extend(args.args.iter().map(String::as_str));
    config.cmdline = words.join(" ");
    config.check = args.check;
    (config.host_thp, config.pte_prefetch) = args.folios.config()?;
    if args.ksm {
        config.ksm = Some(shadowvm::mm::KsmConfig {
            pages_to_scan: args.ksm_pages_to_scan,
            sleep_millisecs: args.ksm_sleep_ms,
        });
    }
    if args.reclaim {
        config.reclaim = Some(vmm::host::kswapd::ReclaimConfig {
            interval: std::time::Duration::from_millis(args.reclaim_interval_ms.max(1)),
        });
    }
    if let Some(spec) = &args.host_ops {
        let script = vmm::host::ops::HostOpScript::load(spec, config.mem_size)?;
        config.host_ops = Some(std::sync::Arc::new(script));
    }
    #[cfg(feature = "test-hooks")]
    {
        config.flush_fault = args.test_flush_fault;
        config.dma_stale_entry = args.test_dma_stale_entry;
    }
    config.validate()?;
    if args.observe.timeline.is_some() && config.paging != Paging::Shadow {
        anyhow::bail!("--timeline needs --paging shadow");
    }
    Ok(config)
}

/// The timeline's title: the command that ran.
fn title(args: &RunArgs, config: &VmConfig) -> String {
    let mut t = format!("shadowvm run {}", args.guest);
    for (on, flag) in [
        (args.ksm, "--ksm"),
        (args.reclaim, "--reclaim"),
        (args.host_ops.is_some(), "--host-ops"),
    ] {
        if on {
            t.push(' ');
            t.push_str(flag);
        }
    }
    if !config.cmdline.is_empty() {
        t.push_str(" -- ");
        t.push_str(&config.cmdline);
    }
    t
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = config_from(&args)?;
    let mut observer = args.observe.open()?;
    observer.install()?;
    let progress = if cli::progress::wanted(args.json) {
        cli::progress::Progress::for_run(config.timeout)
    } else {
        cli::progress::Progress::none()
    };
    let console = progress.console(Box::new(std::io::stdout()));
    let report = observe::run(
        &config,
        console,
        &mut observer,
        &title(&args, &config),
        |p| progress.tick(p),
    );
    progress.finish();
    // Everything traced is done: write the trace and the timeline.
    let written = observer.finish();
    let report = report?;
    let check_failed = matches!(report.check, Some(Err(_)));
    if args.check {
        match &report.check {
            Some(Ok(())) => eprintln!("coherence check: ok"),
            Some(Err(e)) => eprintln!("coherence check: FAILED: {e}"),
            None => eprintln!("coherence check: nothing to check with --paging kvm"),
        }
    }
    if args.json {
        let mut v = serde_json::to_value(&report.stats).context("serializing the statistics")?;
        if let (Some(check), Some(obj)) = (&report.check, v.as_object_mut()) {
            let text = match check {
                Ok(()) => "ok".to_string(),
                Err(e) => e.to_string(),
            };
            obj.insert("check".into(), text.into());
        }
        eprintln!("{v}");
    } else if args.stats {
        eprintln!("{}", report.stats);
    }
    let code = match report.outcome {
        Outcome::Exited { code, .. } => ExitCode::from(code),
        Outcome::AllHalted | Outcome::Stopped => ExitCode::SUCCESS,
        ref timed_out @ Outcome::TimedOut { .. } => {
            eprintln!("shadowvm: {timed_out}");
            ExitCode::from(EXIT_TIMEOUT)
        }
        ref failed @ (Outcome::Failed(_) | Outcome::VmmError(_)) => {
            eprintln!("shadowvm: {failed}");
            ExitCode::from(EXIT_GUEST_FAILED)
        }
    };
    if let Err(e) = written {
        eprintln!("shadowvm: error: {e}");
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    Ok(if check_failed {
        ExitCode::from(EXIT_GUEST_FAILED)
    } else {
        code
    })
}
