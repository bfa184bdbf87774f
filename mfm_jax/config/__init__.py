"""Config: the schema (base), named fragments and presets, validation."""
