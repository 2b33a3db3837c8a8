//! The schedule routes: create or replace, read, delete.

use serde_json::json;

use super::TestApp;
use crate::api_tests;

const PATH: &str = "/api/v1/series/plant/schedule";

api_tests! {
    async fn a_schedule_is_stored_read_replaced_and_deleted(backend) {
        let app = TestApp::start(backend).await;
        app.client.post_json("/api/v1/series", &json!({"name": "plant", "frequency": "1h", "channels": ["load"], "timezone": "Europe/Berlin"})).await;
        app.client.get(PATH).await.expect_error(404);

        let stored = app.client.put_json(PATH, &json!({"cron": "0 0 * * * *"})).await;
        assert_eq!(stored.status, 200, "{}", stored.text());
        let body = stored.json();
        assert_eq!(body["series"], "plant");
        assert_eq!(body["cron"], "0 0 * * * *");
        assert_eq!(body["timezone"], "Europe/Berlin", "defaults to the series' zone");
        assert_eq!(body["mode"], "finetune");
        assert_eq!(body["enabled"], true);
        let next = body["next_fire_at"].as_str().expect("an enabled schedule fires");
        assert!(next.ends_with(":00:00Z"), "hourly fires on the hour: {next}");
        assert_eq!(app.client.get(PATH).await.json()["cron"], "0 0 * * * *");

        let replaced = app.client.put_json(PATH, &json!({"cron": "30 15 3 * * MON", "timezone": "UTC", "mode": "full", "enabled": false})).await;
        assert_eq!(replaced.status, 200, "{}", replaced.text());
        let read = app.client.get(PATH).await.json();
        assert_eq!(read["cron"], "30 15 3 * * MON");
        assert_eq!(read["timezone"], "UTC");
        assert_eq!(read["mode"], "full");
        assert_eq!(read["enabled"], false);
        assert_eq!(read["next_fire_at"], json!(null), "a disabled schedule does not fire");
        let series_id = app.series_id("plant").await;
        assert!(app.store.list_enabled_schedules().await.unwrap().iter().all(|s| s.series_id != series_id));

        let deleted = app.client.delete(PATH).await;
        assert_eq!(deleted.status, 204, "{}", deleted.text());
        app.client.get(PATH).await.expect_error(404);
        let error = app.client.delete(PATH).await.expect_error(404);
        assert!(error["message"].as_str().unwrap().contains("schedule of series 'plant'"), "{error}");
        assert!(app.store.get_schedule(series_id).await.unwrap().is_none());
    }

    async fn bad_schedules_are_refused_and_change_nothing(backend) {
        let app = TestApp::start(backend).await;
        app.create_series("plant", &["load"]).await;
        let stored = app.client.put_json(PATH, &json!({"cron": "0 0 3 * * *"})).await;
        assert_eq!(stored.status, 200, "{}", stored.text());
        let before = app.client.get(PATH).await.json();

        for (body, field) in [
            (json!({"cron": "0 3 * * *"}), "cron"),
            (json!({"cron": "0 0 3 * * * 2030"}), "cron"),
            (json!({"cron": "0 61 * * * *"}), "cron"),
            (json!({"cron": "every hour"}), "cron"),
            (json!({"cron": ""}), "cron"),
            (json!({"cron": "0 0 * * * *", "timezone": "Mars/Olympus"}), "timezone"),
            (json!({"cron": "0 0 * * * *", "mode": "weekly"}), "mode"),
        ] {
            let error = app.client.put_json(PATH, &body).await.expect_error(422);
            assert_eq!(error["field"], field, "{body}: {error}");
            assert!(error["message"].as_str().unwrap().contains(field), "{body}: {error}");
        }
        for body in [&b"{\"cron\": \"0 0 * * * *\""[..], b"{}", b"{\"cron\": \"0 0 * * * *\", \"every\": 1}", b"{\"cron\": \"0 0 * * * *\", \"enabled\": \"yes\"}"] {
            let error = app.client.request("PUT", PATH, Some(("application/json", body))).await.expect_error(400);
            assert_eq!(error["code"], "bad_request", "{}", String::from_utf8_lossy(body));
        }
        let good = json!({"cron": "0 0 * * * *"});
        for client in [app.client.with_key(None), app.client.with_key(Some("wrong"))] {
            client.put_json(PATH, &good).await.expect_error(401);
            client.delete(PATH).await.expect_error(401);
        }
        let error = app.client.put_json("/api/v1/series/nowhere/schedule", &good).await.expect_error(404);
        assert!(error["message"].as_str().unwrap().contains("nowhere"), "{error}");
        app.client.delete("/api/v1/series/nowhere/schedule").await.expect_error(404);

        let after = app.client.get(PATH).await.json();
        assert_eq!(after["cron"], before["cron"]);
        assert_eq!(after["updated_at"], before["updated_at"], "a refused request rewrote the schedule");
        assert_eq!(after, before);
        assert!(app.store.get_series("nowhere").await.unwrap().is_none());
    }
}
