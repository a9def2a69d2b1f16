//! vicugna-eval: see DESIGN.md; filled in by its issue.
pub mod classify;
