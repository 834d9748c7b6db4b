"""`pip install .` and `pip install -e .` both give llmq, llmq.kernels, llmq.eval, and no top-level
`kernels` / `eval` packages (DESIGN.md). Each install goes into a fresh venv that borrows the current
environment's third-party packages through a .pth file, so nothing heavy is installed again."""
import site
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = (
    "import llmq, llmq.kernels, llmq.eval, importlib.util as u; "
    "import os; s = u.find_spec('kernels'); "  # Hugging Face's `kernels` (transformers >= 5.25) may be there; ours not
    "assert s is None or not os.path.exists(os.path.join(os.path.dirname(s.origin), 'skinny.py')), s; "
    "assert 'site-packages' in llmq.__file__ or '{mode}' == 'editable', llmq.__file__; "
    "print(llmq.kernels.__file__)"
)


@pytest.mark.parametrize("mode", ["regular", "editable"])
def test_fresh_venv_install(tmp_path, mode):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    own_site = subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    parent = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(own_site, "zz_parent_env.pth").write_text("\n".join(parent) + "\n")
    target = ["-e", str(REPO)] if mode == "editable" else [str(REPO)]
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", *target], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([py, "-c", CHECK.format(mode=mode)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith(str(Path("kernels", "__init__.py")))
    r = subprocess.run([py, "-m", "llmq", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "quantize" in r.stdout
    assert (env_dir / "bin" / "llmq").exists()
