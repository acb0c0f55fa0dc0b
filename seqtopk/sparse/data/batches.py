"""Training sets -> a held-out split for dead-latent counts, and shuffled single-dataset pair batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seqtopk.sparse.data.readers import TrainingSet


@dataclass
class Split:
    train: list[TrainingSet]
    heldout_texts: list[str]

    @property
    def texts(self) -> list[str]:
        """Every training text, sets concatenated; batch rows index into this list."""
        return [t for s in self.train for t in s.texts]

    @property
    def offsets(self) -> list[int]:
        """Where each set's texts start in `texts`."""
        return [int(o) for o in np.cumsum([0] + [len(s.texts) for s in self.train])[:-1]]


def split_heldout(sets: list[TrainingSet], fraction: float, rng: np.random.Generator) -> Split:
    """Hold out a fraction of every set's texts (pairs touching them are dropped) for dead-latent counts,
    plus each set's own held-out texts (dev splits, unjudged documents), minus any text trained on."""
    train, heldout = [], []
    for s in sets:
        out = rng.random(len(s.texts)) < fraction
        heldout.extend(t for t, o in zip(s.texts, out) if o)
        keep = np.flatnonzero(~out)
        remap = -np.ones(len(s.texts), dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        pairs = None
        if s.pairs is not None:
            pairs = remap[s.pairs]
            pairs = pairs[(pairs >= 0).all(axis=1)]
        train.append(TrainingSet(s.name, [s.texts[i] for i in keep], s.labels[keep], pairs))
        heldout.extend(s.heldout)
    trained_on = {t for s in train for t in s.texts}
    return Split(train, [t for t in dict.fromkeys(heldout) if t not in trained_on])


def epoch_batches(split: Split, batch_size: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One epoch of single-dataset batches, shuffled: (anchor rows, positive rows, labels of the pairs),
    rows indexing `split.texts`. A batch never mixes datasets, so labels of different sets never meet."""
    batches = []
    for s, offset in zip(split.train, split.offsets):
        pairs = s.sample_pairs(rng)
        pairs = pairs[rng.permutation(len(pairs))]
        for start in range(0, len(pairs) - 1, batch_size):
            chunk = pairs[start : start + batch_size]
            if len(chunk) >= 2:
                batches.append((chunk[:, 0] + offset, chunk[:, 1] + offset, s.labels[chunk[:, 0]]))
    return [batches[i] for i in rng.permutation(len(batches))]


def training_batches(split: Split, batch_size: int, steps: int, rng: np.random.Generator):
    """`steps` batches of `epoch_batches`, drawing as many shuffled epochs as that takes."""
    done = 0
    while done < steps:
        for batch in epoch_batches(split, batch_size, rng):
            if done >= steps:
                return
            yield batch
            done += 1
