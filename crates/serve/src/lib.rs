//! vicugna-serve: see DESIGN.md; filled in by its issue.
