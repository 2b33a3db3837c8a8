//! `/docs`: interactive API docs (Swagger UI) on `/api-docs/openapi.json`.
//!
//! The Swagger UI files are vendored under `assets/swagger-ui/` (see its
//! README for version and licence) and compiled into the binary, so the docs
//! work with no network access and nothing is loaded from a CDN.

use actix_web::http::header::{self, CacheControl, CacheDirective};
use actix_web::{HttpResponse, web};

const INDEX_HTML: &str = include_str!("docs/index.html");
const INITIALIZER_JS: &str = include_str!("docs/swagger-initializer.js");
const SWAGGER_UI_BUNDLE_JS: &[u8] = include_bytes!("../../assets/swagger-ui/swagger-ui-bundle.js");
const SWAGGER_UI_CSS: &[u8] = include_bytes!("../../assets/swagger-ui/swagger-ui.css");
const SWAGGER_UI_LICENSE: &str = include_str!("../../assets/swagger-ui/LICENSE");

/// The vendored files change only with the binary; a day of caching is safe.
const ASSET_MAX_AGE_SECONDS: u32 = 24 * 60 * 60;

/// Every `/docs` route.
pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/docs", web::get().to(redirect_to_index))
        .route("/docs/", web::get().to(index))
        .route("/docs/swagger-initializer.js", web::get().to(initializer))
        .route("/docs/swagger-ui-bundle.js", web::get().to(bundle))
        .route("/docs/swagger-ui.css", web::get().to(stylesheet))
        .route("/docs/LICENSE", web::get().to(licence));
}

/// `/docs` → `/docs/`, so the page's relative asset URLs resolve under it.
async fn redirect_to_index() -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header((header::LOCATION, "docs/"))
        .finish()
}

async fn index() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(INDEX_HTML)
}

async fn initializer() -> HttpResponse {
    asset("text/javascript; charset=utf-8", INITIALIZER_JS.as_bytes())
}

async fn bundle() -> HttpResponse {
    asset("text/javascript; charset=utf-8", SWAGGER_UI_BUNDLE_JS)
}

async fn stylesheet() -> HttpResponse {
    asset("text/css; charset=utf-8", SWAGGER_UI_CSS)
}

async fn licence() -> HttpResponse {
    asset("text/plain; charset=utf-8", SWAGGER_UI_LICENSE.as_bytes())
}

fn asset(content_type: &'static str, body: &'static [u8]) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(CacheControl(vec![
            CacheDirective::Public,
            CacheDirective::MaxAge(ASSET_MAX_AGE_SECONDS),
        ]))
        .body(body)
}
