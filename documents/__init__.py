"""Document intake (TXT, Markdown, PDF text layer): untrusted upload bytes -> page texts, or a plain-word error."""
