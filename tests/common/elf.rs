//! Guest images for tests: a minimal ELF around a piece of code, the code
//! written as assembly text and assembled at compile time (crosvm's
//! `global_asm_data!`), and a temporary file to run it from.

/// Defines `fn $name() -> &'static [u8]` returning the machine code of the
/// AT&T assembly lines given, assembled by the compiler.
///
/// ```ignore
/// guest_code! {
///     /// Writes `!` to the serial port, then exits with status 5.
///     fn exit5() {
///         "mov $0x3f8, %dx"
///         "mov $0x21, %al"
///         "out %al, (%dx)"
///     }
/// }
/// ```
macro_rules! guest_code {
    ($(#[$m:meta])* $vis:vis fn $name:ident() { $($asm:literal)+ }) => {
        // The code's length as a quad, then the code.
        std::arch::global_asm!(
            ".pushsection .rodata.shadowvm_guest_code,\"a\"",
            ".balign 8",
            concat!(".globl shadowvm_guest_code_", stringify!($name)),
            concat!(".hidden shadowvm_guest_code_", stringify!($name)),
            concat!("shadowvm_guest_code_", stringify!($name), ":"),
            ".quad 2f - 1f",
            "1:",
            $($asm,)+
            "2:",
            ".popsection",
            options(att_syntax)
        );
        $(#[$m])*
        $vis fn $name() -> &'static [u8] {
            unsafe extern "C" {
                #[link_name = concat!("shadowvm_guest_code_", stringify!($name))]
                static LEN: u64;
            }
            // SAFETY: the assembly above places the length of the code
            // right before it, in read-only data that lives as long as the
            // program.
            unsafe {
                let len = std::ptr::addr_of!(LEN);
                std::slice::from_raw_parts(len.add(1).cast::<u8>(), *len as usize)
            }
        }
    };
}
pub(crate) use guest_code;

guest_code! {
    /// Writes `!` to the serial port, then exits with status 5.
    pub fn exit5() {
        "mov $0x3f8, %dx"
        "mov $0x21, %al"
        "out %al, (%dx)"
        "mov $5, %al"
        "out %al, $0xf4"
    }
}

guest_code! {
    /// Halts with the HALT hypercall (`hlt` faults in ring 1, where every
    /// guest starts).
    pub fn halt() {
        "mov $0x102, %eax"
        "outl %eax, $0xf5"
    }
}

/// A minimal guest image: an x86-64 ELF executable with one RWX segment at
/// 2 MiB holding `code` (the entry point), `memsz` bytes long in memory.
pub fn tiny_elf(code: &[u8], memsz: u64) -> Vec<u8> {
    let mut e = vec![0u8; 64 + 56];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little-endian
    e[6] = 1; // version
    e[16] = 2; // ET_EXEC
    e[18] = 62; // x86-64
    e[20] = 1;
    e[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes()); // entry
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    e[52] = 64; // ehsize
    e[54] = 56; // phentsize
    e[56] = 1; // phnum
    e[64] = 1; // PT_LOAD
    e[68] = 7; // R W X
    e[72..80].copy_from_slice(&120u64.to_le_bytes()); // offset
    e[80..88].copy_from_slice(&0x20_0000u64.to_le_bytes()); // vaddr
    e[88..96].copy_from_slice(&0x20_0000u64.to_le_bytes()); // paddr
    e[96..104].copy_from_slice(&(code.len() as u64).to_le_bytes()); // filesz
    e[104..112].copy_from_slice(&memsz.max(code.len() as u64).to_le_bytes());
    e.extend_from_slice(code);
    e
}

/// Writes `bytes` to a fresh file in a per-process temporary directory.
pub fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("shadowvm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write temp file");
    path
}
