//! The machine facts a benchmark reports, so that results from two boxes can be compared: the
//! CPU model, the SIMD features the binary was built for and those the CPU has, the memory read
//! bandwidth, and the process's resident memory.

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `model name` of /proc/cpuinfo, or the architecture where that is missing.
    pub cpu: String,
    pub logical_cpus: usize,
    /// SIMD features the binary was compiled for (`-C target-cpu` or `target-feature`), which
    /// candle's quantized kernels are limited to.
    pub compiled_simd: Vec<&'static str>,
    /// SIMD features the CPU reports, which tierd's own kernels select at run time.
    pub cpu_simd: Vec<&'static str>,
}

impl Machine {
    pub fn describe() -> Self {
        Self {
            cpu: cpu_model(),
            logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            compiled_simd: compiled_simd(),
            cpu_simd: cpu_simd(),
        }
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

macro_rules! compiled_features {
    ($($feature:tt),*) => {{
        let mut features = Vec::new();
        $(if cfg!(target_feature = $feature) {
            features.push($feature);
        })*
        features
    }};
}

fn compiled_simd() -> Vec<&'static str> {
    compiled_features!("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vnni", "avxvnni", "neon", "dotprod", "i8mm")
}

#[cfg(target_arch = "x86_64")]
fn cpu_simd() -> Vec<&'static str> {
    let mut features = Vec::new();
    macro_rules! detect {
        ($($feature:tt),*) => {
            $(if std::is_x86_feature_detected!($feature) {
                features.push($feature);
            })*
        };
    }
    detect!("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vnni", "avxvnni");
    features
}

#[cfg(target_arch = "aarch64")]
fn cpu_simd() -> Vec<&'static str> {
    let mut features = Vec::new();
    macro_rules! detect {
        ($($feature:tt),*) => {
            $(if std::arch::is_aarch64_feature_detected!($feature) {
                features.push($feature);
            })*
        };
    }
    detect!("neon", "dotprod", "i8mm");
    features
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn cpu_simd() -> Vec<&'static str> {
    Vec::new()
}

/// Bytes the bandwidth measurement reads per pass: far larger than any CPU cache.
const BANDWIDTH_BYTES: usize = 256 << 20;

/// Measures how fast the current rayon pool reads memory, in bytes per second: the best of
/// `passes` parallel sums over a 256 MiB buffer. Decode speed is bounded by this figure divided by
/// the bytes of weights read per token.
pub fn read_bandwidth(passes: usize) -> f64 {
    let words = vec![1u64; BANDWIDTH_BYTES / 8];
    let mut best = 0.0f64;
    for _ in 0..passes.max(1) {
        let started = Instant::now();
        let sum: u64 = words
            .par_chunks(1 << 16)
            .map(|chunk| chunk.iter().fold(0u64, |sum, &word| sum.wrapping_add(word)))
            .sum();
        let seconds = started.elapsed().as_secs_f64();
        // The sum is checked so that the reads cannot be optimised away.
        if sum == words.len() as u64 {
            best = best.max(BANDWIDTH_BYTES as f64 / seconds);
        }
    }
    best
}

/// Returns the process's resident memory now and at its peak, in bytes, from
/// /proc/self/status, or `None` where that file does not exist.
pub fn resident_memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_names_a_cpu_and_its_features() {
        let machine = Machine::describe();
        assert!(!machine.cpu.is_empty());
        assert!(machine.logical_cpus >= 1);
        // Every feature the binary was compiled for must be present on the CPU running it.
        for feature in &machine.compiled_simd {
            assert!(machine.cpu_simd.contains(feature), "{feature} compiled in but not detected");
        }
    }

    #[test]
    fn resident_memory_peak_is_at_least_current() {
        if let Some((now, peak)) = resident_memory() {
            assert!(now > 0, "now {now}");
            assert!(peak >= now, "now {now}, peak {peak}");
        }
    }
}
