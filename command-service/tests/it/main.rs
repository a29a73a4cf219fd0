//! command-service against the real broker: rules and rejection codes, duplicates (also across
//! restarts), malformed input, forwarding, snapshots, bounded restores, crash safety and two instances.

mod helpers;

mod access;
mod api;
mod commands;
mod crash;
mod faults;
mod interop;
mod proxy;
mod registry_access;
mod restore;
mod stock;
mod stock_item;
mod transfers;
mod two_instances;
