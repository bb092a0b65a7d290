"""The shape of the code: imports one way, torch only where needed, no global side effects, one
error boundary."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "transferkit"
# The wings, lowest first: a module imports from its own wing or from wings before it, never after.
# The command line (cli.py) and the package's own __init__/__main__ stand above them all.
WINGS = ("utils", "cfg", "data", "models", "openworld", "predict", "reports", "training", "curate", "deploy", "apps")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> list[str]:
    """The package modules an ImportFrom names (relative to `module`)."""
    if node.level == 0:
        if not (node.module or "").startswith("transferkit."):
            return []
        base = node.module.split(".", 1)[1]
    else:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)] if node.level > 1 else package
        if node.level - 1 > len(module.split(".")) - (0 if is_package else 1):
            raise AssertionError(f"{module}: import above the package")
        base = ".".join([*package, *([node.module] if node.module else [])])
    found = []
    for alias in node.names:  # `from .pkg import mod` names a module; `from .mod import name` the module
        candidate = f"{base}.{alias.name}".lstrip(".")
        is_module = (PACKAGE / (candidate.replace(".", "/") + ".py")).is_file() \
            or (PACKAGE / candidate.replace(".", "/")).is_dir()
        found.append(candidate if is_module else base)
    return found


def import_graph() -> dict[str, set[str]]:
    """module (dotted, inside transferkit) -> the package modules it imports, at the top or inside
    a function."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                edges.update(resolve(name, node, is_package))
        graph[name] = edges - {name, "__init__", ""}
    return graph


def wing(module: str) -> int:
    """A module's rank: its wing's place in WINGS; the top-level modules above every wing."""
    top = module.split(".")[0]
    return WINGS.index(top) if "." in module or top in WINGS else len(WINGS)


def test_no_import_cycle_even_through_lazy_imports():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not graph["__init__"], "the package __init__ imports its modules lazily"


def test_every_module_lives_in_a_wing_and_imports_only_downwards():
    graph = import_graph()
    top_level = {m for m in graph if "." not in m and m not in WINGS}
    assert top_level == {"__init__", "__main__", "cli"}, f"modules outside the wings: {sorted(top_level)}"
    assert set(WINGS) <= set(graph), "every wing is a package"
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets if wing(t) > wing(m))
    assert not upward, "imports against the wings' order " + " < ".join(WINGS) + ": " + ", ".join(upward)
    assert all(not graph.get(w) for w in WINGS), "a wing's __init__ imports nothing: modules are imported by name"


def test_the_resolver_sees_relative_and_lazy_imports():
    graph = import_graph()
    assert "training.search" in graph["training.recipe"]  # from . import distributed, search
    assert "predict.run" in graph["training.search"]  # from ..predict import run
    assert "training.recipe" in graph["cli"]  # a lazy import inside a command


def modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["backbones"]])
def test_help_and_backbones_answer_without_torch(argv):
    loaded = modules_after("import sys\nfrom transferkit.cli import app\n"
                           f"try:\n    app({argv!r})\nexcept SystemExit:\n    pass")
    assert not {"torch", "timm", "torchvision"} & loaded


def test_onnx_engine_predicts_without_torch(exported, lfw_split):
    exported_onnx = exported[0] / "model.onnx"
    image = next((lfw_split[1] / "face").iterdir())
    loaded = modules_after("from transferkit.cli import app\n"
                           f"try:\n    app(['predict', {str(exported_onnx)!r}, {str(image)!r}, '--engine', 'onnx'])\n"
                           "except SystemExit as e:\n    assert e.code in (0, None), e.code")
    assert "onnxruntime" in loaded
    assert not {"torch", "timm", "torchvision"} & loaded


def test_onnx_service_starts_without_torch(exported):
    exported_onnx = exported[0] / "model.onnx"
    loaded = modules_after(f"from transferkit.apps.serve import create_app\ncreate_app({str(exported_onnx)!r}, 'onnx')")
    assert not {"torch", "timm", "torchvision"} & loaded


def test_library_calls_leave_global_state_alone(binary_run, tmp_path):
    import matplotlib
    from PIL import ImageFile

    from transferkit.reports.plots import confusion_figure, learning_curves

    backend, truncated = matplotlib.get_backend(), ImageFile.LOAD_TRUNCATED_IMAGES
    levels = {name: logging.getLogger(name).level for name in ("", "torch.onnx")}
    filters = list(warnings.filters)
    learning_curves([{"epoch": 1, "train_accuracy": 0.5, "val_accuracy": 0.5, "train_loss": 1, "val_loss": 1,
                      "phase": 1}], tmp_path / "c.png")
    confusion_figure([[1, 0], [0, 1]], ["a", "b"], tmp_path / "m.png")
    from transferkit.deploy.export import export_onnx

    export_onnx(binary_run[0], binary_run[1], tmp_path / "m.onnx")
    assert matplotlib.get_backend() == backend and ImageFile.LOAD_TRUNCATED_IMAGES == truncated
    assert {name: logging.getLogger(name).level for name in levels} == levels
    assert warnings.filters == filters
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, tmp_path):
    import transferkit.cli as cli
    from transferkit.utils.errors import DataError

    runner = CliRunner()
    result = runner.invoke(cli.app, ["evaluate", str(tmp_path / "nothing"), str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")

    def broken(*args, **kwargs):
        raise KeyError("an internal mistake")

    monkeypatch.setattr("transferkit.predict.run.load", broken)
    result = runner.invoke(cli.app, ["evaluate", str(tmp_path), str(tmp_path)])
    assert result.exit_code == 1
    assert "Traceback" in result.output and "KeyError: 'an internal mistake'" in result.output
    assert "This is a bug in transferkit" in result.output

    def user_mistake(*args, **kwargs):
        raise DataError("x.csv: no images") from OSError("cause")

    monkeypatch.setattr("transferkit.predict.run.load", user_mistake)
    result = runner.invoke(cli.app, ["evaluate", str(tmp_path), str(tmp_path)])
    assert (result.exit_code, result.output) == (2, "error: x.csv: no images\n")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "runs/x/model.json")

    monkeypatch.setattr("transferkit.predict.run.load", denied)
    result = runner.invoke(cli.app, ["evaluate", str(tmp_path), str(tmp_path)])
    assert (result.exit_code, result.output) == (2, "error: runs/x/model.json: Permission denied\n")

    def nameless(*args, **kwargs):
        raise OSError("an OS error that names no file")

    monkeypatch.setattr("transferkit.predict.run.load", nameless)
    result = runner.invoke(cli.app, ["evaluate", str(tmp_path), str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" in result.output and "This is a bug" in result.output


def test_data_checks_that_need_no_decoding_run_before_the_backbone_is_built(tmp_path, monkeypatch):
    import transferkit
    import transferkit.training.recipe as recipe
    from transferkit.utils.errors import DataError

    monkeypatch.setattr(recipe, "create_backbone", lambda *a, **k: pytest.fail("backbone built before the check"))
    (tmp_path / "one" / "cats").mkdir(parents=True)
    (tmp_path / "one" / "cats" / "a.png").write_bytes(b"not even decoded")
    with pytest.raises(DataError, match="only one class"):
        transferkit.train(tmp_path / "one", tmp_path / "run")
    (tmp_path / "two" / "cats").mkdir(parents=True)
    (tmp_path / "two" / "dogs").mkdir(parents=True)
    for name in ("cats/a.png", "cats/b.png", "dogs/a.png"):
        (tmp_path / "two" / name).write_bytes(b"x")
    with pytest.raises(DataError, match=r"class\(es\) \['dogs'\] have a single image"):
        transferkit.train(tmp_path / "two", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_what_two_places_used_to_declare_is_declared_once():
    """The service limits, the engine names, the launcher's variable, the web apps' error answers and
    the labelling strategies each have one declaration that the others read."""
    sources = {p.relative_to(PACKAGE).as_posix(): p.read_text() for p in PACKAGE.rglob("*.py")}
    for literal, home in (('"TRANSFERKIT_LAUNCHED"', "cfg/environment.py"), ("40_000_000", "cfg/service.py"),
                          ('("auto", "torch", "onnx", "openvino")', "cfg/service.py"), ("class ApiError", "utils/errors.py"),
                          ('("balanced", "none")', "cfg/settings.py"), ("@app.exception_handler", None),
                          ('("balanced_accuracy", "f1", "youden")', "cfg/settings.py"),
                          ("unknown strategy", "curate/active.py")):
        found = sorted(name for name, text in sources.items() for _ in range(text.count(literal)))
        assert found == ([home] if home else []), f"{literal} declared in {found}"
    from transferkit.cli import EngineName
    from transferkit.cfg.service import ENGINES
    from transferkit.utils.errors import ApiError, TransferkitError

    assert [e.value for e in EngineName] == list(ENGINES) and issubclass(ApiError, TransferkitError)
