"""The floors of the house, read from the code's own imports (`ast`, every import statement:
top level, function-local and TYPE_CHECKING alike).

    rl/*.py      the ground floor: records, errors, futures, models, placement, checkpoint format
    trainers/    the trainer actor      } each imports the ground floor only,
    samplers/    the sampler actors     } never the other, never rl's upper floors
    rl/client/   the client: starts and drives the actors
    rl/loop/     the loops   } on the client, envs/ and the actors' public vocabulary
    rl/server/   the server  } (their configs and the loss table); never each other
    envs/        environments: nothing of ours but envs/

Arrows point down only, and no module imports itself back through others (no cycles).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rl", "envs", "samplers", "trainers")
# What the loops and the server may take from the actors' packages: their configs and the
# loss table (which losses exist and what they accept, custom-loss graphs included), not the
# actors themselves.
ACTOR_VOCABULARY = {
    "trainers.config",
    "samplers.config",
    "trainers.losses",
    "trainers.custom_graph",  # the custom-loss allow-list: the server checks graphs with it
}


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of our packages under `root`."""
    found = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The modules of ours that module `name` imports, wherever the import statement is."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*parent, base] if base else parent)
            # `from pkg import submodule` imports the submodule; other names come from pkg.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                yield target


def floor(module: str) -> str:
    """The floor a module lives on."""
    top = module.split(".")[0]
    if top != "rl":
        return top
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("client", "loop", "server"):
        return f"rl.{parts[1]}"
    return "rl"


def allowed(source: str, target: str) -> bool:
    """Whether a module on floor `source` may import module `target`."""
    to = floor(target)
    if source == to:
        return True
    if source == "envs":
        return False
    if source in ("rl", "trainers", "samplers"):
        return to == "rl"
    if source == "rl.client":
        return to in ("rl", "trainers", "samplers")
    if source in ("rl.loop", "rl.server"):
        return to in ("rl", "rl.client", "envs") or target in ACTOR_VOCABULARY
    raise AssertionError(f"unknown floor {source}")


def violations(root: Path) -> tuple[list[str], list[list[str]]]:
    """(imports that point the wrong way, import cycles) of the tree at `root`."""
    known = modules(root)
    graph = {name: sorted(set(imports(name, path, known))) for name, path in known.items()}
    wrong = [
        f"{name} imports {target}"
        for name, targets in sorted(graph.items())
        for target in targets
        if not allowed(floor(name), target)
    ]
    return wrong, cycles(graph)


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """One path around each cycle found by a depth-first walk."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_imports_point_down_only():
    wrong, _ = violations(ROOT)
    assert wrong == []


def test_no_import_cycles():
    _, found = violations(ROOT)
    assert found == [], [" -> ".join(cycle) for cycle in found]


def test_the_rules_catch_what_they_forbid(tmp_path):
    """A tree that breaks each rule once is reported for each."""
    files = {
        "rl/__init__.py": "",
        "rl/types.py": "from rl.client import service\n",  # ground floor -> upper floor
        "rl/client/__init__.py": "",
        "rl/client/service.py": "def f():\n    from rl.loop import train\n",  # client -> loop
        "rl/loop/__init__.py": "",
        "rl/loop/train.py": "from trainers.trainer import LoraTrainer\n",  # loop -> actor
        "rl/server/__init__.py": "from rl.loop.train import x\n",  # server -> loop
        "trainers/__init__.py": "",
        "trainers/trainer.py": "from samplers import pool\n",  # actor -> the other actor
        "trainers/config.py": "",
        "samplers/__init__.py": "",
        "samplers/pool.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import samplers.actor\n"
        ),
        "samplers/actor.py": "from samplers.pool import x\n",  # a cycle, half of it typing-only
        "envs/__init__.py": "",
        "envs/base.py": "import rl.types\n",  # envs -> rl
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    wrong, found = violations(tmp_path)
    assert wrong == [
        "envs.base imports rl.types",
        "rl.client.service imports rl.loop.train",
        "rl.loop.train imports trainers.trainer",
        "rl.server imports rl.loop.train",
        "rl.types imports rl.client.service",
        "trainers.trainer imports samplers.pool",
    ]
    assert [sorted(set(cycle)) for cycle in found] == [["samplers.actor", "samplers.pool"]]


MAX_FUNCTION_LINES = 80


def long_functions(root: Path) -> list[str]:
    """'module.function (N lines)' for every product function longer than the limit."""
    found = []
    for name, path in sorted(modules(root).items()):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{name}.{node.name} ({lines} lines)")
    return found


def test_no_product_function_is_long():
    assert long_functions(ROOT) == []


def test_the_length_rule_catches_a_long_function(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "long.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}")
    assert long_functions(tmp_path) == [f"rl.long.long ({MAX_FUNCTION_LINES + 1} lines)"]
