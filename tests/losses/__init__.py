"""Tests for rlhf.losses (one file per module)."""
