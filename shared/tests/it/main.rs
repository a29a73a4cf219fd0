//! Integration tests of the shared crate: the aggregate's rules, properties, the codec, the
//! seed-era fixture, and a round trip through the real broker (and registry, when running).

mod aggregate;
mod codec;
mod kafka;
mod properties;
mod registry;
mod seed;
