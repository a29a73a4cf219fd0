//! command-service against the real broker: rules and rejection codes, duplicates (also across
//! restarts), malformed input, forwarding, snapshots, crash safety and two instances.

mod helpers;

mod commands;
mod crash;
mod two_instances;
