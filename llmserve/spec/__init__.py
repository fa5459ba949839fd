"""Speculative decoding: proposers that draft tokens the target model then verifies in the step.

config.py     SpeculativeConfig (vLLM's shape) and its validation
proposer.py   Proposer: the interface, draft lengths (per request from acceptance, backoff under load)
cost.py       StepCostModel: what a draft token costs, measured, and the acceptance at which it pays
ngram.py      prompt lookup over the request's own tokens (no weights)
model_draft.py  drafts from a model: the target's own weights re-quantized (self_quantized), its first
              layers (self_early_exit), or a second model of the same vocabulary (draft_model)
build.py      from SpeculativeConfig to a proposer

Verification is not here: the runner scores the k+1 positions in the step's one forward and the
sampler decides what is accepted (sampling/verify.py); the scheduler's update point appends.
"""
