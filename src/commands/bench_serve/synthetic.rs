//! Synthetic prompts of a given length, cut from real English text. Each prompt starts at a
//! different place in the text, so that no two share a prefix that a server's prompt cache
//! could reuse.

use tokenizers::Tokenizer;

/// English text the prompts are cut from; repeated when a prompt is longer.
const TEXT: &str = include_str!("../../../tests/golden/prompts/long.txt");

/// Tokens per English word of typical BPE vocabularies, used when no tokenizer is at hand.
const TOKENS_PER_WORD: f64 = 1.3;

/// Words (or tokens) between the starts of consecutive prompts, at least; see `stride`.
const STRIDE: usize = 37;

/// Start positions tried per prompt, and cut adjustments tried per start, before the closest
/// prompt is kept.
const START_TRIES: usize = 16;
const ADJUSTMENTS: usize = 4;

/// Returns `count` prompts of `tokens` tokens each, as `tokenizer` counts them.
///
/// Text cut at a token boundary can tokenize differently once decoded, so each prompt is
/// re-encoded and its cut moved until the count matches. The result is `Ok` with the prompts
/// and the largest difference left, which is 0 unless that search failed for some prompt.
pub fn exact(tokenizer: &Tokenizer, tokens: usize, count: usize) -> anyhow::Result<(Vec<String>, usize)> {
    let ids = tokenizer
        .encode_fast(TEXT, false)
        .map_err(|e| anyhow::anyhow!("failed to tokenize the synthetic prompt text: {e}"))?
        .get_ids()
        .to_vec();
    anyhow::ensure!(!ids.is_empty(), "the synthetic prompt text tokenized to nothing");

    let count_tokens = |text: &str| -> anyhow::Result<usize> {
        let encoding = tokenizer
            .encode_fast(text, false)
            .map_err(|e| anyhow::anyhow!("failed to tokenize a synthetic prompt: {e}"))?;
        Ok(encoding.get_ids().len())
    };
    let stride = stride(ids.len());
    let mut prompts = Vec::with_capacity(count);
    let mut worst = 0;
    for index in 0..count {
        let mut best: Option<(usize, String)> = None;
        // A cut can flip between one token too many and one too few, so a few later starts
        // are tried before settling for the closest prompt.
        for shift in 0..START_TRIES {
            let start = (index * stride + shift) % ids.len();
            let mut take = tokens;
            for _ in 0..ADJUSTMENTS {
                let slice: Vec<u32> = ids.iter().copied().cycle().skip(start).take(take).collect();
                let text = tokenizer
                    .decode(&slice, true)
                    .map_err(|e| anyhow::anyhow!("failed to decode a synthetic prompt: {e}"))?;
                let counted = count_tokens(&text)?;
                let miss = counted.abs_diff(tokens);
                if best.as_ref().is_none_or(|(best_miss, _)| miss < *best_miss) {
                    best = Some((miss, text));
                }
                if miss == 0 {
                    break;
                }
                take = if counted > tokens { take.saturating_sub(counted - tokens).max(1) } else { take + (tokens - counted) };
            }
            if best.as_ref().is_some_and(|(miss, _)| *miss == 0) {
                break;
            }
        }
        if let Some((miss, text)) = best {
            worst = worst.max(miss);
            prompts.push(text);
        }
    }
    Ok((prompts, worst))
}

/// Returns `count` prompts of about `tokens` tokens each, assuming 1.3 tokens per English word.
pub fn approximate(tokens: usize, count: usize) -> Vec<String> {
    let words: Vec<&str> = TEXT.split_whitespace().collect();
    let length = ((tokens as f64 / TOKENS_PER_WORD).round() as usize).max(1);
    let stride = stride(words.len());
    (0..count)
        .map(|index| {
            let start = (index * stride) % words.len();
            let slice: Vec<&str> = words.iter().copied().cycle().skip(start).take(length).collect();
            slice.join(" ")
        })
        .collect()
}

/// Returns the smallest step from `STRIDE` up that shares no factor with `length`, so that the
/// first `length` prompts all start at different places. With a step that divides into the
/// length, prompts would repeat after `length / step` of them, and a server's prompt cache
/// would answer the repeats.
fn stride(length: usize) -> usize {
    let mut step = STRIDE;
    while greatest_common_divisor(step, length) != 1 {
        step += 1;
    }
    step
}

fn greatest_common_divisor(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approximate_prompts_differ_from_their_first_word() {
        let prompts = approximate(130, 3);
        assert_eq!(prompts.len(), 3);
        for prompt in &prompts {
            assert_eq!(prompt.split_whitespace().count(), 100, "{prompt}");
        }
        assert_ne!(prompts[0].split_whitespace().next(), prompts[1].split_whitespace().next());
    }

    #[test]
    fn stride_shares_no_factor_with_the_length() {
        // 740 = 20 × 37, so a step of 37 would repeat every 20 prompts.
        for length in [740, 37, 74 * 3, 619, 1] {
            let step = stride(length);
            assert_eq!(greatest_common_divisor(step, length), 1, "length {length}, step {step}");
            let starts: std::collections::HashSet<usize> = (0..length).map(|i| (i * step) % length).collect();
            assert_eq!(starts.len(), length, "length {length}, step {step}");
        }
        assert_eq!(stride(740), 39);
    }

    #[test]
    fn approximate_prompt_longer_than_the_text_repeats_it() {
        let words = TEXT.split_whitespace().count();
        let prompts = approximate(words * 3, 1);
        assert!(prompts[0].split_whitespace().count() > words * 2);
    }
}
