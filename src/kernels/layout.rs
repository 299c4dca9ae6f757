//! Field-level views of candle's GGML block types, whose fields are private to candle.
//!
//! Each struct here repeats the `repr(C)` layout of one candle block (candle 0.11), so a slice
//! of candle blocks can be read or filled field by field. The compile-time assertions check
//! sizes and alignments against candle's types.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_1, BlockQ5_0, BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1};
use half::f16;

/// Elements per Q4_0/Q4_1/Q5_0/Q8_0/Q8_1 block.
pub const QK8: usize = 32;
/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

#[repr(C)]
pub struct Q5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

#[repr(C)]
pub struct Q4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}

#[repr(C)]
pub struct Q8_0 {
    pub d: f16,
    pub qs: [i8; QK8],
}

#[repr(C)]
pub struct Q8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; QK8],
}

/// Q4_K: eight 32-element sub-blocks with 6-bit scales and minimums packed in `scales`.
#[repr(C)]
pub struct Q4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// Q6_K: low four bits in `ql`, high two in `qh`, one signed scale per 16 elements.
#[repr(C)]
pub struct Q6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

#[repr(C)]
pub struct Q8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

/// A local struct with exactly the layout of a candle block type.
///
/// # Safety
/// `Self` and `Candle` must be `repr(C)` with the same field types in the same order, and every
/// bit pattern must be valid for both.
pub unsafe trait Mirrors: Sized {
    type Candle;
}

macro_rules! mirrors {
    ($local:ty, $candle:ty) => {
        const _: () = assert!(std::mem::size_of::<$local>() == std::mem::size_of::<$candle>());
        const _: () = assert!(std::mem::align_of::<$local>() == std::mem::align_of::<$candle>());
        // SAFETY: the struct above copies candle 0.11's field list for this block; the size and
        // alignment assertions catch a layout change in candle.
        unsafe impl Mirrors for $local {
            type Candle = $candle;
        }
    };
}

mirrors!(Q5_0, BlockQ5_0);
mirrors!(Q4_1, BlockQ4_1);
mirrors!(Q8_0, BlockQ8_0);
mirrors!(Q8_1, BlockQ8_1);
mirrors!(Q8K, BlockQ8K);
mirrors!(Q4K, BlockQ4K);
mirrors!(Q6K, BlockQ6K);

pub fn view<T: Mirrors>(blocks: &[T::Candle]) -> &[T] {
    // SAFETY: `Mirrors` guarantees identical layout and validity.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<T>(), blocks.len()) }
}

pub fn view_mut<T: Mirrors>(blocks: &mut [T::Candle]) -> &mut [T] {
    // SAFETY: `Mirrors` guarantees identical layout and validity.
    unsafe { std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast::<T>(), blocks.len()) }
}
