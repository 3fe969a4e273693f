"""Galaxy Zoo DESI vote fractions -> class label, caption and symbol spec, vectorised over Arrow batches."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from galaxalign_dist.data.catalog_io import as_text
from galaxalign_dist.data.schemas import caption, get_schema

# The GZ DESI decision tree's questions and answers, spelled as galaxy-datasets'
# `label_metadata.desi_pairs` (the GZ DECaLS DR5/DR8 schema without the -dr8 suffix). Catalogue
# columns are `{question}{suffix}_{answer}_fraction` (+ optional `_total-votes` / vote counts).
QUESTIONS: dict[str, tuple[str, ...]] = {
    "smooth-or-featured": ("smooth", "featured-or-disk", "artifact"),
    "disk-edge-on": ("yes", "no"),
    "has-spiral-arms": ("yes", "no"),
    "bar": ("strong", "weak", "no"),
    "bulge-size": ("dominant", "large", "moderate", "small", "none"),
    "how-rounded": ("round", "in-between", "cigar-shaped"),
    "edge-on-bulge": ("boxy", "none", "rounded"),
    "spiral-winding": ("tight", "medium", "loose"),
    "spiral-arm-count": ("1", "2", "3", "4", "more-than-4", "cant-tell"),
    "merging": ("none", "minor-disturbance", "major-disturbance", "merger"),
}
# The answer a question depends on (galaxy-datasets `desi_dependencies`); merging is asked of all.
ASKED_AFTER: dict[str, tuple[str, str] | None] = {
    "smooth-or-featured": None,
    "disk-edge-on": ("smooth-or-featured", "featured-or-disk"),
    "has-spiral-arms": ("disk-edge-on", "no"),
    "bar": ("disk-edge-on", "no"),
    "bulge-size": ("disk-edge-on", "no"),
    "how-rounded": ("smooth-or-featured", "smooth"),
    "edge-on-bulge": ("disk-edge-on", "yes"),
    "spiral-winding": ("has-spiral-arms", "yes"),
    "spiral-arm-count": ("has-spiral-arms", "yes"),
    "merging": None,
}
# Answers whose fractions are summed before the threshold: "barred" = strong + weak (GZ DECaLS split
# the bar answer in two; Geron et al. 2021 find them one continuum); the larger names the outcome.
GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "bar": (("strong", "weak"), ("no",)),
    "edge-on-bulge": (("rounded", "boxy"), ("none",)),
    "bulge-size": (("dominant", "large"), ("moderate", "small"), ("none",)),
}
MERGING_USED = ("merger", "major-disturbance")

# Walk through the tree for the class: path so far -> (next question, answer -> path token).
TREE: dict[tuple[str, ...], tuple[str, dict[str, str]]] = {
    (): ("smooth-or-featured", {"smooth": "smooth", "featured-or-disk": "featured", "artifact": "artifact"}),
    ("smooth",): ("how-rounded", {"round": "round", "in-between": "in-between", "cigar-shaped": "cigar"}),
    ("featured",): ("disk-edge-on", {"yes": "edge-on", "no": "face-on"}),
    ("featured", "edge-on"): ("edge-on-bulge", {"rounded": "bulge", "boxy": "bulge", "none": "no-bulge"}),
    ("featured", "face-on"): ("has-spiral-arms", {"yes": "spiral", "no": "no-arms"}),
    ("featured", "face-on", "spiral"): ("bar", {"strong": "barred", "weak": "barred", "no": "unbarred"}),
    ("featured", "face-on", "spiral", "unbarred"): (
        "spiral-winding",
        {"tight": "tight", "medium": "medium", "loose": "loose"},
    ),
}
# THE mapping table: each class is the path of confident answers that leads to it. The walk stops
# as soon as the path equals a rule, so a class never depends on a question below its rule
# (GalaxyMNIST's edge_on_disk does not need edge-on-bulge). Mergers are checked before the tree.
CLASS_RULES: dict[str, dict[str, tuple[str, ...]]] = {
    "galaxy10": {
        "disturbed": ("disturbed",),
        "merging": ("merger",),
        "round_smooth": ("smooth", "round"),
        "in_between_round_smooth": ("smooth", "in-between"),
        "cigar_shaped_smooth": ("smooth", "cigar"),
        "barred_spiral": ("featured", "face-on", "spiral", "barred"),
        "unbarred_tight_spiral": ("featured", "face-on", "spiral", "unbarred", "tight"),
        "unbarred_loose_spiral": ("featured", "face-on", "spiral", "unbarred", "loose"),
        "edge_on_without_bulge": ("featured", "edge-on", "no-bulge"),
        "edge_on_with_bulge": ("featured", "edge-on", "bulge"),
    },
    # GalaxyMNIST (Walmsley): "at least half of [the volunteers asked] must have answered with the
    # given class" at every question on the path -- a 0.5 threshold per question.
    "galaxymnist": {
        "smooth_round": ("smooth", "round"),
        "smooth_cigar": ("smooth", "cigar"),
        "edge_on_disk": ("featured", "edge-on"),
        "unbarred_spiral": ("featured", "face-on", "spiral", "unbarred"),
    },
}
UNCERTAIN = "uncertain"  # class_name of rows kept with on_uncertain="label"
UNCERTAIN_CAPTION = caption("galaxy")  # their text in caption_mode="class"
_NAN, _AMBIGUOUS = 0, 1  # codes 2.. are outcome indices + 2 (see _pick)
# Face-on bulge sizes drawn with the symbol grammar's three bulge sizes.
BULGE_SYMBOL = {"dominant": "big", "large": "big", "moderate": "small", "small": "small", "none": "none"}


def _rule(text: str) -> float:
    # Every threshold defaults to 0.5, GalaxyMNIST's "at least half of the volunteers asked" (sources
    # per threshold in docs/gzdesi.md); `rule` is the line mapping_markdown() prints for it.
    return field(default=0.5, metadata={"rule": text})


@dataclass(frozen=True)
class GZDesiMapping:
    """Thresholds and modes that turn GZ DESI vote fractions into (class, caption, symbol).

    An answer is *confident* when its fraction (or its group's summed fraction) is strictly above
    the question's threshold; with thresholds >= 0.5 at most one answer per question can be.
    """

    schema: Literal["galaxy10", "galaxymnist"] = "galaxy10"
    on_uncertain: Literal["exclude", "label"] = "exclude"
    caption_mode: Literal["class", "rich"] = "class"  # class = the paper's per-class caption
    symbol_mode: Literal["class", "rich"] = "class"  # class = the schema's per-class symbol
    smooth_or_featured: float = _rule("smooth / featured-or-disk / artifact")
    how_rounded: float = _rule("round / in-between / cigar-shaped (smooth only)")
    disk_edge_on: float = _rule("edge-on yes / no (featured only)")
    edge_on_bulge: float = _rule("bulge = rounded + boxy, or none (edge-on only)")
    has_spiral_arms: float = _rule("spiral arms yes / no (face-on only)")
    bar: float = _rule("barred = strong + weak (larger names it), or no (face-on only)")
    spiral_winding: float = _rule("tight / medium / loose (spiral only)")
    spiral_arm_count: float = _rule("1 / 2 / 3 / 4 / more-than-4 / cant-tell (spiral only; rich)")
    bulge_size: float = _rule("dominant + large / moderate + small / none (face-on; rich)")
    merger: float = _rule("merging_merger above it: merging galaxy (checked first)")
    major_disturbance: float = _rule("merging_major-disturbance above it: disturbed galaxy")
    # GalaxyMNIST also required >= 17 volunteers asked; needs `{q}_total-votes` columns when > 0.
    min_votes: int = 0
    question_suffix: str = ""  # e.g. "-dr8" for the zoobot "ortho" column names

    def __post_init__(self) -> None:
        modes = ("class", "rich")
        choices = {"schema": tuple(CLASS_RULES), "on_uncertain": ("exclude", "label"), "caption_mode": modes}
        for name, allowed in {**choices, "symbol_mode": modes}.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GZDesiMapping.{name} = {getattr(self, name)!r}: one of {allowed}")
        for f in fields(self):
            if "rule" in f.metadata and not 0.0 < getattr(self, f.name) < 1.0:
                raise ValueError(f"GZDesiMapping.{f.name} = {getattr(self, f.name)}: must be in (0, 1)")

    def column(self, question: str, answer: str) -> str:
        return f"{question}{self.question_suffix}_{answer}_fraction"

    def votes_column(self, question: str) -> str:
        return f"{question}{self.question_suffix}_total-votes"


class MissingColumnsError(ValueError):
    """A catalogue lacks columns the mapping reads."""


def _groups(question: str) -> tuple[tuple[str, ...], ...]:
    return GROUPS.get(question, tuple((a,) for a in QUESTIONS[question]))


def _outcomes(question: str) -> tuple[str, ...]:
    return tuple(a for g in _groups(question) for a in g)


def _questions_used(mapping: GZDesiMapping, schema: str) -> list[str]:
    """Questions on the schema's rule paths; all of them when rich captions/symbols may be built."""
    rules = CLASS_RULES[schema].values()
    on_path = {TREE[r[:i]][0] for r in rules for i in range(len(r)) if r[:i] in TREE}
    rich = "rich" in (mapping.caption_mode, mapping.symbol_mode) or mapping.on_uncertain == "label"
    return [q for q in QUESTIONS if rich or q in on_path or q == "merging"]


def required_columns(mapping: GZDesiMapping, schema: str | None = None) -> list[str]:
    """Catalogue columns `map_batch` reads for this mapping (and schema, default mapping.schema)."""
    cols = []
    for q in _questions_used(mapping, schema or mapping.schema):
        cols += [mapping.column(q, a) for a in (MERGING_USED if q == "merging" else QUESTIONS[q])]
        cols += [mapping.votes_column(q)] if mapping.min_votes > 0 else []
    return cols


def check_columns(names: list[str], mapping: GZDesiMapping, source: str | None = None) -> None:
    missing = [c for c in required_columns(mapping) if c not in set(names)]
    if missing:
        where = f" in {source}" if source else ""
        raise MissingColumnsError(
            f"Galaxy Zoo DESI catalogue{where} lacks {len(missing)} column(s) needed for schema "
            f"{mapping.schema!r}: {missing}"
        )


def _fractions(batch: pa.RecordBatch | pa.Table, mapping: GZDesiMapping) -> dict[str, dict[str, np.ndarray]]:
    """Fractions per question and answer as float64; NaN where null, absent or unused by this mapping."""
    n, names, out = batch.num_rows, set(batch.schema.names), {}
    used = _questions_used(mapping, mapping.schema)  # unused answers would only multiply combinations
    for q, answers in QUESTIONS.items():
        few = np.zeros(n, bool)
        if mapping.min_votes > 0 and mapping.votes_column(q) in names:
            votes = pc.fill_null(batch.column(mapping.votes_column(q)), 0).to_numpy(zero_copy_only=False)
            few = votes < mapping.min_votes  # too few volunteers asked: treat as not asked
        out[q] = {}
        for a in answers:
            col = mapping.column(q, a)
            x = np.full(n, np.nan)
            if col in names and q in used:
                x = pc.fill_null(pc.cast(batch.column(col), pa.float64()), np.nan).to_numpy(
                    zero_copy_only=False
                )
            out[q][a] = np.where(few, np.nan, x)
    return out


def _pick(fr: dict[str, np.ndarray], question: str, threshold: float) -> np.ndarray:
    """Per row: 0 if the question has a NaN answer, 1 if no answer is confident, else 2 + outcome index."""
    groups = _groups(question)
    nan = np.isnan(np.stack([fr[a] for g in groups for a in g])).any(0)
    sums = np.nan_to_num(np.stack([sum(fr[a] for a in g) for g in groups]), nan=-1.0)  # (groups, rows)
    best = sums.argmax(0)
    outcome = np.cumsum([0] + [len(g) for g in groups])[best]
    for gi, g in enumerate(groups):  # within the winning group its largest member names the outcome
        if len(g) > 1:
            outcome += np.where(best == gi, np.stack([np.nan_to_num(fr[a]) for a in g]).argmax(0), 0)
    confident = np.take_along_axis(sums, best[None], 0)[0] > threshold
    return np.where(nan, _NAN, np.where(confident, 2 + outcome, _AMBIGUOUS)).astype(np.int64)


def _codes(fr: dict[str, dict[str, np.ndarray]], m: GZDesiMapping) -> dict[str, np.ndarray]:
    """Vectorised tree answers. Questions off the confident path are zeroed: never read, and fewer combinations."""
    c = {q: _pick(fr[q], q, getattr(m, q.replace("-", "_"))) for q in QUESTIONS if q != "merging"}
    mg = fr["merging"]
    c["merging"] = np.where(
        mg["merger"] > m.merger, 2, np.where(mg["major-disturbance"] > m.major_disturbance, 3, 0)
    )
    for q, after in ASKED_AFTER.items():  # dict order puts parents first
        if after is not None:
            parent, answer = after
            c[q] = np.where(c[parent] == 2 + _outcomes(parent).index(answer), c[q], _NAN)
    # A merger's walk and description stop before the tree.
    return {q: v if q == "merging" else np.where(c["merging"] == 0, v, _NAN) for q, v in c.items()}


def _answer(codes: dict[str, int], q: str) -> str | None:
    return _outcomes(q)[codes[q] - 2] if codes[q] >= 2 else None


def _walk(codes: dict[str, int], schema: str) -> tuple[str | None, str]:
    """(class key, "") for a galaxy that fits a class, else (None, reason)."""
    rules = CLASS_RULES[schema]
    merging = {2: ("merger",), 3: ("disturbed",)}
    path: tuple[str, ...] = merging.get(codes["merging"], ())
    while True:
        for key, rule in rules.items():
            if rule == path:
                return key, ""
        if path == ("artifact",):
            return None, "artifact"
        if not any(rule[: len(path)] == path for rule in rules.values()):
            return None, f"no {schema} class for {' > '.join(path)}"
        question, tokens = TREE[path]
        if codes[question] == _NAN:
            return None, f"nan: {question} not asked"
        if codes[question] == _AMBIGUOUS:
            return None, f"ambiguous {question}"
        path += (tokens[_answer(codes, question)],)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _compose(codes: dict[str, int]) -> tuple[str, str] | tuple[None, None]:
    """Rich (noun phrase, symbol spec) from every confident answer; (None, None) if no shape is known."""
    a = {q: _answer(codes, q) for q in codes if q != "merging"}
    if codes["merging"]:
        return (
            ("merging galaxy", "merger+tidal") if codes["merging"] == 2 else ("disturbed galaxy", "disturbed")
        )
    if a["smooth-or-featured"] == "smooth":
        r = a["how-rounded"]
        adj = {"round": "round ", "in-between": "in-between round ", "cigar-shaped": "cigar-shaped "}
        sym = {"in-between": "inbetween", "cigar-shaped": "cigar"}
        return f"smooth {adj.get(r, '')}galaxy", sym.get(r, "round")  # unknown roundness drawn round
    if a["smooth-or-featured"] != "featured-or-disk":
        return None, None  # artifact, NaN or ambiguous: nothing to draw
    if a["disk-edge-on"] == "yes":
        b = a["edge-on-bulge"]
        words = {"rounded": " with a rounded bulge", "boxy": " with a boxy bulge", "none": " without a bulge"}
        sym = {"rounded": "+bulge:big", "boxy": "+bulge:big", "none": "+bulge:none"}
        return "edge-on disk galaxy" + words.get(b, ""), "edgeon" + sym.get(b, "")
    if a["disk-edge-on"] != "no":
        return "disk galaxy", "disk"
    spiral, bar = a["has-spiral-arms"] == "yes", a["bar"]
    wind, count = a["spiral-winding"], a["spiral-arm-count"]
    noun = "face-on " + ("unbarred " if bar == "no" else "") + ("spiral galaxy" if spiral else "disk galaxy")
    items = [f"a {bar} bar"] if bar in ("strong", "weak") else []
    count_word = {"1": "one", "2": "two", "3": "three", "4": "four", "more-than-4": "many"}.get(count)
    wind_word = {"medium": "medium-wound"}.get(wind, wind)
    if spiral and (count_word or wind_word):
        items.append(" ".join(w for w in (count_word, wind_word, "arm" if count == "1" else "arms") if w))
    items += ["no spiral arms"] if a["has-spiral-arms"] == "no" else []
    bulge = a["bulge-size"]
    items += [{"none": "no bulge"}.get(bulge, f"a {bulge} bulge")] if bulge else []
    sym = ["disk"] + ([f"bulge:{BULGE_SYMBOL[bulge]}"] if bulge else [])
    sym += [f"bar:{bar}"] if bar in ("strong", "weak") else []
    if spiral:  # "arms" alone takes the grammar's default winding
        sym += [f"arms:{wind}" if wind else "arms"] + ([f"arms{count}"] if count in ("2", "3", "4") else [])
    return noun + (" with " + _join(items) if items else ""), "+".join(sym)


def _describe(codes: dict[str, int], m: GZDesiMapping) -> tuple[int, str, str, str, bool, str]:
    """(label, class_name, text, symbol, keep, reason) for one combination of tree answers."""
    key, reason = _walk(codes, m.schema)
    phrase, rich_symbol = _compose(codes)
    if key is not None:
        cls = get_schema(m.schema).lookup(key)
        text = caption(cls.name) if m.caption_mode == "class" else caption(phrase)
        return cls.index, cls.name, text, cls.symbol if m.symbol_mode == "class" else rich_symbol, True, ""
    if m.on_uncertain == "label" and rich_symbol is not None:  # artifacts have no symbol: always dropped
        text = UNCERTAIN_CAPTION if m.caption_mode == "class" else caption(phrase)
        return -1, UNCERTAIN, text, rich_symbol, True, reason
    return -1, "", "", "", False, reason


def map_batch(
    batch: pa.RecordBatch | pa.Table, mapping: GZDesiMapping | None = None, *, source: str | None = None
) -> dict[str, pa.Array]:
    """Map every row to label (int32, -1 = uncertain/excluded), class_name, text, symbol, keep, reason.

    Thresholds are numpy masks over the whole batch; the tree walk and caption/symbol composition run
    once per distinct combination of answers (a few hundred), never per row. `source` names the file
    in the missing-columns error.
    """
    m = mapping or GZDesiMapping()
    check_columns(batch.schema.names, m, source)
    codes = _codes(_fractions(batch, m), m)
    order = list(codes)
    key = sum(codes[q].astype(np.int64) * 10**i for i, q in enumerate(order))  # every code is < 10
    uniq, inverse = np.unique(key, return_inverse=True)
    rows = [_describe({q: int(u // 10**i % 10) for i, q in enumerate(order)}, m) for u in uniq]
    idx = pa.array(inverse.reshape(-1).astype(np.int64))
    types = [pa.int32(), pa.string(), pa.string(), pa.string(), pa.bool_(), pa.string()]
    names = ["label", "class_name", "text", "symbol", "keep", "reason"]
    return {
        name: pa.array([r[i] for r in rows], t).take(idx)
        for i, (name, t) in enumerate(zip(names, types, strict=True))
    }


def map_row(row: dict[str, Any], mapping: GZDesiMapping | None = None) -> dict[str, Any]:
    """One catalogue row (column -> value; None/NaN = not asked) mapped through `map_batch`."""
    batch = pa.RecordBatch.from_pydict({k: pa.array([v]) for k, v in row.items()})
    return {k: v[0].as_py() for k, v in map_batch(batch, mapping).items()}


def count_reasons(result: dict[str, pa.Array]) -> dict[str, int]:
    """How many rows fell out of the schema, by reason (kept uncertain rows included)."""
    counts = pc.value_counts(result["reason"]).to_pylist()
    return {c["values"]: c["counts"] for c in counts if c["values"]}


def image_relpath(dr8_id: pa.Array) -> pa.Array:
    """`{brickid}_{objid}` -> `{brickid}/{brickid}_{objid}.jpg`, the GZ DESI image layout (as string)."""
    dr8_id = as_text(dr8_id)  # large_string (pandas 3, polars), dictionary, string_view or integer ids
    brick = pc.list_element(pc.split_pattern(dr8_id, "_", max_splits=1), 0)
    return pc.binary_join_element_wise(pc.binary_join_element_wise(brick, dr8_id, "/"), ".jpg", "")


def synthetic_catalogue(
    n: int, seed: int = 0, *, nan_below: float = 0.5, votes: int | None = None
) -> pa.Table:
    """A GZ DESI-schema catalogue of `n` made-up galaxies, deterministic in `seed`.

    Each question's fractions are a Dirichlet draw leaning towards one random answer, so confident
    branches are common. A question's fractions are NaN where the expected share of volunteers who
    reach it (product of the parent answers' fractions) is below `nan_below`, as in the "friendly"
    catalogue. With `votes`, `{q}_total-votes` and per-answer counts are added and fractions are
    counts / total.
    """
    rng = np.random.default_rng(seed)
    prior = {"smooth-or-featured": (0.45, 0.45, 0.1), "merging": (0.8, 0.1, 0.05, 0.05)}
    i = np.arange(n)
    brick, objid = 100_000 + 37 * (i // 2048), i % 2048  # unique ids, ~2048 objects per brick
    cols: dict[str, Any] = {
        "dr8_id": pc.binary_join_element_wise(
            pc.cast(pa.array(brick), pa.string()), pc.cast(pa.array(objid), pa.string()), "_"
        ),
        "ra": rng.uniform(0, 360, n),
        "dec": np.degrees(np.arcsin(rng.uniform(-0.35, 0.98, n))),
    }
    reach: dict[str, np.ndarray] = {}
    fracs: dict[str, np.ndarray] = {}
    for q, answers in QUESTIONS.items():
        k = len(answers)
        favourite = rng.choice(k, size=n, p=prior.get(q, np.full(k, 1 / k)))
        g = rng.gamma(0.5 + 6.0 * (np.arange(k)[None] == favourite[:, None]))  # (n, k) Dirichlet
        fracs[q] = g / g.sum(1, keepdims=True)
        if (after := ASKED_AFTER[q]) is not None:
            parent_share = fracs[after[0]][:, QUESTIONS[after[0]].index(after[1])]
            reach[q] = reach[after[0]] * np.nan_to_num(parent_share)  # NaN: no votes on the parent
        else:  # merging is asked of smooth and featured galaxies, not artifacts
            reach[q] = np.ones(n) if q != "merging" else 1.0 - fracs["smooth-or-featured"][:, 2]
        if votes:  # volunteers who reach the question, split by the fractions; fractions recomputed
            counts = np.rint(fracs[q] * np.rint(reach[q] * votes)[:, None]).astype(np.int32)
            total = counts.sum(1)
            cols[f"{q}_total-votes"] = total
            with np.errstate(invalid="ignore", divide="ignore"):
                fracs[q] = counts / total[:, None]
        nan = (reach[q] < nan_below) | (~(total > 0) if votes else False)
        for j, a in enumerate(answers):
            if votes:
                cols[f"{q}_{a}"] = counts[:, j]
            cols[f"{q}_{a}_fraction"] = np.where(nan, np.nan, fracs[q][:, j]).astype(np.float32)
    return pa.table(cols)


def mapping_markdown(mapping: GZDesiMapping | None = None) -> str:
    """The thresholds and class rules as Markdown tables (docs/gzdesi.md embeds the defaults)."""
    m = mapping or GZDesiMapping()
    lines = [
        "| Threshold (`GZDesiMapping.`) | Default | Confident answer: fraction strictly above it |",
        "|---|---|---|",
    ]
    lines += [
        f"| `{f.name}` | {getattr(m, f.name)} | {f.metadata['rule']} |"
        for f in fields(m)
        if "rule" in f.metadata
    ]
    merging = {"merger": "merging = merger", "disturbed": "merging = major-disturbance"}
    for schema, rules in CLASS_RULES.items():
        lines += [
            "",
            f"| `{schema}` class | Path | Confident answer at each step (+: fractions summed) |",
            "|---|---|---|",
        ]
        for key, path in rules.items():
            steps = [merging[path[0]]] if path[0] in merging else []
            for i in range(len(steps), len(path)):
                question, tokens = TREE[path[:i]]
                steps.append(f"{question} = {' + '.join(a for a, t in tokens.items() if t == path[i])}")
            lines.append(f"| `{key}` | {' > '.join(path)} | {'; '.join(steps)} |")
    return "\n".join(lines) + "\n"
