//! End-to-end API test harness: a real server on a free port over a fresh
//! Postgres database or SQLite file, spoken to over real sockets, and
//! `api_tests!` to run one test body against both backends.

pub mod client;
mod cors;
mod docs;
mod forecasts;
mod health;
mod models;
mod observations;
mod rejected_requests;
mod runs;
mod schedules;
mod series;
mod sources;
mod training;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use xlstm_forecast::api::{ApiConfig, Application, BodyLimits};
use xlstm_forecast::store::{ModelVersionStatus, ModelVersionSummary, NewModelVersion, Store};

use crate::common::{TestPostgres, TestSqlite, fresh_postgres, fresh_sqlite};
use client::Client;

/// The key every default test server requires for writes.
pub const TEST_API_KEY: &str = "test-key-5f2b";
/// Small limits so that 413 is cheap to provoke.
pub const TEST_OBSERVATIONS_LIMIT: usize = 64 * 1024;
pub const TEST_JSON_LIMIT: usize = 4 * 1024;

#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Postgres,
    Sqlite,
}

pub struct TestApp {
    /// Presents the test API key.
    pub client: Client,
    /// The store behind the server, for arranging what no route writes yet
    /// (model versions, runs, forecasts) and for checking what was stored.
    pub store: Arc<dyn Store>,
    // The test database lives as long as the server using it.
    _postgres: Option<TestPostgres>,
    _sqlite: Option<TestSqlite>,
}

pub fn test_config() -> ApiConfig {
    ApiConfig {
        bind: "127.0.0.1:0".parse().expect("loopback address"),
        api_key: Some(TEST_API_KEY.to_string()),
        limits: BodyLimits {
            observations_bytes: TEST_OBSERVATIONS_LIMIT,
            json_bytes: TEST_JSON_LIMIT,
        },
        workers: Some(2),
        cors_allowed_origins: Vec::new(),
        forecast_memo_bytes: xlstm_forecast::api::DEFAULT_FORECAST_MEMO_BYTES,
    }
}

impl TestApp {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, test_config()).await
    }

    pub async fn start_with(backend: Backend, config: ApiConfig) -> Self {
        let (postgres, sqlite, url) = match backend {
            Backend::Postgres => {
                let database = fresh_postgres().await;
                let url = database.url().to_string();
                (Some(database), None, url)
            }
            Backend::Sqlite => {
                let database = fresh_sqlite();
                let url = database.url().to_string();
                (None, Some(database), url)
            }
        };
        let store = xlstm_forecast::store::connect(&url)
            .await
            .unwrap_or_else(|err| panic!("connect to {url}: {err}"));
        let application =
            Application::build(&config, store.clone()).expect("build the application");
        let client = Client::new(application.local_addr(), config.api_key.as_deref());
        tokio::spawn(application.run_until_stopped());
        Self {
            client,
            store,
            _postgres: postgres,
            _sqlite: sqlite,
        }
    }

    /// Creates a series through the API and checks it was created.
    pub async fn create_series(&self, name: &str, channels: &[&str]) {
        let response = self
            .client
            .post_json(
                "/api/v1/series",
                &json!({"name": name, "frequency": "1h", "channels": channels}),
            )
            .await;
        assert_eq!(response.status, 201, "{}", response.text());
    }

    /// The series' stored cell count, as `GET /api/v1/series/{name}` reports it.
    pub async fn observation_count(&self, name: &str) -> u64 {
        let response = self.client.get(&format!("/api/v1/series/{name}")).await;
        assert_eq!(response.status, 200, "{}", response.text());
        response.json()["observations"]["count"]
            .as_u64()
            .expect("observations.count")
    }

    /// Every observation of a series in wide form.
    pub async fn observations(&self, name: &str) -> Value {
        let response = self
            .client
            .get(&format!("/api/v1/series/{name}/observations"))
            .await;
        assert_eq!(response.status, 200, "{}", response.text());
        response.json()
    }
}

impl TestApp {
    /// The URL of the database behind the server.
    pub fn database_url(&self) -> &str {
        match (&self._postgres, &self._sqlite) {
            (Some(postgres), _) => postgres.url(),
            (None, Some(sqlite)) => sqlite.url(),
            (None, None) => unreachable!("every test app has a database"),
        }
    }

    /// Runs one SQL statement on the database directly, behind the store's back.
    pub async fn execute_sql(&self, sql: &'static str) {
        use sqlx::{Connection, Executor};
        let url = self.database_url();
        if url.starts_with("sqlite:") {
            let mut conn = sqlx::SqliteConnection::connect(url)
                .await
                .expect("open the SQLite file");
            conn.execute(sql)
                .await
                .unwrap_or_else(|err| panic!("{sql}: {err}"));
        } else {
            let mut conn = sqlx::PgConnection::connect(url)
                .await
                .expect("connect to Postgres");
            conn.execute(sql)
                .await
                .unwrap_or_else(|err| panic!("{sql}: {err}"));
        }
    }

    /// The id of an existing series.
    pub async fn series_id(&self, name: &str) -> i64 {
        self.store
            .get_series(name)
            .await
            .expect("read the series")
            .unwrap_or_else(|| panic!("series {name} exists"))
            .id
    }

    /// Stores a complete model version of `series_id` (trained on January 2024).
    pub async fn insert_model_version(
        &self,
        series_id: i64,
        status: ModelVersionStatus,
        parent_version_id: Option<i64>,
        val_mse: f64,
    ) -> ModelVersionSummary {
        self.store
            .insert_model_version(&NewModelVersion {
                series_id,
                config: json!({"preset": "tiny", "lookback": 48, "horizon": 12}),
                artefact: vec![7; 64],
                normalisation: json!({"load": {"mean": 1.0, "std": 2.0}}),
                data_from: at("2024-01-01T00:00:00Z"),
                data_to: at("2024-01-31T23:00:00Z"),
                metrics: json!({"val_mse": val_mse, "val_mae": val_mse / 2.0, "coverage_80": 0.8,
                                "epochs": 3, "train_seconds": 1.5, "params": 1234}),
                status,
                parent_version_id,
            })
            .await
            .expect("insert a model version")
    }
}

/// An RFC 3339 timestamp as a UTC time.
pub fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|err| panic!("{text}: {err}"))
        .with_timezone(&Utc)
}

/// Runs each body once against Postgres and once against SQLite, as
/// `postgres::<name>` and `sqlite::<name>`, with `$backend` bound to the
/// backend (start a server with `TestApp::start($backend)`).
#[macro_export]
macro_rules! api_tests {
    ($(async fn $name:ident($backend:ident) $body:block)*) => {
        mod postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let $backend = $crate::api::Backend::Postgres;
                    $body
                }
            )*
        }
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let $backend = $crate::api::Backend::Sqlite;
                    $body
                }
            )*
        }
    };
}
