"""The executor: the one ring loop, and what travels around it."""
