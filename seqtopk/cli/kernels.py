"""`seqtopk kernels`: say whether the compiled CPU kernels are in use, or build them (--build).

The kernels (seqtopk/kernels/cpu/*.cpp) decide one-token decode steps straight from the paged routing
history: the same choices as the pure-torch path, in one call per layer. Building needs g++ and ninja and
takes under half a minute; the library goes to the cache directory ($SEQTOPK_CACHE, default
~/.cache/seqtopk) and is rebuilt whenever torch or the sources change. Without it everything runs in torch.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("kernels", help="show or build the compiled CPU decode kernels", description=__doc__)
    p.add_argument("--build", action="store_true", help="compile them now (needs g++ and ninja)")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    p.set_defaults(func=run)


def run(args) -> int:
    import subprocess

    from seqtopk.kernels import compiled

    if args.build:
        try:
            compiled.build(verbose=args.verbose)
        # no compiler, no ninja, a compile error, a compiler that fails its version check ($CXX)
        except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as err:
            print(f"seqtopk kernels: could not build the CPU kernels ({err}); the torch path stays in use. "
                  "Install g++ and ninja, then run `seqtopk kernels --build --verbose`.")
            return 1
    print(compiled.status())
    return 0 if compiled.load() else 1
