"""Analysis plots of teacher checkpoints: information plane, MLP expertness, pruning diagnostic, layer dynamics.

What it shows (definitions in docs/analysis.md):
    * ``information_plane`` + ``plot_information_plane``: teacher error against I(X; F_T), one point per checkpoint;
    * ``mlp_expertness`` + ``plot_expertness``: how sparsely and selectively each block's MLP neurons fire;
    * ``pruning_diagnostic`` + ``plot_pruning``: accuracy and MI with the top-k MLP vs attention branches removed;
    * ``layer_dynamics`` + ``plot_layer_dynamics``: channel spectrum, token entropy, activation and gradient
      magnitude per block (the "U" over depth).
    The plots are PNG files in ``--out``; matplotlib is needed (``pip install timm-remem[demo]``).

Run:
    python examples/analysis_plots.py --checkpoints runs/vitb-remem/checkpoints --out analysis
        # a folder of exported checkpoints (examples/finetune_teacher.py); CIFAR-100 validation images
        # (downloaded into --data-dir); GPU advised
    python examples/analysis_plots.py --smoke     # 3 checkpoints of a tiny ViT trained on digits; offline, seconds
"""

import argparse
import itertools
import tempfile
from pathlib import Path

import timm

import timm_remem
from timm_remem import analysis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny ViT checkpoints on digits, offline")
    parser.add_argument("--checkpoints", default="runs/vitb-remem/checkpoints")
    parser.add_argument("--dataset", default="torch/cifar100")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--images", type=int, default=512, help="held-out images to measure on")
    parser.add_argument("--out", default="analysis", help="output folder (smoke: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            run = timm_remem.train.finetune_teacher(model="test_vit", img_size=16, epochs=3, save_at=[1, 2, 3], lr=3e-3,
                                              alpha=0.85, limit_train_batches=6, output=f"{tmp}/teacher",
                                              device="cpu", progress=False)
            args.checkpoints, args.out, args.dataset, args.images = run.output / "checkpoints", tmp, "digits", 128
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)

        # Held-out data as the checkpoints expect it (their resolution and normalisation), no augmentation.
        names = sorted(Path(args.checkpoints).iterdir(), key=lambda p: timm.utils.natural_key(p.name))
        cfg = timm.data.resolve_model_data_config(timm_remem.load_teacher(names[0]))
        data = timm_remem.data.create_dataset(args.dataset, root=args.data_dir, split="val", download=not args.smoke,
                                         img_size=cfg["input_size"][-1], mean=cfg["mean"], std=cfg["std"])
        loader = timm_remem.data.create_loader(data, 64)
        small = list(itertools.islice(loader, max(1, args.images // 64)))   # a fixed list of batches

        # 1. Information plane over all checkpoints, and the ranking built on it.
        points = analysis.information_plane(args.checkpoints, small, progress=False)
        for p in points:
            print(f"  {p.name}: accuracy {p.accuracy:.3f}, I(X;T) {p.i_xf:.2f} nats, I(T;Y) {p.i_fy:.2f} nats")
        analysis.plot_information_plane(points, out / "information_plane.png")
        best = analysis.rank_checkpoints(args.checkpoints, small, progress=False)[0].name
        teacher = timm_remem.load_teacher(Path(args.checkpoints) / best)
        print(f"best-ranked checkpoint: {best}")

        # 2. MLP expertness of the best-ranked checkpoint.
        blocks = analysis.mlp_expertness(teacher, small, progress=False)
        print("  MLP fire density per block:", [round(b.density, 3) for b in blocks])
        analysis.plot_expertness(blocks, out / "expertness.png")

        # 3. Pruning diagnostic: reads the data 2L + 1 times, so keep it small.
        pruning = analysis.pruning_diagnostic(teacher, small[:2], progress=False)
        analysis.plot_pruning(pruning, out / "pruning.png")

        # 4. Layer dynamics on one batch, with gradient magnitudes.
        images, labels = small[0][0], small[0][1]
        dynamics = analysis.layer_dynamics(teacher, images, gradient=True, target=labels)
        analysis.plot_layer_dynamics(dynamics, out / "layer_dynamics.png")

        written = sorted(p.name for p in out.glob("*.png"))
        assert len(written) == 4 and all((out / n).stat().st_size > 0 for n in written), written
        print(f"wrote {written} to {out if not args.smoke else 'a temporary folder'}")


if __name__ == "__main__":
    main()
