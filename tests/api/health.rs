//! `/livez`, `/readyz`, `/metrics` and the error shape of unknown routes.

use super::{Backend, TestApp};
use crate::api_tests;

api_tests! {
    async fn livez_and_readyz_answer_with_json(backend) {
        let app = TestApp::start(backend).await;
        let live = app.client.get("/livez").await;
        assert_eq!(live.status, 200, "{}", live.text());
        assert_eq!(live.json()["status"], "live");

        let ready = app.client.get("/readyz").await;
        assert_eq!(ready.status, 200, "{}", ready.text());
        assert_eq!(ready.json()["status"], "ready");
        let expected_store = match backend {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        };
        assert_eq!(ready.json()["store"], expected_store);
    }

    async fn readyz_is_503_naming_migrations_the_database_lacks(backend) {
        let app = TestApp::start(backend).await;
        assert_eq!(app.client.get("/readyz").await.status, 200);
        // As if an older process (or a hand) had the schema without this build's migrations.
        app.execute_sql("DELETE FROM _sqlx_migrations").await;
        let error = app.client.get("/readyz").await.expect_error(503);
        assert_eq!(error["code"], "unavailable");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains("migrations not applied") && message.contains("20261128000001 (initial)"), "{message}");
        // Liveness does not depend on the store.
        assert_eq!(app.client.get("/livez").await.status, 200);

        app.execute_sql("DROP TABLE _sqlx_migrations").await;
        let error = app.client.get("/readyz").await.expect_error(503);
        assert!(error["message"].as_str().unwrap().contains("20261128000001"), "{error}");
    }

    async fn metrics_count_requests_by_route_pattern_and_status(backend) {
        let app = TestApp::start(backend).await;
        app.create_series("plant-7", &["load"]).await;
        assert_eq!(app.client.get("/api/v1/series/plant-7").await.status, 200);
        assert_eq!(app.client.get("/api/v1/series/nowhere").await.status, 404);
        assert_eq!(app.client.get("/livez").await.status, 200);

        let response = app.client.get("/metrics").await;
        assert_eq!(response.status, 200);
        assert!(response.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
        let text = response.text();
        for expected in [
            "# TYPE http_requests_total counter",
            "http_requests_total{method=\"POST\",route=\"/api/v1/series\",status=\"201\"} 1",
            "http_requests_total{method=\"GET\",route=\"/api/v1/series/{name}\",status=\"200\"} 1",
            "http_requests_total{method=\"GET\",route=\"/api/v1/series/{name}\",status=\"404\"} 1",
            "http_requests_total{method=\"GET\",route=\"/livez\",status=\"200\"} 1",
            "# TYPE http_request_duration_seconds histogram",
            "http_request_duration_seconds_bucket{method=\"GET\",route=\"/api/v1/series/{name}\",le=\"+Inf\"} 2",
            "http_request_duration_seconds_count{method=\"GET\",route=\"/api/v1/series/{name}\"} 2",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert!(!text.contains("plant-7"), "a series name leaked into the labels:\n{text}");
    }

    async fn unknown_routes_and_methods_answer_in_the_error_shape(backend) {
        let app = TestApp::start(backend).await;
        let error = app.client.get("/api/v1/nothing-here").await.expect_error(404);
        assert_eq!(error["code"], "not_found");
        let error = app.client.delete("/livez").await.expect_error(405);
        assert_eq!(error["code"], "method_not_allowed");
    }
}
