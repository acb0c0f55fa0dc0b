"""SSR: per-token sparse codes indexed with plain inverted lists, scored by exact late interaction.

Not built yet (see the SSR issue); it will share seqtopk.sparse.index, data, backbone and mteb with CSR.
"""
