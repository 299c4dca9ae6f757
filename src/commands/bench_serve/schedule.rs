//! Send times of an open-loop run at a fixed mean request rate.

use std::time::Duration;

use rand::SeedableRng;
use rand_distr::{Distribution, Exp};

/// Spacing of the requests of an open-loop run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrivals {
    /// A Poisson process: exponentially distributed gaps with mean 1 / rate, drawn from a
    /// seeded generator, as independent users would send.
    Poisson,
    /// Exactly 1 / rate between requests.
    Uniform,
}

/// Returns the send time of each of `count` requests, as offsets from the start of the run.
/// The first request goes at 0. `rate` is in requests per second and must be positive.
pub fn send_offsets(arrivals: Arrivals, rate: f64, count: usize, seed: u64) -> Vec<Duration> {
    let gap = |seconds: f64| Duration::from_secs_f64(seconds.max(0.0));
    match arrivals {
        Arrivals::Uniform => (0..count).map(|index| gap(index as f64 / rate)).collect(),
        Arrivals::Poisson => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            // `rate` is positive and finite (checked when the arguments are read), which is
            // all `Exp::new` requires. Should that ever fail, 1 request per second is used.
            let exponential = Exp::new(rate).unwrap_or_else(|_| Exp::new(1.0).expect("1 is a valid rate"));
            let mut at = 0.0;
            (0..count)
                .map(|index| {
                    if index > 0 {
                        at += exponential.sample(&mut rng);
                    }
                    gap(at)
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_spacing_is_exact() {
        let offsets = send_offsets(Arrivals::Uniform, 4.0, 3, 0);
        assert_eq!(offsets, [Duration::ZERO, Duration::from_millis(250), Duration::from_millis(500)]);
    }

    #[test]
    fn poisson_gaps_average_one_over_rate() {
        let count = 20_000;
        let offsets = send_offsets(Arrivals::Poisson, 5.0, count, 7);
        assert_eq!(offsets[0], Duration::ZERO);
        assert!(offsets.windows(2).all(|pair| pair[0] <= pair[1]), "send times must not go back");
        let mean_gap = offsets[count - 1].as_secs_f64() / (count - 1) as f64;
        // The mean of 20,000 exponential gaps has a standard error of 0.7 % of the mean.
        assert!((mean_gap - 0.2).abs() < 0.2 * 0.03, "mean gap {mean_gap} s");
    }

    #[test]
    fn poisson_schedule_follows_the_seed() {
        let a = send_offsets(Arrivals::Poisson, 2.0, 50, 1);
        let b = send_offsets(Arrivals::Poisson, 2.0, 50, 1);
        let c = send_offsets(Arrivals::Poisson, 2.0, 50, 2);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
