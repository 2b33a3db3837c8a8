//! The OpenAPI document (and its committed copy) and the interactive docs.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;

use super::{Backend, TestApp};

/// Set to 1 to rewrite the committed copy from the served document.
const UPDATE_VAR: &str = "XLSTM_FORECAST_UPDATE_OPENAPI";

fn committed_copy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json")
}

async fn served_document(app: &TestApp) -> (String, Value) {
    let response = app.client.get("/api-docs/openapi.json").await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/json"));
    (response.text(), response.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_committed_copy() {
    let app = TestApp::start(Backend::Sqlite).await;
    let (text, served) = served_document(&app).await;
    let path = committed_copy();
    if std::env::var(UPDATE_VAR).as_deref() == Ok("1") {
        std::fs::write(&path, &text)
            .unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
    }
    let regenerate = format!(
        "regenerate it with `{UPDATE_VAR}=1 cargo test --test api_http openapi` and review the diff"
    );
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}; {regenerate}", path.display()));
    let committed: Value = serde_json::from_str(&committed)
        .unwrap_or_else(|err| panic!("{} is not JSON ({err}); {regenerate}", path.display()));
    assert!(
        served == committed,
        "the served OpenAPI document differs from {}; {regenerate}",
        path.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_describes_every_route_and_marks_writes_as_keyed() {
    let app = TestApp::start(Backend::Sqlite).await;
    let (_, document) = served_document(&app).await;
    assert!(
        document["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        document["openapi"]
    );
    let paths = document["paths"].as_object().expect("paths");
    let operations: BTreeSet<String> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |method| format!("{} {path}", method.to_uppercase()))
        })
        .collect();
    let expected: BTreeSet<String> = [
        "GET /livez",
        "GET /readyz",
        "GET /metrics",
        "GET /api/v1/series",
        "POST /api/v1/series",
        "GET /api/v1/series/{name}",
        "DELETE /api/v1/series/{name}",
        "GET /api/v1/series/{name}/observations",
        "POST /api/v1/series/{name}/observations",
        "GET /api/v1/series/{name}/models",
        "GET /api/v1/models/{id}",
        "POST /api/v1/models/{id}/promote",
        "GET /api/v1/runs",
        "GET /api/v1/runs/{id}",
        "GET /api/v1/series/{name}/forecasts",
        "GET /api/v1/series/{name}/schedule",
        "PUT /api/v1/series/{name}/schedule",
        "DELETE /api/v1/series/{name}/schedule",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    assert_eq!(operations, expected);
    let mut operation_ids = BTreeSet::new();
    for item in paths.values() {
        for operation in item.as_object().unwrap().values() {
            let id = operation["operationId"]
                .as_str()
                .expect("every operation has an id");
            assert!(
                operation_ids.insert(id.to_string()),
                "operationId {id} is used twice"
            );
        }
    }
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let keyed = operation.get("security").is_some();
            assert_eq!(
                keyed,
                method != "get",
                "{method} {path}: security {:?}",
                operation.get("security")
            );
        }
    }
    assert_eq!(
        document["components"]["securitySchemes"]["api_key"]["scheme"],
        "bearer"
    );
    for schema in [
        "ErrorBody",
        "ModelVersionBody",
        "RunBody",
        "ForecastBody",
        "ScheduleBody",
        "SeriesBody",
    ] {
        assert!(
            document["components"]["schemas"].get(schema).is_some(),
            "no schema {schema}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_docs_are_served_from_the_binary() {
    let app = TestApp::start(Backend::Sqlite).await;
    let redirect = app.client.get("/docs").await;
    assert_eq!(redirect.status, 308, "{}", redirect.text());
    assert_eq!(redirect.header("location"), Some("docs/"));

    let page = app.client.get("/docs/").await;
    assert_eq!(page.status, 200, "{}", page.text());
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text();
    for asset in [
        "./swagger-ui.css",
        "./swagger-ui-bundle.js",
        "./swagger-initializer.js",
    ] {
        assert!(html.contains(asset), "{asset} missing from {html}");
    }
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("//cdn"),
        "the page loads something from elsewhere: {html}"
    );

    let initializer = app.client.get("/docs/swagger-initializer.js").await;
    assert_eq!(initializer.status, 200);
    let script = initializer.text();
    assert!(script.contains("\"../api-docs/openapi.json\""), "{script}");
    assert!(
        script.contains("validatorUrl: null"),
        "the public validator would be called: {script}"
    );
    assert!(!script.contains("https://"), "{script}");

    let vendored = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/swagger-ui");
    for (route, file, content_type) in [
        (
            "/docs/swagger-ui-bundle.js",
            "swagger-ui-bundle.js",
            "text/javascript",
        ),
        ("/docs/swagger-ui.css", "swagger-ui.css", "text/css"),
        ("/docs/LICENSE", "LICENSE", "text/plain"),
    ] {
        let response = app.client.get(route).await;
        assert_eq!(response.status, 200, "{route}");
        assert!(
            response
                .header("content-type")
                .unwrap()
                .starts_with(content_type),
            "{route}"
        );
        assert!(
            response
                .header("cache-control")
                .unwrap()
                .contains("max-age"),
            "{route}"
        );
        let expected = std::fs::read(vendored.join(file)).unwrap();
        assert!(
            response.body == expected,
            "{route} differs from the vendored {file}"
        );
    }
    // Reads need no key, so the docs work with auth configured.
    assert_eq!(app.client.with_key(None).get("/docs/").await.status, 200);
}
