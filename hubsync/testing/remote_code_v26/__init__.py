"""Remote code of the tiny MiniCPM-V 2.6 look-alike (our own code, written for these tests).

Like `remote_code/` (the 2.5 look-alike), these modules are package data: `hubsync.testing.families` copies
them (all but this file) into the model folder, where transformers imports them through `trust_remote_code`.
The layout follows openbmb/MiniCPM-V-2_6: a Qwen2 language model under `llm.`, a SigLIP-shaped vision tower
under `vpm.` (`modeling_navit_siglip.py`), a resampler under `resampler.`. The code sticks to what transformers
4.x and 5.x both provide.
"""
