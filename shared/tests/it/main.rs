//! Integration tests of the shared crate: the aggregate's rules, properties, the codec, the
//! seed-era fixture, a round trip through the real broker (and registry, when running), and the
//! checks of existing topics against the contract.

mod aggregate;
mod codec;
mod decoders;
mod dlq;
mod kafka;
mod properties;
mod registry;
mod seed;
mod stored;
mod topics;
mod transfers;
