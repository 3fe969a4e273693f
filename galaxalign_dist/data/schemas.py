"""Class schemas: class order, human-readable names, captions and the symbol each class is drawn as."""

from __future__ import annotations

from dataclasses import dataclass

CAPTION_TEMPLATE = "A picture of {article} {name}"  # the paper's caption template

# Symbol specs are small strings, "part+part:option": they are stored per row in the Parquet
# shards, so a row carries what is needed to draw its symbol without any image file.
#   shape parts: round | inbetween | cigar | edgeon | disk | merger | disturbed
#   modifiers:   bulge[:small|none|big]  bar[:strong|weak]  arms[:medium|tight|loose]
#                arms2|arms3|arms4 (number of arms)  tidal
#   a modifier without a value takes its first (default) value.
SHAPES = ("round", "inbetween", "cigar", "edgeon", "disk", "merger", "disturbed")
MODIFIERS = {
    "bulge": ("small", "none", "big"),
    "bar": ("strong", "weak"),
    "arms": ("medium", "tight", "loose"),
    "arms2": (),
    "arms3": (),
    "arms4": (),
    "tidal": (),
}


def article(name: str) -> str:
    """'an' before a vowel sound, else 'a' (class names here have no silent-h or 'eu' cases)."""
    return "an" if name[:1].lower() in "aeiou" else "a"


def caption(name: str) -> str:
    """The paper's caption, e.g. 'A picture of an unbarred tight spiral galaxy'."""
    return CAPTION_TEMPLATE.format(article=article(name), name=name)


def parse_symbol_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split 'disk+bar:strong+arms:tight' into ('disk', {'bar': 'strong', 'arms': 'tight'}).

    Raises ValueError naming the bad part, so a typo in a catalogue mapping fails loudly.
    """
    parts = [p.strip() for p in spec.split("+") if p.strip()]
    if not parts or parts[0] not in SHAPES:
        raise ValueError(f"symbol spec {spec!r}: must start with a shape, one of {SHAPES}")
    mods: dict[str, str] = {}
    for part in parts[1:]:
        key, _, value = part.partition(":")
        if key not in MODIFIERS:
            raise ValueError(f"symbol spec {spec!r}: unknown part {key!r}, known: {sorted(MODIFIERS)}")
        allowed = MODIFIERS[key]
        if value and value not in allowed:
            raise ValueError(f"symbol spec {spec!r}: {key} takes one of {allowed}, got {value!r}")
        mods[key] = value or (allowed[0] if allowed else "")
    return parts[0], mods


@dataclass(frozen=True)
class GalaxyClass:
    index: int
    key: str  # machine name as the source dataset spells it
    name: str  # human-readable name used in the caption
    symbol: str  # symbol spec (see above)

    @property
    def caption(self) -> str:
        return caption(self.name)


@dataclass(frozen=True)
class ClassSchema:
    name: str
    classes: tuple[GalaxyClass, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def captions(self) -> list[str]:
        return [c.caption for c in self.classes]

    def lookup(self, label: int | str) -> GalaxyClass:
        """Class by index, key or human-readable name (case-insensitive); a clear error otherwise."""
        if isinstance(label, (int,)) or (isinstance(label, str) and label.strip().isdigit()):
            i = int(label)
            if not 0 <= i < self.num_classes:
                raise ValueError(
                    f"label {i} out of range for schema {self.name!r} (0..{self.num_classes - 1})"
                )
            return self.classes[i]
        wanted = str(label).strip().lower().replace("-", " ").replace("_", " ")
        for c in self.classes:
            if wanted in (c.key.lower().replace("_", " "), c.name.lower().replace("-", " ")):
                return c
        raise ValueError(
            f"unknown class {label!r} for schema {self.name!r}; known: {[c.key for c in self.classes]}"
        )


def _schema(name: str, rows: list[tuple[str, str, str]]) -> ClassSchema:
    for _, _, sym in rows:
        parse_symbol_spec(sym)  # fail at import if a table entry is malformed
    return ClassSchema(name, tuple(GalaxyClass(i, k, n, s) for i, (k, n, s) in enumerate(rows)))


# Order is the published label order of each dataset (docs/design.md#datasets-and-class-order); never reorder.
GALAXY10 = _schema(
    "galaxy10",
    [
        ("disturbed", "disturbed galaxy", "disturbed"),
        ("merging", "merging galaxy", "merger+tidal"),
        ("round_smooth", "round smooth galaxy", "round"),
        ("in_between_round_smooth", "in-between round smooth galaxy", "inbetween"),
        ("cigar_shaped_smooth", "cigar shaped smooth galaxy", "cigar"),
        ("barred_spiral", "barred spiral galaxy", "disk+bulge:small+bar:strong+arms:medium"),
        ("unbarred_tight_spiral", "unbarred tight spiral galaxy", "disk+bulge:small+arms:tight"),
        ("unbarred_loose_spiral", "unbarred loose spiral galaxy", "disk+bulge:small+arms:loose"),
        ("edge_on_without_bulge", "edge-on galaxy without bulge", "edgeon+bulge:none"),
        ("edge_on_with_bulge", "edge-on galaxy with bulge", "edgeon+bulge:big"),
    ],
)

GALAXY_MNIST = _schema(
    "galaxymnist",
    [
        ("smooth_round", "smooth round galaxy", "round"),
        ("smooth_cigar", "smooth cigar-shaped galaxy", "cigar"),
        ("edge_on_disk", "edge-on disk galaxy", "edgeon+bulge:small"),
        ("unbarred_spiral", "unbarred spiral galaxy", "disk+bulge:small+arms:medium"),
    ],
)

SCHEMAS: dict[str, ClassSchema] = {s.name: s for s in (GALAXY10, GALAXY_MNIST)}


def get_schema(name: str) -> ClassSchema:
    try:
        return SCHEMAS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown schema {name!r}; known: {sorted(SCHEMAS)}") from None
