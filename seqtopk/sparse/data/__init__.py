"""The shared evaluation data (readers.py: SciFact, STS-B, SICK, Banking77 and training sets from their
train splits) and the pair batches training draws from them (batches.py)."""
