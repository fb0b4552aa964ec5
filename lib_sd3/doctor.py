"""``python -m lib_sd3 doctor --webui PATH``: what an A1111 checkout needs for SD3, read without starting it.

Starting A1111 to find out why SD3 fails takes minutes and needs its venv; most failures users
hit (no SD3 in that A1111, a truncated 10 GB T5 file, tokenizers never cached, an IC-Light that
asserts Forge) are visible in the files. So the doctor reads source and files only: it never
imports A1111, never touches the network, and hashes the multi-GB files only when asked.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lib_sd3 import iclight, sd3_state, targets
from lib_sd3.fetch import known_files
from lib_sd3.fetch.cache import cached_snapshot, hub_cache_dir
from lib_sd3.hashing import sha256_file
from lib_sd3.models import families
from lib_sd3.safetensors_file import read_header
from lib_sd3.t5.file_check import FOLDERS, XXL_CONFIG, check_t5_file, encoder_layout, known_row, safetensors_files

OK, INFO, WARN, FAIL = "OK", "INFO", "WARN", "FAIL"

T5_FILES = (known_files.T5_FP16, known_files.T5_FP8)
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class NotA1111Error(ValueError):
    """The path given is not an A1111 checkout."""


@dataclasses.dataclass(frozen=True)
class Check:
    section: str
    item: str
    status: str  # OK / INFO / WARN / FAIL; FAIL means SD3 cannot work as things are
    detail: str


# --- the A1111 checkout and its SD3 state -------------------------------------------------------

def require_a1111(root: Path) -> None:
    if not root.is_dir():
        raise NotA1111Error(f"{root} is not a folder")
    if not (root / "launch.py").is_file() or not (root / "modules" / "processing.py").is_file():
        raise NotA1111Error(f"{root} is not an AUTOMATIC1111 checkout (no launch.py and modules/processing.py)")


def class_members(source: str, class_name: str) -> set[str] | None:
    """Names defined in the body of top-level ``class_name`` (methods and attributes), or None."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            names = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
                elif isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
            return names
    return None


SD3_COND_FILES = ("modules/models/sd3/sd3_cond.py", "modules/models/sd3/sd3_model.py")  # dev, then early


def sd3_state_of(root: Path) -> tuple[str, str]:
    """(state, where SD3Cond was found) from the source, with the same rule the running WebUI uses."""
    for relative in SD3_COND_FILES:
        path = root / relative
        if not path.is_file():
            continue
        try:
            members = class_members(path.read_text(encoding="utf-8", errors="replace"), "SD3Cond")
        except SyntaxError as error:
            return sd3_state.STATE_NONE, f"{relative} does not parse: {error.msg} (line {error.lineno})"
        except OSError as error:
            return sd3_state.STATE_NONE, f"{relative} cannot be read: {error.strerror or error}"
        if members is not None:
            return sd3_state.classify(members), relative
    return sd3_state.STATE_NONE, "no SD3Cond in modules/models/sd3/"


def check_state(root: Path) -> Check:
    state, where = sd3_state_of(root)
    if state == sd3_state.STATE_DEV:
        return Check("A1111", "SD3 support", OK, f"v1.10 / dev (SD3Cond.get_token_count in {where})")
    if state == sd3_state.STATE_EARLY:
        return Check("A1111", "SD3 support", OK, f"early SD3 branch (SD3Cond in {where}, no get_token_count)")
    return Check("A1111", "SD3 support", FAIL, f"none ({where}): update A1111 to v1.10 or later")


# --- text-encoder files in models/CLIP ----------------------------------------------------------

def safetensors_extent(path: Path) -> int:
    """The file length the safetensors header promises (8 + header + tensor data), in bytes.

    Raises ValueError when the start of the file is not a safetensors header (an HTML error page
    saved under the right name, a zero-filled pre-allocation, a different format).
    """
    return read_header(path).extent


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size:,} bytes"


def check_text_encoder(clip_dir: Path, known: known_files.KnownFile, verify_hash: bool,
                       t5_layout: Mapping[str, tuple[int, ...]] | None = None) -> Check:
    """One file in models/CLIP. T5 files are judged by :func:`lib_sd3.t5.file_check.check_t5_file`, the
    rule the WebUI uses (``t5_layout``: the encoder A1111 builds; T5-XXL's by default)."""
    path = clip_dir / known.filename
    if known.filename in T5_FILES and path.is_file():
        t5 = check_t5_file(path, known, encoder_layout(XXL_CONFIG) if t5_layout is None else t5_layout)
        if t5.state == "unusable":
            return Check("text encoders", known.filename, FAIL,
                         f"{t5.detail}: SD3 runs without T5 while it is there (it is never overwritten); "
                         "move or delete it so the published file is fetched")
        if t5.state == "own":
            return Check("text encoders", known.filename, OK, t5.detail)
    if not path.is_file():
        why = ("SD3 runs without T5 (CLIP only); the extension can fetch it" if known.filename.startswith("t5xxl")
               else "A1111 downloads it when an SD3 model loads (needs the network)")
        return Check("text encoders", known.filename, INFO, f"missing: {why}")
    try:
        size = path.stat().st_size
        extent = safetensors_extent(path)
    except ValueError as error:
        return Check("text encoders", known.filename, FAIL, f"corrupt: {error}; delete it so it is fetched again")
    except OSError as error:  # A1111 could not read it either
        return Check("text encoders", known.filename, FAIL, f"cannot be read: {error.strerror or error}")
    if extent > size:
        return Check("text encoders", known.filename, FAIL,
                     f"truncated: {size:,} of {extent:,} bytes; delete it so it is fetched again")
    if extent < size:
        return Check("text encoders", known.filename, FAIL,
                     f"corrupt: {size - extent:,} bytes beyond the tensor data; delete it so it is fetched again")
    if size != known.size:
        return Check("text encoders", known.filename, WARN,
                     f"{_gb(size)}, not the published file ({known.size:,} bytes): loads, but is not verified")
    if not verify_hash:
        return Check("text encoders", known.filename, OK, f"{_gb(size)}, size matches (--hash to verify sha256)")
    try:
        digest = sha256_file(path)
    except OSError as error:
        return Check("text encoders", known.filename, FAIL, f"cannot be read: {error.strerror or error}")
    if digest == known.sha256:
        return Check("text encoders", known.filename, OK, f"{_gb(size)}, sha256 matches")
    if known.confirmed:
        return Check("text encoders", known.filename, FAIL,
                     f"corrupt: sha256 {digest[:12]}... is not the published {known.sha256[:12]}...; delete it")
    return Check("text encoders", known.filename, WARN,
                 f"sha256 {digest[:12]}... differs from {known.sha256[:12]}..., which is unconfirmed: "
                 "compare with the LFS sha256 on the file's Hugging Face page")


def check_other_t5_files(models: Path, t5_layout: Mapping[str, tuple[int, ...]] | None = None) -> list[Check]:
    """T5 files under other names (ComfyUI's ``t5xxl_fp8_e4m3fn_scaled``, ``google_t5-v1_1-xxl_...``) in
    models/CLIP and models/text_encoder: the WebUI uses any of them that the header check accepts.
    Other models beside them (CLIP-L/G) are not listed."""
    layout = encoder_layout(XXL_CONFIG) if t5_layout is None else t5_layout
    rows = [known_files.sources(name)[0] for name in T5_FILES]
    checks = []
    for folder in FOLDERS:
        for path in safetensors_files(models / folder):
            key = path.relative_to(models).as_posix()
            if folder == "CLIP" and path.parent == models / folder and path.name in known_files.TEXT_ENCODER_FILES:
                continue  # checked above under its own name
            t5 = check_t5_file(path, known_row(path, rows), layout)
            if t5.usable:
                checks.append(Check("text encoders", key, OK, f"{t5.detail}; the WebUI may pick it for T5"))
            elif not t5.foreign:
                checks.append(Check("text encoders", key, WARN, f"{t5.detail}: not used for T5"))
    return checks


# --- tokenizer caches ---------------------------------------------------------------------------

def _subfolders(folder: Path) -> list[Path]:
    """Sorted sub-folders; none when ``folder`` is missing or unreadable (the doctor reports, never crashes)."""
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return []


def check_tokenizers(env: Mapping[str, str], home: Path) -> list[Check]:
    cache = hub_cache_dir(env, home)
    offline = any(env.get(var, "").strip().lower() in ("1", "true", "yes", "on") for var in OFFLINE_VARS)
    checks = []
    for repo, needed in known_files.TOKENIZER_ESSENTIALS.items():
        snapshot = cached_snapshot(cache, repo, needed)
        if snapshot.complete:
            checks.append(Check("tokenizers", repo, OK, f"cached in {cache} (snapshot {snapshot.commit[:12]})"))
            continue
        what = f"incomplete in {cache} (needs {', '.join(needed)})" if snapshot.path else f"not cached in {cache}"
        if offline:
            checks.append(Check("tokenizers", repo, FAIL, f"{what}; offline mode is on, so SD3 cannot load"))
        else:
            checks.append(Check("tokenizers", repo, WARN, f"{what}: downloaded when an SD3 model loads"))
    return checks


# --- IC-Light -----------------------------------------------------------------------------------

ICLIGHT_OLD, ICLIGHT_NEW, ICLIGHT_UNKNOWN = "old", "new", "unknown"


def _mentions(node: ast.AST, word: str) -> bool:
    return any((isinstance(n, ast.Name) and n.id == word) or (isinstance(n, ast.Attribute) and n.attr == word)
               for n in ast.walk(node))


def iclight_shape(source: str) -> str | None:
    """How a script's ``process_before_every_sampling`` treats A1111, or None if it has none.

    old: it asserts the Forge backend, so every A1111 generation logs an AssertionError;
    new: it applies IC-Light there (returning early or going through the model patcher on A1111).
    """
    shape = None
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "process_before_every_sampling":
            if any(isinstance(n, ast.Assert) and _mentions(n, "Forge") for n in ast.walk(node)):
                return ICLIGHT_OLD
            shape = ICLIGHT_NEW if _mentions(node, "apply_ic_light") else (shape or ICLIGHT_UNKNOWN)
    return shape


def disabled_extensions(root: Path) -> tuple[set[str], bool]:
    """(names disabled in config.json, all extensions disabled?); unreadable config counts as none."""
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set(), False
    if not isinstance(config, dict):
        return set(), False
    names = config.get("disabled_extensions") or []
    return {str(n) for n in names if isinstance(n, str)}, config.get("disable_all_extensions", "none") != "none"


def _is_iclight(extension: Path) -> bool:
    scripts = extension / "scripts"
    return (any((extension / p).is_dir() for p in iclight.PACKAGES)
            or scripts.is_dir() and any("ic_light" in p.name or "iclight" in p.name for p in scripts.glob("*.py")))


def check_iclight(root: Path) -> list[Check]:
    folders = _subfolders(root / "extensions")
    disabled, all_disabled = disabled_extensions(root)
    patcher = [p for p in folders if (p / iclight.MODEL_PATCHER_PACKAGE).is_dir()]
    checks = []
    for folder in filter(_is_iclight, folders):
        shape = None
        for script in sorted((folder / "scripts").glob("*.py")):
            try:
                shape = iclight_shape(script.read_text(encoding="utf-8", errors="replace")) or shape
            except (SyntaxError, OSError):
                continue
            if shape == ICLIGHT_OLD:
                break
        state = " (disabled in config.json)" if folder.name in disabled or all_disabled else ""
        if shape == ICLIGHT_OLD:
            checks.append(Check("IC-Light", folder.name, WARN,
                                "old version: process_before_every_sampling asserts Forge, an AssertionError on "
                                f"every A1111 generation; the SD3 shim catches it, updating IC-Light fixes it{state}"))
        elif shape == ICLIGHT_NEW:
            checks.append(Check("IC-Light", folder.name, OK,
                                f"new version: process_before_every_sampling applies IC-Light{state}"))
        else:
            checks.append(Check("IC-Light", folder.name, INFO, f"installed; version shape not recognised{state}"))
    if not checks:
        return [Check("IC-Light", "IC-Light", INFO, "not installed")]
    if patcher:
        checks.append(Check("IC-Light", "sd-webui-model-patcher", OK, f"installed ({patcher[0].name})"))
    else:
        checks.append(Check("IC-Light", "sd-webui-model-patcher", WARN,
                            "not installed: IC-Light's A1111 backend needs it"))
    return checks


# --- patch targets ------------------------------------------------------------------------------

def check_targets(root: Path) -> list[Check]:
    checks = []
    for target in targets.TARGETS:
        found = targets.locate(root, target)
        if found:
            checks.append(Check("patch targets", target.patch, OK, f"{target.what}: {found}"))
        else:
            checks.append(Check("patch targets", target.patch, WARN,
                                f"{target.what}: not found in {' or '.join(target.files)}; this feature stays off"))
    return checks


# --- checkpoints in models/Stable-diffusion -------------------------------------------------------

def check_checkpoints(checkpoint_dir: Path) -> list[Check]:
    """Which SD3 family each ``.safetensors`` checkpoint is, from its header alone (no tensor is read).

    A broken SD3-shaped file is a WARN, not a FAIL: the other checkpoints still work.
    """
    if not checkpoint_dir.is_dir():
        return []
    checks = []
    for path in sorted(checkpoint_dir.rglob("*.safetensors")):
        name = str(path.relative_to(checkpoint_dir))
        try:
            family = families.detect_file(path)
        except families.CheckpointError as error:
            checks.append(Check("checkpoints", name, WARN, str(error)))
            continue
        except OSError as error:
            checks.append(Check("checkpoints", name, WARN, f"cannot be read: {error.strerror or error}"))
            continue
        if family is None:
            continue
        config = family.config
        detail = (f"{family.label}: depth {config.depth}, qk-norm {config.qk_norm or 'none'}, MMDiT-X layers "
                  f"{list(config.x_block_self_attn_layers) or 'none'}, position grid {config.pos_embed_max_size}")
        if family.turbo_from:
            detail += f" (Turbo from its {family.turbo_from})"
        if family.needs_our_mmdit:
            detail += "; A1111 alone cannot run it, sd-webui-sd3 builds its MMDiT"
        checks.append(Check("checkpoints", name, OK, detail))
    return checks


# --- the whole report ---------------------------------------------------------------------------

def diagnose(root: Path, models_dir: Path | None = None, verify_hash: bool = False,
             env: Mapping[str, str] | None = None, home: Path | None = None) -> list[Check]:
    """Every check on the checkout at ``root``; raises NotA1111Error for anything else."""
    root = Path(root)
    require_a1111(root)
    models = Path(models_dir) if models_dir else root / "models"
    clip_dir = models / "CLIP"
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    checks = [check_state(root)]
    checks += [check_text_encoder(clip_dir, known_files.sources(name)[0], verify_hash)
               for name in known_files.TEXT_ENCODER_FILES]
    checks += check_other_t5_files(models)
    checks += check_tokenizers(env, home)
    checks += check_iclight(root)
    checks += check_targets(root)
    checks += check_checkpoints(models / "Stable-diffusion")
    return checks


def sd3_can_work(checks: Iterable[Check]) -> bool:
    return not any(c.status == FAIL for c in checks)


def format_table(checks: list[Check]) -> str:
    rows = [("section", "item", "status", "detail")] + [(c.section, c.item, c.status, c.detail) for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len("detail"))
    return "\n".join(line.rstrip() for line in lines)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "doctor", help="check an A1111 checkout for SD3 without starting it",
        description="Check an A1111 checkout for SD3 without starting it: SD3 state, text-encoder files, tokenizer "
                    "caches, IC-Light, patch targets, the SD3 family of each checkpoint. Exit status 0: SD3 can work; 1: it cannot (FAIL rows); "
                    "2: not an A1111 checkout.")
    parser.add_argument("--webui", required=True, type=Path, help="the stable-diffusion-webui folder")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="A1111's --models-dir, if you start it with one (default: WEBUI/models)")
    parser.add_argument("--hash", action="store_true", help="verify the sha256 of the text-encoder files (slow: GBs)")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON instead of a table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """0: SD3 can work; 1: it cannot (see the FAIL rows); 2: the path is not an A1111 checkout."""
    try:
        checks = diagnose(args.webui, args.models_dir, args.hash)
    except NotA1111Error as error:
        print(f"doctor: error: {error}", file=sys.stderr)
        return 2
    ok = sd3_can_work(checks)
    if args.json:
        print(json.dumps({"sd3_can_work": ok, "checks": [dataclasses.asdict(c) for c in checks]}, indent=2))
    else:
        print(format_table(checks))
        print(f"\nSD3 can work: {'yes' if ok else 'no (see the FAIL rows)'}")
    return 0 if ok else 1
