//! Builds the tiny guests in `guests/` with the system C compiler and writes
//! `$OUT_DIR/guests.rs`, the table `src/vmm/guests.rs` embeds.
//!
//! `guests/<name>.c` becomes the built-in guest `<name>`, `guests/tests/<name>.c`
//! the hidden test guest `test-<name>`. Each guest is linked with the runtime
//! in `guests/rt/`. The first line of a guest's source,
//! `/* guest: <description> */`, is its description.
//!
//! Without a C compiler the table is empty and says why; the rest of the crate
//! still builds.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const CFLAGS: &[&str] = &[
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-ffreestanding",
    "-nostdlib",
    "-static",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mcmodel=small",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=0x1000",
    "-Wl,-z,noexecstack",
];

struct Guest {
    name: String,
    description: String,
    hidden: bool,
    source: PathBuf,
}

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let guests_dir = manifest.join("guests");
    println!("cargo:rerun-if-changed=guests");
    println!("cargo:rerun-if-env-changed=SHADOWVM_GUEST_CC");

    let cc = env::var("SHADOWVM_GUEST_CC").unwrap_or_else(|_| "gcc".to_string());
    let table = match Command::new(&cc).arg("--version").output() {
        Ok(o) if o.status.success() => build_all(&cc, &guests_dir, &out.join("guests")),
        _ => {
            println!(
                "cargo:warning=no C compiler `{cc}`: built-in guests are not available (apt-get install gcc)"
            );
            Table::unavailable(&format!(
                "this shadowvm was built without a C compiler (`{cc}` not found)"
            ))
        }
    };
    fs::write(out.join("guests.rs"), table.0).expect("write guests.rs");
}

struct Table(String);

impl Table {
    fn unavailable(reason: &str) -> Self {
        Table(format!(
            "/// Why the built-in guests are missing, if they are.\npub const GUESTS_UNAVAILABLE: Option<&str> = Some({reason:?});\n/// The built-in guests.\npub static GUESTS: &[EmbeddedGuest] = &[];\n"
        ))
    }
}

fn build_all(cc: &str, guests_dir: &Path, out_dir: &Path) -> Table {
    fs::create_dir_all(out_dir).expect("create guests output dir");
    let rt_dir = guests_dir.join("rt");
    let mut rt_sources: Vec<PathBuf> = list(&rt_dir, &["c", "S"]);
    rt_sources.sort();

    let mut guests = Vec::new();
    for (dir, hidden) in [
        (guests_dir.to_path_buf(), false),
        (guests_dir.join("tests"), true),
    ] {
        for source in list(&dir, &["c"]) {
            let stem = source
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("utf-8 guest name")
                .to_string();
            let name = if hidden { format!("test-{stem}") } else { stem };
            let description = description(&source);
            guests.push(Guest {
                name,
                description,
                hidden,
                source,
            });
        }
    }
    guests.sort_by(|a, b| (a.hidden, &a.name).cmp(&(b.hidden, &b.name)));

    let mut table = String::from(
        "/// Why the built-in guests are missing, if they are.\npub const GUESTS_UNAVAILABLE: Option<&str> = None;\n/// The built-in guests.\npub static GUESTS: &[EmbeddedGuest] = &[\n",
    );
    for g in &guests {
        let elf = out_dir.join(format!("{}.elf", g.name));
        let output = Command::new(cc)
            .args(CFLAGS)
            .arg("-I")
            .arg(guests_dir.join("include"))
            .arg("-I")
            .arg(&rt_dir)
            .arg("-T")
            .arg(rt_dir.join("linker.ld"))
            .arg("-o")
            .arg(&elf)
            .args(&rt_sources)
            .arg(&g.source)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
        let diagnostics = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "building guest {} from {} failed:\n{diagnostics}",
            g.name,
            g.source.display()
        );
        for line in diagnostics.lines() {
            println!("cargo:warning=guest {}: {line}", g.name);
        }
        writeln!(
            table,
            "    EmbeddedGuest {{ name: {:?}, description: {:?}, hidden: {}, elf: include_bytes!({:?}) }},",
            g.name,
            g.description,
            g.hidden,
            elf.display().to_string()
        )
        .expect("write to string");
    }
    table.push_str("];\n");
    Table(table)
}

fn list(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| exts.contains(&e))
        })
        .collect()
}

fn description(source: &Path) -> String {
    let text = fs::read_to_string(source).unwrap_or_default();
    text.lines()
        .next()
        .and_then(|l| l.trim().strip_prefix("/* guest:"))
        .and_then(|l| l.strip_suffix("*/"))
        .map(|d| {
            let d = d.trim();
            // "name - what it does" -> "what it does"
            d.split_once(" - ").map_or(d, |(_, rest)| rest).to_string()
        })
        .unwrap_or_default()
}
