//! `vicugna chat`: the interactive terminal chat (being written).

use anyhow::{bail, Result};
use clap::Args;

use crate::model_arg::ModelArgs;

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
}

pub fn run(_a: ChatArgs) -> Result<()> {
    bail!("vicugna chat is not built yet")
}
