//! Human-written sizes and durations (`--mem 64M`, `--timeout 500ms`) and
//! the guest RAM sizes the VMM accepts.

use std::time::Duration;

/// Smallest guest RAM: the 2 MiB VMM area plus room for an image.
pub const MIN_MEM_SIZE: u64 = 4 << 20;
/// Largest guest RAM we accept.
pub const MAX_MEM_SIZE: u64 = 64 << 30;
/// Guest RAM is mapped with 2 MiB pages above the VMM area.
pub const MEM_ALIGN: u64 = 2 << 20;

/// A size or duration that does not parse or is out of range. Each
/// carries the user's spelling, for the message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitError {
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
    /// A duration string did not parse.
    #[error(
        "invalid duration `{0}`: expected a number with an optional ms, s or m suffix, like 10s"
    )]
    BadDuration(String),
}

/// Checks a guest RAM size against the limits above.
pub fn check_mem_size(size: u64) -> Result<(), UnitError> {
    if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&size) {
        return Err(UnitError::MemOutOfRange {
            size: format_size(size),
        });
    }
    if !size.is_multiple_of(MEM_ALIGN) {
        return Err(UnitError::MemUnaligned(format_size(size)));
    }
    Ok(())
}

/// Parses `64M`, `1G`, `4096K`, `67108864` (bytes) into a checked RAM size.
pub fn parse_mem_size(s: &str) -> Result<u64, UnitError> {
    let mut t = s.trim();
    let bad = || UnitError::BadSize(s.to_string());
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
    let n: u64 = digits.parse().map_err(|_| UnitError::MemOutOfRange {
        size: s.trim().to_string(),
    })?;
    let size = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| UnitError::MemOutOfRange {
            size: s.to_string(),
        })?;
    // Report the user's spelling.
    check_mem_size(size).map_err(|e| match e {
        UnitError::MemOutOfRange { .. } => UnitError::MemOutOfRange {
            size: s.trim().to_string(),
        },
        UnitError::MemUnaligned(_) => UnitError::MemUnaligned(s.trim().to_string()),
        other => other,
    })?;
    Ok(size)
}

/// Parses `10s`, `500ms`, `2m`, `1.5s` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let t = s.trim();
    let bad = || UnitError::BadDuration(s.to_string());
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
                matches!(parse_mem_size(s), Err(UnitError::BadSize(_))),
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
                matches!(parse_mem_size(s), Err(UnitError::MemOutOfRange { .. })),
                "{s}"
            );
        }
        assert_eq!(
            parse_mem_size("5M"),
            Err(UnitError::MemUnaligned("5M".into()))
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
    fn sizes_format() {
        assert_eq!(format_size(64 << 20), "64M");
        assert_eq!(format_size(2 << 30), "2G");
        assert_eq!(format_size(5000), "5000 bytes");
    }
}
