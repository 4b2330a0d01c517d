"""The replaybuffer service."""
