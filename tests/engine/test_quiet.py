"""udaseg prints only its own lines; UDASEG_DEBUG=1 keeps Lightning's."""

import os
import subprocess
import sys

SCRIPT = """
import warnings
from udaseg.engine.quiet import quiet_lightning
quiet_lightning()
import lightning as L
from lightning.pytorch.loggers import CSVLogger
warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", DeprecationWarning)
L.Trainer(accelerator="cpu", devices=1, logger=CSVLogger({out!r}), enable_progress_bar=False)
print("udaseg line")
"""


def _run(tmp_path, debug: bool) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    env.pop("UDASEG_DEBUG", None)
    if debug:
        env["UDASEG_DEBUG"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(out=str(tmp_path))], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    return proc.stdout + proc.stderr


def test_lightning_info_lines_and_upstream_warnings_are_silenced(tmp_path):
    quiet = _run(tmp_path, debug=False)
    assert "udaseg line" in quiet
    for noise in ("GPU available", "TPU available", "Tip", "LeafSpec"):
        assert noise not in quiet, quiet
    loud = _run(tmp_path, debug=True)
    assert "GPU available" in loud and "LeafSpec" in loud  # the test really sees them
