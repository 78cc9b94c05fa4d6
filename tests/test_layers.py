"""The package's layer order (scripts/check_layers.py, run by `make lint`): the package keeps it,
and the check names each import that breaks it."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_layers", ROOT / "scripts/check_layers.py")
check_layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_layers)


def test_the_package_keeps_the_layer_order():
    assert check_layers.problems(ROOT / "simpo_cli") == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "simpo_cli" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "simpo_cli"


def test_an_import_up_a_sibling_a_circle_a_needless_deferral_and_size_are_each_named(tmp_path):
    package = _write(
        tmp_path,
        {
            "__init__.py": "",
            "errors.py": "",
            "losses.py": "import torch\n",
            "redact.py": "from simpo_cli import errors\n",  # sibling at the bottom
            "run/__init__.py": "",
            "run/pipeline.py": "from simpo_cli.model import load\n",
            "model/__init__.py": "",
            "model/load.py": "from simpo_cli.run.pipeline import x\n",  # up, and a circle
            "model/adapters.py": (
                "import torch\n\n\ndef f():\n    from simpo_cli.losses import y\n"
                "    import vllm\n    import json\n"
            ),
            "launch.py": "x = 1\n" * 701,
        },
    )
    found = check_layers.problems(package)
    where = str(package)
    expected = [
        f"{where}/launch.py: 701 lines, over the limit of 700",
        f"{where}/model/adapters.py:5: imports simpo_cli.losses inside a function",
        f"{where}/model/adapters.py:7: imports json inside a function",
        f"{where}/model/load.py:1: imports simpo_cli.run.pipeline, a layer above model",
        f"{where}/redact.py:1: imports simpo_cli.errors, but redact and errors are sibling",
        "import circle: simpo_cli.model.load -> simpo_cli.run.pipeline -> simpo_cli.model.load",
    ]
    for start in expected:
        assert any(line.startswith(start) for line in found), (start, found)
    assert len(found) == len(expected), found  # `import vllm` defers an optional package
