"""The studio's workspace: one folder, and no request reads or writes outside it.

Every path a request names (a dataset, a run, a model folder, a report file) goes through
``Workspace.path``: it is taken relative to the workspace, resolved with symlinks followed,
and refused with ``OutsideWorkspace`` (HTTP 403) unless the result is still inside. Model
specs and dataset specs are checked the same way, including the files a
``dataset_info.json`` entry points at and the base model a run folder names.

Listing (runs, models, datasets, recipes) walks a few levels down, skipping hidden folders
and checkpoints, so a large workspace stays quick to scan.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from tunelab.errors import TunelabError

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".xlsx", ".parquet", ".txt")
SKIP_DIRS = {"checkpoints", "__pycache__", "node_modules", "studio", "tb", "mlruns", "wandb"}
MAX_DEPTH = 4
STUDIO_DIR = "studio"
"""Sub-folder of a run (or compare) folder holding the studio's job record, recipe and log."""


class OutsideWorkspace(TunelabError):
    """A path that resolves outside the workspace (or is not a plain path at all)."""


class Workspace:
    """Paths relative to ``root``; nothing outside it is ever returned."""

    def __init__(self, root: str | os.PathLike):
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise TunelabError(f"--workspace: {root_path} is not a folder")
        self.root = root_path.resolve()

    # ---------------------------------------------------------------- the guard

    def path(self, value: str | os.PathLike, field: str = "path", must_exist: bool = False) -> Path:
        """``value`` resolved inside the workspace, or ``OutsideWorkspace``."""
        text = str(value).strip()
        if not text or "\x00" in text:
            raise OutsideWorkspace(f"{field}: {text!r} is not a path")
        candidate = Path(text).expanduser()
        if not candidate.is_absolute():
            candidate = self.root / candidate
        resolved = candidate.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise OutsideWorkspace(f"{field}: {text} is outside the workspace {self.root}")
        if must_exist and not resolved.exists():
            raise TunelabError(f"{field}: {text} does not exist in the workspace")
        return resolved

    def rel(self, path: str | os.PathLike) -> str:
        """``path`` relative to the workspace, with forward slashes ("." for the root)."""
        resolved = Path(path).resolve()
        try:
            return resolved.relative_to(self.root).as_posix() or "."
        except ValueError:
            raise OutsideWorkspace(f"{path} is outside the workspace {self.root}") from None

    def model_spec(self, spec: str, field: str = "model.name") -> str:
        """A model spec the studio may load: ``builtin:NAME`` or a path inside the workspace.

        For a run folder the base model its ``config.yaml`` names is checked too, so a run
        cannot pull weights from outside. Returns the spec as the library takes it.
        """
        spec = str(spec or "").strip()
        if not spec:
            raise TunelabError(f"{field}: give a model (builtin:NAME, a folder, a .gguf file or a run)")
        if spec.startswith("builtin:"):
            return spec
        path = self.path(spec, field, must_exist=True)
        config = path / "config.yaml"
        if config.is_file():
            import yaml

            try:
                model = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("model") or {}
                base, tower = model.get("name"), (model.get("vision") or {}).get("tower")
            except (yaml.YAMLError, AttributeError):
                base = tower = None
            if base and Path(str(base)).resolve() != path:
                self.model_spec(str(base), f"{field} (base of {self.rel(path)})")
            if tower and not str(tower).startswith("builtin:"):
                self.path(tower, f"{field} (vision tower of {self.rel(path)})")
        return str(path)

    def dataset_files(self, spec: str, dataset_dir: str | None, field: str = "data.train") -> list[Path]:
        """The files ``spec`` reads (a path, or a registered name), each checked inside the workspace."""
        from tunelab.data.registry import resolve

        folder = str(self.path(dataset_dir, "data.dataset_dir", must_exist=True)) if dataset_dir else None
        candidate = Path(str(spec).strip()).expanduser()
        looks_like_path = ("/" in str(spec) or "\\" in str(spec) or candidate.suffix.lower() in DATA_SUFFIXES
                           or candidate.is_absolute())
        if looks_like_path or folder is None:
            path = self.path(spec, field)
            if not path.exists() and folder is not None:
                path = self.path(Path(folder) / spec, field)
            spec = str(path)
        entry = resolve(spec, folder)
        return [self.path(f, f"{field}: {entry.name}") for f in entry.files]

    # ---------------------------------------------------------------- listing

    def walk(self, max_depth: int = MAX_DEPTH) -> Iterator[Path]:
        """Folders under the root, breadth first, skipping hidden and bulky ones."""
        level = [self.root]
        for _ in range(max_depth + 1):
            nxt = []
            for folder in level:
                yield folder
                try:
                    children = sorted(folder.iterdir())
                except OSError:
                    continue
                if (folder / "report.json").is_file():
                    continue  # an evaluation report: per-model prediction folders, no inputs
                nxt += [c for c in children if c.is_dir() and not c.is_symlink()
                        and not c.name.startswith(".") and c.name not in SKIP_DIRS]
            level = nxt

    def files(self, suffixes: tuple[str, ...], max_depth: int = MAX_DEPTH) -> list[str]:
        """Workspace-relative files with one of ``suffixes`` (hidden folders skipped)."""
        found = []
        for folder in self.walk(max_depth):
            try:
                entries = sorted(folder.iterdir())
            except OSError:
                continue
            found += [self.rel(p) for p in entries if p.is_file() and p.suffix.lower() in suffixes
                      and not p.name.startswith(".")]
        return found

    def run_folders(self) -> list[Path]:
        """Every training run: folders with a metrics log, a saved run or a studio job record."""
        from tunelab.train.runfolder import holds_run

        runs = []
        for folder in self.walk():
            if folder == self.root or (folder / STUDIO_DIR / "compare.json").is_file():
                continue
            if (folder / STUDIO_DIR / "job.json").is_file() or (
                    holds_run(folder) and ((folder / "metrics.jsonl").is_file() or (folder / "config.yaml").is_file())):
                runs.append(folder)
        return runs

    def model_folders(self) -> list[str]:
        """Local models: HF folders (config.json) and .gguf files; finished runs are listed as runs."""
        found = []
        for folder in self.walk():
            if (folder / "config.json").is_file() and not (folder / "config.yaml").is_file():
                found.append(self.rel(folder))
        return found + self.files((".gguf",))

    def recipes(self) -> list[str]:
        """YAML files that look like tunelab recipes (a model/data/train section)."""
        import yaml

        out = []
        for rel in self.files((".yaml", ".yml"), max_depth=3):
            try:
                head = yaml.safe_load((self.root / rel).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                continue
            if isinstance(head, dict) and {"model", "data", "train"} & set(head):
                out.append(rel)
        return out
