"""Test and demo support shipped with the package: a local Hub emulator and tiny deterministic models."""
