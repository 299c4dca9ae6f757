//! The fault-tolerance layer against mock providers on 127.0.0.1: retries, fallback along the
//! chain, circuit breakers, retry budgets, and where streams may fall back.

mod mock_provider;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mock_provider::{drain, MockProvider, Script};
use tierd::providers::{
    ChatMessage, ChatRequest, Provider, ProviderConfig, ProviderError, StreamEvent,
    TimeoutPhase,
};
use tierd::routing::resilience::{
    BreakerConfig, BreakerState, ChainEntry, ChainError, FailureReason, HealthRegistry,
    Jitter, ManualClock, ResilienceConfig, Resilient, RetryBudgetConfig, RetryPolicy,
};

const MODEL: &str = "frontier";


/// Builds an OpenAI-kind provider named `name` on `mock`, without a key, with `timeouts` as the
/// body of a `[timeouts]` table.
fn provider(name: &str, mock: &MockProvider, timeouts: &str) -> Arc<Provider> {
    let text = format!(
        "name = \"{name}\"\nkind = \"openai\"\nbase_url = \"{}\"\n[timeouts]\n{timeouts}\n\
         [[model]]\nid = \"{MODEL}\"\nupstream = \"upstream-large\"\ntier = 1\ninput_per_mtok = 3.0\noutput_per_mtok = 15.0\n",
        mock.base_url
    );
    let config: ProviderConfig = toml::from_str(&text).expect("valid provider TOML");
    Arc::new(Provider::new(config).expect("provider from valid config"))
}

/// Settings with short delays: 3 attempts, 10 ms backoff, a budget that rarely binds and a
/// breaker that opens after 3 failures for 30 s.
fn fast_config() -> ResilienceConfig {
    ResilienceConfig {
        retry: RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(100),
            jitter: Jitter::Equal,
        },
        budget: RetryBudgetConfig {
            ratio: 0.2,
            min_retries: 100,
            window: Duration::from_secs(10),
        },
        breaker: BreakerConfig {
            failure_threshold: 3,
            cooldown: Duration::from_secs(30),
        },
    }
}

fn chain(entries: &[&Arc<Provider>], registry: &HealthRegistry) -> Resilient {
    let entries = entries
        .iter()
        .map(|provider| ChainEntry::new(Arc::clone(provider), MODEL))
        .collect();
    Resilient::new(entries, registry)
}

fn request() -> ChatRequest {
    ChatRequest::new(vec![ChatMessage {
        role: "user".to_string(),
        content: "Say hello.".to_string(),
    }])
}

fn status(status: u16, retry_after: Option<&str>) -> Script {
    Script::Status {
        status,
        body: format!(r#"{{"error":{{"message":"scripted {status}"}}}}"#),
        retry_after: retry_after.map(str::to_string),
    }
}

#[tokio::test]
async fn retry_429_then_success() {
    let mock = MockProvider::start().await;
    mock.push(status(429, Some("0.02")));
    let primary = provider("primary", &mock, "");
    let registry = HealthRegistry::new(fast_config());
    let resilient = chain(&[&primary], &registry);

    let started = Instant::now();
    let (result, served) = resilient.chat(&request()).await.expect("served after one retry");

    assert_eq!(result.text, "Hello, world");
    assert_eq!(served.provider, "primary");
    assert_eq!(served.model, MODEL);
    assert_eq!(served.attempts, 2);
    assert!(served.fell_back_from.is_empty(), "{:?}", served.fell_back_from);
    assert_eq!(mock.requests().len(), 2);
    assert!(started.elapsed() >= Duration::from_millis(20), "Retry-After of 20 ms not honoured");
}

#[tokio::test]
async fn retry_after_beyond_max_delay_falls_back() {
    let first = MockProvider::start().await;
    let second = MockProvider::start().await;
    first.push(status(429, Some("60")));
    let primary = provider("primary", &first, "");
    let secondary = provider("secondary", &second, "");
    let registry = HealthRegistry::new(fast_config());
    let resilient = chain(&[&primary, &secondary], &registry);

    let started = Instant::now();
    let (_, served) = resilient.chat(&request()).await.expect("served by the fallback");

    assert_eq!(served.provider, "secondary");
    assert_eq!(first.requests().len(), 1);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn server_errors_fall_back() {
    let first = MockProvider::start().await;
    let second = MockProvider::start().await;
    for _ in 0..3 {
        first.push(status(500, None));
    }
    let primary = provider("primary", &first, "");
    let secondary = provider("secondary", &second, "");
    let registry = HealthRegistry::new(fast_config());
    let resilient = chain(&[&primary, &secondary], &registry);

    let (result, served) = resilient.chat(&request()).await.expect("served by the fallback");

    assert_eq!(result.text, "Hello, world");
    assert_eq!(served.provider, "secondary");
    assert_eq!(served.attempts, 1);
    assert_eq!(first.requests().len(), 3);
    assert_eq!(second.requests().len(), 1);

    assert_eq!(served.fell_back_from.len(), 1);
    let failure = &served.fell_back_from[0];
    assert_eq!(failure.provider, "primary");
    match &failure.reason {
        FailureReason::Failed { error, attempts } => {
            assert_eq!(*attempts, 3);
            assert!(matches!(error, ProviderError::Status { status, .. } if status.as_u16() == 500), "{error:?}");
        }
        FailureReason::BreakerOpen => panic!("primary was contacted, not skipped"),
    }
}

#[tokio::test]
async fn all_failing_lists_each_error() {
    let first = MockProvider::start().await;
    let second = MockProvider::start().await;
    for _ in 0..3 {
        first.push(status(503, None));
        second.push(status(502, None));
    }
    let primary = provider("primary", &first, "");
    let secondary = provider("secondary", &second, "");
    let registry = HealthRegistry::new(fast_config());
    let resilient = chain(&[&primary, &secondary], &registry);

    let error = resilient.chat(&request()).await.expect_err("every provider fails");

    let message = error.to_string();
    assert!(message.contains("`primary`"), "{message}");
    assert!(message.contains("503"), "{message}");
    assert!(message.contains("`secondary`"), "{message}");
    assert!(message.contains("502"), "{message}");
    let ChainError::AllFailed { failures } = error else {
        panic!("expected AllFailed, got {error:?}");
    };
    let providers: Vec<&str> = failures.iter().map(|failure| failure.provider.as_str()).collect();
    assert_eq!(providers, ["primary", "secondary"]);
}

#[tokio::test]
async fn bad_request_ends_chain() {
    let first = MockProvider::start().await;
    let second = MockProvider::start().await;
    first.push(status(400, None));
    let primary = provider("primary", &first, "");
    let secondary = provider("secondary", &second, "");
    let registry = HealthRegistry::new(fast_config());
    let resilient = chain(&[&primary, &secondary], &registry);

    let error = resilient.chat(&request()).await.expect_err("a 400 is not retried or sent on");

    let ChainError::InvalidRequest { provider, error, earlier, .. } = error else {
        panic!("expected InvalidRequest, got {error:?}");
    };
    assert_eq!(provider, "primary");
    assert!(matches!(error, ProviderError::Status { status, .. } if status.as_u16() == 400));
    assert!(earlier.is_empty());
    assert_eq!(first.requests().len(), 1);
    assert_eq!(second.requests().len(), 0);
    assert_eq!(registry.get("primary").breaker.state(), BreakerState::Closed { failures: 0 });
}

#[tokio::test]
async fn unauthorized_falls_back_without_retry() {
    let first = MockProvider::start().await;
    let second = MockProvider::start().await;
    first.push(status(401, None));
    let primary = provider("primary", &first, "");
    let secondary = provider("secondary", &second, "");
    let registry = HealthRegistry::new(fast_config());
    let resilient = chain(&[&primary, &secondary], &registry);

    let (_, served) = resilient.chat(&request()).await.expect("served by the fallback");

    assert_eq!(served.provider, "secondary");
    assert_eq!(first.requests().len(), 1);
}

#[tokio::test]
async fn hang_times_out_then_falls_back() {
    let first = MockProvider::start().await;
    let second = MockProvider::start().await;
    first.push(Script::HangBeforeHeaders);
    first.push(Script::HangBeforeHeaders);
    let primary = provider("primary", &first, "total_ms = 100");
    let secondary = provider("secondary", &second, "");
    let mut config = fast_config();
    config.retry.max_attempts = 2;
    let registry = HealthRegistry::new(config);
    let resilient = chain(&[&primary, &secondary], &registry);

    let started = Instant::now();
    let (_, served) = resilient.chat(&request()).await.expect("served by the fallback");
    let elapsed = started.elapsed();

    assert_eq!(served.provider, "secondary");
    assert_eq!(first.requests().len(), 2);
    // Two 100 ms timeouts and one backoff of at most 10 ms, with margin for a loaded machine.
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    let reason = &served.fell_back_from[0].reason;
    assert!(
        matches!(reason, FailureReason::Failed { error: ProviderError::Timeout { phase: TimeoutPhase::Total, .. }, attempts: 2 }),
        "{reason:?}"
    );
}

#[tokio::test]
async fn breaker_skips_open_provider() {
    let first = MockProvider::start().await;
    let second = MockProvider::start().await;
    for _ in 0..3 {
        first.push(status(503, None));
    }
    let primary = provider("primary", &first, "");
    let secondary = provider("secondary", &second, "");
    let mut config = fast_config();
    config.retry.max_attempts = 1;
    let clock = ManualClock::new();
    let registry = HealthRegistry::with_clock(config, clock.clone());
    let resilient = chain(&[&primary, &secondary], &registry);

    for call in 1..=3 {
        let (_, served) = resilient.chat(&request()).await.expect("served by the fallback");
        assert_eq!(served.provider, "secondary", "call {call}");
    }
    assert!(matches!(registry.get("primary").breaker.state(), BreakerState::Open { .. }));
    assert_eq!(first.requests().len(), 3);

    let (_, served) = resilient.chat(&request()).await.expect("served by the fallback");
    assert_eq!(served.provider, "secondary");
    assert!(matches!(served.fell_back_from[0].reason, FailureReason::BreakerOpen));
    assert_eq!(first.requests().len(), 3, "an open breaker let a request through");

    // After the cooldown one probe reaches the primary, which now returns a completion and closes the breaker.
    clock.advance(Duration::from_secs(30));
    let (_, served) = resilient.chat(&request()).await.expect("served by the probe");
    assert_eq!(served.provider, "primary");
    assert_eq!(first.requests().len(), 4);
    assert_eq!(registry.get("primary").breaker.state(), BreakerState::Closed { failures: 0 });
}

#[tokio::test]
async fn stream_failure_before_first_byte_falls_back() {
    let first = MockProvider::start().await;
    let second = MockProvider::start().await;
    first.push(status(503, None));
    first.push(Script::HangBeforeHeaders);
    let primary = provider("primary", &first, "first_byte_ms = 100");
    let secondary = provider("secondary", &second, "");
    let mut config = fast_config();
    config.retry.max_attempts = 2;
    let registry = HealthRegistry::new(config);
    let resilient = chain(&[&primary, &secondary], &registry);

    let (stream, served) = resilient.chat_stream(&request()).await.expect("stream from the fallback");

    assert_eq!(served.provider, "secondary");
    assert_eq!(first.requests().len(), 2);
    let reason = &served.fell_back_from[0].reason;
    assert!(
        matches!(reason, FailureReason::Failed { error: ProviderError::Timeout { phase: TimeoutPhase::FirstByte, .. }, attempts: 2 }),
        "{reason:?}"
    );
    let (events, error) = drain(stream).await;
    assert!(error.is_none(), "{error:?}");
    assert!(matches!(events.last(), Some(StreamEvent::Finished { .. })), "{events:?}");
}

#[tokio::test]
async fn stream_stall_mid_stream_ends_with_error() {
    let first = MockProvider::start().await;
    let second = MockProvider::start().await;
    first.push(Script::StallAfter { chunks: 2 });
    let primary = provider("primary", &first, "total_ms = 300");
    let secondary = provider("secondary", &second, "");
    let registry = HealthRegistry::new(fast_config());
    let resilient = chain(&[&primary, &secondary], &registry);

    let (stream, served) = resilient.chat_stream(&request()).await.expect("stream from the primary");
    assert_eq!(served.provider, "primary");
    let (events, error) = drain(stream).await;

    let texts: Vec<&str> = events
        .iter()
        .map(|event| match event {
            StreamEvent::Delta { text } => text.as_str(),
            StreamEvent::Finished { .. } => panic!("a stalled stream finished cleanly: {events:?}"),
        })
        .collect();
    assert_eq!(texts, ["one ", "two "]);
    assert!(matches!(error, Some(ProviderError::Timeout { phase: TimeoutPhase::Total, .. })), "{error:?}");
    assert_eq!(first.requests().len(), 1);
    assert_eq!(second.requests().len(), 0, "a started stream fell back");
}

#[tokio::test]
async fn stream_cut_mid_stream_ends_with_error() {
    let first = MockProvider::start().await;
    let second = MockProvider::start().await;
    first.push(Script::CutAfter { chunks: 1 });
    let primary = provider("primary", &first, "");
    let secondary = provider("secondary", &second, "");
    let registry = HealthRegistry::new(fast_config());
    let resilient = chain(&[&primary, &secondary], &registry);

    let (stream, served) = resilient.chat_stream(&request()).await.expect("stream from the primary");
    assert_eq!(served.provider, "primary");
    let (events, error) = drain(stream).await;

    assert_eq!(events, [StreamEvent::Delta { text: "one ".to_string() }]);
    assert!(matches!(error, Some(ProviderError::StreamCut { .. })), "{error:?}");
    assert_eq!(second.requests().len(), 0, "a started stream fell back");
}

#[tokio::test]
async fn streams_cut_mid_way_open_the_breaker() {
    let mock = MockProvider::start().await;
    let primary = provider("primary", &mock, "");
    let registry = HealthRegistry::new(fast_config());
    let resilient = chain(&[&primary], &registry);

    // A clean stream leaves no failure behind.
    let (stream, _) = resilient.chat_stream(&request()).await.expect("clean stream");
    let (_, error) = drain(stream).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(registry.get("primary").breaker.state(), BreakerState::Closed { failures: 0 });

    // Each stream starts, so none falls back, but each cut counts as a failure.
    for cut in 1..=3 {
        mock.push(Script::CutAfter { chunks: 1 });
        let (stream, _) = resilient.chat_stream(&request()).await.expect("stream starts");
        let (_, error) = drain(stream).await;
        assert!(matches!(error, Some(ProviderError::StreamCut { .. })), "{error:?}");
        if cut < 3 {
            assert_eq!(registry.get("primary").breaker.state(), BreakerState::Closed { failures: cut });
        }
    }
    assert!(matches!(registry.get("primary").breaker.state(), BreakerState::Open { .. }));
    let requests = mock.requests().len();
    assert!(resilient.chat_stream(&request()).await.is_err(), "an open breaker let a stream start");
    assert_eq!(mock.requests().len(), requests);
}

#[tokio::test]
async fn dropped_probe_stream_frees_the_probe() {
    let mock = MockProvider::start().await;
    let primary = provider("primary", &mock, "");
    let clock = ManualClock::new();
    let mut config = fast_config();
    config.breaker.failure_threshold = 1;
    let registry = HealthRegistry::with_clock(config, clock.clone());
    let resilient = chain(&[&primary], &registry);

    // One failure opens the breaker, which also stops the retries.
    mock.push(status(500, None));
    assert!(resilient.chat_stream(&request()).await.is_err());
    assert_eq!(mock.requests().len(), 1);
    assert!(matches!(registry.get("primary").breaker.state(), BreakerState::Open { .. }));

    // After the cooldown the probe stream starts; the client drops it before its end. That
    // proves nothing about the provider, so the next request may probe again.
    clock.advance(Duration::from_secs(31));
    let (stream, _) = resilient.chat_stream(&request()).await.expect("probe stream starts");
    assert_eq!(registry.get("primary").breaker.state(), BreakerState::HalfOpen { probing: true });
    drop(stream);
    assert_eq!(registry.get("primary").breaker.state(), BreakerState::HalfOpen { probing: false });

    let (stream, _) = resilient.chat_stream(&request()).await.expect("second probe starts");
    let (_, error) = drain(stream).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(registry.get("primary").breaker.state(), BreakerState::Closed { failures: 0 });
}

#[tokio::test]
async fn budget_prevents_retry_storm() {
    const CALLS: usize = 50;
    let mock = MockProvider::start().await;
    for _ in 0..CALLS * 3 {
        mock.push(status(500, None));
    }
    let primary = provider("primary", &mock, "");
    let mut config = fast_config();
    config.budget = RetryBudgetConfig {
        ratio: 0.2,
        min_retries: 2,
        window: Duration::from_secs(10),
    };
    config.breaker.failure_threshold = u32::MAX;
    let registry = HealthRegistry::new(config);
    let resilient = chain(&[&primary], &registry);

    let request = request();
    let calls = (0..CALLS).map(|_| resilient.chat(&request));
    let results = futures::future::join_all(calls).await;

    for result in &results {
        assert!(matches!(result, Err(ChainError::AllFailed { .. })), "{result:?}");
    }
    // Without a budget, 3 attempts per call would send 150 requests. The budget allows
    // 2 + 0.2 * 50 = 12 retries.
    let requests = mock.requests().len();
    assert!(requests >= CALLS, "{requests} requests");
    assert!(requests <= CALLS + 12, "{requests} requests exceed the retry budget");
    assert!(registry.get("primary").budget.denied() > 0);
}
