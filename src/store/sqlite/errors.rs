//! How the SQLite backend's errors (sqlx for the schema, rusqlite for everything else) become
//! [`StoreError`]s: the only place that sorts them.

use rusqlite::ErrorCode;

use crate::store::StoreError;

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        let text = error.to_string();
        match &error {
            rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
                ErrorCode::ConstraintViolation => StoreError::Conflict(text),
                ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase | ErrorCode::SchemaChanged => {
                    StoreError::Corrupt(text)
                }
                _ => StoreError::Unavailable(text),
            },
            rusqlite::Error::QueryReturnedNoRows => StoreError::NotFound(text),
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::Utf8Error(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::InvalidColumnName(..)
            | rusqlite::Error::InvalidColumnIndex(..) => StoreError::Corrupt(text),
            _ => StoreError::Unavailable(text),
        }
    }
}

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
