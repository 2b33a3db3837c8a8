//! Uploading observations as JSON rows and as CSV, and reading them back.

use serde_json::json;

use super::TestApp;
use crate::api_tests;

api_tests! {
    async fn json_rows_are_stored_and_read_back_wide(backend) {
        let app = TestApp::start(backend).await;
        app.create_series("site", &["load", "temp"]).await;
        let rows = json!({"rows": [
            {"ts": "2024-01-01T02:00:00Z", "values": {"load": 3.5, "temp": -1}},
            {"ts": "2024-01-01T00:00:00Z", "values": {"load": 1.25, "temp": null}},
            {"ts": 1704070800, "values": {"temp": 0.5}},
        ]});
        let uploaded = app.client.post_json("/api/v1/series/site/observations", &rows).await;
        assert_eq!(uploaded.status, 200, "{}", uploaded.text());
        assert_eq!(
            uploaded.json(),
            json!({"series": "site", "rows": 3, "cells_written": 4,
                   "first": "2024-01-01T00:00:00Z", "last": "2024-01-01T02:00:00Z"})
        );
        assert_eq!(app.observation_count("site").await, 4);
        assert_eq!(
            app.observations("site").await,
            json!({
                "series": "site",
                "timestamps": ["2024-01-01T00:00:00Z", "2024-01-01T01:00:00Z", "2024-01-01T02:00:00Z"],
                "channels": {"load": [1.25, null, 3.5], "temp": [null, 0.5, -1.0]},
            })
        );
        let described = app.client.get("/api/v1/series/site").await.json();
        assert_eq!(
            described["observations"],
            json!({"count": 4, "first": "2024-01-01T00:00:00Z", "last": "2024-01-01T02:00:00Z"})
        );

        // Uploading again upserts: same timestamps are replaced, not duplicated.
        let again = json!({"rows": [{"ts": "2024-01-01T00:00:00Z", "values": {"load": 9.0}}]});
        let uploaded = app.client.post_json("/api/v1/series/site/observations", &again).await;
        assert_eq!(uploaded.status, 200, "{}", uploaded.text());
        assert_eq!(app.observation_count("site").await, 4);
        assert_eq!(app.observations("site").await["channels"]["load"], json!([9.0, null, 3.5]));
    }

    async fn csv_bodies_are_stored_like_the_cli_import(backend) {
        let app = TestApp::start(backend).await;
        app.create_series("meter", &["kw", "kvar"]).await;
        let csv = "when,kvar,kw\n2024-03-01 00:00,1,10\n2024-03-01 00:15,,11\n\n2024-03-01 00:30,3,12\n";
        let uploaded = app
            .client
            .post("/api/v1/series/meter/observations?time_column=when", "text/csv; charset=utf-8", csv.as_bytes())
            .await;
        assert_eq!(uploaded.status, 200, "{}", uploaded.text());
        assert_eq!(uploaded.json()["rows"], 3);
        assert_eq!(uploaded.json()["cells_written"], 5);
        assert_eq!(
            app.observations("meter").await,
            json!({
                "series": "meter",
                "timestamps": ["2024-03-01T00:00:00Z", "2024-03-01T00:15:00Z", "2024-03-01T00:30:00Z"],
                "channels": {"kw": [10.0, 11.0, 12.0], "kvar": [1.0, null, 3.0]},
            })
        );
    }

    async fn reads_filter_by_time_and_channel(backend) {
        let app = TestApp::start(backend).await;
        app.create_series("s", &["a", "b"]).await;
        let csv = "ts,a,b\n2024-01-01T00:00:00Z,1,10\n2024-01-01T01:00:00Z,2,20\n2024-01-01T02:00:00Z,3,30\n";
        let uploaded = app.client.post("/api/v1/series/s/observations", "text/csv", csv.as_bytes()).await;
        assert_eq!(uploaded.status, 200, "{}", uploaded.text());

        let window = app
            .client
            .get("/api/v1/series/s/observations?from=2024-01-01T01:00:00Z&to=2024-01-01T02:00:00Z&channels=b")
            .await;
        assert_eq!(window.status, 200, "{}", window.text());
        assert_eq!(
            window.json(),
            json!({"series": "s", "timestamps": ["2024-01-01T01:00:00Z", "2024-01-01T02:00:00Z"], "channels": {"b": [20.0, 30.0]}})
        );
        let empty = app.client.get("/api/v1/series/s/observations?from=2030-01-01T00:00:00Z").await;
        assert_eq!(empty.json(), json!({"series": "s", "timestamps": [], "channels": {"a": [], "b": []}}));

        let error = app.client.get("/api/v1/series/s/observations?from=yesterday").await.expect_error(400);
        assert!(error["message"].as_str().unwrap().contains("from"), "{error}");
        app.client
            .get("/api/v1/series/s/observations?from=2024-01-02T00:00:00Z&to=2024-01-01T00:00:00Z")
            .await
            .expect_error(400);
        app.client.get("/api/v1/series/s/observations?colour=red").await.expect_error(400);
        let error = app.client.get("/api/v1/series/s/observations?channels=a,zz").await.expect_error(422);
        assert!(error["message"].as_str().unwrap().contains("zz"), "{error}");
        app.client.get("/api/v1/series/missing/observations").await.expect_error(404);
    }
}
