//! Run-time checks of the CPU's SIMD features, so that one binary serves every x86-64 machine.

/// Returns whether the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Returns whether the CPU has `vpdpbusd` and `vpdpwssd` on 256-bit registers through AVX-512
/// VNNI and VL, besides AVX2 and FMA.
// NOTE: CPUs with only AVX-VNNI (no AVX-512) take the AVX2 path.
#[cfg(target_arch = "x86_64")]
pub(super) fn has_vnni() -> bool {
    use std::sync::OnceLock;
    static VNNI: OnceLock<bool> = OnceLock::new();
    *VNNI.get_or_init(|| {
        has_avx2()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
    })
}
