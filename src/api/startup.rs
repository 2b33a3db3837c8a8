//! Builds the HTTP application: shared state, extractor limits and error
//! handlers, middleware and routes; then binds and serves.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix_cors::Cors;
use actix_web::dev::Server;
use actix_web::http::{Method, header};
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};

use super::error;
use super::forecast_memo::ForecastMemo;
use super::metrics::HttpMetrics;
use super::middleware::{observe_request, require_api_key};
use super::model_cache::{DEFAULT_MODEL_CACHE_BYTES, ModelCache};
use super::{
    dashboard, docs, forecasts, health, metrics, models, observations, openapi, runs, schedules,
    series, sources, training,
};
use crate::config::{ANY_ORIGIN, Settings};
use crate::jobs::SchedulerHandle;
use crate::store::Store;

/// How long browsers may cache a CORS preflight answer.
const CORS_PREFLIGHT_MAX_AGE_SECONDS: usize = 3600;

/// How the HTTP service runs: what the settings say plus limits.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Port 0 picks a free port (see `Application::port`).
    pub bind: SocketAddr,
    /// When set, every request that is not a read must present this key.
    pub api_key: Option<String>,
    pub limits: BodyLimits,
    /// HTTP worker threads; `None` = one per CPU core.
    pub workers: Option<usize>,
    /// Origins whose browser pages may call the API (`*` = any); empty = none.
    pub cors_allowed_origins: Vec<String>,
    /// Bytes of computed forecasts kept for reuse until the series' rows or champion
    /// change; 0 computes every forecast.
    pub forecast_memo_bytes: usize,
}

/// The largest request bodies accepted (larger ones are answered with 413).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Observation uploads (JSON rows or CSV).
    pub observations_bytes: usize,
    /// Every other JSON body.
    pub json_bytes: usize,
}

impl BodyLimits {
    pub const DEFAULT_OBSERVATIONS_BYTES: usize = 16 * 1024 * 1024;
    pub const DEFAULT_JSON_BYTES: usize = 64 * 1024;
}

impl Default for BodyLimits {
    fn default() -> Self {
        Self {
            observations_bytes: Self::DEFAULT_OBSERVATIONS_BYTES,
            json_bytes: Self::DEFAULT_JSON_BYTES,
        }
    }
}

impl ApiConfig {
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            bind: settings.server.bind,
            api_key: settings.server.api_key.clone(),
            limits: BodyLimits::default(),
            workers: None,
            cors_allowed_origins: settings.server.cors_allowed_origins.clone(),
            forecast_memo_bytes: settings
                .server
                .forecast_memo_mib
                .saturating_mul(1024 * 1024),
        }
    }
}

/// What every handler can reach.
pub struct AppState {
    pub store: Arc<dyn Store>,
    /// This process's cron scheduler, when it runs one (roles `all` and
    /// `worker`): schedule changes are registered there at once.
    pub scheduler: Option<SchedulerHandle>,
    pub metrics: HttpMetrics,
    pub api_key: Option<String>,
    pub limits: BodyLimits,
    /// Champion models in memory for forecasting.
    pub models: ModelCache,
    /// Forecasts already computed from the current rows and champion.
    pub forecasts: ForecastMemo,
}

/// A bound, not yet running server.
pub struct Application {
    local_addr: SocketAddr,
    server: Server,
}

impl Application {
    /// Binds `config.bind` and prepares the server over `store` (already
    /// connected and migrated).
    pub fn build(config: &ApiConfig, store: Arc<dyn Store>) -> anyhow::Result<Self> {
        Self::build_with_scheduler(config, store, None)
    }

    /// `build`, with the process's running scheduler for schedule changes.
    pub fn build_with_scheduler(
        config: &ApiConfig,
        store: Arc<dyn Store>,
        scheduler: Option<SchedulerHandle>,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.bind)
            .map_err(|err| anyhow::anyhow!("cannot listen on {}: {err}", config.bind))?;
        let local_addr = listener.local_addr()?;
        let state = web::Data::new(AppState {
            store,
            scheduler,
            metrics: HttpMetrics::default(),
            api_key: config.api_key.clone(),
            limits: config.limits,
            models: ModelCache::new(DEFAULT_MODEL_CACHE_BYTES),
            forecasts: ForecastMemo::new(config.forecast_memo_bytes),
        });
        let json_limit = config.limits.json_bytes;
        let cors_allowed_origins = config.cors_allowed_origins.clone();
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .app_data(
                    web::JsonConfig::default()
                        .limit(json_limit)
                        .error_handler(error::json_error),
                )
                .app_data(web::QueryConfig::default().error_handler(error::query_error))
                .app_data(web::PathConfig::default().error_handler(error::path_error))
                .wrap(from_fn(require_api_key))
                // Outside the key check: a browser's preflight carries no key.
                .wrap(cors(&cors_allowed_origins))
                .wrap(from_fn(observe_request))
                .configure(routes)
                .default_service(web::to(error::no_route))
        });
        if let Some(workers) = config.workers {
            server = server.workers(workers);
        }
        let server = server.listen(listener)?.run();
        Ok(Self { local_addr, server })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    /// Serves until the server is stopped (SIGINT/SIGTERM stop it gracefully).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

/// CORS: closed unless origins are configured. A request from an origin not
/// listed is still served (non-browser clients send any `Origin`), but its
/// answer carries no CORS headers, so a browser keeps the page from reading it
/// and refuses to send anything that needs a preflight.
fn cors(allowed_origins: &[String]) -> Cors {
    let mut cors = Cors::default()
        .allowed_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allowed_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .max_age(CORS_PREFLIGHT_MAX_AGE_SECONDS)
        .block_on_origin_mismatch(false);
    for origin in allowed_origins {
        cors = if origin == ANY_ORIGIN {
            cors.allow_any_origin().send_wildcard()
        } else {
            cors.allowed_origin(origin)
        };
    }
    cors
}

/// Every route. A path served with other methods answers 405 in the error shape.
fn routes(config: &mut web::ServiceConfig) {
    config
        .service(resource("/").route(web::get().to(dashboard::index)))
        .service(resource("/dashboard").route(web::get().to(dashboard::index)))
        .service(resource("/dashboard/{path:.*}").route(web::get().to(dashboard::file)))
        .service(resource("/livez").route(web::get().to(health::livez)))
        .service(resource("/readyz").route(web::get().to(health::readyz)))
        .service(resource("/metrics").route(web::get().to(metrics::metrics)))
        .service(resource(openapi::OPENAPI_PATH).route(web::get().to(openapi::serve)))
        .configure(docs::routes)
        .service(
            web::scope("/api/v1")
                .service(
                    resource("/series")
                        .route(web::get().to(series::list))
                        .route(web::post().to(series::create)),
                )
                .service(
                    resource("/series/{name}")
                        .route(web::get().to(series::get))
                        .route(web::delete().to(series::delete)),
                )
                .service(
                    resource("/series/{name}/observations")
                        .route(web::get().to(observations::read))
                        .route(web::post().to(observations::upload)),
                )
                .service(resource("/series/{name}/models").route(web::get().to(models::list)))
                .service(resource("/series/{name}/forecasts").route(web::get().to(forecasts::list)))
                .service(resource("/series/{name}/forecast").route(web::get().to(forecasts::fresh)))
                .service(resource("/series/{name}/train").route(web::post().to(training::train)))
                .service(
                    resource("/series/{name}/schedule")
                        .route(web::get().to(schedules::get))
                        .route(web::put().to(schedules::put))
                        .route(web::delete().to(schedules::delete)),
                )
                .service(resource("/models/{id}").route(web::get().to(models::get)))
                .service(resource("/models/{id}/promote").route(web::post().to(models::promote)))
                .service(resource("/runs").route(web::get().to(runs::list)))
                .service(resource("/runs/{id}").route(web::get().to(runs::get)))
                .service(resource("/runs/{id}/cancel").route(web::post().to(training::cancel)))
                .service(
                    resource("/series/{name}/source")
                        .route(web::get().to(sources::get))
                        .route(web::put().to(sources::put))
                        .route(web::delete().to(sources::delete)),
                )
                .service(resource("/series/{name}/pull").route(web::post().to(sources::pull))),
        );
}

fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(error::method_not_allowed))
}
