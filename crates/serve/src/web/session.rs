//! Conversations of the page, kept in memory for an hour after their last use
//! (FastChat's session expiry), so votes log the states the server saw.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

/// Idle time after which a conversation is forgotten.
pub const EXPIRY: Duration = Duration::from_secs(3600);
/// Most conversations kept; the least recently used go first.
const MAX_SESSIONS: usize = 20_000;

/// What the conversation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One named model.
    Chat,
    /// Two models picked at random, names hidden until the vote.
    #[serde(rename = "arena")]
    Anony,
    /// Two models the person picked.
    #[serde(rename = "side_by_side")]
    Named,
}

/// One conversation (one side for chat, two for the arena).
pub struct Session {
    pub mode: Mode,
    pub models: Vec<String>,
    pub conv_ids: Vec<String>,
    /// Each side's state after its last answer.
    pub states: Vec<Option<Value>>,
    /// The user turn each side last answered.
    pub answered_turns: Vec<usize>,
    pub voted_turn: Option<usize>,
    /// An anonymous battle is over once voted on.
    pub voted: bool,
    last_used: Instant,
}

impl Session {
    pub fn new(mode: Mode, models: Vec<String>) -> Session {
        let n = models.len();
        Session {
            mode,
            conv_ids: (0..n).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect(),
            models,
            states: vec![None; n],
            answered_turns: vec![0; n],
            voted_turn: None,
            voted: false,
            last_used: Instant::now(),
        }
    }
}

/// The live conversations by id.
#[derive(Default)]
pub struct Sessions {
    map: HashMap<String, Session>,
}

impl Sessions {
    /// Stores a new conversation; returns its id.
    pub fn insert(&mut self, s: Session) -> String {
        let now = Instant::now();
        self.map.retain(|_, s| now.duration_since(s.last_used) < EXPIRY);
        if self.map.len() >= MAX_SESSIONS {
            if let Some(oldest) = self.map.iter().min_by_key(|(_, s)| s.last_used).map(|(k, _)| k.clone()) {
                self.map.remove(&oldest);
            }
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        self.map.insert(id.clone(), s);
        id
    }

    /// A live conversation, marked as used now.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Session> {
        let now = Instant::now();
        if self
            .map
            .get(id)
            .is_some_and(|s| now.duration_since(s.last_used) >= EXPIRY)
        {
            self.map.remove(id);
        }
        let s = self.map.get_mut(id)?;
        s.last_used = now;
        Some(s)
    }
}
