//! Training through the API end to end: queue a run, a real worker trains the `tiny` preset,
//! the version is written and promoted, forecasts are served and persisted, a fine-tune
//! skips without new data and trains with it, manual promotion, a restart finds everything,
//! and bad requests change nothing.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use xlstm_forecast::api::Application;
use xlstm_forecast::forecast::synthetic::{SyntheticKind, SyntheticSpec, generate};
use xlstm_forecast::jobs::{WorkerConfig, WorkerPool, standard_executors};

use super::client::Client;
use super::{TEST_API_KEY, TestApp, test_config};
use crate::api_tests;

/// Hourly rows `first..first + count` of a 2-channel synthetic series as CSV.
fn csv_rows(first: usize, count: usize) -> String {
    let series = generate(&SyntheticSpec::new(
        SyntheticKind::Hourly,
        first + count,
        2,
        9,
    ))
    .unwrap();
    let mut text = String::from("ts,load,temp\n");
    for row in first..first + count {
        let ts = chrono::DateTime::from_timestamp_micros(series.timestamp_micros(row)).unwrap();
        let v = &series.matrix.values[row * 2..row * 2 + 2];
        text.push_str(&format!("{},{},{}\n", ts.to_rfc3339(), v[0], v[1]));
    }
    text
}

const TRAIN_TINY: &str = r#"{"mode": "full", "preset": "tiny", "overrides": {"lookback": 48, "horizon": 12, "max_epochs": 1}}"#;

async fn upload(app: &TestApp, first: usize, count: usize) {
    let csv = csv_rows(first, count);
    let response = app
        .client
        .post(
            "/api/v1/series/plant/observations",
            "text/csv",
            csv.as_bytes(),
        )
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
}

/// Polls a run until it leaves queued/running.
async fn finished_run(client: &Client, id: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let run = client.get(&format!("/api/v1/runs/{id}")).await.json();
        if !matches!(run["status"].as_str(), Some("queued" | "running")) {
            return run;
        }
        assert!(Instant::now() < deadline, "run {id} did not finish: {run}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn queue(client: &Client, body: &str) -> i64 {
    let response = client
        .post(
            "/api/v1/series/plant/train",
            "application/json",
            body.as_bytes(),
        )
        .await;
    assert_eq!(response.status, 202, "{}", response.text());
    let run = response.json();
    assert_eq!(run["status"], "queued");
    run["id"].as_i64().unwrap()
}

fn workers(app: &TestApp) -> WorkerPool {
    let config = WorkerConfig {
        poll_interval: Duration::from_millis(50),
        ..WorkerConfig::default()
    };
    WorkerPool::start(
        app.store.clone(),
        standard_executors(app.store.clone(), candle_core::Device::Cpu),
        config,
    )
}

api_tests! {
    async fn a_series_is_trained_forecast_fine_tuned_promoted_and_found_after_a_restart(backend) {
        let app = TestApp::start(backend).await;
        app.create_series("plant", &["load", "temp"]).await;
        upload(&app, 0, 400).await;
        let pool = workers(&app);

        let untrained = app.client.get("/api/v1/series/plant/forecast").await;
        assert_eq!(untrained.status, 409, "{}", untrained.text());
        assert!(untrained.text().contains("train one first"), "{}", untrained.text());

        // Bad requests are refused before anything is queued.
        let bad = [
            (r#"{"mode": "full", "preset": "huge"}"#, 422, "unknown preset"),
            (r#"{"mode": "full", "overrides": {"horizon": 0}}"#, 422, "horizon"),
            (r#"{"mode": "sideways"}"#, 400, "sideways"),
            (r#"{"mode": "full", "overrides": {"epochs": 3}}"#, 400, "epochs"),
            (r#"{"mode": "full""#, 400, ""),
        ];
        for (body, status, needle) in bad {
            let response = app.client.post("/api/v1/series/plant/train", "application/json", body.as_bytes()).await;
            assert_eq!(response.status, status, "{body}: {}", response.text());
            assert!(response.text().contains(needle), "{body}: {}", response.text());
        }
        let anonymous = app.client.with_key(None);
        let response = anonymous.post("/api/v1/series/plant/train", "application/json", TRAIN_TINY.as_bytes()).await;
        assert_eq!(response.status, 401);
        let missing = app.client.post("/api/v1/series/nope/train", "application/json", TRAIN_TINY.as_bytes()).await;
        assert_eq!(missing.status, 404);
        assert_eq!(app.client.get("/api/v1/runs").await.json()["runs"], json!([]));

        let run = finished_run(&app.client, queue(&app.client, TRAIN_TINY).await).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        let history = run["progress"]["history"].as_array().unwrap();
        assert_eq!(history.len(), 2, "epoch 0 and epoch 1: {run}");
        let first_version = run["model_version_id"].as_i64().unwrap();

        let models = app.client.get("/api/v1/series/plant/models").await.json()["models"].clone();
        assert_eq!(models.as_array().unwrap().len(), 1);
        assert_eq!(models[0]["is_champion"], true);
        assert_eq!(models[0]["role"], "champion");
        assert_eq!(models[0]["config"]["preset"], "tiny");
        assert_eq!(models[0]["config"]["horizon"], 12);
        assert!(models[0]["metrics"]["val_mse"].as_f64().unwrap().is_finite());
        // The promotion persisted a forecast for the dashboards.
        let persisted = app.client.get("/api/v1/series/plant/forecasts").await.json()["forecasts"].clone();
        assert_eq!(persisted.as_array().unwrap().len(), 1);
        assert_eq!(persisted[0]["model_version_id"], first_version);
        assert_eq!(persisted[0]["timestamps"].as_array().unwrap().len(), 12);

        let fresh = app.client.get("/api/v1/series/plant/forecast?horizon=6&quantiles=0.1,0.9").await;
        assert_eq!(fresh.status, 200, "{}", fresh.text());
        let fresh = fresh.json();
        assert_eq!(fresh["id"], json!(null));
        assert_eq!(fresh["model_version_id"], first_version);
        assert_eq!(fresh["timestamps"].as_array().unwrap().len(), 6);
        assert_eq!(fresh["quantile_levels"], json!([0.1, 0.9]));
        let load = &fresh["channels"]["load"];
        for step in 0..6 {
            let (low, high) = (load["quantiles"]["0.1"][step].as_f64().unwrap(), load["quantiles"]["0.9"][step].as_f64().unwrap());
            assert!(low <= high, "{load}");
        }
        assert_eq!(fresh["origin"], persisted[0]["origin"]);
        for (query, status, needle) in [
            ("horizon=13", 422, "model's horizon 12"),
            ("horizon=0", 422, "horizon"),
            ("horizon=abc", 400, "horizon"),
            ("quantiles=0.15", 422, "no level 0.15"),
            ("persist=maybe", 400, "persist"),
            ("colour=red", 400, "colour"),
        ] {
            let response = app.client.get(&format!("/api/v1/series/plant/forecast?{query}")).await;
            assert_eq!(response.status, status, "{query}: {}", response.text());
            assert!(response.text().contains(needle), "{query}: {}", response.text());
        }
        // Same champion, same rows: the forecast computed above is reused, not recomputed.
        let stored = app.client.get("/api/v1/series/plant/forecast?persist=true").await.json();
        assert!(stored["id"].is_i64(), "{stored}");
        assert_eq!(stored["created_at"], fresh["created_at"]);
        assert_eq!(stored["channels"]["load"]["mean"].as_array().unwrap()[..6], load["mean"].as_array().unwrap()[..]);
        assert_eq!(app.client.get("/api/v1/series/plant/forecasts").await.json()["forecasts"].as_array().unwrap().len(), 2);

        // A fine-tune with nothing new is skipped; with newer rows it trains a child.
        let skipped = finished_run(&app.client, queue(&app.client, r#"{"mode": "finetune"}"#).await).await;
        assert_eq!(skipped["status"], "skipped", "{skipped}");
        upload(&app, 400, 48).await;
        let tuned = finished_run(&app.client, queue(&app.client, r#"{"mode": "finetune"}"#).await).await;
        assert_eq!(tuned["status"], "succeeded", "{tuned}");
        let child = tuned["model_version_id"].as_i64().unwrap();
        let described = app.client.get(&format!("/api/v1/models/{child}")).await.json();
        assert_eq!(described["parent_version_id"], first_version);
        assert!(described["metrics"]["recent_mse"].as_f64().unwrap().is_finite(), "{described}");

        // Manual promotion (or rollback) to the first version.
        let promoted = app.client.post(&format!("/api/v1/models/{first_version}/promote"), "application/json", b"").await;
        assert_eq!(promoted.status, 200, "{}", promoted.text());
        let fresh = app.client.get("/api/v1/series/plant/forecast").await.json();
        assert_eq!(fresh["model_version_id"], first_version);
        let roles: Vec<(i64, String)> = app.client.get("/api/v1/series/plant/models").await.json()["models"]
            .as_array().unwrap().iter()
            .map(|m| (m["id"].as_i64().unwrap(), m["role"].as_str().unwrap().to_string()))
            .collect();
        assert_eq!(roles, [(child, "challenger".to_string()), (first_version, "champion".to_string())]);
        // ...computed from the rows uploaded since: they moved the origin 48 hours on.
        let origin = |body: &Value| chrono::DateTime::parse_from_rfc3339(body["origin"].as_str().unwrap()).unwrap();
        assert_eq!(origin(&fresh) - origin(&stored), chrono::Duration::hours(48));

        // Cancelling a finished run is a conflict; a queued one is cancelled at once.
        let conflict = app.client.post(&format!("/api/v1/runs/{}/cancel", run["id"]), "application/json", b"").await;
        assert_eq!(conflict.status, 409, "{}", conflict.text());
        pool.shutdown().await;
        let queued = queue(&app.client, TRAIN_TINY).await;
        let cancelled = app.client.post(&format!("/api/v1/runs/{queued}/cancel"), "application/json", b"").await;
        assert_eq!(cancelled.status, 200, "{}", cancelled.text());
        assert_eq!(cancelled.json()["status"], "cancelled");

        // Runs by kind and status and the forecast compute time reach /metrics.
        let metrics = app.client.get("/metrics").await.text();
        for needle in [
            "runs{kind=\"train\",status=\"succeeded\"} 1\n",
            "runs{kind=\"finetune\",status=\"succeeded\"} 1\n",
            "runs{kind=\"finetune\",status=\"skipped\"} 1\n",
            "runs{kind=\"train\",status=\"cancelled\"} 1\n",
            "run_seconds{kind=\"train\",status=\"succeeded\"} ",
            "forecast_compute_seconds_bucket{le=\"+Inf\"} ",
        ] {
            assert!(metrics.contains(needle), "no {needle:?} in\n{metrics}");
        }
        let computed = metrics
            .lines()
            .find_map(|line| line.strip_prefix("forecast_compute_seconds_count "))
            .unwrap();
        assert_eq!(computed, "2", "one per (champion, rows) asked for above; refused ones are not timed");
        assert!(metrics.contains("forecasts_served_total{source=\"computed\"} 2\n"), "{metrics}");
        assert!(metrics.contains("forecasts_served_total{source=\"reused\"} 1\n"), "{metrics}");

        // A second server on the same store (a restart) serves the same registry.
        let restarted = Application::build(&test_config(), app.store.clone()).unwrap();
        let client = Client::new(restarted.local_addr(), Some(TEST_API_KEY));
        tokio::spawn(restarted.run_until_stopped());
        let models = client.get("/api/v1/series/plant/models").await.json()["models"].clone();
        assert_eq!(models.as_array().unwrap().len(), 2);
        let fresh = client.get("/api/v1/series/plant/forecast").await.json();
        assert_eq!(fresh["model_version_id"], first_version);
        assert_eq!(client.get("/api/v1/runs?series=plant").await.json()["runs"].as_array().unwrap().len(), 4);
    }

    async fn a_series_deleted_and_created_again_is_forecast_from_its_new_rows(backend) {
        let app = TestApp::start(backend).await;
        let pool = workers(&app);
        let (mut origins, mut last) = (Vec::new(), Value::Null);
        // The second life of the series may get the first's ids (SQLite reuses the largest
        // rowid once it is deleted) and reaches the same data revision.
        for first_row in [0, 600] {
            app.create_series("plant", &["load", "temp"]).await;
            upload(&app, first_row, 400).await;
            let run = finished_run(&app.client, queue(&app.client, TRAIN_TINY).await).await;
            assert_eq!(run["status"], "succeeded", "{run}");
            let fresh = app.client.get("/api/v1/series/plant/forecast").await;
            assert_eq!(fresh.status, 200, "{}", fresh.text());
            let fresh = fresh.json();
            origins.push(fresh["origin"].as_str().unwrap().to_string());
            last = fresh;
            if first_row == 0 {
                let deleted = app.client.delete("/api/v1/series/plant").await;
                assert!(deleted.status < 300, "{}", deleted.text());
            }
        }
        let at = |text: &str| chrono::DateTime::parse_from_rfc3339(text).unwrap();
        assert_eq!(at(&origins[1]) - at(&origins[0]), chrono::Duration::hours(600), "{origins:?}");
        // A server that never saw the first life (no cached model or forecast) agrees.
        let restarted = Application::build(&test_config(), app.store.clone()).unwrap();
        let client = Client::new(restarted.local_addr(), Some(TEST_API_KEY));
        tokio::spawn(restarted.run_until_stopped());
        let cold = client.get("/api/v1/series/plant/forecast").await.json();
        assert_eq!(cold["channels"], last["channels"]);
        assert_eq!(cold["model_version_id"], last["model_version_id"]);
        pool.shutdown().await;
    }
}
