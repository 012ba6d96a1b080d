"""Probes as data: the prompt families that ask a model to say one token, the outcome categories, and the reading
of answers to user-written cases.

As in cohere-ai/magikarp's fishing.py, a prompt is built around a placeholder: the template text is rendered (with
the model's chat template when it has one) with a private-use marker where the word goes, split at the marker, and
the two halves are encoded; the tested token's id is then put between them. The tested token never goes through
text, so a token that does not round-trip (a partial UTF-8 byte, a merge that encoding never produces) is probed
exactly as the model stores it. Everything after the token is the same for every token, so an engine can share the
prefix and batch the rest.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..errors import VocabdriftError

if TYPE_CHECKING:
    import pyarrow as pa
    from transformers import PreTrainedTokenizerBase

MARKER = "\ue000"  # private-use: no tokenizer merges it with its neighbours into anything we keep
TOP_P = 0.95
VERIFY_P = 0.01  # magikarp: a token is verified under-trained when its best probability stays below this


# ---- what an engine answers (owned here, below the engines, which import it) -----------------------------------

@dataclass(frozen=True)
class Score:
    """How a model rates one target token as the next token.

    Attributes:
        logprob: natural-log probability of the target.
        rank: 1 when the target is the most likely token; 1 + the number of tokens more likely than it.
        in_top_p: top-p sampling at `top_p` keeps the target (the tokens strictly more likely than it hold less
            than `top_p` of the mass; the most likely token is always kept, so top_p=0 is greedy).
        top_p: the nucleus used for `in_top_p`.
        mass_above: the probability mass of the tokens strictly more likely than the target (NaN when the engine
            does not say): how far the target is from the top-p cut, which lets a fast, rounded pass settle the
            verdicts it is sure of (`analyses.saymap.screen`).
    """

    logprob: float
    rank: int
    in_top_p: bool
    top_p: float = TOP_P
    mass_above: float = float("nan")

    @property
    def p(self) -> float:
        import math

        return math.exp(self.logprob)


# ---- prompt families ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Template:
    """One way of asking for a token.

    Attributes:
        name: short id stored in probe.parquet's `template` column.
        language: the language of the instruction (en, zh, ja...).
        style: "chat" (wrapped in the model's chat template) or "fewshot" (plain text, for base models).
        text: the user message (chat) or the whole prompt (fewshot), with `{word}` where the token goes.
        prefill: text the answer starts with (chat only), so the token is the next thing said.
    """

    name: str
    language: str
    style: Literal["chat", "fewshot"]
    text: str
    prefill: str = ""


_SHOTS = (("cat", "cat"), ("東京", "東京"), ("привет", "привет"), ("42", "42"), ("きちんと", "きちんと"))
_FEWSHOT_EN = "Repeat each word exactly.\n" + "".join(f"Input: «{a}»\nOutput: «{b}»\n" for a, b in _SHOTS) + \
    "Input: «{word}»\nOutput: «"
_FEWSHOT_ZH = "原样重复每个词。\n" + "".join(f"输入：«{a}»\n输出：«{b}»\n" for a, b in _SHOTS) + \
    "输入：«{word}»\n输出：«"

# The word follows a newline or a quote mark, never a space: byte-level BPE would otherwise read the space as a
# token of its own before the word, a prompt no model has seen (" hello" is one token in running text).
TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("repeat_en", "en", "chat", "Repeat this word three times:\n{word}"),
    Template("exact_en", "en", "chat", "Repeat this word exactly:\n{word}"),
    Template("quoted_en", "en", "chat", "Repeat the word between « and » exactly, with the marks: «{word}»", "«"),
    Template("repeat_zh", "zh", "chat", "请把这个词重复三遍：\n{word}"),
    Template("repeat_ja", "ja", "chat", "この単語を3回繰り返してください：\n{word}"),
    Template("fewshot_en", "en", "fewshot", _FEWSHOT_EN),
    Template("fewshot_zh", "zh", "fewshot", _FEWSHOT_ZH),
)}
CHAT_DEFAULT = ("repeat_en", "quoted_en", "repeat_zh", "repeat_ja")
FEWSHOT_DEFAULT = ("fewshot_en", "fewshot_zh")


def has_chat_template(tok: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tok, "chat_template", None))


def default_templates(tok: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The chat families for a model with a chat template, the few-shot ones for a base model without."""
    return CHAT_DEFAULT if has_chat_template(tok) else FEWSHOT_DEFAULT


def resolve_templates(names: Iterable[str] | None, tok: PreTrainedTokenizerBase) -> list[Template]:
    """Template objects for `names` (default: by the model's kind). A chat family on a model without a chat
    template is an error: its prompt would be nothing the model was trained on."""
    names = list(names) if names else list(default_templates(tok))
    out = []
    for n in names:
        if n not in TEMPLATES:
            raise VocabdriftError(f"unknown probe template {n!r}; choose from {', '.join(TEMPLATES)}")
        t = TEMPLATES[n]
        if t.style == "chat" and not has_chat_template(tok):
            raise VocabdriftError(f"template {n!r} needs a chat template and this model has none; use "
                                  f"{' or '.join(FEWSHOT_DEFAULT)} (the default for base models)")
        out.append(t)
    return out


@dataclass(frozen=True)
class PromptIds:
    """A template encoded around its placeholder: the probe of token t is `before + [t] + after`."""

    template: str
    before: tuple[int, ...]
    after: tuple[int, ...]

    def with_token(self, token_id: int) -> list[int]:
        return [*self.before, int(token_id), *self.after]


def encode_template(t: Template, tok: PreTrainedTokenizerBase) -> PromptIds:
    """Render `t` with a marker where the word goes, split there and encode the halves (placeholder, then ids)."""
    body = t.text.replace("{word}", MARKER)
    if t.style == "chat":
        text = tok.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True,
                                       tokenize=False) + t.prefill
        add_special = False  # the chat template writes its own BOS, if any
    else:
        text, add_special = body, True
    if text.count(MARKER) != 1:
        raise VocabdriftError(f"template {t.name!r}: the chat template changed the placeholder (found "
                              f"{text.count(MARKER)}); pick another template")
    head, tail = text.split(MARKER)
    before = tok(head, add_special_tokens=add_special)["input_ids"] if head else []
    if add_special and not head:
        before = tok("", add_special_tokens=True)["input_ids"]
    after = tok(tail, add_special_tokens=False)["input_ids"] if tail else []
    if add_special:  # a tokenizer that appends EOS would put it inside the prompt: drop it
        eos = tok.eos_token_id
        while before and eos is not None and before[-1] == eos and len(before) > 1:
            before = before[:-1]
    if not before and not after:
        raise VocabdriftError(f"template {t.name!r} encodes to nothing around the word")
    return PromptIds(t.name, tuple(before), tuple(after))


# ---- outcomes -------------------------------------------------------------------------------------------------

OUTCOMES = ("top1", "nucleus", "weak", "unsayable", "broken")


def outcome(rank: int, in_top_p: bool, p: float) -> str:
    """Named outcome of one probe: the model's first choice (top1), kept by top-p sampling (nucleus), cut by top-p
    but not negligible (weak), below VERIFY_P and cut (unsayable), or no number at all (broken: the model's logits
    hold NaN/Inf there)."""
    if p != p or p == float("inf"):  # NaN: the engine found non-finite logits
        return "broken"
    if rank == 1:
        return "top1"
    if in_top_p:
        return "nucleus"
    return "weak" if p >= VERIFY_P else "unsayable"


def probe_table(token_ids: Sequence[int], model: str, template: str, scores: Sequence[Score]) -> pa.Table:
    """probe.parquet rows for one (model, template) block; `sayable` is "kept by top-p sampling"."""
    import math

    import pyarrow as pa

    return pa.table({
        "token_id": pa.array([int(t) for t in token_ids], pa.int64()),
        "model": pa.array([model] * len(scores), pa.string()),
        "template": pa.array([template] * len(scores), pa.string()),
        "p_target": pa.array([math.exp(s.logprob) for s in scores], pa.float64()),
        "logprob": pa.array([s.logprob for s in scores], pa.float64()),
        "rank": pa.array([s.rank for s in scores], pa.int64()),
        "in_top_p": pa.array([s.in_top_p for s in scores], pa.bool_()),
        "sayable": pa.array([s.in_top_p for s in scores], pa.bool_()),
        "outcome": pa.array([outcome(s.rank, s.in_top_p, math.exp(s.logprob)) for s in scores], pa.string()),
    })


def best_per_token(table: pa.Table, model: str) -> dict[int, dict[str, Any]]:
    """token_id -> the row of `model`'s best template: a sayable row before any other, then the highest p_target.
    So a token is sayable when any family of prompts gets the model to say it (a template can keep a token at a
    lower probability than another that cuts it, when its distribution is flatter)."""
    import pyarrow.compute as pc

    rows = table.filter(pc.equal(table["model"], model)).to_pylist()
    best: dict[int, dict[str, Any]] = {}
    for r in rows:
        b = best.get(r["token_id"])
        if b is None or (bool(r["sayable"]), r["p_target"]) > (bool(b["sayable"]), b["p_target"]):
            best[r["token_id"]] = r
    return best


def summarize_probe(table: pa.Table, models: Sequence[str], *, base: str | None = None, post: str | None = None
                    ) -> dict[str, Any]:
    """summary["probe"]: models, tokens probed, sayable tokens per model, and LOST tokens (sayable in `base`,
    not in `post`), the most confident loss first."""
    best = {m: best_per_token(table, m) for m in models}
    tokens = sorted({t for b in best.values() for t in b})
    out: dict[str, Any] = {"models": list(models), "tokens": len(tokens),
                           "sayable": {m: sum(r["sayable"] for r in best[m].values()) for m in models},
                           "outcomes": {m: {o: sum(r["outcome"] == o for r in best[m].values()) for o in OUTCOMES}
                                        for m in models},
                           "lost": []}
    if base is not None and post is not None:
        lost = [t for t in tokens if best[base].get(t, {}).get("sayable") and not best[post].get(t, {}).get("sayable")]
        lost.sort(key=lambda t: best[post][t]["p_target"])
        out["lost"] = lost
    return out


def _group(best_b: dict[int, dict[str, Any]], best_p: dict[int, dict[str, Any]], ids: Sequence[int]
           ) -> dict[str, Any] | None:
    """Top-1 and nucleus counts in BASE and POST over `ids`, and the median change of the target's probability."""
    import math
    import statistics

    ids = [t for t in ids if t in best_b and t in best_p]
    if not ids:
        return None
    ratio = [math.log(max(best_p[t]["p_target"], 1e-30)) - math.log(max(best_b[t]["p_target"], 1e-30)) for t in ids]
    return {"n": len(ids),
            "top1": {"base": sum(best_b[t]["rank"] == 1 for t in ids),
                     "post": sum(best_p[t]["rank"] == 1 for t in ids)},
            "nucleus": {"base": sum(bool(best_b[t]["sayable"]) for t in ids),
                        "post": sum(bool(best_p[t]["sayable"]) for t in ids)},
            "median_p": {"base": statistics.median(best_b[t]["p_target"] for t in ids),
                         "post": statistics.median(best_p[t]["p_target"] for t in ids)},
            "p_ratio": math.exp(statistics.median(ratio))}  # median of POST/BASE per token


def per_token(table: pa.Table, token_ids: Sequence[int]) -> list[dict[str, Any]]:
    """One row per asked token and model (in the order asked, then BASE before POST): its best template's row."""
    models = list(dict.fromkeys(table["model"].to_pylist()))
    best = {m: best_per_token(table, m) for m in models}
    return [{**best[m][t], "token_id": int(t)} for t in dict.fromkeys(token_ids) for m in models if t in best[m]]


def headline(table: pa.Table, *, base: str = "base", post: str = "post") -> dict[str, Any]:
    """The probe's main signal: how often each model's first choice is the token (top-1) and how the target's
    probability changed against BASE, for the probed tokens and for a control set of undrifted tokens (the
    `control` column) probed the same way, so a model-wide change (a new chat style) is told apart from the
    drifted tokens' own. Per template too. Counts use each token's best template, as `sayable` does.

    The nucleus count ("sayable") alone hides the signal: at top-p 0.95 a base model's nucleus is wide, so most
    tokens stay inside it while the top-1 answers collapse."""
    import pyarrow.compute as pc

    ctrl = set(table.filter(table["control"])["token_id"].to_pylist()) if "control" in table.column_names else set()
    bb, bp = best_per_token(table, base), best_per_token(table, post)
    asked = sorted(t for t in bp if t not in ctrl)
    out: dict[str, Any] = {"tokens": _group(bb, bp, asked), "control": _group(bb, bp, sorted(ctrl)),
                           "templates": {}}
    for tmpl in sorted(set(table["template"].to_pylist())):
        sub = table.filter(pc.equal(table["template"], tmpl))
        g = _group(best_per_token(sub, base), best_per_token(sub, post), asked)
        if g is not None:
            out["templates"][tmpl] = g
    return out


def headline_lines(h: dict[str, Any]) -> list[str]:
    """The headline as sentences, for the console and the report: top-1 share and target probability, BASE ->
    POST, for the probed tokens and the control set."""
    def top1(g: dict[str, Any]) -> str:
        b, p, n = g["top1"]["base"], g["top1"]["post"], g["n"]
        verb = "fell" if p < b else "rose" if p > b else "stayed"
        return (f"from {b:,} to {p:,} of {n:,} ({b / n:.0%} -> {p / n:.0%})" if verb != "stayed"
                else f"at {b:,} of {n:,} ({b / n:.0%})"), verb

    def said(g: dict[str, Any]) -> str:
        b, p, n = g["nucleus"]["base"], g["nucleus"]["post"], g["n"]
        return f"from {b:,} to {p:,} of {n:,} ({b / n:.0%} -> {p / n:.0%})" if b != p else f"at {b:,} of {n:,}"

    t, c = h.get("tokens"), h.get("control")
    if t is None:
        return []
    if not t["top1"]["base"] and not t["top1"]["post"]:  # no first choice in either model: top-1 says nothing
        lines = [f"Sayable tokens (kept by top-p sampling) {said(t)}"
                 + (f"; of {c['n']:,} undrifted control tokens, {said(c)}" if c is not None else "")
                 + " (top-1 answers: none in BASE or POST on these templates, no signal)"]
    else:
        s, verb = top1(t)
        lines = [f"Top-1 answers (the model's first choice is the token) {verb} {s}"]
        if c is not None:
            cs, cverb = top1(c)
            lines[0] += f"; on {c['n']:,} undrifted control tokens they {cverb} {cs}"
    line = f"Median target probability x{t['p_ratio']:.2g} of BASE's"
    if c is not None:
        line += f" (control tokens x{c['p_ratio']:.2g})"
    lines.append(line)
    return lines


# ---- cases ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """A user-written check: greedy answer to `prompt` must contain `expected` and none of `forbidden`."""

    name: str
    prompt: str
    expected: str
    forbidden: tuple[str, ...] = field(default_factory=tuple)
    language: str | None = None


def parse_cases(lines: Iterable[str], *, source: str = "cases") -> list[Case]:
    """Cases from JSONL lines: {"prompt", "expected", optional "name", "forbidden": [...], "language"}."""
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise VocabdriftError(f"{source}:{i}: not valid JSON ({e.msg}); each line is one case object") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) \
                or not isinstance(rec.get("expected"), str) or not rec["expected"]:
            raise VocabdriftError(f"{source}:{i}: a case needs a string \"prompt\" and a non-empty string "
                                  "\"expected\" (optional: \"name\", \"forbidden\": [strings])")
        forb = rec.get("forbidden", [])
        if isinstance(forb, str):
            forb = [forb]
        if not isinstance(forb, list) or not all(isinstance(f, str) for f in forb):
            raise VocabdriftError(f"{source}:{i}: \"forbidden\" must be a list of strings")
        out.append(Case(str(rec.get("name") or f"case{i}"), rec["prompt"], rec["expected"], tuple(forb),
                        rec.get("language")))
    if not out:
        raise VocabdriftError(f"{source}: no cases found; write one JSON object per line")
    return out


def _norm(s: str) -> str:
    return unicodedata.normalize("NFKC", s).casefold()


def judge(output: str, case: Case) -> bool:
    """An answer passes when it contains the expected string and no forbidden one (NFKC, case-insensitive)."""
    o = _norm(output)
    return _norm(case.expected) in o and not any(_norm(f) in o for f in case.forbidden if f)
