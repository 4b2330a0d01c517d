"""The discriminator service."""
