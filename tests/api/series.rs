//! Creating, listing, describing and deleting series.

use serde_json::json;

use super::{TestApp, test_config};
use crate::api_tests;

api_tests! {
    async fn series_lifecycle(backend) {
        let app = TestApp::start(backend).await;
        let created = app
            .client
            .post_json(
                "/api/v1/series",
                &json!({"name": "grid.load", "frequency": "60min", "channels": ["load", "temp"], "timezone": "Europe/Berlin"}),
            )
            .await;
        assert_eq!(created.status, 201, "{}", created.text());
        assert_eq!(created.header("location"), Some("/api/v1/series/grid.load"));
        let body = created.json();
        assert_eq!(body["name"], "grid.load");
        assert_eq!(body["frequency"], "1h", "the frequency is stored in canonical form");
        assert_eq!(body["channels"], json!(["load", "temp"]));
        assert_eq!(body["timezone"], "Europe/Berlin");

        let duplicate = app
            .client
            .post_json("/api/v1/series", &json!({"name": "grid.load", "channels": ["x"]}))
            .await;
        assert_eq!(duplicate.expect_error(409)["code"], "conflict");

        app.create_series("another", &["a"]).await;
        let listed = app.client.get("/api/v1/series").await;
        assert_eq!(listed.status, 200);
        let names: Vec<String> = listed.json()["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|series| series["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, vec!["another", "grid.load"]);

        let described = app.client.get("/api/v1/series/grid.load").await;
        assert_eq!(described.status, 200);
        assert_eq!(described.json()["observations"], json!({"count": 0, "first": null, "last": null}));

        let deleted = app.client.delete("/api/v1/series/grid.load").await;
        assert_eq!(deleted.status, 204, "{}", deleted.text());
        assert!(deleted.body.is_empty());
        app.client.get("/api/v1/series/grid.load").await.expect_error(404);
        app.client.delete("/api/v1/series/grid.load").await.expect_error(404);
        let listed = app.client.get("/api/v1/series").await.json();
        assert_eq!(listed["series"].as_array().unwrap().len(), 1);
    }

    async fn unusable_series_fields_are_422_naming_the_field(backend) {
        let app = TestApp::start(backend).await;
        let cases = [
            (json!({"name": "has space", "channels": ["a"]}), "name"),
            (json!({"name": "", "channels": ["a"]}), "name"),
            (json!({"name": "s", "frequency": "3 fortnights", "channels": ["a"]}), "frequency"),
            (json!({"name": "s", "frequency": "1M", "channels": ["a"]}), "frequency"),
            (json!({"name": "s", "channels": ["a"], "timezone": "Mars/Olympus"}), "timezone"),
            (json!({"name": "s", "channels": []}), "channels"),
            (json!({"name": "s", "channels": ["a", "a"]}), "channels"),
            (json!({"name": "s", "channels": ["ts"]}), "channels"),
        ];
        for (body, field) in cases {
            let error = app.client.post_json("/api/v1/series", &body).await.expect_error(422);
            assert_eq!(error["code"], "unprocessable", "{body}");
            assert_eq!(error["field"], field, "{body}: {error}");
            assert!(error["message"].as_str().unwrap().contains(field), "{body}: {error}");
        }
        let listed = app.client.get("/api/v1/series").await.json();
        assert_eq!(listed["series"], json!([]), "a refused series was stored");
    }

    async fn malformed_series_requests_are_400(backend) {
        let app = TestApp::start(backend).await;
        let cases: [&[u8]; 4] = [
            b"{\"name\": \"s\", \"channels\": [\"a\"]",
            b"not json at all",
            b"{\"channels\": [\"a\"]}",
            b"{\"name\": \"s\", \"channels\": [\"a\"], \"colour\": \"red\"}",
        ];
        for body in cases {
            let error = app.client.post("/api/v1/series", "application/json", body).await.expect_error(400);
            assert_eq!(error["code"], "bad_request");
        }
        let error = app
            .client
            .post("/api/v1/series", "text/plain", b"{\"name\": \"s\", \"channels\": [\"a\"]}")
            .await
            .expect_error(415);
        assert_eq!(error["code"], "unsupported_media_type");
        let oversized = json!({"name": "s", "channels": ["c".repeat(crate::api::TEST_JSON_LIMIT)]});
        app.client.post_json("/api/v1/series", &oversized).await.expect_error(413);
        let listed = app.client.get("/api/v1/series").await.json();
        assert_eq!(listed["series"], json!([]));
    }

    async fn writes_need_the_api_key_and_reads_do_not(backend) {
        let app = TestApp::start(backend).await;
        app.create_series("kept", &["a"]).await;
        let body = json!({"name": "intruder", "channels": ["a"]});
        for client in [app.client.with_key(None), app.client.with_key(Some("wrong-key")), app.client.with_key(Some("test-key-5f2"))] {
            let response = client.post_json("/api/v1/series", &body).await;
            assert_eq!(response.expect_error(401)["code"], "unauthorized");
            assert_eq!(response.header("www-authenticate"), Some("Bearer"));
            client.delete("/api/v1/series/kept").await.expect_error(401);
            assert_eq!(client.get("/api/v1/series/kept").await.status, 200, "reads need no key");
        }
        let listed = app.client.get("/api/v1/series").await.json();
        assert_eq!(listed["series"].as_array().unwrap().len(), 1);
        assert_eq!(listed["series"][0]["name"], "kept");
    }

    async fn without_a_configured_key_writes_are_open(backend) {
        let config = xlstm_forecast::api::ApiConfig { api_key: None, ..test_config() };
        let app = TestApp::start_with(backend, config).await;
        let created = app.client.post_json("/api/v1/series", &json!({"name": "open", "channels": ["a"]})).await;
        assert_eq!(created.status, 201, "{}", created.text());
    }
}
