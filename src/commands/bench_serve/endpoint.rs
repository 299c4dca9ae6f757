//! The servers a benchmark sends to: their API URL, resolved addresses and the check that
//! keeps traffic on this machine unless the user allows otherwise.

use std::net::{IpAddr, SocketAddr};

use reqwest::Url;

/// API of a workload, which sets the path appended to an endpoint's base URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/chat/completions`, streamed.
    Chat,
    /// tierd's `POST /v1/classify`, not streamed.
    Classify,
}

impl Api {
    /// Path under `/v1`.
    fn path(self) -> &'static str {
        match self {
            Api::Chat => "/chat/completions",
            Api::Classify => "/classify",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("invalid endpoint URL `{url}`: {message}")]
    Invalid { url: String, message: String },
    #[error("failed to resolve the host of `{url}`: {message}")]
    Resolve { url: String, message: String },
    #[error(
        "endpoint `{url}` is not on this machine: {host} resolves to {addresses}. \
         Only loopback addresses (127.0.0.0/8, ::1, localhost) are benchmarked unless \
         --allow-remote is given"
    )]
    Remote { url: String, host: String, addresses: String },
}

/// One server under test.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The URL as the user gave it, for reports.
    pub url: String,
    /// Full URL of the API that requests go to.
    pub api_url: Url,
    /// Host name and the addresses it resolved to, which the HTTP client is pinned to so that a
    /// second lookup cannot send traffic elsewhere. `None` for an IP literal.
    pub pinned: Option<(String, Vec<SocketAddr>)>,
    /// Model name sent in chat requests, when the user set one for this endpoint.
    pub model: Option<String>,
}

impl Endpoint {
    /// Parses `url`, appends the path of `api`, resolves the host and, unless `allow_remote`,
    /// rejects any host that resolves to an address outside the loopback range.
    ///
    /// A base URL gets `/v1/chat/completions` (or `/v1/classify`). A URL that ends in `/v1`
    /// gets only the part after it, and one that already ends in the API path is kept.
    pub async fn resolve(url: &str, api: Api, model: Option<String>, allow_remote: bool) -> Result<Self, EndpointError> {
        let invalid = |message: String| EndpointError::Invalid {
            url: url.to_string(),
            message,
        };
        let parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(invalid(format!("the scheme is `{}`; expected http or https", parsed.scheme())));
        }
        let api_url = api_url(&parsed, api).map_err(invalid)?;
        let host = parsed.host_str().ok_or_else(|| invalid("the URL has no host".into()))?.to_string();
        let port = parsed.port_or_known_default().ok_or_else(|| invalid("the URL has no port".into()))?;

        // An IPv6 literal keeps its brackets in `host_str`, which the resolver does not take.
        let bare_host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let addresses: Vec<SocketAddr> = tokio::net::lookup_host((bare_host.as_str(), port))
            .await
            .map_err(|e| EndpointError::Resolve {
                url: url.to_string(),
                message: e.to_string(),
            })?
            .collect();
        if addresses.is_empty() {
            return Err(EndpointError::Resolve {
                url: url.to_string(),
                message: format!("{host} resolves to no address"),
            });
        }
        if !allow_remote && !addresses.iter().all(|address| is_loopback(address.ip())) {
            let listed: Vec<String> = addresses.iter().map(|a| a.ip().to_string()).collect();
            return Err(EndpointError::Remote {
                url: url.to_string(),
                host,
                addresses: listed.join(", "),
            });
        }

        let pinned = bare_host.parse::<IpAddr>().is_err().then(|| {
            // Port 0 lets the client keep the URL's port.
            let ips = addresses.iter().map(|a| SocketAddr::new(a.ip(), 0)).collect();
            (bare_host, ips)
        });
        Ok(Self {
            url: url.to_string(),
            api_url,
            pinned,
            model,
        })
    }
}

/// Returns whether `ip` is in 127.0.0.0/8 or is ::1, also as an IPv4-mapped IPv6 address.
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

fn api_url(base: &Url, api: Api) -> Result<Url, String> {
    if base.query().is_some() || base.fragment().is_some() {
        return Err("the URL must not have a query or a fragment".into());
    }
    let path = base.path().trim_end_matches('/');
    let other = match api {
        Api::Chat => Api::Classify,
        Api::Classify => Api::Chat,
    };
    if path.ends_with(&format!("/v1{}", other.path())) {
        return Err(format!("the URL ends in the path of the other API, while the workload needs `/v1{}`", api.path()));
    }
    let full = if path.ends_with(&format!("/v1{}", api.path())) {
        path.to_string()
    } else if path.ends_with("/v1") {
        format!("{path}{}", api.path())
    } else {
        format!("{path}/v1{}", api.path())
    };
    let mut url = base.clone();
    url.set_path(&full);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_path(url: &str) -> String {
        api_url(&Url::parse(url).expect("valid URL"), Api::Chat).expect("chat URL").to_string()
    }

    #[test]
    fn api_path_is_appended_once() {
        assert_eq!(chat_path("http://127.0.0.1:8080"), "http://127.0.0.1:8080/v1/chat/completions");
        assert_eq!(chat_path("http://127.0.0.1:8080/"), "http://127.0.0.1:8080/v1/chat/completions");
        assert_eq!(chat_path("http://127.0.0.1:8080/v1"), "http://127.0.0.1:8080/v1/chat/completions");
        assert_eq!(chat_path("http://127.0.0.1:8080/v1/"), "http://127.0.0.1:8080/v1/chat/completions");
        assert_eq!(chat_path("http://127.0.0.1:8080/v1/chat/completions"), "http://127.0.0.1:8080/v1/chat/completions");
        assert_eq!(chat_path("http://127.0.0.1:8080/proxy"), "http://127.0.0.1:8080/proxy/v1/chat/completions");
        let classify = api_url(&Url::parse("http://localhost:8080/v1").expect("valid URL"), Api::Classify).expect("classify URL");
        assert_eq!(classify.as_str(), "http://localhost:8080/v1/classify");
    }

    #[test]
    fn path_of_the_other_api_is_rejected() {
        let url = Url::parse("http://127.0.0.1:8080/v1/classify").expect("valid URL");
        assert!(api_url(&url, Api::Chat).is_err());
        let url = Url::parse("http://127.0.0.1:8080/v1?x=1").expect("valid URL");
        assert!(api_url(&url, Api::Chat).is_err());
    }

    #[test]
    fn loopback_ranges() {
        for loopback in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(loopback.parse().expect("IP")), "{loopback}");
        }
        for remote in ["10.0.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "::", "8.8.8.8", "::ffff:10.0.0.1"] {
            assert!(!is_loopback(remote.parse().expect("IP")), "{remote}");
        }
    }

    #[tokio::test]
    async fn remote_address_is_rejected_without_allow_remote() {
        let error = Endpoint::resolve("http://10.1.2.3:8080", Api::Chat, None, false)
            .await
            .expect_err("non-loopback address");
        let message = error.to_string();
        assert!(matches!(error, EndpointError::Remote { .. }), "{message}");
        assert!(message.contains("10.1.2.3"), "{message}");
        assert!(message.contains("--allow-remote"), "{message}");
    }

    #[tokio::test]
    async fn loopback_names_resolve() {
        let endpoint = Endpoint::resolve("http://localhost:9", Api::Chat, None, false).await.expect("localhost is loopback");
        let (host, addresses) = endpoint.pinned.expect("a host name is pinned");
        assert_eq!(host, "localhost");
        assert!(addresses.iter().all(|a| is_loopback(a.ip())), "{addresses:?}");

        let literal = Endpoint::resolve("http://[::1]:9/v1", Api::Chat, None, false).await.expect("::1 is loopback");
        assert!(literal.pinned.is_none());
        assert_eq!(literal.api_url.as_str(), "http://[::1]:9/v1/chat/completions");
    }

    #[tokio::test]
    async fn other_schemes_are_rejected() {
        let error = Endpoint::resolve("ftp://127.0.0.1/", Api::Chat, None, false).await.expect_err("ftp");
        assert!(error.to_string().contains("expected http or https"), "{error}");
    }
}
