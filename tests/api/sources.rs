//! Binding a series to a source on the user's Postgres, and queueing pulls.

use serde_json::json;

use super::TestApp;
use crate::api_tests;

const SECRET_URL: &str = "postgres://reader:hunter2@db.example:5432/meters";
const QUERY: &str = "SELECT ts, load FROM meters WHERE ts > {{after}}";

api_tests! {
    async fn source_binding_and_pull_requests(backend) {
        let app = TestApp::start(backend).await;
        let put = |body: serde_json::Value| {
            let client = app.client.clone();
            async move {
                client
                    .request("PUT", "/api/v1/series/grid/source", Some(("application/json", body.to_string().as_bytes())))
                    .await
            }
        };
        let source = json!({"connection_url": SECRET_URL, "query": QUERY});
        put(source.clone()).await.expect_error(404);
        app.create_series("grid", &["load"]).await;
        app.client.post_json("/api/v1/series/grid/pull", &json!({})).await.expect_error(409);

        let bad_url = put(json!({"connection_url": "mysql://reader:hunter2@db/x", "query": QUERY})).await;
        assert_eq!(bad_url.expect_error(422)["field"], "connection_url");
        assert!(!bad_url.text().contains("hunter2"), "{}", bad_url.text());
        let no_placeholder = put(json!({"connection_url": SECRET_URL, "query": "SELECT ts, load FROM meters"})).await;
        assert_eq!(no_placeholder.expect_error(422)["field"], "query");

        let stored = put(source).await;
        assert_eq!(stored.status, 200, "{}", stored.text());
        assert!(!stored.text().contains("hunter2"), "the password never comes back: {}", stored.text());
        let body = stored.json();
        assert_eq!(body["connection_url"], "postgres://reader:****@db.example:5432/meters");
        assert_eq!(body["query"], QUERY);
        assert_eq!(body["series"], "grid");
        let read = app.client.get("/api/v1/series/grid/source").await;
        assert_eq!(read.status, 200);
        assert_eq!(read.json()["connection_url"], body["connection_url"]);

        let queued = app.client.post_json("/api/v1/series/grid/pull", &json!({})).await;
        assert_eq!(queued.status, 202, "{}", queued.text());
        let run = queued.json();
        assert_eq!(run["kind"], "pull");
        assert_eq!(run["status"], "queued");
        assert_eq!(run["series"], "grid");
        assert_eq!(run["attempts"], 0);
        assert_eq!(queued.header("location"), Some(format!("/api/v1/runs/{}", run["id"]).as_str()));

        let deleted = app.client.delete("/api/v1/series/grid/source").await;
        assert_eq!(deleted.status, 204, "{}", deleted.text());
        app.client.get("/api/v1/series/grid/source").await.expect_error(404);
        app.client.delete("/api/v1/series/grid/source").await.expect_error(404);
    }
}
