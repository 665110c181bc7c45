"""Performance models with machine constants: what to choose, predicted (not what is valid:
validation.py holds the rules)."""
