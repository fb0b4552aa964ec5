"""lib_sd3 is a pure library: only lib_sd3/webui/ may import A1111's ``modules``."""

import ast

from conftest import ROOT

LIB = ROOT / "lib_sd3"
ADAPTER = LIB / "webui"


def imports_of_modules(source: str) -> list[str]:
    """Every import of A1111's ``modules`` package in ``source`` (absolute imports only)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [n for n in names if n == "modules" or n.startswith("modules.")]
    return found


def test_scanner_catches_every_import_form():
    for line in ("import modules.shared", "from modules import shared", "from modules.sd_hijack import x",
                 "def f():\n    import modules\n"):
        assert imports_of_modules(line), line
    for line in ("import modulesx", "from .modules import x", "from lib_sd3 import modules_like"):
        assert not imports_of_modules(line), line


def test_core_never_imports_a1111(tmp_path):
    offenders = {}
    for path in LIB.rglob("*.py"):
        if ADAPTER in path.parents:
            continue
        hits = imports_of_modules(path.read_text(encoding="utf-8"))
        if hits:
            offenders[str(path.relative_to(ROOT))] = hits
    assert offenders == {}


def test_boundary_check_would_fail_for_tokens_importing_modules():
    tokens = LIB / "tokens" / "counting.py"
    source = tokens.read_text(encoding="utf-8") if tokens.exists() else ""
    assert imports_of_modules(source + "\nfrom modules import shared\n") == ["modules"]
