"""The KV seam (where a block's KV comes from and goes to) and the tiers behind it: CPU memory, disk."""
