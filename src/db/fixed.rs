//! SQLite batch statements whose rows are bound parameters, in chunks of a few fixed sizes, so
//! that diesel keeps every statement prepared.
//!
//! diesel prepares every `sql_query` and every `UPDATE` anew on each run (both mark themselves
//! unsafe to cache), and on SQLite a prepare — parsing, name resolution, planning — cost the
//! writer about a quarter of its time once a batch had become a handful of statements. A
//! [`Rows`] statement is safe to cache, and its type names the statement and the chunk size, so
//! diesel's statement cache finds it by type id: it is prepared once per connection and chunk
//! size, and its text is built only then (a cache keyed by text would build and hash the text on
//! every run, ~6 % of the writer's time).
//!
//! Its rows are bound parameters: a batch of `n` rows runs as one statement per set bit of `n`
//! (chunks of 256, 128, …, 1 rows; a batch over 256 rows runs as several 256-row chunks first),
//! so a statement has at most nine texts. The rows used to travel as one JSON array read with
//! `json_each`: writing that JSON, and SQLite parsing it back and extracting every field, was a
//! fifth of the writer's time (docs/BENCHMARKS.md, sixth pass).

use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{BigInt, Integer, Nullable, Text, Untyped};
use diesel::sqlite::Sqlite;
use diesel::{QueryResult, RunQueryDsl};

/// The largest chunk: 256 rows of at most 9 parameters, far below SQLite's limit of 32,766.
const MAX_CHUNK: usize = 256;

/// The text of one batch statement: `HEAD`, then the rows, each `ROW` and separated by `", "`,
/// then `TAIL`.
pub trait RowsSql: 'static {
    /// Every `?` here is the batch's time.
    const HEAD: &'static str;
    /// One row; its `?`s are the row's values, in order.
    const ROW: &'static str;
    /// No `?` here.
    const TAIL: &'static str;
    /// `HEAD` and `ROW` cut at their `?`s, once ([`rows_sql!`] keeps them in a static):
    /// `walk_ast` runs on every execution, to bind the values, and cutting the text there cost
    /// ~5 % of the writer's instructions (`benches/writer.rs` under callgrind).
    fn parts() -> &'static Parts;
}

/// A statement's `HEAD` and `ROW`, cut at their `?`s: a bound value goes between two pieces.
pub struct Parts {
    head: Vec<&'static str>,
    row: Vec<&'static str>,
}

impl Parts {
    pub fn of<S: RowsSql>() -> Parts {
        Parts {
            head: S::HEAD.split('?').collect(),
            row: S::ROW.split('?').collect(),
        }
    }
}

/// A row's values.
pub trait BindRow {
    /// Binds the row's `i`-th value (for the `i`-th `?` of the statement's `ROW`).
    fn bind_nth<'b>(&'b self, i: usize, out: &mut AstPass<'_, 'b, Sqlite>) -> QueryResult<()>;
}

/// One run of the statement `S` over one chunk of `N` rows.
pub struct Rows<'a, S, R, const N: usize> {
    at: i64,
    rows: &'a [R],
    _sql: std::marker::PhantomData<S>,
}

/// The cache key of `Rows<S, _, N>`: the statement and the chunk size fix its text.
pub struct ChunkOf<S, const N: usize>(std::marker::PhantomData<S>);

/// Runs `$run` on `$chunk` as a [`Rows`] of its size (one of the sizes [`chunks`] yields).
macro_rules! sized {
    ($chunk:expr, $at:expr, |$rows:ident| $run:expr) => {
        sized!($chunk, $at, |$rows| $run; 256, 128, 64, 32, 16, 8, 4, 2, 1)
    };
    ($chunk:expr, $at:expr, |$rows:ident| $run:expr; $($n:literal),+) => {{
        let (chunk, at) = ($chunk, $at);
        match chunk.len() {
            $($n => {
                let $rows = Rows::<S, R, $n>::new(at, chunk);
                $run
            })+
            n => Err(diesel::result::Error::QueryBuilderError(
                format!("no batch statement for a chunk of {n} rows").into(),
            )),
        }
    }};
}

/// The chunks a batch of rows runs in: 256 rows while more than 256 are left, then one chunk per
/// set bit of the rest, largest first.
fn chunks<R>(mut rows: &[R]) -> impl Iterator<Item = &[R]> {
    std::iter::from_fn(move || {
        if rows.is_empty() {
            return None;
        }
        let n = if rows.len() >= MAX_CHUNK {
            MAX_CHUNK
        } else {
            1 << (usize::BITS - 1 - rows.len().leading_zeros())
        };
        let (chunk, rest) = rows.split_at(n);
        rows = rest;
        Some(chunk)
    })
}

/// Runs `S` over `rows` (chunk by chunk) with `at` as the batch's time; returns the rows changed.
pub fn execute<S: RowsSql, R: BindRow>(
    conn: &mut diesel::SqliteConnection,
    at: i64,
    rows: &[R],
) -> QueryResult<usize> {
    let mut changed = 0;
    for chunk in chunks(rows) {
        changed += sized!(chunk, at, |r| r.execute(conn))?;
    }
    Ok(changed)
}

/// Runs `S` over one row, with `at` as the batch's time; returns the rows changed. For statements
/// whose one row is a key look-up, where a run over many rows would cost more per row.
pub fn execute_one<S: RowsSql, R: BindRow>(
    conn: &mut diesel::SqliteConnection,
    at: i64,
    row: &R,
) -> QueryResult<usize> {
    Rows::<S, R, 1>::new(at, std::slice::from_ref(row)).execute(conn)
}

/// Runs the query `S` over one row; returns its answer's first row, if any.
pub fn load_one<S: RowsSql, R: BindRow, T>(
    conn: &mut diesel::SqliteConnection,
    row: &R,
) -> QueryResult<Option<T>>
where
    T: diesel::QueryableByName<Sqlite> + 'static,
{
    use diesel::OptionalExtension;
    Rows::<S, R, 1>::new(0, std::slice::from_ref(row))
        .get_result(conn)
        .optional()
}

/// Runs the query `S` over `rows` (chunk by chunk); returns every chunk's answer.
pub fn load<S: RowsSql, R: BindRow, T>(
    conn: &mut diesel::SqliteConnection,
    rows: &[R],
) -> QueryResult<Vec<T>>
where
    T: diesel::QueryableByName<Sqlite> + 'static,
{
    let mut all = Vec::new();
    for chunk in chunks(rows) {
        all.extend(sized!(chunk, 0, |r| r.load::<T>(conn))?);
    }
    Ok(all)
}

impl<'a, S: RowsSql, R: BindRow, const N: usize> Rows<'a, S, R, N> {
    fn new(at: i64, rows: &'a [R]) -> Self {
        debug_assert_eq!(rows.len(), N);
        Rows {
            at,
            rows,
            _sql: std::marker::PhantomData,
        }
    }
}

impl<S: RowsSql, R, const N: usize> QueryId for Rows<'_, S, R, N> {
    type QueryId = ChunkOf<S, N>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<S: RowsSql, R: BindRow, const N: usize> QueryFragment<Sqlite> for Rows<'_, S, R, N> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        let parts = S::parts();
        let (first, rest) = parts.head.split_first().expect("split yields a piece");
        out.push_sql(first);
        for part in rest {
            out.push_bind_param::<BigInt, _>(&self.at)?;
            out.push_sql(part);
        }
        let (first, rest) = parts.row.split_first().expect("split yields a piece");
        for (r, values) in self.rows.iter().enumerate() {
            if r > 0 {
                out.push_sql(", ");
            }
            out.push_sql(first);
            for (i, part) in rest.iter().enumerate() {
                values.bind_nth(i, &mut out)?;
                out.push_sql(part);
            }
        }
        out.push_sql(S::TAIL);
        Ok(())
    }
}

impl<S: RowsSql, R: BindRow, const N: usize> Query for Rows<'_, S, R, N> {
    type SqlType = Untyped;
}

impl<S: RowsSql, R: BindRow, Conn, const N: usize> RunQueryDsl<Conn> for Rows<'_, S, R, N> {}

/// Implements [`BindRow`] for a tuple: `bind_row!((A: SqlTypeA, B: SqlTypeB, …) => 0, 1, …)`.
macro_rules! bind_row {
    ($(($($t:ty: $st:ty),+) => $($idx:tt),+;)+) => {$(
        impl BindRow for ($($t,)+) {
            fn bind_nth<'b>(
                &'b self,
                i: usize,
                out: &mut AstPass<'_, 'b, Sqlite>,
            ) -> QueryResult<()> {
                match i {
                    $($idx => out.push_bind_param::<$st, _>(&self.$idx),)+
                    _ => Err(diesel::result::Error::QueryBuilderError(
                        format!("no value {i} in a row").into(),
                    )),
                }
            }
        }
    )+};
}

bind_row! {
    (&str: Text, i64: BigInt) => 0, 1;
    (
        i64: BigInt,
        &str: Text,
        &str: Text,
        i64: BigInt,
        i64: BigInt,
        &str: Text,
        Option<&str>: Nullable<Text>,
        Option<&str>: Nullable<Text>,
        i32: Integer
    ) => 0, 1, 2, 3, 4, 5, 6, 7, 8;
    (&str: Text, &str: Text) => 0, 1;
}

/// A statement whose one row has no values.
impl BindRow for () {
    fn bind_nth<'b>(&'b self, i: usize, _: &mut AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        Err(diesel::result::Error::QueryBuilderError(
            format!("no value {i} in an empty row").into(),
        ))
    }
}

impl BindRow for String {
    fn bind_nth<'b>(&'b self, _: usize, out: &mut AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        out.push_bind_param::<Text, _>(self)
    }
}

/// Declares batch statements: `rows_sql! { Name = (HEAD, ROW, TAIL); … }`.
macro_rules! rows_sql {
    ($($(#[$doc:meta])* $name:ident = ($head:expr, $row:expr, $tail:expr);)+) => {$(
        $(#[$doc])*
        pub struct $name;
        impl $crate::db::fixed::RowsSql for $name {
            const HEAD: &'static str = $head;
            const ROW: &'static str = $row;
            const TAIL: &'static str = $tail;
            fn parts() -> &'static $crate::db::fixed::Parts {
                static PARTS: std::sync::OnceLock<$crate::db::fixed::Parts> =
                    std::sync::OnceLock::new();
                PARTS.get_or_init($crate::db::fixed::Parts::of::<Self>)
            }
        }
    )+};
}
pub(crate) use rows_sql;

#[cfg(test)]
mod tests {
    use super::chunks;

    #[test]
    fn a_batch_runs_in_chunks_of_fixed_sizes() {
        let sizes = |n: usize| -> Vec<usize> {
            let rows = vec![0u8; n];
            chunks(&rows).map(<[u8]>::len).collect()
        };
        assert_eq!(sizes(0), Vec::<usize>::new());
        assert_eq!(sizes(1), vec![1]);
        assert_eq!(sizes(7), vec![4, 2, 1]);
        assert_eq!(sizes(256), vec![256]);
        assert_eq!(sizes(600), vec![256, 256, 64, 16, 8]);
        // Every chunk has one of the sizes that have a statement type (`sized!`).
        for n in 0..=1100 {
            assert!(sizes(n)
                .iter()
                .all(|&k| k.is_power_of_two() && k <= super::MAX_CHUNK));
        }
    }
}
