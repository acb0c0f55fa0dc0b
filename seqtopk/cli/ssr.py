"""`seqtopk ssr`: SSR multi-vector sparse retrieval (per-token sparse codes, exact MaxSim on inverted lists),
and the export of a corpus's token codes to a vector engine (Milvus, Qdrant)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from seqtopk.cli.csr import _HelpWithDefaults, add_export_options


def add_parser(sub) -> None:
    from seqtopk.sparse.ssr.index import DEFAULT_PROBE

    ssr = sub.add_parser("ssr", help="SSR multi-vector sparse retrieval: train, index, search, eval, export",
                         description=__doc__)
    commands = ssr.add_subparsers(dest="ssr_command", metavar="ACTION", required=True)

    p = commands.add_parser("train", help="train a token SAE on the backbone's token outputs (SciFact train pairs)",
                            description="Train an SSR token SAE (reconstruction + AuxK + contrastive loss on sparse "
                            "MaxSim) on SciFact train queries and their judged documents from ../shared/data, and "
                            "save an encoder folder (backbone + ssr_head/) that `ssr index` and vLLM read.",
                            formatter_class=_HelpWithDefaults)
    p.add_argument("--backbone", type=Path, default=None, help="sentence-transformers folder (default: offline all-MiniLM-L6-v2)")
    p.add_argument("--k", type=int, required=True, help="active latents per token")
    p.add_argument("--latents", type=int, default=4096, help="SAE latents h")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--max-steps", type=int, default=300, help="training steps")
    p.add_argument("--batch-pairs", type=int, default=16, help="(query, document) pairs per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the SAE")
    p.add_argument("--finetune", action="store_true", help="train the backbone jointly (slow on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of batches and initialisation")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)

    p = commands.add_parser("index", help="encode a BEIR corpus.jsonl and save its SSR index to one file",
                            formatter_class=_HelpWithDefaults)
    p.add_argument("folder", type=Path, metavar="DIR", help="SSR encoder folder from `ssr train`")
    p.add_argument("--corpus", type=Path, required=True, help='BEIR corpus.jsonl: {"_id", "title", "text"} per line')
    p.add_argument("--out", type=Path, required=True, help="index file (replaced atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_index)

    p = commands.add_parser("search", help="search an SSR index with a text query (exact MaxSim)",
                            formatter_class=_HelpWithDefaults)
    p.add_argument("index", type=Path, metavar="INDEX")
    p.add_argument("--query", required=True, help="query text")
    p.add_argument("-k", type=int, default=10, help="results")
    p.add_argument("--pool", type=int, default=None, help="two-stage: rescore this many candidates (default: exhaustive)")
    p.add_argument("--probe", type=int, default=DEFAULT_PROBE,
                   help="two-stage first stage: strongest latents per query token (used only with --pool)")
    p.add_argument("--head", type=Path, default=None, help="SSR folder (default: the one that built the index)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_search)

    p = commands.add_parser("eval", help="nDCG@10 on SciFact test, exhaustive and two-stage, with MTEB's evaluator",
                            formatter_class=_HelpWithDefaults)
    p.add_argument("folder", type=Path, metavar="DIR")
    p.add_argument("--pools", default="100", help="comma-separated two-stage pool sizes (exhaustive always runs)")
    p.add_argument("--probe", type=int, default=DEFAULT_PROBE, help="strongest latents per query token in the first stage")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_eval)

    p = commands.add_parser("export", help="encode a BEIR corpus.jsonl and write its token codes to Milvus or Qdrant",
                            description="Encode every document of a BEIR corpus.jsonl with an SSR folder and write one "
                            "row per kept token (its unit-norm sparse code, the document id, the token's position) to a "
                            "Milvus or Qdrant collection, as `csr export` writes one row per document (MaxSim over those "
                            "rows is not run by the engine: search with `ssr index` and `ssr search`). The corpus "
                            "and the folder are checked and encoded before the engine is touched.",
                            formatter_class=_HelpWithDefaults)
    p.add_argument("folder", type=Path, metavar="DIR", help="SSR encoder folder from `ssr train`")
    p.add_argument("--corpus", type=Path, required=True, help='BEIR corpus.jsonl: {"_id", "title", "text"} per line')
    add_export_options(p)
    p.set_defaults(func=run_export)


def run_train(args) -> int:
    from seqtopk.sparse.backbone import default_backbone
    from seqtopk.sparse.ssr.train import SSRTrainConfig, train_ssr

    config = SSRTrainConfig(k=args.k, latents=args.latents, max_steps=args.max_steps, batch_pairs=args.batch_pairs, lr=args.lr,
                            finetune=args.finetune, seed=args.seed)
    config.validate()
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise ValueError(f"{args.out} exists and is not empty; pass --overwrite to replace it")
    summary = train_ssr(args.backbone or default_backbone(), args.out, config, overwrite=args.overwrite, progress=not args.quiet)
    print(f"saved {args.out}: ssr k={summary['k']} latents={summary['hidden_dim']}, dead latents on "
          f"{summary['heldout_texts']} held-out texts: {summary['dead_latent_fraction_heldout']:.1%}")
    return 0


def run_index(args) -> int:
    from seqtopk.sparse.data.readers import read_beir_jsonl
    from seqtopk.sparse.ssr.folder import check_ssr_folder

    check_ssr_folder(args.folder)
    doc_ids, texts = read_beir_jsonl(args.corpus)  # the whole file is checked before anything is encoded
    from seqtopk.sparse.ssr.index import SSRIndex

    start = time.perf_counter()
    ssr, timings = SSRIndex.build(args.folder, doc_ids, texts, progress=not args.quiet)
    ssr.save(args.out)
    print(f"indexed {len(doc_ids)} documents, {ssr.index.n_tokens} tokens into {args.out}: "
          f"build {timings['index_build_s']:.1f} s (codes + inverted lists; {time.perf_counter() - start:.1f} s "
          f"with backbone and save), {ssr.index.nbytes:,} bytes in memory, {args.out.stat().st_size:,} on disk")
    return 0


def run_search(args) -> int:
    from seqtopk.sparse.ssr.index import SSRIndex

    if not args.query.strip():
        raise ValueError("the query is empty; give some text to search for")
    hits = SSRIndex.load(args.index, args.head).search(args.query, args.k, pool=args.pool, probe=args.probe)
    if args.json:
        print(json.dumps([{"doc_id": h.doc_id, "score": h.score} for h in hits], indent=2))
    else:
        for rank, hit in enumerate(hits, 1):
            print(f"{rank:3d}  {hit.score:8.4f}  {hit.doc_id}")
    return 0


def run_eval(args) -> int:
    from seqtopk.sparse.ssr.evaluate import evaluate_ssr
    from seqtopk.sparse.ssr.folder import check_ssr_folder

    check_ssr_folder(args.folder)
    pools = [None] + [int(p) for p in args.pools.split(",") if p.strip()]
    result = evaluate_ssr(args.folder, pools=tuple(pools), probe=args.probe, progress=not args.quiet)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


def run_export(args) -> int:
    from seqtopk.cli.csr import check_batch_size, write_codes
    from seqtopk.sparse.export import CodesInfo
    from seqtopk.sparse.data.readers import read_beir_jsonl
    from seqtopk.sparse.ssr.folder import check_ssr_folder

    check_batch_size(args)
    check_ssr_folder(args.folder)
    doc_ids, texts = read_beir_jsonl(args.corpus)  # the whole file is checked before anything is encoded
    from seqtopk.sparse.ssr.encoder import SSREncoder

    encoder = SSREncoder(args.folder)
    codes = encoder.encode(texts, "document", progress=not args.quiet)
    info = CodesInfo(dim=encoder.dim, head=args.folder.name, k=encoder.sae.k, vectors_per_doc="many")
    return write_codes(args, codes.codes, doc_ids, info, args.folder, offsets=codes.offsets)
