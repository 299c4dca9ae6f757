//! Text generation on loaded models: chat templates, sampling, stop strings, the decode loop,
//! the per-model worker threads that run it and the prompt prefix cache each worker keeps.

pub mod chat_template;
pub mod generate;
pub mod prompt_cache;
pub mod sampler;
pub mod stop;
pub mod queue;
pub mod worker;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use generate::{FinishReason, GenerationEvent, GenerationRequest, TokenLogprob};
pub use prompt_cache::{PromptCache, PromptCacheConfig, PromptCacheStats};
pub use sampler::SamplingParams;
pub use queue::QueueFull;
pub use worker::ModelWorker;
