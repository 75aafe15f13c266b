"""Write the files of ``tests/data/vX.Y/`` with the equalbits that is importable (an old checkout).

Run from the repository root, once per version, with the old package first on the path, e.g.::

    git worktree add /tmp/eb-0.3 2fc5c55^ && PYTHONPATH=/tmp/eb-0.3 python tests/data/make_old_files.py tests/data/v0.3

It writes, for a random-init ``test_efficientnet`` (10 classes), a latent checkpoint and a packed file at
ratio 0.3 with prune 0.2, the same for 1W/1A where the version has it, and the logits that version
computes for a fixed 32x32 batch: ``tests/test_formats.py`` checks that today's reader gives them back.
Versions from 0.5 on also write the packed-weight ONNX export of each model at 32x32 (``NAME.onnx``).
The latent files record a fine-tune at 32x32 (``finetune.img_size``), as ``finetune --img-size 32`` did.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import equalbits_cli as eb
from equalbits_cli import BinarizeConfig, binarize_model, save_checkpoint, save_packed


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    settings = {"w1": {"ratio": 0.3, "prune": 0.2}, "w1a1": {"activations": "sign"}}
    for name, kwargs in settings.items():
        torch.manual_seed(0)
        model = binarize_model("test_efficientnet", BinarizeConfig(**kwargs), num_classes=10)
        for m in model.modules():  # BatchNorm statistics other than the defaults, as after training
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        model.eval()
        save_checkpoint(model, out / f"{name}.safetensors", extra={"finetune": json.dumps({"img_size": 32})})
        save_packed(model, out / f"{name}.packed.safetensors")
        with torch.no_grad():
            logits = model(x)
        save_file({"logits": logits.contiguous()}, str(out / f"{name}.logits.safetensors"))
        if tuple(int(p) for p in eb.__version__.split(".")[:2]) >= (0, 5):
            from equalbits_cli.export.onnx import export_onnx

            export_onnx(model, out / f"{name}.onnx", img_size=32)
    print(eb.__version__, "->", out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
