"""Publish a ReMem teacher on the Hugging Face Hub, then load it with plain timm (or ``load_teacher``).

What it shows:
    * ``push_to_hub(model, repo_id, ...)``: one commit with ``model.safetensors`` (merged: a plain timm checkpoint),
      ``config.json`` (timm's config plus a ``remem`` block) and a model card; training facts as keyword arguments;
    * loading it with ``timm.create_model("hf-hub:REPO", pretrained=True)`` (no timm-remem needed) and with
      ``timm_remem.load_teacher``; the outputs match the teacher's;
    * ``merge=False`` keeps the factors separate; ``load_teacher`` then restores the reweighted structure exactly.

Run:
    python examples/publish_to_hub.py --repo-id me/vit-remem-test --teacher runs/vitb-remem/checkpoints/epoch-015
        # needs network and a token with write access (HF_TOKEN or `hf auth login`); --private to keep it private
    python examples/publish_to_hub.py --smoke
        # no network: the same files through save_pretrained into a temporary folder, loaded via local-dir:
"""

import argparse
import json
import tempfile

import timm
import torch

import timm_remem


def check_same(name: str, model: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=1e-4, atol=1e-4)
    print(f"  {name}: outputs match the teacher")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="save_pretrained + local-dir, no network")
    parser.add_argument("--repo-id", help="namespace/name of the Hub repository to push to")
    parser.add_argument("--teacher", help="teacher folder or hf-hub: name; default: a random reweighted test_vit")
    parser.add_argument("--private", action="store_true")
    # Training facts recorded in config.json and the model card (all optional).
    parser.add_argument("--dataset")
    parser.add_argument("--rho", type=float)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--teacher-accuracy", type=float)
    args = parser.parse_args()
    if not args.smoke and not args.repo_id:
        parser.error("--repo-id is required unless --smoke")
    torch.manual_seed(0)

    if args.teacher:
        teacher = timm_remem.load_teacher(args.teacher)
    else:
        teacher = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=10)
        timm_remem.reweight(teacher, alpha=0.85)                # an (untrained) ReMem teacher
    teacher.eval()
    c, h, w = timm.data.resolve_model_data_config(teacher)["input_size"]
    x = torch.randn(2, c, h, w)
    facts = {k: getattr(args, k) for k in ("dataset", "rho", "epochs", "teacher_accuracy") if getattr(args, k)}
    if args.smoke:   # illustrative values
        facts = dict(dataset="digits", rho=0.05, epochs=12, teacher_accuracy=91.9,
                     student_accuracies={"resnet18": 98.3})

    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            folder = timm_remem.save_pretrained(teacher, f"{tmp}/merged", **facts)   # what push_to_hub uploads
            remem = json.loads((folder / "config.json").read_text())["remem"]
            print("config.json remem block:", {k: remem[k] for k in ("alpha", "schedule", "merged", "dataset")})
            card = (folder / "README.md").read_text()
            print("model card:", next(line for line in card.splitlines() if line.startswith("# ")))
            check_same("timm.create_model('local-dir:...')",
                       timm.create_model(f"local-dir:{folder}", pretrained=True), teacher, x)
            check_same("load_teacher(folder)", timm_remem.load_teacher(folder), teacher, x)

            unmerged = timm_remem.save_pretrained(teacher, f"{tmp}/unmerged", merge=False, **facts)
            restored = timm_remem.load_teacher(f"local-dir:{unmerged}")
            assert timm_remem.get_scales(restored) == timm_remem.get_scales(teacher)
            check_same("load_teacher(merge=False folder), factors restored", restored, teacher, x)
        return

    url = timm_remem.push_to_hub(teacher, args.repo_id, private=args.private, **facts)  # HubError with the fix
    print("pushed:", url)
    check_same(f"timm.create_model('hf-hub:{args.repo_id}')",
               timm.create_model(f"hf-hub:{args.repo_id}", pretrained=True), teacher, x)
    check_same("load_teacher('hf-hub:...')", timm_remem.load_teacher(f"hf-hub:{args.repo_id}"), teacher, x)


if __name__ == "__main__":
    main()
