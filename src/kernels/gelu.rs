//! GELU (tanh approximation) as llama.cpp's CPU backend computes it.
//!
//! For inputs in (-10, 10), ggml-cpu looks GELU up in a 65,536-entry f16 table indexed by the
//! input rounded to f16. Below that range it returns 0, and above it the input itself. The result is therefore
//! rounded to f16 twice, which tierd reproduces so that Gemma's logits match the reference.

use std::sync::OnceLock;

use half::f16;

const GELU_COEF_A: f32 = 0.044715;
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

fn gelu_exact(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x)).tanh())
}

fn table() -> &'static [f16] {
    static TABLE: OnceLock<Vec<f16>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| f16::from_f32(gelu_exact(f16::from_bits(bits).to_f32())))
            .collect()
    })
}

/// Computes `gelu(gate) * up` in place in `gate`.
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    let table = table();
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        let activated = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x
        } else {
            table[f16::from_f32(x).to_bits() as usize].to_f32()
        };
        *g = activated * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_matches_formula_within_f16() {
        let mut gate = vec![-12.0, -1.0, 0.0, 0.5, 3.0, 11.0];
        let expected: Vec<f32> = gate
            .iter()
            .map(|&x| if x <= -10.0 { 0.0 } else if x >= 10.0 { x } else { gelu_exact(x) })
            .collect();
        gelu_mul(&mut gate, &[1.0; 6]);
        for (got, want) in gate.iter().zip(&expected) {
            assert!((got - want).abs() <= want.abs() * 2e-3 + 1e-4, "{got} vs {want}");
        }
    }
}
