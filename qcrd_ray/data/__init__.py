"""The data layer: row schemas, task kinds, loaders, answer parsing/scoring and prompts (pure, no Ray)."""
