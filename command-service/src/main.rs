//! `command-service`: configured by the environment (see docs/contract.md), no arguments.

#[tokio::main]
async fn main() {
    command_service::main_for::<shared::Bank>("command-service").await;
}
