//! The `Store` interface and its Postgres and SQLite implementations: queries only.
