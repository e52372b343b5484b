"""What ``vitscope evaluate`` costs, against the analysis pass on the same set, and how it grows.

A small CLIP with random weights (4 blocks of width 256, 112 px images, 7 x 7 patches; its text
tower keeps the tokenizer's vocabulary, so zero-shot runs), planted-square images extracted at
block 1, and a ReLU SAE of width 2048 with the set's normalisation, sparse like a trained one
(its figures are not the point here, its cost is). For N and 2N images, interleaved:
``analyze()`` over the whole set against ``evaluate()`` with ``--images`` = the set, which runs
the ViT three times per image (clean, SAE spliced in, layer ablated), fits the probes and the
label-alignment baselines. Reported: the time of each, evaluate / analyze at N and 2N, the
growth of each from N to 2N, and where evaluate's time goes (the report's ``timings_s``).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import open_clip
import torch
from _common import Figure, base_parser, interleaved, median, paired_ratios, print_environment, report, wall

from vitscope.analyzer import AnalyzeConfig, analyze
from vitscope.evaluator import EvaluateConfig, evaluate
from vitscope.extractor import ExtractConfig, extract
from vitscope.models import save_open_clip_dir
from vitscope.reports import report_prefix
from vitscope.sae import SaeConfig, SaeRecord, build_sae, fit_normalizer, save_sae
from vitscope.shards import ActivationSet, from_storage
from vitscope.store import LocalStore
from vitscope.synthetic import make_planted_dataset

MODEL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 112, "layers": 4, "width": 256, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
LAYER = 1
SAE_ID = "benchsae"


def parse_args():
    p = base_parser(__doc__, repeats=2)
    p.add_argument("--images", type=int, default=128, help="N: the smaller set (the larger has 2N)")
    p.add_argument("--d-sae", type=int, default=2048)
    args = p.parse_args()
    if args.quick:
        args.images, args.d_sae, args.repeats = 16, 256, 1
    return args


def make_store(root: Path, model: str, images: int, d_sae: int) -> LocalStore:
    """A store with the planted set extracted at LAYER and a sparse random SAE on it."""
    data = root / "images"
    make_planted_dataset(data, n_images=images, size=112, square=32, align=16)
    store = LocalStore(root / "store")
    set_id = extract(ExtractConfig(data=str(data), store=str(store.root), model=model, layers=(LAYER,), pretrained=None, workers=0,
                                   batch_size=32, progress=False)).set_id
    aset = ActivationSet.open(store, set_id)
    x = torch.cat([from_storage(a, aset.manifest.dtype) for _, a in aset.iter_shards(LAYER)])[:, 1:]
    x = x.reshape(-1, x.shape[-1])
    torch.manual_seed(0)
    sae = build_sae(SaeConfig.of("relu", x.shape[1], d_sae))
    mean, scale = fit_normalizer(x)
    with torch.no_grad():
        sae.norm_mean.copy_(mean)
        sae.norm_scale.fill_(scale)
        sae.b_enc.copy_(-sae.pre_acts(sae.normalize(x[:4096])).quantile(0.98, dim=0))  # ~2% firing
    save_sae(store, sae.eval(), SaeRecord(sae_id=SAE_ID, config=sae.cfg, activation_set_id=set_id, layer=LAYER,
                                          tokens=["patches"]))
    return store


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    print_environment(args)
    root = Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
    torch.manual_seed(0)
    model = save_open_clip_dir(open_clip.CLIP(**MODEL), MODEL, root / "model")
    sizes = {"N": args.images, "2N": 2 * args.images}
    stores = {k: make_store(root / k, model, n, args.d_sae) for k, n in sizes.items()}
    last: dict[str, dict] = {}

    def run_analyze(k: str):
        def run() -> None:
            analyze(AnalyzeConfig(sae=SAE_ID, store=str(stores[k].root), top_images=16, device="cpu", progress=False))
            stores[k].delete_prefix("analyses/")
        return run

    def run_evaluate(k: str):
        def run() -> None:
            result = evaluate(EvaluateConfig(sae=SAE_ID, store=str(stores[k].root), images=sizes[k], device="cpu",
                                             progress=False))
            last[k] = result.report
            stores[k].delete_prefix(report_prefix(result.report_id) + "/")
        return run

    t = interleaved({f"{stage} {k}": wall((run_analyze if stage == "analyze" else run_evaluate)(k))
                     for k in sizes for stage in ("analyze", "evaluate")}, args.repeats, warmup=not args.quick)
    figures = []
    for k, n in sizes.items():
        figures += [Figure(f"analyze(), {n} images", median(t[f"analyze {k}"]), "s"),
                    Figure(f"evaluate(), {n} images", median(t[f"evaluate {k}"]), "s"),
                    Figure.ratio(f"evaluate / analyze at {n} images", paired_ratios(t[f"evaluate {k}"], t[f"analyze {k}"]))]
    figures += [Figure.ratio(f"{stage}: {sizes['2N']} images / {sizes['N']} images",
                             paired_ratios(t[f"{stage} 2N"], t[f"{stage} N"])) for stage in ("analyze", "evaluate")]
    figures += [Figure(f"evaluate at {sizes['2N']} images: {part}", seconds, "s")
                for part, seconds in last["2N"]["timings_s"].items() if part != "total"]
    report(f"evaluate vs analyze: CLIP width 256 x 4 blocks (random), 49 patches, layer {LAYER}, d_sae {args.d_sae}",
           figures)


if __name__ == "__main__":
    main()
