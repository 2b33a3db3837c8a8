//! Shared integration-test harness: a fresh real database per test (a
//! Postgres database created and dropped around the test, or a SQLite file in
//! a temporary directory), and `store_tests!` to run one test body against both.
//!
//! Postgres comes from `XLSTM_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); the URL's role must be
//! allowed to create databases. Tests never skip when it is missing: they fail
//! and say how to provide one.

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{Connection, Executor, PgConnection};

pub const POSTGRES_URL_VAR: &str = "XLSTM_TEST_POSTGRES_URL";
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database created for one test; dropped (with its connections) when this
/// value is dropped.
pub struct TestPostgres {
    admin_url: String,
    database: String,
    url: String,
}

impl TestPostgres {
    /// The URL of the fresh database.
    pub fn url(&self) -> &str {
        &self.url
    }
}

fn admin_url() -> String {
    std::env::var(POSTGRES_URL_VAR).unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_string())
}

fn unique_database_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "xf_test_{}_{}_{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The admin URL with its database path replaced by `database`.
fn database_url(admin_url: &str, database: &str) -> String {
    let mut url = url::Url::parse(admin_url)
        .unwrap_or_else(|err| panic!("{POSTGRES_URL_VAR}={admin_url} is not a valid URL: {err}"));
    url.set_path(&format!("/{database}"));
    url.to_string()
}

/// Creates a fresh, empty Postgres database for one test.
pub async fn fresh_postgres() -> TestPostgres {
    let admin_url = admin_url();
    let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|err| {
        panic!(
            "cannot reach the test Postgres at {admin_url}: {err}\n\
             start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` \
             or set {POSTGRES_URL_VAR} to a server whose role may create databases"
        )
    });
    let database = unique_database_name();
    // The name is generated here from digits and underscores, so quoting it is safe.
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{database}\""
        )))
        .await
        .unwrap_or_else(|err| {
            panic!("cannot create test database {database} at {admin_url}: {err}")
        });
    admin.close().await.ok();
    let url = database_url(&admin_url, &database);
    TestPostgres {
        admin_url,
        database,
        url,
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let database = self.database.clone();
        // Drop may run inside the test's runtime, where blocking on another
        // future is not allowed; a fresh thread with its own runtime is.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&admin_url).await?;
                admin
                    .execute(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
                    )))
                    .await?;
                admin.close().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            // Panicking in Drop would abort a test that is already failing;
            // a leftover database is only clutter.
            Ok(Err(err)) => eprintln!(
                "warning: could not drop test database {}: {err}",
                self.database
            ),
            Err(_) => eprintln!("warning: dropping test database {} panicked", self.database),
        }
    }
}

/// A SQLite database file in a temporary directory, removed when dropped.
pub struct TestSqlite {
    dir: tempfile::TempDir,
    url: String,
}

impl TestSqlite {
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("test.db")
    }
}

/// A fresh SQLite database (the file is created on first connect).
pub fn fresh_sqlite() -> TestSqlite {
    let dir =
        tempfile::tempdir().expect("cannot create a temporary directory for the test database");
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    TestSqlite { dir, url }
}

/// Runs each test body once against a fresh Postgres database and once
/// against a fresh SQLite file, as `postgres::<name>` and `sqlite::<name>`:
///
/// ```ignore
/// store_tests! {
///     async fn creates_series(store) {
///         store.create_series(&spec).await.unwrap();
///     }
/// }
/// ```
///
/// `store` is an `Arc<dyn Store>` connected (and migrated) through
/// `xlstm_forecast::store::connect`. Items the bodies use must be in scope of
/// the invoking module (the generated modules `use super::*`).
#[macro_export]
macro_rules! store_tests {
    ($(async fn $name:ident($store:ident) $body:block)*) => {
        mod postgres {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let database = $crate::common::fresh_postgres().await;
                    let $store = xlstm_forecast::store::connect(database.url()).await.expect("connect to the test Postgres database");
                    $body
                }
            )*
        }
        mod sqlite {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let database = $crate::common::fresh_sqlite();
                    let $store = xlstm_forecast::store::connect(database.url()).await.expect("open the test SQLite database");
                    $body
                }
            )*
        }
    };
}
