//! How the SQLite backend's own errors (rusqlite's) become [`StoreError`]s.

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
