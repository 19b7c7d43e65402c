//! The states a guest page is drawn in, their order and their colours.

/// What a guest page is at one sample, lowest rank first: where one cell of
/// the picture covers several samples or pages, the highest rank wins
/// (`grid.rs`, `render.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum PageState {
    /// No host PTE: never touched, discarded (DONTNEED) or unmapped.
    NotPresent = 0,
    /// Mapped, with no Accessed bit seen since it was mapped.
    Present = 1,
    /// Mapped and seen young before, but not within the cold window (four
    /// kswapd aging passes): what reclaim evicts first.
    Cold = 2,
    /// Mapped, Accessed bit seen (host PTE or an spte) within the cold
    /// window; without aging, nothing clears the bits, so a page stays
    /// young once touched.
    Young = 3,
    /// Mapped to a stable KSM page, shared read-only.
    KsmShared = 4,
    /// In swap.
    SwappedOut = 5,
}

impl PageState {
    /// Every state, lowest rank first.
    pub const ALL: [PageState; 6] = [
        PageState::NotPresent,
        PageState::Present,
        PageState::Cold,
        PageState::Young,
        PageState::KsmShared,
        PageState::SwappedOut,
    ];

    /// The state stored as `v` (`self as u8`); unknown values are not present.
    pub fn from_u8(v: u8) -> PageState {
        Self::ALL
            .get(usize::from(v))
            .copied()
            .unwrap_or(PageState::NotPresent)
    }

    /// Its name in the legend.
    pub fn name(self) -> &'static str {
        match self {
            PageState::NotPresent => "not present",
            PageState::Present => "present",
            PageState::Cold => "cold",
            PageState::Young => "young",
            PageState::KsmShared => "KSM-shared",
            PageState::SwappedOut => "swapped out",
        }
    }

    /// Its colour, red, green, blue (colour-blind safe: Okabe and Ito's
    /// palette, grey for the two uneventful states).
    pub fn rgb(self) -> (u8, u8, u8) {
        match self {
            PageState::NotPresent => (0xf2, 0xf2, 0xf2),
            PageState::Present => (0xb0, 0xb0, 0xb0),
            PageState::Cold => (0x56, 0xb4, 0xe9),
            PageState::Young => (0x00, 0x9e, 0x73),
            PageState::KsmShared => (0xcc, 0x79, 0xa7),
            PageState::SwappedOut => (0xe6, 0x9f, 0x00),
        }
    }

    /// Its colour as SVG writes it (`#RRGGBB`).
    pub fn hex(self) -> String {
        let (r, g, b) = self.rgb();
        format!("#{r:02X}{g:02X}{b:02X}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_in_rank_order_with_distinct_colours() {
        let mut colours = std::collections::HashSet::new();
        for (i, s) in PageState::ALL.into_iter().enumerate() {
            assert_eq!(s as usize, i);
            assert_eq!(PageState::from_u8(s as u8), s);
            assert!(colours.insert(s.rgb()), "{} shares a colour", s.name());
        }
        assert_eq!(PageState::from_u8(200), PageState::NotPresent);
        assert!(PageState::SwappedOut > PageState::Young);
        assert_eq!(PageState::Young.hex(), "#009E73");
    }
}
