"""Simulated workers: the real engine bookkeeping (block pool, scheduler, KV events, KV handoff) with the model
forward replaced by a calibrated step-time model, driven in virtual time so the real router can be exercised
with 16-256 workers on one CPU."""
