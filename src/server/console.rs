//! The operator's page at `GET /admin/`: one self-contained HTML file
//! (`console.html`, inline style and script, nothing fetched from anywhere
//! else) that signs in with the admin token and then reads only the admin
//! API. The page itself holds no data and needs no token; every call it
//! makes does.
//!
//! Its `Content-Security-Policy` allows the page's own inline script and
//! style by their SHA-256 hashes (not `'unsafe-inline'`), connections to
//! this origin only, and nothing else: no frames, forms posted elsewhere,
//! or images beyond inline `data:` ones.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine as _;
use sha2::{Digest, Sha256};

const PAGE: &str = include_str!("console.html");

/// The text between `open` and the following `</tag>`, as the browser
/// hashes it for the CSP.
fn inline(page: &str, open: &str, close: &str) -> String {
    page.split_once(open)
        .and_then(|(_, rest)| rest.split_once(close))
        .map(|(body, _)| body.to_owned())
        .unwrap_or_default()
}

fn sha256_source(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The policy, computed once from the page the binary carries.
fn policy() -> &'static str {
    static POLICY: OnceLock<String> = OnceLock::new();
    POLICY.get_or_init(|| {
        let script = sha256_source(&inline(PAGE, "<script>", "</script>"));
        let style = sha256_source(&inline(PAGE, "<style>", "</style>"));
        format!(
            "default-src 'none'; script-src {script}; style-src {style}; \
             connect-src 'self'; img-src data:; base-uri 'none'; \
             form-action 'none'; frame-ancestors 'none'"
        )
    })
}

/// `GET /admin/`: the page.
pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, policy()),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        PAGE,
    )
        .into_response()
}

/// `GET /admin`: to the page, whose relative API paths need the slash.
pub async fn redirect() -> Redirect {
    Redirect::permanent("/admin/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_hashes_the_page_own_script_and_style_and_nothing_loads_from_elsewhere() {
        let script = inline(PAGE, "<script>", "</script>");
        let style = inline(PAGE, "<style>", "</style>");
        assert!(script.len() > 1000 && style.len() > 200);
        // One of each, so the hashes cover everything inline.
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        assert!(
            !PAGE.contains(" style=\""),
            "inline style attributes need 'unsafe-hashes'"
        );
        // The one absolute URL is the SVG namespace, which loads nothing.
        let svg = PAGE.replace("\"http://www.w3.org/2000/svg\"", "");
        for remote in [
            "http://", "https://", "url(", "@import", " src=\"", "href=\"/",
        ] {
            assert!(!svg.contains(remote), "the page names {remote}");
        }
        let policy = policy();
        assert!(policy.contains(&sha256_source(&script)));
        assert!(!policy.contains("unsafe-inline"));
    }
}
