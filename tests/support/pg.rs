//! Postgres for tests: the local test database, and schemas that isolate
//! one test's tables from every other's.

use carpool::model::RequestId;

/// The database every machine that runs the tests has.
pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Whether Postgres tests are switched off (`CARPOOL_SKIP_PG`).
pub fn skipped() -> bool {
    let skip = std::env::var_os("CARPOOL_SKIP_PG").is_some();
    if skip {
        eprintln!("CARPOOL_SKIP_PG set: skipping the Postgres backend");
    }
    skip
}

/// A fresh schema name, `t_` and 16 hex digits.
pub fn schema_name() -> String {
    format!("t_{}", &RequestId::generate().as_str()[4..20])
}

/// Drops `schema` and everything in it, on a thread of its own so it can
/// run from `Drop` inside an async test; panics if it could not, unless
/// the test is already failing.
pub fn drop_schema(schema: &str) {
    let schema = schema.to_owned();
    let dropped = std::thread::spawn(move || {
        use sqlx::{Connection as _, Executor as _};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut conn = sqlx::PgConnection::connect(PG_URL).await.unwrap();
            conn.execute(format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE").as_str())
                .await
                .unwrap();
        });
    })
    .join();
    if dropped.is_err() && !std::thread::panicking() {
        panic!("could not drop the test schema");
    }
}

/// A schema of the test's own, created now and dropped with this value.
pub struct Schema(pub String);

impl Schema {
    pub async fn create() -> Schema {
        use sqlx::{Connection as _, Executor as _};
        let name = schema_name();
        let mut conn = sqlx::PgConnection::connect(PG_URL).await.unwrap();
        conn.execute(format!("CREATE SCHEMA \"{name}\"").as_str())
            .await
            .unwrap();
        Schema(name)
    }

    /// A store URL whose connections use this schema.
    pub fn url(&self) -> String {
        format!("{PG_URL}?options=-c%20search_path%3D{}", self.0)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        drop_schema(&self.0);
    }
}
