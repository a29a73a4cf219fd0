//! A second aggregate type, test-only: a stock item (register it, receive and ship quantities,
//! never more than is on hand), and its read model ([`StockItems`]: one table, one route). The
//! worked example of docs/aggregates.md, served end to end by the unmodified engine and
//! projection machinery (`stock.rs` runs them).

#![allow(dead_code)]

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use projection_service::AppState;
use projection_service::db::{StoreResult, Tables, fetch_by_ids, get_u64, to_i64};
use projection_service::model::{Applied, ReadModel, Stored};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shared::aggregate::{Aggregate, Context, DomainCommand, DomainEvent, Inapplicable, check_text};
use shared::bank_account::EventDataError;
use shared::{Rejection, RejectionCode};
use sqlx::{Any, Row, Transaction};

/// The state: folded from the item's events, serialised in snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockItem {
    /// Registered yet?
    pub registered: bool,
    /// What the item is.
    pub name: String,
    /// Units in the warehouse, never negative.
    pub on_hand: i64,
}

/// What can be asked of an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockCommand {
    /// Start tracking an item.
    Register { name: String },
    /// Units arrived.
    Receive { quantity: i64 },
    /// Units left, at most what is on hand.
    Ship { quantity: i64 },
}

/// What happened to an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockEvent {
    /// The item is tracked.
    Registered { name: String },
    /// Units arrived.
    Received { quantity: i64 },
    /// Units left.
    Shipped { quantity: i64 },
}

#[derive(Deserialize)]
struct Name {
    name: String,
}

#[derive(Deserialize)]
struct Quantity {
    quantity: i64,
}

impl DomainCommand for StockCommand {
    const TYPES: &'static [&'static str] = &["Register", "Receive", "Ship"];

    fn type_name(&self) -> &'static str {
        match self {
            StockCommand::Register { .. } => "Register",
            StockCommand::Receive { .. } => "Receive",
            StockCommand::Ship { .. } => "Ship",
        }
    }

    fn payload(&self) -> Value {
        match self {
            StockCommand::Register { name } => json!({ "name": name }),
            StockCommand::Receive { quantity } | StockCommand::Ship { quantity } => {
                json!({ "quantity": quantity })
            }
        }
    }

    fn from_parts(type_name: &str, payload: Value) -> Result<Self, String> {
        let invalid = |e: serde_json::Error| format!("invalid {type_name} payload: {e}");
        Ok(match type_name {
            "Register" => StockCommand::Register {
                name: serde_json::from_value::<Name>(payload)
                    .map_err(invalid)?
                    .name,
            },
            "Receive" => StockCommand::Receive {
                quantity: serde_json::from_value::<Quantity>(payload)
                    .map_err(invalid)?
                    .quantity,
            },
            "Ship" => StockCommand::Ship {
                quantity: serde_json::from_value::<Quantity>(payload)
                    .map_err(invalid)?
                    .quantity,
            },
            other => return Err(format!("unknown command type `{other}`")),
        })
    }
}

impl DomainEvent for StockEvent {
    const TYPES: &'static [&'static str] = &["Registered", "Received", "Shipped"];

    fn event_type(&self) -> &'static str {
        match self {
            StockEvent::Registered { .. } => "Registered",
            StockEvent::Received { .. } => "Received",
            StockEvent::Shipped { .. } => "Shipped",
        }
    }

    fn data(&self) -> Value {
        match self {
            StockEvent::Registered { name } => json!({ "name": name }),
            StockEvent::Received { quantity } | StockEvent::Shipped { quantity } => {
                json!({ "quantity": quantity })
            }
        }
    }

    fn from_parts(event_type: &str, data: &Value) -> Result<Self, EventDataError> {
        let invalid = |e: serde_json::Error| EventDataError::InvalidData {
            event_type: event_type.to_owned(),
            reason: e.to_string(),
        };
        Ok(match event_type {
            "Registered" => StockEvent::Registered {
                name: Name::deserialize(data).map_err(invalid)?.name,
            },
            "Received" => StockEvent::Received {
                quantity: Quantity::deserialize(data).map_err(invalid)?.quantity,
            },
            "Shipped" => StockEvent::Shipped {
                quantity: Quantity::deserialize(data).map_err(invalid)?.quantity,
            },
            other => return Err(EventDataError::UnknownType(other.to_owned())),
        })
    }
}

fn refuse<T>(code: &str, message: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection::new(RejectionCode::domain(code), message))
}

impl Aggregate for StockItem {
    const TYPE: &'static str = "StockItem";
    const SCHEMA_VERSION: u32 = 1;
    type Command = StockCommand;
    type Event = StockEvent;

    fn decide(
        &self,
        command: &StockCommand,
        _ctx: &Context<'_>,
    ) -> Result<Vec<StockEvent>, Rejection> {
        match (self.registered, command) {
            (false, StockCommand::Register { name }) if name.trim().is_empty() => {
                refuse("InvalidName", "an item needs a name")
            }
            (false, StockCommand::Register { name }) => {
                Ok(vec![StockEvent::Registered { name: name.clone() }])
            }
            (true, StockCommand::Register { .. }) => refuse("ItemExists", "already registered"),
            (false, _) => refuse("ItemNotFound", "no such item"),
            (true, StockCommand::Receive { quantity } | StockCommand::Ship { quantity })
                if *quantity <= 0 =>
            {
                refuse("InvalidQuantity", format!("{quantity} is not a quantity"))
            }
            (true, StockCommand::Receive { quantity }) => {
                if self.on_hand.checked_add(*quantity).is_none() {
                    return refuse("InvalidQuantity", "too many units");
                }
                Ok(vec![StockEvent::Received {
                    quantity: *quantity,
                }])
            }
            (true, StockCommand::Ship { quantity }) if *quantity > self.on_hand => refuse(
                "OutOfStock",
                format!("{quantity} asked, {} on hand", self.on_hand),
            ),
            (true, StockCommand::Ship { quantity }) => Ok(vec![StockEvent::Shipped {
                quantity: *quantity,
            }]),
        }
    }

    fn evolve(&mut self, event: &StockEvent) -> Result<(), Inapplicable> {
        match (self.registered, event) {
            (false, StockEvent::Registered { name }) => {
                self.registered = true;
                self.name.clone_from(name);
            }
            (true, StockEvent::Received { quantity }) if *quantity > 0 => {
                self.on_hand = self
                    .on_hand
                    .checked_add(*quantity)
                    .ok_or_else(|| Inapplicable("too many units".into()))?;
            }
            (true, StockEvent::Shipped { quantity }) if (1..=self.on_hand).contains(quantity) => {
                self.on_hand -= quantity;
            }
            (_, event) => {
                return Err(Inapplicable(format!(
                    "{} cannot follow {self:?}",
                    event.event_type()
                )));
            }
        }
        Ok(())
    }

    fn event_schema(event_type: &str, schema_version: u32) -> Option<Value> {
        match (event_type, schema_version) {
            ("Registered", 1) => Some(json!({
                "type": "object", "required": ["name"],
                "properties": {"name": {"type": "string", "minLength": 1}}
            })),
            ("Received" | "Shipped", 1) => Some(json!({
                "type": "object", "required": ["quantity"],
                "properties": {"quantity": {"type": "integer", "minimum": 1}}
            })),
            _ => None,
        }
    }
}

/// The stock item's read model: one row per item in `stock_items`, served at
/// `GET /stock-items/{id}`. The projection machinery does the rest (offsets, duplicates, gaps,
/// dead letters, rebuild).
#[derive(Debug, Clone, Copy, Default)]
pub struct StockItems;

/// The state table's base name.
const STOCK_ITEMS: &str = "stock_items";

impl ReadModel for StockItems {
    type Aggregate = StockItem;
    const TABLES: &'static [&'static str] = &[STOCK_ITEMS];

    fn ddl(tables: &Tables, _tag: &str) -> Vec<String> {
        vec![format!(
            "CREATE TABLE {} (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                on_hand BIGINT NOT NULL,
                version BIGINT NOT NULL,
                registered_at TEXT NOT NULL,
                updated_at TEXT NOT NULL
            )",
            tables.model(STOCK_ITEMS)
        )]
    }

    fn check_storable(_aggregate_id: &str, event: &StockEvent) -> Result<(), String> {
        match event {
            StockEvent::Registered { name } => check_text("name", name),
            _ => Ok(()),
        }
    }

    async fn load(
        tx: &mut Transaction<'static, Any>,
        tables: &Tables,
        ids: &[&str],
    ) -> StoreResult<HashMap<String, Stored<StockItem>>> {
        let select = format!(
            "SELECT id, name, on_hand, version, registered_at, updated_at FROM {}",
            tables.model(STOCK_ITEMS)
        );
        let mut out = HashMap::new();
        for row in fetch_by_ids(tx, &select, "id", ids).await? {
            let id: String = row.try_get("id")?;
            let state = StockItem {
                registered: true,
                name: row.try_get("name")?,
                on_hand: row.try_get("on_hand")?,
            };
            let stored = Stored {
                id: id.clone(),
                version: get_u64(&row, "version")?,
                state,
                first_at: row.try_get("registered_at")?,
                updated_at: row.try_get("updated_at")?,
            };
            out.insert(id, stored);
        }
        Ok(out)
    }

    async fn write(
        tx: &mut Transaction<'static, Any>,
        tables: &Tables,
        _applied: &[Applied<StockItem>],
        changed: &[Stored<StockItem>],
    ) -> StoreResult<()> {
        let sql = format!(
            "INSERT INTO {} (id, name, on_hand, version, registered_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, on_hand = excluded.on_hand,
                version = excluded.version, updated_at = excluded.updated_at",
            tables.model(STOCK_ITEMS)
        );
        for item in changed {
            sqlx::query(&sql)
                .bind(item.id.as_str())
                .bind(item.state.name.as_str())
                .bind(item.state.on_hand)
                .bind(to_i64(item.version))
                .bind(item.first_at.as_str())
                .bind(item.updated_at.as_str())
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    fn routes() -> Router<AppState> {
        Router::new().route("/stock-items/{id}", get(item))
    }
}

/// `GET /stock-items/{id}`: the item now, or 404.
async fn item(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let row = sqlx::query("SELECT name, on_hand, version FROM stock_items WHERE id = $1")
        .bind(&id)
        .fetch_optional(state.db.reads())
        .await;
    let found = row.and_then(|row| {
        row.map(|r| -> Result<Value, sqlx::Error> {
            Ok(json!({
                "id": id,
                "name": r.try_get::<String, _>("name")?,
                "on_hand": r.try_get::<i64, _>("on_hand")?,
                "version": r.try_get::<i64, _>("version")?,
            }))
        })
        .transpose()
    });
    match found {
        Ok(Some(item)) => Json(item).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"code": "ItemNotFound", "message": "no such item"}})),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": {"code": "Internal", "message": e.to_string()}})),
        )
            .into_response(),
    }
}
