"""Checks on lm-eval results that the HF and vLLM backend tests share."""


def accuracy_from_samples(results, task):
    """The accuracy recomputed from the logged choices: the best-scored choice against the gold index."""
    samples = results["samples"][task]
    hits = [max(range(len(s["filtered_resps"])), key=lambda i: float(s["filtered_resps"][i][0])) == int(s["target"])
            for s in samples]
    return sum(hits) / len(hits)
