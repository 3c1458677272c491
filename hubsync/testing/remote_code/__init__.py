"""Remote code of the tiny MiniCPM-V look-alike.

These modules are package data: `make_remote_code_vlm` copies them (all but this file) into the model folder,
where transformers imports them through its dynamic-module machinery. Importing them as a package lets the
generator build and train the model in-process without going through `trust_remote_code`.
"""
