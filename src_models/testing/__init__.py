"""Test material the engine can build for itself (no slide ships with the project)."""
