"""Test wiring. The Hub emulator plugin comes first: it sets HF_ENDPOINT and friends before anything imports
huggingface_hub (the client reads them once, at import)."""

pytest_plugins = ["tests.fixtures_hub", "tests.fixtures_models"]
