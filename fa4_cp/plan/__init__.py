"""The plan of a ring call, pure Python: who holds which tokens (layout, sharding), which blocks
meet at each ring step (schedule), and each block's rows (rows). Nothing here communicates."""
