"""On a CPU, bitsandbytes is never imported: it cannot run 4-bit layers there, and importing it looks for kernels on
the Hub and logs warnings in every job (service.llm.modeling.plan_load keeps it out before peft would import it).
A fresh interpreter, as a job's or the API's process is."""

from __future__ import annotations

import subprocess
import sys

PROGRAM = """
import sys
from service.llm.modeling import plan_load
plan = plan_load("cpu", "auto")
from peft import LoraConfig, get_peft_model  # peft imports bitsandbytes wherever it finds it
from peft.import_utils import is_bnb_available
print(plan.dtype, sys.modules.get("bitsandbytes"), is_bnb_available())
"""


def test_the_cpu_path_never_imports_bitsandbytes() -> None:
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch.float32", "None", "False"], out.stdout
    assert "bitsandbytes" not in out.stderr and "kernels-community" not in out.stderr, out.stderr
