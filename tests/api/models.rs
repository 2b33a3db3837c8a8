//! The model registry routes: listing, describing and promoting versions.

use serde_json::json;
use xlstm_forecast::store::ModelVersionStatus;

use super::TestApp;
use crate::api_tests;

api_tests! {
    async fn versions_are_listed_newest_first_and_described(backend) {
        let app = TestApp::start(backend).await;
        app.create_series("plant", &["load"]).await;
        app.create_series("other", &["x"]).await;
        let series_id = app.series_id("plant").await;
        let first = app.insert_model_version(series_id, ModelVersionStatus::Ready, None, 0.5).await;
        let second = app.insert_model_version(series_id, ModelVersionStatus::Rejected, Some(first.id), 0.9).await;
        app.store.promote_model_version(first.id).await.unwrap();

        let listed = app.client.get("/api/v1/series/plant/models").await;
        assert_eq!(listed.status, 200, "{}", listed.text());
        let models = listed.json()["models"].clone();
        let ids: Vec<i64> = models.as_array().unwrap().iter().map(|m| m["id"].as_i64().unwrap()).collect();
        assert_eq!(ids, vec![second.id, first.id], "newest first");
        let newest = &models[0];
        assert_eq!(newest["series"], "plant");
        assert_eq!(newest["status"], "rejected");
        assert_eq!(newest["is_champion"], false);
        assert_eq!(newest["parent_version_id"], first.id);
        assert_eq!(newest["data_from"], "2024-01-01T00:00:00Z");
        assert_eq!(newest["data_to"], "2024-01-31T23:00:00Z");
        assert_eq!(newest["artefact_bytes"], 64);
        assert_eq!(newest["config"]["preset"], "tiny");
        assert_eq!(newest["metrics"]["val_mse"], 0.9);
        assert!(newest["created_at"].as_str().unwrap().ends_with('Z'), "{newest}");
        assert!(newest.get("artefact").is_none() && newest.get("normalisation").is_none(), "{newest}");
        assert_eq!(models[1]["is_champion"], true);
        assert_eq!(models[1]["status"], "ready");
        assert_eq!(models[1]["parent_version_id"], json!(null));

        let described = app.client.get(&format!("/api/v1/models/{}", first.id)).await;
        assert_eq!(described.status, 200, "{}", described.text());
        assert_eq!(described.json(), models[1]);

        let empty = app.client.get("/api/v1/series/other/models").await;
        assert_eq!(empty.json(), json!({"models": []}));
    }

    async fn promoting_switches_the_champion_and_back(backend) {
        let app = TestApp::start(backend).await;
        app.create_series("plant", &["load"]).await;
        let series_id = app.series_id("plant").await;
        let old = app.insert_model_version(series_id, ModelVersionStatus::Ready, None, 0.5).await;
        let new = app.insert_model_version(series_id, ModelVersionStatus::Ready, Some(old.id), 0.4).await;

        let promoted = app.client.post_json(&format!("/api/v1/models/{}/promote", new.id), &json!({})).await;
        assert_eq!(promoted.status, 200, "{}", promoted.text());
        assert_eq!(promoted.json()["id"], new.id);
        assert_eq!(promoted.json()["is_champion"], true);
        let champion = app.store.champion_model_version(series_id).await.unwrap().unwrap();
        assert_eq!(champion.summary.id, new.id);

        // Rollback: promote the older version again; no body is needed.
        let rolled_back = app.client.request("POST", &format!("/api/v1/models/{}/promote", old.id), None).await;
        assert_eq!(rolled_back.status, 200, "{}", rolled_back.text());
        let listed = app.client.get("/api/v1/series/plant/models").await.json();
        let champions: Vec<i64> = listed["models"].as_array().unwrap().iter()
            .filter(|m| m["is_champion"] == true)
            .map(|m| m["id"].as_i64().unwrap())
            .collect();
        assert_eq!(champions, vec![old.id]);
    }

    async fn bad_registry_requests_answer_the_error_and_change_nothing(backend) {
        let app = TestApp::start(backend).await;
        app.create_series("plant", &["load"]).await;
        let series_id = app.series_id("plant").await;
        let champion = app.insert_model_version(series_id, ModelVersionStatus::Ready, None, 0.5).await;
        let rejected = app.insert_model_version(series_id, ModelVersionStatus::Rejected, None, 0.9).await;
        let ready = app.insert_model_version(series_id, ModelVersionStatus::Ready, None, 0.6).await;
        app.store.promote_model_version(champion.id).await.unwrap();
        let before = app.client.get("/api/v1/series/plant/models").await.json();

        let error = app.client.get("/api/v1/series/nowhere/models").await.expect_error(404);
        assert!(error["message"].as_str().unwrap().contains("nowhere"), "{error}");
        let error = app.client.get("/api/v1/models/999999").await.expect_error(404);
        assert!(error["message"].as_str().unwrap().contains("999999"), "{error}");
        app.client.get("/api/v1/models/abc").await.expect_error(400);

        let error = app.client.request("POST", "/api/v1/models/999999/promote", None).await.expect_error(404);
        assert!(error["message"].as_str().unwrap().contains("model version 999999"), "{error}");
        app.client.request("POST", "/api/v1/models/abc/promote", None).await.expect_error(400);
        let error = app.client.request("POST", &format!("/api/v1/models/{}/promote", rejected.id), None).await.expect_error(409);
        assert!(error["message"].as_str().unwrap().contains("rejected"), "{error}");
        for client in [app.client.with_key(None), app.client.with_key(Some("wrong"))] {
            client.request("POST", &format!("/api/v1/models/{}/promote", ready.id), None).await.expect_error(401);
        }
        app.client.delete(&format!("/api/v1/models/{}", ready.id)).await.expect_error(405);

        assert_eq!(app.client.get("/api/v1/series/plant/models").await.json(), before);
        let serving = app.store.champion_model_version(series_id).await.unwrap().unwrap();
        assert_eq!(serving.summary.id, champion.id);
    }
}
