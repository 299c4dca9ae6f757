//! Detection and redaction of personal data (PII) in request text.
//!
//! A request in which [`detect`] finds anything must not reach a remote provider as it is. The
//! router serves it with the local model, or sends the redacted normalized text where the task
//! allows that. [`detect`] folds fullwidth forms into ASCII (NFKC) and removes invisible
//! characters before the detectors run, so `jane＠example.com` and `４１１１…` are found.
//! The detectors cover e-mail addresses, phone numbers, payment card numbers, Hong Kong identity
//! card (HKID) numbers and IBANs. Each detector documents its rule and the rule's source.
//!
//! Boundaries are ASCII. A match may directly follow or precede non-ASCII text, so the phone
//! number in `電話91234567` is found, but not an ASCII letter, digit or underscore.
//!
//! NOTE: digits of other scripts (such as Arabic-Indic), numbers split across lines, spelled-out
//! numbers and obfuscations such as `jane at example dot com` pass.

use std::fmt;
use std::sync::LazyLock;

use regex::{Captures, Regex};
use serde::Serialize;

/// Kind of personal data that a [`PiiMatch`] covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiKind {
    Email,
    Phone,
    PaymentCard,
    Hkid,
    Iban,
}

impl PiiKind {
    /// Returns the snake_case name that serde also writes.
    pub fn as_str(self) -> &'static str {
        match self {
            PiiKind::Email => "email",
            PiiKind::Phone => "phone",
            PiiKind::PaymentCard => "payment_card",
            PiiKind::Hkid => "hkid",
            PiiKind::Iban => "iban",
        }
    }

    /// Returns the text that [`redact`] puts in place of a match of this kind.
    pub fn placeholder(self) -> &'static str {
        match self {
            PiiKind::Email => "[EMAIL]",
            PiiKind::Phone => "[PHONE]",
            PiiKind::PaymentCard => "[CARD]",
            PiiKind::Hkid => "[HKID]",
            PiiKind::Iban => "[IBAN]",
        }
    }

    /// Rank that names a merged match, lowest first. Kinds validated by a checksum outrank
    /// pattern-only kinds, and an IBAN outranks a card because an IBAN's digits can contain a
    /// Luhn-valid run.
    fn rank(self) -> u8 {
        match self {
            PiiKind::Iban => 0,
            PiiKind::Hkid => 1,
            PiiKind::PaymentCard => 2,
            PiiKind::Email => 3,
            PiiKind::Phone => 4,
        }
    }
}

impl fmt::Display for PiiKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Personal data found in a text, as byte offsets `start..end` that lie on char boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct PiiMatch {
    pub kind: PiiKind,
    pub start: usize,
    pub end: usize,
}

/// Finds personal data in `text`.
///
/// Returns matches sorted by `start` that do not overlap. The detectors run independently, and
/// candidates that share at least one byte are merged into one match over their union, so a
/// redaction never leaves part of a detected item in the text. The merged match takes the kind
/// that ranks first in the order IBAN, HKID, payment card, e-mail, phone. For example, a
/// Luhn-valid `+4222222222222` is both an international phone number and a card, and becomes one
/// card match that includes the `+`. Matches that only touch stay separate.
///
/// Runs in time linear in the length of `text`: the `regex` crate matches in linear time, a
/// rejected match is rescanned only where matches are short or cannot overlap, and each digit
/// group starts at most 19 card windows.
pub fn find_pii(text: &str) -> Vec<PiiMatch> {
    let mut candidates = Vec::new();
    find_emails(text, &mut candidates);
    find_phones(text, &mut candidates);
    find_cards(text, &mut candidates);
    find_hkids(text, &mut candidates);
    find_ibans(text, &mut candidates);
    merge_overlaps(candidates)
}

/// Personal data found in a text, with the normalized text that the matches' offsets refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    pub text: String,
    pub matches: Vec<PiiMatch>,
}

impl Detection {
    pub fn is_empty(&self) -> bool {
        self.matches.is_empty()
    }

    /// Returns the normalized text with each match replaced by its placeholder.
    pub fn redacted(&self) -> String {
        redact(&self.text, &self.matches)
    }
}

/// Characters that render as nothing and would split an item, such as a zero-width space
/// inside an e-mail address.
const INVISIBLE: [char; 6] = ['\u{00AD}', '\u{200B}', '\u{200C}', '\u{200D}', '\u{2060}', '\u{FEFF}'];

/// Finds personal data in `text` after NFKC normalization, which folds fullwidth forms such as
/// `＠` and `４` into ASCII, and after removing invisible characters.
pub fn detect(text: &str) -> Detection {
    use unicode_normalization::UnicodeNormalization;
    let normalized: String = text.nfkc().filter(|c| !INVISIBLE.contains(c)).collect();
    let matches = find_pii(&normalized);
    Detection {
        text: normalized,
        matches,
    }
}

/// Returns `text` with each match replaced by its kind's placeholder, such as `[EMAIL]`.
///
/// `matches` is normally the output of [`find_pii`], but any slice is accepted without panicking.
/// Matches may come in any order. An offset past the end is clamped to the end, an offset inside
/// a multi-byte character widens the match to cover that character, and a match whose `start` is
/// after its `end` covers the bytes between the two. Overlapping matches are covered by a single
/// placeholder, named by the one that starts first (on a tie, the higher-ranked kind). Empty
/// matches are ignored.
pub fn redact(text: &str, matches: &[PiiMatch]) -> String {
    let mut spans: Vec<PiiMatch> = matches
        .iter()
        .map(|pii| snap_to_char_boundaries(text, pii))
        .filter(|span| span.start < span.end)
        .collect();
    spans.sort_by_key(|span| (span.start, span.kind.rank()));

    // Every offset below is a char boundary of `text` and `cursor <= span.start <= text.len()`
    // when slicing, so the slices cannot panic.
    let mut redacted = String::with_capacity(text.len());
    let mut cursor = 0;
    for span in spans {
        if span.start >= cursor {
            redacted.push_str(&text[cursor..span.start]);
            redacted.push_str(span.kind.placeholder());
            cursor = span.end;
        } else if span.end > cursor {
            cursor = span.end;
        }
    }
    redacted.push_str(&text[cursor..]);
    redacted
}

/// Returns `pii` with its offsets ordered, clamped to `text` and widened to char boundaries.
fn snap_to_char_boundaries(text: &str, pii: &PiiMatch) -> PiiMatch {
    let mut start = pii.start.min(pii.end).min(text.len());
    let mut end = pii.start.max(pii.end).min(text.len());
    // Both loops stop at the latest at 0 and `text.len()`, which are always char boundaries.
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    while !text.is_char_boundary(end) {
        end += 1;
    }
    PiiMatch {
        kind: pii.kind,
        start,
        end,
    }
}

/// Merges overlapping candidates into one match over their union, with the kind of the
/// highest-ranked candidate. The result does not depend on the order of `candidates`.
fn merge_overlaps(mut candidates: Vec<PiiMatch>) -> Vec<PiiMatch> {
    candidates.sort_by_key(|candidate| (candidate.start, candidate.end, candidate.kind.rank()));

    let mut merged: Vec<PiiMatch> = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        if let Some(last) = merged.last_mut() {
            if candidate.start < last.end {
                last.end = last.end.max(candidate.end);
                if candidate.kind.rank() < last.kind.rank() {
                    last.kind = candidate.kind;
                }
                continue;
            }
        }
        merged.push(candidate);
    }
    merged
}

// ---------------------------------------------------------------------------------------------
// Context checks shared by the detectors
// ---------------------------------------------------------------------------------------------

/// Characters that join the parts of one number (`1.5`, `3,000`, `1/2`, `12-34`). A numeric match
/// must not start right after one of them that follows a digit, nor end right before one of them
/// that precedes a digit.
const NUMBER_JOINERS: &[char] = &['.', ',', '/', '-'];

/// [`NUMBER_JOINERS`] plus the space, for bare Hong Kong numbers, so that `5555 5555` inside
/// `5555 5555 5555 4444`, or any longer run of digit groups, is not taken for a phone number.
const GROUP_JOINERS: &[char] = &['.', ',', '/', '-', ' '];

fn is_ascii_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Checks whether a match starting at `start` would continue a longer word or number, that is,
/// whether the character before it is an ASCII letter, digit or underscore, or one of `joiners`
/// with a digit before it.
fn is_joined_before(text: &str, start: usize, joiners: &[char]) -> bool {
    let mut preceding = text.get(..start).unwrap_or("").chars().rev();
    match preceding.next() {
        Some(c) if is_ascii_word_char(c) => true,
        Some(c) if joiners.contains(&c) => preceding.next().is_some_and(|c| c.is_ascii_digit()),
        _ => false,
    }
}

/// Checks whether a match ending at `end` would stop inside a longer word or number, the mirror
/// image of [`is_joined_before`].
fn is_joined_after(text: &str, end: usize, joiners: &[char]) -> bool {
    let mut following = text.get(end..).unwrap_or("").chars();
    match following.next() {
        Some(c) if is_ascii_word_char(c) => true,
        Some(c) if joiners.contains(&c) => following.next().is_some_and(|c| c.is_ascii_digit()),
        _ => false,
    }
}

/// Returns the byte offset just past the character at `index`, or `text.len() + 1` at the end.
fn next_char_start(text: &str, index: usize) -> usize {
    match text.get(index..).and_then(|rest| rest.chars().next()) {
        Some(c) => index + c.len_utf8(),
        None => text.len() + 1,
    }
}

/// Calls `accept` on each leftmost match of `regex`. `accept` returns where the accepted data
/// ends, or `None` to reject the match. After a rejection the search resumes one character after
/// the rejected match's start, so a valid candidate that overlaps a rejected one is still tried.
///
/// Each retry rescans the rejected match, so this is linear only for patterns whose matches are
/// short (at most a few dozen bytes) or cannot overlap (the international phone pattern contains
/// its leading `+` once). Unbounded patterns such as the e-mail one use `find_iter` instead.
fn scan_with_retry(
    regex: &Regex,
    text: &str,
    mut accept: impl FnMut(&Captures<'_>) -> Option<usize>,
) {
    let mut position = 0;
    while position <= text.len() {
        let Some(captures) = regex.captures_at(text, position) else {
            break;
        };
        let Some(whole) = captures.get(0) else {
            break;
        };
        let retry_from = next_char_start(text, whole.start());
        position = match accept(&captures) {
            Some(end) => end.max(retry_from),
            None => retry_from,
        };
    }
}

fn count_ascii_digits(text: &str) -> usize {
    text.bytes().filter(u8::is_ascii_digit).count()
}

// ---------------------------------------------------------------------------------------------
// E-mail addresses
// ---------------------------------------------------------------------------------------------

/// `atext` from RFC 5322 section 3.2.3: the characters of a dot-atom other than the dot.
const ATEXT: &str = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]";

/// A practical subset of RFC 5322 `addr-spec`. The local part is a dot-atom (atext runs joined
/// by single dots, so no leading, trailing or doubled dot). The domain is one or more host labels
/// as in RFC 1123 (letters, digits and inner hyphens, at most 63 characters) and a final label of
/// 2 to 63 letters.
///
/// NOTE: quoted local parts, address literals such as `[192.0.2.1]`, internationalised addresses
/// (RFC 6531) and IDN top-level domains (`xn--p1ai`) are not detected.
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    let local_part = format!(r"{ATEXT}+(?:\.{ATEXT}+)*");
    let domain = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}";
    Regex::new(&format!("{local_part}@{domain}")).expect("the e-mail pattern is a valid regex")
});

/// Characters of `atext` other than ASCII letters and digits.
const ATEXT_SYMBOLS: &str = "!#$%&'*+/=?^_`{|}~-";

/// Adds the e-mail addresses in `text` that are not part of a longer word. The leftmost match
/// already takes every atext character before the `@`, so a match that still follows an atext
/// character, a dot or an `@` sits inside something that is not an address (`a..b@example.com`).
/// A match followed by an ASCII letter, digit, underscore or `@` is rejected too
/// (`jane@example.com2`).
fn find_emails(text: &str, found: &mut Vec<PiiMatch>) {
    for address in EMAIL.find_iter(text) {
        let before = text
            .get(..address.start())
            .unwrap_or("")
            .chars()
            .next_back();
        let after = text.get(address.end()..).unwrap_or("").chars().next();

        let joined_before = before.is_some_and(|c| {
            c.is_ascii_alphanumeric() || c == '.' || c == '@' || ATEXT_SYMBOLS.contains(c)
        });
        let joined_after = after.is_some_and(|c| is_ascii_word_char(c) || c == '@');
        if joined_before || joined_after {
            continue;
        }
        found.push(PiiMatch {
            kind: PiiKind::Email,
            start: address.start(),
            end: address.end(),
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Phone numbers
// ---------------------------------------------------------------------------------------------

/// International format: `+`, a country code that does not start with 0, then digit groups
/// separated by at most one space, dot or hyphen, or by a parenthesized group of up to four
/// digits such as the `(0)` in `+44 (0)20 7946 0958`. [`find_phones`] then requires 8 to 15
/// digits in total, 15 being the maximum length of an ITU-T E.164 number.
static INTERNATIONAL_PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\+[1-9][0-9]*(?:(?:[ .\-]?\([0-9]{1,4}\)[ .\-]?|[ .\-])[0-9]+)*")
        .expect("the international phone pattern is a valid regex")
});

/// Hong Kong numbers: an optional `+852`, `852`, `(852)` or `(+852)` prefix, then eight digits
/// that start with 2 or 3 (fixed lines) or 5, 6, 7, 8 or 9 (mobile, paging and other services),
/// written as `2123 4567`, `2123-4567` or `21234567`.
///
/// NOTE: the Communications Authority's 2015 consultation paper "More Efficient Utilisation of
/// the 8-digit Numbering Plan" proposed opening the 4X level to mobile numbers. A number that
/// starts with 4 is found only in international format (`+852 4123 4567`).
static HONG_KONG_PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?P<prefix>(?:\+852|\(\+?852\)|852)[ \-]?)?[235-9][0-9]{3}[ \-]?[0-9]{4}")
        .expect("the Hong Kong phone pattern is a valid regex")
});

/// North American Numbering Plan: `(555) 123-4567`, `555-123-4567` or `555.123.4567`, with an
/// optional `1` trunk prefix. Area codes start with 2 to 9. Bare ten-digit runs are not matched
/// because they are indistinguishable from order or account numbers.
static NORTH_AMERICAN_PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"(?:1[ \-.])?(?:",
        r"\([2-9][0-9]{2}\) ?[0-9]{3}[ \-.][0-9]{4}",
        r"|[2-9][0-9]{2}-[0-9]{3}-[0-9]{4}",
        r"|[2-9][0-9]{2}\.[0-9]{3}\.[0-9]{4}",
        r")"
    ))
    .expect("the North American phone pattern is a valid regex")
});

/// Adds the phone numbers in `text` that are not part of a longer number or word.
fn find_phones(text: &str, found: &mut Vec<PiiMatch>) {
    scan_with_retry(&INTERNATIONAL_PHONE, text, |captures| {
        let number = captures.get(0)?;
        if !(8..=15).contains(&count_ascii_digits(number.as_str())) {
            return None;
        }
        if is_joined_before(text, number.start(), NUMBER_JOINERS)
            || is_joined_after(text, number.end(), NUMBER_JOINERS)
        {
            return None;
        }
        found.push(PiiMatch {
            kind: PiiKind::Phone,
            start: number.start(),
            end: number.end(),
        });
        Some(number.end())
    });

    scan_with_retry(&HONG_KONG_PHONE, text, |captures| {
        let number = captures.get(0)?;
        let prefix = captures.name("prefix");

        // Without a prefix, eight digits are plausible as many other things, so the number
        // must stand alone: not a group within a longer run of digit groups, not a date.
        let before_joiners = if prefix.is_some() {
            NUMBER_JOINERS
        } else {
            GROUP_JOINERS
        };
        if is_joined_before(text, number.start(), before_joiners)
            || is_joined_after(text, number.end(), GROUP_JOINERS)
        {
            return None;
        }
        let local_start = prefix.map_or(number.start(), |prefix| prefix.end());
        if prefix.is_none() && looks_like_date(&text[local_start..number.end()]) {
            return None;
        }
        found.push(PiiMatch {
            kind: PiiKind::Phone,
            start: number.start(),
            end: number.end(),
        });
        Some(number.end())
    });

    scan_with_retry(&NORTH_AMERICAN_PHONE, text, |captures| {
        let number = captures.get(0)?;
        if is_joined_before(text, number.start(), NUMBER_JOINERS)
            || is_joined_after(text, number.end(), NUMBER_JOINERS)
        {
            return None;
        }
        found.push(PiiMatch {
            kind: PiiKind::Phone,
            start: number.start(),
            end: number.end(),
        });
        Some(number.end())
    });
}

/// Checks whether an eight-digit local number reads as a date or a year range: bare digits as
/// `YYYYMMDD` (`20240115`), or two groups as two years (`2023-2024`), with years 1900 to 2099.
///
/// NOTE: a real Hong Kong number of that shape (`2012 2013`) is missed unless it carries a
/// `+852`, `852` or `(852)` prefix.
fn looks_like_date(local_number: &str) -> bool {
    let digits: Vec<u32> = local_number
        .chars()
        .filter_map(|c| c.to_digit(10))
        .collect();
    if digits.len() != 8 {
        return false;
    }
    let value = |digits: &[u32]| digits.iter().fold(0, |total, digit| total * 10 + digit);
    let is_year = |year: u32| (1900..=2099).contains(&year);

    let first_group = value(&digits[..4]);
    if local_number.len() == 8 {
        let month = value(&digits[4..6]);
        let day = value(&digits[6..]);
        is_year(first_group) && (1..=12).contains(&month) && (1..=31).contains(&day)
    } else {
        is_year(first_group) && is_year(value(&digits[4..]))
    }
}

// ---------------------------------------------------------------------------------------------
// Payment cards
// ---------------------------------------------------------------------------------------------

/// Runs of ASCII digit groups joined by single spaces or hyphens: the text in which
/// [`find_cards`] looks for card numbers.
static DIGIT_GROUPS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[0-9]+(?:[ \-][0-9]+)*").expect("the digit group pattern is a valid regex")
});

/// Adds the payment card numbers in `text`: 13 to 19 digits, optionally grouped by single spaces
/// or hyphens, that start with 2 to 6 and pass the Luhn check of ISO/IEC 7812-1. The first digit
/// is 2 or 5 for Mastercard, 3 for American Express, Diners Club and JCB, 4 for Visa, and 6 for
/// Discover and UnionPay.
///
/// A card can sit in a longer run of groups, as in `4242 4242 4242 4242 123` with a CVC after it,
/// so every window of whole consecutive groups with 13 to 19 digits is tested, not only the whole
/// run. Each group starts at most 19 windows. A run that continues a word or a decimal number
/// (`ID4242...`, `0.4242...`) yields no window at that end.
///
/// NOTE: the leading digit is the only issuer check. Card numbers starting with 1, 7, 8 or 9
/// (such as airline UATP cards, which start with 1) and numbers grouped by other characters
/// (`4242/4242/...`) are not detected.
fn find_cards(text: &str, found: &mut Vec<PiiMatch>) {
    for run in DIGIT_GROUPS.find_iter(text) {
        let groups = group_spans(run.start(), run.as_str());
        let first_group_allowed = !is_joined_before(text, run.start(), NUMBER_JOINERS);
        let last_group_allowed = !is_joined_after(text, run.end(), NUMBER_JOINERS);
        let last_index = groups.len() - 1;

        for (first, &(window_start, _)) in groups.iter().enumerate() {
            if first == 0 && !first_group_allowed {
                continue;
            }
            let mut digit_count = 0;
            for (last, &(group_start, window_end)) in groups.iter().enumerate().skip(first) {
                digit_count += window_end - group_start;
                if digit_count > 19 {
                    break;
                }
                if digit_count < 13 || (last == last_index && !last_group_allowed) {
                    continue;
                }
                if is_card_number(&text[window_start..window_end]) {
                    found.push(PiiMatch {
                        kind: PiiKind::PaymentCard,
                        start: window_start,
                        end: window_end,
                    });
                }
            }
        }
    }
}

/// Returns the absolute byte spans of the digit groups in `run`, which starts at `run_start`
/// and contains only ASCII digits, spaces and hyphens. The result is never empty.
fn group_spans(run_start: usize, run: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut group_start = run_start;
    for (offset, byte) in run.bytes().enumerate() {
        if !byte.is_ascii_digit() {
            spans.push((group_start, run_start + offset));
            group_start = run_start + offset + 1;
        }
    }
    spans.push((group_start, run_start + run.len()));
    spans
}

/// Checks whether the digits of `candidate` (separators are skipped) start with 2 to 6 and pass
/// the Luhn check: doubling every second digit from the right, and subtracting 9 from doubles
/// above 9, gives a sum divisible by 10.
fn is_card_number(candidate: &str) -> bool {
    let digits: Vec<u32> = candidate.chars().filter_map(|c| c.to_digit(10)).collect();
    if !matches!(digits.first(), Some(2..=6)) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(position, &digit)| {
            if position % 2 == 0 {
                return digit;
            }
            let doubled = digit * 2;
            if doubled > 9 {
                doubled - 9
            } else {
                doubled
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

// ---------------------------------------------------------------------------------------------
// Hong Kong identity card numbers
// ---------------------------------------------------------------------------------------------

/// One or two letters, six digits and a check character (0 to 9 or A), which may be in
/// parentheses with an optional space before them: `A123456(3)`, `AB123456 (9)`, `A1234563`.
/// Lowercase letters are accepted because people type them that way.
static HKID: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[A-Za-z]{1,2}[0-9]{6}(?: ?\([0-9Aa]\)|[0-9Aa])")
        .expect("the HKID pattern is a valid regex")
});

/// Adds the HKID numbers in `text` that stand alone and carry a valid check character.
fn find_hkids(text: &str, found: &mut Vec<PiiMatch>) {
    scan_with_retry(&HKID, text, |captures| {
        let id = captures.get(0)?;
        if is_joined_before(text, id.start(), &[]) || is_joined_after(text, id.end(), &[]) {
            return None;
        }
        if !hkid_check_is_valid(id.as_str()) {
            return None;
        }
        found.push(PiiMatch {
            kind: PiiKind::Hkid,
            start: id.start(),
            end: id.end(),
        });
        Some(id.end())
    });
}

/// Checks an HKID number's check character. Letters count as A=10 to Z=35 and a
/// one-letter prefix is padded in front with a space worth 36. The eight values take the weights
/// 9 down to 2, and the check character (A standing for 10) must bring the weighted sum to a
/// multiple of 11.
fn hkid_check_is_valid(id: &str) -> bool {
    // `to_digit(36)` maps 0-9 to 0-9 and A-Z (either case) to 10-35, which covers the letters and
    // the check character A alike.
    let Some(mut values) = id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_digit(36))
        .collect::<Option<Vec<u32>>>()
    else {
        return false;
    };
    if values.len() == 8 {
        values.insert(0, 36);
    }
    if values.len() != 9 {
        return false;
    }

    let weighted_sum: u32 = values
        .iter()
        .zip((1..=9).rev())
        .map(|(value, weight)| value * weight)
        .sum();
    weighted_sum.is_multiple_of(11)
}

// ---------------------------------------------------------------------------------------------
// IBANs
// ---------------------------------------------------------------------------------------------

/// Two letters (the ISO 3166-1 country code), two check digits, then the BBAN: 11 to 30 letters
/// or digits, either without spaces or in space-separated groups of four with a shorter last
/// group, as ISO 13616 prints them. The total length is checked after the match.
///
/// NOTE: the BBAN length per country from the SWIFT IBAN registry is not checked, so a string
/// with a valid mod-97 checksum but the wrong length for its country still matches.
static IBAN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"[A-Za-z]{2}[0-9]{2}(?:[A-Za-z0-9]{11,30}|(?: [A-Za-z0-9]{4}){2,7}(?: [A-Za-z0-9]{1,3})?)",
    )
    .expect("the IBAN pattern is a valid regex")
});

/// Adds the IBANs in `text` that pass the ISO 13616 mod-97 check. The grouped pattern can take a
/// following word as a last group (`BE88 3200 3471 3441 Bank`), so when the whole match fails,
/// each shorter prefix that ends at a group boundary is tried, longest first.
fn find_ibans(text: &str, found: &mut Vec<PiiMatch>) {
    scan_with_retry(&IBAN, text, |captures| {
        let iban = captures.get(0)?;
        if is_joined_before(text, iban.start(), &[]) {
            return None;
        }

        let group_ends = iban
            .as_str()
            .match_indices(' ')
            .map(|(offset, _)| iban.start() + offset);
        let mut ends: Vec<usize> = group_ends.collect();
        ends.push(iban.end());
        for &end in ends.iter().rev() {
            if is_joined_after(text, end, &[]) {
                continue;
            }
            let compact: String = text[iban.start()..end]
                .chars()
                .filter(|&c| c != ' ')
                .collect();
            if (15..=34).contains(&compact.len()) && iban_checksum_is_valid(&compact) {
                found.push(PiiMatch {
                    kind: PiiKind::Iban,
                    start: iban.start(),
                    end,
                });
                return Some(end);
            }
        }
        None
    });
}

/// Checks whether `compact` (an IBAN without spaces) passes the ISO 13616 check: with the first
/// four characters moved to the end and letters replaced by A=10 to Z=35, the number mod 97 is
/// 1. The remainder is computed one character at a time, so no big integers are needed.
fn iban_checksum_is_valid(compact: &str) -> bool {
    let rearranged = compact.chars().skip(4).chain(compact.chars().take(4));
    let mut remainder: u32 = 0;
    for c in rearranged {
        let Some(value) = c.to_digit(36) else {
            return false;
        };
        let shift = if value < 10 { 10 } else { 100 };
        remainder = (remainder * shift + value) % 97;
    }
    remainder == 1
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// Returns each match of `find_pii` as its kind and the matched text.
    fn found(text: &str) -> Vec<(PiiKind, &str)> {
        find_pii(text)
            .into_iter()
            .map(|pii| (pii.kind, &text[pii.start..pii.end]))
            .collect()
    }

    /// Computes an HKID check character with the weights written out, independently of
    /// `hkid_check_is_valid`, so that the two check each other.
    fn hkid_check_character(prefix: &str, digits: &str) -> char {
        let letter_value = |letter: char| letter as u32 - 'A' as u32 + 10;
        let letters: Vec<char> = prefix.chars().collect();
        let (first, second) = match letters.as_slice() {
            [only] => (36, letter_value(*only)),
            [first, second] => (letter_value(*first), letter_value(*second)),
            _ => panic!("an HKID prefix has one or two letters, got {prefix:?}"),
        };

        let mut sum = 9 * first + 8 * second;
        for (digit, weight) in digits.chars().zip([7, 6, 5, 4, 3, 2]) {
            sum += weight * digit.to_digit(10).expect("HKID digits are 0-9");
        }
        match (11 - sum % 11) % 11 {
            10 => 'A',
            value => char::from_digit(value, 10).expect("a remainder below 10 is one digit"),
        }
    }

    #[test]
    fn email_addresses_are_found() {
        let cases = [
            (
                "Write to jane.doe+tierd@example.co.uk today.",
                "jane.doe+tierd@example.co.uk",
            ),
            (
                "<ops_team@mail.tierd-test.io>",
                "ops_team@mail.tierd-test.io",
            ),
            ("電郵jane@example.com謝謝", "jane@example.com"),
            ("end of sentence: x.y@example.org.", "x.y@example.org"),
        ];
        for (text, address) in cases {
            assert_eq!(found(text), vec![(PiiKind::Email, address)], "in {text:?}");
        }
    }

    #[test]
    fn email_without_valid_domain_is_ignored() {
        let texts = [
            "admin@localhost",
            "mail user@example now",
            "a@b.c",
            "jane@example.c0m",
            "jane@example.com2",
            "a..b@example.com",
            "name@@example.com",
        ];
        for text in texts {
            assert_eq!(found(text), vec![], "in {text:?}");
        }
    }

    #[test]
    fn international_phone_numbers_are_found() {
        let numbers = [
            "+44 20 7946 0958",
            "+44 (0)20 7946 0958",
            "+1 (555) 123-4567",
            "+86 138 0013 8000",
            "+33 1 23 45 67 89",
            "+1.555.123.4567",
            "+852 4123 4567",
            "+1 234 5678",
            "+852 1234 5678 901",
        ];
        for number in numbers {
            let text = format!("Call {number} today.");
            assert_eq!(found(&text), vec![(PiiKind::Phone, number)], "in {text:?}");
        }
    }

    #[test]
    fn international_phone_digit_count_is_limited() {
        // 7 digits, then 16 digits: E.164 allows at most 15.
        for text in ["Call +1 234 567 now", "Call +1 234 567 890 123 456 now"] {
            assert_eq!(found(text), vec![], "in {text:?}");
        }
    }

    #[test]
    fn hong_kong_phone_formats_are_found() {
        let numbers = [
            "2123 4567",
            "9123-4567",
            "91234567",
            "3123 4567",
            "5123 4567",
            "6123 4567",
            "7123 4567",
            "8123 4567",
            "+852 9123 4567",
            "+852-2123-4567",
            "+85261234567",
            "852 9123 4567",
            "85291234567",
            "(852) 2123 4567",
            "(+852) 5123 4567",
        ];
        for number in numbers {
            let text = format!("Tel: {number}.");
            assert_eq!(found(&text), vec![(PiiKind::Phone, number)], "in {text:?}");
        }
    }

    #[test]
    fn north_american_phone_formats_are_found() {
        for number in [
            "(555) 123-4567",
            "(555)123-4567",
            "555-123-4567",
            "555.123.4567",
            "1-555-123-4567",
        ] {
            let text = format!("Reach me at {number}, evenings.");
            assert_eq!(found(&text), vec![(PiiKind::Phone, number)], "in {text:?}");
        }
    }

    #[test]
    fn card_numbers_are_found() {
        // Test numbers that Stripe publishes for its test mode, in several groupings, and
        // 4222222222222, a 13-digit Visa-format number that passes the Luhn check.
        let numbers = [
            "4242 4242 4242 4242",
            "4242424242424242",
            "4242-4242-4242-4242",
            "5555 5555 5555 4444",
            "2223003122003222",
            "3782 822463 10005",
            "378282246310005",
            "6011 1111 1111 1117",
            "6205500000000000004",
            "4222222222222",
        ];
        for number in numbers {
            let text = format!("Card {number} exp 12/27");
            assert_eq!(
                found(&text),
                vec![(PiiKind::PaymentCard, number)],
                "in {text:?}"
            );
        }
    }

    #[test]
    fn card_followed_by_cvc_is_found() {
        let text = "card 4242 4242 4242 4242 123";
        assert_eq!(
            found(text),
            vec![(PiiKind::PaymentCard, "4242 4242 4242 4242")]
        );
    }

    #[test]
    fn luhn_invalid_card_is_ignored() {
        for text in [
            "card 4242 4242 4242 4241",
            "card 4111111111111112",
            "card 5555-5555-5555-4445",
        ] {
            assert_eq!(found(text), vec![], "in {text:?}");
        }
    }

    #[test]
    fn card_with_wrong_issuer_digit_is_ignored() {
        // All three pass the Luhn check but start with 9, 1 and 7.
        for text in [
            "id 9111111111111110",
            "id 1111111111111117",
            "id 7111111111111114",
        ] {
            assert_eq!(found(text), vec![], "in {text:?}");
        }
    }

    #[test]
    fn hkid_known_examples_are_found() {
        // Check characters worked out by hand:
        //   A123456: 36*9 + 10*8 + 1*7 + 2*6 + 3*5 + 4*4 + 5*3 + 6*2 = 481 = 43*11 + 8, so 3.
        //   AB123456: 10*9 + 11*8 + 77 (the same digits) = 255 = 23*11 + 2, so 9.
        //   G123456: 36*9 + 16*8 + 77 = 529 = 48*11 + 1, so 10, written A.
        //   AB987654: 10*9 + 11*8 + 9*7 + 8*6 + 7*5 + 6*4 + 5*3 + 4*2 = 371 = 33*11 + 8, so 3.
        let ids = [
            "A123456(3)",
            "AB123456(9)",
            "G123456(A)",
            "AB987654(3)",
            "A1234563",
            "A123456 (3)",
            "a123456(3)",
            "g123456(a)",
        ];
        for id in ids {
            let text = format!("HKID {id}, issued 2010");
            assert_eq!(found(&text), vec![(PiiKind::Hkid, id)], "in {text:?}");
        }
    }

    #[test]
    fn hkid_generated_examples_are_found() {
        for prefix in ["A", "C", "K", "Z", "AB", "WX", "XA", "ZZ"] {
            for digits in ["000000", "123456", "987654", "314159", "271828"] {
                let check = hkid_check_character(prefix, digits);
                let id = format!("{prefix}{digits}({check})");
                assert_eq!(
                    found(&id),
                    vec![(PiiKind::Hkid, id.as_str())],
                    "valid ID {id}"
                );

                for wrong in "0123456789A".chars().filter(|&c| c != check) {
                    let wrong_id = format!("{prefix}{digits}({wrong})");
                    assert_eq!(
                        found(&wrong_id),
                        vec![],
                        "ID {wrong_id} with a wrong check character"
                    );
                }
            }
        }
    }

    #[test]
    fn hkid_wrong_check_digit_is_ignored() {
        for text in ["A123456(4)", "AB987654(2)", "G123456(0)", "A1234564"] {
            assert_eq!(found(text), vec![], "in {text:?}");
        }
    }

    #[test]
    fn hkid_inside_word_is_ignored() {
        for text in ["REFA123456(3)", "A123456(3)X", "A1234563B"] {
            assert_eq!(found(text), vec![], "in {text:?}");
        }
    }

    #[test]
    fn iban_examples_are_found() {
        // GB82 WEST...: the fictitious IBAN of the Rosetta Code "IBAN" task.
        // DE89...: the print and electronic examples on the ECBS page for German IBANs.
        // BE88... and GB26MIDL...: the examples on iban.co.uk's IBAN verification page.
        let ibans = [
            "GB82 WEST 1234 5698 7654 32",
            "DE89 3704 0044 0532 0130 00",
            "DE89370400440532013000",
            "BE88 3200 3471 3441",
            "GB26MIDL40051512345674",
            "gb82 west 1234 5698 7654 32",
        ];
        for iban in ibans {
            let text = format!("IBAN: {iban}, thanks");
            assert_eq!(found(&text), vec![(PiiKind::Iban, iban)], "in {text:?}");
        }
    }

    #[test]
    fn iban_followed_by_word_is_found() {
        let text = "Pay BE88 3200 3471 3441 Bank of Example";
        assert_eq!(found(text), vec![(PiiKind::Iban, "BE88 3200 3471 3441")]);
    }

    #[test]
    fn iban_wrong_checksum_is_ignored() {
        // The digits after the country code must not form a Luhn-valid run starting with 2-6,
        // or they are reported as a card: "3704 0044 0532 0130 01" would be one.
        let texts = [
            "GB82 WEST 1234 5698 7654 33",
            "GB83WEST12345698765432",
            "DE89 3704 0044 0532 0130 02",
        ];
        for text in texts {
            assert_eq!(found(text), vec![], "in {text:?}");
        }
    }

    #[test]
    fn ordinary_numbers_are_ignored() {
        let texts = [
            "Released in 2024.",
            "from 2023-2024 and 1999 2000",
            "dated 20240115",
            "costs $1,234.56",
            "HK$ 12,345,678.00",
            "version 1.2.3.4",
            "build 10.20.30.40",
            "order #123456 shipped",
            "order 654321",
            "pi is 3.1415926535897932",
            "account 2123 4567 8901",
            "mobile 4123 4567 without a prefix",
        ];
        for text in texts {
            assert_eq!(found(text), vec![], "in {text:?}");
        }
    }

    #[test]
    fn full_width_digits_are_not_detected() {
        assert_eq!(found("電話 ９１２３ ４５６７"), vec![]);
    }

    #[test]
    fn card_overlapping_phone_is_one_card() {
        // Both detectors fire on "+4222222222222": 13 digits after a + are an international
        // phone number, and the digits are a Luhn-valid Visa test number.
        let text = "+4222222222222";
        let mut phones = Vec::new();
        find_phones(text, &mut phones);
        let mut cards = Vec::new();
        find_cards(text, &mut cards);
        assert_eq!(
            phones,
            vec![PiiMatch {
                kind: PiiKind::Phone,
                start: 0,
                end: 14
            }]
        );
        assert_eq!(
            cards,
            vec![PiiMatch {
                kind: PiiKind::PaymentCard,
                start: 1,
                end: 14
            }]
        );

        assert_eq!(found(text), vec![(PiiKind::PaymentCard, "+4222222222222")]);
    }

    #[test]
    fn card_with_phone_shaped_groups_is_one_card() {
        // "5555 5555" alone is a Hong Kong number, but not as part of a card number.
        assert_eq!(found("5555 5555"), vec![(PiiKind::Phone, "5555 5555")]);
        assert_eq!(
            found("5555 5555 5555 4444"),
            vec![(PiiKind::PaymentCard, "5555 5555 5555 4444")]
        );
    }

    #[test]
    fn phone_inside_email_is_one_email() {
        assert_eq!(
            found("91234567@example.com"),
            vec![(PiiKind::Email, "91234567@example.com")]
        );
    }

    #[test]
    fn merge_overlaps_takes_union_and_top_rank() {
        let candidate = |kind, start, end| PiiMatch { kind, start, end };
        let candidates = vec![
            candidate(PiiKind::Phone, 20, 25),
            candidate(PiiKind::Phone, 0, 5),
            candidate(PiiKind::Phone, 14, 16),
            candidate(PiiKind::PaymentCard, 3, 10),
            candidate(PiiKind::Email, 12, 20),
        ];
        let expected = vec![
            candidate(PiiKind::PaymentCard, 0, 10),
            candidate(PiiKind::Email, 12, 20),
            candidate(PiiKind::Phone, 20, 25),
        ];
        assert_eq!(merge_overlaps(candidates.clone()), expected);

        let mut reversed = candidates;
        reversed.reverse();
        assert_eq!(
            merge_overlaps(reversed),
            expected,
            "the result must not depend on input order"
        );
    }

    #[test]
    fn redact_replaces_every_kind() {
        let text = "Mail jane@example.com or call +852 9123 4567. Card 4242 4242 4242 4242, \
                    HKID A123456(3), IBAN GB82 WEST 1234 5698 7654 32.";
        let expected = "Mail [EMAIL] or call [PHONE]. Card [CARD], HKID [HKID], IBAN [IBAN].";
        assert_eq!(redact(text, &find_pii(text)), expected);
    }

    #[test]
    fn redact_without_matches_returns_text() {
        let text = "Nothing personal here, just 2024 and v1.2.3.";
        assert_eq!(redact(text, &find_pii(text)), text);
    }

    #[test]
    fn redact_handles_malformed_matches() {
        let pii = |kind, start, end| PiiMatch { kind, start, end };

        // "😀" is bytes 2..6: offsets inside it widen to the whole character, and an end past
        // the text is clamped.
        let text = "ab😀cd";
        let matches = [pii(PiiKind::Email, 7, 100), pii(PiiKind::Phone, 3, 4)];
        assert_eq!(redact(text, &matches), "ab[PHONE]c[EMAIL]");

        // Overlapping matches share one placeholder, named by the one that starts first.
        let matches = [pii(PiiKind::Phone, 1, 3), pii(PiiKind::PaymentCard, 0, 2)];
        assert_eq!(redact("abcdef", &matches), "[CARD]def");

        // An inverted match covers the bytes between its offsets, and an empty one is ignored.
        let matches = [pii(PiiKind::Iban, 5, 4), pii(PiiKind::Hkid, 2, 2)];
        assert_eq!(redact("abcdef", &matches), "abcd[IBAN]f");
    }

    #[test]
    fn offsets_on_multibyte_text() {
        let text = "😀 電話：9123 4567，電郵：jane@example.com 🎉 卡 4242 4242 4242 4242";
        let matches = find_pii(text);
        let expected = [
            (PiiKind::Phone, "9123 4567"),
            (PiiKind::Email, "jane@example.com"),
            (PiiKind::PaymentCard, "4242 4242 4242 4242"),
        ];
        assert_eq!(matches.len(), expected.len(), "matches: {matches:?}");

        for (pii, (kind, substring)) in matches.iter().zip(expected) {
            let start = text
                .find(substring)
                .expect("the expected text is in the input");
            assert_eq!(pii.kind, kind);
            assert_eq!(
                (pii.start, pii.end),
                (start, start + substring.len()),
                "offsets of {substring:?}"
            );
            assert!(text.is_char_boundary(pii.start), "start of {substring:?}");
            assert!(text.is_char_boundary(pii.end), "end of {substring:?}");
        }
        assert_eq!(
            redact(text, &matches),
            "😀 電話：[PHONE]，電郵：[EMAIL] 🎉 卡 [CARD]"
        );
    }

    #[test]
    fn pii_kind_serializes_as_snake_case() {
        assert_eq!(
            serde_json::to_string(&PiiKind::PaymentCard).expect("serializes"),
            "\"payment_card\""
        );
        assert_eq!(PiiKind::PaymentCard.to_string(), "payment_card");
        let pii = PiiMatch {
            kind: PiiKind::Email,
            start: 0,
            end: 5,
        };
        assert_eq!(
            serde_json::to_string(&pii).expect("serializes"),
            r#"{"kind":"email","start":0,"end":5}"#
        );
    }

    #[test]
    fn fullwidth_and_invisible_characters_are_folded() {
        for text in ["mail jane.doe＠example.com", "mail jane.doe@exam\u{200B}ple.com", "card ４１１１ １１１１ １１１１ １１１１"] {
            let found = detect(text);
            assert_eq!(found.matches.len(), 1, "{text:?}");
            let redacted = found.redacted();
            assert!(!redacted.contains("example"), "{text:?}");
            assert!(!redacted.contains("1111"), "{text:?}");
        }
        assert!(detect("no personal data here").is_empty());
    }

    #[test]
    fn large_texts_are_scanned_in_linear_time() {
        const SIZE: usize = 100_000;
        // A quadratic scan of 100 KB needs on the order of 10^10 steps, far beyond this bound,
        // so the bound catches that and not a mere slowdown.
        const LIMIT: Duration = Duration::from_secs(5);

        let sentence = "Order 123456 shipped in 2024. Call 9123 4567 or mail jane@example.com. ";
        let repeats = SIZE / sentence.len() + 1;
        let prose = sentence.repeat(repeats);
        let texts = [
            ("prose with PII", prose.clone()),
            (
                "address local part without a valid end",
                format!("{}@b.cc1", "a".repeat(SIZE)),
            ),
            ("single-digit groups", "4 ".repeat(SIZE / 2)),
            ("plus signs", "+1 ".repeat(SIZE / 3)),
            (
                "one long international number",
                format!("+1{}", " 1".repeat(SIZE / 2)),
            ),
            ("Hong Kong number groups", "9123 ".repeat(SIZE / 5)),
            ("HKID-like run", "A1234567".repeat(SIZE / 8)),
            ("IBAN-like run", "GB82 WEST ".repeat(SIZE / 10)),
        ];

        for (name, text) in &texts {
            let started = Instant::now();
            let matches = find_pii(text);
            let elapsed = started.elapsed();
            assert!(
                elapsed < LIMIT,
                "find_pii took {elapsed:?} on {} bytes of {name}",
                text.len()
            );
            for pair in matches.windows(2) {
                assert!(
                    pair[0].end <= pair[1].start,
                    "{name}: matches overlap or are unsorted: {pair:?}"
                );
            }
        }

        let matches = find_pii(&prose);
        assert_eq!(
            matches.len(),
            2 * repeats,
            "one phone and one e-mail per sentence"
        );
    }
}
