//! Markdown rendered live in the terminal while an answer streams in.
//!
//! Each redraw renders the whole answer so far with termimad and replaces the
//! lines drawn last time (cursor up, clear to the end of the screen). Lines
//! that have scrolled above the screen cannot be redrawn, so only the last
//! screenful is live; lines above it are left as they were drawn, which is
//! right in practice: appending text changes the last lines of a markdown
//! rendering, not the first ones.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use termimad::MadSkin;

/// Redraws at most this often (rich.Live in FastChat redraws 4 times a second).
const FRAME: Duration = Duration::from_millis(125);

/// One answer being drawn.
pub struct LiveMarkdown {
    skin: MadSkin,
    /// Lines currently drawn in the live region (below `committed`).
    shown: usize,
    /// Leading lines of the rendering left fixed above the live region.
    committed: usize,
    last_draw: Option<Instant>,
    /// Text changed since the last draw.
    dirty: bool,
}

impl LiveMarkdown {
    /// Starts an empty answer at the cursor, which must be at a line start.
    pub fn new() -> Self {
        LiveMarkdown {
            skin: MadSkin::default(),
            shown: 0,
            committed: 0,
            last_draw: None,
            dirty: false,
        }
    }

    /// The text changed: redraw if a frame's time has passed.
    pub fn update(&mut self, text: &str, out: &mut impl Write) -> io::Result<()> {
        self.dirty = true;
        self.tick(text, out)
    }

    /// Time passed: redraw if the text changed and a frame's time has passed.
    pub fn tick(&mut self, text: &str, out: &mut impl Write) -> io::Result<()> {
        if self.dirty && self.last_draw.is_none_or(|t| t.elapsed() >= FRAME) {
            self.draw(text, out)?;
        }
        Ok(())
    }

    /// Draws the final text (always).
    pub fn finish(&mut self, text: &str, out: &mut impl Write) -> io::Result<()> {
        self.draw(text, out)
    }

    /// Renders `text` into lines for a terminal `width` columns wide.
    pub fn render_lines(&self, text: &str, width: usize) -> Vec<String> {
        let rendered = self.skin.text(text, Some(width)).to_string();
        rendered.lines().map(str::to_string).collect()
    }

    fn draw(&mut self, text: &str, out: &mut impl Write) -> io::Result<()> {
        let (cols, rows) = termimad::terminal_size();
        // One column spare, so a full line never leaves the cursor in the
        // terminal's deferred-wrap state (which would throw the count off).
        let width = (cols as usize).saturating_sub(1).max(20);
        let max_live = (rows as usize).saturating_sub(2).max(3);
        let lines = self.render_lines(text, width);
        let mut frame = String::new();
        if self.shown > 0 {
            frame.push_str(&format!("\x1b[{}A", self.shown));
        }
        frame.push_str("\r\x1b[J");
        let start = self.committed.min(lines.len());
        for line in &lines[start..] {
            frame.push_str(line);
            frame.push('\n');
        }
        out.write_all(frame.as_bytes())?;
        out.flush()?;
        self.shown = lines.len() - start;
        if self.shown > max_live {
            self.committed = start + self.shown - max_live;
            self.shown = max_live;
        }
        self.last_draw = Some(Instant::now());
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(s: &str) -> String {
        // Drop ANSI CSI sequences.
        let mut out = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\x1b' && chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    #[test]
    fn renders_headings_lists_and_code() {
        let live = LiveMarkdown::new();
        let md = "# Title\n\nSome **bold** text.\nNext line.\n\n* one\n* two\n\n```\nlet x = 1;\n```\n";
        let lines: Vec<String> = live.render_lines(md, 60).iter().map(|l| plain(l)).collect();
        let all = lines.join("\n");
        assert!(all.contains("Title"), "{all}");
        assert!(!all.contains("**"), "bold markers are rendered, not shown: {all}");
        assert!(all.contains("• one") && all.contains("• two"), "{all}");
        assert!(all.contains("let x = 1;"), "{all}");
        assert!(!all.contains("```"), "{all}");
        // A single newline stays a line break, as chat models mean it.
        let some = lines.iter().position(|l| l.contains("Some")).unwrap();
        assert!(lines[some + 1].contains("Next line."), "{all}");
    }

    #[test]
    fn redraw_replaces_the_previous_frame() {
        let mut live = LiveMarkdown::new();
        let mut out = Vec::new();
        live.finish("one", &mut out).unwrap();
        let first = String::from_utf8(out.clone()).unwrap();
        assert!(!first.contains("\x1b[1A"), "nothing to go back over yet: {first:?}");
        out.clear();
        live.finish("one\ntwo", &mut out).unwrap();
        let second = String::from_utf8(out).unwrap();
        assert!(second.starts_with("\x1b[1A\r\x1b[J"), "{second:?}");
        assert!(plain(&second).contains("one") && plain(&second).contains("two"));
    }
}
