"""The embedded random-weight models are rebuilt byte for byte by their own command (README, Embedded models)."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def digests(directory) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_python_m_runner_tools_tiny_rebuilds_tiny_sd_and_tiny_ddpm_byte_for_byte(tmp_path):
    # The command writes into the package's own models/: run it on a copy of the package (code only), in tmp_path.
    package = tmp_path / "runner"
    shutil.copytree(REPO / "runner", package, symlinks=True, ignore=shutil.ignore_patterns("models", "__pycache__"))
    (package / "models").mkdir()
    result = subprocess.run([sys.executable, "-m", "runner.tools.tiny"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPATH=str(tmp_path), HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["wrote", str(package / "models" / "tiny-sd"),
                                     "wrote", str(package / "models" / "tiny-ddpm")]
    for name in ("tiny-sd", "tiny-ddpm"):
        shipped = digests(REPO / "runner" / "models" / name)
        assert any(f.endswith(".safetensors") for f in shipped)
        assert digests(package / "models" / name) == shipped, name
