"""The routing core: pure torch, no engine imports.

- rules.py: which rule routes each token, and what each rule chooses (the only place decisions are made)
- counting.py: the "how many values beat this one" counts the streaming rule is built on
- scoring.py: each MoE family's scores, split into what SeqTopK ranks and what it keeps (weights)
- router.py: the one call engines make (candidates -> rule -> weights -> packed ids)
- ragged.py: packed serving steps (many sequences' chunks in one flat list) and paged routing history
- dispatch.py: chosen (token, expert) pairs as rows of one expert each, for compute that follows choices
- stats.py: experts-per-token counters and traces, kept on the device
"""
