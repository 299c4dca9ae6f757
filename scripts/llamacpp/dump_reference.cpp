// Writes llama.cpp's tokens, top logits and greedy continuation for a set of
// prompt files as JSON, for tierd's model tests (tests/golden/<model-id>.json).
//
// Each prompt is evaluated in one llama_decode call with logits for its last
// token only, and then one token is decoded per step. The next token is the
// argmax of the raw logits, with ties broken towards the lower id, and no
// sampler is involved. Every prompt gets a fresh context.
//
// Built and run by scripts/llamacpp-reference.sh; see that script for the
// arguments it passes.

#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Options {
    std::string model_path;
    std::string model_id;
    std::string model_file;
    std::string model_sha256;
    std::string package;
    std::string commit;
    std::string output_path;
    std::vector<std::string> prompt_paths;
    int threads = 2;
    int n_predict = 32;
    int top_k = 5;
    int n_ctx = 2048;
    // Off by default: llama.cpp's CPU flash attention rounds Q to f16, which
    // moves top logits by up to 0.4 on these models. The reference should be
    // the most exact result llama.cpp gives, not its fastest.
    llama_flash_attn_type flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    // Extra buffer types let ggml repack weights for the host (AMX, AVX
    // repacking). Off by default so that the reference comes from ggml's
    // plain CPU kernels, which depend less on the machine it runs on.
    // NOTE: with this build (GCC 12, -march=native) on a CPU with AMX_INT8,
    // turning them on crashes in ggml_backend_amx_mul_mat at ldtilecfg.
    bool use_extra_bufts = false;
};

struct Case {
    std::string prompt_name;
    std::vector<llama_token> tokens;
    std::vector<std::vector<llama_token_data>> step_top_logits;  // [0] is after the prompt
    std::vector<llama_token> greedy;
    bool stopped_at_eog = false;
    std::string greedy_text;
};

// Log lines from llama.cpp. Warnings and errors also go to stderr.
std::string g_log;

void log_callback(enum ggml_log_level level, const char * text, void * /*user_data*/) {
    g_log += text;
    if (level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR) {
        std::fputs(text, stderr);
    }
}

void print_usage(const char * program) {
    std::fprintf(stderr,
        "usage: %s --model PATH --model-id ID --model-file NAME --model-sha256 HEX\n"
        "          --package TEXT --commit TEXT --output PATH\n"
        "          [--threads N] [--n-predict N] [--top-k N] [--n-ctx N]\n"
        "          [--flash-attn auto|on|off] [--use-extra-bufts]\n"
        "          PROMPT.txt...\n"
        "\n"
        "  --threads N        CPU threads for prompt and generation (default 2)\n"
        "  --n-predict N      greedy tokens per prompt (default 32)\n"
        "  --top-k N          logits recorded per step (default 5)\n"
        "  --n-ctx N          context size and batch size in tokens (default 2048)\n"
        "  --flash-attn MODE  flash attention: auto, on or off (default off)\n"
        "  --use-extra-bufts  let ggml repack weights for this CPU (default off)\n",
        program);
}

int parse_positive_int(const std::string & flag, const std::string & value) {
    char * end = nullptr;
    const long parsed = std::strtol(value.c_str(), &end, 10);
    if (value.empty() || *end != '\0' || parsed <= 0 || parsed > 1000000) {
        throw std::runtime_error("invalid value '" + value + "' for " + flag + "; expected a positive integer");
    }
    return static_cast<int>(parsed);
}

Options parse_options(int argc, char ** argv) {
    Options options;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        auto next_value = [&]() -> std::string {
            if (i + 1 >= argc) {
                throw std::runtime_error("missing value for " + arg);
            }
            return argv[++i];
        };

        if (arg == "--model") {
            options.model_path = next_value();
        } else if (arg == "--model-id") {
            options.model_id = next_value();
        } else if (arg == "--model-file") {
            options.model_file = next_value();
        } else if (arg == "--model-sha256") {
            options.model_sha256 = next_value();
        } else if (arg == "--package") {
            options.package = next_value();
        } else if (arg == "--commit") {
            options.commit = next_value();
        } else if (arg == "--output") {
            options.output_path = next_value();
        } else if (arg == "--threads") {
            options.threads = parse_positive_int(arg, next_value());
        } else if (arg == "--n-predict") {
            options.n_predict = parse_positive_int(arg, next_value());
        } else if (arg == "--top-k") {
            options.top_k = parse_positive_int(arg, next_value());
        } else if (arg == "--n-ctx") {
            options.n_ctx = parse_positive_int(arg, next_value());
        } else if (arg == "--flash-attn") {
            const std::string mode = next_value();
            if (mode == "auto") {
                options.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_AUTO;
            } else if (mode == "on") {
                options.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
            } else if (mode == "off") {
                options.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
            } else {
                throw std::runtime_error("invalid value '" + mode + "' for --flash-attn; expected auto, on or off");
            }
        } else if (arg == "--use-extra-bufts") {
            options.use_extra_bufts = true;
        } else if (arg == "--help" || arg == "-h") {
            print_usage(argv[0]);
            std::exit(0);
        } else if (arg.rfind("--", 0) == 0) {
            throw std::runtime_error("unknown option " + arg);
        } else {
            options.prompt_paths.push_back(arg);
        }
    }

    const std::pair<const char *, const std::string *> required[] = {
        {"--model", &options.model_path},     {"--model-id", &options.model_id},
        {"--model-file", &options.model_file}, {"--model-sha256", &options.model_sha256},
        {"--package", &options.package},       {"--commit", &options.commit},
        {"--output", &options.output_path},
    };
    for (const auto & [flag, value] : required) {
        if (value->empty()) {
            throw std::runtime_error(std::string("missing required option ") + flag);
        }
    }
    if (options.prompt_paths.empty()) {
        throw std::runtime_error("no prompt files given");
    }
    return options;
}

std::string read_file(const std::string & path) {
    std::ifstream file(path, std::ios::binary);
    if (!file) {
        throw std::runtime_error("failed to open " + path);
    }
    return std::string(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
}

// Returns the file name of `path` without its directory and last extension.
std::string file_stem(const std::string & path) {
    const size_t slash = path.find_last_of('/');
    std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
    const size_t dot = name.find_last_of('.');
    return dot == std::string::npos || dot == 0 ? name : name.substr(0, dot);
}

std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text) {
    // add_special=true adds BOS (or EOS) where the GGUF sets add_bos (or add_eos), and
    // parse_special=false treats text such as "<|im_start|>" as plain text.
    const bool add_special = true;
    const bool parse_special = false;
    int32_t n = llama_tokenize(vocab, text.data(), static_cast<int32_t>(text.size()), nullptr, 0, add_special,
                               parse_special);
    if (n == INT32_MIN) {
        throw std::runtime_error("tokenization overflowed int32");
    }
    std::vector<llama_token> tokens(static_cast<size_t>(n < 0 ? -n : n));
    n = llama_tokenize(vocab, text.data(), static_cast<int32_t>(text.size()), tokens.data(),
                       static_cast<int32_t>(tokens.size()), add_special, parse_special);
    if (n < 0) {
        throw std::runtime_error("llama_tokenize failed with " + std::to_string(n));
    }
    tokens.resize(static_cast<size_t>(n));
    return tokens;
}

std::string detokenize(const llama_vocab * vocab, const std::vector<llama_token> & tokens) {
    // Special tokens (such as a final end-of-generation token) are not rendered.
    const bool remove_special = false;
    const bool unparse_special = false;
    std::string text(tokens.size() * 16 + 16, '\0');
    int32_t n = llama_detokenize(vocab, tokens.data(), static_cast<int32_t>(tokens.size()), text.data(),
                                 static_cast<int32_t>(text.size()), remove_special, unparse_special);
    if (n < 0) {
        text.resize(static_cast<size_t>(-n));
        n = llama_detokenize(vocab, tokens.data(), static_cast<int32_t>(tokens.size()), text.data(),
                             static_cast<int32_t>(text.size()), remove_special, unparse_special);
    }
    if (n < 0) {
        throw std::runtime_error("llama_detokenize failed with " + std::to_string(n));
    }
    text.resize(static_cast<size_t>(n));
    return text;
}

// Returns the `k` largest logits, ordered by logit descending and then by id
// ascending, so that element 0 is the greedy choice.
std::vector<llama_token_data> top_logits(const float * logits, int32_t n_vocab, int k) {
    std::vector<llama_token_data> all(static_cast<size_t>(n_vocab));
    for (int32_t id = 0; id < n_vocab; ++id) {
        if (!std::isfinite(logits[id])) {
            throw std::runtime_error("logit for token " + std::to_string(id) + " is not finite");
        }
        all[static_cast<size_t>(id)] = {id, logits[id], 0.0f};
    }
    const size_t n_top = std::min(static_cast<size_t>(k), all.size());
    std::partial_sort(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(n_top), all.end(),
                      [](const llama_token_data & a, const llama_token_data & b) {
                          return a.logit != b.logit ? a.logit > b.logit : a.id < b.id;
                      });
    all.resize(n_top);
    return all;
}

void decode_or_throw(llama_context * ctx, llama_batch batch, const std::string & description) {
    const int32_t status = llama_decode(ctx, batch);
    if (status != 0) {
        throw std::runtime_error("llama_decode failed with " + std::to_string(status) + " on " + description);
    }
}

llama_context_params make_context_params(const Options & options) {
    llama_context_params params = llama_context_default_params();
    params.n_ctx = static_cast<uint32_t>(options.n_ctx);
    params.n_batch = static_cast<uint32_t>(options.n_ctx);
    params.n_ubatch = static_cast<uint32_t>(options.n_ctx);
    params.n_seq_max = 1;
    params.n_threads = options.threads;
    params.n_threads_batch = options.threads;
    // Keep every cell of the sliding-window layers, so that the attention mask,
    // not cache eviction, decides what those layers see.
    params.swa_full = true;
    params.flash_attn_type = options.flash_attn_type;
    // An f32 KV cache, so that keys and values are not rounded to f16.
    params.type_k = GGML_TYPE_F32;
    params.type_v = GGML_TYPE_F32;
    params.no_perf = true;
    return params;
}

Case run_case(llama_model * model, const Options & options, const std::string & prompt_path) {
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);

    Case result;
    result.prompt_name = file_stem(prompt_path);
    result.tokens = tokenize(vocab, read_file(prompt_path));
    const int32_t n_prompt = static_cast<int32_t>(result.tokens.size());
    if (n_prompt == 0) {
        throw std::runtime_error(prompt_path + " produced no tokens");
    }
    if (n_prompt + options.n_predict > options.n_ctx) {
        throw std::runtime_error(prompt_path + " has " + std::to_string(n_prompt) + " tokens, which with " +
                                 std::to_string(options.n_predict) + " generated tokens exceeds n_ctx " +
                                 std::to_string(options.n_ctx));
    }

    llama_context * ctx = llama_init_from_model(model, make_context_params(options));
    if (ctx == nullptr) {
        throw std::runtime_error("llama_init_from_model failed");
    }

    // The whole prompt goes into one batch, with logits for the last token only.
    llama_batch batch = llama_batch_init(n_prompt, 0, 1);
    for (int32_t i = 0; i < n_prompt; ++i) {
        batch.token[i] = result.tokens[static_cast<size_t>(i)];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = i == n_prompt - 1;
    }
    batch.n_tokens = n_prompt;

    try {
        decode_or_throw(ctx, batch, "the prompt of " + prompt_path);
        for (int step = 0; step < options.n_predict; ++step) {
            const float * logits = llama_get_logits_ith(ctx, -1);
            if (logits == nullptr) {
                throw std::runtime_error("llama_get_logits_ith returned no logits");
            }
            result.step_top_logits.push_back(top_logits(logits, n_vocab, options.top_k));
            const llama_token next = result.step_top_logits.back()[0].id;
            result.greedy.push_back(next);
            if (llama_vocab_is_eog(vocab, next)) {
                result.stopped_at_eog = true;
                break;
            }
            if (step + 1 == options.n_predict) {
                break;
            }

            batch.token[0] = next;
            batch.pos[0] = n_prompt + step;
            batch.n_seq_id[0] = 1;
            batch.seq_id[0][0] = 0;
            batch.logits[0] = 1;
            batch.n_tokens = 1;
            decode_or_throw(ctx, batch, "greedy step " + std::to_string(step + 1) + " of " + prompt_path);
        }
    } catch (...) {
        llama_batch_free(batch);
        llama_free(ctx);
        throw;
    }

    llama_batch_free(batch);
    llama_free(ctx);
    result.greedy_text = detokenize(vocab, result.greedy);
    return result;
}

// Appends `text` as a JSON string. Bytes that are not valid UTF-8 (a token
// boundary can split a multi-byte character) become U+FFFD.
void append_json_string(std::string & out, const std::string & text) {
    out += '"';
    size_t i = 0;
    while (i < text.size()) {
        const unsigned char c = static_cast<unsigned char>(text[i]);
        if (c == '"' || c == '\\') {
            out += '\\';
            out += static_cast<char>(c);
            ++i;
        } else if (c == '\n') {
            out += "\\n";
            ++i;
        } else if (c == '\t') {
            out += "\\t";
            ++i;
        } else if (c == '\r') {
            out += "\\r";
            ++i;
        } else if (c < 0x20 || c == 0x7f) {
            char escape[8];
            std::snprintf(escape, sizeof(escape), "\\u%04x", c);
            out += escape;
            ++i;
        } else if (c < 0x80) {
            out += static_cast<char>(c);
            ++i;
        } else {
            // Validate one UTF-8 sequence: its length, continuation bytes, and
            // no overlong forms, surrogates or code points above U+10FFFF.
            size_t length = 0;
            unsigned int code_point = 0;
            if (c >= 0xc2 && c <= 0xdf) {
                length = 2;
                code_point = c & 0x1f;
            } else if (c >= 0xe0 && c <= 0xef) {
                length = 3;
                code_point = c & 0x0f;
            } else if (c >= 0xf0 && c <= 0xf4) {
                length = 4;
                code_point = c & 0x07;
            }
            bool valid = length != 0 && i + length <= text.size();
            for (size_t j = 1; valid && j < length; ++j) {
                const unsigned char continuation = static_cast<unsigned char>(text[i + j]);
                valid = (continuation & 0xc0) == 0x80;
                code_point = (code_point << 6) | (continuation & 0x3f);
            }
            if (valid) {
                valid = !(length == 3 && code_point < 0x800) && !(length == 4 && code_point < 0x10000) &&
                        !(code_point >= 0xd800 && code_point <= 0xdfff) && code_point <= 0x10ffff;
            }
            if (valid) {
                out.append(text, i, length);
                i += length;
            } else {
                out += "\xef\xbf\xbd";
                ++i;
            }
        }
    }
    out += '"';
}

// Formats a float with enough digits to read back the same float.
std::string format_logit(float value) {
    char buffer[32];
    std::snprintf(buffer, sizeof(buffer), "%.9g", static_cast<double>(value));
    return buffer;
}

void append_top_logits(std::string & out, const std::vector<llama_token_data> & top) {
    out += '[';
    for (size_t i = 0; i < top.size(); ++i) {
        out += i == 0 ? "[" : ", [";
        out += std::to_string(top[i].id) + ", " + format_logit(top[i].logit) + "]";
    }
    out += ']';
}

void append_tokens(std::string & out, const std::vector<llama_token> & tokens) {
    out += '[';
    for (size_t i = 0; i < tokens.size(); ++i) {
        if (i != 0) {
            out += ", ";
        }
        out += std::to_string(tokens[i]);
    }
    out += ']';
}

void append_case(std::string & out, const Case & c) {
    out += "    {\n      \"prompt\": ";
    append_json_string(out, c.prompt_name);
    out += ",\n      \"tokens\": ";
    append_tokens(out, c.tokens);
    out += ",\n      \"top_logits\": ";
    append_top_logits(out, c.step_top_logits.front());
    out += ",\n      \"greedy\": ";
    append_tokens(out, c.greedy);
    out += ",\n      \"stopped_at_eog\": ";
    out += c.stopped_at_eog ? "true" : "false";
    out += ",\n      \"greedy_top_logits\": [\n";
    for (size_t i = 0; i < c.step_top_logits.size(); ++i) {
        out += "        ";
        append_top_logits(out, c.step_top_logits[i]);
        out += i + 1 == c.step_top_logits.size() ? "\n" : ",\n";
    }
    out += "      ],\n      \"greedy_text\": ";
    append_json_string(out, c.greedy_text);
    out += "\n    }";
}

// Returns "enabled", "disabled" or "unknown" for flash attention. llama.cpp
// reports how it resolved "auto" only in its context log.
std::string resolved_flash_attention(llama_flash_attn_type requested) {
    if (requested == LLAMA_FLASH_ATTN_TYPE_DISABLED) {
        return "disabled";
    }
    if (requested == LLAMA_FLASH_ATTN_TYPE_ENABLED) {
        return "enabled";
    }
    if (g_log.find("Flash Attention enabled") != std::string::npos) {
        return "enabled";
    }
    if (g_log.find("Flash Attention not supported") != std::string::npos) {
        return "disabled";
    }
    return "unknown";
}

std::string render_json(const Options & options, const std::vector<Case> & cases) {
    const llama_context_params params = make_context_params(options);
    std::string out = "{\n  \"llama_cpp\": {\"package\": ";
    append_json_string(out, options.package);
    out += ", \"commit\": ";
    append_json_string(out, options.commit);
    out += "},\n  \"model\": {\"id\": ";
    append_json_string(out, options.model_id);
    out += ", \"file\": ";
    append_json_string(out, options.model_file);
    out += ", \"sha256\": ";
    append_json_string(out, options.model_sha256);
    out += "},\n  \"threads\": " + std::to_string(options.threads) + ",\n";

    out += "  \"params\": {";
    out += "\"n_ctx\": " + std::to_string(params.n_ctx);
    out += ", \"n_batch\": " + std::to_string(params.n_batch);
    out += ", \"n_ubatch\": " + std::to_string(params.n_ubatch);
    out += ", \"n_threads\": " + std::to_string(params.n_threads);
    out += ", \"n_threads_batch\": " + std::to_string(params.n_threads_batch);
    out += ", \"swa_full\": ";
    out += params.swa_full ? "true" : "false";
    out += ", \"flash_attn_type\": ";
    append_json_string(out, llama_flash_attn_type_name(params.flash_attn_type));
    out += ", \"flash_attn_resolved\": ";
    append_json_string(out, resolved_flash_attention(params.flash_attn_type));
    out += ", \"type_k\": ";
    append_json_string(out, ggml_type_name(params.type_k));
    out += ", \"type_v\": ";
    append_json_string(out, ggml_type_name(params.type_v));
    out += ", \"use_extra_bufts\": ";
    out += options.use_extra_bufts ? "true" : "false";
    out += ", \"n_predict\": " + std::to_string(options.n_predict);
    out += ", \"top_k\": " + std::to_string(options.top_k);
    out += ", \"add_special\": true, \"parse_special\": false";
    out += "},\n  \"system_info\": ";
    append_json_string(out, llama_print_system_info());
    out += ",\n  \"cases\": [\n";
    for (size_t i = 0; i < cases.size(); ++i) {
        append_case(out, cases[i]);
        out += i + 1 == cases.size() ? "\n" : ",\n";
    }
    out += "  ]\n}\n";
    return out;
}

int run(int argc, char ** argv) {
    const Options options = parse_options(argc, argv);

    llama_log_set(log_callback, nullptr);
    llama_backend_init();

    llama_model_params model_params = llama_model_default_params();
    model_params.n_gpu_layers = 0;
    model_params.use_extra_bufts = options.use_extra_bufts;
    llama_model * model = llama_model_load_from_file(options.model_path.c_str(), model_params);
    if (model == nullptr) {
        throw std::runtime_error("failed to load model " + options.model_path);
    }

    std::vector<Case> cases;
    try {
        for (const std::string & path : options.prompt_paths) {
            cases.push_back(run_case(model, options, path));
            const Case & c = cases.back();
            std::fprintf(stderr, "%s/%s: %zu prompt tokens, %zu generated\n", options.model_id.c_str(),
                         c.prompt_name.c_str(), c.tokens.size(), c.greedy.size());
        }
    } catch (...) {
        llama_model_free(model);
        throw;
    }
    llama_model_free(model);

    const std::string json = render_json(options, cases);
    std::ofstream output(options.output_path, std::ios::binary);
    output << json;
    output.close();
    if (!output) {
        throw std::runtime_error("failed to write " + options.output_path);
    }
    llama_backend_free();
    return 0;
}

}  // namespace

int main(int argc, char ** argv) {
    try {
        return run(argc, argv);
    } catch (const std::exception & error) {
        std::fprintf(stderr, "dump_reference: error: %s\n", error.what());
        return 1;
    }
}
