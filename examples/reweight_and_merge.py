"""Reweight a timm ViT's MLP branches, merge the factors, save, and reload the result with plain timm.

What it shows:
    1. ``timm_remem.reweight`` wraps each block's MLP residual branch in a ``ScaledBranch`` (top blocks scaled most),
       without touching the original state-dict keys.
    2. ``timm_remem.merge`` folds the factors into the weights: same outputs, no wrappers left.
    3. ``timm_remem.save_pretrained`` writes timm's Hub format, and plain timm reloads it with
       ``timm.create_model("local-dir:DIR", pretrained=True)`` with the same outputs.

Run:
    python examples/reweight_and_merge.py            # vit_base_patch16_224.augreg_in21k (downloads ~350 MB)
    python examples/reweight_and_merge.py --smoke    # tiny random ViT, offline, seconds
"""

import argparse
import tempfile

import timm
import torch

import timm_remem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random model, offline, seconds")
    parser.add_argument("--model", default="vit_base_patch16_224.augreg_in21k")
    parser.add_argument("--alpha", type=float, default=0.85)
    args = parser.parse_args()
    torch.manual_seed(0)

    if args.smoke:
        name, kwargs, pretrained, size = "test_vit", {"img_size": 32}, False, 32
    else:
        name, kwargs, pretrained, size = args.model, {}, True, 224
    model = timm.create_model(name, pretrained=pretrained, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        original = model(x)

    # 1. Reweight: exponential schedule, the top block gets alpha ** depth.
    timm_remem.reweight(model, alpha=args.alpha)
    scales = timm_remem.get_scales(model)
    for path, factor in scales.items():
        print(f"  {path:<24} x {factor:.4f}")
    assert timm_remem.is_reweighted(model)
    with torch.no_grad():
        reweighted = model(x)
    change = (reweighted - original).abs().max().item()
    print(f"reweighted {len(scales)} MLP branches; outputs changed by up to {change:.3g}")
    assert change > 0, "factors != 1 must change the outputs"

    # The original keys are all still there (plus one ...remem_scale per branch): pretrained weights still load.
    extra = [k for k in model.state_dict() if k.endswith("remem_scale")]
    print(f"state_dict has {len(extra)} extra remem_scale entries")

    # 2. Merge: fold the factors into the weights (fp32), remove every wrapper, same function.
    timm_remem.merge(model)
    assert not timm_remem.is_reweighted(model)
    with torch.no_grad():
        merged = model(x)
    torch.testing.assert_close(merged, reweighted, rtol=1e-4, atol=1e-4)
    print("merged: outputs equal to the reweighted model")

    # 3. Save in timm's Hub format and reload with plain timm (no timm-remem code needed on the loading side).
    with tempfile.TemporaryDirectory() as tmp:
        folder = timm_remem.save_pretrained(model, f"{tmp}/teacher", dataset="example")
        print("saved:", sorted(p.name for p in folder.iterdir()))
        # config.json records the architecture and its kwargs (img_size, num_classes): nothing else to pass.
        reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        with torch.no_grad():
            again = reloaded(x)
    torch.testing.assert_close(again, merged, rtol=1e-4, atol=1e-4)
    print("reloaded with timm.create_model('local-dir:...'): outputs equal")


if __name__ == "__main__":
    main()
