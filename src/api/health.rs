//! `GET /livez` (the process answers) and `GET /readyz` (it can serve: the
//! store answers).

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::error::ApiError;
use super::startup::AppState;

pub async fn livez() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "live" }))
}

/// Ready when the store answers a query. Migrations are applied by
/// `store::connect` before the server starts, so a running server has them.
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    // Whatever keeps the store from answering, this instance cannot serve.
    state
        .store
        .ping()
        .await
        .map_err(|err| ApiError::Unavailable(err.to_string()))?;
    Ok(HttpResponse::Ok().json(json!({
        "status": "ready",
        "store": state.store.backend().as_str(),
    })))
}
