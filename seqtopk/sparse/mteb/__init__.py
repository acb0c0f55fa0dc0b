"""MTEB on the shared data, offline: local tasks (tasks.py) and models wrapped for MTEB (models.py)."""
