"""Which Python packages the extension needs at run time, and how to add the missing ones safely.

``install.py`` runs inside A1111's venv on every WebUI start, so it must cost nothing when all is
there (no pip call: start-up stays fast and works offline), and when something is missing it must
never change a package A1111 already has. That is why requirements carry no version specifiers
and why the pip command pins every installed distribution with a constraints file: pip then picks
a version of the missing package that fits the environment as it is, instead of "upgrading" the
numpy or torch that A1111 pinned.

Pure: no A1111 import; ``install.py`` passes in ``launch.is_installed``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import re
from collections.abc import Callable, Iterable


@dataclasses.dataclass(frozen=True)
class Requirement:
    dist: str  # name on PyPI, what pip installs
    module: str  # import name, for installs without metadata (conda, vendored copies)
    needed_for: str  # what stops working without it: the user sees this if installing fails
    a1111_ships: bool  # in A1111's requirements (directly or as a dependency): only checked, never re-pinned


RUNTIME: tuple[Requirement, ...] = (
    Requirement("sentencepiece", "sentencepiece", "T5 token counts and the T5 tokenizer (google/t5-v1_1-xxl)", False),
    Requirement("safetensors", "safetensors", "reading the text-encoder files", True),
    Requirement("requests", "requests", "downloading T5-XXL, CLIP-L/G and the tokenizers", True),
    Requirement("filelock", "filelock", "keeping two WebUIs from writing the same download (torch needs it too)", True),
    Requirement("pyyaml", "yaml", "MixDQ bit-width configs", True),
    Requirement("scipy", "scipy", "MixDQ calibration (the bit-width integer programme)", True),
)
"""torch, transformers, gradio, k-diffusion and numpy come with A1111 and are not listed: if they were
missing the WebUI would not start. open-clip-torch is not needed: A1111's SD3 code brings its own CLIP."""


def installed_here(name: str) -> bool:
    """Like A1111's ``launch.is_installed``: distribution metadata first, then an importable module."""
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a dotted or odd name
        return False


def missing(is_installed: Callable[[str], bool], requirements: Iterable[Requirement] = RUNTIME) -> list[Requirement]:
    """The requirements that neither their distribution nor their module can be found for."""
    return [r for r in requirements if not (is_installed(r.dist) or is_installed(r.module))]


_PEP440 = re.compile(
    r"^(\d+!)?\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[a-z0-9]+([._-][a-z0-9]+)*)?$", re.IGNORECASE
)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def freeze_constraints(installed: Iterable[tuple[str, str]]) -> str:
    """A pip constraints file that holds every installed distribution at its current version.

    ``installed`` is (name, version) pairs. Versions pip cannot parse (very old packages, VCS
    installs without a version) are left out rather than making pip fail on the whole file.
    """
    pins: dict[str, str] = {}
    for name, version in installed:
        if not name or not version or not _PEP440.match(version.strip()):
            continue
        pins.setdefault(_normalise(name), version.strip())  # first wins, like Python's own lookup
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def installed_distributions() -> list[tuple[str, str]]:
    """(name, version) of every distribution visible to this interpreter, in sys.path order."""
    found = []
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name:
            found.append((name, dist.version))
    return found


def pip_install_args(requirement: Requirement, constraints_path: str) -> str:
    """Arguments for ``launch.run_pip``: the bare name (no specifier) held to the constraints file."""
    return f'install {requirement.dist} -c "{constraints_path}"'


def manual_command(python: str, requirements: Iterable[Requirement]) -> str:
    return f'"{python}" -m pip install ' + " ".join(r.dist for r in requirements)
