"""Presets shipped with swapper: YAML settings for common devices (`--preset NAME`)."""
