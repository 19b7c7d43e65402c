//! The built-in guests: ELF images that `build.rs` compiled from `guests/`
//! with the system C compiler, embedded with `include_bytes!`.

use std::path::PathBuf;

use super::config::GuestSource;

/// One built-in guest.
#[derive(Debug)]
pub struct EmbeddedGuest {
    /// `shadowvm run <name>`.
    pub name: &'static str,
    /// One line, from the first line of its source.
    pub description: &'static str,
    /// Test guests (`test-*`) are left out of `shadowvm guests`.
    pub hidden: bool,
    /// The ELF image.
    pub elf: &'static [u8],
}

// Defines `GUESTS` and `GUESTS_UNAVAILABLE`.
include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// The built-in guest called `name`.
pub fn find(name: &str) -> Option<&'static EmbeddedGuest> {
    GUESTS.iter().find(|g| g.name == name)
}

/// Built-in guests, test guests too if `include_hidden`.
pub fn list(include_hidden: bool) -> impl Iterator<Item = &'static EmbeddedGuest> {
    GUESTS.iter().filter(move |g| include_hidden || !g.hidden)
}

/// Why there are no built-in guests, if there are none.
pub fn unavailable_reason() -> Option<&'static str> {
    GUESTS_UNAVAILABLE
}

/// `shadowvm run ARG`: a built-in guest if one has that name, else a file.
pub fn resolve(arg: &str) -> GuestSource {
    if find(arg).is_some() {
        GuestSource::Builtin(arg.to_string())
    } else {
        GuestSource::File(PathBuf::from(arg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_valid_images() {
        if let Some(reason) = unavailable_reason() {
            let required = std::env::var("CI").is_ok_and(|v| v == "true")
                || std::env::var("SHADOWVM_REQUIRE_KVM").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "the built-in guests are missing ({reason}), but CI=true or SHADOWVM_REQUIRE_KVM=1 requires them"
            );
            eprintln!("skipping: {reason}");
            return;
        }
        for name in [
            "hello",
            "memtest",
            "pagetable",
            "test-triplefault",
            "test-spin",
            "test-badport",
        ] {
            let g = find(name).unwrap_or_else(|| panic!("built-in guest {name} missing"));
            crate::vmm::boot::loader::check_elf(g.elf, 4 << 20)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(list(false).all(|g| !g.hidden));
        assert!(list(true).any(|g| g.hidden));
        assert_eq!(resolve("hello"), GuestSource::Builtin("hello".into()));
        assert_eq!(
            resolve("x/hello.elf"),
            GuestSource::File("x/hello.elf".into())
        );
    }
}
