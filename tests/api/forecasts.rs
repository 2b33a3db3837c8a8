//! The persisted-forecasts route.

use chrono::Duration;
use serde_json::json;
use xlstm_forecast::store::{ForecastPoint, ModelVersionStatus, NewForecast};

use super::{TestApp, at};
use crate::api_tests;

/// A two-step forecast of channels load and temp issued at `issued`, whose
/// values all start at `base`.
fn forecast(series_id: i64, model_version_id: i64, issued: &str, base: f64) -> NewForecast {
    let first = at("2024-02-01T00:00:00Z");
    let mut points = Vec::new();
    for step in 1..=2u32 {
        for (channel, offset) in [("temp", 100.0), ("load", 0.0)] {
            let mean = base + offset + f64::from(step);
            points.push(ForecastPoint {
                step,
                ts: first + Duration::hours(i64::from(step) - 1),
                channel: channel.into(),
                mean,
                quantiles: vec![mean - 1.0, mean, mean + 1.0],
            });
        }
    }
    NewForecast {
        series_id,
        model_version_id,
        issued_at: at(issued),
        horizon: 2,
        quantile_levels: vec![0.1, 0.5, 0.9],
        points,
    }
}

api_tests! {
    async fn forecasts_are_listed_newest_first_in_wide_form(backend) {
        let app = TestApp::start(backend).await;
        app.create_series("plant", &["load", "temp"]).await;
        let series_id = app.series_id("plant").await;
        let version = app.insert_model_version(series_id, ModelVersionStatus::Ready, None, 0.5).await;
        let older = app.store.insert_forecast(&forecast(series_id, version.id, "2024-01-31T23:05:00Z", 0.0)).await.unwrap();
        let newer = app.store.insert_forecast(&forecast(series_id, version.id, "2024-01-31T23:35:00Z", 10.0)).await.unwrap();

        let response = app.client.get("/api/v1/series/plant/forecasts").await;
        assert_eq!(response.status, 200, "{}", response.text());
        let body = response.json();
        let listed: Vec<i64> = body["forecasts"].as_array().unwrap().iter().map(|f| f["id"].as_i64().unwrap()).collect();
        assert_eq!(listed, vec![newer.id, older.id]);
        assert_eq!(
            body["forecasts"][0],
            json!({
                "id": newer.id,
                "series": "plant",
                "model_version_id": version.id,
                "created_at": "2024-01-31T23:35:00Z",
                "origin": "2024-01-31T23:00:00Z",
                "horizon": 2,
                "quantile_levels": [0.1, 0.5, 0.9],
                "timestamps": ["2024-02-01T00:00:00Z", "2024-02-01T01:00:00Z"],
                "channels": {
                    "load": {"mean": [11.0, 12.0], "quantiles": {"0.1": [10.0, 11.0], "0.5": [11.0, 12.0], "0.9": [12.0, 13.0]}},
                    "temp": {"mean": [111.0, 112.0], "quantiles": {"0.1": [110.0, 111.0], "0.5": [111.0, 112.0], "0.9": [112.0, 113.0]}},
                },
            })
        );
        // Channels come in the series' order, not alphabetically by accident.
        let text = response.text();
        assert!(text.find("\"load\"").unwrap() < text.find("\"temp\"").unwrap(), "{text}");

        let limited = app.client.get("/api/v1/series/plant/forecasts?limit=1").await.json();
        assert_eq!(limited["forecasts"].as_array().unwrap().len(), 1);
        assert_eq!(limited["forecasts"][0]["id"], newer.id);
    }

    async fn a_series_without_forecasts_lists_none_and_bad_requests_are_refused(backend) {
        let app = TestApp::start(backend).await;
        app.create_series("plant", &["load"]).await;
        assert_eq!(app.client.get("/api/v1/series/plant/forecasts").await.json(), json!({"forecasts": []}));
        let error = app.client.get("/api/v1/series/nowhere/forecasts").await.expect_error(404);
        assert!(error["message"].as_str().unwrap().contains("nowhere"), "{error}");
        for query in ["limit=0", "limit=101", "limit=x"] {
            let error = app.client.get(&format!("/api/v1/series/plant/forecasts?{query}")).await.expect_error(400);
            assert!(error["message"].as_str().unwrap().contains("limit"), "{query}: {error}");
        }
        let error = app.client.get("/api/v1/series/plant/forecasts?horizon=3").await.expect_error(400);
        assert!(error["message"].as_str().unwrap().contains("horizon"), "{error}");
        app.client.request("POST", "/api/v1/series/plant/forecasts", None).await.expect_error(405);
    }
}
