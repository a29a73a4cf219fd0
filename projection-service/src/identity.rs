//! Which read model a database holds: the `TOPIC_PREFIX` it projects and an id chosen when it
//! was first used. The consumer group derives from the id, so two databases are two independent
//! read models (each is assigned every partition), and a database that holds another prefix's
//! read model refuses to start instead of mixing two event stores in one set of tables.

use crate::db::{Database, StoreError};
use chrono::{SecondsFormat, Utc};

/// The table holding the one identity row.
const IDENTITY_TABLE: &str = "read_model_identity";

/// Its `CREATE TABLE` (migration 2 of [`Database`]'s numbered migrations).
pub(crate) const DDL: &str = "CREATE TABLE IF NOT EXISTS read_model_identity (
    singleton BIGINT PRIMARY KEY, topic_prefix TEXT NOT NULL,
    read_model_id TEXT NOT NULL, created_at TEXT NOT NULL)";

/// The identity recorded in a read-model database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The `TOPIC_PREFIX` whose events the database holds.
    pub topic_prefix: String,
    /// Chosen once, when the database was first used by a projection-service that records it.
    pub read_model_id: String,
}

impl Identity {
    /// The consumer group of this read model's live projection: `PROJECTION_GROUP_ID` when set,
    /// else `<prefix>.projection.<read_model_id>`.
    pub fn group_id(&self, explicit: Option<&str>) -> String {
        match explicit {
            Some(group) => group.to_owned(),
            None => format!("{}.projection.{}", self.topic_prefix, self.read_model_id),
        }
    }
}

/// Why the database cannot serve this prefix.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The database holds the read model of another prefix.
    #[error(
        "the read-model database holds the events of TOPIC_PREFIX={found} (read model \
         {read_model_id}), not of TOPIC_PREFIX={wanted}: point PROJECTION_DATABASE_URL at a \
         database of its own for {wanted} (a fresh one is filled from the events topic)"
    )]
    OtherPrefix {
        /// The prefix recorded in the database.
        found: String,
        /// Its read-model id.
        read_model_id: String,
        /// The prefix this service was started with.
        wanted: String,
    },
    /// The database (from before identities were recorded) already holds offsets of other
    /// topics than this prefix's events topic.
    #[error(
        "the read-model database already holds offsets of {others:?}, not only of {topic}: it \
         was shared by several TOPIC_PREFIX values; give each prefix a database of its own \
         (PROJECTION_DATABASE_URL) and rebuild"
    )]
    Shared {
        /// This prefix's events topic.
        topic: String,
        /// The other topics found.
        others: Vec<String>,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Reads the database's identity, recording one for `prefix` on first use. A database used
/// before identities were recorded is adopted if its offsets are only of `prefix`'s events
/// topic.
pub async fn claim(db: &Database, prefix: &str, topic: &str) -> Result<Identity, IdentityError> {
    if let Some(found) = recorded(db).await? {
        return check(found, prefix);
    }
    let others: Vec<String> = sqlx::query_scalar::<_, String>(&format!(
        "SELECT DISTINCT topic FROM {}",
        crate::db::OFFSETS_TABLE
    ))
    .fetch_all(db.pool())
    .await
    .map_err(StoreError::from)?
    .into_iter()
    .filter(|t| t != topic)
    .collect();
    if !others.is_empty() {
        return Err(IdentityError::Shared {
            topic: topic.to_owned(),
            others,
        });
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    // Two instances starting on one new database: the first insert wins, both read it back.
    sqlx::query(&format!(
        "INSERT INTO {IDENTITY_TABLE} (singleton, topic_prefix, read_model_id, created_at)
         VALUES (1, $1, $2, $3) ON CONFLICT (singleton) DO NOTHING"
    ))
    .bind(prefix)
    .bind(&id[..12])
    .bind(Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true))
    .execute(db.pool())
    .await
    .map_err(StoreError::from)?;
    let found = recorded(db).await?.ok_or_else(|| {
        StoreError::Invalid(format!(
            "{IDENTITY_TABLE} is empty right after it was written"
        ))
    })?;
    tracing::info!(topic_prefix = %found.topic_prefix, read_model_id = %found.read_model_id, "read-model identity recorded");
    check(found, prefix)
}

async fn recorded(db: &Database) -> Result<Option<Identity>, StoreError> {
    let row: Option<(String, String)> = sqlx::query_as(&format!(
        "SELECT topic_prefix, read_model_id FROM {IDENTITY_TABLE} WHERE singleton = 1"
    ))
    .fetch_optional(db.pool())
    .await?;
    Ok(row.map(|(topic_prefix, read_model_id)| Identity {
        topic_prefix,
        read_model_id,
    }))
}

fn check(found: Identity, prefix: &str) -> Result<Identity, IdentityError> {
    if found.topic_prefix == prefix {
        Ok(found)
    } else {
        Err(IdentityError::OtherPrefix {
            found: found.topic_prefix,
            read_model_id: found.read_model_id,
            wanted: prefix.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_derives_from_the_read_model_unless_set() {
        let identity = Identity {
            topic_prefix: "bank".into(),
            read_model_id: "abc".into(),
        };
        assert_eq!(identity.group_id(None), "bank.projection.abc");
        assert_eq!(identity.group_id(Some("mine")), "mine");
    }
}
