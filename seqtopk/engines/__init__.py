"""Engine adapters: each plugs the engine-free routing core (seqtopk.selection) into one engine."""
