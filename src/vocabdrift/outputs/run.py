"""The run folder: the contract between commands (docs/ARCHITECTURE.md, "The run folder").

This module owns the contract: the file names (the constants below; no other module spells them), the columns each
table must hold (`REQUIRED_COLUMNS`), the one writer (`Run.write_table`, `Run.write_json`, through `atomic`, whose
functions are re-exported here) and the one reader (`Run.read_contract`, which checks those columns; `Run.read_table`
with the columns a command needs; `Run.read_json`).

Every write is atomic: a file goes to a temporary name in the same folder and is renamed into place, and a new
run folder is built under a hidden temporary name and renamed only when the command succeeds. So a killed or
failed command never leaves something that looks complete.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import folder_mode, new_folder, write_bytes_atomic, write_lines_atomic, write_parquet_atomic  # noqa: F401
from ..errors import VocabdriftError

if TYPE_CHECKING:
    import pyarrow as pa

# ---- the contract: the files of a run folder, and the columns each table must hold ---------------------------
VOCAB = "vocab.parquet"
DRIFT = "drift.parquet"
NEIGHBORS = "neighbors.parquet"
COVERAGE = "coverage.parquet"
COVERAGE_DRIFT = "coverage_drift.parquet"
PROBE = "probe.parquet"
SAYMAP = "saymap.parquet"  # the whole vocabulary's say-ability, BASE and POST (`saymap`)
UNDERTRAINED = "undertrained.parquet"
SUMMARY = "summary.json"
MANIFEST = "manifest.json"
CASES = "cases.json"
CONFUSION = "confusion.json"
CONFUSION_ANSWERS = "confusion.jsonl"  # every answer `confusion` sampled, one JSON object a line
EVALUATE = "evaluate.parquet"  # every probe row of `evaluate` (BASE, POST, candidates)
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
REPORT_FILES = "report_files"
LAB_STATE = "lab.json"  # not a run folder's file: the lab folder's, which holds run folders (composites/lab.py)



def comparison_files(a: str, b: str) -> tuple[str, str, str]:
    """The files of `report --run RUN --compare RUN_B`, written into RUN beside its own report (which they never
    overwrite): (html, md, folder of the Markdown's plots), named for both runs."""
    import re

    stem = "compare_" + "_vs_".join(re.sub(r"[^\w.-]+", "-", x).strip("-.") or "run" for x in (a, b))
    return f"{stem}.html", f"{stem}.md", f"{stem}_files"


# The columns every reader may rely on; the writers write these and more (vocab.parquet also has piece and
# reachable, drift.parquet the embed and centred columns, probe.parquet template, rank and outcome...). Tables
# join on token_id. `Run.read_contract` checks these (the report reads through it), so a table from an
# incompatible version is one clear error.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    VOCAB: ("token_id", "text", "category", "is_special"),
    DRIFT: ("token_id", "lm_head_cos", "lm_head_l2", "lm_head_norm_base", "lm_head_norm_post", "embed_cos"),
    NEIGHBORS: ("token_id", "space", "model", "rank", "neighbor_id", "cos"),
    COVERAGE: ("token_id", "count"),
    COVERAGE_DRIFT: ("token_id", "count", "lm_head_cos"),
    PROBE: ("token_id", "model", "p_target", "sayable"),
    SAYMAP: ("token_id", "category", "post_sayable", "post_p"),
    EVALUATE: ("token_id", "model", "template", "p_target", "rank", "sayable", "group"),
    UNDERTRAINED: ("token_id", "embed_norm", "embed_norm_percentile", "verified"),
    # JSON lines, not a table: the keys every line holds ("foreign": script -> letters of it in the answer;
    # writers add "name" and "native")
    CONFUSION_ANSWERS: ("prompt", "language", "model", "sample", "text", "foreign"),
}

# The files that belong to diff's BASE/POST pair and that diff itself writes; every other file of a run folder
# (coverage joins, probe, cases, confusion, undertrained, the report) was computed on top of a pair and is removed
# when `diff` writes a different pair into the folder (`Run.set_pair`).
PAIR_FILES = (VOCAB, DRIFT, NEIGHBORS, SUMMARY, MANIFEST)
_DEPENDENT = (COVERAGE, COVERAGE_DRIFT, PROBE, SAYMAP, EVALUATE, UNDERTRAINED, CASES, CONFUSION, CONFUSION_ANSWERS,
              REPORT_HTML, REPORT_MD, REPORT_FILES)
_SUMMARY_KEY = "summary.json#"  # manifest["files"] also stamps each summary key a command wrote
_WEIGHTS = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt")

_PACKAGES = ("vocabdrift", "numpy", "torch", "safetensors", "tokenizers", "transformers", "gguf", "pyarrow")


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """A cheap, stable identity for an input: size plus sha256 of its first and last MiB (per file).

    Hashing a 30 GB checkpoint whole would cost more than the analysis; head and tail catch every
    realistic change (safetensors headers hold every tensor's offsets) at a fixed cost.
    """
    p = Path(path)
    if not p.exists():
        return {"path": str(path)}
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    size = 0
    for f in files:
        n = f.stat().st_size
        size += n
        h.update(f.name.encode() + n.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if n > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return {"path": str(p.resolve()), "bytes": size, "files": len(files), "quick_sha256": h.hexdigest()}


def model_identity(spec: str | os.PathLike) -> str:
    """What a model named on the command line *is*, cheaply: for a local folder or file, a digest of its weight
    files' names, sizes, modification times and first 64 KiB (safetensors and GGUF headers hold every tensor's
    shape and offset); for a hub id or a served name, the name itself ("name:...").

    A folder and the weights file inside it get the same identity, so `diff ./post` and `probe ./post/model.
    safetensors` are recognised as the same model; a copy or a retrained checkpoint is another one.
    """
    p = Path(os.path.expanduser(str(spec)))
    if not p.exists():
        return f"name:{spec}"
    files = sorted(x for x in p.iterdir() if x.suffix in _WEIGHTS and x.is_file()) if p.is_dir() else [p]
    if p.is_dir() and not files:  # a folder without weights at its top (a tokenizer folder, say): its files
        files = sorted(x for x in p.iterdir() if x.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
    return f"local:{h.hexdigest()[:24]}"


def pair_key(base_id: str, post_id: str) -> str:
    """One key for a BASE/POST pair (of `model_identity`s): every file of a run folder is stamped with it."""
    return hashlib.sha256(f"{base_id}\n{post_id}".encode()).hexdigest()[:24]


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


class Run:
    """A run folder, opened for reading and writing. Tables are Parquet, everything else JSON."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._written: list[str] = []  # files and summary keys written by this command; `record` stamps them

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # ---- tables -------------------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return (self.path / name).exists()

    def write_table(self, name: str, table: pa.Table) -> Path:
        """Write `name` (e.g. "drift.parquet") atomically."""
        out = self.path / name
        write_parquet_atomic(out, table)
        self._written.append(name)
        return out

    def read_contract(self, name: str) -> pa.Table:
        """Read `name`, checking it holds every column of the contract (`REQUIRED_COLUMNS`): what the report does."""
        return self.read_table(name, REQUIRED_COLUMNS.get(name, ()))

    # ---- json lines ---------------------------------------------------------------------------------------
    def write_jsonl(self, name: str, rows: list[dict[str, Any]]) -> Path:
        """Write `name` (e.g. "confusion.jsonl") atomically, one JSON object a line, checking the contract's keys."""
        need = REQUIRED_COLUMNS.get(name, ())
        for i, r in enumerate(rows):
            missing = [k for k in need if k not in r]
            if missing:
                raise ValueError(f"{name} row {i} lacks {', '.join(missing)}")
        out = self.path / name
        write_lines_atomic(out, (json.dumps(r, ensure_ascii=False, default=_json_default) for r in rows))
        self._written.append(name)
        return out

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        """Read `name`'s lines, checking each holds the contract's keys: one clear error for a damaged file."""
        p = self.path / name
        if not p.exists():
            raise VocabdriftError(f"{p}: not found; run the command that writes {name} into {self.path} first")
        need = REQUIRED_COLUMNS.get(name, ())
        rows = []
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise VocabdriftError(f"{p}:{i}: not JSON ({e}); delete it and rerun the command that wrote "
                                          "it") from e
                missing = [k for k in need if not isinstance(r, dict) or k not in r]
                if missing:
                    raise VocabdriftError(f"{p}:{i}: missing key(s) {', '.join(missing)}; it was written by an "
                                          "incompatible version — rerun the command that wrote it")
                rows.append(r)
        return rows

    def read_table(self, name: str, columns: tuple[str, ...] = ()) -> pa.Table:
        """Read `name`, checking it holds `columns` (the ones this reader needs): one clear error, not a KeyError."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = self.path / name
        if not p.exists():
            raise VocabdriftError(f"{p}: not found; run the command that writes {name} into {self.path} first")
        try:
            t = pq.read_table(p)
        except (pa.ArrowInvalid, OSError) as e:
            raise VocabdriftError(f"{p}: not a readable Parquet file ({e}); rerun the command that wrote it") from e
        missing = [c for c in columns if c not in t.column_names]
        if missing:
            raise VocabdriftError(f"{p}: missing column(s) {', '.join(missing)}; it was written by an incompatible "
                                  "version or changed — rerun the command that wrote it")
        _check_values(p, t)
        return t

    # ---- json ---------------------------------------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> Path:
        out = self.path / name
        write_bytes_atomic(out, (json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n").encode())
        if name not in (SUMMARY, MANIFEST):
            self._written.append(name)
        return out

    def read_json(self, name: str, default: Any = None) -> Any:
        p = self.path / name
        if not p.exists():
            if default is not None:
                return default
            raise VocabdriftError(f"{p}: not found; run the command that writes {name} into {self.path} first")
        try:
            return _load_json(p)
        except (ValueError, RecursionError) as e:
            raise VocabdriftError(f"{p}: not valid JSON ({e}); delete it and rerun the command") from e
        except OSError as e:
            raise VocabdriftError(f"{p}: cannot be read ({e.strerror or e}); rerun the command that wrote it") from e

    def manifest(self) -> dict[str, Any]:
        """manifest.json, checked: an object whose "commands" is a list, "files" an object of stamps, "pair" an
        object (each optional). A damaged manifest is one clear error, never a crash or a silent pass."""
        m = self.read_json(MANIFEST, default={"commands": []})
        p = self.path / MANIFEST
        if not isinstance(m, dict):
            raise VocabdriftError(f"{p}: holds a JSON {type(m).__name__}, not an object; the run folder's manifest is "
                                  "damaged — write a new run folder (-o NEW)")
        for key, kind in (("commands", list), ("files", dict), ("pair", dict)):
            if key in m and not isinstance(m[key], kind):
                want = "an object" if kind is dict else "a list"
                raise VocabdriftError(f"{p}: \"{key}\" is a {type(m[key]).__name__}, not {want}; the run folder's "
                                      "manifest is damaged — write a new run folder (-o NEW)")
        if any(not isinstance(v, dict) for v in (m.get("files") or {}).values()):
            raise VocabdriftError(f"{p}: a stamp under \"files\" is not an object; the run folder's manifest is "
                                  "damaged — write a new run folder (-o NEW)")
        return m

    def update_summary(self, **keys: Any) -> Path:
        """Merge top-level keys into summary.json: later commands add their keys beside diff's."""
        summary = self.read_json(SUMMARY, default={})
        summary.update(keys)
        self._written += [_SUMMARY_KEY + k for k in keys]
        return self.write_json(SUMMARY, summary)

    def wrote(self, *names: str) -> None:
        """Files written here other than through this object (the report's pages and plots): stamped by the next
        `record` like the rest, so a change of pair removes them and nothing else."""
        self._written += list(names)

    def record(self, command: str, *, arguments: dict[str, Any], inputs: dict[str, Any] | None = None,
               seed: int | None = None, timings: dict[str, float] | None = None) -> Path:
        """Append what made this run's files to manifest.json (command, arguments, versions, input fingerprints),
        and stamp each file (and summary key) this command wrote with what it was computed from: the folder's
        BASE/POST pair and the identity of the models named in `inputs` ("model", "base", "post")."""
        manifest = self.manifest()
        pair = manifest.get("pair") or {}
        models = {k: model_identity(v) for k, v in (inputs or {}).items()
                  if k in ("model", "base", "post") and isinstance(v, (str, os.PathLike))}
        fps = {k: fingerprint(v) if isinstance(v, (str, os.PathLike)) else v for k, v in (inputs or {}).items()}
        files = manifest.setdefault("files", {})
        for name in dict.fromkeys(self._written):
            files[name] = {"command": command, "pair": pair.get("key"), "models": models, "arguments": arguments,
                           "inputs": _digest(inputs or {})}
        self._written.clear()
        manifest.setdefault("commands", []).append({
            "command": command,
            "arguments": arguments,
            "inputs": fps,
            "seed": seed,
            "timings": timings or {},
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "packages": package_versions(),
        })
        return self.write_json(MANIFEST, manifest)


    # ---- provenance: every file of the folder belongs to one BASE/POST ----------------------------------------
    def pair(self) -> dict[str, str] | None:
        """The BASE/POST pair `diff` last wrote here ({"key", "base", "post"}: `model_identity`s), or None."""
        return self.manifest().get("pair")

    def holds(self, name: str, *, command: str, arguments: dict[str, Any],
              inputs: dict[str, Any] | None = None) -> bool:
        """Whether `name` is here, of the folder's current pair, written by `command` with these arguments (and,
        when given, from inputs with the same fingerprints): a rerun of a finished step, which says so instead
        of recomputing."""
        if not self.has(name):
            return False
        manifest = self.manifest()
        stamp = manifest.get("files", {}).get(name)
        if not isinstance(stamp, dict):
            return False
        key = (manifest.get("pair") or {}).get("key")
        return stamp.get("command") == command and stamp.get("pair") == key \
            and _plain(stamp.get("arguments")) == _plain(arguments) \
            and (inputs is None or stamp.get("inputs") == _digest(inputs))

    def set_pair(self, base: str | os.PathLike, post: str | os.PathLike) -> list[str]:
        """Make this folder `diff`'s for BASE/POST. When it held another pair's results, remove every file
        computed from them (coverage joins, probe, cases, confusion, undertrained, the report, and summary keys
        other commands wrote) and return their names, so nothing of the old pair is ever read with the new one.

        A folder written before files were stamped counts as another pair's when its last diff named other
        inputs (compared by `fingerprint`)."""
        ids = {"base": model_identity(base), "post": model_identity(post)}
        key = pair_key(ids["base"], ids["post"])
        manifest = self.manifest()
        old = manifest.get("pair")
        if old is not None:
            changed = old.get("key") != key
        else:
            diffs = [c for c in manifest.get("commands", []) if c.get("command") in ("diff", "repair")]
            last = diffs[-1].get("inputs", {}) if diffs else None
            changed = last is not None and any(  # only what that command recorded (repair: its BASE)
                isinstance(last.get(k), dict) and last[k].get("quick_sha256") != fingerprint(v).get("quick_sha256")
                for k, v in (("base", base), ("post", post)))
        removed: list[str] = []
        if changed:
            # only what vocabdrift wrote and stamped: a file of the user's own in the folder is never removed (a
            # folder an older version wrote, without stamps, loses the names its commands wrote)
            stamped = ([n for n in manifest["files"] if not n.startswith(_SUMMARY_KEY)]
                       if isinstance(manifest.get("files"), dict) else list(_DEPENDENT))
            for name in dict.fromkeys([*stamped, NEIGHBORS]):  # diff writes neighbours again: not worth a word
                if name in PAIR_FILES and name != NEIGHBORS or "/" in name or name.startswith("."):
                    continue
                p = self.path / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                    removed.append(name + "/")
                elif p.exists() or p.is_symlink():
                    p.unlink()
                    if name != NEIGHBORS:
                        removed.append(name)
            summary = self.read_json(SUMMARY, default={})
            gone = [k for k in summary if k in _NOT_DIFF_KEYS]
            if gone:
                self.write_json(SUMMARY, {k: v for k, v in summary.items() if k not in _NOT_DIFF_KEYS})
                removed += [f"summary.json[{k!r}]" for k in gone]
            manifest["files"] = {}
        manifest["pair"] = {"key": key, **ids}
        self.write_json(MANIFEST, manifest)
        return removed

    def disagreements(self) -> list[str]:
        """One sentence per file (or summary key) here that was computed from another BASE/POST than the
        folder's pair, or from a model that is neither: what the report refuses to put on one page."""
        manifest = self.manifest()
        pair = manifest.get("pair")
        if not pair:
            return []
        summary = self.read_json(SUMMARY, default={}) if self.has(SUMMARY) else {}
        out = []
        for name, st in manifest.get("files", {}).items():
            present = (name[len(_SUMMARY_KEY):] in summary) if name.startswith(_SUMMARY_KEY) else self.has(name)
            if not present or not isinstance(st, dict):
                continue
            shown = f"summary.json's {name[len(_SUMMARY_KEY):]!r}" if name.startswith(_SUMMARY_KEY) else name
            if st.get("pair") is not None and st["pair"] != pair["key"]:
                out.append(f"{shown} (written by `{st.get('command')}`) was computed from another BASE/POST pair")
                continue
            m = st.get("models") or {}
            local = {k: v for k, v in m.items() if str(v).startswith("local:")}
            wrong = [k for k, v in local.items()
                     if (k in ("base", "post") and "model" not in m and v != pair.get(k))
                     or (k == "base" and "model" in m and v != pair["base"])
                     or (k == "model" and ("base" in m and v != pair["post"] or v not in (pair["base"], pair["post"])))]
            if wrong:
                out.append(f"{shown} (written by `{st.get('command')}`) was computed from a model that is neither "
                           "this run's BASE nor its POST")
        return out


# summary keys written by commands other than diff: dropped with the other pair's files
_NOT_DIFF_KEYS = ("coverage", "probe", "saymap", "cases", "confusion", "undertrained", "check", "repair", "evaluate")


def _digest(inputs: dict[str, Any]) -> str:
    """One short digest of what a command read, kept in each file's stamp: each input path's `fingerprint` and
    its files' latest modification time (an edit in the middle of a file keeps size, head and tail)."""
    ids = {}
    for k, v in inputs.items():
        if isinstance(v, (str, os.PathLike)):
            p = Path(os.path.expanduser(str(v)))
            files = [x for x in p.rglob("*") if x.is_file()] if p.is_dir() else [p] if p.exists() else []
            v = {**fingerprint(p), "mtime": max((f.stat().st_mtime_ns for f in files), default=0)}
        ids[k] = v
    return hashlib.sha256(json.dumps(ids, sort_keys=True, default=_json_default).encode()).hexdigest()[:24]


def _plain(o: Any) -> Any:
    """Arguments as JSON would store them (tuples become lists), to compare a stamp with a new call."""
    return json.loads(json.dumps(o, default=_json_default, sort_keys=True))


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _check_values(p: Path, t: pa.Table) -> None:
    """A table read back is checked for what no writer of ours produces: ids that are not non-negative integers,
    cosines that are not numbers in [-1, 1] (NaN allowed: a destroyed row), flags that are not booleans. A file
    edited by hand or damaged is one clear error, never a silent pass of a gate."""
    import numpy as np
    import pyarrow.types as pt

    for c in t.column_names:
        col = t.column(c)
        kind = ("id" if c in ("token_id", "neighbor_id") else "cos" if c.endswith(("_cos", "_cos_centered"))
                or c == "cos" else "flag" if c in ("is_special", "reachable", "nonfinite", "sayable") else None)
        if kind is None:
            continue
        bad = None
        if kind == "id":
            if not pt.is_integer(col.type):
                bad = f"is {col.type}, not integers"
            elif len(col) and (v := np.asarray(col.to_numpy(zero_copy_only=False))).min() < (-1 if c == "neighbor_id"
                                                                                             else 0):
                bad = f"holds {int(v.min())}, not an id"
        elif kind == "cos":
            if not (pt.is_floating(col.type) or pt.is_integer(col.type)):
                bad = f"is {col.type}, not numbers"
            elif len(col):
                v = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
                out = np.abs(v) > 1.0 + 1e-3  # NaN compares False: a destroyed row stays readable
                if out.any():
                    i = int(np.flatnonzero(out)[0])
                    bad = f"holds {v[i]:g} (row {i}), outside [-1, 1]"
        elif not pt.is_boolean(col.type):
            bad = f"is {col.type}, not true/false"
        if bad is not None:
            raise VocabdriftError(f"{p}: column {c} {bad}; the file was changed or damaged — rerun the command that "
                                  "wrote it")


# ---- what vocabdrift made: the folders it writes into ---------------------------------------------------

_MAX_JSON_BYTES = 256 << 20  # a summary or manifest is kilobytes; past this it is not one of ours


def _load_json(p: Path) -> Any:
    """The one reader of a run folder's JSON: a regular file only (a pipe would block), at most _MAX_JSON_BYTES
    (a huge file is not ours). Raises ValueError for bad or oversized JSON, OSError for an unreadable file."""
    if not p.is_file():
        raise ValueError("not a regular file")
    with open(p, "rb") as f:
        raw = f.read(_MAX_JSON_BYTES + 1)
    if len(raw) > _MAX_JSON_BYTES:
        raise ValueError(f"larger than {_MAX_JSON_BYTES >> 20} MiB")
    return json.loads(raw)


def _json_object(p: Path) -> dict | None:
    """`_load_json` of an object, or None (missing, unreadable, not JSON, not an object): for telling folders
    apart, where nothing is an error."""
    try:
        got = _load_json(p)
    except (OSError, ValueError, RecursionError):
        return None
    return got if isinstance(got, dict) else None


def is_run_folder(d: Path) -> bool:
    """A folder vocabdrift made: it carries vocabdrift's manifest.json (a JSON object with its "commands")."""
    m = _json_object(d / MANIFEST)
    return m is not None and isinstance(m.get("commands"), list)


def is_lab_folder(d: Path) -> bool:
    """A folder `vocabdrift lab` made: it carries lab.json (the recipe and the finished stages)."""
    m = _json_object(d / LAB_STATE)
    return m is not None and isinstance(m.get("stages"), dict)


def ours(d: Path, *, lab: bool = False) -> bool:
    """Whether vocabdrift may write into the existing folder `d`: it is empty, or vocabdrift made it (a run
    folder; with `lab`, a lab folder). A user's project, `/` or $HOME is none of these."""
    try:
        empty = not any(d.iterdir())
    except OSError:
        return False
    return empty or (is_lab_folder(d) if lab else is_run_folder(d))


def refuse_foreign(out: str | os.PathLike | None, *models: str | os.PathLike | None) -> None:
    """Refuse, before any work, a command of a model that is neither BASE nor POST of the run folder it would
    write into: its results would sit beside the pair's, and `report` and `check --run` would refuse the folder
    afterwards. A folder without a pair (new, or vocab's alone) takes any model."""
    if out is None or not Path(out).is_dir():
        return
    pair = Run(out).manifest().get("pair")
    if not isinstance(pair, dict) or "base" not in pair or "post" not in pair:
        return
    for m in models:
        ident = None if m is None else model_identity(m)
        if ident is None or not ident.startswith("local:") or ident in (pair["base"], pair["post"]):
            continue  # a hub id or a served name is taken at its word, as `disagreements` does
        raise VocabdriftError(f"{out}: holds the results of BASE {_shown(pair['base'])} and POST "
                              f"{_shown(pair['post'])}; {m} is neither — write its results to another folder "
                              "(-o NEW)")


def _shown(identity: str) -> str:
    return identity.split(":", 1)[-1][:16] if identity.startswith("local:") else identity.split(":", 1)[-1]


def existing_run(run: str | os.PathLike) -> Path:
    """`--run RUN`: a run folder that must exist already (one line naming the fix otherwise)."""
    p = Path(run)
    if not p.is_dir():
        what = "is not a folder" if p.exists() else "no such run folder"
        raise VocabdriftError(f"--run {p}: {what}; create it with `vocabdrift diff BASE POST -o {p}` (or give -o "
                              "to create a new run folder)")
    if not is_run_folder(p):
        raise VocabdriftError(f"--run {p}: not a vocabdrift run folder (no manifest.json of vocabdrift's); give the "
                              f"folder `vocabdrift diff BASE POST -o RUN` made")
    return p


def run_target(out: str | os.PathLike | None, run: str | os.PathLike | None, *, required: bool = True
               ) -> Path | None:
    """Where a command writes: `-o/--out OUT` (created when missing) or `--run RUN` (an existing run folder the
    results are added to); the one way every command names a run folder (docs/ARCHITECTURE.md, "The run
    folder"). Both at once must name the same folder."""
    if run is not None:
        r = existing_run(run)
        if out is not None and Path(out).resolve() != r.resolve():
            raise VocabdriftError(f"-o {out} and --run {run} name two folders; give one (--run adds to an "
                                  "existing run folder, -o creates one)")
        return r
    if out is None and required:
        raise VocabdriftError("say where to write: -o RUN (a new or existing run folder) or --run RUN (an "
                              "existing one)")
    return Path(out) if out is not None else None


@contextlib.contextmanager
def open_run(path: str | os.PathLike, *, create: bool = True) -> Iterator[Run]:
    """Open RUN for a command. A new folder is built under a hidden name and renamed into place on success,
    so a failed command leaves nothing; an existing folder gets new files, each written atomically.

    Example:
        >>> with open_run("runs/a") as run:
        ...     run.write_json("summary.json", {})
    """
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise VocabdriftError(f"{final}: exists and is not a folder; pick another -o")
    if final.exists():
        if create and not ours(final):  # a writer: only into a folder vocabdrift made (or an empty one)
            raise VocabdriftError(f"{final}: exists, is not empty and is not a vocabdrift run folder (no manifest.json "
                                  "of vocabdrift's); vocabdrift writes only into folders it made — pick a new folder")
        yield Run(final)
        return
    if not create:
        raise VocabdriftError(f"{final}: no such run folder; create it with `vocabdrift diff` or another command")
    with new_folder(final) as tmp:
        run = Run(tmp)
        run.write_json(MANIFEST, {"commands": []})  # from its first moment, a folder vocabdrift made says so
        yield run


class Timer:
    """Collects stage timings for the manifest: `with t("read"): ...`."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - t0, 4)
