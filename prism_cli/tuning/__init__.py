"""Router-only fine-tuning of a flat export (SPEC 3.4b, ``prism tune-gate``).

``schedules``: how many sub-experts per token (K) each training step routes to; ``trainer``: the
training loop (cross-entropy on training text, optional distillation from the original model,
checkpoints, resume); ``writer``: the tuned export; ``benchmark``: the experiments behind the
committed results (schedules and distillation compared on validation text, the operating-point table).
"""
