//! Fault tolerance for requests to remote providers: bounded retries with jittered exponential
//! backoff, a retry budget and a circuit breaker per provider, and fallback along an ordered
//! chain of `(provider, model)` entries.
//!
//! How a request moves along the chain ([`Resilient::chat`] and [`Resilient::chat_stream`]):
//!
//! - An entry whose provider's breaker is open is skipped without being contacted.
//! - A retryable error ([`ProviderError::is_retryable`]: 408, 429, 5xx, timeouts, connection
//!   failures, cut streams) is retried at the same entry while the [`RetryPolicy`] allows
//!   another attempt, the breaker admits it and the provider's [`RetryBudget`] has room.
//!   Otherwise the request falls back to the next entry.
//! - HTTP 400, 413 and 422 end the chain at once, with no retry and no fallback, because they
//!   reject the request itself. Every provider would reject the same messages, and each
//!   fallback would send the caller's text to one more third party for nothing.
//! - Other non-retryable errors (401, 403, 404, a missing key, an unknown model, a malformed
//!   response) are faults of that provider's setup or reply, so they fall back without retry.
//! - A stream falls back only until [`Provider::chat_stream`] returns, which happens after the
//!   first chunk of the body arrived. After that the stream is returned as it is, and a later
//!   failure is its last item, an error, never a clean end. The breaker counts such a failure
//!   when it happens, and a clean end as a success.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::StatusCode;

use crate::providers::{ChatRequest, ChatResult, ChatStream, Provider, ProviderError, StreamEvent};

// ---------------------------------------------------------------------------------------------
// Clock
// ---------------------------------------------------------------------------------------------

/// Source of the current time for breakers and budgets, replaceable in tests.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> Instant;
}

/// The system's monotonic clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Locks `mutex`, taking the data of a poisoned lock, because every critical section here
/// leaves the state valid even when it panics halfway.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Retry policy
// ---------------------------------------------------------------------------------------------

/// Randomization of the backoff delay, so that clients that failed together do not retry
/// together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// The exponential delay itself, with no randomness.
    None,
    /// A delay drawn uniformly from `[0, d]`, where `d` is the exponential delay. It spreads
    /// retries the most, at the cost of some retries that follow the failure almost at once.
    Full,
    /// A delay drawn uniformly from `[d / 2, d]`, which keeps at least half of the backoff.
    Equal,
}

/// Bounded retries at one provider with exponential backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts at one chain entry, including the first; 1 disables retries.
    pub max_attempts: u32,
    /// Backoff before the first retry, before jitter. Retry `n` waits up to
    /// `base_delay * 2^(n - 1)`, capped by `max_delay`.
    pub base_delay: Duration,
    /// Cap on the backoff, and on a provider's `Retry-After`: a request to wait longer is
    /// not retried at that provider but falls back at once.
    pub max_delay: Duration,
    pub jitter: Jitter,
}

impl Default for RetryPolicy {
    /// Three attempts, 100 ms doubling up to 2 s, full jitter.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            jitter: Jitter::Full,
        }
    }
}

impl RetryPolicy {
    /// Returns the exponential delay before retry `retry` (1 for the first retry), before
    /// jitter and capped by `max_delay`.
    pub fn exponential_delay(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        self.base_delay
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }

    /// Returns the range that the jittered delay before retry `retry` is drawn from.
    pub fn delay_bounds(&self, retry: u32) -> (Duration, Duration) {
        let delay = self.exponential_delay(retry);
        match self.jitter {
            Jitter::None => (delay, delay),
            Jitter::Full => (Duration::ZERO, delay),
            Jitter::Equal => (delay / 2, delay),
        }
    }

    /// Draws the backoff before retry `retry` from [`delay_bounds`](Self::delay_bounds).
    pub fn backoff(&self, retry: u32) -> Duration {
        let (low, high) = self.delay_bounds(retry);
        if low >= high {
            return low;
        }
        let nanos = rand::rng().random_range(low.as_nanos()..=high.as_nanos());
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Returns the wait before retry `retry` after `error`, or `None` when `error` must not be
    /// retried here: it is not retryable, or its `Retry-After` exceeds `max_delay`.
    /// A `Retry-After` within `max_delay` replaces the backoff, with no jitter, because the
    /// provider named the time it expects to recover.
    pub fn retry_delay(&self, retry: u32, error: &ProviderError) -> Option<Duration> {
        if !error.is_retryable() {
            return None;
        }
        match error.retry_after() {
            Some(wait) if wait > self.max_delay => None,
            Some(wait) => Some(wait),
            None => Some(self.backoff(retry)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Retry budget
// ---------------------------------------------------------------------------------------------

/// Settings of a [`RetryBudget`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudgetConfig {
    /// Retries allowed per first attempt in the window, such as 0.2 for 20 %.
    pub ratio: f64,
    /// Retries allowed in the window on top of the ratio, so that a provider with little
    /// traffic can still retry.
    pub min_retries: u32,
    /// Length of the sliding window over which attempts are counted.
    pub window: Duration,
}

impl Default for RetryBudgetConfig {
    /// 20 % of the first attempts of the last 10 s, plus 10 retries.
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_retries: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// Number of buckets that the window is split into. Counts leave the window one bucket at a
/// time, so the window is exact to `window / BUDGET_BUCKETS`.
const BUDGET_BUCKETS: usize = 10;

#[derive(Debug, Default, Clone, Copy)]
struct BudgetBucket {
    /// Index of the `window / BUDGET_BUCKETS` slice since `origin` that the counts belong to.
    slot: u64,
    first_attempts: u64,
    retries: u64,
}

/// Limits the retries sent to one provider to `min_retries + ratio * first_attempts`, both
/// counted over the last `window`, so that an outage does not multiply the load on it.
/// Shared by all concurrent requests to the provider.
#[derive(Debug)]
pub struct RetryBudget {
    config: RetryBudgetConfig,
    clock: Arc<dyn Clock>,
    origin: Instant,
    buckets: Mutex<[BudgetBucket; BUDGET_BUCKETS]>,
    denied: AtomicU64,
}

impl RetryBudget {
    pub fn new(config: RetryBudgetConfig, clock: Arc<dyn Clock>) -> Self {
        let origin = clock.now();
        Self {
            config,
            clock,
            origin,
            buckets: Mutex::new([BudgetBucket::default(); BUDGET_BUCKETS]),
            denied: AtomicU64::new(0),
        }
    }

    /// Counts a first attempt, which adds `ratio` retries to the budget.
    pub fn record_first_attempt(&self) {
        let slot = self.current_slot();
        let mut buckets = lock(&self.buckets);
        current_bucket(&mut buckets, slot).first_attempts += 1;
    }

    /// Takes one retry from the budget and returns true, or returns false and counts a denial
    /// when the budget is spent.
    pub fn try_retry(&self) -> bool {
        let slot = self.current_slot();
        let mut buckets = lock(&self.buckets);

        let (first_attempts, retries) = window_totals(&buckets, slot);
        let allowed = f64::from(self.config.min_retries) + self.config.ratio * first_attempts as f64;
        if (retries as f64) < allowed {
            current_bucket(&mut buckets, slot).retries += 1;
            true
        } else {
            self.denied.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Returns the number of retries denied since the budget was created.
    pub fn denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }

    fn current_slot(&self) -> u64 {
        let bucket_nanos = (self.config.window.as_nanos() / BUDGET_BUCKETS as u128).max(1);
        let elapsed = self.clock.now().saturating_duration_since(self.origin).as_nanos();
        u64::try_from(elapsed / bucket_nanos).unwrap_or(u64::MAX)
    }
}

/// Returns the bucket of `slot`, emptying it first when it still contains the counts of an older slot.
fn current_bucket(buckets: &mut [BudgetBucket; BUDGET_BUCKETS], slot: u64) -> &mut BudgetBucket {
    let bucket = &mut buckets[(slot % BUDGET_BUCKETS as u64) as usize];
    if bucket.slot != slot {
        *bucket = BudgetBucket {
            slot,
            ..BudgetBucket::default()
        };
    }
    bucket
}

/// Sums the first attempts and retries of the buckets inside the window that ends at `slot`.
fn window_totals(buckets: &[BudgetBucket; BUDGET_BUCKETS], slot: u64) -> (u64, u64) {
    let oldest = slot.saturating_sub(BUDGET_BUCKETS as u64 - 1);
    buckets
        .iter()
        .filter(|bucket| bucket.slot >= oldest && bucket.slot <= slot)
        .fold((0, 0), |(first, retries), bucket| {
            (first + bucket.first_attempts, retries + bucket.retries)
        })
}

// ---------------------------------------------------------------------------------------------
// Circuit breaker
// ---------------------------------------------------------------------------------------------

/// Settings of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive retryable failures that open the breaker.
    pub failure_threshold: u32,
    /// Time the breaker stays open before it lets one probe request through.
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    /// Opens after 5 consecutive failures for 30 s.
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cooldown: Duration::from_secs(30),
        }
    }
}

/// State of a [`CircuitBreaker`], as reported by [`CircuitBreaker::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests pass; `failures` is the count of consecutive retryable failures.
    Closed { failures: u32 },
    /// Requests are rejected until `until`.
    Open { until: Instant },
    /// One probe request may pass, and `probing` is true while it is in flight.
    HalfOpen { probing: bool },
}

/// Skips a failing provider for a while. It opens after `failure_threshold` consecutive
/// retryable failures; after `cooldown` it admits a single probe, whose success closes it and
/// whose retryable failure reopens it. Non-retryable errors, such as a 400 that the caller
/// caused, neither count as failures nor reset the count.
#[derive(Debug)]
pub struct CircuitBreaker {
    provider: String,
    config: BreakerConfig,
    clock: Arc<dyn Clock>,
    state: Mutex<BreakerState>,
}

/// Permission from [`CircuitBreaker::try_acquire`] to send one request. Report its outcome
/// with [`success`](Self::success) or [`failure`](Self::failure). A probe permit dropped
/// without a report, such as by a cancelled request, frees the probe slot for the next request.
#[derive(Debug)]
pub struct BreakerPermit<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
    reported: bool,
}

impl CircuitBreaker {
    pub fn new(provider: impl Into<String>, config: BreakerConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            provider: provider.into(),
            config,
            clock,
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
        }
    }

    pub fn state(&self) -> BreakerState {
        *lock(&self.state)
    }

    /// Returns a permit when a request may be sent now, or `None` while the breaker is open or
    /// its half-open probe is in flight. The first call after the cooldown becomes the probe.
    pub fn try_acquire(&self) -> Option<BreakerPermit<'_>> {
        let mut state = lock(&self.state);
        let probe = match *state {
            BreakerState::Closed { .. } => false,
            BreakerState::HalfOpen { probing: true } => return None,
            BreakerState::HalfOpen { probing: false } => true,
            BreakerState::Open { until } => {
                if self.clock.now() < until {
                    return None;
                }
                tracing::info!(provider = %self.provider, "circuit breaker half-open: letting one probe request through");
                true
            }
        };
        if probe {
            *state = BreakerState::HalfOpen { probing: true };
        }
        Some(BreakerPermit {
            breaker: self,
            probe,
            reported: false,
        })
    }

    fn on_success(&self, probe: bool) {
        let mut state = lock(&self.state);
        match *state {
            BreakerState::Closed { .. } => *state = BreakerState::Closed { failures: 0 },
            BreakerState::HalfOpen { .. } if probe => {
                *state = BreakerState::Closed { failures: 0 };
                tracing::info!(provider = %self.provider, "circuit breaker closed: probe request succeeded");
            }
            // The outcome of a request admitted before the breaker opened is no evidence of
            // the provider's state since then.
            BreakerState::HalfOpen { .. } | BreakerState::Open { .. } => {}
        }
    }

    fn on_failure(&self, probe: bool, error: &ProviderError) {
        let mut state = lock(&self.state);
        if !error.is_retryable() {
            if probe && matches!(*state, BreakerState::HalfOpen { .. }) {
                *state = BreakerState::HalfOpen { probing: false };
            }
            return;
        }

        let until = self.clock.now() + self.config.cooldown;
        match *state {
            BreakerState::Closed { failures } => {
                let failures = failures + 1;
                if failures >= self.config.failure_threshold {
                    *state = BreakerState::Open { until };
                    tracing::warn!(
                        provider = %self.provider,
                        failures,
                        cooldown_ms = self.config.cooldown.as_millis() as u64,
                        error = %error,
                        "circuit breaker opened: provider failed repeatedly"
                    );
                } else {
                    *state = BreakerState::Closed { failures };
                }
            }
            BreakerState::HalfOpen { .. } if probe => {
                *state = BreakerState::Open { until };
                tracing::warn!(
                    provider = %self.provider,
                    cooldown_ms = self.config.cooldown.as_millis() as u64,
                    error = %error,
                    "circuit breaker reopened: probe request failed"
                );
            }
            BreakerState::HalfOpen { .. } | BreakerState::Open { .. } => {}
        }
    }

    fn on_abandoned_probe(&self) {
        let mut state = lock(&self.state);
        if *state == (BreakerState::HalfOpen { probing: true }) {
            *state = BreakerState::HalfOpen { probing: false };
        }
    }
}

impl BreakerPermit<'_> {
    /// Hands the report to a [`StreamOutcome`], for a request whose outcome is known only
    /// when its stream ends.
    fn defer(mut self, health: Arc<ProviderHealth>) -> StreamOutcome {
        self.reported = true;
        StreamOutcome {
            health,
            probe: self.probe,
            settled: false,
        }
    }

    pub fn success(mut self) {
        self.reported = true;
        self.breaker.on_success(self.probe);
    }

    /// Reports a failed request. Only retryable errors count towards opening the breaker.
    pub fn failure(mut self, error: &ProviderError) {
        self.reported = true;
        self.breaker.on_failure(self.probe, error);
    }
}

impl Drop for BreakerPermit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.reported {
            self.breaker.on_abandoned_probe();
        }
    }
}

/// The pending breaker report of a started stream: a success when the provider's terminal event
/// arrives, a failure when the stream fails, and an abandoned probe when the client drops the
/// stream first.
#[derive(Debug)]
struct StreamOutcome {
    health: Arc<ProviderHealth>,
    probe: bool,
    settled: bool,
}

impl StreamOutcome {
    fn observe(&mut self, item: &Result<StreamEvent, ProviderError>) {
        if self.settled {
            return;
        }
        match item {
            Ok(StreamEvent::Delta { .. }) => return,
            Ok(StreamEvent::Finished { .. }) => self.health.breaker.on_success(self.probe),
            Err(error) => self.health.breaker.on_failure(self.probe, error),
        }
        self.settled = true;
    }
}

impl Drop for StreamOutcome {
    fn drop(&mut self) {
        if self.probe && !self.settled {
            self.health.breaker.on_abandoned_probe();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Provider health and the fallback chain
// ---------------------------------------------------------------------------------------------

/// Settings of a [`Resilient`] chain and of the per-provider state that it creates.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ResilienceConfig {
    pub retry: RetryPolicy,
    pub budget: RetryBudgetConfig,
    pub breaker: BreakerConfig,
}

/// The breaker and retry budget of one provider.
#[derive(Debug)]
pub struct ProviderHealth {
    pub breaker: CircuitBreaker,
    pub budget: RetryBudget,
}

/// The [`ProviderHealth`] of each provider, by provider name, so that chains that share a
/// provider also share its breaker and budget.
#[derive(Debug, Clone)]
pub struct HealthRegistry {
    config: ResilienceConfig,
    clock: Arc<dyn Clock>,
    providers: Arc<Mutex<HashMap<String, Arc<ProviderHealth>>>>,
}

impl HealthRegistry {
    pub fn new(config: ResilienceConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    pub fn with_clock(config: ResilienceConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            config,
            clock,
            providers: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Returns the health of provider `name`, creating it on first use.
    pub fn get(&self, name: &str) -> Arc<ProviderHealth> {
        let mut providers = lock(&self.providers);
        providers
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(ProviderHealth {
                    breaker: CircuitBreaker::new(name, self.config.breaker, self.clock.clone()),
                    budget: RetryBudget::new(self.config.budget, self.clock.clone()),
                })
            })
            .clone()
    }
}

/// One entry of a fallback chain: a provider and the configured model `id` to request from it.
#[derive(Debug, Clone)]
pub struct ChainEntry {
    pub provider: Arc<Provider>,
    pub model: String,
}

impl ChainEntry {
    pub fn new(provider: Arc<Provider>, model: impl Into<String>) -> Self {
        Self {
            provider,
            model: model.into(),
        }
    }
}

/// Reason that one chain entry did not serve the request.
#[derive(Debug)]
pub enum FailureReason {
    /// The provider's circuit breaker was open, so it was not contacted.
    BreakerOpen,
    /// The last error of `attempts` attempts.
    Failed { error: ProviderError, attempts: u32 },
}

/// A chain entry that did not serve the request, and why.
#[derive(Debug)]
pub struct ProviderFailure {
    pub provider: String,
    pub model: String,
    pub reason: FailureReason,
}

impl fmt::Display for ProviderFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` (model `{}`): ", self.provider, self.model)?;
        match &self.reason {
            FailureReason::BreakerOpen => f.write_str("skipped because its circuit breaker is open"),
            FailureReason::Failed { error, attempts: 1 } => write!(f, "{error}"),
            FailureReason::Failed { error, attempts } => write!(f, "{error} (after {attempts} attempts)"),
        }
    }
}

/// The entry that served a request.
#[derive(Debug)]
pub struct Served {
    pub provider: String,
    pub model: String,
    /// Attempts at the serving entry, including the successful one.
    pub attempts: u32,
    /// Earlier entries of the chain, in order, with the reason each did not serve.
    pub fell_back_from: Vec<ProviderFailure>,
}

/// Failure of a whole chain.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("the fallback chain has no entries")]
    EmptyChain,

    /// A provider rejected the request itself (HTTP 400, 413 or 422), so it was neither retried
    /// nor sent to the remaining entries. `earlier` lists entries tried before it.
    #[error("provider `{provider}` rejected the request as invalid: {error}")]
    InvalidRequest {
        provider: String,
        model: String,
        error: ProviderError,
        earlier: Vec<ProviderFailure>,
    },

    /// Every entry failed or was skipped; `failures` follows the chain's order.
    #[error("every provider in the fallback chain failed: {}", join_failures(.failures))]
    AllFailed { failures: Vec<ProviderFailure> },
}

fn join_failures(failures: &[ProviderFailure]) -> String {
    failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Returns whether `error` rejects the request itself, which any provider would also reject.
fn is_invalid_request(error: &ProviderError) -> bool {
    matches!(
        error,
        ProviderError::Status { status, .. }
            if *status == StatusCode::BAD_REQUEST
                || *status == StatusCode::PAYLOAD_TOO_LARGE
                || *status == StatusCode::UNPROCESSABLE_ENTITY
    )
}

/// Outcome of all attempts at one chain entry.
enum EntryOutcome<T> {
    Served {
        value: T,
        attempts: u32,
        deferred: Option<StreamOutcome>,
    },
    Skipped,
    Failed { error: ProviderError, attempts: u32 },
}

/// An ordered fallback chain with retries, retry budgets and circuit breakers.
#[derive(Debug)]
pub struct Resilient {
    entries: Vec<(ChainEntry, Arc<ProviderHealth>)>,
    retry: RetryPolicy,
}

impl Resilient {
    /// Builds a chain that takes each provider's breaker and budget from `registry`.
    pub fn new(entries: Vec<ChainEntry>, registry: &HealthRegistry) -> Self {
        let entries = entries
            .into_iter()
            .map(|entry| {
                let health = registry.get(entry.provider.name());
                (entry, health)
            })
            .collect();
        Self {
            entries,
            retry: registry.config.retry,
        }
    }

    /// Returns the health state of the chain's entries, in order.
    pub fn health(&self) -> impl Iterator<Item = (&ChainEntry, &ProviderHealth)> {
        self.entries.iter().map(|(entry, health)| (entry, health.as_ref()))
    }

    /// Sends a non-streaming request along the chain.
    pub async fn chat(&self, request: &ChatRequest) -> Result<(ChatResult, Served), ChainError> {
        let (result, served, _) = self
            .run(false, |entry| {
                let provider = entry.provider.clone();
                let model = entry.model.clone();
                async move { provider.chat(&model, request).await }
            })
            .await?;
        Ok((result, served))
    }

    /// Sends a streaming request along the chain. Retries and fallback happen only until a
    /// provider's stream has started. The stream is then returned as it is, so a later failure
    /// arrives as its last item and is neither retried nor sent elsewhere.
    /// The breaker hears of a started stream when it ends: a stream that fails in the middle
    /// counts as a failure.
    pub async fn chat_stream(&self, request: &ChatRequest) -> Result<(ChatStream, Served), ChainError> {
        let (stream, served, outcome) = self
            .run(true, |entry| {
                let provider = entry.provider.clone();
                let model = entry.model.clone();
                async move { provider.chat_stream(&model, request).await }
            })
            .await?;
        let stream = match outcome {
            Some(mut outcome) => stream.inspect_events(move |item| outcome.observe(item)),
            None => stream,
        };
        Ok((stream, served))
    }

    /// Sends along the chain. With `defer_success`, the serving entry's breaker report is
    /// returned for the caller to make later, instead of a success at once.
    async fn run<T, F, Fut>(&self, defer_success: bool, send: F) -> Result<(T, Served, Option<StreamOutcome>), ChainError>
    where
        F: Fn(&ChainEntry) -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        if self.entries.is_empty() {
            return Err(ChainError::EmptyChain);
        }

        let mut failures = Vec::new();
        for (index, (entry, health)) in self.entries.iter().enumerate() {
            let provider = entry.provider.name();
            let outcome = self.try_entry(entry, health, defer_success, &send).await;

            let reason = match outcome {
                EntryOutcome::Served { value, attempts, deferred } => {
                    let served = Served {
                        provider: provider.to_string(),
                        model: entry.model.clone(),
                        attempts,
                        fell_back_from: failures,
                    };
                    return Ok((value, served, deferred));
                }
                EntryOutcome::Failed { error, .. } if is_invalid_request(&error) => {
                    tracing::warn!(provider, model = %entry.model, error = %error, "provider rejected the request as invalid; not falling back");
                    return Err(ChainError::InvalidRequest {
                        provider: provider.to_string(),
                        model: entry.model.clone(),
                        error,
                        earlier: failures,
                    });
                }
                EntryOutcome::Skipped => FailureReason::BreakerOpen,
                EntryOutcome::Failed { error, attempts } => FailureReason::Failed { error, attempts },
            };

            let failure = ProviderFailure {
                provider: provider.to_string(),
                model: entry.model.clone(),
                reason,
            };
            match self.entries.get(index + 1) {
                Some((next, _)) => tracing::warn!(
                    provider,
                    model = %entry.model,
                    next_provider = next.provider.name(),
                    next_model = %next.model,
                    reason = %failure,
                    "falling back to the next provider"
                ),
                None => tracing::warn!(provider, model = %entry.model, reason = %failure, "last provider of the chain failed"),
            }
            failures.push(failure);
        }
        Err(ChainError::AllFailed { failures })
    }

    /// Sends the request to one entry, retrying while the policy, breaker and budget allow.
    async fn try_entry<T, F, Fut>(
        &self,
        entry: &ChainEntry,
        health: &Arc<ProviderHealth>,
        defer_success: bool,
        send: &F,
    ) -> EntryOutcome<T>
    where
        F: Fn(&ChainEntry) -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        let provider = entry.provider.name();
        let Some(mut permit) = health.breaker.try_acquire() else {
            tracing::info!(provider, model = %entry.model, "skipping provider because its circuit breaker is open");
            return EntryOutcome::Skipped;
        };
        health.budget.record_first_attempt();

        let mut attempt = 1;
        loop {
            let error = match send(entry).await {
                Ok(value) => {
                    let deferred = if defer_success {
                        Some(permit.defer(health.clone()))
                    } else {
                        permit.success();
                        None
                    };
                    return EntryOutcome::Served {
                        value,
                        attempts: attempt,
                        deferred,
                    };
                }
                Err(error) => error,
            };
            permit.failure(&error);

            let failed = |error| EntryOutcome::Failed { error, attempts: attempt };
            if attempt >= self.retry.max_attempts || is_invalid_request(&error) {
                return failed(error);
            }
            let Some(delay) = self.retry.retry_delay(attempt, &error) else {
                if error.is_retryable() {
                    tracing::info!(provider, model = %entry.model, attempt, retry_after = ?error.retry_after(), "not retrying because the requested Retry-After exceeds max_delay");
                }
                return failed(error);
            };
            if !health.budget.try_retry() {
                tracing::warn!(
                    provider,
                    model = %entry.model,
                    attempt,
                    denied_total = health.budget.denied(),
                    error = %error,
                    "not retrying because the provider's retry budget is spent"
                );
                return failed(error);
            }

            tracing::warn!(
                provider,
                model = %entry.model,
                attempt,
                next_attempt = attempt + 1,
                delay_ms = delay.as_millis() as u64,
                error = %error,
                "retrying request to provider"
            );
            tokio::time::sleep(delay).await;

            permit = match health.breaker.try_acquire() {
                Some(permit) => permit,
                None => {
                    tracing::info!(provider, model = %entry.model, attempt, "not retrying because the circuit breaker opened");
                    return failed(error);
                }
            };
            attempt += 1;
        }
    }
}

/// A clock that moves only when [`ManualClock::advance`] is called, so tests of breaker
/// cooldowns need no waiting.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<Instant>,
}

impl ManualClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            now: Mutex::new(Instant::now()),
        })
    }

    pub fn advance(&self, by: Duration) {
        *lock(&self.now) += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *lock(&self.now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;


    fn status_error(code: u16, retry_after: Option<Duration>) -> ProviderError {
        ProviderError::Status {
            status: StatusCode::from_u16(code).expect("valid status code"),
            message: String::new(),
            retry_after,
        }
    }

    fn policy(jitter: Jitter) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            jitter,
        }
    }

    #[test]
    fn exponential_delay_doubles_up_to_cap() {
        let policy = policy(Jitter::None);
        let expected = [100, 200, 400, 800, 1000, 1000];
        for (retry, millis) in (1..).zip(expected) {
            assert_eq!(policy.exponential_delay(retry), Duration::from_millis(millis), "retry {retry}");
        }
        assert_eq!(policy.exponential_delay(u32::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn jittered_backoff_within_bounds() {
        for (jitter, low_fraction) in [(Jitter::Full, 0.0), (Jitter::Equal, 0.5), (Jitter::None, 1.0)] {
            let policy = policy(jitter);
            for retry in 1..=6 {
                let high = policy.exponential_delay(retry);
                let low = high.mul_f64(low_fraction);
                assert_eq!(policy.delay_bounds(retry), (low, high), "{jitter:?} retry {retry}");

                let samples: Vec<Duration> = (0..200).map(|_| policy.backoff(retry)).collect();
                for sample in &samples {
                    assert!(*sample >= low, "{jitter:?} retry {retry}: {sample:?} below {low:?}");
                    assert!(*sample <= high, "{jitter:?} retry {retry}: {sample:?} above {high:?}");
                }
                if jitter != Jitter::None {
                    let distinct = samples.iter().collect::<std::collections::HashSet<_>>().len();
                    assert!(distinct > 1, "{jitter:?} retry {retry}: no randomness in {samples:?}");
                }
            }
        }
    }

    #[test]
    fn retry_after_replaces_backoff() {
        let policy = policy(Jitter::Full);
        let wait = Duration::from_millis(700);
        assert_eq!(policy.retry_delay(1, &status_error(429, Some(wait))), Some(wait));
        assert_eq!(policy.retry_delay(3, &status_error(503, Some(Duration::ZERO))), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_beyond_max_delay_not_retried() {
        let policy = policy(Jitter::Full);
        assert_eq!(policy.retry_delay(1, &status_error(429, Some(Duration::from_secs(5)))), None);
    }

    #[test]
    fn retry_delay_only_for_retryable() {
        let policy = policy(Jitter::Full);
        for code in [400, 401, 404, 422] {
            assert_eq!(policy.retry_delay(1, &status_error(code, None)), None, "HTTP {code}");
        }
        for code in [408, 429, 500, 503] {
            let delay = policy.retry_delay(1, &status_error(code, None));
            assert!(delay.is_some_and(|delay| delay <= Duration::from_millis(100)), "HTTP {code}: {delay:?}");
        }
        let timeout = ProviderError::Timeout {
            phase: crate::providers::TimeoutPhase::Total,
            limit: Duration::from_secs(1),
        };
        assert!(policy.retry_delay(1, &timeout).is_some());
    }

    fn budget(clock: &Arc<ManualClock>, ratio: f64, min_retries: u32) -> RetryBudget {
        let config = RetryBudgetConfig {
            ratio,
            min_retries,
            window: Duration::from_secs(10),
        };
        RetryBudget::new(config, clock.clone())
    }

    #[test]
    fn budget_floor_without_traffic() {
        let clock = ManualClock::new();
        let budget = budget(&clock, 0.2, 3);
        for retry in 1..=3 {
            assert!(budget.try_retry(), "retry {retry} within the floor");
        }
        assert!(!budget.try_retry());
        assert_eq!(budget.denied(), 1);
    }

    #[test]
    fn budget_exhausted_after_ratio() {
        let clock = ManualClock::new();
        let budget = budget(&clock, 0.2, 2);
        for _ in 0..50 {
            budget.record_first_attempt();
        }
        // 2 + 0.2 * 50 = 12 retries.
        let granted = (0..100).filter(|_| budget.try_retry()).count();
        assert_eq!(granted, 12);
        assert_eq!(budget.denied(), 88);
    }

    #[test]
    fn budget_window_slides() {
        let clock = ManualClock::new();
        let budget = budget(&clock, 0.5, 0);
        for _ in 0..10 {
            budget.record_first_attempt();
        }
        let granted = (0..10).filter(|_| budget.try_retry()).count();
        assert_eq!(granted, 5);

        // Half a window later the old counts still apply.
        clock.advance(Duration::from_secs(5));
        assert!(!budget.try_retry());

        // After a whole window both the attempts and the retries have expired.
        clock.advance(Duration::from_secs(6));
        assert!(!budget.try_retry(), "no first attempts in the window, no floor");
        budget.record_first_attempt();
        budget.record_first_attempt();
        assert!(budget.try_retry());
        assert!(!budget.try_retry());
    }

    #[test]
    fn budget_shared_across_threads() {
        let clock = ManualClock::new();
        let budget = Arc::new(budget(&clock, 0.1, 5));
        for _ in 0..100 {
            budget.record_first_attempt();
        }
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || (0..50).filter(|_| budget.try_retry()).count())
            })
            .collect();
        let granted: usize = threads.into_iter().map(|thread| thread.join().expect("thread finishes")).sum();
        assert_eq!(granted, 15);
    }

    fn breaker(clock: &Arc<ManualClock>) -> CircuitBreaker {
        let config = BreakerConfig {
            failure_threshold: 3,
            cooldown: Duration::from_secs(30),
        };
        CircuitBreaker::new("mock", config, clock.clone())
    }

    fn fail(breaker: &CircuitBreaker, error: &ProviderError) {
        breaker.try_acquire().expect("breaker admits the request").failure(error);
    }

    #[test]
    fn breaker_opens_after_threshold() {
        let clock = ManualClock::new();
        let breaker = breaker(&clock);
        let error = status_error(503, None);

        fail(&breaker, &error);
        fail(&breaker, &error);
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 2 });
        fail(&breaker, &error);
        assert!(matches!(breaker.state(), BreakerState::Open { .. }));
        assert!(breaker.try_acquire().is_none());
    }

    #[test]
    fn breaker_success_resets_count() {
        let clock = ManualClock::new();
        let breaker = breaker(&clock);
        let error = status_error(500, None);

        fail(&breaker, &error);
        fail(&breaker, &error);
        breaker.try_acquire().expect("closed breaker admits").success();
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 0 });
    }

    #[test]
    fn breaker_ignores_caller_errors() {
        let clock = ManualClock::new();
        let breaker = breaker(&clock);
        for _ in 0..10 {
            fail(&breaker, &status_error(400, None));
        }
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 0 });
    }

    #[test]
    fn breaker_half_open_probe_closes() {
        let clock = ManualClock::new();
        let breaker = breaker(&clock);
        let error = status_error(502, None);
        for _ in 0..3 {
            fail(&breaker, &error);
        }

        clock.advance(Duration::from_secs(29));
        assert!(breaker.try_acquire().is_none(), "still open before the cooldown ends");

        clock.advance(Duration::from_secs(1));
        let probe = breaker.try_acquire().expect("probe after the cooldown");
        assert_eq!(breaker.state(), BreakerState::HalfOpen { probing: true });
        assert!(breaker.try_acquire().is_none(), "second request during the probe");

        probe.success();
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 0 });
        assert!(breaker.try_acquire().is_some());
    }

    #[test]
    fn breaker_failed_probe_reopens() {
        let clock = ManualClock::new();
        let breaker = breaker(&clock);
        let error = status_error(502, None);
        for _ in 0..3 {
            fail(&breaker, &error);
        }
        clock.advance(Duration::from_secs(30));

        breaker.try_acquire().expect("probe").failure(&error);
        let BreakerState::Open { until } = breaker.state() else {
            panic!("expected open, got {:?}", breaker.state());
        };
        assert_eq!(until, clock.now() + Duration::from_secs(30));
        assert!(breaker.try_acquire().is_none());
    }

    #[test]
    fn breaker_dropped_probe_frees_slot() {
        let clock = ManualClock::new();
        let breaker = breaker(&clock);
        for _ in 0..3 {
            fail(&breaker, &status_error(500, None));
        }
        clock.advance(Duration::from_secs(30));

        drop(breaker.try_acquire().expect("probe"));
        assert_eq!(breaker.state(), BreakerState::HalfOpen { probing: false });
        assert!(breaker.try_acquire().is_some(), "a new probe after the first was abandoned");
    }

    #[test]
    fn breaker_late_success_ignored_when_open() {
        let clock = ManualClock::new();
        let breaker = breaker(&clock);
        let error = status_error(500, None);
        let early = breaker.try_acquire().expect("closed breaker admits");
        for _ in 0..3 {
            fail(&breaker, &error);
        }
        early.success();
        assert!(matches!(breaker.state(), BreakerState::Open { .. }));
    }

    #[test]
    fn breaker_single_probe_under_concurrency() {
        let clock = ManualClock::new();
        let breaker = Arc::new(breaker(&clock));
        for _ in 0..3 {
            fail(&breaker, &status_error(500, None));
        }
        clock.advance(Duration::from_secs(30));

        let threads = 16;
        let start = Arc::new(std::sync::Barrier::new(threads));
        let hold = Arc::new(std::sync::Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let breaker = breaker.clone();
                let start = start.clone();
                let hold = hold.clone();
                std::thread::spawn(move || {
                    start.wait();
                    let permit = breaker.try_acquire();
                    let admitted = permit.is_some();
                    // Every thread tries while any probe is still held.
                    hold.wait();
                    drop(permit);
                    admitted
                })
            })
            .collect();
        let admitted = handles
            .into_iter()
            .map(|handle| handle.join().expect("thread finishes"))
            .filter(|admitted| *admitted)
            .count();
        assert_eq!(admitted, 1);
    }
}
