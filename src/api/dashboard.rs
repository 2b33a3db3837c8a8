//! The built-in web dashboard: the static files of `dashboards/web/`,
//! compiled into the binary so that a single executable serves them with no
//! network access and no build step. `/` is the page; everything else lives
//! under `/dashboard/`.

use actix_web::http::header;
use actix_web::{HttpResponse, web};

use super::error::ApiError;

/// One file of the dashboard, as served.
struct Asset {
    /// The path below `/dashboard/`.
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $content_type:expr) => {
        Asset {
            path: $path,
            content_type: $content_type,
            body: include_bytes!(concat!("../../dashboards/web/", $path)),
        }
    };
}

const HTML: &str = "text/html; charset=utf-8";
const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

const INDEX: &str = "index.html";

static ASSETS: &[Asset] = &[
    asset!("index.html", HTML),
    asset!("app.js", JAVASCRIPT),
    asset!("style.css", CSS),
    asset!("vendor/uplot/uPlot.iife.min.js", JAVASCRIPT),
    asset!("vendor/uplot/uPlot.min.css", CSS),
    asset!("vendor/uplot/LICENSE", TEXT),
];

/// Only this server's own files and API: the page cannot load or send
/// anything elsewhere. uPlot sizes its elements through inline styles.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; \
     style-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|asset| asset.path == path)
}

fn serve(asset: &Asset) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(asset.content_type)
        // The files change with the binary; let browsers revalidate.
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .body(asset.body)
}

/// `GET /`, `GET /dashboard` and `GET /dashboard/`: the page.
pub async fn index() -> HttpResponse {
    serve(find(INDEX).expect("index.html is one of the assets"))
}

/// `GET /dashboard/{path}`: one of the page's files.
pub async fn file(path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let path = path.into_inner();
    if path.is_empty() {
        return Ok(index().await);
    }
    find(&path)
        .map(serve)
        .ok_or_else(|| ApiError::NotFound(format!("dashboard file '{path}'")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_present_and_named_once() {
        for (index, asset) in ASSETS.iter().enumerate() {
            assert!(!asset.body.is_empty(), "{} is empty", asset.path);
            assert!(
                ASSETS[..index].iter().all(|other| other.path != asset.path),
                "{} listed twice",
                asset.path
            );
        }
        assert!(find(INDEX).is_some());
    }

    /// The page must only reference files that are compiled in.
    #[test]
    fn the_page_references_only_served_files() {
        let page = std::str::from_utf8(find(INDEX).unwrap().body).unwrap();
        let mut referenced = 0;
        for attribute in ["src=\"", "href=\""] {
            for (start, _) in page.match_indices(attribute) {
                let rest = &page[start + attribute.len()..];
                let target = &rest[..rest.find('"').unwrap()];
                if target.starts_with("data:") {
                    continue;
                }
                let path = target
                    .strip_prefix("/dashboard/")
                    .unwrap_or_else(|| panic!("{target} is not under /dashboard/"));
                assert!(find(path).is_some(), "{target} is not compiled in");
                referenced += 1;
            }
        }
        assert_eq!(referenced, 4, "two scripts and two style sheets");
    }
}
