//! The Grafana provisioning under dashboards/grafana/ against the real
//! Postgres schema: every panel query and template-variable query of every
//! dashboard is interpolated the way Grafana does it (template variables,
//! then the SQL macros), run as the read-only role the migrations create on a
//! fresh database holding a test series, and must return rows with the
//! columns its panel reads.

mod common;
mod dashboard_seed;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Column, Connection, Executor, PgConnection, Row, TypeInfo, ValueRef};

const DATASOURCE_UID: &str = "xlstm-forecast-pg";
const READER_ROLE: &str = "xlstm_forecast_reader";
/// A name with the punctuation series names may have (quoting is covered
/// by `interpolation_matches_grafana`).
const SERIES: &str = "site-7.load_kW";
/// What `$__interval` stands for in the test (Grafana derives it from the
/// time range and the panel width).
const INTERVAL: &str = "1h";
const INTERVAL_SECONDS: i64 = 3600;

fn provisioning_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/grafana/provisioning")
}

/// The columns each panel query must return, by (dashboard uid, panel title, refId).
fn expected_columns() -> BTreeMap<(&'static str, &'static str, &'static str), Vec<&'static str>> {
    let forecasts = "xlstm-forecast-forecasts";
    let training = "xlstm-forecast-training";
    BTreeMap::from([
        (
            (forecasts, "Actuals and latest forecast (10-90 % band)", "A"),
            vec!["time", "actual"],
        ),
        (
            (forecasts, "Actuals and latest forecast (10-90 % band)", "B"),
            vec!["time", "forecast", "p10", "p90"],
        ),
        (
            (forecasts, "Forecast error by issue time", "A"),
            vec!["time", "MAE", "RMSE", "coverage 10-90 %"],
        ),
        (
            (forecasts, "Forecast error by target time", "A"),
            vec!["time", "absolute error", "forecasts"],
        ),
        (
            (forecasts, "Persisted forecasts", "A"),
            vec![
                "forecast",
                "issued_at",
                "model_version",
                "horizon",
                "quantile_levels",
                "first_target",
                "last_target",
            ],
        ),
        (
            (training, "Run states", "A"),
            vec!["time", "metric", "value"],
        ),
        (
            (training, "Runs", "A"),
            vec![
                "run",
                "kind",
                "status",
                "attempts",
                "epoch",
                "max_epochs",
                "train_loss",
                "val_loss",
                "best_val_loss",
                "created_at",
                "started_at",
                "finished_at",
                "duration_s",
                "model_version",
                "error",
            ],
        ),
        (
            (training, "Run durations", "A"),
            vec!["time", "metric", "value"],
        ),
        (
            (training, "Validation error by model version", "A"),
            vec!["time", "val_mse", "val_mae"],
        ),
        (
            (training, "Model versions", "A"),
            vec![
                "version",
                "status",
                "parent",
                "created_at",
                "data_from",
                "data_to",
                "preset",
                "lookback",
                "horizon",
                "val_mse",
                "val_mae",
                "coverage_80",
                "epochs",
                "train_seconds",
                "params",
                "artefact_bytes",
            ],
        ),
    ])
}

struct Dashboard {
    file: String,
    json: Value,
}

fn dashboards() -> Vec<Dashboard> {
    let dir = provisioning_dir().join("dashboards/xlstm-forecast");
    let mut found: Vec<Dashboard> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("cannot list {}: {err}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|err| panic!("{} is not JSON: {err}", path.display()));
            Dashboard {
                file: path.file_name().unwrap().to_string_lossy().into_owned(),
                json,
            }
        })
        .collect();
    found.sort_by(|a, b| a.file.cmp(&b.file));
    assert!(
        found.len() >= 2,
        "expected the forecast and training dashboards in {}",
        dir.display()
    );
    found
}

/// Every panel, including those nested in collapsed rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels array") {
        all.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            all.extend(nested);
        }
    }
    all
}

// --- the time range and Grafana's interpolation ---

#[derive(Debug, Clone, Copy)]
struct TimeRange {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
}

/// A relative Grafana time such as `now`, `now-7d` or `now+2d`.
fn relative_time(text: &str, now: DateTime<Utc>) -> DateTime<Utc> {
    let offset = text
        .strip_prefix("now")
        .unwrap_or_else(|| panic!("time '{text}' is not relative to now"));
    if offset.is_empty() {
        return now;
    }
    let (sign, amount) = offset.split_at(1);
    let (number, unit) = amount.split_at(amount.len() - 1);
    let number: i64 = number
        .parse()
        .unwrap_or_else(|_| panic!("time '{text}': '{number}' is not a number"));
    let span = match unit {
        "m" => Duration::minutes(number),
        "h" => Duration::hours(number),
        "d" => Duration::days(number),
        "w" => Duration::weeks(number),
        other => panic!("time '{text}': unit '{other}' is not supported by this test"),
    };
    match sign {
        "-" => now - span,
        "+" => now + span,
        other => panic!("time '{text}': expected + or - after now, found '{other}'"),
    }
}

fn time_range(dashboard: &Value, now: DateTime<Utc>) -> TimeRange {
    let time = &dashboard["time"];
    TimeRange {
        from: relative_time(time["from"].as_str().expect("time.from"), now),
        to: relative_time(time["to"].as_str().expect("time.to"), now),
    }
}

/// Template variables as the SQL data sources format a single, non-multi
/// value: `$name`/`${name}` raw, `${name:sqlstring}` quoted with quotes doubled.
fn interpolate_variables(sql: &str, variables: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        if let Some(braced) = after.strip_prefix('{') {
            let end = braced
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {sql}"));
            let (name, format) = match braced[..end].split_once(':') {
                Some((name, format)) => (name, Some(format)),
                None => (&braced[..end], None),
            };
            let value = variables
                .get(name)
                .unwrap_or_else(|| panic!("unknown variable '{name}' in {sql}"));
            match format {
                None | Some("raw") => out.push_str(value),
                Some("sqlstring") => out.push_str(&format!("'{}'", value.replace('\'', "''"))),
                Some(other) => panic!("variable format '{other}' is not supported by this test"),
            }
            rest = &braced[end + 1..];
        } else {
            let name_len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            let name = &after[..name_len];
            match variables.get(name) {
                Some(value) => out.push_str(value),
                // Macros ($__timeFilter(...)) are the data source's business.
                None => {
                    out.push('$');
                    out.push_str(name);
                }
            }
            rest = &after[name_len..];
        }
    }
    out.push_str(rest);
    out
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn interval_seconds(text: &str) -> i64 {
    let text = text.trim().trim_matches(|c| c == '\'' || c == '"');
    let (number, unit) = text.split_at(text.len() - 1);
    let number: i64 = number
        .parse()
        .unwrap_or_else(|_| panic!("interval '{text}' is not a number and a unit"));
    number
        * match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            other => panic!("interval unit '{other}' is not supported by this test"),
        }
}

/// Grafana's PostgreSQL macros. Like Grafana, a macro's arguments run to the
/// first closing parenthesis, so `$__timeFilter(coalesce(a, b))` breaks here
/// as it would there.
fn expand_macros(sql: &str, range: TimeRange) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(start) = rest.find("$__") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 3..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..name_len];
        let call = after[name_len..]
            .strip_prefix('(')
            .unwrap_or_else(|| panic!("$__{name} without arguments in {sql}"));
        let close = call
            .find(')')
            .unwrap_or_else(|| panic!("unclosed $__{name}( in {sql}"));
        let args: Vec<&str> = call[..close].split(',').map(str::trim).collect();
        let from = rfc3339(range.from);
        let to = rfc3339(range.to);
        let expansion = match name {
            "timeFilter" => format!("{} BETWEEN '{from}' AND '{to}'", args[0]),
            "timeFrom" => format!("'{from}'"),
            "timeTo" => format!("'{to}'"),
            "time" => format!("{} AS \"time\"", args[0]),
            "timeGroup" | "timeGroupAlias" => {
                assert!(
                    args.len() >= 2,
                    "$__{name} needs a column and an interval in {sql}"
                );
                let seconds = interval_seconds(args[1]);
                let group = format!("floor(extract(epoch from {})/{seconds})*{seconds}", args[0]);
                if name == "timeGroupAlias" {
                    format!("{group} AS \"time\"")
                } else {
                    group
                }
            }
            other => panic!("macro $__{other} is not supported by this test"),
        };
        out.push_str(&expansion);
        rest = &call[close + 1..];
    }
    out.push_str(rest);
    out
}

// --- running the queries ---

/// A connection acting as the read-only Grafana role.
async fn reader_connection(url: &str) -> PgConnection {
    let mut connection = PgConnection::connect(url)
        .await
        .expect("connect to the test database");
    connection
        .execute(AssertSqlSafe(format!("SET ROLE {READER_ROLE}")))
        .await
        .expect("the migrations create the Grafana reader role");
    connection
}

async fn run(connection: &mut PgConnection, what: &str, sql: &str) -> Vec<PgRow> {
    sqlx::query(AssertSqlSafe(sql.to_string()))
        .fetch_all(connection)
        .await
        .unwrap_or_else(|err| panic!("{what} failed: {err}\n--- SQL ---\n{sql}"))
}

fn column_names(rows: &[PgRow]) -> Vec<String> {
    rows[0]
        .columns()
        .iter()
        .map(|column| column.name().to_string())
        .collect()
}

/// The first column's values as text (template variables are text).
fn first_column_text(rows: &[PgRow]) -> Vec<String> {
    rows.iter()
        .map(|row| row.try_get::<String, _>(0).expect("a text value"))
        .collect()
}

async fn resolve_variables(
    connection: &mut PgConnection,
    dashboard: &Dashboard,
) -> BTreeMap<String, String> {
    let mut variables = BTreeMap::from([
        ("__interval".to_string(), INTERVAL.to_string()),
        (
            "__interval_ms".to_string(),
            (INTERVAL_SECONDS * 1000).to_string(),
        ),
    ]);
    // Variables are resolved in order; later ones may use earlier ones.
    for variable in dashboard.json["templating"]["list"]
        .as_array()
        .expect("templating.list")
    {
        let name = variable["name"].as_str().expect("variable name");
        assert_eq!(
            variable["type"], "query",
            "{}: variable {name}",
            dashboard.file
        );
        assert_eq!(
            variable["datasource"]["uid"], DATASOURCE_UID,
            "{}: variable {name}",
            dashboard.file
        );
        let query = variable["query"].as_str().expect("variable query");
        let sql = interpolate_variables(query, &variables);
        let rows = run(
            connection,
            &format!("{}: variable {name}", dashboard.file),
            &sql,
        )
        .await;
        let values = first_column_text(&rows);
        let first = values
            .first()
            .unwrap_or_else(|| panic!("{}: variable {name} has no values:\n{sql}", dashboard.file))
            .clone();
        match name {
            "series" => assert_eq!(values, vec![SERIES.to_string()]),
            "channel" => assert_eq!(values, dashboard_seed::CHANNELS.map(String::from).to_vec()),
            other => panic!("{}: no expectation for variable {other}", dashboard.file),
        }
        variables.insert(name.to_string(), first);
    }
    variables
}

/// Checks the rows of one panel query against what the panel reads.
fn check_rows(what: &str, panel: &Value, target: &Value, rows: &[PgRow], expected: &[&str]) {
    assert!(!rows.is_empty(), "{what} returned no rows");
    let names = column_names(rows);
    assert_eq!(names, expected, "{what}: columns");
    let format = target["format"].as_str().expect("target format");
    for (index, column) in rows[0].columns().iter().enumerate() {
        let type_name = column.type_info().name().to_string();
        let non_null = rows
            .iter()
            .filter(|row| !row.try_get_raw(index).expect("column value").is_null())
            .count();
        // Columns that are legitimately empty for the seeded data.
        let may_be_empty = matches!(
            column.name(),
            "parent" | "error" | "model_version" | "finished_at"
        );
        assert!(
            non_null > 0 || may_be_empty,
            "{what}: column '{}' is NULL in every row",
            column.name()
        );
        if format == "time_series" {
            match column.name() {
                "time" => assert!(
                    matches!(
                        type_name.as_str(),
                        "TIMESTAMPTZ" | "NUMERIC" | "FLOAT8" | "INT8"
                    ),
                    "{what}: time column has type {type_name}"
                ),
                "metric" => assert_eq!(type_name, "TEXT", "{what}: metric column"),
                name => assert!(
                    matches!(type_name.as_str(), "FLOAT8" | "NUMERIC" | "INT8" | "INT4"),
                    "{what}: value column '{name}' has type {type_name}, Grafana plots numbers"
                ),
            }
        }
    }
    // Overrides and band fills refer to fields by name; they must exist.
    if panel["type"] != "state-timeline" {
        for field_override in panel["fieldConfig"]["overrides"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if field_override["matcher"]["id"] == "byName" {
                let field = field_override["matcher"]["options"]
                    .as_str()
                    .expect("override field");
                let panel_fields: BTreeSet<&str> = expected_columns_of_panel(panel);
                assert!(
                    panel_fields.contains(field),
                    "{what}: override for missing field '{field}'"
                );
            }
            for property in field_override["properties"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if property["id"] == "custom.fillBelowTo" {
                    let to = property["value"].as_str().expect("fillBelowTo field");
                    assert!(
                        expected_columns_of_panel(panel).contains(to),
                        "{what}: band fills to missing field '{to}'"
                    );
                }
            }
        }
    }
}

/// Every column the panel's queries are expected to return.
fn expected_columns_of_panel(panel: &Value) -> BTreeSet<&'static str> {
    let title = panel["title"].as_str().unwrap_or_default();
    expected_columns()
        .into_iter()
        .filter(|((_, panel_title, _), _)| *panel_title == title)
        .flat_map(|(_, columns)| columns)
        .collect()
}

#[tokio::test]
async fn every_panel_query_returns_the_columns_its_panel_reads() {
    let database = common::fresh_postgres().await;
    let store = xlstm_forecast::store::connect(database.url())
        .await
        .expect("connect and migrate the test database");
    let seeded = dashboard_seed::seed(store.as_ref(), SERIES).await;

    // No Store method claims runs yet (the job queue adds one); give the
    // runs the start times a worker would have recorded, and put the last
    // one in the state a worker keeps it in while training.
    let mut admin = PgConnection::connect(database.url())
        .await
        .expect("connect");
    for (run, minutes) in [
        (seeded.succeeded_run_id, 40),
        (seeded.failed_run_id, 3),
        (seeded.running_run_id, 5),
    ] {
        sqlx::query(
            "UPDATE runs SET started_at = coalesce(finished_at, now()) - make_interval(mins => $2) WHERE id = $1",
        )
        .bind(run)
        .bind(minutes)
        .execute(&mut admin)
        .await
        .expect("set the run's start time");
    }
    sqlx::query("UPDATE runs SET status = 'running', attempts = 1 WHERE id = $1")
        .bind(seeded.running_run_id)
        .execute(&mut admin)
        .await
        .expect("mark the run as training");

    let mut reader = reader_connection(database.url()).await;
    let now = Utc::now();
    let mut expectations = expected_columns();
    let mut queries_run = 0;
    for dashboard in dashboards() {
        let uid = dashboard.json["uid"]
            .as_str()
            .expect("dashboard uid")
            .to_string();
        let range = time_range(&dashboard.json, now);
        let variables = resolve_variables(&mut reader, &dashboard).await;
        for panel in panels(&dashboard.json) {
            if panel["type"] == "row" {
                continue;
            }
            let title = panel["title"].as_str().expect("panel title");
            assert_eq!(
                panel["datasource"]["uid"], DATASOURCE_UID,
                "{}: panel '{title}'",
                dashboard.file
            );
            for target in panel["targets"].as_array().expect("panel targets") {
                let ref_id = target["refId"].as_str().expect("refId");
                let what = format!("{} / '{title}' / {ref_id}", dashboard.file);
                assert_eq!(target["datasource"]["uid"], DATASOURCE_UID, "{what}");
                let raw = target["rawSql"].as_str().expect("rawSql");
                let sql = expand_macros(&interpolate_variables(raw, &variables), range);
                assert!(
                    !sql.contains('$'),
                    "{what}: something was not substituted:\n{sql}"
                );
                let key = *expectations
                    .keys()
                    .find(|(u, t, r)| *u == uid && *t == title && *r == ref_id)
                    .unwrap_or_else(|| {
                        panic!("{what}: the test has no expectation for this query")
                    });
                let expected = expectations.remove(&key).expect("the key was just found");
                let rows = run(&mut reader, &what, &sql).await;
                check_rows(&what, panel, target, &rows, &expected);
                queries_run += 1;
            }
        }
    }
    assert!(
        expectations.is_empty(),
        "panels the dashboards no longer have: {:?}",
        expectations.keys()
    );
    assert_eq!(queries_run, expected_columns().len());
}

/// The forecast dashboard's band query reads the latest forecast and the
/// error panel scores the past ones; check the numbers, not only the shape.
#[tokio::test]
async fn forecast_queries_return_the_latest_band_and_the_past_errors() {
    let database = common::fresh_postgres().await;
    let store = xlstm_forecast::store::connect(database.url())
        .await
        .expect("connect");
    let seeded = dashboard_seed::seed(store.as_ref(), SERIES).await;
    let dashboard = dashboards()
        .into_iter()
        .find(|dashboard| dashboard.json["uid"] == "xlstm-forecast-forecasts")
        .expect("the forecast dashboard");
    let mut reader = reader_connection(database.url()).await;
    let range = time_range(&dashboard.json, Utc::now());
    let variables = resolve_variables(&mut reader, &dashboard).await;
    let query = |title: &str, ref_id: &str| {
        let panel = panels(&dashboard.json)
            .into_iter()
            .find(|panel| panel["title"] == title)
            .unwrap_or_else(|| panic!("panel '{title}'"));
        let target = panel["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|target| target["refId"] == ref_id)
            .unwrap_or_else(|| panic!("panel '{title}' query {ref_id}"));
        expand_macros(
            &interpolate_variables(target["rawSql"].as_str().unwrap(), &variables),
            range,
        )
    };

    let band = run(
        &mut reader,
        "band",
        &query("Actuals and latest forecast (10-90 % band)", "B"),
    )
    .await;
    assert_eq!(
        band.len(),
        dashboard_seed::LATEST_HORIZON as usize,
        "one row per step of the latest forecast"
    );
    let first_time: DateTime<Utc> = band[0].get("time");
    assert_eq!(first_time, seeded.last_observation + Duration::hours(1));
    let last_time: DateTime<Utc> = band[band.len() - 1].get("time");
    assert!(
        last_time > Utc::now(),
        "the latest forecast reaches into the future"
    );
    for row in &band {
        let (p10, forecast, p90): (f64, f64, f64) =
            (row.get("p10"), row.get("forecast"), row.get("p90"));
        assert!(
            p10 < forecast && forecast < p90,
            "band {p10} < {forecast} < {p90}"
        );
        let at: DateTime<Utc> = row.get("time");
        // The latest forecast has no bias; the older ones are 3 off.
        assert!((forecast - dashboard_seed::actual(0, at)).abs() < 1e-9);
    }

    let errors = run(
        &mut reader,
        "errors",
        &query("Forecast error by issue time", "A"),
    )
    .await;
    assert_eq!(
        errors.len(),
        2,
        "the two past forecasts have actuals; the latest has none yet"
    );
    for row in &errors {
        let mae: f64 = row.get("MAE");
        assert!(
            (mae - 3.0).abs() < 1e-9,
            "past forecasts are 3 too high: MAE {mae}"
        );
    }
}

#[tokio::test]
async fn reader_role_cannot_write() {
    let database = common::fresh_postgres().await;
    xlstm_forecast::store::connect(database.url())
        .await
        .expect("connect");
    let mut reader = reader_connection(database.url()).await;
    let refused = sqlx::query("INSERT INTO series (name, channels) VALUES ('x', ARRAY['a'])")
        .execute(&mut reader)
        .await
        .expect_err("the Grafana role must not write");
    assert!(
        refused.to_string().contains("permission denied"),
        "{refused}"
    );
    let refused = reader
        .execute("DELETE FROM observations")
        .await
        .expect_err("no deletes either");
    assert!(
        refused.to_string().contains("permission denied"),
        "{refused}"
    );
}

/// The role is cluster-wide: migrating several databases at once (as the
/// test suite does) must neither fail nor duplicate it.
#[tokio::test]
async fn reader_role_migration_is_harmless_when_the_role_exists() {
    let databases = [
        common::fresh_postgres().await,
        common::fresh_postgres().await,
        common::fresh_postgres().await,
    ];
    let migrations = databases
        .iter()
        .map(|database| xlstm_forecast::store::connect(database.url()));
    for result in futures::future::join_all(migrations).await {
        result.expect("concurrent migrations succeed");
    }
    for database in &databases {
        let mut reader = reader_connection(database.url()).await;
        run(
            &mut reader,
            "select as the reader",
            "SELECT count(*) FROM forecast_points",
        )
        .await;
    }
}

#[test]
fn provisioning_names_the_data_source_the_dashboards_use() {
    let datasource =
        std::fs::read_to_string(provisioning_dir().join("datasources/xlstm-forecast.yaml"))
            .expect("the data source provisioning file");
    assert!(
        datasource.contains(&format!("uid: {DATASOURCE_UID}")),
        "{datasource}"
    );
    for secret in ["${XLSTM_FORECAST_PG_PASSWORD}", "${XLSTM_FORECAST_PG_USER}"] {
        assert!(
            datasource.contains(secret),
            "credentials come from the environment: {secret}"
        );
    }
    let provider =
        std::fs::read_to_string(provisioning_dir().join("dashboards/xlstm-forecast.yaml"))
            .expect("the dashboard provider file");
    assert!(
        provider.contains("path: /etc/grafana/provisioning/dashboards/xlstm-forecast"),
        "{provider}"
    );
    let mut uids = BTreeSet::new();
    for dashboard in dashboards() {
        let uid = dashboard.json["uid"].as_str().expect("uid");
        assert!(uids.insert(uid.to_string()), "uid {uid} used twice");
        let templated: Vec<&str> = dashboard.json["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|variable| variable["name"].as_str())
            .collect();
        assert!(
            templated.contains(&"series"),
            "{}: a series variable",
            dashboard.file
        );
    }
}

#[test]
fn interpolation_matches_grafana() {
    let variables = BTreeMap::from([
        ("series".to_string(), "o'hare".to_string()),
        ("__interval".to_string(), "5m".to_string()),
    ]);
    assert_eq!(
        interpolate_variables(
            "name = ${series:sqlstring} AND x = '$series' AND $__timeFilter(ts)",
            &variables
        ),
        "name = 'o''hare' AND x = 'o'hare' AND $__timeFilter(ts)"
    );
    let range = TimeRange {
        from: "2026-01-01T00:00:00Z".parse().unwrap(),
        to: "2026-01-02T00:00:00Z".parse().unwrap(),
    };
    assert_eq!(
        expand_macros(
            &interpolate_variables(
                "SELECT $__timeGroupAlias(ts, $__interval) WHERE $__timeFilter(ts)",
                &variables
            ),
            range
        ),
        "SELECT floor(extract(epoch from ts)/300)*300 AS \"time\" WHERE ts BETWEEN '2026-01-01T00:00:00Z' AND '2026-01-02T00:00:00Z'"
    );
}
