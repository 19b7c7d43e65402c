//! Scripted host operations (`--host-ops`, docs/host-ops.md): `munmap`,
//! `mprotect` and `madvise(MADV_DONTNEED)` of a gpa range of a running
//! shadow-mode guest, at a time after the start or when the guest reaches a
//! checkpoint (HOST_OP `CHECKPOINT(n)`). The host mm's notifier keeps the
//! shadow MMU coherent; the guest sees a fault, a read-only page or a zero
//! page.

use std::time::Duration;

use super::ram::ShadowRam;
use crate::mm::{MmError, Prot};
use crate::vmm::abi::{self, PAGE_SIZE};
use crate::vmm::units::parse_duration;

/// The most checkpoints (`CHECKPOINT(n)` needs `n < MAX_CHECKPOINT`).
pub const MAX_CHECKPOINT: u64 = 1 << 16;

/// A `--host-ops` script that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostOpsError {
    /// The script file cannot be read.
    #[error("cannot read host-ops script {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// No such built-in scenario.
    #[error("unknown built-in host-ops scenario `{0}` (known: {known})", known = BUILTINS.iter().map(|b| b.0).collect::<Vec<_>>().join(", "))]
    UnknownBuiltin(String),
    /// A line does not parse or names a range outside guest RAM.
    #[error("{script}:{line}: {source}")]
    Line {
        /// Script name.
        script: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        #[source]
        source: LineError,
    },
}

/// What is wrong with one script line. Words are the user's spelling.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// Not the shape of a line.
    #[error(
        "expected `at DURATION|checkpoint N dontneed|munmap GPA LEN` or `... mprotect GPA LEN ro|rw|none`"
    )]
    Usage,
    /// A checkpoint number out of range.
    #[error("bad checkpoint `{0}`: want 0..{MAX_CHECKPOINT}")]
    Checkpoint(String),
    /// A time that does not parse.
    #[error("bad time `{0}`")]
    Time(String),
    /// A gpa that does not parse.
    #[error("bad gpa `{0}`")]
    Gpa(String),
    /// A length that does not parse.
    #[error("bad length `{0}`")]
    Length(String),
    /// An unknown protection.
    #[error("bad protection `{0}`: want ro, rw or none")]
    Protection(String),
    /// mprotect without a protection.
    #[error("mprotect needs a protection: ro, rw or none")]
    NoProtection,
    /// An unknown operation.
    #[error("unknown operation `{0}`: want dontneed, mprotect or munmap")]
    Operation(String),
    /// Words after the operation.
    #[error("unexpected `{0}` at the end of the line")]
    Trailing(String),
    /// A range not made of whole pages.
    #[error("range {gpa:#x}+{len:#x} is not page aligned or is empty")]
    Unaligned {
        /// First gpa.
        gpa: u64,
        /// Bytes.
        len: u64,
    },
    /// A range outside the RAM a script may touch.
    #[error("range {gpa:#x}+{len:#x} is outside guest RAM [{min:#x}, {mem_size:#x})", min = abi::IMAGE_MIN_GPA)]
    OutsideRam {
        /// First gpa.
        gpa: u64,
        /// Bytes.
        len: u64,
        /// Guest RAM.
        mem_size: u64,
    },
    /// A range over the guest image (mlocked: exception delivery needs it).
    #[error("range {gpa:#x}+{len:#x} overlaps the guest image [{start:#x}, {end:#x})")]
    OverlapsImage {
        /// First gpa.
        gpa: u64,
        /// Bytes.
        len: u64,
        /// Image start (page aligned).
        start: u64,
        /// Image end (page aligned).
        end: u64,
    },
}

/// A scripted operation failed while the guest ran: the user's script,
/// not the guest, is wrong (e.g. the range was already unmapped).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{script}:{line}: host operation failed: {source}")]
pub struct HostOpFailed {
    /// Script name.
    pub script: String,
    /// The op's line.
    pub line: usize,
    /// Why.
    #[source]
    pub source: MmError,
}

/// What to do to the range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostOpKind {
    /// `madvise(MADV_DONTNEED)`: the guest then reads zero.
    DontNeed,
    /// `mprotect` with this protection.
    Mprotect(Prot),
    /// `munmap`: guest accesses then fault.
    Munmap,
}

/// When to do it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostOpWhen {
    /// This long after the guest started.
    At(Duration),
    /// When the guest calls `CHECKPOINT(n)`.
    Checkpoint(u16),
}

/// One script line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostOp {
    /// Its line in the script.
    pub line: usize,
    /// When.
    pub when: HostOpWhen,
    /// What.
    pub kind: HostOpKind,
    /// First gpa (page aligned).
    pub gpa: u64,
    /// Bytes (page aligned, non-zero).
    pub len: u64,
}

/// A parsed script.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostOpScript {
    /// Its name (file or `builtin:NAME`).
    pub name: String,
    /// The operations, in script order.
    pub ops: Vec<HostOp>,
}

/// Built-in scenarios: `builtin:NAME`.
pub const BUILTINS: &[(&str, &str)] = &[
    (
        "hostops",
        "# the hostops guest's checkpoints (guests/hostops.c)\n\
         at checkpoint 1 dontneed 0x1000000 4K\n\
         at checkpoint 2 mprotect 0x1001000 4K ro\n\
         at checkpoint 3 mprotect 0x1001000 4K rw\n\
         at checkpoint 4 munmap 0x1002000 4K\n",
    ),
    (
        "dma",
        "# the dma guest's checkpoints (guests/dma.c): pages 56-58 of its buffer\n\
         at checkpoint 1 mprotect 0x1038000 4K ro\n\
         at checkpoint 2 mprotect 0x1038000 4K rw\n\
         at checkpoint 3 dontneed 0x1039000 4K\n\
         at checkpoint 4 munmap 0x103a000 4K\n",
    ),
    (
        "hostops-timed",
        "# hostops timed=1: page D is dropped while the guest polls it\n\
         at 200ms dontneed 0x1003000 4K\n",
    ),
];

fn parse_num(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let v = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => digits.parse().ok()?,
    };
    v.checked_mul(1u64 << shift)
}

fn parse_line(
    words: &[&str],
    mem_size: u64,
) -> Result<(HostOpWhen, HostOpKind, u64, u64), LineError> {
    let mut w = words.iter().copied();
    if w.next() != Some("at") {
        return Err(LineError::Usage);
    }
    let when = match w.next() {
        Some("checkpoint") => {
            let n = w.next().ok_or(LineError::Usage)?;
            match parse_num(n) {
                Some(n) if n < MAX_CHECKPOINT => HostOpWhen::Checkpoint(n as u16),
                _ => return Err(LineError::Checkpoint(n.into())),
            }
        }
        Some(d) => HostOpWhen::At(parse_duration(d).map_err(|_| LineError::Time(d.into()))?),
        None => return Err(LineError::Usage),
    };
    let op = w.next().ok_or(LineError::Usage)?;
    let (gpa_s, len_s) = (
        w.next().ok_or(LineError::Usage)?,
        w.next().ok_or(LineError::Usage)?,
    );
    let gpa = parse_num(gpa_s).ok_or_else(|| LineError::Gpa(gpa_s.into()))?;
    let len = parse_num(len_s).ok_or_else(|| LineError::Length(len_s.into()))?;
    let kind = match op {
        "dontneed" => HostOpKind::DontNeed,
        "munmap" => HostOpKind::Munmap,
        "mprotect" => HostOpKind::Mprotect(match w.next() {
            Some("ro") => Prot::READ,
            Some("rw") => Prot::READ | Prot::WRITE,
            Some("none") => Prot::NONE,
            Some(p) => return Err(LineError::Protection(p.into())),
            None => return Err(LineError::NoProtection),
        }),
        _ => return Err(LineError::Operation(op.into())),
    };
    if let Some(extra) = w.next() {
        return Err(LineError::Trailing(extra.into()));
    }
    if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || len == 0 {
        return Err(LineError::Unaligned { gpa, len });
    }
    match gpa.checked_add(len) {
        Some(end) if gpa >= abi::IMAGE_MIN_GPA && end <= mem_size => {}
        _ => return Err(LineError::OutsideRam { gpa, len, mem_size }),
    }
    Ok((when, kind, gpa, len))
}

impl HostOpScript {
    /// Parses `text` for a guest with `mem_size` bytes of RAM.
    pub fn parse(name: &str, text: &str, mem_size: u64) -> Result<Self, HostOpsError> {
        let mut ops = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let body = raw.split('#').next().unwrap_or_default();
            let words: Vec<&str> = body.split_whitespace().collect();
            if words.is_empty() {
                continue;
            }
            let (when, kind, gpa, len) =
                parse_line(&words, mem_size).map_err(|source| HostOpsError::Line {
                    script: name.to_string(),
                    line: i + 1,
                    source,
                })?;
            ops.push(HostOp {
                line: i + 1,
                when,
                kind,
                gpa,
                len,
            });
        }
        Ok(HostOpScript {
            name: name.to_string(),
            ops,
        })
    }

    /// `builtin:NAME` or a file.
    pub fn load(spec: &str, mem_size: u64) -> Result<Self, HostOpsError> {
        if let Some(name) = spec.strip_prefix("builtin:") {
            let (_, text) = BUILTINS
                .iter()
                .find(|b| b.0 == name)
                .ok_or_else(|| HostOpsError::UnknownBuiltin(name.to_string()))?;
            return Self::parse(spec, text, mem_size);
        }
        let text = std::fs::read_to_string(spec).map_err(|source| HostOpsError::Read {
            path: spec.to_string(),
            source,
        })?;
        Self::parse(spec, &text, mem_size)
    }

    /// Refuses ops that touch the image `[start, end)` (mlocked: exception
    /// delivery needs it).
    pub fn check_image(&self, start: u64, end: u64) -> Result<(), HostOpsError> {
        let start = start & !(PAGE_SIZE - 1);
        let end = end.next_multiple_of(PAGE_SIZE);
        match self
            .ops
            .iter()
            .find(|op| op.gpa < end && start < op.gpa + op.len)
        {
            Some(op) => Err(HostOpsError::Line {
                script: self.name.clone(),
                line: op.line,
                source: LineError::OverlapsImage {
                    gpa: op.gpa,
                    len: op.len,
                    start,
                    end,
                },
            }),
            None => Ok(()),
        }
    }

    /// The ops of checkpoint `n`.
    pub fn checkpoint(&self, n: u16) -> impl Iterator<Item = &HostOp> {
        self.ops
            .iter()
            .filter(move |op| op.when == HostOpWhen::Checkpoint(n))
    }
}

impl HostOp {
    /// Applies it to guest RAM in the host mm.
    pub fn apply(&self, ram: &ShadowRam) -> Result<(), MmError> {
        let hva = ram.base() + self.gpa;
        let mm = ram.mm();
        match self.kind {
            HostOpKind::DontNeed => mm.madvise_dontneed(hva, self.len),
            HostOpKind::Mprotect(prot) => mm.mprotect(hva, self.len, prot),
            HostOpKind::Munmap => mm.munmap(hva, self.len),
        }
    }
}

impl HostOpScript {
    /// The timed ops, soonest first.
    pub fn timed(&self) -> Vec<(Duration, HostOp)> {
        let mut timed: Vec<(Duration, HostOp)> = self
            .ops
            .iter()
            .filter_map(|op| match op.when {
                HostOpWhen::At(t) => Some((t, *op)),
                HostOpWhen::Checkpoint(_) => None,
            })
            .collect();
        timed.sort_by_key(|t| t.0);
        timed
    }

    /// `op` failed with `source`.
    pub fn failed(&self, op: &HostOp, source: MmError) -> HostOpFailed {
        HostOpFailed {
            script: self.name.clone(),
            line: op.line,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: u64 = 64 << 20;

    #[test]
    fn parses_the_builtins_and_the_examples() {
        for (name, text) in BUILTINS {
            HostOpScript::parse(name, text, MEM).unwrap();
        }
        let s = HostOpScript::parse(
            "t",
            "# c\n\nat 50ms dontneed 0x400000 16K # x\nat checkpoint 3 mprotect 0x400000 4K ro\n\
             at checkpoint 5 munmap 0x500000 4K\n",
            MEM,
        )
        .unwrap();
        assert_eq!(s.ops.len(), 3);
        assert_eq!(s.ops[0].when, HostOpWhen::At(Duration::from_millis(50)));
        assert_eq!(s.ops[0].len, 16 << 10);
        assert_eq!(s.ops[0].line, 3);
        assert_eq!(s.ops[1].kind, HostOpKind::Mprotect(Prot::READ));
        assert_eq!(s.checkpoint(5).count(), 1);
    }

    #[test]
    fn refuses_bad_lines_naming_them() {
        for bad in [
            "at",
            "when 5ms dontneed 0x400000 4K",
            "at xx dontneed 0x400000 4K",
            "at checkpoint 65536 munmap 0x400000 4K",
            "at 1ms frob 0x400000 4K",
            "at 1ms dontneed 0x400001 4K",
            "at 1ms dontneed 0x400000 0",
            "at 1ms dontneed 0x100000 4K",
            "at 1ms dontneed 0x3fff000 8K",
            "at 1ms dontneed 0xfffffffffffff000 8K",
            "at 1ms mprotect 0x400000 4K rx",
            "at 1ms mprotect 0x400000 4K",
            "at 1ms munmap 0x400000 4K extra",
        ] {
            let e = HostOpScript::parse("s", &format!("# ok\n{bad}\n"), MEM).unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with("s:2: "), "{bad}: {msg}");
            assert!(!msg.contains('\n'));
        }
        let s = HostOpScript::parse("s", "at 1ms munmap 0x200000 4K", MEM).unwrap();
        assert!(s.check_image(0x200000, 0x203000).is_err());
        assert!(s.check_image(0x201000, 0x203000).is_ok());
    }
}
