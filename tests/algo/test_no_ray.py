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
