"""Pack Unsloth for the GPU machine (no index there, ~12 MiB of carry space left beside .devsite).

    python3 bench/pack_unsloth.py        # writes .unsloth/unsloth-site.zip (git-ignored); carry ".unsloth"

What Unsloth 2026.10.9 imports on the GPU path, read from its source (every module-level import outside a
``try``): torch, transformers, peft, accelerate, trl, datasets, bitsandbytes, triton, numpy, packaging, tqdm,
psutil, sentencepiece, protobuf, huggingface_hub, pillow, regex, requests, einops, torchvision, safetensors,
pydantic: the machine's image or ``.devsite`` holds them all. xformers, flash-attn, torchao, cut_cross_entropy,
msgspec, vllm, diffusers, tyro, hf_transfer, nest_asyncio are imported under ``try`` or only on other paths (MoE,
vLLM, QAT, fp8, the CLI); without xformers and flash-attn Unsloth runs its attention through PyTorch's SDPA.
Its usage statistics (a download from the Hub) are skipped with ``HF_HUB_OFFLINE=1`` or
``UNSLOTH_DISABLE_STATISTICS`` (``bench/train_peers.py`` sets both).

So the archive holds only ``unsloth``, ``unsloth_zoo`` (with ``unsloth_zoo_downloads``) and ``cut_cross_entropy``
(64 kB, Unsloth's fused cross-entropy), with their dist-info (Unsloth reads their versions), and leaves out the
wheel's ``studio`` web app (82 MB) and ``unsloth_cli``. Zipped it is ~4.7 MB; ``bench/train_peers.py`` unpacks it
under /tmp and puts it first on ``sys.path`` in the Unsloth variants' own processes only.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ["unsloth==2026.10.9", "unsloth_zoo==2026.10.9", "cut_cross_entropy==25.1.1"]
LEAVE_OUT = ("studio/", "unsloth_cli/")
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64"]
PLATFORM += ["--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]


def main() -> None:
    target = ROOT / ".unsloth" / "unsloth-site.zip"
    target.parent.mkdir(exist_ok=True)
    exclude = ROOT / ".git" / "info" / "exclude"
    if exclude.parent.exists() and "/.unsloth/" not in exclude.read_text().split():
        with exclude.open("a") as f:
            f.write("/.unsloth/\n")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d", tmp]
        subprocess.run(cmd + WHEELS, check=True)
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
            for wheel in sorted(Path(tmp).glob("*.whl")):
                with zipfile.ZipFile(wheel) as z:
                    for name in z.namelist():
                        if name.startswith(LEAVE_OUT) or "__pycache__" in name or name.endswith("/"):
                            continue
                        out.writestr(name, z.read(name))
    print(f"{target.relative_to(ROOT)}: {target.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
