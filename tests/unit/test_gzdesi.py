"""Galaxy Zoo DESI mapping: every branch of both schemas, NaN semantics, captions, symbols, columns."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from galaxalign_dist.data import gzdesi
from galaxalign_dist.data.gzdesi import GZDesiMapping, map_batch, map_row
from galaxalign_dist.data.schemas import GALAXY10, GALAXY_MNIST, parse_symbol_spec

NAN = math.nan
G10 = GZDesiMapping()
MNIST = GZDesiMapping(schema="galaxymnist")
RICH = GZDesiMapping(caption_mode="rich", symbol_mode="rich")

# Hand-made answer fractions, in gzdesi.QUESTIONS answer order.
SMOOTH = (0.8, 0.15, 0.05)
FEATURED = (0.1, 0.85, 0.05)
QUIET = (0.9, 0.05, 0.03, 0.02)  # merging: none / minor / major / merger
FACE_ON, EDGE_ON = (0.1, 0.9), (0.9, 0.1)
ARMS, NO_ARMS = (0.8, 0.2), (0.2, 0.8)
STRONG_BAR, WEAK_BAR, NO_BAR = (0.6, 0.1, 0.3), (0.2, 0.45, 0.35), (0.1, 0.1, 0.8)
TIGHT, MEDIUM, LOOSE = (0.7, 0.2, 0.1), (0.2, 0.7, 0.1), (0.1, 0.2, 0.7)


def row(**answers: tuple[float, ...]) -> dict[str, float]:
    """A full catalogue row: the given questions (underscored names) and NaN for every other one."""
    out: dict[str, float] = {"dr8_id": "330123_42"}  # type: ignore[dict-item]
    for q, names in gzdesi.QUESTIONS.items():
        values = answers.get(q.replace("-", "_"), (NAN,) * len(names))
        assert len(values) == len(names), q
        out.update({f"{q}_{a}_fraction": v for a, v in zip(names, values, strict=True)})
    return out


def smooth(shape: tuple[float, float, float], **kw) -> dict[str, float]:
    return row(smooth_or_featured=SMOOTH, how_rounded=shape, merging=QUIET, **kw)


def smooth_with_merging(merging: tuple[float, ...]) -> dict[str, float]:
    return row(smooth_or_featured=SMOOTH, how_rounded=(0.7, 0.2, 0.1), merging=merging)


def face_on(arms=ARMS, bar=NO_BAR, winding=(NAN,) * 3, **kw) -> dict[str, float]:
    return row(
        smooth_or_featured=FEATURED,
        disk_edge_on=FACE_ON,
        has_spiral_arms=arms,
        bar=bar,
        spiral_winding=winding,
        merging=QUIET,
        **kw,
    )


def edge_on(bulge: tuple[float, float, float]) -> dict[str, float]:  # edge-on-bulge: boxy / none / rounded
    return row(smooth_or_featured=FEATURED, disk_edge_on=EDGE_ON, edge_on_bulge=bulge, merging=QUIET)


def assert_class(r: dict, mapping: GZDesiMapping, key: str) -> dict:
    out = map_row(r, mapping)
    cls = (GALAXY10 if mapping.schema == "galaxy10" else GALAXY_MNIST).lookup(key)
    assert (out["label"], out["class_name"], out["keep"], out["reason"]) == (cls.index, cls.name, True, "")
    assert out["text"] == cls.caption and out["symbol"] == cls.symbol
    return out


def assert_uncertain(r: dict, mapping: GZDesiMapping, reason: str) -> dict:
    out = map_row(r, mapping)
    assert out["reason"] == reason
    assert (out["label"], out["keep"], out["class_name"], out["text"]) == (-1, False, "", "")
    return out


# --- galaxy10: one test per class, then every way a galaxy falls out -----------------------------

GALAXY10_CASES = [
    (smooth((0.7, 0.2, 0.1)), "round_smooth"),
    (smooth((0.2, 0.7, 0.1)), "in_between_round_smooth"),
    (smooth((0.1, 0.2, 0.7)), "cigar_shaped_smooth"),
    (face_on(bar=STRONG_BAR), "barred_spiral"),
    (face_on(bar=WEAK_BAR), "barred_spiral"),  # weak bars count: barred = strong + weak
    (face_on(bar=(0.3, 0.25, 0.45)), "barred_spiral"),  # neither alone > 0.5, their sum is
    (face_on(bar=STRONG_BAR, winding=(NAN,) * 3), "barred_spiral"),  # winding not needed for barred
    (face_on(winding=TIGHT), "unbarred_tight_spiral"),
    (face_on(winding=LOOSE), "unbarred_loose_spiral"),
    (edge_on((0.05, 0.85, 0.1)), "edge_on_without_bulge"),
    (edge_on((0.1, 0.2, 0.7)), "edge_on_with_bulge"),  # rounded
    (edge_on((0.6, 0.3, 0.1)), "edge_on_with_bulge"),  # boxy
    (edge_on((0.3, 0.4, 0.3)), "edge_on_with_bulge"),  # rounded + boxy = 0.6
    (row(smooth_or_featured=SMOOTH, how_rounded=(0.7, 0.2, 0.1), merging=(0.1, 0.1, 0.1, 0.7)), "merging"),
    (row(smooth_or_featured=SMOOTH, how_rounded=(0.7, 0.2, 0.1), merging=(0.1, 0.2, 0.6, 0.1)), "disturbed"),
    (row(smooth_or_featured=(0.2, 0.2, 0.6), merging=(0.1, 0.1, 0.1, 0.7)), "merging"),  # merger first
    (row(smooth_or_featured=(NAN,) * 3, merging=(0.1, 0.1, 0.1, 0.7)), "merging"),
    (row(smooth_or_featured=SMOOTH, how_rounded=(0.7, 0.2, 0.1)), "round_smooth"),  # merging NaN
    (smooth_with_merging((0.2, 0.7, 0.05, 0.05)), "round_smooth"),  # a minor disturbance is no class
]


@pytest.mark.parametrize("r,key", GALAXY10_CASES)
def test_galaxy10_classes(r, key):
    assert_class(r, G10, key)


GALAXY10_UNCERTAIN = [
    (row(smooth_or_featured=(0.1, 0.1, 0.8), merging=(NAN,) * 4), "artifact"),
    (row(smooth_or_featured=(0.4, 0.4, 0.2), merging=QUIET), "ambiguous smooth-or-featured"),
    (row(merging=QUIET), "nan: smooth-or-featured not asked"),
    (smooth((0.4, 0.35, 0.25)), "ambiguous how-rounded"),
    (smooth((NAN,) * 3), "nan: how-rounded not asked"),
    (row(smooth_or_featured=FEATURED, disk_edge_on=(0.5, 0.5), merging=QUIET), "ambiguous disk-edge-on"),
    (row(smooth_or_featured=FEATURED, merging=QUIET), "nan: disk-edge-on not asked"),
    (edge_on((NAN,) * 3), "nan: edge-on-bulge not asked"),
    (edge_on((0.25, 0.5, 0.25)), "ambiguous edge-on-bulge"),
    (face_on(arms=(NAN, NAN)), "nan: has-spiral-arms not asked"),
    (face_on(arms=(0.5, 0.5)), "ambiguous has-spiral-arms"),
    (face_on(arms=NO_ARMS), "no galaxy10 class for featured > face-on > no-arms"),
    (face_on(bar=(NAN,) * 3, winding=TIGHT), "nan: bar not asked"),  # not silently "unbarred"
    (face_on(bar=(0.3, 0.2, 0.5), winding=TIGHT), "ambiguous bar"),
    (face_on(winding=(NAN,) * 3), "nan: spiral-winding not asked"),
    (face_on(winding=(0.4, 0.3, 0.3)), "ambiguous spiral-winding"),
    (face_on(winding=MEDIUM), "no galaxy10 class for featured > face-on > spiral > unbarred > medium"),
]


@pytest.mark.parametrize("r,reason", GALAXY10_UNCERTAIN)
def test_galaxy10_uncertain_reasons(r, reason):
    assert_uncertain(r, G10, reason)


def test_nan_in_one_answer_makes_the_whole_question_not_asked():
    assert_uncertain(face_on(bar=(0.1, NAN, 0.8), winding=TIGHT), G10, "nan: bar not asked")


def test_answers_below_an_unreached_branch_are_ignored():
    # A smooth galaxy with confident (deep-learning) predictions for disk questions is still smooth.
    r = smooth((0.7, 0.2, 0.1), disk_edge_on=FACE_ON, has_spiral_arms=ARMS, bar=STRONG_BAR)
    assert_class(r, G10, "round_smooth")
    assert map_row(r, RICH)["symbol"] == "round"


def test_null_fraction_is_nan():
    r = face_on(winding=TIGHT)
    r["bar_no_fraction"] = None
    assert_uncertain(r, G10, "nan: bar not asked")


# --- galaxymnist ----------------------------------------------------------------------------------

MNIST_CASES = [
    (smooth((0.7, 0.2, 0.1)), "smooth_round"),
    (smooth((0.1, 0.2, 0.7)), "smooth_cigar"),
    (edge_on((0.1, 0.2, 0.7)), "edge_on_disk"),
    (edge_on((NAN,) * 3), "edge_on_disk"),  # the bulge is below the class: its NaN does not matter
    (face_on(winding=(NAN,) * 3), "unbarred_spiral"),  # winding not needed either
    (face_on(winding=TIGHT), "unbarred_spiral"),
]


@pytest.mark.parametrize("r,key", MNIST_CASES)
def test_galaxymnist_classes(r, key):
    assert_class(r, MNIST, key)


MNIST_UNCERTAIN = [
    (smooth((0.2, 0.7, 0.1)), "no galaxymnist class for smooth > in-between"),
    (face_on(bar=STRONG_BAR), "no galaxymnist class for featured > face-on > spiral > barred"),
    (face_on(bar=(NAN,) * 3), "nan: bar not asked"),
    (face_on(arms=NO_ARMS), "no galaxymnist class for featured > face-on > no-arms"),
    (smooth_with_merging((0.1, 0.1, 0.1, 0.7)), "no galaxymnist class for merger"),
    (smooth_with_merging((0.1, 0.2, 0.6, 0.1)), "no galaxymnist class for disturbed"),
    (row(smooth_or_featured=(0.1, 0.1, 0.8), merging=(NAN,) * 4), "artifact"),
    (row(smooth_or_featured=(0.45, 0.45, 0.1), merging=QUIET), "ambiguous smooth-or-featured"),
]


@pytest.mark.parametrize("r,reason", MNIST_UNCERTAIN)
def test_galaxymnist_uncertain_reasons(r, reason):
    assert_uncertain(r, MNIST, reason)


# --- thresholds and on_uncertain -------------------------------------------------------------------


def test_thresholds_are_strict_and_configurable():
    r = smooth((0.7, 0.2, 0.1))
    assert_uncertain(r, GZDesiMapping(smooth_or_featured=0.8), "ambiguous smooth-or-featured")  # 0.8 !> 0.8
    assert_uncertain(r, GZDesiMapping(how_rounded=0.75), "ambiguous how-rounded")
    assert_class(face_on(bar=WEAK_BAR), GZDesiMapping(bar=0.6), "barred_spiral")  # 0.65 > 0.6
    assert_uncertain(face_on(bar=WEAK_BAR), GZDesiMapping(bar=0.7), "ambiguous bar")
    disturbed = smooth_with_merging((0.1, 0.2, 0.6, 0.1))
    assert_class(disturbed, GZDesiMapping(major_disturbance=0.65), "round_smooth")


def test_on_uncertain_label_keeps_drawable_galaxies():
    label = GZDesiMapping(on_uncertain="label")
    out = map_row(face_on(arms=NO_ARMS, bar=STRONG_BAR), label)
    assert (out["label"], out["class_name"], out["keep"]) == (-1, "uncertain", True)
    assert out["reason"] == "no galaxy10 class for featured > face-on > no-arms"
    assert out["text"] == "A picture of a galaxy"  # class mode: one caption for the uncertain pseudo-class
    assert out["symbol"] == "disk+bar:strong"
    rich = map_row(
        face_on(arms=NO_ARMS, bar=STRONG_BAR), GZDesiMapping(on_uncertain="label", caption_mode="rich")
    )
    assert rich["text"] == "A picture of a face-on disk galaxy with a strong bar and no spiral arms"
    # Artifacts and galaxies without even a confident smooth/featured answer have nothing to draw.
    for r, reason in GALAXY10_UNCERTAIN[:3]:
        assert (map_row(r, label)["keep"], map_row(r, label)["reason"]) == (False, reason)


def test_mapping_validates_its_fields():
    for bad in [{"schema": "galaxy11"}, {"on_uncertain": "drop"}, {"caption_mode": "long"}, {"bar": 1.0}]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            GZDesiMapping(**bad)


# --- captions and symbols ---------------------------------------------------------------------------

RICH_CASES = [
    (
        face_on(bar=STRONG_BAR, winding=TIGHT),
        "A picture of a face-on spiral galaxy with a strong bar and tight arms",
    ),
    (
        face_on(
            winding=LOOSE,
            spiral_arm_count=(0.05, 0.8, 0.05, 0.05, 0.0, 0.05),
            bulge_size=(0, 0, 0.2, 0.6, 0.2),
        ),
        "A picture of a face-on unbarred spiral galaxy with two loose arms and a small bulge",
    ),
    (
        face_on(bar=WEAK_BAR, winding=MEDIUM, spiral_arm_count=(0.9, 0, 0, 0, 0, 0.1)),
        "A picture of a face-on spiral galaxy with a weak bar and one medium-wound arm",
    ),
    (edge_on((0.1, 0.2, 0.7)), "A picture of an edge-on disk galaxy with a rounded bulge"),
    (edge_on((0.6, 0.3, 0.1)), "A picture of an edge-on disk galaxy with a boxy bulge"),
    (edge_on((0.05, 0.85, 0.1)), "A picture of an edge-on disk galaxy without a bulge"),
    (smooth((0.1, 0.2, 0.7)), "A picture of a smooth cigar-shaped galaxy"),
    (smooth((0.2, 0.7, 0.1)), "A picture of a smooth in-between round galaxy"),
    (smooth_with_merging((0.1, 0.1, 0.1, 0.7)), "A picture of a merging galaxy"),
    (smooth_with_merging((0.1, 0.2, 0.6, 0.1)), "A picture of a disturbed galaxy"),
]


@pytest.mark.parametrize("r,text", RICH_CASES)
def test_rich_captions(r, text):
    out = map_row(r, RICH)
    assert (out["text"], out["keep"]) == (text, True)


def test_rich_caption_does_not_change_the_class():
    r = face_on(bar=STRONG_BAR, winding=TIGHT)
    assert map_row(r, RICH)["label"] == map_row(r, G10)["label"] == GALAXY10.lookup("barred_spiral").index


def test_class_captions_use_the_right_article():
    assert map_row(face_on(winding=TIGHT), G10)["text"] == "A picture of an unbarred tight spiral galaxy"
    assert map_row(edge_on((0.1, 0.2, 0.7)), G10)["text"] == "A picture of an edge-on galaxy with bulge"
    assert map_row(smooth((0.1, 0.2, 0.7)), G10)["text"] == "A picture of a cigar shaped smooth galaxy"
    assert map_row(smooth((0.2, 0.7, 0.1)), G10)["text"] == "A picture of an in-between round smooth galaxy"


SYMBOL_CASES = [
    (
        face_on(
            bar=STRONG_BAR,
            winding=TIGHT,
            spiral_arm_count=(0, 0.8, 0.1, 0.1, 0, 0),
            bulge_size=(0.5, 0.3, 0.1, 0.1, 0),
        ),
        "disk+bulge:big+bar:strong+arms:tight+arms2",
    ),
    (face_on(bar=WEAK_BAR, winding=(NAN,) * 3), "disk+bar:weak+arms"),
    (face_on(winding=LOOSE, spiral_arm_count=(0, 0, 0, 0.1, 0.8, 0.1)), "disk+arms:loose"),  # >4: no armsN
    (face_on(arms=NO_ARMS, bulge_size=(0, 0, 0, 0.1, 0.9)), "disk+bulge:none"),
    (edge_on((0.1, 0.2, 0.7)), "edgeon+bulge:big"),
    (edge_on((0.05, 0.85, 0.1)), "edgeon+bulge:none"),
    (smooth((0.7, 0.2, 0.1)), "round"),
    (smooth((0.2, 0.7, 0.1)), "inbetween"),
    (smooth((0.1, 0.2, 0.7)), "cigar"),
    (smooth_with_merging((0.1, 0.1, 0.1, 0.7)), "merger+tidal"),
    (smooth_with_merging((0.1, 0.2, 0.6, 0.1)), "disturbed"),
]


@pytest.mark.parametrize("r,symbol", SYMBOL_CASES)
def test_rich_symbols_are_valid_specs(r, symbol):
    out = map_row(r, GZDesiMapping(symbol_mode="rich", on_uncertain="label"))
    assert out["symbol"] == symbol
    parse_symbol_spec(out["symbol"])


def test_every_symbol_and_caption_of_a_catalogue_is_valid():
    table = gzdesi.synthetic_catalogue(3000, seed=1)
    out = map_batch(table, GZDesiMapping(caption_mode="rich", symbol_mode="rich", on_uncertain="label"))
    keep = np.asarray(out["keep"])
    for spec in set(np.asarray(out["symbol"])[keep]):
        parse_symbol_spec(spec)
    for text in set(np.asarray(out["text"])[keep]):
        assert re.fullmatch(
            r"A picture of (a [^aeiou]|an [aeiou]).*galaxy( with .+| without a bulge)?", text
        ), text


# --- columns ------------------------------------------------------------------------------------------


def test_missing_columns_error_names_the_columns_and_file():
    table = gzdesi.synthetic_catalogue(5).drop_columns(["bar_no_fraction", "how-rounded_round_fraction"])
    with pytest.raises(gzdesi.MissingColumnsError) as e:
        map_batch(table, G10, source="gz_desi_deep_learning_catalog_friendly.parquet")
    msg = str(e.value)
    assert "bar_no_fraction" in msg and "how-rounded_round_fraction" in msg
    assert "gz_desi_deep_learning_catalog_friendly.parquet" in msg and "bar_weak_fraction" not in msg


def test_required_columns_follow_schema_and_modes():
    g10 = set(gzdesi.required_columns(G10))
    mnist = set(gzdesi.required_columns(G10, "galaxymnist"))
    rich = set(gzdesi.required_columns(RICH))
    assert "spiral-winding_tight_fraction" in g10 - mnist  # galaxymnist never asks the winding
    assert "edge-on-bulge_rounded_fraction" in g10 - mnist
    assert {"bulge-size_small_fraction", "spiral-arm-count_2_fraction"} <= rich - g10
    assert {"merging_merger_fraction", "merging_major-disturbance_fraction", "bar_weak_fraction"} <= mnist
    assert "how-rounded_total-votes" in gzdesi.required_columns(GZDesiMapping(min_votes=17))
    assert all(c in gzdesi.synthetic_catalogue(2).schema.names for c in rich)  # names are the real ones


def test_galaxymnist_reads_a_catalogue_without_the_winding_columns():
    table = gzdesi.synthetic_catalogue(50).drop_columns(
        [f"spiral-winding_{a}_fraction" for a in ("tight", "medium", "loose")]
    )
    assert len(map_batch(table, MNIST)["label"]) == 50


def test_question_suffix_reads_ortho_column_names():
    table = gzdesi.synthetic_catalogue(200, seed=3)
    renamed = table.rename_columns(
        [re.sub(r"^([a-z-]+)_", r"\1-dr8_", n) if n.endswith("_fraction") else n for n in table.schema.names]
    )
    assert map_batch(renamed, GZDesiMapping(question_suffix="-dr8"))["label"].equals(
        map_batch(table, G10)["label"]
    )


def test_min_votes_treats_thinly_voted_questions_as_not_asked():
    r = face_on(winding=TIGHT)
    r.update({f"{q}_total-votes": 40 for q in gzdesi.QUESTIONS})
    m = GZDesiMapping(min_votes=17)
    assert_class(r, m, "unbarred_tight_spiral")
    r["spiral-winding_total-votes"] = 10
    assert_uncertain(r, m, "nan: spiral-winding not asked")


# --- vectorised batch vs rows, counting ---------------------------------------------------------------


@pytest.mark.parametrize(
    "mapping", [G10, MNIST, GZDesiMapping(caption_mode="rich", symbol_mode="rich", on_uncertain="label")]
)
def test_batch_equals_rows(mapping):
    table = gzdesi.synthetic_catalogue(400, seed=7)
    batch_out = map_batch(table.to_batches()[0], mapping)
    assert map_batch(table, mapping)["text"].equals(batch_out["text"])  # Table and RecordBatch agree
    hand = [r for r, _ in GALAXY10_CASES + GALAXY10_UNCERTAIN + MNIST_CASES]
    hand_out = map_batch(pa.Table.from_pylist(hand), mapping)
    for rows, out in [(table.to_pylist(), batch_out), (hand, hand_out)]:
        for i, r in enumerate(rows):
            assert map_row(r, mapping) == {k: v[i].as_py() for k, v in out.items()}


def test_count_reasons():
    out = map_batch(
        pa.Table.from_pylist([r for r, _ in GALAXY10_UNCERTAIN] + [GALAXY10_CASES[0][0]] * 3), G10
    )
    counts = gzdesi.count_reasons(out)
    assert counts == {reason: 1 for _, reason in GALAXY10_UNCERTAIN}
    assert sum(np.asarray(out["keep"])) == 3


# --- synthetic catalogue and ids ----------------------------------------------------------------------


def test_synthetic_catalogue_schema_and_tree_consistency():
    t = gzdesi.synthetic_catalogue(2000, seed=0)
    fraction_cols = [f"{q}_{a}_fraction" for q, ans in gzdesi.QUESTIONS.items() for a in ans]
    assert t.schema.names == ["dr8_id", "ra", "dec", *fraction_cols]
    ids = t["dr8_id"].to_pylist()
    assert len(set(ids)) == 2000 and all(re.fullmatch(r"\d+_\d+", i) for i in ids)
    f = {c: t[c].to_numpy() for c in fraction_cols}
    sums = {q: sum(f[f"{q}_{a}_fraction"] for a in ans) for q, ans in gzdesi.QUESTIONS.items()}
    for q, s in sums.items():
        assert np.allclose(s[~np.isnan(s)], 1.0, atol=1e-5), q
    # A question is NaN exactly where fewer than half the volunteers would reach it.
    featured = f["smooth-or-featured_featured-or-disk_fraction"]
    assert np.array_equal(np.isnan(f["disk-edge-on_yes_fraction"]), featured < 0.5)
    face_on = featured * np.nan_to_num(f["disk-edge-on_no_fraction"], nan=0.0)  # NaN only where featured < .5
    assert np.array_equal(np.isnan(f["bar_strong_fraction"]), face_on < 0.5)
    assert 0 < np.isnan(f["spiral-winding_tight_fraction"]).mean() < 1


def ipc_bytes(table: pa.Table) -> bytes:
    """Serialised table: equality that treats NaN as equal to NaN (Table.equals does not)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_synthetic_catalogue_is_deterministic_and_reaches_every_class():
    a, b = gzdesi.synthetic_catalogue(3000, seed=5), gzdesi.synthetic_catalogue(3000, seed=5)
    assert ipc_bytes(a) == ipc_bytes(b) != ipc_bytes(gzdesi.synthetic_catalogue(3000, seed=6))
    for mapping, schema in [(G10, GALAXY10), (MNIST, GALAXY_MNIST)]:
        labels = set(map_batch(a, mapping)["label"].to_pylist())
        assert labels == set(range(schema.num_classes)) | {-1}, mapping.schema


def test_synthetic_catalogue_with_votes():
    t = gzdesi.synthetic_catalogue(500, seed=2, votes=40)
    total, smooth_votes = (
        t["smooth-or-featured_total-votes"].to_numpy(),
        t["smooth-or-featured_smooth"].to_numpy(),
    )
    assert (total > 30).all()
    assert np.allclose(t["smooth-or-featured_smooth_fraction"].to_numpy(), smooth_votes / total, atol=1e-6)
    assert len(map_batch(t, GZDesiMapping(min_votes=17))["label"]) == 500


def test_image_relpath():
    paths = gzdesi.image_relpath(pa.array(["330123_42", "7_0"])).to_pylist()
    assert paths == ["330123/330123_42.jpg", "7/7_0.jpg"]


# --- the mapping table itself ---------------------------------------------------------------------------


def test_class_rules_name_real_classes_and_walkable_paths():
    for schema_name, rules in gzdesi.CLASS_RULES.items():
        schema = GALAXY10 if schema_name == "galaxy10" else GALAXY_MNIST
        assert {schema.lookup(k).index for k in rules} == set(range(schema.num_classes))
        for path in rules.values():
            if path in (("merger",), ("disturbed",)):
                continue
            for i in range(len(path)):
                assert path[i] in gzdesi.TREE[path[:i]][1].values(), path


def test_docs_embed_the_default_mapping_table():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "gzdesi.md").read_text()
    assert gzdesi.mapping_markdown() in doc
