//! vicugna-chat: see DESIGN.md; filled in by its issue.
