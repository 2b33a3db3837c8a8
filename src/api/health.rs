//! `GET /livez` (the process answers) and `GET /readyz` (it can serve: the
//! store answers and holds every migration this build expects).

use actix_web::{HttpResponse, web};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::startup::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct Liveness {
    #[schema(example = "live")]
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    #[schema(example = "ready")]
    pub status: &'static str,
    /// postgres or sqlite.
    #[schema(example = "sqlite")]
    pub store: &'static str,
}

/// The process is up.
#[utoipa::path(
    get,
    path = "/livez",
    tag = "health",
    responses((status = 200, description = "Alive", body = Liveness))
)]
pub async fn livez() -> HttpResponse {
    HttpResponse::Ok().json(Liveness { status: "live" })
}

/// The store answers and its schema is current, so this instance can serve.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "The store does not answer, or migrations are missing (named in the message)", body = ErrorBody),
    )
)]
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    // Whatever keeps the store from answering, this instance cannot serve.
    let unavailable = |err: crate::store::StoreError| ApiError::Unavailable(err.to_string());
    state.store.ping().await.map_err(unavailable)?;
    // Another process may share the database and be older or newer; a
    // schema missing what this build needs makes queries fail later.
    let missing = state
        .store
        .missing_migrations()
        .await
        .map_err(unavailable)?;
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
        return Err(ApiError::Unavailable(format!(
            "migrations not applied: {} (run `xlstm-forecast migrate`)",
            names.join(", ")
        )));
    }
    Ok(HttpResponse::Ok().json(Readiness {
        status: "ready",
        store: state.store.backend().as_str(),
    }))
}
