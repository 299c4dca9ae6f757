//! The routing criteria a client sets per request: in `X-Tierd-*` headers, or in the `tierd`
//! object of the JSON body (what OpenAI SDKs send as `extra_body`).

use std::time::Duration;

use axum::http::HeaderMap;
use serde::Deserialize;

pub const MAX_TIER_HEADER: &str = "x-tierd-max-tier";
pub const MIN_CONFIDENCE_HEADER: &str = "x-tierd-min-confidence";
pub const LATENCY_BUDGET_HEADER: &str = "x-tierd-latency-budget-ms";
pub const SENSITIVITY_HEADER: &str = "x-tierd-sensitivity";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sensitivity {
    /// May be sent to a provider, unless the PII detector finds personal data in it.
    #[default]
    Normal,
    /// Never leaves the box.
    Restricted,
}

/// The `tierd` object of a request body; every field is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriteriaFields {
    pub max_tier: Option<u8>,
    pub min_confidence: Option<f64>,
    pub latency_budget_ms: Option<u64>,
    pub sensitivity: Option<Sensitivity>,
}

/// Routing demands of one request.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Criteria {
    /// Maximum tier the request may reach, counted by capability, so tier 1 (the frontier) is
    /// the highest: 3 keeps it local, 2 allows mid-range models, 1 or none allows every tier.
    pub max_tier: Option<u8>,
    /// Confidence that a local result needs to be kept. It replaces the route's or task's
    /// threshold.
    pub min_confidence: Option<f64>,
    /// Time the client waits for the whole response, from the request's arrival.
    pub latency_budget: Option<Duration>,
    pub sensitivity: Sensitivity,
}

/// A criterion with an invalid value; `param` names the header or body field.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CriteriaError {
    pub param: String,
    pub message: String,
}

impl Criteria {
    /// Reads the criteria from `headers` and the body's `tierd` object. A criterion set in both
    /// places must have the same value in both.
    pub fn from_request(headers: &HeaderMap, fields: Option<&CriteriaFields>) -> Result<Self, CriteriaError> {
        let fields = fields.cloned().unwrap_or_default();
        let max_tier = merge(
            header(headers, MAX_TIER_HEADER, parse_tier)?,
            fields.max_tier.map(|tier| check_tier(tier, "tierd.max_tier")).transpose()?,
            MAX_TIER_HEADER,
            "tierd.max_tier",
        )?;
        let min_confidence = merge(
            header(headers, MIN_CONFIDENCE_HEADER, parse_confidence)?,
            fields
                .min_confidence
                .map(|value| check_confidence(value, "tierd.min_confidence"))
                .transpose()?,
            MIN_CONFIDENCE_HEADER,
            "tierd.min_confidence",
        )?;
        let latency_budget_ms = merge(
            header(headers, LATENCY_BUDGET_HEADER, parse_budget)?,
            fields
                .latency_budget_ms
                .map(|value| check_budget(value, "tierd.latency_budget_ms"))
                .transpose()?,
            LATENCY_BUDGET_HEADER,
            "tierd.latency_budget_ms",
        )?;
        let sensitivity = merge(
            header(headers, SENSITIVITY_HEADER, parse_sensitivity)?,
            fields.sensitivity,
            SENSITIVITY_HEADER,
            "tierd.sensitivity",
        )?;
        Ok(Self {
            max_tier,
            min_confidence,
            latency_budget: latency_budget_ms.map(Duration::from_millis),
            sensitivity: sensitivity.unwrap_or_default(),
        })
    }

    /// Returns whether a model of `tier` may serve the request.
    pub fn allows_tier(&self, tier: u8) -> bool {
        self.max_tier.is_none_or(|max| tier >= max)
    }
}

fn invalid(param: &str, message: String) -> CriteriaError {
    CriteriaError {
        param: param.to_string(),
        message,
    }
}

fn header<T>(
    headers: &HeaderMap,
    name: &str,
    parse: fn(&str, &str) -> Result<T, CriteriaError>,
) -> Result<Option<T>, CriteriaError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| invalid(name, format!("The `{name}` header is not visible ASCII.")))?;
    parse(text.trim(), name).map(Some)
}

fn merge<T: PartialEq + std::fmt::Debug>(
    from_header: Option<T>,
    from_body: Option<T>,
    header: &str,
    field: &str,
) -> Result<Option<T>, CriteriaError> {
    match (from_header, from_body) {
        (Some(a), Some(b)) if a != b => Err(invalid(
            field,
            format!("The `{header}` header ({a:?}) and the body field `{field}` ({b:?}) disagree; set one."),
        )),
        (a, b) => Ok(a.or(b)),
    }
}

fn parse_tier(text: &str, param: &str) -> Result<u8, CriteriaError> {
    let tier = text
        .parse()
        .map_err(|_| invalid(param, format!("Invalid value for `{param}`: `{text}`; it must be 1, 2 or 3.")))?;
    check_tier(tier, param)
}

fn check_tier(tier: u8, param: &str) -> Result<u8, CriteriaError> {
    if matches!(tier, 1..=3) {
        Ok(tier)
    } else {
        Err(invalid(param, format!("Invalid value for `{param}`: {tier}; it must be 1, 2 or 3.")))
    }
}

fn parse_confidence(text: &str, param: &str) -> Result<f64, CriteriaError> {
    let value = text.parse().map_err(|_| {
        invalid(param, format!("Invalid value for `{param}`: `{text}`; it must be a number from 0 to 1."))
    })?;
    check_confidence(value, param)
}

fn check_confidence(value: f64, param: &str) -> Result<f64, CriteriaError> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(invalid(param, format!("Invalid value for `{param}`: {value}; it must be from 0 to 1.")))
    }
}

fn parse_budget(text: &str, param: &str) -> Result<u64, CriteriaError> {
    let value = text.parse().map_err(|_| {
        invalid(param, format!("Invalid value for `{param}`: `{text}`; it must be a whole number of milliseconds."))
    })?;
    check_budget(value, param)
}

fn check_budget(value: u64, param: &str) -> Result<u64, CriteriaError> {
    if value == 0 {
        Err(invalid(param, format!("Invalid value for `{param}`: 0; it must be at least 1 millisecond.")))
    } else {
        Ok(value)
    }
}

fn parse_sensitivity(text: &str, param: &str) -> Result<Sensitivity, CriteriaError> {
    match text.to_ascii_lowercase().as_str() {
        "normal" => Ok(Sensitivity::Normal),
        "restricted" => Ok(Sensitivity::Restricted),
        _ => Err(invalid(
            param,
            format!("Invalid value for `{param}`: `{text}`; it must be `normal` or `restricted`."),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn headers_are_read() {
        let criteria = Criteria::from_request(
            &headers(&[
                (MAX_TIER_HEADER, "2"),
                (MIN_CONFIDENCE_HEADER, "0.75"),
                (LATENCY_BUDGET_HEADER, "1500"),
                (SENSITIVITY_HEADER, "Restricted"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(criteria.max_tier, Some(2));
        assert_eq!(criteria.min_confidence, Some(0.75));
        assert_eq!(criteria.latency_budget, Some(Duration::from_millis(1500)));
        assert_eq!(criteria.sensitivity, Sensitivity::Restricted);
        assert!(criteria.allows_tier(2));
        assert!(criteria.allows_tier(3));
        assert!(!criteria.allows_tier(1));
    }

    #[test]
    fn body_fields_are_read_and_agreeing_duplicates_pass() {
        let fields = CriteriaFields {
            max_tier: Some(3),
            sensitivity: Some(Sensitivity::Normal),
            ..Default::default()
        };
        let criteria = Criteria::from_request(&headers(&[(MAX_TIER_HEADER, "3")]), Some(&fields)).unwrap();
        assert_eq!(criteria.max_tier, Some(3));
        assert!(!criteria.allows_tier(2));
    }

    #[test]
    fn invalid_values_name_their_source() {
        let cases = [
            (MAX_TIER_HEADER, "4"),
            (MAX_TIER_HEADER, "frontier"),
            (MIN_CONFIDENCE_HEADER, "1.5"),
            (LATENCY_BUDGET_HEADER, "0"),
            (LATENCY_BUDGET_HEADER, "-5"),
            (SENSITIVITY_HEADER, "secret"),
        ];
        for (name, value) in cases {
            let error = Criteria::from_request(&headers(&[(name, value)]), None).unwrap_err();
            assert_eq!(error.param, name);
            assert!(error.message.contains(value), "{}", error.message);
        }
        let fields = CriteriaFields { min_confidence: Some(-0.1), ..Default::default() };
        let error = Criteria::from_request(&HeaderMap::new(), Some(&fields)).unwrap_err();
        assert_eq!(error.param, "tierd.min_confidence");
    }

    #[test]
    fn disagreeing_sources_are_rejected() {
        let fields = CriteriaFields { max_tier: Some(1), ..Default::default() };
        let error = Criteria::from_request(&headers(&[(MAX_TIER_HEADER, "3")]), Some(&fields)).unwrap_err();
        assert_eq!(error.param, "tierd.max_tier");
        assert!(error.message.contains("disagree"), "{}", error.message);
    }
}
