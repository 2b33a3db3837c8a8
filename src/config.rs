//! Effective settings: built-in defaults, then an optional TOML file, then
//! environment variables (each later source overrides the earlier ones).
//!
//! Environment variables:
//! - `DATABASE_URL`: `postgres://…`, `postgresql://…` or `sqlite:…`; without it the
//!   store is the SQLite file `<data_dir>/xlstm-forecast.db`.
//! - `XLSTM_FORECAST_DATA_DIR`: where local files live (default `./data`).
//! - `XLSTM_FORECAST_BIND`: the HTTP listen address (default `127.0.0.1:8080`).
//! - `XLSTM_FORECAST_API_KEY`: the key writes must present (secret; none by default).
//! - `XLSTM_FORECAST_CORS_ORIGINS`: comma-separated origins (`https://host[:port]`,
//!   or `*` for any) whose pages may call the API from a browser; none by default.
//! - `XLSTM_FORECAST_DEVICE`: where training and fine-tuning runs compute: `auto` (the
//!   default: CUDA when the build has it and a GPU is usable), `cpu`, `cuda` or `cuda:N`.
//!
//! An environment variable set to the empty string counts as unset, so that
//! `FOO=` in a container definition does not silently override the file.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::device::DeviceChoice;

pub const ENV_DATABASE_URL: &str = "DATABASE_URL";
pub const DEFAULT_FORECAST_MEMO_MIB: usize = 64;
pub const ENV_DATA_DIR: &str = "XLSTM_FORECAST_DATA_DIR";
pub const ENV_BIND: &str = "XLSTM_FORECAST_BIND";
pub const ENV_API_KEY: &str = "XLSTM_FORECAST_API_KEY";
pub const ENV_CORS_ORIGINS: &str = "XLSTM_FORECAST_CORS_ORIGINS";
pub const ENV_DEVICE: &str = "XLSTM_FORECAST_DEVICE";

/// The `cors_allowed_origins` entry that allows every origin.
pub const ANY_ORIGIN: &str = "*";

/// The file name of the embedded SQLite store inside the data directory.
pub const SQLITE_FILE_NAME: &str = "xlstm-forecast.db";

const MASK: &str = "****";

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub store: StoreSettings,
    pub compute: ComputeSettings,
    /// Where each key's effective value came from (key → source); keys absent
    /// here hold their built-in default.
    #[serde(skip)]
    pub origins: BTreeMap<String, SettingOrigin>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address the HTTP server listens on.
    pub bind: SocketAddr,
    /// When set, write requests must present this key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// Origins (`scheme://host[:port]`, or `*`) whose browser pages may call
    /// the API across origins. Empty (the default): none may.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cors_allowed_origins: Vec<String>,
    /// MiB of computed forecasts each API process keeps for reuse until a series' rows or
    /// champion change; 0 computes every forecast request.
    pub forecast_memo_mib: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key: None,
            cors_allowed_origins: Vec::new(),
            forecast_memo_mib: DEFAULT_FORECAST_MEMO_MIB,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// Directory for local files (the default SQLite database among them).
    pub data_dir: PathBuf,
    /// Explicit database URL; when absent the SQLite file in `data_dir` is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            database_url: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComputeSettings {
    /// Where training and fine-tuning runs compute: auto, cpu, cuda or cuda:N.
    pub device: DeviceChoice,
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingOrigin {
    File(String),
    Env(&'static str),
}

impl fmt::Display for SettingOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "file {path}"),
            Self::Env(var) => write!(f, "environment {var}"),
        }
    }
}

impl Settings {
    /// Loads the settings from `file` (when given) and the process environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let file_text = file
            .map(|path| {
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read configuration file {}", path.display()))
            })
            .transpose()?;
        let env: HashMap<String, String> = [
            ENV_DATABASE_URL,
            ENV_DATA_DIR,
            ENV_BIND,
            ENV_API_KEY,
            ENV_CORS_ORIGINS,
            ENV_DEVICE,
        ]
        .into_iter()
        .filter_map(|name| {
            std::env::var(name)
                .ok()
                .map(|value| (name.to_string(), value))
        })
        .collect();
        let file_label = file
            .map(|path| path.display().to_string())
            .unwrap_or_default();
        Self::from_sources(
            file_text.as_deref().map(|text| (file_label.as_str(), text)),
            &env,
        )
    }

    /// Builds the settings from an optional `(label, TOML text)` file and an
    /// explicit environment map; pure, so precedence is testable without
    /// touching the process environment.
    pub fn from_sources(
        file: Option<(&str, &str)>,
        env: &HashMap<String, String>,
    ) -> anyhow::Result<Self> {
        let mut settings = match file {
            Some((label, text)) => {
                let parsed: Settings = toml::from_str(text)
                    .map_err(|err| anyhow::anyhow!("configuration file {label}: {err}"))?;
                parsed.with_file_origins(label, text)?
            }
            None => Settings::default(),
        };
        let env_value = |name: &str| {
            env.get(name)
                .map(String::as_str)
                .filter(|value| !value.is_empty())
        };

        if let Some(url) = env_value(ENV_DATABASE_URL) {
            settings.store.database_url = Some(url.to_string());
            settings.origins.insert(
                "store.database_url".into(),
                SettingOrigin::Env(ENV_DATABASE_URL),
            );
        }
        if let Some(dir) = env_value(ENV_DATA_DIR) {
            settings.store.data_dir = PathBuf::from(dir);
            settings
                .origins
                .insert("store.data_dir".into(), SettingOrigin::Env(ENV_DATA_DIR));
        }
        if let Some(bind) = env_value(ENV_BIND) {
            settings.server.bind = bind.parse().map_err(|_| {
                anyhow::anyhow!("{ENV_BIND}: '{bind}' is not a socket address (expected host:port, e.g. 127.0.0.1:8080)")
            })?;
            settings
                .origins
                .insert("server.bind".into(), SettingOrigin::Env(ENV_BIND));
        }
        if let Some(key) = env_value(ENV_API_KEY) {
            settings.server.api_key = Some(key.to_string());
            settings
                .origins
                .insert("server.api_key".into(), SettingOrigin::Env(ENV_API_KEY));
        }
        if let Some(origins) = env_value(ENV_CORS_ORIGINS) {
            settings.server.cors_allowed_origins = origins
                .split(',')
                .map(str::trim)
                .filter(|origin| !origin.is_empty())
                .map(str::to_string)
                .collect();
            settings.origins.insert(
                "server.cors_allowed_origins".into(),
                SettingOrigin::Env(ENV_CORS_ORIGINS),
            );
        }
        if let Some(device) = env_value(ENV_DEVICE) {
            settings.compute.device = device
                .parse()
                .map_err(|problem| anyhow::anyhow!("{ENV_DEVICE}: {problem}"))?;
            settings
                .origins
                .insert("compute.device".into(), SettingOrigin::Env(ENV_DEVICE));
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Records which keys the file set, as `section.key` (the typed parse
    /// above has already rejected unknown keys, so every key found is real).
    fn with_file_origins(mut self, label: &str, text: &str) -> anyhow::Result<Self> {
        let table: toml::Table = toml::from_str(text)
            .map_err(|err| anyhow::anyhow!("configuration file {label}: {err}"))?;
        for (section_name, section) in &table {
            let Some(section) = section.as_table() else {
                continue;
            };
            for key in section.keys() {
                self.origins.insert(
                    format!("{section_name}.{key}"),
                    SettingOrigin::File(label.to_string()),
                );
            }
        }
        Ok(self)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if let Some(url) = &self.store.database_url {
            let key = self.origin_label("store.database_url");
            let scheme = url.split_once(':').map(|(scheme, _)| scheme).unwrap_or("");
            if !matches!(scheme, "postgres" | "postgresql" | "sqlite") {
                bail!(
                    "{key}: unsupported database URL scheme '{scheme}' in '{}' (expected postgres://, postgresql:// or sqlite:)",
                    mask_database_url(url)
                );
            }
        }
        if self.store.data_dir.as_os_str().is_empty() {
            bail!(
                "{}: the data directory must not be empty",
                self.origin_label("store.data_dir")
            );
        }
        if self.server.api_key.as_deref() == Some("") {
            bail!(
                "{}: the API key must not be empty (leave it unset to disable auth)",
                self.origin_label("server.api_key")
            );
        }
        for origin in &self.server.cors_allowed_origins {
            check_cors_origin(origin).map_err(|problem| {
                anyhow::anyhow!(
                    "{}: '{origin}' {problem}",
                    self.origin_label("server.cors_allowed_origins")
                )
            })?;
        }
        Ok(())
    }

    /// The name a user would look for when a value is wrong: the environment
    /// variable when one set it, else the TOML key.
    pub fn origin_label(&self, key: &str) -> String {
        match self.origins.get(key) {
            Some(SettingOrigin::Env(var)) => (*var).to_string(),
            Some(SettingOrigin::File(path)) => format!("{key} (in {path})"),
            None => key.to_string(),
        }
    }

    /// The effective database URL: the configured one, or the SQLite file in the data directory.
    pub fn database_url(&self) -> String {
        match &self.store.database_url {
            Some(url) => url.clone(),
            None => {
                let path = self.store.data_dir.join(SQLITE_FILE_NAME);
                format!("sqlite://{}", path.display())
            }
        }
    }

    /// A copy safe to print or log: database password and API key replaced by `****`.
    pub fn masked(&self) -> Settings {
        let mut masked = self.clone();
        masked.store.database_url = self.store.database_url.as_deref().map(mask_database_url);
        masked.server.api_key = self.server.api_key.as_ref().map(|_| MASK.to_string());
        masked
    }

    /// The masked settings as TOML, followed by a comment listing each key's source.
    pub fn to_masked_toml(&self) -> anyhow::Result<String> {
        let mut text = toml::to_string(&self.masked()).context("cannot render settings as TOML")?;
        text.push_str("\n# sources (keys not listed hold their built-in default):\n");
        if self.origins.is_empty() {
            text.push_str("#   (none: all defaults)\n");
        }
        for (key, origin) in &self.origins {
            text.push_str(&format!("#   {key}: {origin}\n"));
        }
        Ok(text)
    }
}

/// An allowed CORS origin is `*` or exactly what a browser sends in its
/// `Origin` header: `http` or `https`, a host, an optional port, nothing else.
fn check_cors_origin(origin: &str) -> Result<(), String> {
    if origin == ANY_ORIGIN {
        return Ok(());
    }
    let parsed = url::Url::parse(origin).map_err(|err| {
        format!("is not an origin ({err}); expected e.g. https://grafana.example.com:3000")
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "has the scheme '{}'; expected http or https",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none() {
        return Err("has no host".to_string());
    }
    if parsed.origin().ascii_serialization() != origin {
        return Err(format!(
            "is not an origin: write it as '{}' (no path, query, trailing slash or credentials)",
            parsed.origin().ascii_serialization()
        ));
    }
    Ok(())
}

/// Replaces the password of a database URL (user-info part and a `password`
/// query parameter) with `****`; anything unparsable is returned whole except
/// for a best-effort cut of the user-info part, so a typo never leaks a secret.
pub fn mask_database_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                // set_password only fails for URLs that cannot have credentials,
                // and those cannot have a password to hide either.
                let _ = parsed.set_password(Some(MASK));
            }
            if parsed.query_pairs().any(|(name, _)| name == "password") {
                let pairs: Vec<(String, String)> = parsed
                    .query_pairs()
                    .map(|(name, value)| {
                        let value = if name == "password" {
                            MASK.to_string()
                        } else {
                            value.into_owned()
                        };
                        (name.into_owned(), value)
                    })
                    .collect();
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            parsed.to_string()
        }
        Err(_) => match (url.find("://"), url.rfind('@')) {
            (Some(scheme_end), Some(at)) if at > scheme_end => {
                format!("{}://{MASK}@{}", &url[..scheme_end], &url[at + 1..])
            }
            _ => url.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_use_sqlite_file_in_data_dir_and_localhost() {
        let settings = Settings::from_sources(None, &HashMap::new()).unwrap();
        assert_eq!(settings.database_url(), "sqlite://./data/xlstm-forecast.db");
        assert_eq!(settings.server.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(settings.server.api_key, None);
        assert!(settings.origins.is_empty());
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        let file = r#"
            [server]
            bind = "0.0.0.0:9000"
            api_key = "from-file"
            [store]
            data_dir = "/var/lib/xf"
        "#;
        let from_file = Settings::from_sources(Some(("xf.toml", file)), &HashMap::new()).unwrap();
        assert_eq!(from_file.server.bind.to_string(), "0.0.0.0:9000");
        assert_eq!(
            from_file.database_url(),
            "sqlite:///var/lib/xf/xlstm-forecast.db"
        );
        assert_eq!(
            from_file.origins["server.bind"],
            SettingOrigin::File("xf.toml".into())
        );

        let overridden = Settings::from_sources(
            Some(("xf.toml", file)),
            &env(&[
                (ENV_BIND, "127.0.0.1:7000"),
                (ENV_DATABASE_URL, "postgres://u:pw@db/xf"),
                (ENV_API_KEY, "from-env"),
            ]),
        )
        .unwrap();
        assert_eq!(overridden.server.bind.to_string(), "127.0.0.1:7000");
        assert_eq!(overridden.server.api_key.as_deref(), Some("from-env"));
        assert_eq!(overridden.database_url(), "postgres://u:pw@db/xf");
        // The data dir was not overridden, so the file's value stands.
        assert_eq!(overridden.store.data_dir, PathBuf::from("/var/lib/xf"));
        assert_eq!(
            overridden.origins["server.bind"],
            SettingOrigin::Env(ENV_BIND)
        );
        assert_eq!(
            overridden.origins["store.data_dir"],
            SettingOrigin::File("xf.toml".into())
        );
    }

    #[test]
    fn the_forecast_memo_size_comes_from_the_file_and_zero_turns_it_off() {
        let default = Settings::from_sources(None, &HashMap::new()).unwrap();
        assert_eq!(default.server.forecast_memo_mib, DEFAULT_FORECAST_MEMO_MIB);
        let file = "[server]\nforecast_memo_mib = 0\n";
        let off = Settings::from_sources(Some(("xf.toml", file)), &HashMap::new()).unwrap();
        assert_eq!(off.server.forecast_memo_mib, 0);
        let err = Settings::from_sources(
            Some(("xf.toml", "[server]\nforecast_memo_mib = -1\n")),
            &HashMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("forecast_memo_mib"), "{err}");
    }

    #[test]
    fn empty_env_value_counts_as_unset() {
        let settings =
            Settings::from_sources(None, &env(&[(ENV_BIND, ""), (ENV_API_KEY, "")])).unwrap();
        assert_eq!(settings.server.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(settings.server.api_key, None);
    }

    #[test]
    fn unknown_key_in_file_is_named_in_the_error() {
        let err = Settings::from_sources(
            Some(("xf.toml", "[server]\nbnid = \"0.0.0.0:1\"\n")),
            &HashMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bnid"), "{err}");
        assert!(err.contains("xf.toml"), "{err}");
        let err = Settings::from_sources(Some(("xf.toml", "[sever]\n")), &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("sever"), "{err}");
    }

    #[test]
    fn invalid_values_name_their_source() {
        let err = Settings::from_sources(None, &env(&[(ENV_BIND, "localhost")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(ENV_BIND) && err.contains("localhost"), "{err}");
        let err =
            Settings::from_sources(None, &env(&[(ENV_DATABASE_URL, "mysql://u:secret@h/db")]))
                .unwrap_err()
                .to_string();
        assert!(
            err.contains(ENV_DATABASE_URL) && err.contains("mysql"),
            "{err}"
        );
        assert!(
            !err.contains("secret"),
            "the password leaked into the error: {err}"
        );
        let err = Settings::from_sources(
            Some(("xf.toml", "[store]\ndatabase_url = \"ftp://x\"\n")),
            &HashMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("store.database_url") && err.contains("xf.toml"),
            "{err}"
        );
    }

    #[test]
    fn cors_origins_come_from_the_file_or_a_comma_separated_env_var() {
        let settings = Settings::from_sources(None, &HashMap::new()).unwrap();
        assert!(
            settings.server.cors_allowed_origins.is_empty(),
            "CORS is closed by default"
        );
        let file = "[server]\ncors_allowed_origins = [\"https://a.example\"]\n";
        let from_file = Settings::from_sources(Some(("xf.toml", file)), &HashMap::new()).unwrap();
        assert_eq!(
            from_file.server.cors_allowed_origins,
            vec!["https://a.example"]
        );
        let from_env = Settings::from_sources(
            Some(("xf.toml", file)),
            &env(&[(
                ENV_CORS_ORIGINS,
                "http://localhost:3000, https://b.example:8443,",
            )]),
        )
        .unwrap();
        assert_eq!(
            from_env.server.cors_allowed_origins,
            vec!["http://localhost:3000", "https://b.example:8443"]
        );
        let any = Settings::from_sources(None, &env(&[(ENV_CORS_ORIGINS, "*")])).unwrap();
        assert_eq!(any.server.cors_allowed_origins, vec!["*"]);
    }

    #[test]
    fn malformed_cors_origins_are_refused_naming_the_source() {
        for bad in [
            "localhost:3000",
            "ftp://a.example",
            "https://a.example/",
            "https://a.example/app",
            "https://u:p@a.example",
        ] {
            let err = Settings::from_sources(None, &env(&[(ENV_CORS_ORIGINS, bad)]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(ENV_CORS_ORIGINS) && err.contains(bad),
                "{bad}: {err}"
            );
        }
        let err = Settings::from_sources(
            Some(("xf.toml", "[server]\ncors_allowed_origins = [\"nope\"]\n")),
            &HashMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("server.cors_allowed_origins") && err.contains("xf.toml"),
            "{err}"
        );
    }

    #[test]
    fn sqlite_url_is_accepted() {
        let settings =
            Settings::from_sources(None, &env(&[(ENV_DATABASE_URL, "sqlite:///tmp/x.db")]))
                .unwrap();
        assert_eq!(settings.database_url(), "sqlite:///tmp/x.db");
    }

    #[test]
    fn masked_hides_password_and_api_key() {
        let settings = Settings::from_sources(
            None,
            &env(&[
                (ENV_DATABASE_URL, "postgres://xf:s3cret@db:5432/xf"),
                (ENV_API_KEY, "k3y"),
            ]),
        )
        .unwrap();
        let masked = settings.masked();
        assert_eq!(
            masked.store.database_url.as_deref(),
            Some("postgres://xf:****@db:5432/xf")
        );
        assert_eq!(masked.server.api_key.as_deref(), Some("****"));
        let text = settings.to_masked_toml().unwrap();
        assert!(!text.contains("s3cret") && !text.contains("k3y"), "{text}");
        assert!(
            text.contains("server.api_key: environment XLSTM_FORECAST_API_KEY"),
            "{text}"
        );
        // The original keeps the real values.
        assert_eq!(settings.database_url(), "postgres://xf:s3cret@db:5432/xf");
    }

    #[test]
    fn mask_database_url_covers_query_password_and_plain_urls() {
        assert_eq!(
            mask_database_url("postgres://db/xf?user=xf&password=s3cret"),
            "postgres://db/xf?user=xf&password=****"
        );
        assert_eq!(
            mask_database_url("postgres://xf@db/xf"),
            "postgres://xf@db/xf"
        );
        assert_eq!(
            mask_database_url("sqlite://./data/x.db"),
            "sqlite://./data/x.db"
        );
    }

    #[test]
    fn masked_settings_render_as_toml_that_parses_back() {
        let settings = Settings::from_sources(None, &env(&[(ENV_API_KEY, "k")])).unwrap();
        let text = settings.to_masked_toml().unwrap();
        let reparsed: Settings = toml::from_str(&text).unwrap();
        assert_eq!(reparsed.server.api_key.as_deref(), Some("****"));
        assert_eq!(reparsed.server.bind, settings.server.bind);
    }
}
