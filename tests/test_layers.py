"""Dependencies point one way: models, pretext, losses, metrics (and data) <- methods <- train,
evaluate <- runner, cli; nothing imports the CLI (DESIGN.md, Layout)."""

import ast
import os

from helpers import REPO

# package -> the jaxmed packages its modules may import (itself always allowed). `jaxmed.threefry`
# is a shared utility that imports nothing of jaxmed.
ALLOWED = {
    "models": set(),
    "losses": set(),
    "metrics": set(),
    "data": set(),
    "pretext": {"data"},        # the on-device resampler of data.transforms
    "interop": {"models"},
    "methods": {"data", "losses", "metrics", "models", "pretext", "threefry"},
    "train": {"data", "interop", "methods", "threefry"},
    "evaluate": {"data", "metrics", "methods", "train"},
    "configs": {"config", "data", "methods"},
}


def _imports(path: str) -> set[str]:
  """The ``jaxmed.<first part>`` names a module imports (real imports, not docstrings)."""
  tree = ast.parse(open(path).read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = ([f"{node.module}.{a.name}" for a in node.names] if node.module == "jaxmed"
               else [node.module])
    else:
      continue
    out |= {n.split(".")[1] for n in names if n.startswith("jaxmed.")}
  return out


def _modules(folder: str):
  for root, _, files in os.walk(os.path.join(REPO, folder)):
    for f in files:
      if f.endswith(".py"):
        yield os.path.join(root, f)


def test_the_shared_utilities_import_nothing_of_jaxmed():
  assert not _imports(os.path.join(REPO, "jaxmed", "threefry.py"))


def test_packages_import_only_lower_layers():
  bad = []
  for package, allowed in ALLOWED.items():
    for path in _modules(os.path.join("jaxmed", package)):
      extra = _imports(path) - allowed - {package}
      if extra:
        bad.append(f"{os.path.relpath(path, REPO)} imports {sorted(extra)}")
  assert not bad, "\n".join(bad)


def test_nothing_imports_the_cli():
  users = [os.path.relpath(p, REPO) for folder in ("jaxmed", "experiments")
           for p in _modules(folder)
           if "cli" in _imports(p) and not p.endswith(os.path.join("jaxmed", "cli.py"))]
  assert not users, users
