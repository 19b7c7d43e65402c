//! What to run and how: the VM configuration and the parsing of its
//! human-written values (`--mem 64M`, `--timeout 500ms`).

use std::path::PathBuf;
use std::time::Duration;

use super::abi;

/// Smallest guest RAM: the 2 MiB VMM area plus room for an image.
pub const MIN_MEM_SIZE: u64 = 4 << 20;
/// Largest guest RAM we accept.
pub const MAX_MEM_SIZE: u64 = 64 << 30;
/// Guest RAM is mapped with 2 MiB pages above the VMM area.
pub const MEM_ALIGN: u64 = 2 << 20;

/// Errors in user-supplied configuration values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size string did not parse.
    #[error(
        "invalid memory size `{0}`: expected a number with an optional K, M or G suffix, like 64M"
    )]
    BadSize(String),
    /// Memory size out of range.
    #[error("memory size {size} is out of range: it must be between 4M and 64G")]
    MemOutOfRange {
        /// What the user asked for.
        size: String,
    },
    /// Memory size not a multiple of 2 MiB.
    #[error("memory size {0} is not a multiple of 2M")]
    MemUnaligned(String),
    /// Bad vCPU count.
    #[error("{0} vCPUs is out of range: shadowvm runs 1 to {max} vCPUs", max = abi::MAX_VCPUS)]
    VcpusOutOfRange(u32),
    /// A duration string did not parse.
    #[error(
        "invalid duration `{0}`: expected a number with an optional ms, s or m suffix, like 10s"
    )]
    BadDuration(String),
    /// The command line does not fit its page.
    #[error("the guest command line is {0} bytes; at most {max} fit", max = abi::CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    /// The command line contains a NUL byte.
    #[error("the guest command line contains a NUL byte")]
    CmdlineNul,
    /// A host memory feature asked for in kvm mode.
    #[error("{0} needs --paging shadow")]
    NeedsShadow(&'static str),
}

/// Who builds the guest's second-level translation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Paging {
    /// The guest's own page tables, KVM does the second level.
    Kvm,
    /// The VMM's shadow page tables (the default).
    #[default]
    Shadow,
}

impl Paging {
    /// The value of `svm_boot_info.paging_mode`.
    pub fn abi_mode(self) -> u32 {
        match self {
            Paging::Kvm => abi::PAGING_MODE_KVM,
            Paging::Shadow => abi::PAGING_MODE_SHADOW,
        }
    }

    /// Lower-case name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Paging::Kvm => "kvm",
            Paging::Shadow => "shadow",
        }
    }
}

/// Which guest image to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestSource {
    /// A built-in guest, by name.
    Builtin(String),
    /// An ELF file.
    File(PathBuf),
}

/// Everything `vmm::run` needs.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The guest image.
    pub guest: GuestSource,
    /// Bytes of guest RAM.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Paging mode.
    pub paging: Paging,
    /// Stop the guest after this long.
    pub timeout: Option<Duration>,
    /// The guest command line.
    pub cmdline: String,
    /// Bytes of machine memory in shadow mode (`None`: guest RAM plus
    /// overhead, `shadow::default_machine_mem`). Ignored in kvm mode.
    pub machine_mem: Option<u64>,
    /// Shadow mode: invalidate flushed frames in the real host mm
    /// (`tlb::HostTlbFlush`). Only tests turn it off, to show that without
    /// it a vCPU keeps using stale translations.
    pub host_tlb_flush: bool,
    /// Shadow mode: after the guest stops, check the shadow MMU's coherence
    /// and the host mm's consistency (`RunReport::check`).
    pub check: bool,
    /// Shadow mode: run ksmd over guest RAM with these tunables (`--ksm`).
    pub ksm: Option<crate::mm::KsmConfig>,
    /// Shadow mode: run kswapd (aging, working set, reclaim) (`--reclaim`).
    pub reclaim: Option<super::kswapd::ReclaimConfig>,
    /// Shadow mode: scripted host operations (`--host-ops`).
    pub host_ops: Option<std::sync::Arc<super::hostops::HostOpScript>>,
}

impl VmConfig {
    /// A configuration with the defaults: 64 MiB, one vCPU, shadow paging, no
    /// timeout, an empty command line.
    pub fn new(guest: GuestSource) -> Self {
        VmConfig {
            guest,
            mem_size: 64 << 20,
            vcpus: 1,
            paging: Paging::Shadow,
            timeout: None,
            cmdline: String::new(),
            machine_mem: None,
            host_tlb_flush: true,
            check: false,
            ksm: None,
            reclaim: None,
            host_ops: None,
        }
    }

    /// Checks the values a user can get wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_mem_size(self.mem_size)?;
        if self.vcpus == 0 || self.vcpus > abi::MAX_VCPUS {
            return Err(ConfigError::VcpusOutOfRange(self.vcpus));
        }
        if self.cmdline.len() >= abi::CMDLINE_MAX {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        if self.paging == Paging::Kvm {
            if self.ksm.is_some() {
                return Err(ConfigError::NeedsShadow("--ksm"));
            }
            if self.host_ops.is_some() {
                return Err(ConfigError::NeedsShadow("--host-ops"));
            }
            if self.reclaim.is_some() {
                return Err(ConfigError::NeedsShadow("--reclaim"));
            }
        }
        Ok(())
    }
}

fn check_mem_size(size: u64) -> Result<(), ConfigError> {
    if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&size) {
        return Err(ConfigError::MemOutOfRange {
            size: format_size(size),
        });
    }
    if !size.is_multiple_of(MEM_ALIGN) {
        return Err(ConfigError::MemUnaligned(format_size(size)));
    }
    Ok(())
}

/// Parses `64M`, `1G`, `4096K`, `67108864` (bytes) into a checked RAM size.
pub fn parse_mem_size(s: &str) -> Result<u64, ConfigError> {
    let mut t = s.trim();
    let bad = || ConfigError::BadSize(s.to_string());
    // Allow the "MiB" / "MB" spellings too.
    for suffix in ["iB", "ib", "B", "b"] {
        if let Some(rest) = t.strip_suffix(suffix) {
            t = rest;
            break;
        }
    }
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        Some(_) => (t, 0),
        None => return Err(bad()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| ConfigError::MemOutOfRange {
        size: s.trim().to_string(),
    })?;
    let size = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| ConfigError::MemOutOfRange {
            size: s.to_string(),
        })?;
    // Report the user's spelling.
    check_mem_size(size).map_err(|e| match e {
        ConfigError::MemOutOfRange { .. } => ConfigError::MemOutOfRange {
            size: s.trim().to_string(),
        },
        ConfigError::MemUnaligned(_) => ConfigError::MemUnaligned(s.trim().to_string()),
        other => other,
    })?;
    Ok(size)
}

/// Parses `10s`, `500ms`, `2m`, `1.5s` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let t = s.trim();
    let bad = || ConfigError::BadDuration(s.to_string());
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    let secs = v * scale;
    if !secs.is_finite() || secs <= 0.0 || secs > 365.0 * 86400.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `64M`, `1G`, or bytes.
pub fn format_size(size: u64) -> String {
    if size != 0 && size.is_multiple_of(1 << 30) {
        format!("{}G", size >> 30)
    } else if size != 0 && size.is_multiple_of(1 << 20) {
        format!("{}M", size >> 20)
    } else if size != 0 && size.is_multiple_of(1 << 10) {
        format!("{}K", size >> 10)
    } else {
        format!("{size} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_sizes() {
        assert_eq!(parse_mem_size("64M"), Ok(64 << 20));
        assert_eq!(parse_mem_size("64m"), Ok(64 << 20));
        assert_eq!(parse_mem_size("1G"), Ok(1 << 30));
        assert_eq!(parse_mem_size("4096K"), Ok(4 << 20));
        assert_eq!(parse_mem_size("128MiB"), Ok(128 << 20));
        assert_eq!(parse_mem_size("128MB"), Ok(128 << 20));
        assert_eq!(parse_mem_size("8388608"), Ok(8 << 20));
        assert_eq!(parse_mem_size(" 16M "), Ok(16 << 20));
    }

    #[test]
    fn bad_mem_sizes() {
        for s in ["", "M", "abc", "-5M", "1.5G", "64X", "0x10M", "128Mi"] {
            assert!(
                matches!(parse_mem_size(s), Err(ConfigError::BadSize(_))),
                "{s}"
            );
        }
        for s in [
            "0",
            "1M",
            "2M",
            "65G",
            "1T",
            "99999999999999999999G",
            "18446744073709551615G",
        ] {
            assert!(
                matches!(parse_mem_size(s), Err(ConfigError::MemOutOfRange { .. })),
                "{s}"
            );
        }
        assert_eq!(
            parse_mem_size("5M"),
            Err(ConfigError::MemUnaligned("5M".into()))
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        for s in ["", "s", "-1s", "0", "abc", "NaN", "inf"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }

    #[test]
    fn validate() {
        let mut c = VmConfig::new(GuestSource::Builtin("hello".into()));
        assert_eq!(c.validate(), Ok(()));
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::VcpusOutOfRange(0)));
        c.vcpus = abi::MAX_VCPUS + 1;
        assert!(c.validate().is_err());
        c.vcpus = 2;
        c.cmdline = "x".repeat(abi::CMDLINE_MAX);
        assert!(matches!(c.validate(), Err(ConfigError::CmdlineTooLong(_))));
        c.cmdline = "a\0b".into();
        assert_eq!(c.validate(), Err(ConfigError::CmdlineNul));
        c.cmdline.clear();
        c.ksm = Some(crate::mm::KsmConfig::default());
        assert_eq!(c.validate(), Ok(()));
        c.paging = Paging::Kvm;
        assert_eq!(c.validate(), Err(ConfigError::NeedsShadow("--ksm")));
        c.ksm = None;
        c.reclaim = Some(super::super::kswapd::ReclaimConfig::default());
        assert_eq!(c.validate(), Err(ConfigError::NeedsShadow("--reclaim")));
    }

    #[test]
    fn sizes_format() {
        assert_eq!(format_size(64 << 20), "64M");
        assert_eq!(format_size(2 << 30), "2G");
        assert_eq!(format_size(5000), "5000 bytes");
    }
}
