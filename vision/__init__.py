"""Image side of the app: turning uploads into pixels the vision tower can take (no engine imports)."""
