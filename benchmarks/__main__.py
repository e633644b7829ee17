"""Run every benchmark: ``python -m benchmarks [core|store|http|http-raw|openai|cluster
...]`` (default: all)."""

from __future__ import annotations

import importlib
import sys

SUITES = {
    "core": "bench_core",
    "store": "bench_store",
    "http": "bench_http",
    "http-raw": "bench_http_raw",
    "openai": "bench_openai",
    "cluster": "bench_cluster",
}


def main(argv: list[str]) -> None:
    chosen = argv or list(SUITES)
    unknown = [name for name in chosen if name not in SUITES]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {list(SUITES)}")
    for name in chosen:
        module = importlib.import_module(f"benchmarks.{SUITES[name]}")
        if name in ("store", "http-raw"):
            module.main([])
        else:
            module.main()
        print(flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
