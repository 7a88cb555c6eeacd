"""Quickstart: compile a model with a per-layer attention policy, read the report, and check
that the compiled model still computes what the original does.

    python examples/quickstart.py
"""

import torch

import clusterfx as cfx
from clusterfx import check_equivalence
from clusterfx.models import example_inputs, gpt_tiny


def main() -> None:
    torch.manual_seed(0)
    model = gpt_tiny(depth=4, dim=64, heads=4).eval()  # attention sites: blocks.{0..3}.attn
    inputs = example_inputs("gpt", batch=2, seq_len=128, model=model)  # (idx (2, 128),)

    # Keys are tried in order; the first that matches a site's module path (or an ancestor)
    # wins. `None` leaves a site alone; `_default` catches every site nothing else matched.
    policy = {
        "blocks.0": cfx.Dense(),  # exact attention, lowered to scaled_dot_product_attention
        "blocks.1": None,  # leave this layer exactly as written
        "re:blocks\\.[23]": cfx.ImprovedClustered(clusters=25, topk=32),
        "_default": cfx.Clustered(clusters=25),
    }
    # backend="eager" compiles in seconds; leave it out for Inductor (the default), which takes
    # longer to compile and runs faster.
    compiled = cfx.compile(model, policy=policy, backend="eager")

    with torch.no_grad():
        compiled(*inputs)
    report = cfx.explain(compiled)  # one row per attention site: what was found, what was done
    print(report)

    # Outputs and parameter gradients, compiled vs the original model. A rewrite whose
    # lowering is not available yet keeps the site dense (the report says why), so here the
    # two agree to float32 rounding; approximate rewrites show their error here.
    result = check_equivalence(model, compiled, inputs)
    print(result)


if __name__ == "__main__":
    main()
