//! The run routes: one run, and runs filtered by series and status.

use serde_json::json;
use xlstm_forecast::store::{NewRun, Run, RunKind, RunOutcome, RunStatus};

use super::TestApp;
use crate::api_tests;

async fn enqueue(app: &TestApp, series: &str, kind: RunKind) -> Run {
    let series_id = app.series_id(series).await;
    app.store
        .enqueue_run(&NewRun {
            series_id,
            kind,
            requested: json!({"mode": kind.as_str(), "preset": "tiny"}),
            max_attempts: 3,
            schedule_id: None,
            scheduled_for: None,
        })
        .await
        .expect("enqueue a run")
        .run
}

/// Three runs: plant's failed train, plant's queued finetune, hall's succeeded train.
async fn app_with_runs(backend: super::Backend) -> (TestApp, [Run; 3]) {
    let app = TestApp::start(backend).await;
    app.create_series("plant", &["load"]).await;
    app.create_series("hall", &["temp"]).await;
    let failed = enqueue(&app, "plant", RunKind::Train).await;
    let failed = app
        .store
        .finish_run(
            failed.id,
            &RunOutcome {
                status: RunStatus::Failed,
                error: Some("diverged at epoch 2".into()),
                model_version_id: None,
            },
        )
        .await
        .unwrap();
    let queued = enqueue(&app, "plant", RunKind::Finetune).await;
    let succeeded = enqueue(&app, "hall", RunKind::Train).await;
    let succeeded = app
        .store
        .finish_run(
            succeeded.id,
            &RunOutcome {
                status: RunStatus::Succeeded,
                error: None,
                model_version_id: None,
            },
        )
        .await
        .unwrap();
    (app, [failed, queued, succeeded])
}

fn ids(body: &serde_json::Value) -> Vec<i64> {
    body["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["id"].as_i64().unwrap())
        .collect()
}

api_tests! {
    async fn a_run_is_described_with_the_contract_fields(backend) {
        let (app, [failed, queued, _]) = app_with_runs(backend).await;
        app.store.update_run_progress(queued.id, &json!({"epoch": 1, "max_epochs": 5, "train_loss": 0.7})).await.unwrap();

        let response = app.client.get(&format!("/api/v1/runs/{}", queued.id)).await;
        assert_eq!(response.status, 200, "{}", response.text());
        let run = response.json();
        assert_eq!(run["id"], queued.id);
        assert_eq!(run["series"], "plant");
        assert_eq!(run["kind"], "finetune");
        assert_eq!(run["status"], "queued");
        assert_eq!(run["attempts"], 0);
        assert_eq!(run["max_attempts"], 3);
        assert_eq!(run["requested"], json!({"mode": "finetune", "preset": "tiny"}));
        assert_eq!(run["progress"], json!({"epoch": 1, "max_epochs": 5, "train_loss": 0.7}));
        assert!(run["heartbeat_at"].is_string(), "{run}");
        for absent in ["error", "model_version_id", "schedule_id", "scheduled_for", "started_at", "finished_at"] {
            assert!(run[absent].is_null(), "{absent} in {run}");
        }
        assert!(run["created_at"].as_str().unwrap().ends_with('Z'), "{run}");
        assert!(run.get("lease_owner").is_none(), "{run}");

        let run = app.client.get(&format!("/api/v1/runs/{}", failed.id)).await.json();
        assert_eq!(run["status"], "failed");
        assert_eq!(run["error"], "diverged at epoch 2");
        assert!(run["finished_at"].is_string(), "{run}");
    }

    async fn runs_are_listed_newest_first_and_filtered(backend) {
        let (app, [failed, queued, succeeded]) = app_with_runs(backend).await;
        let all = app.client.get("/api/v1/runs").await;
        assert_eq!(all.status, 200, "{}", all.text());
        assert_eq!(ids(&all.json()), vec![succeeded.id, queued.id, failed.id]);
        assert_eq!(all.json()["runs"][0]["series"], "hall");

        let plant = app.client.get("/api/v1/runs?series=plant").await.json();
        assert_eq!(ids(&plant), vec![queued.id, failed.id]);
        let failed_runs = app.client.get("/api/v1/runs?status=failed").await.json();
        assert_eq!(ids(&failed_runs), vec![failed.id]);
        let both = app.client.get("/api/v1/runs?series=hall&status=succeeded").await.json();
        assert_eq!(ids(&both), vec![succeeded.id]);
        let none = app.client.get("/api/v1/runs?series=hall&status=running").await.json();
        assert_eq!(none, json!({"runs": []}));
        let limited = app.client.get("/api/v1/runs?limit=2").await.json();
        assert_eq!(ids(&limited), vec![succeeded.id, queued.id]);
    }

    async fn bad_run_requests_name_the_problem(backend) {
        let (app, _) = app_with_runs(backend).await;
        let error = app.client.get("/api/v1/runs/999999").await.expect_error(404);
        assert!(error["message"].as_str().unwrap().contains("run 999999"), "{error}");
        app.client.get("/api/v1/runs/abc").await.expect_error(400);
        let error = app.client.get("/api/v1/runs?series=nowhere").await.expect_error(404);
        assert!(error["message"].as_str().unwrap().contains("nowhere"), "{error}");
        for (query, parameter) in [
            ("status=done", "status"),
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=ten", "limit"),
            ("colour=red", "colour"),
        ] {
            let error = app.client.get(&format!("/api/v1/runs?{query}")).await.expect_error(400);
            assert_eq!(error["code"], "bad_request");
            assert!(error["message"].as_str().unwrap().contains(parameter), "{query}: {error}");
        }
        app.client.request("POST", "/api/v1/runs", None).await.expect_error(405);
    }
}
