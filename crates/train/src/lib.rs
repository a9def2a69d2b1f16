//! vicugna-train: see DESIGN.md; filled in by its issue.
