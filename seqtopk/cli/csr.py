"""`seqtopk csr`: train CSR / CSRv2 heads, evaluate them with MTEB on the shared data, export their codes to a
vector engine (Milvus, Qdrant) and search them there."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


class _HelpWithDefaults(argparse.HelpFormatter):
    """Append "(default: X)" unless the help already states its default or there is none to state."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and action.default is not None and action.default is not False and action.default != argparse.SUPPRESS:
            text += " (default: %(default)s)"
        return text


def add_parser(sub) -> None:
    csr = sub.add_parser("csr", help="CSR / CSRv2 sparse embedding heads: train, evaluate, export", description=__doc__)
    commands = csr.add_subparsers(dest="csr_command", metavar="ACTION", required=True)
    _add_train(commands)
    _add_eval(commands)
    _add_export(commands)
    _add_engine_search(commands)


def _add_train(commands) -> None:
    p = commands.add_parser(
        "train",
        help="fit a CSR head on a dense backbone; the output folder loads with SparseEncoder(path)",
        description="Fit a CSR (or CSRv2) head on a dense sentence-transformers backbone. The head is trained on "
        "cached backbone embeddings; --finetune-steps then trains backbone and head end to end (the folder carries "
        "the fine-tuned backbone). A checkpoint beside --out is written every --checkpoint-every steps; --resume "
        "goes on from it, and --time-limit stops a run there to be resumed later. Data comes from the train "
        "splits under ../shared/data (override the location with $SEQTOPK_SHARED).",
        formatter_class=_HelpWithDefaults,
    )
    p.add_argument("--backbone", type=Path, default=None, help="sentence-transformers model folder (default: offline all-MiniLM-L6-v2)")
    p.add_argument("--k", type=int, required=True, help="active latents per embedding (mrl: the head's dimensions)")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--method", choices=("csr", "csrv2", "mrl"), default="csr",
                   help="csrv2 adds k annealing and supervised contrastive; mrl: the dense reference, a linear "
                   "--k-dim head with CSRv2's data and loss (a SentenceTransformer folder)")
    p.add_argument(
        "--data", action="append", default=None, metavar="NAME|FILE",
        help="training data, repeatable: scifact, stsb, sick, banking77 (train splits) or a JSONL file of "
        '{"anchor","positive"} pairs or {"text","label"} rows (default: the four shared train splits)',
    )
    p.add_argument("--max-steps", type=int, default=2000, help="head training steps on cached embeddings")
    p.add_argument("--batch-size", type=int, default=256, help="pairs per head training step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the head")
    p.add_argument("--hidden-multiple", type=int, default=4, help="hidden size = this x backbone dimension")
    p.add_argument("--k-init", type=int, default=None, help="csrv2: first k of the anneal (default 32 x k, capped at hidden/4)")
    p.add_argument("--supervised", action=argparse.BooleanOptionalAction, default=None,
                   help="supervised contrastive with labels (default: on for csrv2 and mrl, off for csr)")
    p.add_argument("--finetune-steps", type=int, default=0, help="end-to-end backbone fine-tuning steps after the head")
    p.add_argument("--finetune-batch-size", type=int, default=32, help="pairs per fine-tuning step")
    p.add_argument("--backbone-lr", type=float, default=2e-5, help="peak AdamW learning rate of the backbone")
    p.add_argument("--backbone-warmup", type=float, default=0.1, help="fraction of the fine-tuning steps warming the backbone's rate up")
    p.add_argument("--backbone-schedule", choices=("linear", "cosine", "constant"), default="linear",
                   help="the backbone's rate after warmup")
    p.add_argument("--finetune-head-lr", type=float, default=1e-4, help="the head's (constant) rate while the backbone trains")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (<OUT>.checkpoint/)")
    p.add_argument("--resume", action="store_true", help="go on from the checkpoint of an unfinished run with the same settings")
    p.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="stop after this long with a checkpoint written (run again with --resume)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split, batches and initialisation")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)


def _add_eval(commands) -> None:
    p = commands.add_parser(
        "eval",
        help="MTEB scores of saved heads on SciFact, STS-B, SICK-R and Banking77 built from ../shared/data",
        description="Run MTEB (offline) on tasks built from ../shared/data for each head folder and print a JSON "
        "summary with the main scores and the held-out dead-latent fraction recorded at training time.",
        formatter_class=_HelpWithDefaults,
    )
    p.add_argument("heads", nargs="+", type=Path, metavar="HEAD_DIR")
    p.add_argument("--tasks", default="scifact,stsb,sickr,banking77", help="comma-separated: scifact, stsb, sickr, banking77")
    p.add_argument("--no-cache", action="store_true", help="encode with SparseEncoder.encode instead of cached backbone embeddings")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    p.set_defaults(func=run_eval)


def _add_engine_options(p) -> None:
    p.add_argument("--engine", choices=("milvus", "qdrant"), required=True, help="the vector engine")
    p.add_argument("--uri", required=True,
                   help="milvus: a Milvus Lite file (./codes.db, in-process) or a server (http://host:19530); "
                   "qdrant: :memory:, a local-mode folder, or a server (http://host:6333)")
    p.add_argument("--collection", required=True, help="collection name (letters, digits, _)")
    p.add_argument("--token", default=None,
                   help="server credentials: Milvus user:password or token, Qdrant API key (default: $SEQTOPK_ENGINE_TOKEN)")


def _add_export(commands) -> None:
    p = commands.add_parser(
        "export",
        help="encode a JSONL corpus with a head and write its codes to Milvus or Qdrant",
        description="Encode every text of a JSONL corpus ({\"_id\", \"text\", optional \"title\"} a line, BEIR's "
        "corpus.jsonl format) with a saved CSR head and write the L2-normalised codes to a Milvus collection "
        "(SPARSE_FLOAT_VECTOR, SPARSE_INVERTED_INDEX, inner product) or a Qdrant collection (sparse vectors). "
        "The corpus and the head are checked and encoded before the engine is touched.",
        formatter_class=_HelpWithDefaults,
    )
    p.add_argument("head", type=Path, metavar="HEAD_DIR")
    p.add_argument("--corpus", type=Path, required=True, help="JSONL file of documents")
    add_export_options(p)
    p.set_defaults(func=run_export)


def add_export_options(p) -> None:
    """The engine, collection and write options `csr export` and `ssr export` share."""
    _add_engine_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing collection of that name")
    p.add_argument("--batch-size", type=int, default=5000, help="rows per insert call")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_engine_search(commands) -> None:
    p = commands.add_parser(
        "engine-search",
        help="search codes exported by `csr export` with query texts; prints JSON hits",
        description="Encode query texts with the head the collection was exported with and print the k best "
        "documents of each (doc id and inner product of the normalised codes, i.e. cosine) as JSON.",
        formatter_class=_HelpWithDefaults,
    )
    p.add_argument("head", type=Path, metavar="HEAD_DIR")
    _add_engine_options(p)
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--query", action="append", metavar="TEXT", help="a query text, repeatable")
    given.add_argument("--queries", type=Path, help="JSONL file of queries ({\"_id\", \"text\"} a line)")
    p.add_argument("--k", type=int, default=10, help="documents per query")
    p.add_argument("--drop-ratio-search", type=float, default=0.0,
                   help="milvus only: share of each query's smallest values to ignore (0 = exact)")
    p.set_defaults(func=run_engine_search)


def _open(args, **options):
    import os

    from seqtopk.sparse.export import open_engine

    return open_engine(args.engine, args.uri, args.collection, token=args.token or os.environ.get("SEQTOPK_ENGINE_TOKEN"),
                       **options)


def check_batch_size(args) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")


def write_codes(args, codes, doc_ids: list[str], info, source: Path, offsets=None) -> int:
    """The export step `csr export` and `ssr export` share: write the checked codes, say where they went."""
    with _open(args) as engine:
        rows = engine.write(codes, doc_ids, info, offsets=offsets, overwrite=args.overwrite,
                            batch_size=args.batch_size, progress=not args.quiet)
        print(f"exported {rows} codes of {source} to {engine.where}")
    return 0


def run_export(args) -> int:
    from seqtopk.sparse.data.readers import read_beir_jsonl
    from seqtopk.sparse.export.texts import HeadEncoder

    check_batch_size(args)
    doc_ids, texts = read_beir_jsonl(args.corpus)
    encoder = HeadEncoder(args.head)
    return write_codes(args, encoder.encode(texts, progress=not args.quiet), doc_ids, encoder.info, args.head)


def run_engine_search(args) -> int:
    from seqtopk.sparse.data.readers import read_beir_jsonl
    from seqtopk.sparse.export.texts import HeadEncoder

    if args.engine != "milvus" and args.drop_ratio_search:
        raise ValueError("--drop-ratio-search applies to Milvus only (Qdrant's sparse search is exact)")
    if args.queries:
        query_ids, texts = read_beir_jsonl(args.queries)
    else:
        if any(not t.strip() for t in args.query):
            raise ValueError("a --query text is empty; give it some words")
        query_ids, texts = [str(i) for i in range(len(args.query))], args.query
    options = {"drop_ratio_search": args.drop_ratio_search} if args.engine == "milvus" else {}
    with _open(args, **options) as engine:
        engine.info()  # a missing or foreign collection fails before the head is loaded
        encoder = HeadEncoder(args.head)
        results = engine.search(encoder.encode(texts), k=args.k)
    rows = [{"query_id": qid, "query": text, "hits": [{"doc_id": h.doc_id, "score": h.score} for h in hits]}
            for qid, text, hits in zip(query_ids, texts, results)]
    print(json.dumps(rows, indent=2))
    return 0


def run_train(args) -> int:
    from seqtopk.sparse.backbone import default_backbone
    from seqtopk.sparse.csr.train import TrainConfig, train_head

    config = TrainConfig(
        k=args.k, method=args.method, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
        hidden_multiple=args.hidden_multiple, k_init=args.k_init, supervised=args.supervised,
        finetune_steps=args.finetune_steps, finetune_batch_size=args.finetune_batch_size, backbone_lr=args.backbone_lr,
        backbone_warmup=args.backbone_warmup, backbone_schedule=args.backbone_schedule,
        finetune_head_lr=args.finetune_head_lr, checkpoint_every=args.checkpoint_every, seed=args.seed, data=args.data or [],
    )
    summary = train_head(args.backbone or default_backbone(), args.out, config, overwrite=args.overwrite, progress=not args.quiet,
                         resume=args.resume, time_limit_s=None if args.time_limit is None else 60 * args.time_limit)
    if summary.get("paused"):
        print(f"stopped at the time limit: {summary['stage']} step {summary['step']} of {summary['total_steps']}, "
              f"checkpoint in {summary['checkpoint']}; run the same command with --resume to go on")
        return 0
    if summary["dead_latent_fraction_heldout"] is None:
        print(f"saved {args.out}: {summary['method']} dense head of {summary['hidden_dim']} dims")
        return 0
    print(
        f"saved {args.out}: {summary['method']} k={summary['k']} hidden={summary['hidden_dim']}, dead latents on "
        f"{summary['heldout_texts']} held-out texts: {summary['dead_latent_fraction_heldout']:.1%}"
    )
    return 0


def run_eval(args) -> int:
    from seqtopk.sparse.csr.evaluate import evaluate_heads

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for head in args.heads:
        if not (head / "modules.json").is_file():
            raise FileNotFoundError(f"{head} is not a saved head folder (no modules.json); train one with `seqtopk csr train`")
    rows = evaluate_heads(args.heads, tasks, use_cache=not args.no_cache)
    text = json.dumps(rows, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0
