"""Matmul time of one decode step of the default model, by batch rows: packed against plain.

    .venv/bin/python bench/packed_rows.py [--rows 1,4,8,16,32] [--repeats 5]

For each row count, times the base-weight matmuls of one forward step (every
PackedLinear of the 30 layers, then the LM head) two ways on the loaded model:
  packed  PackedLinear as the engine runs it (MKL's packed GEMM, called with the rows);
  plain   F.linear on the same weights (what MKL runs when the packed path is not taken).
Each figure is the best of --repeats timed steps (after one warm-up), in milliseconds.
Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,6,8,12,16,24,32,64,128")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from engine.model.gemm_probe import best_ms
    from engine.model.loader import load_model
    from engine.model.packed_linear import PackedLinear
    from engine.model_files import resolve_model

    model_dir, name = resolve_model(None, REPO / "bench" / ".work")
    model = load_model(model_dir, torch.float32)
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if not linears:
        sys.exit("no packed layers: this torch has no MKL, or the model is not float32")
    print(f"{name}: {len(linears)} packed linears, {torch.get_num_threads()} threads")
    print(f"{'rows':>5} {'packed ms':>10} {'plain ms':>10} {'plain/packed':>13}")
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            inputs = [torch.randn(rows, m.weight.shape[1]) for m in linears]  # [rows, in] per layer

            def packed(inputs=inputs):
                for m, x in zip(linears, inputs):
                    m(x)

            def plain(inputs=inputs):
                for m, x in zip(linears, inputs):
                    F.linear(x, m.weight, m.bias)

            p, q = best_ms(packed, args.repeats), best_ms(plain, args.repeats)
            print(f"{rows:>5} {p:>10.1f} {q:>10.1f} {q / p:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
