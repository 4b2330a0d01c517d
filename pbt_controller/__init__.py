"""The pbt_controller service."""
