//! Transparent huge pages: the per-mm settings (Linux's
//! `/sys/kernel/mm/transparent_hugepage/enabled` and
//! `hugepages-<size>kB/enabled`), which folio orders an anonymous fault may
//! allocate in a VMA (`thp_vma_allowable_orders`), and the per-order
//! counters (`hugepages-<size>kB/stats/`).

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use super::pgtable::HPAGE_PMD_ORDER;
use super::vma::{MmapFlags, Vma};
use super::{Hva, PAGE_SHIFT, PAGE_SIZE};

/// `/sys/kernel/mm/transparent_hugepage/enabled`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ThpEnabled {
    /// Every anonymous VMA may get huge pages.
    Always,
    /// Only VMAs given `madvise(MADV_HUGEPAGE)`.
    Madvise,
    /// None (the default here, so nothing changes unless asked).
    #[default]
    Never,
}

/// `hugepages-<size>kB/enabled` for one folio size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderEnabled {
    Always,
    /// Follow the top-level [`ThpEnabled`] (Linux's default for the PMD
    /// size).
    Inherit,
    Madvise,
    /// Linux's default for every size but the PMD's.
    #[default]
    Never,
}

/// A bad THP setting, as a sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ThpConfigError {
    #[error("unknown THP policy {0:?} (expected always, madvise or never)")]
    Policy(String),
    #[error("folio size {0:?} is not one of 8K, 16K, 32K, 64K, 128K, 256K, 512K, 1M or 2M")]
    Size(String),
}

impl FromStr for ThpEnabled {
    type Err = ThpConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(Self::Always),
            "madvise" => Ok(Self::Madvise),
            "never" => Ok(Self::Never),
            _ => Err(ThpConfigError::Policy(s.to_string())),
        }
    }
}

/// The THP settings of one mm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ThpConfig {
    /// `transparent_hugepage/enabled`.
    pub enabled: ThpEnabled,
    /// `hugepages-<size>kB/enabled`, indexed by order (1 = 8 KiB up to
    /// [`HPAGE_PMD_ORDER`] = 2 MiB; index 0 is unused). The PMD size
    /// defaults to `Inherit`, the others to `Never`, as in Linux.
    pub orders: [OrderEnabled; HPAGE_PMD_ORDER as usize + 1],
}

impl ThpConfig {
    /// THP off: every fault maps one page (the default).
    pub const fn off() -> Self {
        let mut orders = [OrderEnabled::Never; HPAGE_PMD_ORDER as usize + 1];
        orders[HPAGE_PMD_ORDER as usize] = OrderEnabled::Inherit;
        Self {
            enabled: ThpEnabled::Never,
            orders,
        }
    }

    /// PMD-size THP with policy `enabled` (`--host-thp`), no other sizes.
    pub fn pmd(enabled: ThpEnabled) -> Self {
        Self {
            enabled,
            ..Self::off()
        }
    }

    /// Enables the folio sizes of a list such as `"16K,64K"` with
    /// `always` (`--host-mthp`); `2M` sets the PMD size to `always` too.
    pub fn enable_sizes(&mut self, list: &str) -> Result<(), ThpConfigError> {
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let order = parse_size_order(item)?;
            self.orders[order as usize] = OrderEnabled::Always;
        }
        Ok(())
    }

    /// Sets one order's policy.
    pub fn set_order(&mut self, order: u8, policy: OrderEnabled) {
        if let Some(o) = self.orders.get_mut(order as usize)
            && order > 0
        {
            *o = policy;
        }
    }

    /// Whether order `order` may be used in `vma` (`thp_vma_allowable_order`
    /// without the range checks).
    pub fn order_allowed(&self, order: u8, vma: &Vma) -> bool {
        if order == 0 || vma.flags.contains(MmapFlags::NOHUGEPAGE) {
            return false;
        }
        let advised = vma.flags.contains(MmapFlags::HUGEPAGE);
        match self.orders.get(order as usize).copied() {
            Some(OrderEnabled::Always) => true,
            Some(OrderEnabled::Madvise) => advised,
            Some(OrderEnabled::Inherit) => match self.enabled {
                ThpEnabled::Always => true,
                ThpEnabled::Madvise => advised,
                ThpEnabled::Never => false,
            },
            Some(OrderEnabled::Never) | None => false,
        }
    }

    /// The orders above 0 a fault at `addr` may try in `vma`, largest
    /// first: allowed by the settings, and the naturally aligned range of
    /// the order around `addr` inside the VMA (`thp_vma_suitable_order`).
    pub fn allowable_orders(&self, vma: &Vma, addr: Hva) -> Vec<u8> {
        (1..=HPAGE_PMD_ORDER)
            .rev()
            .filter(|&o| self.order_allowed(o, vma) && suitable(vma, addr, o))
            .collect()
    }

    /// Whether PMD-size (2 MiB) folios are enabled, always or on
    /// `MADV_HUGEPAGE`.
    pub fn pmd_enabled(&self) -> bool {
        match self.orders[HPAGE_PMD_ORDER as usize] {
            OrderEnabled::Always | OrderEnabled::Madvise => true,
            OrderEnabled::Inherit => self.enabled != ThpEnabled::Never,
            OrderEnabled::Never => false,
        }
    }

    /// Whether any order is enabled at all (cheap fast path).
    pub fn any_enabled(&self) -> bool {
        self.orders
            .iter()
            .enumerate()
            .skip(1)
            .any(|(o, p)| match p {
                OrderEnabled::Always | OrderEnabled::Madvise => true,
                OrderEnabled::Inherit => {
                    o == HPAGE_PMD_ORDER as usize && self.enabled != ThpEnabled::Never
                }
                OrderEnabled::Never => false,
            })
    }
}

/// `thp_vma_suitable_order`: the naturally aligned range of 2^`order` pages
/// around `addr` lies inside `vma`.
fn suitable(vma: &Vma, addr: Hva, order: u8) -> bool {
    let size = PAGE_SIZE << order;
    let start = addr & !(size - 1);
    start >= vma.start && start.checked_add(size).is_some_and(|e| e <= vma.end)
}

/// `"16K"` → order 2. Sizes from 8K to 2M (also in bytes or with `kB`).
pub fn parse_size_order(s: &str) -> Result<u8, ThpConfigError> {
    let bad = || ThpConfigError::Size(s.to_string());
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix("b").unwrap_or(&t);
    let (num, mult) = if let Some(n) = t.strip_suffix('k') {
        (n, 1u64 << 10)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 1u64 << 20)
    } else {
        (t, 1)
    };
    let bytes = num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(bad)?;
    if !bytes.is_power_of_two() || bytes < 2 * PAGE_SIZE {
        return Err(bad());
    }
    let order = (bytes.trailing_zeros() - PAGE_SHIFT) as u8;
    if order > HPAGE_PMD_ORDER {
        return Err(bad());
    }
    Ok(order)
}

/// The counters of one folio size (`hugepages-<size>kB/stats/`).
#[derive(Default, Debug)]
pub struct MthpCounters {
    /// Faults that got a folio of this size.
    pub anon_fault_alloc: AtomicU64,
    /// Faults that wanted this size but fell back (no contiguous run free,
    /// or the range no longer empty).
    pub anon_fault_fallback: AtomicU64,
    /// Folios of this size split.
    pub split: AtomicU64,
    /// Splits refused (pinned, or the folio lock taken).
    pub split_failed: AtomicU64,
    /// Folios of this size queued for a later split after a partial unmap.
    pub split_deferred: AtomicU64,
}

/// A copy of one size's counters.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MthpStatsSnapshot {
    pub size_kb: u64,
    pub anon_fault_alloc: u64,
    pub anon_fault_fallback: u64,
    pub split: u64,
    pub split_failed: u64,
    pub split_deferred: u64,
}

/// The counters of every order.
#[derive(Default, Debug)]
pub struct MthpStats(pub [MthpCounters; HPAGE_PMD_ORDER as usize + 1]);

impl MthpStats {
    pub fn get(&self, order: u8) -> &MthpCounters {
        &self.0[usize::from(order.min(HPAGE_PMD_ORDER))]
    }

    /// Every size from 8 KiB to 2 MiB.
    pub fn snapshot(&self) -> Vec<MthpStatsSnapshot> {
        (1..=HPAGE_PMD_ORDER)
            .map(|o| {
                let c = self.get(o);
                let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
                MthpStatsSnapshot {
                    size_kb: (PAGE_SIZE << o) >> 10,
                    anon_fault_alloc: l(&c.anon_fault_alloc),
                    anon_fault_fallback: l(&c.anon_fault_fallback),
                    split: l(&c.split),
                    split_failed: l(&c.split_failed),
                    split_deferred: l(&c.split_deferred),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vma(start: Hva, end: Hva, flags: MmapFlags) -> Vma {
        Vma {
            start,
            end,
            prot: super::super::Prot::READ | super::super::Prot::WRITE,
            flags,
        }
    }

    #[test]
    fn sizes_parse_to_orders() {
        assert_eq!(parse_size_order("16K"), Ok(2));
        assert_eq!(parse_size_order("64kB"), Ok(4));
        assert_eq!(parse_size_order("2M"), Ok(9));
        assert_eq!(parse_size_order("8192"), Ok(1));
        for bad in ["4K", "24K", "4M", "", "K", "x"] {
            assert!(parse_size_order(bad).is_err(), "{bad}");
        }
        let mut c = ThpConfig::off();
        c.enable_sizes("16K, 64K").unwrap();
        assert_eq!(c.orders[2], OrderEnabled::Always);
        assert_eq!(c.orders[4], OrderEnabled::Always);
        assert!(c.enable_sizes("3K").is_err());
        assert_eq!("madvise".parse(), Ok(ThpEnabled::Madvise));
        assert!("sometimes".parse::<ThpEnabled>().is_err());
    }

    #[test]
    fn orders_follow_the_policies_and_the_vma() {
        let off = ThpConfig::off();
        assert!(!off.any_enabled());
        let base = 0x4000_0000;
        let plain = vma(base, base + (4 << 20), MmapFlags::empty());
        let advised = vma(base, base + (4 << 20), MmapFlags::HUGEPAGE);
        assert!(off.allowable_orders(&plain, base).is_empty());

        let madvise = ThpConfig::pmd(ThpEnabled::Madvise);
        assert!(madvise.allowable_orders(&plain, base).is_empty());
        assert_eq!(madvise.allowable_orders(&advised, base), vec![9]);

        let mut mthp = ThpConfig::off();
        mthp.enable_sizes("16K,64K").unwrap();
        assert_eq!(mthp.allowable_orders(&plain, base + 0x5000), vec![4, 2]);
        // The 64 KiB range around the address sticks out of the VMA.
        let small = vma(base + 0x4000, base + 0xc000, MmapFlags::empty());
        assert_eq!(mthp.allowable_orders(&small, base + 0x5000), vec![2]);
        let no = vma(base, base + (4 << 20), MmapFlags::NOHUGEPAGE);
        assert!(mthp.allowable_orders(&no, base).is_empty());
    }
}
