import ast
import pathlib
import subprocess
import sys

import mars_ray.algo

ALGO_DIR = pathlib.Path(mars_ray.algo.__file__).parent


def test_importing_algo_does_not_import_ray():
    code = "import mars_ray.algo, sys; assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_algo_sources_have_no_ray_import():
    files = sorted(ALGO_DIR.glob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{path.name} imports {names}"


def test_training_modules_import_with_torch_numpy_pillow_only():
    """``benchmarks/gpu_efficiency.py`` runs on a GPU box with torch, numpy and Pillow only: importing
    the engine, the segmenters and ``mars_ray.algo`` must not pull in Ray, pydensecrf, scikit-learn,
    SciPy or pyarrow (each is imported where it is used)."""
    code = (
        "import sys, mars_ray.engine, mars_ray.models.deeplab, mars_ray.algo\n"
        "bad = {'ray', 'pydensecrf', 'sklearn', 'scipy', 'pyarrow', 'pandas', 'mlflow'}\n"
        "found = sorted({m.split('.')[0] for m in sys.modules} & bad)\n"
        "assert not found, found\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
