//! The large-folio and prefetch options `run` and `stress` share.

use shadowvm::mm::{ThpConfig, ThpEnabled};

/// `--host-thp`, `--host-mthp` and `--prefetch`.
#[derive(clap::Args)]
pub struct FolioArgs {
    /// Transparent huge pages for guest RAM (the host's
    /// transparent_hugepage/enabled): `always`, `madvise` or `never`.
    /// Guest RAM gets MADV_HUGEPAGE when on; in kvm mode the real host's
    /// THP backs it.
    #[arg(long, value_name = "POLICY", default_value = "never")]
    host_thp: ThpEnabled,

    /// Multi-size THP for guest RAM (--paging shadow): folio sizes an
    /// anonymous fault may allocate, e.g. `16K,64K` (8K to 2M).
    #[arg(long, value_name = "SIZES")]
    host_mthp: Option<String>,

    /// Guest PTEs the shadow MMU prefetches around a fault
    /// (`FNAME(pte_prefetch)`; 0 turns prefetch off).
    #[arg(long, value_name = "N", default_value_t = shadowvm::mmu::PTE_PREFETCH_NUM)]
    prefetch: usize,
}

impl FolioArgs {
    /// The host's folio sizes and the prefetch count; an error names the
    /// option.
    pub fn config(&self) -> anyhow::Result<(ThpConfig, usize)> {
        let mut thp = ThpConfig::pmd(self.host_thp);
        if let Some(sizes) = &self.host_mthp {
            thp.enable_sizes(sizes)
                .map_err(|e| anyhow::anyhow!("--host-mthp: {e}"))?;
        }
        anyhow::ensure!(
            self.prefetch <= 512,
            "--prefetch {} is more than the 512 entries of a page table",
            self.prefetch
        );
        Ok((thp, self.prefetch))
    }
}
