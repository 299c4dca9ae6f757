//! Provider clients against the mock OpenAI and Anthropic APIs on 127.0.0.1: wire translation,
//! streaming, and the error each fault maps to.

mod mock_provider;

use std::sync::Once;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mock_provider::{drain, Answer, MockProvider, Script};
use serde_json::json;
use tierd::providers::{
    ChatMessage, ChatRequest, Provider, ProviderConfig, ProviderError, StreamEvent,
    TimeoutPhase, Usage,
};

const OPENAI_KEY_VAR: &str = "TIERD_TEST_PROVIDERS_OPENAI_KEY";
const OPENAI_KEY: &str = "sk-test-openai-0123456789";
const ANTHROPIC_KEY_VAR: &str = "TIERD_TEST_PROVIDERS_ANTHROPIC_KEY";
const ANTHROPIC_KEY: &str = "sk-ant-test-9876543210";

/// Sets the key variables once, before any test reads the environment, so that no test
/// writes the environment while another reads it.
fn set_keys() {
    static SET: Once = Once::new();
    SET.call_once(|| {
        std::env::set_var(OPENAI_KEY_VAR, OPENAI_KEY);
        std::env::set_var(ANTHROPIC_KEY_VAR, ANTHROPIC_KEY);
    });
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    OpenAi,
    Anthropic,
}

const KINDS: [Kind; 2] = [Kind::OpenAi, Kind::Anthropic];

fn config_text(kind: Kind, base_url: &str, extra: &str) -> String {
    let (kind_name, key_var) = match kind {
        Kind::OpenAi => ("openai", OPENAI_KEY_VAR),
        Kind::Anthropic => ("anthropic", ANTHROPIC_KEY_VAR),
    };
    format!(
        "name = \"mock-{kind_name}\"\nkind = \"{kind_name}\"\nbase_url = \"{base_url}\"\napi_key_env = \"{key_var}\"\n\
         default_max_tokens = 321\n{extra}\n\
         [[model]]\nid = \"frontier\"\nupstream = \"upstream-large\"\ntier = 1\ninput_per_mtok = 3.0\noutput_per_mtok = 15.0\n"
    )
}

fn provider_with(kind: Kind, mock: &MockProvider, extra: &str) -> Provider {
    set_keys();
    let config: ProviderConfig = toml::from_str(&config_text(kind, &mock.base_url, extra)).expect("valid provider TOML");
    Provider::new(config).expect("provider from valid config")
}

fn provider(kind: Kind, mock: &MockProvider) -> Provider {
    provider_with(kind, mock, "")
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.to_string(),
        content: content.to_string(),
    }
}

fn simple_request() -> ChatRequest {
    ChatRequest::new(vec![message("user", "Say hello.")])
}

fn delta(text: &str) -> StreamEvent {
    StreamEvent::Delta { text: text.to_string() }
}

fn finished(finish_reason: &str, prompt_tokens: u64, completion_tokens: u64) -> StreamEvent {
    StreamEvent::Finished {
        finish_reason: finish_reason.to_string(),
        usage: Some(Usage {
            prompt_tokens,
            completion_tokens,
        }),
    }
}

fn four_deltas() -> Vec<StreamEvent> {
    vec![delta("one "), delta("two "), delta("three "), delta("four")]
}

#[tokio::test]
async fn openai_chat_round_trip() {
    let mock = MockProvider::start().await;
    mock.push(Script::Answer(Answer::new(&["Hello", ", world"], "stop", 11, 3)));
    let provider = provider(Kind::OpenAi, &mock);

    let mut request = ChatRequest::new(vec![message("system", "Be brief."), message("user", "Hi")]);
    request.max_tokens = Some(50);
    request.temperature = Some(0.25);
    request.top_p = Some(0.5);
    request.stop = vec!["END".to_string()];
    let result = provider.chat("frontier", &request).await.expect("answer");

    assert_eq!(result.text, "Hello, world");
    assert_eq!(result.finish_reason, "stop");
    assert_eq!(result.usage, Usage { prompt_tokens: 11, completion_tokens: 3 });
    assert_eq!(result.upstream_model, "upstream-large-20250101");
    assert!(result.timing.first_byte <= result.timing.total);

    let recorded = mock.single_request();
    assert_eq!(recorded.path, "/v1/chat/completions");
    assert_eq!(recorded.headers["authorization"], format!("Bearer {OPENAI_KEY}"));
    assert!(!recorded.headers.contains_key("x-api-key"));
    let body = recorded.body;
    assert_eq!(body["model"], "upstream-large");
    assert_eq!(
        body["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    );
    assert_eq!(body["max_completion_tokens"], 50);
    assert_eq!(body["temperature"], 0.25);
    assert_eq!(body["top_p"], 0.5);
    assert_eq!(body["stop"], json!(["END"]));
    assert_eq!(body["stream"], false);
    assert!(body.get("stream_options").is_none(), "{body}");
}

#[tokio::test]
async fn openai_unset_fields_are_omitted() {
    let mock = MockProvider::start().await;
    let provider = provider(Kind::OpenAi, &mock);
    provider.chat("frontier", &simple_request()).await.expect("answer");

    let body = mock.single_request().body;
    for field in ["max_completion_tokens", "max_tokens", "temperature", "top_p", "stop"] {
        assert!(body.get(field).is_none(), "{field} in {body}");
    }
}

#[tokio::test]
async fn openai_stream_round_trip() {
    let mock = MockProvider::start().await;
    mock.push(Script::Answer(Answer::new(&["Hel", "lo", "!"], "length", 9, 3)));
    let provider = provider(Kind::OpenAi, &mock);

    let stream = provider.chat_stream("frontier", &simple_request()).await.expect("stream");
    assert_eq!(stream.upstream_model, "upstream-large");
    let (events, error) = drain(stream).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(events, [delta("Hel"), delta("lo"), delta("!"), finished("length", 9, 3)]);

    let body = mock.single_request().body;
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
}

#[tokio::test]
async fn openai_stream_without_usage() {
    let mock = MockProvider::start().await;
    mock.push(Script::Answer(Answer::new(&["Hi"], "stop", 9, 1)));
    let provider = provider(Kind::OpenAi, &mock);

    let mut request = simple_request();
    request.stream_usage = false;
    let stream = provider.chat_stream("frontier", &request).await.expect("stream");
    let (events, error) = drain(stream).await;
    assert!(error.is_none(), "{error:?}");
    let expected_end = StreamEvent::Finished {
        finish_reason: "stop".to_string(),
        usage: None,
    };
    assert_eq!(events, [delta("Hi"), expected_end]);
    assert!(mock.single_request().body.get("stream_options").is_none());
}

#[tokio::test]
async fn anthropic_chat_translation() {
    let mock = MockProvider::start().await;
    mock.push(Script::Answer(Answer::new(&["Bonjour", " le monde"], "end_turn", 21, 4)));
    let provider = provider(Kind::Anthropic, &mock);

    let mut request = ChatRequest::new(vec![
        message("system", "You are terse."),
        message("system", "Answer in French."),
        message("user", "Hello"),
        message("assistant", "Bonjour"),
        message("user", "Say hello world."),
    ]);
    request.temperature = Some(0.5);
    request.top_p = Some(0.9);
    request.stop = vec!["END".to_string(), "STOP".to_string()];
    let result = provider.chat("frontier", &request).await.expect("answer");

    assert_eq!(result.text, "Bonjour le monde");
    assert_eq!(result.finish_reason, "stop");
    assert_eq!(result.usage, Usage { prompt_tokens: 21, completion_tokens: 4 });
    assert_eq!(result.upstream_model, "upstream-large-20250101");

    let recorded = mock.single_request();
    assert_eq!(recorded.path, "/v1/messages");
    assert_eq!(recorded.headers["x-api-key"], ANTHROPIC_KEY);
    assert_eq!(recorded.headers["anthropic-version"], "2023-06-01");
    assert!(!recorded.headers.contains_key("authorization"));
    let body = recorded.body;
    assert_eq!(body["model"], "upstream-large");
    assert_eq!(body["system"], "You are terse.\n\nAnswer in French.");
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": "Say hello world."},
        ])
    );
    assert_eq!(body["max_tokens"], 321, "default_max_tokens applies");
    assert_eq!(body["temperature"], 0.5);
    assert!(body.get("top_p").is_none(), "top_p is dropped beside temperature: {body}");
    assert_eq!(body["stop_sequences"], json!(["END", "STOP"]));
    assert!(body.get("stop").is_none());
    assert_eq!(body["stream"], false);
}

#[tokio::test]
async fn anthropic_request_limits_and_sampling() {
    let mock = MockProvider::start().await;
    let provider = provider_with(Kind::Anthropic, &mock, "anthropic_version = \"2099-01-01\"");

    let mut request = simple_request();
    request.max_tokens = Some(77);
    request.temperature = Some(1.6);
    provider.chat("frontier", &request).await.expect("answer");

    let mut top_p_only = simple_request();
    top_p_only.top_p = Some(0.8);
    provider.chat("frontier", &top_p_only).await.expect("answer");

    let requests = mock.requests();
    assert_eq!(requests[0].headers["anthropic-version"], "2099-01-01");
    assert_eq!(requests[0].body["max_tokens"], 77);
    assert_eq!(requests[0].body["temperature"], 1.0, "clamped to Anthropic's range");
    assert!(requests[0].body.get("system").is_none());
    assert!(requests[0].body.get("stop_sequences").is_none());
    let top_p = requests[1].body["top_p"].as_f64().expect("top_p sent");
    assert!((top_p - 0.8).abs() < 1e-6, "{top_p}");
}

#[tokio::test]
async fn anthropic_stop_reasons_map() {
    let cases = [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("refusal", "content_filter"),
        ("tool_use", "tool_use"),
    ];
    let mock = MockProvider::start().await;
    let provider = provider(Kind::Anthropic, &mock);
    for (stop_reason, expected) in cases {
        mock.push(Script::Answer(Answer::new(&["x"], stop_reason, 1, 1)));
        let result = provider.chat("frontier", &simple_request()).await.expect("answer");
        assert_eq!(result.finish_reason, expected, "non-streamed {stop_reason}");

        mock.push(Script::Answer(Answer::new(&["x"], stop_reason, 1, 1)));
        let stream = provider.chat_stream("frontier", &simple_request()).await.expect("stream");
        let (events, error) = drain(stream).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(events.last(), Some(&finished(expected, 1, 1)), "streamed {stop_reason}");
    }
}

#[tokio::test]
async fn anthropic_stream_round_trip() {
    let mock = MockProvider::start().await;
    mock.push(Script::Answer(Answer::new(&["Hello", ", ", "world"], "end_turn", 25, 15)));
    let provider = provider(Kind::Anthropic, &mock);

    let stream = provider.chat_stream("frontier", &simple_request()).await.expect("stream");
    let (events, error) = drain(stream).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(events, [delta("Hello"), delta(", "), delta("world"), finished("stop", 25, 15)]);

    let recorded = mock.single_request();
    assert_eq!(recorded.body["stream"], true);
    assert_eq!(recorded.body["max_tokens"], 321);
    assert!(recorded.body.get("stream_options").is_none());
}

#[tokio::test]
async fn rate_limit_maps_to_status() {
    let bodies = [
        (Kind::OpenAi, r#"{"error":{"message":"Rate limit reached for requests","type":"requests"}}"#, "Rate limit reached"),
        (Kind::Anthropic, r#"{"type":"error","error":{"type":"rate_limit_error","message":"Too many requests"}}"#, "rate_limit_error: Too many requests"),
    ];
    for (kind, body, expected_message) in bodies {
        let mock = MockProvider::start().await;
        let provider = provider(kind, &mock);
        for stream in [false, true] {
            mock.push(Script::Status {
                status: 429,
                body: body.to_string(),
                retry_after: Some("2".to_string()),
            });
            let error = if stream {
                provider.chat_stream("frontier", &simple_request()).await.expect_err("429")
            } else {
                provider.chat("frontier", &simple_request()).await.expect_err("429")
            };
            let ProviderError::Status { status, message, retry_after } = &error else {
                panic!("{kind:?}, stream {stream}: expected Status, got {error:?}");
            };
            assert_eq!(status.as_u16(), 429);
            assert!(message.contains(expected_message), "{kind:?}: {message}");
            assert_eq!(*retry_after, Some(Duration::from_secs(2)));
            assert!(error.is_retryable());
        }
    }
}

#[tokio::test]
async fn error_statuses_and_retryability() {
    let cases = [(500, true), (503, true), (529, true), (400, false), (401, false), (404, false)];
    for kind in KINDS {
        let mock = MockProvider::start().await;
        let provider = provider(kind, &mock);
        for (code, retryable) in cases {
            mock.push(Script::Status {
                status: code,
                body: "upstream trouble".to_string(),
                retry_after: None,
            });
            let error = provider.chat("frontier", &simple_request()).await.expect_err("error status");
            let ProviderError::Status { status, message, retry_after } = &error else {
                panic!("{kind:?} {code}: expected Status, got {error:?}");
            };
            assert_eq!(status.as_u16(), code);
            assert_eq!(message, "upstream trouble", "raw body becomes the message");
            assert_eq!(*retry_after, None);
            assert_eq!(error.is_retryable(), retryable, "{kind:?} {code}");
        }
    }
}

#[tokio::test]
async fn malformed_body_is_not_retryable() {
    for kind in KINDS {
        let mock = MockProvider::start().await;
        let provider = provider(kind, &mock);
        mock.push(Script::MalformedBody);
        let error = provider.chat("frontier", &simple_request()).await.expect_err("malformed");
        assert!(matches!(error, ProviderError::Malformed { .. }), "{kind:?}: {error:?}");
        assert!(!error.is_retryable());
    }
}

#[tokio::test]
async fn malformed_stream_data_ends_stream() {
    for kind in KINDS {
        let mock = MockProvider::start().await;
        let provider = provider(kind, &mock);
        mock.push(Script::MalformedBody);
        let stream = provider.chat_stream("frontier", &simple_request()).await.expect("stream starts");
        let (events, error) = drain(stream).await;
        assert_eq!(events, [delta("one ")], "{kind:?}");
        let error = error.expect("malformed data ends the stream with an error");
        assert!(matches!(error, ProviderError::Malformed { .. }), "{kind:?}: {error:?}");
        assert!(!error.is_retryable());
    }
}

#[tokio::test]
async fn first_byte_timeout_fires() {
    for kind in KINDS {
        let mock = MockProvider::start().await;
        let provider = provider_with(kind, &mock, "[timeouts]\nfirst_byte_ms = 300\ntotal_ms = 10000\n");
        mock.push(Script::HangBeforeHeaders);

        let start = Instant::now();
        let error = provider.chat_stream("frontier", &simple_request()).await.expect_err("hang");
        let elapsed = start.elapsed();
        assert!(
            matches!(error, ProviderError::Timeout { phase: TimeoutPhase::FirstByte, .. }),
            "{kind:?}: {error:?}"
        );
        assert!(error.is_retryable());
        assert!(elapsed >= Duration::from_millis(300), "{kind:?}: fired after {elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "{kind:?}: fired after {elapsed:?}");
    }
}

#[tokio::test]
async fn total_timeout_bounds_non_streamed_request() {
    for kind in KINDS {
        let mock = MockProvider::start().await;
        let provider = provider_with(kind, &mock, "[timeouts]\nfirst_byte_ms = 100\ntotal_ms = 400\n");
        mock.push(Script::HangBeforeHeaders);

        let start = Instant::now();
        let error = provider.chat("frontier", &simple_request()).await.expect_err("hang");
        let elapsed = start.elapsed();
        assert!(
            matches!(error, ProviderError::Timeout { phase: TimeoutPhase::Total, .. }),
            "{kind:?}: non-streamed requests are bounded by total_ms only, got {error:?}"
        );
        assert!(elapsed >= Duration::from_millis(400), "{kind:?}: fired after {elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "{kind:?}: fired after {elapsed:?}");
    }
}

#[tokio::test]
async fn total_timeout_ends_stalled_stream() {
    for kind in KINDS {
        let mock = MockProvider::start().await;
        let provider = provider_with(kind, &mock, "[timeouts]\nfirst_byte_ms = 5000\ntotal_ms = 600\n");
        mock.push(Script::StallAfter { chunks: 2 });

        let start = Instant::now();
        let stream = provider.chat_stream("frontier", &simple_request()).await.expect("stream starts");
        let (events, error) = drain(stream).await;
        let elapsed = start.elapsed();
        assert_eq!(events, [delta("one "), delta("two ")], "{kind:?}");
        let error = error.expect("the stalled stream ends with an error");
        assert!(
            matches!(error, ProviderError::Timeout { phase: TimeoutPhase::Total, .. }),
            "{kind:?}: {error:?}"
        );
        assert!(elapsed >= Duration::from_millis(600), "{kind:?}: fired after {elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "{kind:?}: fired after {elapsed:?}");
    }
}

#[tokio::test]
async fn cut_stream_is_error_after_deltas() {
    for kind in KINDS {
        let mock = MockProvider::start().await;
        let provider = provider(kind, &mock);
        mock.push(Script::CutAfter { chunks: 3 });

        let stream = provider.chat_stream("frontier", &simple_request()).await.expect("stream starts");
        let (events, error) = drain(stream).await;
        assert_eq!(events, four_deltas()[..3], "{kind:?}");
        let error = error.expect("a cut stream ends with an error, not a clean end");
        assert!(matches!(error, ProviderError::StreamCut { .. }), "{kind:?}: {error:?}");
        assert!(error.is_retryable());
    }
}

#[tokio::test]
async fn error_event_mid_stream_is_upstream() {
    for kind in KINDS {
        let mock = MockProvider::start().await;
        let provider = provider(kind, &mock);
        mock.push(Script::ErrorEventAfter {
            chunks: 2,
            kind: "overloaded_error".to_string(),
            message: "Overloaded".to_string(),
        });

        let stream = provider.chat_stream("frontier", &simple_request()).await.expect("stream starts");
        let (events, error) = drain(stream).await;
        assert_eq!(events, [delta("one "), delta("two ")], "{kind:?}");
        let error = error.expect("an error event ends the stream with an error");
        let ProviderError::Upstream { kind: error_kind, message } = &error else {
            panic!("{kind:?}: expected Upstream, got {error:?}");
        };
        assert_eq!(error_kind.as_deref(), Some("overloaded_error"));
        assert_eq!(message, "Overloaded");
        assert!(error.is_retryable());
    }

    let mock = MockProvider::start().await;
    let provider = provider(Kind::Anthropic, &mock);
    mock.push(Script::ErrorEventAfter {
        chunks: 0,
        kind: "invalid_request_error".to_string(),
        message: "prompt is too long".to_string(),
    });
    let stream = provider.chat_stream("frontier", &simple_request()).await.expect("stream starts");
    let (_, error) = drain(stream).await;
    let error = error.expect("error event");
    assert!(matches!(error, ProviderError::Upstream { .. }), "{error:?}");
    assert!(!error.is_retryable());
}

#[tokio::test]
async fn missing_key_names_variable() {
    let mock = MockProvider::start().await;
    let var = "TIERD_TEST_PROVIDERS_KEY_NEVER_SET";
    let text = config_text(Kind::Anthropic, &mock.base_url, "").replace(ANTHROPIC_KEY_VAR, var);
    let config: ProviderConfig = toml::from_str(&text).expect("valid provider TOML");

    let error = Provider::new(config).expect_err("missing key");
    let ProviderError::MissingKey { var: named, provider } = &error else {
        panic!("expected MissingKey, got {error:?}");
    };
    assert_eq!(named, var);
    assert_eq!(provider, "mock-anthropic");
    assert!(error.to_string().contains(var), "{error}");
    assert!(!error.is_retryable());
}

#[tokio::test]
async fn provider_without_key_env_sends_no_key() {
    let mock = MockProvider::start().await;
    let text = config_text(Kind::OpenAi, &mock.base_url, "").replace(&format!("api_key_env = \"{OPENAI_KEY_VAR}\"\n"), "");
    let config: ProviderConfig = toml::from_str(&text).expect("valid provider TOML");
    let provider = Provider::new(config).expect("provider without key");

    provider.chat("frontier", &simple_request()).await.expect("answer");
    assert!(!mock.single_request().headers.contains_key("authorization"));
}

#[tokio::test]
async fn debug_output_hides_key() {
    let mock = MockProvider::start().await;
    for kind in KINDS {
        let provider = provider(kind, &mock);
        let debug = format!("{provider:?}");
        assert!(!debug.contains(OPENAI_KEY), "{debug}");
        assert!(!debug.contains(ANTHROPIC_KEY), "{debug}");
        assert!(!debug.contains("0123456789"), "{debug}");
        assert!(!debug.contains("9876543210"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }
}

#[tokio::test]
async fn dropped_stream_closes_connection() {
    for kind in KINDS {
        let mock = MockProvider::start().await;
        let provider = provider(kind, &mock);
        mock.push(Script::StallAfter { chunks: 1 });

        let mut stream = provider.chat_stream("frontier", &simple_request()).await.expect("stream starts");
        let first = stream.next().await.expect("an item").expect("a delta");
        assert_eq!(first, delta("one "));
        drop(stream);

        assert!(
            mock.wait_for_closed(1, Duration::from_secs(5)).await,
            "{kind:?}: the mock still streams after the client dropped the stream"
        );
    }
}

#[tokio::test]
async fn dropped_request_closes_connection() {
    let mock = MockProvider::start().await;
    let provider = provider(Kind::OpenAi, &mock);
    mock.push(Script::HangBeforeHeaders);

    let pending = tokio::time::timeout(Duration::from_millis(200), provider.chat("frontier", &simple_request())).await;
    assert!(pending.is_err(), "the mock answered a hanging request: {pending:?}");

    assert!(
        mock.wait_for_closed(1, Duration::from_secs(5)).await,
        "the mock still waits after the client dropped the request"
    );
}

#[tokio::test]
async fn unknown_model_is_rejected() {
    let mock = MockProvider::start().await;
    let provider = provider(Kind::OpenAi, &mock);
    let error = provider.chat("no-such-model", &simple_request()).await.expect_err("unknown model");
    assert!(
        matches!(&error, ProviderError::UnknownModel { model, .. } if model == "no-such-model"),
        "{error:?}"
    );
    assert!(mock.requests().is_empty(), "nothing is sent for an unknown model");
}

#[tokio::test]
async fn refused_connection_is_retryable() {
    // A port that was just free on 127.0.0.1 and has no listener now.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let port = listener.local_addr().expect("local address").port();
    drop(listener);

    set_keys();
    let text = config_text(Kind::OpenAi, &format!("http://127.0.0.1:{port}/v1"), "");
    let provider = Provider::new(toml::from_str(&text).expect("valid provider TOML")).expect("provider");
    let error = provider.chat("frontier", &simple_request()).await.expect_err("refused");
    assert!(matches!(error, ProviderError::Connect { .. }), "{error:?}");
    assert!(error.is_retryable());
}

#[tokio::test]
async fn invalid_config_is_rejected() {
    set_keys();
    let text = config_text(Kind::OpenAi, "not a url", "");
    let config: ProviderConfig = toml::from_str(&text).expect("valid provider TOML");
    let error = Provider::new(config).expect_err("invalid base_url");
    assert!(matches!(&error, ProviderError::InvalidConfig(message) if message.contains("base_url")), "{error:?}");
}

#[tokio::test]
async fn echoed_key_is_scrubbed_from_errors() {
    for kind in KINDS {
        let mock = MockProvider::start().await;
        let key = match kind {
            Kind::OpenAi => OPENAI_KEY,
            Kind::Anthropic => ANTHROPIC_KEY,
        };
        mock.push(Script::Status {
            status: 401,
            body: format!(r#"{{"error":{{"message":"Incorrect API key provided: {key}","type":"invalid_request_error"}}}}"#),
            retry_after: None,
        });
        let error = provider(kind, &mock).chat("frontier", &simple_request()).await.expect_err("401");
        let text = error.to_string();
        assert!(!text.contains(key), "{kind:?}: the key leaked into the error: {text}");
        assert!(text.contains("<redacted>"), "{kind:?}: {text}");
    }
}
