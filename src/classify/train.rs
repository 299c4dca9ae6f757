//! Multinomial logistic regression with an L2 penalty, fitted by full-batch L-BFGS.
//!
//! `tierd train` uses it to fit a linear softmax head over sentence embeddings, and the server
//! uses it at start to fit heads from a few example texts per label. The minimised objective is
//!
//! ```text
//! f(W, b) = (1/n) · Σ_i w_{y_i} · CE(W x_i + b, y_i) + (l2/2) · ‖W‖²_F
//! ```
//!
//! where CE is the softmax cross-entropy, `w_c` is 1 or, with `balance_classes`, the class weight
//! `n / (classes · count_c)`, and the bias is not penalised. Both weightings sum to `n` over the
//! samples, so the data term is a weighted mean.
//!
//! Relation to scikit-learn: according to its user guide on logistic regression,
//! `LogisticRegression(C=…)` minimises `C · Σ_i s_i · CE_i + ½‖W‖²_F` with sample weights `s_i`.
//! Its `class_weight="balanced"` uses the same `n / (classes · count_c)` weights. Both weightings
//! sum to `n`, so dividing by `C · n` gives the objective above, with `l2 = 1 / (C · n)` and
//! `C = 1 / (l2 · n)`.
//!
//! All arithmetic is f64. The result is bit-identical for the same input on any number of rayon
//! threads, because the data term is computed in fixed chunks of samples whose partial sums are
//! added in chunk order.

use std::collections::VecDeque;

use rayon::prelude::*;

/// Settings for [`train`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// Strength of the `(l2/2)·‖W‖²` penalty on the weights. The bias is not penalised.
    /// Must be finite and at least 0. With 0 and linearly separable data the weights grow
    /// without bound, so training stops without converging.
    pub l2: f64,
    /// Maximum number of L-BFGS iterations (accepted steps).
    pub max_iterations: usize,
    /// Training converges when the Euclidean norm of the objective's gradient, over weights and
    /// bias together, falls to this value or below. Must be finite and at least 0.
    pub tolerance: f64,
    /// Weights each sample's loss by `n / (classes · count_c)` so that every class contributes
    /// equally to the data term, as scikit-learn's `class_weight="balanced"` does.
    pub balance_classes: bool,
}

impl Default for TrainOptions {
    /// Defaults for unit-norm 384-d sentence embeddings, 2 to 200 classes and a few hundred to
    /// a few thousand samples:
    ///
    /// - `l2 = 1e-4`, which is scikit-learn's `C = 5` at n = 2000. Without class balancing the
    ///   optimum satisfies `‖W_c‖ ≤ 2 · (count_c / n) · max‖x‖ / l2`, because class `c`'s row
    ///   only receives its own share of the mean data gradient. The reachable weights, and with
    ///   them the logit gaps, therefore shrink as the number of classes grows. In synthetic
    ///   trials with unit-norm 384-d features, `l2 = 1e-3` flattened the probabilities of a
    ///   157-class task to a few percent even where the argmax was right, while with 2 classes
    ///   values below about 3e-4 began to fit noise. 1e-4 is a compromise between the two ends.
    /// - `tolerance = 1e-7`. Parameters can still be off by about `tolerance / l2` along weakly
    ///   curved directions. In synthetic trials with `l2 = 1e-4` the probabilities ended up
    ///   within about 1e-5 of those at the f64 limit (an estimate, not a bound).
    /// - `max_iterations = 1000`, well above the tens of iterations that such problems need.
    ///   Each iteration costs one pass over the data, plus one per backtracking step.
    /// - `balance_classes = false`, so the fitted probabilities follow the training class
    ///   frequencies, which is what calibration and confidence thresholds expect.
    ///
    /// NOTE: `l2` comes from the bound above and synthetic data, not from labelled tierd data.
    /// Sweep it (for example 1e-5 to 1e-2) with `tierd eval` on held-out samples when a task has
    /// enough of them. Heads fitted from a few examples per label need a larger `l2`, because
    /// each class then has a large share of the data.
    fn default() -> Self {
        Self {
            l2: 1e-4,
            max_iterations: 1000,
            tolerance: 1e-7,
            balance_classes: false,
        }
    }
}

/// A linear softmax classifier: `logits = W x + b`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearModel {
    /// Weight matrix, `classes × dim`, row-major.
    pub weight: Vec<f32>,
    /// One bias per class. Adding the same constant to every bias leaves the probabilities
    /// unchanged, so only the differences between biases carry meaning.
    pub bias: Vec<f32>,
    pub classes: usize,
    pub dim: usize,
}

impl LinearModel {
    /// Computes `W x + b` in f64 and rounds each logit to f32.
    ///
    /// # Panics
    ///
    /// Panics if `x.len() != self.dim`, or if `weight` or `bias` is shorter than `classes` and
    /// `dim` imply.
    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        let dim = self.dim;
        assert_eq!(
            x.len(),
            dim,
            "feature vector has {} values but the model expects {dim}",
            x.len()
        );
        (0..self.classes)
            .map(|class| {
                let row = &self.weight[class * dim..(class + 1) * dim];
                let mut sum = f64::from(self.bias[class]);
                for (&w, &v) in row.iter().zip(x) {
                    sum += f64::from(w) * f64::from(v);
                }
                sum as f32
            })
            .collect()
    }

    /// Computes the softmax of [`Self::logits`], shifted by the maximum logit so that large
    /// logits do not overflow. A NaN in `x` makes every probability NaN.
    ///
    /// # Panics
    ///
    /// Panics under the same conditions as [`Self::logits`].
    pub fn probabilities(&self, x: &[f32]) -> Vec<f32> {
        let logits = self.logits(x);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f64> = logits.iter().map(|&z| f64::from(z - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.iter().map(|&e| (e / sum) as f32).collect()
    }
}

/// The state of the optimiser when [`train`] returned.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// Accepted L-BFGS steps.
    pub iterations: usize,
    /// Final value of the objective, penalty included.
    pub loss: f64,
    /// Euclidean norm of the final gradient over weights and bias.
    pub gradient_norm: f64,
    /// Whether `gradient_norm` reached the tolerance. It is false when training stopped at
    /// `max_iterations`, or earlier because the loss stopped decreasing beyond f64 rounding,
    /// which happens when the tolerance is below what f64 allows for the problem.
    pub converged: bool,
}

/// Invalid input to [`train`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainError {
    #[error("no training samples")]
    NoSamples,
    #[error("a classifier needs at least 2 classes, got {classes}")]
    TooFewClasses { classes: usize },
    #[error("the feature dimension is 0")]
    ZeroDimension,
    #[error("expected {samples} samples × {dim} features, got {actual} feature values")]
    FeatureLength {
        samples: usize,
        dim: usize,
        actual: usize,
    },
    #[error("sample {sample} has label {label}, but there are only {classes} classes")]
    LabelOutOfRange {
        sample: usize,
        label: usize,
        classes: usize,
    },
    #[error("class {class} has no training samples; add examples for it or remove it")]
    EmptyClass { class: usize },
    #[error("sample {sample} has a non-finite value ({value}) at feature {feature}")]
    NonFiniteFeature {
        sample: usize,
        feature: usize,
        value: f32,
    },
    #[error("invalid l2 penalty {0}: it must be finite and at least 0")]
    InvalidL2(f64),
    #[error("invalid tolerance {0}: it must be finite and at least 0")]
    InvalidTolerance(f64),
}

/// Fits a [`LinearModel`] to `features` (`labels.len() × dim`, row-major) and `labels`
/// (class indices below `classes`), starting from all-zero parameters.
///
/// A class with no samples is an error because its weights would be driven to minus infinity
/// relative to the others. [`TrainError::EmptyClass`] names the lowest such class.
pub fn train(
    features: &[f32],
    labels: &[usize],
    classes: usize,
    dim: usize,
    options: &TrainOptions,
) -> Result<(LinearModel, TrainReport), TrainError> {
    validate(features, labels, classes, dim, options)?;
    let objective = Objective::new(features, labels, classes, dim, options);
    let (params, report) = minimize_lbfgs(&objective, options);

    let (weight, bias) = params.split_at(classes * dim);
    let model = LinearModel {
        weight: weight.iter().map(|&v| v as f32).collect(),
        bias: bias.iter().map(|&v| v as f32).collect(),
        classes,
        dim,
    };
    Ok((model, report))
}

fn validate(
    features: &[f32],
    labels: &[usize],
    classes: usize,
    dim: usize,
    options: &TrainOptions,
) -> Result<(), TrainError> {
    let samples = labels.len();
    if samples == 0 {
        return Err(TrainError::NoSamples);
    }
    if classes < 2 {
        return Err(TrainError::TooFewClasses { classes });
    }
    if dim == 0 {
        return Err(TrainError::ZeroDimension);
    }
    // `checked_mul` is `None` on overflow, which no slice length can match.
    if samples.checked_mul(dim) != Some(features.len()) {
        return Err(TrainError::FeatureLength {
            samples,
            dim,
            actual: features.len(),
        });
    }
    if !(options.l2.is_finite() && options.l2 >= 0.0) {
        return Err(TrainError::InvalidL2(options.l2));
    }
    if !(options.tolerance.is_finite() && options.tolerance >= 0.0) {
        return Err(TrainError::InvalidTolerance(options.tolerance));
    }

    let mut counts = vec![0usize; classes];
    for (sample, &label) in labels.iter().enumerate() {
        if label >= classes {
            return Err(TrainError::LabelOutOfRange {
                sample,
                label,
                classes,
            });
        }
        counts[label] += 1;
    }
    if let Some(class) = counts.iter().position(|&count| count == 0) {
        return Err(TrainError::EmptyClass { class });
    }

    for (index, value) in features.iter().enumerate() {
        if !value.is_finite() {
            return Err(TrainError::NonFiniteFeature {
                sample: index / dim,
                feature: index % dim,
                value: *value,
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Objective and gradient
// ---------------------------------------------------------------------------------------------

/// Samples per chunk of the data term. Fixed, so that the summation order and therefore the
/// result do not depend on the number of threads.
const CHUNK_SAMPLES: usize = 64;

/// Chunks evaluated in parallel before their partial sums are added, which bounds the memory for
/// partial gradients to this many gradient-sized buffers.
const CHUNKS_PER_ROUND: usize = 64;

/// The training objective over a flat parameter vector: the `classes × dim` weights row-major,
/// then the `classes` biases.
struct Objective {
    features: Vec<f64>,
    labels: Vec<usize>,
    /// Loss weight of each class, `w_c` in the module documentation.
    class_weights: Vec<f64>,
    classes: usize,
    dim: usize,
    l2: f64,
}

/// One chunk's contribution to the weighted loss sum and its gradient, before dividing by `n`.
struct ChunkSum {
    loss: f64,
    gradient: Vec<f64>,
}

impl Objective {
    fn new(
        features: &[f32],
        labels: &[usize],
        classes: usize,
        dim: usize,
        options: &TrainOptions,
    ) -> Self {
        let class_weights = if options.balance_classes {
            let mut counts = vec![0usize; classes];
            for &label in labels {
                counts[label] += 1;
            }
            let samples = labels.len() as f64;
            counts
                .iter()
                .map(|&count| samples / (classes as f64 * count as f64))
                .collect()
        } else {
            vec![1.0; classes]
        };
        Self {
            features: features.iter().map(|&v| f64::from(v)).collect(),
            labels: labels.to_vec(),
            class_weights,
            classes,
            dim,
            l2: options.l2,
        }
    }

    fn parameter_count(&self) -> usize {
        self.classes * (self.dim + 1)
    }

    /// Returns the objective at `params` and writes its gradient into `gradient`.
    fn evaluate(&self, params: &[f64], gradient: &mut [f64]) -> f64 {
        let samples = self.labels.len();
        let chunk_starts: Vec<usize> = (0..samples).step_by(CHUNK_SAMPLES).collect();

        gradient.fill(0.0);
        let mut loss_sum = 0.0;
        for round in chunk_starts.chunks(CHUNKS_PER_ROUND) {
            let sums: Vec<ChunkSum> = round
                .par_iter()
                .map(|&start| self.chunk_sum(params, start..(start + CHUNK_SAMPLES).min(samples)))
                .collect();
            // `collect` keeps chunk order, so this sum is the same on any number of threads.
            for sum in sums {
                loss_sum += sum.loss;
                add_assign(gradient, &sum.gradient);
            }
        }

        let scale = 1.0 / samples as f64;
        for g in gradient.iter_mut() {
            *g *= scale;
        }
        let weight_count = self.classes * self.dim;
        let mut penalty = 0.0;
        for (g, &w) in gradient[..weight_count]
            .iter_mut()
            .zip(&params[..weight_count])
        {
            *g += self.l2 * w;
            penalty += w * w;
        }
        loss_sum * scale + 0.5 * self.l2 * penalty
    }

    /// Sums the weighted cross-entropy and its gradient over the samples in `range`.
    ///
    /// The loops run class by class over the whole chunk, so one weight row stays in L1 cache
    /// while the chunk's features (64 × dim values) are read from L2. Each gradient element adds
    /// its samples in index order.
    fn chunk_sum(&self, params: &[f64], range: std::ops::Range<usize>) -> ChunkSum {
        let (classes, dim) = (self.classes, self.dim);
        let (weight, bias) = params.split_at(classes * dim);
        let features = &self.features[range.start * dim..range.end * dim];
        let labels = &self.labels[range];

        // Logits, `samples × classes`, row-major.
        let mut scores = vec![0.0; labels.len() * classes];
        for (class, (row, &b)) in weight.chunks_exact(dim).zip(bias).enumerate() {
            for (sample, x) in features.chunks_exact(dim).enumerate() {
                scores[sample * classes + class] = b + dot(row, x);
            }
        }

        // Replace each logit by the weighted residual d CE / d logit_c = w·(p_c − [c = label]).
        let mut loss = 0.0;
        for (logits, &label) in scores.chunks_exact_mut(classes).zip(labels) {
            let sample_weight = self.class_weights[label];
            let log_normalizer = log_sum_exp(logits);
            loss += sample_weight * (log_normalizer - logits[label]);
            for (class, value) in logits.iter_mut().enumerate() {
                let target = if class == label { 1.0 } else { 0.0 };
                *value = sample_weight * ((*value - log_normalizer).exp() - target);
            }
        }
        let residuals = scores;

        let mut gradient = vec![0.0; params.len()];
        let (weight_gradient, bias_gradient) = gradient.split_at_mut(classes * dim);
        let mut class_residuals = Vec::with_capacity(labels.len());
        for (class, row_gradient) in weight_gradient.chunks_mut(dim).enumerate() {
            class_residuals.clear();
            class_residuals.extend(residuals.iter().skip(class).step_by(classes));
            bias_gradient[class] = class_residuals.iter().sum();
            accumulate_row_gradient(features, &class_residuals, row_gradient);
        }
        ChunkSum { loss, gradient }
    }
}

/// Features per block in [`accumulate_row_gradient`], whose partial sums stay in registers.
const GRADIENT_BLOCK: usize = 32;

/// Sets `row_gradient` to `Σ_i residuals[i] · x_i` over the chunk's feature rows `x_i`, adding
/// the samples in index order. Each block of [`GRADIENT_BLOCK`] features is summed in registers
/// over all samples before it is stored, which is faster than one `y += r·x` pass per sample.
fn accumulate_row_gradient(features: &[f64], residuals: &[f64], row_gradient: &mut [f64]) {
    let dim = row_gradient.len();
    let mut blocks = row_gradient.chunks_exact_mut(GRADIENT_BLOCK);
    let mut offset = 0;
    for block in &mut blocks {
        let mut sums = [0.0f64; GRADIENT_BLOCK];
        for (x, &residual) in features.chunks_exact(dim).zip(residuals) {
            let x_block = &x[offset..offset + GRADIENT_BLOCK];
            for (sum, &value) in sums.iter_mut().zip(x_block) {
                *sum += residual * value;
            }
        }
        block.copy_from_slice(&sums);
        offset += GRADIENT_BLOCK;
    }

    let tail = blocks.into_remainder();
    for (x, &residual) in features.chunks_exact(dim).zip(residuals) {
        for (sum, &value) in tail.iter_mut().zip(&x[offset..]) {
            *sum += residual * value;
        }
    }
}

fn log_sum_exp(values: &[f64]) -> f64 {
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = values.iter().map(|&v| (v - max).exp()).sum();
    max + sum.ln()
}

/// Number of interleaved partial sums in [`dot`], enough independent accumulators to hide the
/// latency of vector adds with AVX2 or AVX-512.
const DOT_LANES: usize = 16;

/// Dot product with [`DOT_LANES`] interleaved partial sums, so the compiler can vectorise it.
/// The summation order is fixed, so the result does not depend on the machine's vector width.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut partial = [0.0f64; DOT_LANES];
    let mut a_chunks = a.chunks_exact(DOT_LANES);
    let mut b_chunks = b.chunks_exact(DOT_LANES);
    for (x, y) in (&mut a_chunks).zip(&mut b_chunks) {
        for lane in 0..DOT_LANES {
            partial[lane] += x[lane] * y[lane];
        }
    }
    let mut sum = 0.0;
    for value in partial {
        sum += value;
    }
    for (x, y) in a_chunks.remainder().iter().zip(b_chunks.remainder()) {
        sum += x * y;
    }
    sum
}

/// `y += alpha · x`.
fn axpy(alpha: f64, x: &[f64], y: &mut [f64]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

fn add_assign(target: &mut [f64], source: &[f64]) {
    for (t, &s) in target.iter_mut().zip(source) {
        *t += s;
    }
}

fn norm(v: &[f64]) -> f64 {
    dot(v, v).sqrt()
}

// ---------------------------------------------------------------------------------------------
// L-BFGS
// ---------------------------------------------------------------------------------------------

/// Number of (step, gradient change) pairs that L-BFGS keeps.
const LBFGS_MEMORY: usize = 10;

/// Armijo sufficient-decrease constant.
const ARMIJO_C1: f64 = 1e-4;

/// Backtracking steps before a line search gives up. Each shrinks the step at least 2-fold, so
/// the last trial step is below 1e-12 of the first.
const MAX_BACKTRACKS: usize = 40;

/// A decrease of the loss by less than this fraction of its magnitude (about 45 × f64::EPSILON)
/// counts as a stalled iteration, because rounding in the sum over samples is of that order.
const STALL_RELATIVE_DECREASE: f64 = 1e-14;

/// Consecutive stalled iterations after which training stops without converging.
const STALL_ITERATIONS: usize = 10;

/// One L-BFGS correction pair: `s = x_{k+1} − x_k`, `y = g_{k+1} − g_k`, `rho = 1 / (s·y)`.
struct CorrectionPair {
    s: Vec<f64>,
    y: Vec<f64>,
    rho: f64,
}

struct History {
    pairs: VecDeque<CorrectionPair>,
}

impl History {
    fn new() -> Self {
        Self {
            pairs: VecDeque::with_capacity(LBFGS_MEMORY),
        }
    }

    /// Stores a pair unless `s·y` is too small for a positive-definite update. On this convex
    /// objective `s·y ≥ 0` always, and it is 0 only along directions with no curvature.
    fn push(&mut self, s: Vec<f64>, y: Vec<f64>) {
        let sy = dot(&s, &y);
        if sy.is_nan() || sy <= f64::EPSILON * dot(&y, &y) {
            return;
        }
        if self.pairs.len() == LBFGS_MEMORY {
            self.pairs.pop_front();
        }
        self.pairs.push_back(CorrectionPair {
            s,
            y,
            rho: 1.0 / sy,
        });
    }

    /// Computes the search direction `−H g` with the two-loop recursion, where `H` is the
    /// L-BFGS approximation of the inverse Hessian, scaled by `s·y / y·y` of the newest pair.
    /// Without pairs, `H` is the identity.
    fn direction(&self, gradient: &[f64]) -> Vec<f64> {
        let mut q = gradient.to_vec();
        let mut alphas = vec![0.0; self.pairs.len()];
        for (pair, alpha) in self.pairs.iter().zip(alphas.iter_mut()).rev() {
            *alpha = pair.rho * dot(&pair.s, &q);
            axpy(-*alpha, &pair.y, &mut q);
        }
        if let Some(newest) = self.pairs.back() {
            let gamma = 1.0 / (newest.rho * dot(&newest.y, &newest.y));
            for v in q.iter_mut() {
                *v *= gamma;
            }
        }
        for (pair, &alpha) in self.pairs.iter().zip(&alphas) {
            let beta = pair.rho * dot(&pair.y, &q);
            axpy(alpha - beta, &pair.s, &mut q);
        }
        for v in q.iter_mut() {
            *v = -*v;
        }
        q
    }
}

/// Minimises `objective` from zero with L-BFGS and a backtracking Armijo line search.
///
/// Stops when the gradient norm reaches the tolerance, after `max_iterations`, when the line
/// search finds no decrease even along the steepest descent direction, or after
/// [`STALL_ITERATIONS`] iterations in a row that lower the loss only at rounding level. Near the
/// optimum of a badly conditioned problem (small `l2`), the last case keeps a tolerance that f64
/// cannot reach from running to `max_iterations` with dozens of loss evaluations per iteration.
fn minimize_lbfgs(objective: &Objective, options: &TrainOptions) -> (Vec<f64>, TrainReport) {
    let parameter_count = objective.parameter_count();
    let mut params = vec![0.0; parameter_count];
    let mut gradient = vec![0.0; parameter_count];
    let mut loss = objective.evaluate(&params, &mut gradient);
    let mut gradient_norm = norm(&gradient);

    let mut history = History::new();
    let mut trial_params = vec![0.0; parameter_count];
    let mut trial_gradient = vec![0.0; parameter_count];
    let mut iterations = 0;
    let mut stalled_iterations = 0;

    while gradient_norm > options.tolerance
        && iterations < options.max_iterations
        && stalled_iterations < STALL_ITERATIONS
    {
        let mut direction = history.direction(&gradient);
        let mut slope = dot(&gradient, &direction);
        if slope.is_nan() || slope >= 0.0 {
            // Rounding can make the quasi-Newton direction fail to descend. Restart from the
            // steepest descent direction.
            history.pairs.clear();
            direction = gradient.iter().map(|&g| -g).collect();
            slope = -gradient_norm * gradient_norm;
        }
        // A quasi-Newton step is well scaled at 1, but a steepest-descent step is not, so it
        // starts with a step of length at most 1.
        let initial_step = if history.pairs.is_empty() {
            (1.0 / gradient_norm).min(1.0)
        } else {
            1.0
        };

        let search = LineSearch {
            objective,
            params: &params,
            loss,
            direction: &direction,
            slope,
        };
        let Some(trial_loss) = search.run(initial_step, &mut trial_params, &mut trial_gradient)
        else {
            if history.pairs.is_empty() {
                // Steepest descent found no decrease either, so the loss is flat to rounding.
                break;
            }
            history.pairs.clear();
            continue;
        };

        let s: Vec<f64> = trial_params
            .iter()
            .zip(&params)
            .map(|(a, b)| a - b)
            .collect();
        let y: Vec<f64> = trial_gradient
            .iter()
            .zip(&gradient)
            .map(|(a, b)| a - b)
            .collect();
        history.push(s, y);
        std::mem::swap(&mut params, &mut trial_params);
        std::mem::swap(&mut gradient, &mut trial_gradient);
        if loss - trial_loss < STALL_RELATIVE_DECREASE * loss.abs().max(1.0) {
            stalled_iterations += 1;
        } else {
            stalled_iterations = 0;
        }
        loss = trial_loss;
        gradient_norm = norm(&gradient);
        iterations += 1;
    }

    let report = TrainReport {
        iterations,
        loss,
        gradient_norm,
        converged: gradient_norm <= options.tolerance,
    };
    (params, report)
}

/// A backtracking line search along `direction` from `params`.
struct LineSearch<'a> {
    objective: &'a Objective,
    params: &'a [f64],
    loss: f64,
    direction: &'a [f64],
    /// Directional derivative `g·direction`, negative.
    slope: f64,
}

impl LineSearch<'_> {
    /// Finds a step that satisfies the Armijo condition and leaves the new point and its
    /// gradient in `trial_params` and `trial_gradient`. Returns the new loss, or `None` if no
    /// step within [`MAX_BACKTRACKS`] decreases the loss enough.
    fn run(
        &self,
        initial_step: f64,
        trial_params: &mut [f64],
        trial_gradient: &mut [f64],
    ) -> Option<f64> {
        let mut step = initial_step;
        for _ in 0..MAX_BACKTRACKS {
            for ((t, &p), &d) in trial_params.iter_mut().zip(self.params).zip(self.direction) {
                *t = p + step * d;
            }
            let trial_loss = self.objective.evaluate(trial_params, trial_gradient);
            if trial_loss <= self.loss + ARMIJO_C1 * step * self.slope {
                return Some(trial_loss);
            }

            // Minimiser of the quadratic through the loss at 0 and at `step` with the slope at 0,
            // kept within [0.1, 0.5] of the current step. A NaN or infinite loss halves the step.
            let curvature = trial_loss - self.loss - self.slope * step;
            let next = -self.slope * step * step / (2.0 * curvature);
            step = if next.is_finite() {
                next.clamp(0.1 * step, 0.5 * step)
            } else {
                0.5 * step
            };
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn random_problem(
        samples: usize,
        dim: usize,
        classes: usize,
        seed: u64,
    ) -> (Vec<f32>, Vec<usize>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let features = (0..samples * dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        // Every class gets at least one sample.
        let labels = (0..samples)
            .map(|i| {
                if i < classes {
                    i
                } else {
                    rng.random_range(0..classes)
                }
            })
            .collect();
        (features, labels)
    }

    fn argmax(values: &[f32]) -> usize {
        let mut best = 0;
        for (i, &v) in values.iter().enumerate() {
            if v > values[best] {
                best = i;
            }
        }
        best
    }

    fn weight_bits(model: &LinearModel) -> Vec<u32> {
        model
            .weight
            .iter()
            .chain(&model.bias)
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn separable_toy_set_fits_exactly() -> TestResult {
        // Three well-separated clusters of four points in 2-D.
        let centers = [(3.0f32, 0.0f32), (-2.0, 2.5), (-2.0, -2.5)];
        let offsets = [(0.4f32, 0.3f32), (-0.3, 0.4), (0.2, -0.5), (-0.5, -0.2)];
        let mut features = Vec::new();
        let mut labels = Vec::new();
        for (class, &(cx, cy)) in centers.iter().enumerate() {
            for &(dx, dy) in &offsets {
                features.extend([cx + dx, cy + dy]);
                labels.push(class);
            }
        }

        let (model, report) = train(&features, &labels, 3, 2, &TrainOptions::default())?;

        assert!(report.converged, "{report:?}");
        for (x, &label) in features.chunks_exact(2).zip(&labels) {
            assert_eq!(argmax(&model.logits(x)), label, "sample {x:?}");
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (features, labels) = random_problem(23, 4, 3, 7);
        let options = TrainOptions {
            l2: 0.3,
            balance_classes: true,
            ..TrainOptions::default()
        };
        let objective = Objective::new(&features, &labels, 3, 4, &options);
        let mut rng = StdRng::seed_from_u64(11);
        let params: Vec<f64> = (0..objective.parameter_count())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let mut gradient = vec![0.0; params.len()];
        objective.evaluate(&params, &mut gradient);

        // Central differences have error O(h²) ≈ 1e-10 plus rounding ≈ 1e-16 / h ≈ 1e-11.
        let h = 1e-5;
        let mut scratch = vec![0.0; params.len()];
        for i in 0..params.len() {
            let mut plus = params.clone();
            plus[i] += h;
            let mut minus = params.clone();
            minus[i] -= h;
            let estimate = (objective.evaluate(&plus, &mut scratch)
                - objective.evaluate(&minus, &mut scratch))
                / (2.0 * h);
            assert!(
                (estimate - gradient[i]).abs() < 1e-8,
                "parameter {i}: analytic {} vs finite difference {estimate}",
                gradient[i]
            );
        }
    }

    #[test]
    fn results_identical_across_runs_and_threads() -> TestResult {
        // 300 samples make five chunks, so the pools really split the work.
        let (features, labels) = random_problem(300, 16, 5, 3);
        let options = TrainOptions {
            max_iterations: 50,
            ..TrainOptions::default()
        };
        let run = || train(&features, &labels, 5, 16, &options);

        let (first, first_report) = run()?;
        let (second, second_report) = run()?;
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()?
            .install(run)?;
        let two_threads = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()?
            .install(run)?;

        assert_eq!(weight_bits(&first), weight_bits(&second));
        assert_eq!(first_report.loss.to_bits(), second_report.loss.to_bits());
        assert_eq!(weight_bits(&first), weight_bits(&one_thread.0));
        assert_eq!(weight_bits(&first), weight_bits(&two_threads.0));
        assert_eq!(first_report.loss.to_bits(), one_thread.1.loss.to_bits());
        assert_eq!(first_report.loss.to_bits(), two_threads.1.loss.to_bits());
        Ok(())
    }

    #[test]
    fn large_l2_shrinks_weights() -> TestResult {
        let (features, labels) = random_problem(200, 8, 3, 5);
        let weak = TrainOptions {
            l2: 1e-3,
            ..TrainOptions::default()
        };
        let strong = TrainOptions {
            l2: 100.0,
            ..TrainOptions::default()
        };

        let (weak_model, weak_report) = train(&features, &labels, 3, 8, &weak)?;
        let (strong_model, strong_report) = train(&features, &labels, 3, 8, &strong)?;

        let max_abs = |m: &LinearModel| m.weight.iter().fold(0.0f32, |a, &w| a.max(w.abs()));
        assert!(weak_report.converged, "{weak_report:?}");
        assert!(strong_report.converged, "{strong_report:?}");
        // At the optimum l2·W = −∇CE, and each entry of ∇CE is at most max|x| = 1 in size,
        // so no strong-penalty weight can exceed 1 / 100.
        assert!(max_abs(&strong_model) <= 0.01, "{:?}", strong_model.weight);
        assert!(max_abs(&strong_model) < 0.01 * max_abs(&weak_model));
        Ok(())
    }

    /// Fits binary logistic regression `σ(w x + b)` with penalty `(lambda/2)·w²` on the mean
    /// loss by Newton's method, independently of the L-BFGS code.
    fn newton_binary_1d(x: &[f64], y: &[f64], lambda: f64) -> (f64, f64) {
        let n = x.len() as f64;
        let (mut w, mut b) = (0.0f64, 0.0f64);
        for _ in 0..100 {
            let (mut gw, mut gb) = (lambda * w, 0.0);
            let (mut hww, mut hwb, mut hbb) = (lambda, 0.0, 0.0);
            for (&xi, &yi) in x.iter().zip(y) {
                let p = 1.0 / (1.0 + (-(w * xi + b)).exp());
                gw += (p - yi) * xi / n;
                gb += (p - yi) / n;
                let v = p * (1.0 - p) / n;
                hww += v * xi * xi;
                hwb += v * xi;
                hbb += v;
            }
            let det = hww * hbb - hwb * hwb;
            w -= (hbb * gw - hwb * gb) / det;
            b -= (hww * gb - hwb * gw) / det;
        }
        (w, b)
    }

    #[test]
    fn two_class_1d_matches_newton_solution() -> TestResult {
        // Overlapping classes, so the optimum is finite even with a small penalty.
        let x = [
            -2.0f32, -1.5, -1.0, -0.5, 0.0, 0.3, 0.5, 1.0, 1.5, 2.0, -0.2, 0.8,
        ];
        let labels = [0usize, 0, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1];
        let l2 = 0.05;
        let options = TrainOptions {
            l2,
            tolerance: 1e-11,
            ..TrainOptions::default()
        };

        let (model, report) = train(&x, &labels, 2, 1, &options)?;

        // With a softmax over two classes only the differences w = w1 − w0 and b = b1 − b0
        // matter. The penalty gradient makes w0 = −w1 at the optimum, so the softmax penalty
        // (l2/2)(w0² + w1²) equals (l2/4)·w², a binary penalty (lambda/2)·w² with lambda = l2/2.
        let xs: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let ys: Vec<f64> = labels.iter().map(|&l| l as f64).collect();
        let (w, b) = newton_binary_1d(&xs, &ys, l2 / 2.0);

        assert!(report.converged, "{report:?}");
        let w_diff = f64::from(model.weight[1]) - f64::from(model.weight[0]);
        let b_diff = f64::from(model.bias[1]) - f64::from(model.bias[0]);
        assert!((w_diff - w).abs() < 1e-6, "w: L-BFGS {w_diff}, Newton {w}");
        assert!((b_diff - b).abs() < 1e-6, "b: L-BFGS {b_diff}, Newton {b}");
        assert!(
            (f64::from(model.weight[0]) + f64::from(model.weight[1])).abs() < 1e-6,
            "{:?}",
            model.weight
        );
        Ok(())
    }

    #[test]
    fn balanced_weights_favour_minority_class() -> TestResult {
        // Eight samples of class 0 and two of class 1 on the same overlapping interval.
        let x = [-1.0f32, -0.5, 0.0, 0.5, 1.0, -0.8, 0.2, 0.7, 0.1, 0.9];
        let labels = [0usize, 0, 0, 0, 0, 0, 0, 0, 1, 1];
        let plain = TrainOptions::default();
        let balanced = TrainOptions {
            balance_classes: true,
            ..TrainOptions::default()
        };

        let (plain_model, _) = train(&x, &labels, 2, 1, &plain)?;
        let (balanced_model, _) = train(&x, &labels, 2, 1, &balanced)?;

        let p1 = |m: &LinearModel| m.probabilities(&[0.5])[1];
        assert!(p1(&plain_model) < 0.5, "plain p1 = {}", p1(&plain_model));
        assert!(p1(&balanced_model) > p1(&plain_model));
        Ok(())
    }

    #[test]
    fn probabilities_stable_for_large_logits() {
        let model = LinearModel {
            weight: vec![0.0, 0.0, 0.0],
            bias: vec![1000.0, 990.0, -1000.0],
            classes: 3,
            dim: 1,
        };

        let p = model.probabilities(&[0.0]);

        assert!(p.iter().all(|v| v.is_finite()), "{p:?}");
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{p:?}");
        assert!((p[1] - (-10.0f32).exp()).abs() < 1e-7, "{p:?}");
        assert_eq!(p[2], 0.0);
    }

    #[test]
    fn zero_iterations_report_initial_state() -> TestResult {
        let (features, labels) = random_problem(10, 3, 2, 1);
        let options = TrainOptions {
            max_iterations: 0,
            ..TrainOptions::default()
        };

        let (model, report) = train(&features, &labels, 2, 3, &options)?;

        assert_eq!(report.iterations, 0);
        assert!(!report.converged);
        // At zero parameters every class has probability 1/2.
        assert!(
            (report.loss - std::f64::consts::LN_2).abs() < 1e-12,
            "{report:?}"
        );
        assert!(model.weight.iter().all(|&w| w == 0.0));
        Ok(())
    }

    #[test]
    fn unreachable_tolerance_stops_early() -> TestResult {
        let (features, labels) = random_problem(50, 4, 3, 9);
        let options = TrainOptions {
            tolerance: 0.0,
            max_iterations: 100_000,
            ..TrainOptions::default()
        };

        let (_, report) = train(&features, &labels, 3, 4, &options)?;

        assert!(!report.converged, "{report:?}");
        assert!(report.iterations < 1000, "{report:?}");
        assert!(report.gradient_norm < 1e-7, "{report:?}");
        Ok(())
    }

    #[test]
    fn invalid_inputs_return_errors() {
        let features = [0.0f32, 1.0, 2.0, 3.0];
        let labels = [0usize, 1];
        let ok = TrainOptions::default();
        let err = |f: &[f32], l: &[usize], classes, dim, o: &TrainOptions| {
            train(f, l, classes, dim, o).err()
        };

        assert_eq!(err(&[], &[], 2, 2, &ok), Some(TrainError::NoSamples));
        assert_eq!(
            err(&features, &labels, 1, 2, &ok),
            Some(TrainError::TooFewClasses { classes: 1 })
        );
        assert_eq!(
            err(&features, &labels, 2, 0, &ok),
            Some(TrainError::ZeroDimension)
        );
        assert_eq!(
            err(&features[..3], &labels, 2, 2, &ok),
            Some(TrainError::FeatureLength {
                samples: 2,
                dim: 2,
                actual: 3
            })
        );
        assert_eq!(
            err(&features, &labels, 2, usize::MAX, &ok),
            Some(TrainError::FeatureLength {
                samples: 2,
                dim: usize::MAX,
                actual: 4
            })
        );
        assert_eq!(
            err(&features, &[0, 2], 2, 2, &ok),
            Some(TrainError::LabelOutOfRange {
                sample: 1,
                label: 2,
                classes: 2
            })
        );
        assert_eq!(
            err(&[0.0; 6], &[0, 2, 2], 3, 2, &ok),
            Some(TrainError::EmptyClass { class: 1 })
        );
        assert_eq!(
            err(&[0.0, 1.0, f32::INFINITY, 3.0], &labels, 2, 2, &ok),
            Some(TrainError::NonFiniteFeature {
                sample: 1,
                feature: 0,
                value: f32::INFINITY
            })
        );
        // NaN never compares equal, so this case is matched instead.
        assert!(matches!(
            err(&[0.0, 1.0, 2.0, f32::NAN], &labels, 2, 2, &ok),
            Some(TrainError::NonFiniteFeature {
                sample: 1,
                feature: 1,
                ..
            })
        ));
        for l2 in [-1e-9, f64::NAN, f64::INFINITY] {
            let options = TrainOptions {
                l2,
                ..TrainOptions::default()
            };
            assert!(
                matches!(
                    err(&features, &labels, 2, 2, &options),
                    Some(TrainError::InvalidL2(_))
                ),
                "l2 = {l2}"
            );
        }
        for tolerance in [-1.0, f64::NAN] {
            let options = TrainOptions {
                tolerance,
                ..TrainOptions::default()
            };
            assert!(
                matches!(
                    err(&features, &labels, 2, 2, &options),
                    Some(TrainError::InvalidTolerance(_))
                ),
                "tolerance = {tolerance}"
            );
        }
    }
}
