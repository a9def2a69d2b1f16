//! `vicugna leaderboard --logs DIR`: the arena's ratings from the page's logs,
//! computed as the page's Leaderboard tab does.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use vicugna_serve::leaderboard::{self, elo, Leaderboard};

/// `vicugna leaderboard`.
#[derive(Args, Debug)]
pub struct LeaderboardArgs {
    /// The log directory of `vicugna serve` (its `YYYY-MM-DD-conv.json` files).
    #[arg(long)]
    logs: PathBuf,
    /// Bootstrap rounds for the 95% intervals.
    #[arg(long, default_value_t = elo::DEFAULT_ROUNDS)]
    rounds: usize,
    /// Seed of the bootstrap resampling.
    #[arg(long, default_value_t = elo::DEFAULT_SEED)]
    seed: u64,
    /// Count side-by-side votes too (the person knew the names); by default only
    /// anonymous battles count, as in FastChat's leaderboard.
    #[arg(long)]
    include_named: bool,
    /// Count votes from addresses the server flagged (over the page's vote
    /// limit, a `flagged_address` row in the logs); left out by default.
    #[arg(long, conflicts_with = "exclude_flagged")]
    include_flagged: bool,
    /// Leave out votes from flagged addresses (the default; for scripts that
    /// want to say so).
    #[arg(long)]
    exclude_flagged: bool,
    /// Print the leaderboard as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: LeaderboardArgs) -> Result<()> {
    let log = leaderboard::read_battles(&a.logs)?;
    if log.files == 0 {
        bail!(
            "no log files (*-conv.json) in {}; the page writes them to the directory `vicugna serve` prints as `logs:`",
            a.logs.display()
        );
    }
    if !log.unreadable.is_empty() {
        eprintln!(
            "warning: skipped {} line(s) that are not JSON (e.g. cut by a crash), first at {}",
            log.unreadable.len(),
            log.unreadable[0]
        );
    }
    if log.invalid_votes > 0 {
        eprintln!("warning: skipped {} vote(s) without two model names", log.invalid_votes);
    }
    let battles = leaderboard::counted(&log.battles, &log.flagged, a.include_named, a.include_flagged);
    if !a.include_flagged && !log.flagged.is_empty() {
        let all = leaderboard::counted(&log.battles, &log.flagged, a.include_named, true).len();
        eprintln!(
            "note: left out {} vote(s) from {} flagged address(es); --include-flagged counts them",
            all - battles.len(),
            log.flagged.len()
        );
    }
    let board = Leaderboard::compute(&battles, a.rounds.max(1), a.seed);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&board)?);
    } else if battles.is_empty() {
        println!(
            "no anonymous arena votes in {} ({} log files)",
            a.logs.display(),
            log.files
        );
    } else {
        print!("{}", board.render_text());
    }
    Ok(())
}
