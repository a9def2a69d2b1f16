//! The label set: given on the command line (`positive,negative`) or as a file
//! with one label per line and an optional description (`sport: matches, players`).

use std::path::Path;

use super::error::{ClassifyError, Result};

/// One class.
#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    /// The word the model answers with and the output records.
    pub name: String,
    /// What the label means, shown to the model in the task description.
    pub description: Option<String>,
}

/// The classes of a task, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelSet {
    pub labels: Vec<Label>,
}

impl LabelSet {
    /// A file path when one exists at `arg`, else a comma-separated list.
    pub fn from_arg(arg: &str) -> Result<LabelSet> {
        let path = Path::new(arg);
        if path.is_file() {
            Self::from_file(path)
        } else {
            Self::from_list(arg)
        }
    }

    /// `a,b,c` (a Chinese comma `，` separates too).
    pub fn from_list(list: &str) -> Result<LabelSet> {
        let labels = list
            .split([',', '，'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|name| Label {
                name: name.to_string(),
                description: None,
            })
            .collect();
        Self::new(labels).map_err(|e| ClassifyError::Labels(format!("{e} (in --labels {list:?})")))
    }

    /// One label per line: `name`, `name<TAB>description` or `name: description`
    /// (also the full-width `：`). Blank lines and lines starting with `#` are skipped.
    pub fn from_file(path: &Path) -> Result<LabelSet> {
        let text = std::fs::read_to_string(path).map_err(|e| ClassifyError::io(path, e))?;
        let mut labels = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, desc) = match line.split_once(['\t', ':', '：']) {
                Some((n, d)) => (n.trim(), Some(d.trim())),
                None => (line, None),
            };
            if name.is_empty() {
                return Err(ClassifyError::input(
                    path,
                    i + 1,
                    "the label name before the separator is empty",
                ));
            }
            if labels.iter().any(|l: &Label| l.name == name) {
                return Err(ClassifyError::input(
                    path,
                    i + 1,
                    format!("label {name:?} is listed twice"),
                ));
            }
            labels.push(Label {
                name: name.to_string(),
                description: desc.filter(|d| !d.is_empty()).map(str::to_string),
            });
        }
        Self::new(labels).map_err(|e| ClassifyError::Labels(format!("{}: {e}", path.display())))
    }

    fn new(labels: Vec<Label>) -> std::result::Result<LabelSet, String> {
        if labels.len() < 2 {
            return Err(format!("need at least two labels, got {}", labels.len()));
        }
        for (i, l) in labels.iter().enumerate() {
            if labels[..i].iter().any(|o| o.name == l.name) {
                return Err(format!("label {:?} is listed twice", l.name));
            }
        }
        Ok(LabelSet { labels })
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Never true: a label set has at least two labels.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The label names in order.
    pub fn names(&self) -> Vec<&str> {
        self.labels.iter().map(|l| l.name.as_str()).collect()
    }

    /// The index of `name`: exact match first, then ignoring case and surrounding space.
    pub fn index(&self, name: &str) -> Option<usize> {
        let name = name.trim();
        self.labels.iter().position(|l| l.name == name).or_else(|| {
            self.labels
                .iter()
                .position(|l| l.name.to_lowercase() == name.to_lowercase())
        })
    }

    /// Whether any label has a description.
    pub fn has_descriptions(&self) -> bool {
        self.labels.iter().any(|l| l.description.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_and_file_forms() {
        let l = LabelSet::from_list("sport, business ,tech").unwrap();
        assert_eq!(l.names(), vec!["sport", "business", "tech"]);
        assert_eq!(l.index("Business"), Some(1));
        assert_eq!(l.index("science"), None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("labels.txt");
        std::fs::write(
            &p,
            "# topics\nsport: matches, players\n\nbusiness\tcompanies\n正面：满意\n",
        )
        .unwrap();
        let l = LabelSet::from_file(&p).unwrap();
        assert_eq!(l.names(), vec!["sport", "business", "正面"]);
        assert_eq!(l.labels[0].description.as_deref(), Some("matches, players"));
        assert_eq!(l.labels[2].description.as_deref(), Some("满意"));
        std::fs::write(&p, "a\nb\na: again\n").unwrap();
        let e = LabelSet::from_file(&p).unwrap_err().to_string();
        assert!(e.ends_with("labels.txt:3: label \"a\" is listed twice"), "{e}");
        assert!(LabelSet::from_list("only")
            .unwrap_err()
            .to_string()
            .contains("at least two labels"));
    }
}
