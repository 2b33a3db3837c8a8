//! CORS: closed by default, open to the configured origins only.

use super::{Backend, TestApp, test_config};
use crate::api_tests;

const ALLOWED: &str = "https://grafana.example.com";
const OTHER: &str = "https://evil.example.net";

async fn preflight(app: &TestApp, origin: &str) -> super::client::Response {
    app.client
        .with_key(None)
        .request_with_headers(
            "OPTIONS",
            "/api/v1/series",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "authorization, content-type",
                ),
            ],
            None,
        )
        .await
}

async fn get_from(app: &TestApp, origin: &str) -> super::client::Response {
    app.client
        .request_with_headers("GET", "/api/v1/series", &[("Origin", origin)], None)
        .await
}

async fn app_allowing(backend: Backend, origins: &[&str]) -> TestApp {
    let config = xlstm_forecast::api::ApiConfig {
        cors_allowed_origins: origins.iter().map(|origin| origin.to_string()).collect(),
        ..test_config()
    };
    TestApp::start_with(backend, config).await
}

api_tests! {
    async fn cors_is_closed_by_default(backend) {
        let app = TestApp::start(backend).await;
        let answer = preflight(&app, ALLOWED).await;
        assert_ne!(answer.status, 200, "a preflight was approved: {}", answer.text());
        assert_eq!(answer.header("access-control-allow-origin"), None);
        // Requests still work (non-browser clients send any Origin), without CORS headers.
        let read = get_from(&app, ALLOWED).await;
        assert_eq!(read.status, 200, "{}", read.text());
        assert_eq!(read.header("access-control-allow-origin"), None);
    }

    async fn configured_origins_may_call_and_others_may_not(backend) {
        let app = app_allowing(backend, &[ALLOWED]).await;
        let answer = preflight(&app, ALLOWED).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.header("access-control-allow-origin"), Some(ALLOWED));
        let methods = answer.header("access-control-allow-methods").unwrap_or_default().to_string();
        for method in ["GET", "POST", "PUT", "DELETE"] {
            assert!(methods.contains(method), "{methods}");
        }
        let headers = answer.header("access-control-allow-headers").unwrap_or_default().to_ascii_lowercase();
        assert!(headers.contains("authorization") && headers.contains("content-type"), "{headers}");
        let read = get_from(&app, ALLOWED).await;
        assert_eq!(read.header("access-control-allow-origin"), Some(ALLOWED));

        let refused = preflight(&app, OTHER).await;
        assert_ne!(refused.status, 200);
        assert_eq!(refused.header("access-control-allow-origin"), None);
        assert_eq!(get_from(&app, OTHER).await.header("access-control-allow-origin"), None);
    }

    async fn a_wildcard_allows_any_origin(backend) {
        let app = app_allowing(backend, &["*"]).await;
        let answer = preflight(&app, OTHER).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.header("access-control-allow-origin"), Some("*"));
    }
}
