//! The OpenAPI 3 document, generated from the handlers' `#[utoipa::path]`
//! annotations and the body types' schemas, served at `/api-docs/openapi.json`.
//!
//! `docs/openapi.json` is the committed copy; the `openapi_document` test
//! fails when the served document differs from it. Regenerate it with
//! `XLSTM_FORECAST_UPDATE_OPENAPI=1 cargo test --test api_http openapi`.

use std::sync::OnceLock;

use actix_web::HttpResponse;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{forecasts, health, metrics, models, observations, runs, schedules, series};

/// The route the document is served at.
pub const OPENAPI_PATH: &str = "/api-docs/openapi.json";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "xlstm-forecast",
        description = "Self-hosted time-series forecasting with residual xLSTM stacks. \
            JSON everywhere; every error is `{\"error\": {\"code\", \"message\"}}`. \
            When an API key is configured, every request that is not a GET needs \
            `Authorization: Bearer <key>`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        health::livez,
        health::readyz,
        metrics::metrics,
        series::list,
        series::create,
        series::get,
        series::delete,
        observations::upload,
        observations::read,
        models::list,
        models::get,
        models::promote,
        runs::list,
        runs::get,
        forecasts::list,
        schedules::get,
        schedules::put,
        schedules::delete,
    ),
    modifiers(&ApiKeySecurity),
    tags(
        (name = "health", description = "Liveness, readiness and metrics"),
        (name = "series", description = "Series and their observations"),
        (name = "models", description = "The model registry and champion promotion"),
        (name = "runs", description = "Training and data runs"),
        (name = "forecasts", description = "Persisted forecasts"),
        (name = "schedules", description = "Cron schedules that retrain a series"),
    )
)]
struct ApiDoc;

/// Declares the bearer API key the write routes refer to as `api_key`.
struct ApiKeySecurity;

impl Modify for ApiKeySecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document as generated from the code.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as pretty JSON text with a final newline (the form of the
/// committed copy).
pub fn document_json() -> String {
    let mut text = document()
        .to_pretty_json()
        .expect("the OpenAPI document serialises to JSON");
    text.push('\n');
    text
}

pub async fn serve() -> HttpResponse {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    HttpResponse::Ok()
        .content_type("application/json")
        .body(DOCUMENT.get_or_init(document_json).as_str())
}
