//! The HTTP API end to end: a real server on a free port, real sockets, and a
//! real Postgres database or SQLite file behind it (see `tests/api/`).

mod api;
mod common;
