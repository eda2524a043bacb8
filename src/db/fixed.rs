//! SQLite statements of fixed text that diesel keeps prepared.
//!
//! diesel prepares every `sql_query` and every `UPDATE` anew on each run (both mark themselves
//! unsafe to cache), and on SQLite a prepare — parsing, name resolution, planning — cost the
//! writer about a quarter of its time once a batch had become a handful of statements. A
//! [`Fixed`] statement has a static query id and a constant text, so diesel's statement cache
//! prepares it once per connection. Its parameters are the batch's time (for every `?` but the
//! last) and the batch's rows as one JSON array (the last `?`), which SQLite reads with
//! `json_each`.

use std::marker::PhantomData;

use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{BigInt, Text, Untyped};
use diesel::sqlite::Sqlite;
use diesel::{QueryResult, RunQueryDsl};

/// The text of one fixed statement.
pub trait FixedSql: 'static {
    /// `?` marks the parameters: every one but the last is the batch's time, the last is the
    /// rows as a JSON array. (No `?` may appear elsewhere in the text.)
    const SQL: &'static str;
}

/// One run of the fixed statement `S`.
pub struct Fixed<S> {
    at: i64,
    rows: String,
    _sql: PhantomData<S>,
}

impl<S: FixedSql> Fixed<S> {
    /// `rows` serialized as a JSON array; `at` for the statement's other parameters.
    pub fn new<T: serde::Serialize>(at: i64, rows: &[T]) -> Self {
        Fixed {
            at,
            rows: serde_json::to_string(rows).expect("rows of strings and numbers serialize"),
            _sql: PhantomData,
        }
    }
}

impl<S: FixedSql> QueryId for Fixed<S> {
    type QueryId = S;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<S: FixedSql> QueryFragment<Sqlite> for Fixed<S> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        let mut parts = S::SQL.split('?');
        out.push_sql(parts.next().unwrap_or_default());
        let params = S::SQL.matches('?').count();
        for (i, part) in parts.enumerate() {
            if i + 1 == params {
                out.push_bind_param::<Text, _>(&self.rows)?;
            } else {
                out.push_bind_param::<BigInt, _>(&self.at)?;
            }
            out.push_sql(part);
        }
        Ok(())
    }
}

impl<S: FixedSql> Query for Fixed<S> {
    type SqlType = Untyped;
}

impl<S: FixedSql, Conn> RunQueryDsl<Conn> for Fixed<S> {}

/// Declares fixed statements: `fixed_sql! { Name = "SQL"; … }`.
macro_rules! fixed_sql {
    ($($(#[$doc:meta])* $name:ident = $sql:expr;)+) => {$(
        $(#[$doc])*
        pub struct $name;
        impl $crate::db::fixed::FixedSql for $name {
            const SQL: &'static str = $sql;
        }
    )+};
}
pub(crate) use fixed_sql;
