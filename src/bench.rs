//! `hearth bench`: prefill and decode throughput on this machine (filled in later).
use clap::Args;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long)]
    pub model: std::path::PathBuf,
}

pub fn run(_args: &BenchArgs) -> crate::Result<()> {
    Ok(())
}
