//! How sqlx's errors (the PostgreSQL backend's, and the SQLite backend's schema migrations)
//! become [`StoreError`]s: the one place that sorts them.

use crate::store::StoreError;

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        let text = error.to_string();
        match &error {
            sqlx::Error::Database(db)
                if db.is_unique_violation()
                    || db.is_foreign_key_violation()
                    || db.is_check_violation() =>
            {
                StoreError::Conflict(text)
            }
            sqlx::Error::RowNotFound => StoreError::NotFound(text),
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::TypeNotFound { .. }
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. } => StoreError::Corrupt(text),
            _ => StoreError::Unavailable(text),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        use sqlx::migrate::MigrateError;
        match error {
            MigrateError::Execute(error) => error.into(),
            other => {
                StoreError::Corrupt(format!("the schema cannot be brought up to date: {other}"))
            }
        }
    }
}
