//! Every refused observation upload answers in the error shape and leaves the
//! stored data exactly as it was.

use serde_json::{Value, json};

use super::{TEST_OBSERVATIONS_LIMIT, TestApp};
use crate::api_tests;

const PATH: &str = "/api/v1/series/site/observations";

/// A series with some data, and what reading it back gives.
async fn app_with_data(backend: super::Backend) -> (TestApp, Value) {
    let app = TestApp::start(backend).await;
    app.create_series("site", &["load", "temp"]).await;
    let rows = json!({"rows": [
        {"ts": "2024-01-01T00:00:00Z", "values": {"load": 1.0, "temp": 5.0}},
        {"ts": "2024-01-01T01:00:00Z", "values": {"load": 2.0, "temp": 6.0}},
    ]});
    let uploaded = app.client.post_json(PATH, &rows).await;
    assert_eq!(uploaded.status, 200, "{}", uploaded.text());
    let before = app.observations("site").await;
    (app, before)
}

/// A batch whose first row is good and whose last row is not, so a partial
/// write would show.
fn rows_ending_with(bad_row: Value) -> Value {
    json!({"rows": [
        {"ts": "2024-01-01T05:00:00Z", "values": {"load": 7.0}},
        {"ts": "2024-01-01T00:00:00Z", "values": {"load": 100.0}},
        bad_row,
    ]})
}

api_tests! {
    async fn unusable_json_rows_are_422_and_write_nothing(backend) {
        let (app, before) = app_with_data(backend).await;
        let cases = [
            (rows_ending_with(json!({"ts": "2024-01-01T06:00:00Z", "values": {"load": "NaN"}})), "rows[2].values.load"),
            (rows_ending_with(json!({"ts": "2024-01-01T06:00:00Z", "values": {"temp": "warm"}})), "rows[2].values.temp"),
            (rows_ending_with(json!({"ts": "2024-01-01T06:00:00Z", "values": {"temp": true}})), "rows[2].values.temp"),
            (rows_ending_with(json!({"ts": "2024-01-01T06:00:00Z", "values": {"humidity": 1.0}})), "values.humidity"),
            (rows_ending_with(json!({"ts": "not a time", "values": {"load": 1.0}})), "rows[2].ts"),
            (rows_ending_with(json!({"ts": null, "values": {"load": 1.0}})), "rows[2].ts"),
            (rows_ending_with(json!({"ts": 1e300, "values": {"load": 1.0}})), "rows[2].ts"),
            (json!({"rows": []}), "rows"),
        ];
        for (body, field) in cases {
            let error = app.client.post_json(PATH, &body).await.expect_error(422);
            assert_eq!(error["code"], "unprocessable", "{body}");
            assert_eq!(error["field"], field, "{body}: {error}");
            assert_eq!(app.observations("site").await, before, "data changed after {body}");
        }
        assert_eq!(app.observation_count("site").await, 4);
    }

    async fn unusable_csv_is_422_and_writes_nothing(backend) {
        let (app, before) = app_with_data(backend).await;
        let good = "2024-01-01T05:00:00Z,7,8\n2024-01-01T00:00:00Z,100,100\n";
        let cases = [
            (format!("ts,load,temp\n{good}2024-01-01T06:00:00Z,NaN,1\n"), "line 4, column 'load'"),
            (format!("ts,load,temp\n{good}2024-01-01T06:00:00Z,1,warm\n"), "line 4, column 'temp'"),
            (format!("ts,load,temp\n{good}2024-01-01T06:00:00Z,1\n"), "line 4"),
            (format!("ts,load,humidity\n{good}"), "column 'humidity'"),
            (format!("ts,load,temp\n{good}someday,1,2\n"), "line 4, column 'ts'"),
            ("ts,load,temp\n".to_string(), "no data rows"),
            (String::new(), "empty"),
        ];
        for (csv, expected) in cases {
            let error = app.client.post(PATH, "text/csv", csv.as_bytes()).await.expect_error(422);
            assert!(error["message"].as_str().unwrap().contains(expected), "{csv:?}: {error}");
            assert_eq!(app.observations("site").await, before, "data changed after {csv:?}");
        }
        assert_eq!(app.observation_count("site").await, 4);
    }

    async fn malformed_oversized_unauthorised_and_misdirected_uploads_write_nothing(backend) {
        let (app, before) = app_with_data(backend).await;
        let good_rows = json!({"rows": [{"ts": "2024-01-01T05:00:00Z", "values": {"load": 7.0}}]});

        for body in [&b"{\"rows\": [{\"ts\": \"2024-01-01T05:00:00Z\", \"values\": {\"load\": NaN}}]}"[..], b"{\"rows\": [", b"{\"lines\": []}"] {
            let error = app.client.post(PATH, "application/json", body).await.expect_error(400);
            assert_eq!(error["code"], "bad_request");
        }
        let mut oversized = String::from("ts,load\n");
        while oversized.len() <= TEST_OBSERVATIONS_LIMIT {
            oversized.push_str("2024-01-01T05:00:00Z,7\n");
        }
        let error = app.client.post(PATH, "text/csv", oversized.as_bytes()).await.expect_error(413);
        assert_eq!(error["code"], "payload_too_large");
        let error = app.client.post(PATH, "application/xml", b"<rows/>").await.expect_error(415);
        assert_eq!(error["code"], "unsupported_media_type");
        for client in [app.client.with_key(None), app.client.with_key(Some("nope"))] {
            client.post_json(PATH, &good_rows).await.expect_error(401);
        }
        let error = app.client.post_json("/api/v1/series/elsewhere/observations", &good_rows).await.expect_error(404);
        assert!(error["message"].as_str().unwrap().contains("elsewhere"), "{error}");
        let listed = app.client.get("/api/v1/series").await.json();
        assert_eq!(listed["series"].as_array().unwrap().len(), 1, "an upload created a series");

        assert_eq!(app.observations("site").await, before);
        assert_eq!(app.observation_count("site").await, 4);
    }
}
