//! `shadowvm demo [<scenario>] [--json] [--trace FILE] [--timeline
//! FILE.svg]`: parses and calls `shadowvm::scenario::demo`.

use std::io::Write as _;
use std::process::ExitCode;

use shadowvm::scenario::demo;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// The scenario to run; without one, list them.
    scenario: Option<String>,

    /// Write the events (and the counters) as JSON lines instead of the
    /// narrated view.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    observe: super::observe::ObserveArgs,
}

pub fn main(args: DemoArgs) -> ExitCode {
    let Some(name) = args.scenario else {
        let list: String = demo::SCENARIOS
            .iter()
            .map(|s| format!("{:<10} {}\n", s.name, s.description))
            .collect();
        return match std::io::stdout().lock().write_all(list.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shadowvm: error: writing the list: {e}");
                ExitCode::from(1)
            }
        };
    };
    if demo::find(&name).is_none() {
        eprintln!(
            "shadowvm: error: unknown demo scenario `{name}` (try `shadowvm demo` for the list)"
        );
        return ExitCode::from(2);
    }
    let mut observer = match args.observe.open() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("shadowvm: error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = demo::run(&name, args.json, Box::new(std::io::stdout()), &mut observer);
    let written = observer.finish();
    match (result, written) {
        (Ok(()), Ok(_)) => ExitCode::SUCCESS,
        (Err(e), _) => {
            eprintln!("shadowvm: error: demo {name}: {e:#}");
            ExitCode::from(2)
        }
        (Ok(()), Err(e)) => {
            eprintln!("shadowvm: error: {e}");
            ExitCode::from(2)
        }
    }
}
