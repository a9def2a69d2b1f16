//! The arena leaderboard: battles read from the conversation logs (FastChat's
//! `clean_battle_data`) and rated by [`elo`].
//!
//! Flagged addresses: when an address goes over the page's vote limit the
//! server refuses the vote and logs a `flagged_address` row naming it. The
//! leaderboard (the page's and `vicugna leaderboard`'s) leaves out every vote
//! from a flagged address by default, the ones under the limit included: a
//! script that was caught once is not trusted for its earlier votes either.

pub mod elo;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

pub use elo::{Battle, Leaderboard, Winner};

/// Why the logs could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    File(PathBuf, std::io::Error),
}

/// Battles found in a log directory, and what was passed over.
#[derive(Debug, Default)]
pub struct BattleLog {
    pub battles: Vec<Battle>,
    pub files: usize,
    /// Lines that are not JSON (a line cut by a crash), as `file:line`.
    pub unreadable: Vec<String>,
    /// Vote rows whose model names cannot be told.
    pub invalid_votes: usize,
    /// Addresses with a `flagged_address` row.
    pub flagged: HashSet<String>,
}

/// The `type` of the log row that flags an address.
pub const FLAG_ROW: &str = "flagged_address";

/// The battles that count: anonymous ones (named too with `include_named`),
/// without those from flagged addresses (unless `include_flagged`).
pub fn counted(
    battles: &[Battle],
    flagged: &HashSet<String>,
    include_named: bool,
    include_flagged: bool,
) -> Vec<Battle> {
    battles
        .iter()
        .filter(|b| b.anony || include_named)
        .filter(|b| include_flagged || b.ip.is_empty() || !flagged.contains(&b.ip))
        .cloned()
        .collect()
}

/// The model names of an arena vote row: the public names, or for an
/// anonymous battle ("" or "Model A" shown) the names kept in the states.
fn vote_models(row: &Value) -> Option<(String, String, bool)> {
    let public: Vec<&str> = row
        .get("models")?
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if public.len() != 2 {
        return None;
    }
    let hidden: Option<Vec<&str>> = row.get("states").and_then(Value::as_array).and_then(|s| {
        let v: Vec<&str> = s
            .iter()
            .filter_map(|st| st.get("model_name").and_then(Value::as_str))
            .collect();
        (v.len() == 2).then_some(v)
    });
    let anony = public[0].is_empty() || public[0] == "Model A";
    let names = if anony { hidden? } else { public };
    if names[0].is_empty() || names[1].is_empty() || names[0] == names[1] {
        return None;
    }
    Some((names[0].to_string(), names[1].to_string(), anony))
}

/// What one log row is to the leaderboard.
#[derive(Debug, PartialEq)]
pub enum RowBattle {
    /// An arena vote.
    Battle(Battle),
    /// An arena vote whose two model names cannot be told.
    InvalidVote,
    /// A chat row, a single-model vote, ….
    NotAVote,
}

/// The battle of one log row, if it is an arena vote.
pub fn battle_from_row(row: &Value) -> RowBattle {
    let Some(winner) = row.get("type").and_then(Value::as_str).and_then(Winner::from_vote) else {
        return RowBattle::NotAVote;
    };
    let Some((model_a, model_b, anony)) = vote_models(row) else {
        return RowBattle::InvalidVote;
    };
    RowBattle::Battle(Battle {
        model_a,
        model_b,
        winner,
        anony,
        tstamp: row.get("tstamp").and_then(Value::as_f64).unwrap_or(0.0),
        ip: row.get("ip").and_then(Value::as_str).unwrap_or_default().to_string(),
    })
}

/// Reads every `*-conv.json` file of `dir` (FastChat's daily JSONL logs) and
/// returns the arena votes in time order.
pub fn read_battles(dir: &Path) -> Result<BattleLog, LogError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| LogError::Dir(dir.to_path_buf(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with("-conv.json"))
        })
        .collect();
    files.sort();
    let mut out = BattleLog {
        files: files.len(),
        ..BattleLog::default()
    };
    for f in &files {
        let text = std::fs::read_to_string(f).map_err(|e| LogError::File(f.clone(), e))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let Ok(row) = serde_json::from_str::<Value>(line) else {
                out.unreadable.push(format!("{}:{}", f.display(), i + 1));
                continue;
            };
            if row.get("type").and_then(Value::as_str) == Some(FLAG_ROW) {
                if let Some(ip) = row.get("ip").and_then(Value::as_str).filter(|ip| !ip.is_empty()) {
                    out.flagged.insert(ip.to_string());
                }
                continue;
            }
            match battle_from_row(&row) {
                RowBattle::Battle(b) => out.battles.push(b),
                RowBattle::InvalidVote => out.invalid_votes += 1,
                RowBattle::NotAVote => {}
            }
        }
    }
    // Files are per day; within a file rows are appended in order. A stable
    // sort keeps that order for equal stamps.
    out.battles.sort_by(|a, b| a.tstamp.total_cmp(&b.tstamp));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn anonymous_votes_take_names_from_states() {
        let row = json!({"tstamp": 1.0, "type": "leftvote", "models": ["", ""],
            "states": [{"model_name": "a"}, {"model_name": "b"}], "ip": "1.2.3.4"});
        let RowBattle::Battle(b) = battle_from_row(&row) else {
            panic!()
        };
        assert_eq!((b.model_a.as_str(), b.model_b.as_str(), b.anony), ("a", "b", true));
        assert_eq!(b.winner, Winner::ModelA);
    }

    #[test]
    fn named_votes_use_public_names() {
        let row = json!({"tstamp": 1.0, "type": "bothbad_vote", "models": ["x", "y"],
            "states": [{"model_name": "x"}, {"model_name": "y"}]});
        let RowBattle::Battle(b) = battle_from_row(&row) else {
            panic!()
        };
        assert_eq!(
            (b.model_a.as_str(), b.anony, b.winner),
            ("x", false, Winner::TieBothBad)
        );
    }

    #[test]
    fn chat_rows_and_single_votes_are_not_battles() {
        assert_eq!(
            battle_from_row(&json!({"type": "chat", "model": "x"})),
            RowBattle::NotAVote
        );
        assert_eq!(
            battle_from_row(&json!({"type": "upvote", "model": "x"})),
            RowBattle::NotAVote
        );
        let no_names = json!({"type": "tievote", "models": ["", ""]});
        assert_eq!(battle_from_row(&no_names), RowBattle::InvalidVote);
    }

    #[test]
    fn reads_a_directory_and_reports_cut_lines() {
        let dir = std::env::temp_dir().join(format!("vicugna-lb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let v1 = json!({"tstamp": 2.0, "type": "rightvote", "models": ["x", "y"], "states": [{}, {}]});
        let v0 = json!({"tstamp": 1.0, "type": "leftvote", "models": ["x", "y"], "states": [{}, {}]});
        std::fs::write(dir.join("2026-11-28-conv.json"), format!("{v1}\n{{\"tstamp\": 3")).unwrap();
        std::fs::write(dir.join("2026-11-27-conv.json"), format!("{v0}\n")).unwrap();
        std::fs::write(dir.join("notes.txt"), "not a log").unwrap();
        let log = read_battles(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(log.files, 2);
        assert_eq!(log.battles.len(), 2);
        assert_eq!(log.battles[0].winner, Winner::ModelA);
        assert_eq!(log.unreadable.len(), 1);
        assert!(log.unreadable[0].ends_with("2026-11-28-conv.json:2"));
    }

    #[test]
    fn flagged_addresses_are_left_out() {
        let dir = std::env::temp_dir().join(format!("vicugna-lb-flag-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let vote = |t: f64, ip: &str| {
            json!({"tstamp": t, "type": "leftvote", "models": ["", ""],
                "states": [{"model_name": "a"}, {"model_name": "b"}], "ip": ip})
        };
        let flag = json!({"tstamp": 3.0, "type": FLAG_ROW, "ip": "6.6.6.6", "reason": "votes"});
        let rows = [vote(1.0, "6.6.6.6"), vote(2.0, "1.1.1.1"), flag, vote(4.0, "6.6.6.6")];
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(dir.join("2026-11-28-conv.json"), text).unwrap();
        let log = read_battles(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(log.battles.len(), 3);
        assert!(log.flagged.contains("6.6.6.6"));
        let kept = counted(&log.battles, &log.flagged, false, false);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].ip, "1.1.1.1");
        assert_eq!(counted(&log.battles, &log.flagged, false, true).len(), 3);
    }

    #[test]
    fn missing_directory_is_an_error_naming_it() {
        let e = read_battles(Path::new("/nonexistent/vicugna-logs")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vicugna-logs"));
    }
}
