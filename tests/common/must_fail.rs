//! A model that must fail, and fail for the right reason: shared by the
//! loom tests, which include this file by path (they do not build the
//! rest of `common`).

use std::panic::UnwindSafe;

/// Runs `model`, which must panic, and checks that its panic message
/// contains one of `reasons`: a broken variant must fail the way the bug it
/// stands for fails, not for some other reason.
pub fn assert_fails_with(model: impl FnOnce() + UnwindSafe, reasons: &[&str]) {
    let payload = std::panic::catch_unwind(model).expect_err("the model found no bug");
    let msg = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or_default();
    assert!(
        reasons.iter().any(|r| msg.contains(r)),
        "the model failed for another reason: {msg}"
    );
}
