//! `vicugna serve|controller|worker|api` (being written).

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct ServeArgs {}

pub fn run_serve(_a: ServeArgs) -> Result<()> {
    bail!("vicugna serve is not built yet")
}
